"""MAGI-1 ViT VAE in JAX: untiled and tiled (pipeline) encode/decode, with a Flax NNX module around it.

Spec text_and_vae.md §3/§5 and the ``magi1_vae_tiny`` fixture README are the contract. The VAE is a plain
ViT on 4x8x8 patches with a learned position table (trilinearly resized for other grids), so every token of
a call attends to every other: tiling is part of the numerics, not only a memory trick. The pipeline decodes
(and encodes) through upstream's tile processor; here every tile of one tile size runs through ONE jitted,
fixed-shape tile function: edge tiles are padded, their padded tokens masked out of attention, the position
table resized to the tile's true grid is passed in (padded), and the decoder's padded pixels are zeroed before
the final 3x3x3 conv so it sees the zero border upstream sees. Parameters are a nested dict whose per-block
leaves are stacked on a leading layer axis (one ``lax.scan``); ``param_shapes`` shows the layout and
``converters/keymaps/magi1_vae.py`` fills it from upstream ``ViTVAE`` state dicts.

Precision (``Magi1VAEConfig.dtype`` / ``param_dtype``; upstream GPU inference is bf16 throughout). ``dtype`` is
the compute dtype: the operands of every matmul (patch embedding, qkv, proj, fc1/fc2, heads, the q k^T and p v
products) and of the final conv, and the buffers of decoded / encoded tiles held until they are blended, are in
it; accumulation is float32. Float32 as upstream's kernels compute it: the per-head q/k/v norm, LayerNorms, the
attention scores and softmax (flash attention accumulates in float32), the GELU, the position table and its
trilinear resize, the residual stream, the tile blending, the posterior. ``param_dtype`` is the storage dtype of
the kernels (Linear / Conv weights), applied once by ``cast_params``; LayerNorm scales, biases, the CLS tokens and
the position tables stay float32 ("" keeps the given arrays as they are).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.layers import ParamsModule, cast_tree, dense, layer_norm

# The released MAGI-1 VAE ddconfig (reconstructed from the checkpoint shapes; see the fixture README).
MAGI1_VAE_DDCONFIG = dict(
    video_size=256, video_length=16, patch_size=8, patch_length=4, in_chans=3, z_chans=16, double_z=True,
    embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4.0, qkv_bias=True, with_cls_token=True, norm_code=False,
    ln_in_attn=True, conv_last_layer=True, use_rope=False, use_final_proj=False)

# (flag, the only supported value, why)
_REQUIRED_FLAGS = (
    ("use_rope", False, "the RoPE attention path (flash_attn_func on a packed view) is not ported"),
    ("norm_code", False, "latent L2 normalisation is not ported"),
    ("use_final_proj", False, "the decoder final_proj/final_norm head is not ported"),
    ("ln_in_attn", True, "only the ln_in_attn block (per-head q/k/v norm, no pre-attention LayerNorm) is ported"),
    ("conv_last_layer", True, "upstream's decoder requires conv_last_layer=true"),
    ("with_cls_token", True, "upstream's pos-table resize assumes a CLS row"),
    ("double_z", True, "the posterior (mean, logvar) split needs double_z=true"),
)
# Constructor arguments of upstream ViTEncoder/ViTDecoder that do not change inference.
_IGNORED_KEYS = ("qk_scale", "drop_rate", "attn_drop_rate", "drop_path_rate", "norm_layer")
_EPS_LN = 1e-5
_EPS_QKV = 1e-5
_LOGVAR_RANGE = (-30.0, 20.0)


@dataclasses.dataclass(frozen=True)
class Magi1TilingConfig:
    """The pipeline's tile processor settings (decode_chunk / encode_prefix_video: 256 px, 12 frames = fps/2)."""

    tile_sample_min_height: int = 256
    tile_sample_min_width: int = 256
    tile_sample_min_length: int = 12
    spatial_tile_overlap_factor: float = 0.25
    temporal_tile_overlap_factor: float = 0.0

    @classmethod
    def from_dict(cls, d: dict) -> Magi1TilingConfig:
        """Known keys only; derived values some configs carry (tile_latent_min_*, strides) are recomputed."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclasses.dataclass(frozen=True)
class Magi1VAEConfig:
    video_size: int = 256
    video_length: int = 16
    patch_size: int = 8
    patch_length: int = 4
    in_chans: int = 3
    z_chans: int = 16
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    scale_factor: float = 0.18215
    tiling: Magi1TilingConfig = Magi1TilingConfig()
    dtype: str = "float32"  # compute dtype of the matmuls and tile buffers; norms, softmax, residual stay f32
    param_dtype: str = ""  # storage dtype of the kernels ("" = as given); norms, biases, tables stay float32
    bf16_qkv: bool = False  # round the normalised q, k, v (and the attention output) to bf16, as upstream does

    def __post_init__(self):
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")
        if self.param_dtype not in ("", "float32", "bfloat16"):
            raise ValueError(f"param_dtype must be '', float32 or bfloat16, got {self.param_dtype!r}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.embed_dim % (self.patch_size ** 2 * self.patch_length):
            raise ValueError(f"embed_dim {self.embed_dim} must be a multiple of patch_size^2 * patch_length "
                             f"({self.patch_size ** 2 * self.patch_length}): the decoder unpatchifies into "
                             "embed_dim / (patch_size^2 * patch_length) channels")

    @classmethod
    def from_ddconfig(cls, d: dict, **kw: Any) -> Magi1VAEConfig:
        """From upstream's ``ddconfig``; flags selecting code paths that are not ported raise ValueError."""
        names = {f.name for f in dataclasses.fields(cls)} - {"scale_factor", "tiling", "dtype", "param_dtype",
                                                             "bf16_qkv"}
        flags = {f for f, _, _ in _REQUIRED_FLAGS}
        unknown = sorted(set(d) - names - flags - set(_IGNORED_KEYS))
        if unknown:
            raise ValueError(f"unknown ddconfig keys {unknown}")
        bad = [f"{f}={d[f]!r} ({why}; must be {want})" for f, want, why in _REQUIRED_FLAGS
               if f in d and bool(d[f]) != want]
        if bad:
            raise ValueError("unsupported MAGI-1 VAE ddconfig: " + "; ".join(bad))
        if not isinstance(d.get("video_size", 256), int) or not isinstance(d.get("patch_size", 8), int):
            raise ValueError("video_size and patch_size must be single integers (square grids)")
        return cls(**{k: v for k, v in d.items() if k in names}, **kw)

    @classmethod
    def from_config(cls, d: dict, **kw: Any) -> Magi1VAEConfig:
        """From ``{ddconfig, scale_factor?, tiling?, model_type?}`` (upstream vae/config.json shape) or a ddconfig."""
        if d.get("model_type", "vit") != "vit":
            raise ValueError(f"model_type {d['model_type']!r} is not supported; only 'vit'")
        if "ddconfig" not in d:
            return cls.from_ddconfig(d, **kw)
        extra = {}
        if "scale_factor" in d:
            extra["scale_factor"] = float(d["scale_factor"])
        if "tiling" in d:
            extra["tiling"] = Magi1TilingConfig.from_dict(d["tiling"])
        return cls.from_ddconfig(d["ddconfig"], **{**extra, **kw})

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    @property
    def base_grid(self) -> tuple[int, int, int]:
        """The latent grid the learned position table was trained for."""
        s = self.video_size // self.patch_size
        return self.video_length // self.patch_length, s, s

    @property
    def unpatch_channels(self) -> int:
        return self.embed_dim // (self.patch_size ** 2 * self.patch_length)

    @property
    def strides(self) -> tuple[int, int, int]:
        return self.patch_length, self.patch_size, self.patch_size


