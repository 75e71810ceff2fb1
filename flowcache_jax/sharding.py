"""The device mesh: the one place that knows how parameters, the sampler state and activations are sharded.

A mesh has three named axes (``MESH_AXES``), MaxText / maxdiffusion style:

- ``data``: CFG branches (and the batch): SkyReels-V2's two branches run on two device groups;
- ``fsdp``: parameters sharded FSDP-style (ZeRO-3: every weight lives on ``1 / fsdp`` of the devices and is
  gathered where it is used), so a model larger than one device's memory still runs;
- ``seq``: the tokens of a chunk sharded for attention (context parallel). Every device holds its share of a
  chunk's queries and of the stored K/V buffer; attention reads the K/V all-gathered (``kv_tokens`` maps to no
  mesh axis), so each device attends its own queries to every key.

Arrays name their dimensions with *logical* axes ("tokens", "embed", ...); ``rules`` map logical axes to mesh
axes, so the model code never names a mesh axis and one set of rules serves every model. Parameters get theirs
from a declarative table by path (``PARAM_AXES``), the sampler state from ``state_shardings``.

Why reuse decisions cannot diverge across devices: the mesh runs *one* SPMD program in which a decision is one
logical array. ``Sampler`` constrains the decision's inputs (the per-chunk metric reductions) and the decision
itself to be replicated, so a metric over sharded tokens is reduced globally by the compiler (an all-reduce, whose
result is the same on every participant) before any rule reads it, and the ``lax.cond`` that skips a forward
branches on that one replicated value. There is no per-rank metric, as in a sequence-parallel PyTorch cache where
each rank thresholds the features of its own shard and the ranks can disagree.

With ``Layout`` None (the default) nothing here is used and every jitted function is what it was on one device.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from flowcache_jax.state import SamplerState

MESH_AXES = ("data", "fsdp", "seq")

Rules = tuple[tuple[str, str | None], ...]
LogicalAxes = tuple[str | None, ...]


class Axes(tuple):
    """The logical axes of one array, a pytree *leaf* (a plain tuple would be a pytree node), so that a tree of
    them can mirror a tree of arrays whose own nodes are tuples (SkyReels-V2's (K, V))."""

# Activations and stored state. A logical axis not listed maps to no mesh axis (replicated).
ACTIVATION_RULES: Rules = (
    ("batch", "data"),
    ("branch", "data"),  # CFG branches
    ("tokens", "seq"),  # a chunk's (or a window's) tokens: queries, hidden states
    ("cache_tokens", "seq"),  # rows of a stored K/V buffer and token-major residual caches
    ("kv_tokens", None),  # the keys/values attention reads: all-gathered (context parallel)
    ("embed", None),
    ("heads", None),
    ("kv_heads", None),
    ("head_dim", None),
    ("mlp", None),
    ("layers", None),  # the stacked-layer axis a scan runs over: never sharded
)

# Parameters: FSDP on the model width. A leaf whose "embed" dimension does not divide by the fsdp size falls back
# to its largest dimension that does (never "layers"); leaves with one dimension (besides "layers") are replicated.
PARAM_RULES: Rules = (("embed", "fsdp"), ("layers", None))

# Logical axes of every parameter by path ("/"-joined keys; the first matching fnmatch pattern wins). Leaves under
# "layers" carry the stacked [num_layers] axis first. "heads" / "kv_heads" are the fused heads x head_dim widths.
PARAM_AXES: dict[str, tuple[tuple[str, LogicalAxes], ...]] = {
    "magi1": (
        ("x_embed/kernel", ("patch", "embed")),
        ("t_embed/fc1/kernel", ("freq", "cond")),
        ("t_embed/fc2/kernel", ("cond", "cond")),
        ("t_embed/*/bias", ("cond",)),
        ("y_embed/xattn/kernel", ("caption", "embed")),
        ("y_embed/xattn/bias", ("embed",)),
        ("y_embed/adaln/kernel", ("caption", "cond")),
        ("y_embed/adaln/bias", ("cond",)),
        ("y_embed/null_caption", ("caption_len", "caption")),
        ("rope_bands", ("freq",)),
        ("t_freqs", ("freq",)),
        ("layers/gate/kernel", ("layers", "cond", "gates")),
        ("layers/gate/bias", ("layers", "gates")),
        ("layers/q/kernel", ("layers", "embed", "heads")),
        ("layers/qx/kernel", ("layers", "embed", "heads")),
        ("layers/k/kernel", ("layers", "embed", "kv_heads")),
        ("layers/v/kernel", ("layers", "embed", "kv_heads")),
        ("layers/kx/kernel", ("layers", "embed", "kv_heads")),
        ("layers/vx/kernel", ("layers", "embed", "kv_heads")),
        ("layers/q*_norm/*", ("layers", "head_dim")),
        ("layers/k*_norm/*", ("layers", "head_dim")),
        ("layers/*norm/*", ("layers", "embed")),
        ("layers/proj/kernel", ("layers", "heads", "embed")),
        ("layers/fc1/kernel", ("layers", "embed", "mlp")),
        ("layers/fc2/kernel", ("layers", "mlp", "embed")),
        ("final_norm/*", ("embed",)),
        ("final/kernel", ("embed", "patch")),
    ),
    "skyreels_v2": (
        ("patch/kernel", ("patch", "embed")),
        ("patch/bias", ("embed",)),
        ("text/fc1/kernel", ("caption", "embed")),
        ("time/fc1/kernel", ("freq", "embed")),
        ("*/fc2/kernel", ("embed", "modulation")),  # text / time: [D, D]; fps_proj: [D, 6D]
        ("*/fc2/bias", ("modulation",)),
        ("*/fc1/kernel", ("embed", "embed")),  # fps_proj
        ("*/fc1/bias", ("embed",)),
        ("time_proj/kernel", ("embed", "modulation")),
        ("time_proj/bias", ("modulation",)),
        ("fps_embedding", ("fps", "embed")),
        ("layers/modulation", ("layers", "six", "embed")),
        ("layers/*_attn/[qkv]/kernel", ("layers", "embed", "heads")),
        ("layers/*_attn/o/kernel", ("layers", "heads", "embed")),
        ("layers/*_attn/*/bias", ("layers", "heads")),
        ("layers/*_attn/norm_[qk]/scale", ("layers", "heads")),
        ("layers/norm3/*", ("layers", "embed")),
        ("layers/ffn/fc1/kernel", ("layers", "embed", "mlp")),
        ("layers/ffn/fc1/bias", ("layers", "mlp")),
        ("layers/ffn/fc2/kernel", ("layers", "mlp", "embed")),
        ("layers/ffn/fc2/bias", ("layers", "embed")),
        ("head/modulation", ("two", "embed")),
        ("head/kernel", ("embed", "patch")),
        ("head/bias", ("patch",)),
    ),
}


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Axis sizes of the mesh (``--config.mesh.data/fsdp/seq``); their product is the device count."""

    data: int = 1
    fsdp: int = 1
    seq: int = 1

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> MeshConfig:
        """From a config block with ``data``, ``fsdp``, ``seq`` (missing ones 1; None: one device)."""
        cfg = {} if cfg is None else cfg
        return cls(**{a: int(cfg.get(a, 1)) for a in MESH_AXES})

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.data, self.fsdp, self.seq)

    @property
    def size(self) -> int:
        return self.data * self.fsdp * self.seq

    def __str__(self) -> str:
        return " x ".join(f"{a}={n}" for a, n in zip(MESH_AXES, self.shape, strict=True))


def make_mesh(mc: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The (data, fsdp, seq) mesh over ``devices`` (default: every device of every process).

    Devices are ordered by (process, id) and ``seq`` is the innermost axis: the axis with the most traffic (the K/V
    all-gathers of every layer) stays within one host whenever it divides the host's device count; ``data`` (CFG
    branches, one exchange per step) is outermost and spans hosts first.
    """
    devs = sorted(jax.devices() if devices is None else devices, key=lambda d: (d.process_index, d.id))
    if min(mc.shape) < 1:
        raise ValueError(f"mesh axis sizes must be >= 1, got {mc}")
    if mc.size != len(devs):
        raise ValueError(f"mesh {mc} has {mc.size} devices but {len(devs)} are available: make the product of "
                         f"mesh.data, mesh.fsdp and mesh.seq equal {len(devs)}")
    return Mesh(np.asarray(devs, dtype=object).reshape(mc.shape), MESH_AXES)


@dataclasses.dataclass(frozen=True)
class Layout:
    """A mesh and its logical-axis rules: how an array with named dimensions is placed. Frozen and hashable, so it
    can sit in a (hashable) denoiser and be called by model code as ``constrain(x, logical_axes)``."""

    mesh: Mesh
    rules: Rules = ACTIVATION_RULES
    param_rules: Rules = PARAM_RULES

    @property
    def size(self) -> int:
        return int(self.mesh.devices.size)

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    def spec(self, logical_axes: Sequence[str | None], shape: Sequence[int] | None = None,
             rules: Rules | None = None) -> PartitionSpec:
        """The PartitionSpec the rules give; with ``shape``, a mesh axis that does not divide its dimension (or
        was already used by an earlier dimension) is dropped, so that dimension is replicated instead."""
        table = dict(self.rules if rules is None else rules)
        used: set[str] = set()
        out: list[str | None] = []
        for i, name in enumerate(logical_axes):
            axis = table.get(name) if name is not None else None
            if axis is not None and (axis in used or (shape is not None and shape[i] % self.mesh.shape[axis])):
                axis = None
            if axis is not None:
                used.add(axis)
            out.append(axis)
        while out and out[-1] is None:
            out.pop()
        return PartitionSpec(*out)

    def sharding(self, logical_axes: Sequence[str | None], shape: Sequence[int] | None = None) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(logical_axes, shape))

    def constrain(self, x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
        """``x`` with the sharding its logical axes give (a hint to the partitioner, inside jit); identity on a
        one-device mesh. Under ``vmap`` the mapped dimension stays unconstrained."""
        if self.size == 1:
            return x
        if len(logical_axes) != x.ndim:
            raise ValueError(f"logical axes {tuple(logical_axes)} do not match an array of rank {x.ndim}")
        return jax.lax.with_sharding_constraint(x, self.sharding(logical_axes, x.shape))

    __call__ = constrain


def constrain(layout: Layout | None, x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """``layout.constrain(x, logical_axes)``, or ``x`` itself without a layout."""
    return x if layout is None else layout.constrain(x, logical_axes)


def replicate(layout: Layout | None, tree: Any) -> Any:
    """Every leaf of ``tree`` constrained to be replicated (one value on every device); identity without a mesh."""
    if layout is None or layout.size == 1:
        return tree
    return jax.tree.map(lambda a: jax.lax.with_sharding_constraint(a, layout.replicated), tree)


# ----- parameters ----------------------------------------------------------------------------------------------
def _is_shape(x: Any) -> bool:
    return isinstance(x, tuple) and all(isinstance(i, int) for i in x)


def _key_name(k: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _path(path: tuple) -> str:
    return "/".join(_key_name(k) for k in path)


def param_axes(path: str, ndim: int, model: str) -> LogicalAxes:
    """The logical axes of the parameter at ``path`` from ``PARAM_AXES[model]``; a path the table does not list
    (or whose rank differs) gets "layers" first under ``layers/`` and unnamed dimensions otherwise."""
    for pattern, axes in PARAM_AXES.get(model, ()):
        if fnmatch.fnmatchcase(path, pattern) and len(axes) == ndim:
            return axes
    lead = ("layers",) if path.startswith("layers/") and ndim else ()
    return lead + (None,) * (ndim - len(lead))


def param_spec(layout: Layout, axes: LogicalAxes, shape: Sequence[int]) -> PartitionSpec:
    """FSDP: the dimension the param rules name (if it divides), else the largest dimension that divides by the
    fsdp size; never the layers axis; leaves with a single dimension besides "layers" are replicated."""
    n = layout.mesh.shape["fsdp"]
    dims = [i for i, a in enumerate(axes) if a != "layers"]
    if n == 1 or len(dims) < 2:
        return PartitionSpec()
    spec = layout.spec(axes, shape, layout.param_rules)
    if any(s is not None for s in spec):
        return spec
    fits = [i for i in dims if shape[i] % n == 0]
    if not fits:
        return PartitionSpec()
    best = max(fits, key=lambda i: (shape[i], -i))
    return PartitionSpec(*(["fsdp" if i == best else None for i in range(best + 1)]))


def param_shardings(params_or_shapes: Any, model: str, layout: Layout) -> Any:
    """A pytree of NamedSharding for a parameter pytree (arrays, ShapeDtypeStructs or the shape tuples of
    ``param_shapes``) of ``model`` ("magi1" or "skyreels_v2")."""
    def one(path: tuple, leaf: Any) -> NamedSharding:
        shape = tuple(leaf) if _is_shape(leaf) else tuple(np.shape(leaf))
        return NamedSharding(layout.mesh, param_spec(layout, param_axes(_path(path), len(shape), model), shape))

    return jax.tree_util.tree_map_with_path(one, params_or_shapes, is_leaf=_is_shape)


def shard_params(params: Any, layout: Layout | None, model: str) -> Any:
    """The parameters placed on the mesh with their FSDP shardings (as they are without a layout)."""
    if layout is None:
        return params
    return put(params, param_shardings(params, model, layout))


# ----- sampler state -------------------------------------------------------------------------------------------
def kv_axes(kv: Any) -> Any:
    """Logical axes of a model's KV structure: the stored K/V rows on "cache_tokens" (sharded over seq), a per-branch
    buffer's branch axis on "branch" (over data); bookkeeping (owners, frames, scores) replicated.

    MAGI-1: ``{"buf": KVBuffer}`` with k / v [layers, rows, kv_heads, head_dim] (a leading batch axis for a batch
    of videos, over data); SkyReels-V2: (K, V) [branches, layers, rows, heads, head_dim], with a batch axis after
    the branches for a batch of videos (data takes the branches where it divides them, else the batch)."""
    def one(path: tuple, leaf: Any) -> Axes:
        nd = np.ndim(leaf)
        name = _key_name(path[-1]) if path else ""
        if name in ("k", "v") and nd in (4, 5):  # [batch,] layers, rows, kv_heads, head_dim
            return Axes(("batch",) * (nd - 4) + ("layers", "cache_tokens", "kv_heads", "head_dim"))
        if name in ("0", "1") and nd in (5, 6):  # branches, [batch,] layers, rows, heads, head_dim
            return Axes(("branch",) + ("batch",) * (nd - 5) + ("layers", "cache_tokens", "kv_heads", "head_dim"))
        return Axes((None,) * nd)

    return jax.tree_util.tree_map_with_path(one, kv)


def state_axes(state: SamplerState, residual: bool) -> SamplerState:
    """Logical axes of every leaf of the sampler state.

    Latents, solver histories, metric features, accumulators and counters are replicated: the host reads the
    latents after each stage and the policy reads the features, so they are one value everywhere. A residual cache
    [W, branches, ...] puts its branch axis on "branch" and, when the residual is [tokens, embed] (SkyReels-V2's
    transformer residual; [batch, tokens, embed] for a batch of videos), its tokens on "cache_tokens"; MAGI-1's
    cached velocity is latent-shaped (replicated).
    """
    rep = jax.tree.map(lambda a: Axes((None,) * np.ndim(a)), state)
    cache = Axes((None,) * np.ndim(state.cache))
    if residual:
        nd = np.ndim(state.cache)
        tail = {4: ("cache_tokens", "embed"), 5: ("batch", "cache_tokens", "embed")}.get(nd, (None,) * (nd - 2))
        cache = Axes((None, "branch", *tail))
    return rep.replace(cache=cache, kv=kv_axes(state.kv))


def state_shardings(state: SamplerState, layout: Layout, residual: bool) -> SamplerState:
    """NamedShardings of the sampler state (``state_axes`` through the layout's rules)."""
    return jax.tree.map(lambda axes, a: layout.sharding(axes, np.shape(a)), state_axes(state, residual), state,
                        is_leaf=lambda x: isinstance(x, Axes))


# ----- placement -----------------------------------------------------------------------------------------------
def put(tree: Any, shardings: Any) -> Any:
    """``tree``'s leaves placed with ``shardings`` (a matching pytree, or one sharding for all).

    Leaves already placed so are returned as they are. Across processes every process passes the same host values
    and keeps the shards its own devices hold (``make_array_from_callback``), as ``jax.distributed`` runs need.
    """
    def one(x: Any, s: NamedSharding) -> Any:
        if isinstance(x, jax.Array) and x.sharding == s:
            return x
        if jax.process_count() == 1 or (isinstance(x, jax.Array) and not x.is_fully_addressable):
            return jax.device_put(x, s)
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, s, lambda idx: host[idx])

    if isinstance(shardings, NamedSharding):
        return jax.tree.map(lambda x: one(x, shardings), tree)
    return jax.tree.map(one, tree, shardings)


def shardings_of(tree: Any, layout: Layout) -> Any:
    """The shardings ``tree``'s leaves carry when placed on ``layout``'s mesh; replicated for any other leaf (host
    arrays, arrays on one device)."""
    def one(x: Any) -> NamedSharding:
        s = getattr(x, "sharding", None)
        if isinstance(s, NamedSharding) and s.mesh == layout.mesh:
            return s
        return layout.replicated

    return jax.tree.map(one, tree)