# ----- parameters ------------------------------------------------------------------------------------------------
def param_shapes(cfg: Magi1VAEConfig) -> dict:
    d, z, hid = cfg.embed_dim, cfg.z_chans, cfg.mlp_hidden
    lin = lambda i, o, bias=True: {"kernel": (i, o), **({"bias": (o,)} if bias else {})}
    norm = {"scale": (d,), "bias": (d,)}
    layer = {"qkv": lin(d, 3 * d, cfg.qkv_bias), "proj": lin(d, d), "norm2": norm, "fc1": lin(d, hid),
             "fc2": lin(hid, d)}
    layers = jax.tree.map(lambda s: (cfg.depth, *s), layer, is_leaf=lambda x: isinstance(x, tuple))
    n = math.prod(cfg.base_grid) + 1
    patch_dim = cfg.in_chans * cfg.patch_length * cfg.patch_size ** 2
    return {
        "encoder": {"patch": lin(patch_dim, d), "cls_token": (d,), "pos_embed": (n, d), "layers": layers,
                    "norm": norm, "out": lin(d, 2 * z)},
        "decoder": {"proj_in": lin(z, d), "cls_token": (d,), "pos_embed": (n, d), "layers": layers, "norm": norm,
                    "conv_out": {"kernel": (3, 3, 3, cfg.unpatch_channels, 3), "bias": (3,)}},
    }


def init_params(cfg: Magi1VAEConfig, key: jax.Array) -> dict:
    """Random weights (N(0, 0.02) matrices and tables, unit LayerNorm gains, zero biases) for tests and shapes."""
    shapes = param_shapes(cfg)
    flat = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))[0]
    keys = jax.random.split(key, len(flat))
    values = []
    for k, (path, s) in zip(keys, flat, strict=True):
        names = [getattr(p, "key", "") for p in path]
        if names[-1] == "scale":
            values.append(jnp.ones(s))
        elif names[-1] == "bias":
            values.append(jnp.zeros(s))
        else:
            values.append(jax.random.normal(k, s) * 0.02)
    return jax.tree.unflatten(jax.tree.structure(shapes, is_leaf=lambda x: isinstance(x, tuple)), values)


def half_precision_leaf(path: str) -> bool:
    """Whether the leaf at '/'-joined ``path`` is stored in ``param_dtype``: Linear / Conv kernels. LayerNorm
    scales, biases, CLS tokens and position tables stay float32 (also what ``--dtype=bf16`` writes)."""
    return path.rsplit("/", 1)[-1] == "kernel"


def cast_params(cfg: Magi1VAEConfig, params: dict) -> dict:
    """The parameters in their storage dtypes (see ``half_precision_leaf``); ``param_dtype`` "" returns them as is."""
    return cast_tree(params, cfg.param_dtype, lambda path, a: half_precision_leaf(path), jnp.float32)


# ----- position table --------------------------------------------------------------------------------------------
def _linear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(i0, i1, w0, w1) of PyTorch's align_corners=False linear resize (no antialias), in its float32 arithmetic."""
    scale = np.float32(n_in) / np.float32(n_out)
    src = (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    src = np.maximum(src, np.float32(0.0))
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w1 = (src - i0.astype(np.float32)).astype(np.float32)
    return i0, i1, (np.float32(1.0) - w1).astype(np.float32), w1


def resize_grid(table: jax.Array, shape: tuple[int, int, int]) -> jax.Array:
    """Trilinear resize of a [T, H, W, D] table to ``shape`` = F.interpolate(trilinear, align_corners=False).

    Separable lerps (W, then H, then T) with two taps per output: unlike ``jax.image.resize`` this does not
    antialias when shrinking, which is what the checkpoint's position tables were trained with.
    """
    x = jnp.asarray(table, jnp.float32)
    for axis in (2, 1, 0):
        n_in, n_out = x.shape[axis], shape[axis]
        if n_in == n_out:
            continue
        i0, i1, w0, w1 = _linear_taps(n_in, n_out)
        bshape = [1] * x.ndim
        bshape[axis] = n_out
        x = (jnp.take(x, i0, axis=axis) * w0.reshape(bshape) + jnp.take(x, i1, axis=axis) * w1.reshape(bshape))
    return x


def position_table(cfg: Magi1VAEConfig, pos_embed: jax.Array, grid: tuple[int, int, int],
                   padded: tuple[int, int, int] | None = None) -> jax.Array:
    """[1 + prod(padded), D]: CLS row, then the table for the true ``grid`` in the corner of the ``padded`` grid."""
    pos_embed = jnp.asarray(pos_embed, jnp.float32)
    d = pos_embed.shape[-1]
    cls_row, body = pos_embed[:1], pos_embed[1:].reshape(*cfg.base_grid, d)
    if tuple(grid) != cfg.base_grid:
        body = resize_grid(body, tuple(grid))
    padded = tuple(grid) if padded is None else tuple(padded)
    if padded != tuple(grid):
        body = jnp.pad(body, [(0, p - g) for p, g in zip(padded, grid, strict=True)] + [(0, 0)])
    return jnp.concatenate([cls_row, body.reshape(-1, d)], 0)


# ----- transformer -----------------------------------------------------------------------------------------------
def _head_norm(x: jax.Array) -> jax.Array:
    """Upstream's ManualLayerNorm over head_dim, no affine: (x - mean) / (biased std + eps), eps on the std."""
    mean = x.mean(-1, keepdims=True)
    c = x - mean
    return c / (jnp.sqrt(jnp.mean(c * c, -1, keepdims=True)) + _EPS_QKV)


def _attention(cfg: Magi1VAEConfig, q: jax.Array, k: jax.Array, v: jax.Array, key_valid: jax.Array) -> jax.Array:
    """Softmax attention over every valid key; q/k/v [N, heads, hd] float32, scores and softmax in float32."""
    dt = jnp.dtype(cfg.dtype)
    v = jnp.where(key_valid[:, None, None], v, 0.0)  # padded rows never leak, not even as 0 * inf
    s = jnp.einsum("qhd,khd->hqk", q.astype(dt), k.astype(dt), preferred_element_type=jnp.float32)
    s = jnp.where(key_valid[None, None, :], s * (1.0 / math.sqrt(cfg.head_dim)), -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    return jnp.einsum("hqk,khd->qhd", p.astype(dt), v.astype(dt), preferred_element_type=jnp.float32)


def _blocks(cfg: Magi1VAEConfig, layers: dict, x: jax.Array, key_valid: jax.Array) -> jax.Array:
    """The ln_in_attn ViT blocks on tokens x [N, D] (float32 residual stream) under one scan."""
    n, d = x.shape
    heads, hd = cfg.num_heads, cfg.head_dim
    dt = jnp.dtype(cfg.dtype)

    def block(x, lp):
        qkv = dense(x.astype(dt), lp["qkv"], dt).astype(jnp.float32).reshape(n, 3, heads, hd)
        qkv = _head_norm(qkv)
        if cfg.bf16_qkv:
            qkv = qkv.astype(jnp.bfloat16).astype(jnp.float32)
        o = _attention(cfg, qkv[:, 0], qkv[:, 1], qkv[:, 2], key_valid)
        if cfg.bf16_qkv:  # the packed bf16 call returns bf16
            o = o.astype(jnp.bfloat16).astype(jnp.float32)
        x = x + dense(o.reshape(n, d).astype(dt), lp["proj"], dt).astype(jnp.float32)
        y = layer_norm(x, lp["norm2"]["scale"], lp["norm2"]["bias"], _EPS_LN).astype(dt)
        y = jax.nn.gelu(dense(y, lp["fc1"], dt).astype(jnp.float32), approximate=False).astype(dt)
        return x + dense(y, lp["fc2"], dt).astype(jnp.float32), None

    x, _ = jax.lax.scan(block, x, layers)
    return x


def _grid_mask(grid: tuple[int, int, int], valid: jax.Array) -> jax.Array:
    """[prod(grid)] bool: token (t, h, w) lies inside the true sizes ``valid`` [3]."""
    idx = jnp.stack(jnp.meshgrid(*[jnp.arange(g) for g in grid], indexing="ij"), -1).reshape(-1, 3)
    return jnp.all(idx < valid[None, :], -1)


# Trace counts of the jitted tile functions, keyed (kind, cfg, input shape): a tiled call whose edge tiles have
# several true sizes must trace each once (the counter is bumped at trace time, so cache hits do not count).
TRACE_COUNTS: collections.Counter = collections.Counter()


def trace_count(kind: str, cfg: Magi1VAEConfig, shape: tuple[int, ...]) -> int:
    """How often the ``kind`` ("encode" | "decode") tile function was traced for this config and input shape."""
    return TRACE_COUNTS[(kind, cfg, tuple(shape))]


@functools.partial(jax.jit, static_argnums=0)
def _encode_tile(cfg: Magi1VAEConfig, p: dict, video: jax.Array, pos: jax.Array, valid: jax.Array) -> jax.Array:
    """Encoder on one (padded) pixel tile [C, pl*t, ps*h, ps*w] -> moments [2z, t, h, w] in ``cfg.dtype`` (the
    tile buffer; padding is garbage)."""
    TRACE_COUNTS[("encode", cfg, tuple(video.shape))] += 1
    c, tt, hh, ww = video.shape
    pl, ps = cfg.patch_length, cfg.patch_size
    grid = (tt // pl, hh // ps, ww // ps)
    dt = jnp.dtype(cfg.dtype)
    x = video.astype(jnp.float32).reshape(c, grid[0], pl, grid[1], ps, grid[2], ps)
    x = x.transpose(1, 3, 5, 0, 2, 4, 6).reshape(math.prod(grid), -1)  # patch flattened as (c, kt, kh, kw)
    x = dense(x.astype(dt), p["patch"], dt).astype(jnp.float32)
    x = jnp.concatenate([p["cls_token"].astype(jnp.float32)[None], x], 0) + pos
    key_valid = jnp.concatenate([jnp.ones((1,), bool), _grid_mask(grid, valid)])
    x = _blocks(cfg, p["layers"], x, key_valid)
    x = layer_norm(x, p["norm"]["scale"], p["norm"]["bias"], _EPS_LN)
    x = dense(x.astype(dt), p["out"], dt)[1:]
    return x.reshape(*grid, -1).transpose(3, 0, 1, 2)


@functools.partial(jax.jit, static_argnums=0)
def _decode_tile(cfg: Magi1VAEConfig, p: dict, z: jax.Array, pos: jax.Array, valid: jax.Array) -> jax.Array:
    """Decoder on one (padded) latent tile [z, t, h, w] -> [3, pl*t, ps*h, ps*w] in ``cfg.dtype`` (the tile
    buffer); true region = ``valid`` * strides.

    The unpatchified pixels outside the true region are zeroed before the 3x3x3 conv, so the true region sees
    exactly the zero padding the upstream conv sees on an unpadded tile.
    """
    TRACE_COUNTS[("decode", cfg, tuple(z.shape))] += 1
    zc, t, h, w = z.shape
    pl, ps, ch = cfg.patch_length, cfg.patch_size, cfg.unpatch_channels
    dt = jnp.dtype(cfg.dtype)
    x = z.astype(jnp.float32).reshape(zc, -1).T
    x = dense(x.astype(dt), p["proj_in"], dt).astype(jnp.float32)
    x = jnp.concatenate([p["cls_token"].astype(jnp.float32)[None], x], 0) + pos
    key_valid = jnp.concatenate([jnp.ones((1,), bool), _grid_mask((t, h, w), valid)])
    x = _blocks(cfg, p["layers"], x, key_valid)
    x = layer_norm(x, p["norm"]["scale"], p["norm"]["bias"], _EPS_LN)[1:]
    x = x.reshape(t, h, w, pl, ps, ps, ch).transpose(6, 0, 3, 1, 4, 2, 5).reshape(ch, t * pl, h * ps, w * ps)
    inside = [jnp.arange(n) < valid[i] * s for i, (n, s) in enumerate(zip(x.shape[1:], cfg.strides, strict=True))]
    x = jnp.where(inside[0][:, None, None] & inside[1][None, :, None] & inside[2][None, None, :], x, 0.0)
    prec = jax.lax.Precision.HIGHEST if dt == jnp.float32 else None
    y = jax.lax.conv_general_dilated(x[None].astype(dt), p["conv_out"]["kernel"].astype(dt), (1, 1, 1),
                                     [(1, 1)] * 3, dimension_numbers=("NCDHW", "DHWIO", "NCDHW"), precision=prec,
                                     preferred_element_type=jnp.float32)[0]
    return (y + p["conv_out"]["bias"].astype(jnp.float32)[:, None, None, None]).astype(dt)


# ----- untiled ---------------------------------------------------------------------------------------------------
def _prepare_video(cfg: Magi1VAEConfig, video: jax.Array) -> jax.Array:
    """T == 1 -> the frame repeated patch_length times; otherwise crop to whole patches (Conv3d's floor)."""
    c, t, h, w = video.shape
    pl, ps = cfg.patch_length, cfg.patch_size
    if t == 1 and pl > 1:
        video, t = jnp.broadcast_to(video, (c, pl, h, w)), pl
    if t < pl or h < ps or w < ps:
        raise ValueError(f"video [C, T, H, W] = {video.shape} is smaller than one patch ({pl}, {ps}, {ps})")
    return video[:, : t // pl * pl, : h // ps * ps, : w // ps * ps]


def encode_moments(cfg: Magi1VAEConfig, params: dict, video: jax.Array) -> jax.Array:
    """``vae.encoder(video)``: [C, T, H, W] -> moments [2z, T/4, H/8, W/8] = concat(mean, raw logvar)."""
    v = _prepare_video(cfg, jnp.asarray(video))
    grid = tuple(n // s for n, s in zip(v.shape[1:], cfg.strides, strict=True))
    params = cast_params(cfg, params)
    pos = position_table(cfg, params["encoder"]["pos_embed"], grid)
    return _encode_tile(cfg, params["encoder"], v, pos, jnp.asarray(grid, jnp.int32)).astype(jnp.float32)


def posterior(moments: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """DiagonalGaussianDistribution: (mean, logvar clamped to [-30, 20], std = exp(logvar / 2))."""
    mean, logvar = jnp.split(moments, 2, axis=0)
    logvar = jnp.clip(logvar, *_LOGVAR_RANGE)
    return mean, logvar, jnp.exp(0.5 * logvar)


def encode(cfg: Magi1VAEConfig, params: dict, video: jax.Array, sample: bool = False, key: jax.Array | None = None,
           noise: jax.Array | None = None) -> jax.Array:
    """Latent [z, t, h, w]: the posterior mode (the pipeline's encode), or mean + std * eps with eps drawn from
    ``key`` or given as ``noise`` (to replay another framework's draw)."""
    mean, _, std = posterior(encode_moments(cfg, params, video))
    if not sample:
        return mean
    if noise is None:
        if key is None:
            raise ValueError("sample=True needs a PRNG key (or explicit noise)")
        noise = jax.random.normal(key, mean.shape, jnp.float32)
    return mean + std * noise


def decode(cfg: Magi1VAEConfig, params: dict, z: jax.Array) -> jax.Array:
    """``vae.decode``: latent [z, t, h, w] -> [3, 4t, 8h, 8w] unclamped (t == 1: pixel frame 0 only)."""
    z = jnp.asarray(z)
    grid = tuple(z.shape[1:])
    params = cast_params(cfg, params)
    pos = position_table(cfg, params["decoder"]["pos_embed"], grid)
    out = _decode_tile(cfg, params["decoder"], z, pos, jnp.asarray(grid, jnp.int32)).astype(jnp.float32)
    return out[:, :1] if grid[0] == 1 else out


# ----- tiled (upstream TileProcessor, single process) ------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TileGrid:
    """Static plan of one tiled call; sizes are (t, h, w). ``blended_neighbours``: encode blends in place."""

    counts: tuple[int, int, int]
    tile: tuple[int, int, int]  # padded input tile shape, the one shape the tile function sees
    starts: tuple[tuple[int, int, int], ...]  # per tile, in input units, index order (f, i, j)
    sizes: tuple[tuple[int, int, int], ...]  # true input sizes
    out_sizes: tuple[tuple[int, int, int], ...]  # true output sizes
    blend: tuple[int, int, int]  # blend extents in output units
    keep: tuple[int, int, int]  # crop of every blended tile
    blended_neighbours: bool


def _counts(size: tuple[int, ...], stride: tuple[int, int, int]) -> tuple[int, int, int]:
    if min(stride) <= 0:
        raise ValueError(f"tile stride {stride} must be positive (tile sizes too small for the overlap factors)")
    return tuple((n + s - 1) // s for n, s in zip(size, stride, strict=True))


def decode_grid(cfg: Magi1VAEConfig, latent_shape: tuple[int, int, int]) -> TileGrid:
    """Tiles of TileProcessor.tiled_decode for a latent [t, h, w] (temporal_downsample 4, spatial 8, sr_ratio 1)."""
    tc, pl, ps = cfg.tiling, cfg.patch_length, cfg.patch_size
    so, to = tc.spatial_tile_overlap_factor, tc.temporal_tile_overlap_factor
    tile = (tc.tile_sample_min_length // pl, tc.tile_sample_min_height // ps, tc.tile_sample_min_width // ps)
    stride = (int(tile[0] * (1 - to)), int(tile[1] * (1 - so)), int(tile[2] * (1 - so)))
    real = (tile[0] * pl, tile[1] * ps, tile[2] * ps)
    blend = (int(real[0] * to), int(real[1] * so), int(real[2] * so))
    keep = tuple(r - b for r, b in zip(real, blend, strict=True))
    counts = _counts(latent_shape, stride)
    starts, sizes, outs = [], [], []
    for f, i, j in np.ndindex(*counts):
        s = (f * stride[0], i * stride[1], j * stride[2])
        n = tuple(min(t, size - a) for t, size, a in zip(tile, latent_shape, s, strict=True))
        starts.append(s)
        sizes.append(n)
        outs.append((1 if n[0] == 1 else n[0] * pl, n[1] * ps, n[2] * ps))
    padded = tuple(min(t, size) for t, size in zip(tile, latent_shape, strict=True))
    return TileGrid(counts, padded, tuple(starts), tuple(sizes), tuple(outs), blend, keep, False)


def encode_grid(cfg: Magi1VAEConfig, video_shape: tuple[int, int, int]) -> TileGrid:
    """Tiles of TileProcessor.tiled_encode for a video [T, H, W]: pixel tiles, latent blend and crop."""
    tc, pl, ps = cfg.tiling, cfg.patch_length, cfg.patch_size
    so, to = tc.spatial_tile_overlap_factor, tc.temporal_tile_overlap_factor
    tile = (tc.tile_sample_min_length, tc.tile_sample_min_height, tc.tile_sample_min_width)
    stride = (int(tile[0] * (1 - to)), int(tile[1] * (1 - so)), int(tile[2] * (1 - so)))
    lat = (tile[0] // pl, tile[1] // ps, tile[2] // ps)
    blend = (int(lat[0] * to), int(lat[1] * so), int(lat[2] * so))
    keep = tuple(n - b for n, b in zip(lat, blend, strict=True))
    counts = _counts(video_shape, stride)
    starts, sizes, outs = [], [], []
    for f, i, j in np.ndindex(*counts):
        s = (f * stride[0], i * stride[1], j * stride[2])
        n = tuple(min(t, size - a) for t, size, a in zip(tile, video_shape, s, strict=True))
        o = (1 if n[0] == 1 else n[0] // pl, n[1] // ps, n[2] // ps)
        if min(o) == 0:
            raise ValueError(f"tile at {s} of the video {video_shape} has {n} pixels: less than one patch "
                             f"({pl}, {ps}, {ps}); upstream's Conv3d fails here too")
        starts.append(s)
        sizes.append(n)
        outs.append(o)
    padded = tuple(max(min(t, size) // st, 1) * st for t, size, st in zip(tile, video_shape, cfg.strides,
                                                                         strict=True))
    return TileGrid(counts, padded, tuple(starts), tuple(sizes), tuple(outs), blend, keep, True)


def _blend(a: jax.Array, b: jax.Array, axis: int, extent: int) -> jax.Array:
    """b[y] = a[-E + y] * (1 - y/E) + b[y] * (y/E) for y < E = min(extent, sizes) along ``axis`` (C, T, H, W)."""
    e = min(a.shape[axis], b.shape[axis], extent)
    if e <= 0:
        return b
    r = np.arange(e) / e
    shape = [1] * b.ndim
    shape[axis] = e
    wa, wb = (1 - r).astype(np.float32).reshape(shape), r.astype(np.float32).reshape(shape)
    head = jax.lax.slice_in_dim(a, a.shape[axis] - e, a.shape[axis], axis=axis) * wa
    head = head + jax.lax.slice_in_dim(b, 0, e, axis=axis) * wb
    return jnp.concatenate([head, jax.lax.slice_in_dim(b, e, b.shape[axis], axis=axis)], axis)


@functools.partial(jax.jit, static_argnums=1)
def _assemble(tiles: tuple[jax.Array, ...], grid: TileGrid) -> jax.Array:
    """Crop every raw tile to its true size, blend with the neighbour before it in t, then above, then left;
    crop to ``keep``; concatenate. Decode blends with the raw neighbours (upstream clones), encode with the
    already-blended ones (upstream blends its tile list in place). Tiles of any dtype; blended in float32."""
    raw = [x[:, : s[0], : s[1], : s[2]].astype(jnp.float32) for x, s in zip(tiles, grid.out_sizes, strict=True)]
    cur = list(raw)
    nt, nh, nw = grid.counts
    src = cur if grid.blended_neighbours else raw
    kept = []
    for k, (f, i, j) in enumerate(np.ndindex(*grid.counts)):
        x = raw[k]
        if f > 0:
            x = _blend(src[k - nh * nw], x, 1, grid.blend[0])
        if i > 0:
            x = _blend(src[k - nw], x, 2, grid.blend[1])
        if j > 0:
            x = _blend(src[k - 1], x, 3, grid.blend[2])
        cur[k] = x
        kept.append(x[:, : grid.keep[0], : grid.keep[1], : grid.keep[2]])
    rows = [jnp.concatenate(kept[r * nw:(r + 1) * nw], 3) for r in range(nt * nh)]
    frames = [jnp.concatenate(rows[f * nh:(f + 1) * nh], 2) for f in range(nt)]
    return jnp.concatenate(frames, 1)


def _tile_inputs(x: jax.Array, grid: TileGrid) -> list[jax.Array]:
    """Fixed-shape windows of ``x`` [C, ...] at every tile start (zero-padded at the far ends)."""
    need = [max(s[a] for s in grid.starts) + grid.tile[a] for a in range(3)]
    pad = [(0, 0)] + [(0, max(0, n - size)) for n, size in zip(need, x.shape[1:], strict=True)]
    xp = jnp.pad(x, pad)
    return [jax.lax.dynamic_slice(xp, (0, *s), (x.shape[0], *grid.tile)) for s in grid.starts]


def tiled_decode(cfg: Magi1VAEConfig, params: dict, z: jax.Array) -> jax.Array:
    """TileProcessor.tiled_decode: latent [z, t, h, w] -> [3, T, H, W] float, unclamped (pipeline semantics)."""
    z = jnp.asarray(z)
    grid = decode_grid(cfg, tuple(z.shape[1:]))
    p = cast_params(cfg, params)["decoder"]
    tables: dict = {}
    outs = []
    for zt, size in zip(_tile_inputs(z, grid), grid.sizes, strict=True):
        if size not in tables:
            tables[size] = position_table(cfg, p["pos_embed"], size, grid.tile)
        outs.append(_decode_tile(cfg, p, zt, tables[size], jnp.asarray(size, jnp.int32)))
    return _assemble(tuple(outs), grid)


def tiled_encode(cfg: Magi1VAEConfig, params: dict, video: jax.Array, sample: bool = False,
                 key: jax.Array | None = None, noise_fn: Callable[[int, tuple[int, ...]], Any] | None = None
                 ) -> jax.Array:
    """TileProcessor.tiled_encode: video [C, T, H, W] in [-1, 1] -> latent [z, t, h, w].

    The pipeline (VaeHelper) patches ``vae.encode`` to the posterior mode: the default here. ``sample=True``
    is an unpatched ``ViTVAE.encode`` (sample_posterior defaults to true): each tile draws its own eps, from
    ``noise_fn(tile_index, shape)`` when given (to replay another framework's stream) else from ``key``.
    """
    video = jnp.asarray(video)
    grid = encode_grid(cfg, tuple(video.shape[1:]))
    if sample and noise_fn is None and key is None:
        raise ValueError("sample=True needs a PRNG key (or a noise_fn)")
    p = cast_params(cfg, params)["encoder"]
    tables: dict = {}
    outs = []
    for k, (vt, size, lat) in enumerate(zip(_tile_inputs(video, grid), grid.sizes, grid.out_sizes, strict=True)):
        if size[0] == 1:  # a one-frame tile is encoded as that frame repeated (vae.encode's T == 1 rule)
            vt = jnp.broadcast_to(vt[:, :1], vt.shape)
        if lat not in tables:
            tables[lat] = position_table(cfg, p["pos_embed"], lat,
                                         tuple(n // s for n, s in zip(grid.tile, cfg.strides, strict=True)))
        moments = _encode_tile(cfg, p, vt, tables[lat], jnp.asarray(lat, jnp.int32))
        if not sample:
            outs.append(moments[: cfg.z_chans])
            continue
        mean, _, std = posterior(moments[:, : lat[0], : lat[1], : lat[2]].astype(jnp.float32))
        shape = (cfg.z_chans, *lat)
        eps = noise_fn(k, shape) if noise_fn is not None else jax.random.normal(jax.random.fold_in(key, k), shape)
        outs.append(mean + std * jnp.asarray(eps, jnp.float32).reshape(shape))
    return _assemble(tuple(outs), grid)


# ----- pipeline helpers ------------------------------------------------------------------------------------------
def decode_chunk(cfg: Magi1VAEConfig, params: dict, dit_latent: jax.Array) -> jax.Array:
    """One clean DiT chunk [z, t, h, w] -> pixels [3, 4t, 8h, 8w] in about [-1, 1] (divides by scale_factor)."""
    return tiled_decode(cfg, params, jnp.asarray(dit_latent, jnp.float32) / cfg.scale_factor)


def encode_video(cfg: Magi1VAEConfig, params: dict, video_u8: jax.Array, layout: str = "cthw",
                 **sample_kw: Any) -> jax.Array:
    """uint8 video ([C, T, H, W], or [T, H, W, C] with layout="thwc") -> DiT latent = tiled mode * scale_factor.

    ``sample_kw`` (sample, key, noise_fn) go to ``tiled_encode``; the pipeline's encode_prefix_video uses the mode.
    """
    v = jnp.asarray(video_u8)
    if layout == "thwc":
        v = v.transpose(3, 0, 1, 2)
    elif layout != "cthw":
        raise ValueError(f"layout must be 'cthw' or 'thwc', got {layout!r}")
    return tiled_encode(cfg, params, v.astype(jnp.float32) / 127.5 - 1.0, **sample_kw) * cfg.scale_factor


def to_uint8(x: jax.Array) -> jax.Array:
    """Pixels [3, T, H, W] -> frames [T, H, W, 3] uint8: x*127.5+127.5, clamp to [0, 255], truncating cast."""
    return to_uint8_tchw(x).transpose(0, 2, 3, 1)


def to_uint8_tchw(x: jax.Array) -> jax.Array:
    """Pixels [3, T, H, W] -> [T, 3, H, W] uint8, the layout of upstream VaeHelper.decode(uint8_output=True)."""
    y = jnp.clip(jnp.asarray(x, jnp.float32) * 127.5 + 127.5, 0.0, 255.0)
    return y.astype(jnp.uint8).transpose(1, 0, 2, 3)


class Magi1VAE(ParamsModule):
    """The MAGI-1 ViT VAE as an NNX module: parameters as ``nnx.Param`` leaves of ``param_shapes``' layout."""

    def __init__(self, cfg: Magi1VAEConfig, params: dict | None = None, *, rngs: nnx.Rngs | None = None):
        """``params`` (or random ones) are held in their storage dtypes (``cast_params``: once, here)."""
        super().__init__(cfg, None if params is None else cast_params(cfg, params),
                         lambda c, k: cast_params(c, init_params(c, k)), rngs)

    def encode(self, video: jax.Array, sample: bool = False, key: jax.Array | None = None) -> jax.Array:
        return encode(self.cfg, self.param_dict(), video, sample, key)

    def decode(self, z: jax.Array) -> jax.Array:
        return decode(self.cfg, self.param_dict(), z)

    def tiled_encode(self, video: jax.Array) -> jax.Array:
        return tiled_encode(self.cfg, self.param_dict(), video)

    def tiled_decode(self, z: jax.Array) -> jax.Array:
        return tiled_decode(self.cfg, self.param_dict(), z)

    def decode_chunk(self, dit_latent: jax.Array) -> jax.Array:
        return decode_chunk(self.cfg, self.param_dict(), dit_latent)

    def encode_video(self, video_u8: jax.Array, layout: str = "cthw") -> jax.Array:
        return encode_video(self.cfg, self.param_dict(), video_u8, layout)
