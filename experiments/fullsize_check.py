r"""Lower and compile full-size components with abstract weights; print their per-device memory and FLOP figures.

  python experiments/fullsize_check.py [--part=dit] [--dtype=bfloat16] [--buffer_chunks=5] [--key_tile=2048]
  python experiments/fullsize_check.py --part=all --dtype=bfloat16 --output_json=fullsize.json
  python experiments/fullsize_check.py --part=dit24b --mesh=fsdp=8 [--attention=fused]

Parts:

- ``dit``: one 720p (720x720, as the FlowCache runs) MAGI-1 4.5B-distill chunk forward over a KV buffer of
  ``--buffer_chunks`` chunks, on 1 device;
- ``dit24b``: the same chunk forward of MAGI-1 24B-distill (SwiGLU, half-channel VAE: the 16 latent channels are
  doubled to the DiT's 32) on the ``--mesh`` of 8 devices (default fsdp=4 x seq=2): FSDP parameters, chunk tokens
  and buffer rows on ``seq`` (``flowcache_jax.sharding``'s tables and rules). A 720x720 chunk has 12150 tokens
  (2·3^5·5^2), so ``seq`` can only be 2: with seq=4 or 8 the rules leave the tokens and the buffer replicated;
- ``skyreels``: SkyReels-V2-DF-1.3B's window forward of 97 frames at 544x960 (25 latent frames, 51000 tokens,
  block-causal with blocks of 5 latent frames), one CFG branch, on 1 device;
- ``skyreels_block``: the groups executor's call of one block (5 latent frames, both CFG branches batched) over
  its K/V buffer of the 25-frame window, on 1 device;
- ``t5`` (T5 v1.1-XXL encoder, 800 tokens), ``umt5`` (umT5-XXL, 512 tokens), ``wan_vae`` (the Wan2.1 VAE decoding 97
  frames at 544x960: its first-frame and its per-block programs), ``magi1_vae`` (the MAGI-1 VAE decoding one 720p
  chunk: its one tile program).

Nothing is materialised: parameters and inputs are ShapeDtypeStructs (with their NamedShardings on a mesh).
Memory is XLA's memory analysis of the compiled program, which for a partitioned program is per device
(peak = temporaries + arguments + outputs - aliased). FLOPs are XLA's cost analysis; XLA counts a loop body once,
so a model whose layers (or frames) are scanned is compiled at two depths and extrapolated, and repeated calls
(tiles, frame blocks) are multiplied by their count. The DiTs' FLOPs are counted on the dense form of their
attention (``attention=xla``: every key a query sees, block-causal by blocks), since the tiled attention is itself
a loop over key tiles; ``tflops_per_device`` is the same count of the partitioned program. On the CPU the bf16
figures are upper bounds: the CPU backend upcasts bf16 matmul operands, and hoists the upcast of a whole stacked
operand (layer weights, the K/V buffer) out of the layer loop. So bf16 programs on the CPU are compiled a second
time without that hoisting (``no_hoist_*``: the upcast is then per layer), the closer CPU estimate of a device's
figure. On a GPU run the same command for the device figure (the 8-device row then needs 8 GPUs, or compiles for 8
host CPU devices where fewer exist).
``--attention=fused`` on the CPU is XLA's dense attention, which materialises the whole score matrix; on a GPU it
is cuDNN flash attention, whose memory is linear in the keys.

Run as a script it gives the CPU 8 host devices (``--xla_force_host_platform_device_count=8`` appended to
XLA_FLAGS unless XLA_FLAGS already sets a count) before JAX is imported; a larger ``--mesh`` needs XLA_FLAGS set.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

HOST_DEVICES = 8


def ensure_host_devices(n: int = HOST_DEVICES) -> None:
    """Give the CPU backend ``n`` devices unless XLA_FLAGS already sets a count (must run before JAX starts)."""
    current = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in current:
        os.environ["XLA_FLAGS"] = f"{current} --xla_force_host_platform_device_count={n}".strip()


if __name__ == "__main__":
    ensure_host_devices()

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from absl import flags  # noqa: E402

from experiments import common  # noqa: E402

PARTS = ("dit", "dit24b", "skyreels", "skyreels_block", "t5", "umt5", "wan_vae", "magi1_vae")
ATTENTION = ("tiled", "fused", "xla", "cudnn")


# The released MAGI-1 24B-distill model_config (SandAI-org/MAGI-1, example/24B/24B_distill_config.json).
# half_channel_vae: the VAE's 16 latent channels are concatenated twice into the DiT's in_channels = 32, and the
# first 16 of its 32 output channels are the velocity (inference/model/dit/dit_model.py).
MAGI1_24B_DISTILL: dict[str, Any] = dict(
    num_layers=48, hidden_size=6144, ffn_hidden_size=16384, num_attention_heads=48, num_query_groups=8,
    kv_channels=128, layernorm_epsilon=1e-6, apply_layernorm_1p=True, x_rescale_factor=0.1, patch_size=2,
    t_patch_size=1, in_channels=32, out_channels=32, cond_hidden_ratio=0.25, caption_channels=4096,
    caption_max_length=800, xattn_cond_hidden_ratio=1.0, cond_gating_ratio=1.0, gated_linear_unit=True)
MAGI1_LATENT_CHANNELS = 16  # the MAGI-1 VAE's z channels (both models)


@dataclasses.dataclass(frozen=True)
class Options:
    """What the flags say (the check functions take these, so that they run without absl)."""

    dtype: str = "bfloat16"
    buffer_chunks: int = 5
    key_tile: int = 2048
    attention: str = "tiled"


# ----- helpers -------------------------------------------------------------------------------------------------
def memory(compiled: Any) -> dict[str, Any]:
    """XLA's memory analysis of a compiled program (per device where it is partitioned)."""
    mem = compiled.memory_analysis()
    peak = (mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
            - mem.alias_size_in_bytes)
    return {"per_device_peak_bytes": int(peak), "per_device_peak_gb": peak / 1e9,
            "temp_gb": mem.temp_size_in_bytes / 1e9, "argument_gb": mem.argument_size_in_bytes / 1e9,
            "output_gb": mem.output_size_in_bytes / 1e9, "aliased_gb": mem.alias_size_in_bytes / 1e9,
            "peak_gb": peak / 1e9}


def _abstract(shapes: dict, dtype: str, shardings: Any = None, half: Callable[[str], bool] | None = None) -> Any:
    """ShapeDtypeStructs of a ``param_shapes`` tree in the dtypes ``converters.release --dtype=bf16`` stores: bf16
    where the model's rule ``half(path)`` says (default: the DiTs' ``dit_half_precision_leaf``), float32 elsewhere;
    with the NamedShardings of ``shardings`` (a matching tree)."""
    import jax
    import jax.numpy as jnp

    from models.layers import dit_half_precision_leaf

    half = half or dit_half_precision_leaf

    def leaf(path, s, sh=None):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        bf16 = dtype == "bfloat16" and half(name)
        return jax.ShapeDtypeStruct(s, jnp.bfloat16 if bf16 else jnp.float32, sharding=sh)

    is_shape = lambda x: isinstance(x, tuple)  # noqa: E731
    if shardings is None:
        return jax.tree_util.tree_map_with_path(leaf, shapes, is_leaf=is_shape)
    return jax.tree_util.tree_map_with_path(leaf, shapes, shardings, is_leaf=is_shape)


def _compile(fn: Callable, *args: Any, donate: Sequence[int] = (), out_shardings: Any = None,
             options: dict[str, str] | None = None) -> tuple[Any, float]:
    import jax

    kw = {} if out_shardings is None else {"out_shardings": out_shardings}
    t0 = time.perf_counter()
    compiled = jax.jit(fn, donate_argnums=tuple(donate), **kw).lower(*args).compile(compiler_options=options)
    return compiled, time.perf_counter() - t0


# XLA's CPU backend computes bf16 dots in f32: it converts their operands, and while-loop-invariant code motion then
# hoists the convert of a scanned operand (stacked layer weights, the stacked K/V buffer) out of the layer loop, so
# the whole stack is upcast at once. Compiled without that pass, the upcast is per layer: the closer CPU estimate of
# the device figure (f32 programs are unchanged by it).
NO_HOIST = {"xla_disable_hlo_passes": "while-loop-invariant-code-motion"}


def _measured(fn: Callable, *args: Any, dtype: str, **kw: Any) -> tuple[dict[str, Any], float]:
    """Memory of ``jit(fn)`` (and, for bf16 on the CPU, its ``no_hoist_*`` figures) and the compile seconds."""
    import jax

    compiled, secs = _compile(fn, *args, **kw)
    row = memory(compiled)
    del compiled
    placed = [a.sharding for a in jax.tree.leaves(args) if getattr(a, "sharding", None) is not None]
    platform = next(iter(placed[0].device_set)).platform if placed else jax.default_backend()
    if dtype == "bfloat16" and platform == "cpu":
        row.update(_no_hoist(memory(_compile(fn, *args, options=NO_HOIST, **kw)[0])))
    return row, secs


def _no_hoist(mem: dict[str, Any]) -> dict[str, Any]:
    return {"no_hoist_peak_bytes": mem["per_device_peak_bytes"], "no_hoist_peak_gb": mem["per_device_peak_gb"],
            "no_hoist_temp_gb": mem["temp_gb"]}


def _flops(compiled: Any) -> float:
    from flowcache_jax.flops import _flops as read

    return read(compiled.cost_analysis())


def _depth_extrapolated(make: Callable[[int], tuple], depth: int) -> float:
    """FLOPs of a program whose layers are one scanned loop. XLA counts a loop body once whatever its trip count,
    but removes a loop of 0 trips and inlines a loop of 1: compiled at 0 and 1 layers, the difference is one
    layer, and the program costs f(0) + depth * (f(1) - f(0)). ``make(n)`` gives (fn, *args) or
    (fn, args, jit keywords)."""
    def one(n: int) -> float:
        made = make(n)
        if len(made) == 3 and isinstance(made[2], dict):
            fn, args, kw = made
            return _flops(_compile(fn, *args, **kw)[0])
        return _flops(_compile(*made)[0])

    f0, f1 = one(0), one(1)
    return f0 + depth * (f1 - f0)
def _dense_flops(program: Callable[[Any], tuple], cfg: Any) -> float:
    """FLOPs of a DiT program ``program(model config) -> (fn, args, kw)`` on its dense (``xla``) attention, at 0 and
    1 layers extrapolated to the model's depth: XLA counts the tiled attention's key-tile loop only once."""
    dense = dataclasses.replace(cfg, attention_impl="xla")
    return _depth_extrapolated(lambda n: program(dataclasses.replace(dense, num_layers=n)), cfg.num_layers)




def parse_mesh(text: str) -> Any:
    """``"fsdp=4,seq=2"`` -> MeshConfig (axes not named are 1)."""
    from flowcache_jax.sharding import MESH_AXES, MeshConfig

    sizes: dict[str, int] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, _, value = item.partition("=")
        if name not in MESH_AXES or not value.isdigit() or int(value) < 1:
            raise common.ConfigError(f"--mesh: {item!r} is not axis=size with axis one of {', '.join(MESH_AXES)}")
        sizes[name] = int(value)
    return MeshConfig.from_config(sizes)


def make_layout(mc: Any) -> Any:
    """The Layout of mesh ``mc`` over the default devices, or the host CPU's when the default backend has fewer."""
    import jax

    from flowcache_jax.sharding import Layout, make_mesh

    devs = jax.devices()
    if len(devs) < mc.size:
        cpus = jax.devices("cpu")
        if len(cpus) < mc.size:
            raise common.ConfigError(
                f"mesh {mc} needs {mc.size} devices but {len(devs)} exist: run with "
                f"XLA_FLAGS=--xla_force_host_platform_device_count={mc.size} (host CPU devices)")
        devs = cpus
    return Layout(make_mesh(mc, devs[:mc.size]))


def _mesh_fields(layout: Any) -> dict[str, Any]:
    if layout is None:
        return {"devices": 1}
    names = layout.mesh.axis_names
    shape = [int(layout.mesh.shape[a]) for a in names]
    return {"device": str(layout.mesh.devices.flat[0]), "devices": layout.size,
            "mesh": " x ".join(f"{a}={n}" for a, n in zip(names, shape, strict=True)), "mesh_shape": shape}


# ----- MAGI-1 ----------------------------------------------------------------------------------------------------
def magi1_4p5b(opt: Options) -> Any:
    from models.magi1 import MAGI1_4P5B_DISTILL, Magi1Config

    return dataclasses.replace(Magi1Config.from_upstream(MAGI1_4P5B_DISTILL, opt.dtype), attention_impl=opt.attention)


def magi1_24b(opt: Options) -> Any:
    from models.magi1 import Magi1Config

    return Magi1Config(**MAGI1_24B_DISTILL, dtype=opt.dtype, attention_impl=opt.attention)


def _magi1_program(cfg: Any, opt: Options, side: int, frames: int, layout: Any) -> tuple:
    """(fn, args, jit keywords) of the newest chunk's forward over a ``buffer_chunks``-chunk buffer."""
    import jax
    import jax.numpy as jnp

    from flowcache_jax.sharding import param_shardings
    from models.magi1 import forward_call, param_shapes

    dt = jnp.dtype(opt.dtype)
    shapes = param_shapes(cfg)
    rep = None if layout is None else layout.replicated
    params = _abstract(shapes, opt.dtype, None if layout is None else param_shardings(shapes, "magi1", layout))
    ctn = frames // cfg.t_patch_size * (side // cfg.patch_size) ** 2
    rows = opt.buffer_chunks * ctn
    # (a 0-layer program, compiled for its FLOPs, still traces the layer body: give it a 1-layer buffer)
    buf_shape = (max(cfg.num_layers, 1), rows, cfg.num_query_groups, cfg.kv_channels)
    buf_sh = None if layout is None else layout.sharding(("layers", "cache_tokens", "kv_heads", "head_dim"),
                                                         buf_shape)
    buf = jax.ShapeDtypeStruct(buf_shape, dt, sharding=buf_sh)
    chunk = opt.buffer_chunks - 1  # the newest chunk of the buffer: it sees every other row
    latent = MAGI1_LATENT_CHANNELS if cfg.in_channels == 2 * MAGI1_LATENT_CHANNELS else cfg.in_channels

    def fn(p, x, t, y, m, bk, bv, mask):
        if cfg.in_channels != x.shape[0]:  # half_channel_vae: the latent twice in, its first half out
            x = jnp.concatenate([x, x], 0)
        vel, kv = forward_call(cfg, p, x, t, y, m, jnp.asarray([[chunk * ctn, (chunk + 1) * ctn]]), (bk, bv), chunk,
                               64, 1, 1.0, opt.key_tile, buffer_mask=mask, write_start=jnp.int32(chunk * ctn),
                               constrain=layout)[:2]
        return vel[:latent], kv

    f32 = jnp.float32
    sds = lambda shape, d: jax.ShapeDtypeStruct(shape, d, sharding=rep)  # noqa: E731
    args = (params, sds((latent, frames, side, side), f32), sds((1,), f32),
            sds((1, cfg.caption_max_length, cfg.caption_channels), f32), sds((1, cfg.caption_max_length), f32),
            buf, buf, sds((rows,), bool))
    kw: dict[str, Any] = {"donate": (5, 6)}
    if layout is not None:
        kw["out_shardings"] = (rep, (buf_sh, buf_sh))
    return fn, args, kw


def check_magi1(cfg: Any, opt: Options, name: str, label: str, side: int = 90, frames: int = 6,
                layout: Any = None) -> dict[str, Any]:
    """One chunk forward (``frames`` latent frames of ``side`` x ``side``) of the newest chunk of the KV buffer."""
    if opt.buffer_chunks < 1 or opt.key_tile < 1:
        raise common.ConfigError("--buffer_chunks and --key_tile must be >= 1")
    fn, args, kw = _magi1_program(cfg, opt, side, frames, layout)
    row, secs = _measured(fn, *args, dtype=opt.dtype, **kw)
    flops = _dense_flops(lambda c: _magi1_program(c, opt, side, frames, None), cfg)
    extra = {}
    if layout is not None:
        extra["tflops_per_device"] = _dense_flops(lambda c: _magi1_program(c, opt, side, frames, layout), cfg) / 1e12
    ctn = frames // cfg.t_patch_size * (side // cfg.patch_size) ** 2
    px = side * 8
    return {"part": name, "what": f"{label} chunk forward, {px}x{px} ({frames}x{side}x{side} latent), {ctn} tokens, "
            f"{opt.buffer_chunks}-chunk KV buffer ({opt.buffer_chunks * ctn} rows), attention={opt.attention}",
            **_mesh_fields(layout), "attention": opt.attention, "calls": 1, "tflops": flops / 1e12, **extra,
            "compile_s": secs, **row}


def check_dit(opt: Options) -> dict[str, Any]:
    """One 720p chunk forward of MAGI-1 4.5B-distill over a KV buffer of ``buffer_chunks`` chunks, one device."""
    return check_magi1(magi1_4p5b(opt), opt, "dit", "MAGI-1 4.5B-distill")


def check_dit24b(opt: Options, mesh: Any) -> dict[str, Any]:
    """The same chunk forward of MAGI-1 24B-distill on a mesh (``MeshConfig``)."""
    c = MAGI1_24B_DISTILL
    label = (f"MAGI-1 24B-distill ({c['num_layers']} layers, hidden {c['hidden_size']}, SwiGLU ffn "
             f"{c['ffn_hidden_size']}, {c['num_attention_heads']} heads / {c['num_query_groups']} groups x "
             f"{c['kv_channels']}, in/out channels {c['in_channels']} (half_channel_vae), x_rescale "
             f"{c['x_rescale_factor']}; example/24B/24B_distill_config.json)")
    return check_magi1(magi1_24b(opt), opt, "dit24b", label, layout=make_layout(mesh))


# ----- SkyReels-V2 -----------------------------------------------------------------------------------------------
WAN_STRIDES = (4, 8)  # the Wan2.1 VAE's temporal and spatial strides


def skyreels_1p3b(opt: Options) -> Any:
    from models.skyreels_v2 import SKYREELS_DF_1P3B, SkyReelsConfig

    return dataclasses.replace(SkyReelsConfig.from_upstream(SKYREELS_DF_1P3B, opt.dtype), attention_impl=opt.attention)


def _latent(frames: int, height: int, width: int) -> tuple[int, int, int]:
    t, s = WAN_STRIDES
    return (frames - 1) // t + 1, height // s, width // s


def _skyreels_window(cfg: Any, opt: Options, shape: tuple[int, int, int], block: int) -> tuple:
    import jax
    import jax.numpy as jnp

    from models.skyreels_v2 import forward, param_shapes

    t_lat, h, w = shape
    params = _abstract(param_shapes(cfg), opt.dtype)

    def fn(p, x, t, ctx, fps):
        return forward(cfg, p, x, t, ctx, fps, causal_block_size=block, key_tile=opt.key_tile)[0]

    args = (params, jax.ShapeDtypeStruct((cfg.in_dim, t_lat, h, w), jnp.float32),
            jax.ShapeDtypeStruct((t_lat,), jnp.int32), jax.ShapeDtypeStruct((512, cfg.text_dim), jnp.float32),
            jax.ShapeDtypeStruct((), jnp.int32))
    return fn, args, {}


def check_skyreels(cfg: Any, opt: Options, frames: int = 97, height: int = 544, width: int = 960,
                   block: int = 5, name: str = "skyreels", label: str = "SkyReels-V2-DF-1.3B") -> dict[str, Any]:
    """One window forward (one CFG branch) of the whole video, block-causal by blocks of ``block`` latent frames."""
    shape = _latent(frames, height, width)
    fn, args, kw = _skyreels_window(cfg, opt, shape, block)
    row, secs = _measured(fn, *args, dtype=opt.dtype, **kw)
    flops = _dense_flops(lambda c: _skyreels_window(c, opt, shape, block), cfg)
    _, ph, pw = cfg.patch_size
    tokens = shape[0] * (shape[1] // ph) * (shape[2] // pw)
    return {"part": name, "what": f"{label} window forward, {frames} frames {height}x{width} ({shape[0]}x{shape[1]}x"
            f"{shape[2]} latent, {tokens} tokens), block-causal by {block} latent frames, one CFG branch, "
            f"attention={opt.attention}", "devices": 1, "attention": opt.attention, "calls": 1,
            "tflops": flops / 1e12, "compile_s": secs, **row}


def _skyreels_block(cfg: Any, opt: Options, shape: tuple[int, int, int], block: int) -> tuple:
    """(fn, args, jit keywords) of the groups executor's both-branch call of the window's newest block."""
    import jax
    import jax.numpy as jnp

    from flowcache_jax.denoiser import SlotInfo
    from models.skyreels_denoiser import SkyReelsDenoiser
    from models.skyreels_v2 import param_shapes

    t_lat, h, w = shape
    groups = t_lat // block
    den = SkyReelsDenoiser(cfg, groups=groups, block=block, latent_h=h, latent_w=w, executor="groups",
                           key_tile=opt.key_tile, branches=2)
    dt = jnp.dtype(cfg.dtype)
    params = _abstract(param_shapes(cfg), opt.dtype)
    f32, i32 = jnp.float32, jnp.int32
    sds = jax.ShapeDtypeStruct
    ctx = (sds((2, cfg.num_layers, 512, cfg.num_heads, cfg.head_dim), dt),) * 2
    cond = {"ctx_both": ctx, "fps": sds((), i32), "guidance": sds((), f32), "a": sds((), f32),
            "prefix_groups": sds((), i32), "eps": sds((1, 1, *den.chunk_shape), f32)}
    # (a 0-layer program, compiled for its FLOPs, still traces the layer body: give it a 1-layer buffer)
    kv_shape = (2, max(cfg.num_layers, 1), groups * den.tokens_per_group, cfg.num_heads, cfg.head_dim)
    kv = (sds(kv_shape, dt), sds(kv_shape, dt))
    info = SlotInfo(*(sds((), d) for d in (i32, i32, f32, f32, i32, i32, i32)))

    def fn(p, c, x, i, kv):
        return den.forward_branches(p, c, x, i, kv)

    return fn, (params, cond, sds((1, *den.chunk_shape), f32), info, kv), {"donate": (4,)}


def check_skyreels_block(cfg: Any, opt: Options, frames: int = 97, height: int = 544, width: int = 960,
                         block: int = 5, label: str = "SkyReels-V2-DF-1.3B") -> dict[str, Any]:
    """The groups executor's forward of one block (both CFG branches) over the window's K/V buffer."""
    shape = _latent(frames, height, width)
    fn, args, kw = _skyreels_block(cfg, opt, shape, block)
    row, secs = _measured(fn, *args, dtype=opt.dtype, **kw)
    flops = _dense_flops(lambda c: _skyreels_block(c, opt, shape, block), cfg)
    groups = shape[0] // block
    _, ph, pw = cfg.patch_size
    per = block * (shape[1] // ph) * (shape[2] // pw)
    return {"part": "skyreels_block", "what": f"{label} groups-executor block forward, {frames} frames {height}x"
            f"{width}: one block of {block} latent frames ({per} tokens), both CFG branches, over the K/V buffer "
            f"of {groups} blocks ({groups * per} rows per branch), attention={opt.attention}", "devices": 1,
            "attention": opt.attention, "calls": 1, "tflops": flops / 1e12, "compile_s": secs, **row}


# ----- encoders and VAEs -----------------------------------------------------------------------------------------
def check_text_encoder(name: str, tokens: int, opt: Options) -> dict[str, Any]:
    """T5 v1.1-XXL (MAGI-1, 800 tokens) or umT5-XXL (Wan / SkyReels, 512 tokens) on one prompt."""
    import jax
    import jax.numpy as jnp

    from models.t5 import T5_V1_1_XXL, UMT5_XXL, T5Config, encode, half_precision_leaf, param_shapes

    cfg = T5Config.from_hf(T5_V1_1_XXL if name == "t5" else UMT5_XXL, dtype=opt.dtype)

    def make(c):
        p = _abstract(param_shapes(c), opt.dtype, half=half_precision_leaf)
        ids = jax.ShapeDtypeStruct((1, tokens), jnp.int32)
        return (lambda p, i, m: encode(c, p, i, m)), p, ids, ids

    row, secs = _measured(*make(cfg), dtype=opt.dtype)
    flops = _depth_extrapolated(lambda n: make(dataclasses.replace(cfg, num_layers=n)), cfg.num_layers)
    return {"part": name, "what": f"{'T5 v1.1' if name == 't5' else 'umT5'}-XXL encoder, {tokens} tokens",
            "devices": 1, "calls": 1, "tflops": flops / 1e12, "compile_s": secs, **row}


def check_wan_vae(opt: Options, frames: int = 97, height: int = 544, width: int = 960) -> dict[str, Any]:
    """The Wan2.1 VAE decoding a whole video: one first-frame program, then blocks of latent frames."""
    import jax
    import jax.numpy as jnp

    from models.wan_vae import WAN21_VAE, WanVAEConfig, half_precision_leaf, param_shapes, programs_for

    cfg = WanVAEConfig.from_kwargs(WAN21_VAE, dtype=opt.dtype)
    prog = programs_for(cfg)
    p = _abstract(param_shapes(cfg), opt.dtype, half=half_precision_leaf)
    t_lat, h, w = (frames - 1) // cfg.temporal_stride + 1, height // cfg.spatial_stride, width // cfg.spatial_stride
    block = 4
    f32 = jnp.float32
    z1 = jax.ShapeDtypeStruct((cfg.z_dim, 1, h, w), f32)
    state = jax.eval_shape(prog._dec_init, p, z1)[0]
    zb = jax.ShapeDtypeStruct((cfg.z_dim, block, h, w), f32)
    valid = jax.ShapeDtypeStruct((block,), bool)
    m_init, s_init = _measured(prog._dec_init, p, z1, dtype=opt.dtype)
    m_step, s_step = _measured(prog._dec_block, p, state, zb, valid, dtype=opt.dtype)
    blocks = -(-(t_lat - 1) // block)
    # a block scans its frames (XLA counts a loop body once): one frame's FLOPs from a block of 1 (inlined loop)
    one = _compile(prog._dec_block, p, state, jax.ShapeDtypeStruct((cfg.z_dim, 1, h, w), f32),
                   jax.ShapeDtypeStruct((1,), bool))[0]
    flops = _flops(_compile(prog._dec_init, p, z1)[0]) + (t_lat - 1) * _flops(one)
    peak = max(m_init, m_step, key=lambda m: m["per_device_peak_bytes"])
    hoist = {}
    if "no_hoist_peak_bytes" in m_step:
        hoist = max(m_init, m_step, key=lambda m: m["no_hoist_peak_bytes"])
        hoist = {k: v for k, v in hoist.items() if k.startswith("no_hoist")}
    return {"part": "wan_vae", "what": f"Wan2.1 VAE decode, {frames} frames {height}x{width} ({t_lat} latent frames:"
            f" 1 + {blocks} blocks of {block})", "devices": 1, "calls": 1 + blocks, "tflops": flops / 1e12,
            "compile_s": s_init + s_step, **m_step,
            **{k: peak[k] for k in ("per_device_peak_bytes", "per_device_peak_gb", "peak_gb")}, **hoist,
            "first_frame_peak_gb": m_init["per_device_peak_gb"]}


def check_magi1_vae(opt: Options, latent_frames: int = 6, side: int = 90) -> dict[str, Any]:
    """The MAGI-1 VAE decoding one 720p chunk the pipeline's way: tiles through one program, then the blend."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from models.magi1_vae import (
        MAGI1_VAE_DDCONFIG,
        Magi1VAEConfig,
        _decode_tile,
        decode_grid,
        half_precision_leaf,
        param_shapes,
    )

    cfg = Magi1VAEConfig.from_ddconfig(MAGI1_VAE_DDCONFIG, dtype=opt.dtype)
    grid = decode_grid(cfg, (latent_frames, side, side))

    def make(c):
        p = _abstract(param_shapes(c), opt.dtype, half=half_precision_leaf)["decoder"]
        z = jax.ShapeDtypeStruct((c.z_chans, *grid.tile), jnp.float32)
        pos = jax.ShapeDtypeStruct((1 + int(np.prod(grid.tile)), c.embed_dim), jnp.float32)
        valid = jax.ShapeDtypeStruct((3,), jnp.int32)
        return (lambda p, z, pos, v: _decode_tile(c, p, z, pos, v)), p, z, pos, valid

    row, secs = _measured(*make(cfg), dtype=opt.dtype)
    per_tile = _depth_extrapolated(lambda n: make(dataclasses.replace(cfg, depth=n)), cfg.depth)
    tiles = len(grid.sizes)
    return {"part": "magi1_vae", "what": f"MAGI-1 VAE decode of one 720p chunk ({latent_frames} latent frames, "
            f"{tiles} tiles of {grid.tile})", "devices": 1, "calls": tiles, "tflops": per_tile * tiles / 1e12,
            "compile_s": secs, **row}


# ----- driver ----------------------------------------------------------------------------------------------------
def run_parts(parts: Sequence[str], opt: Options, mesh: Any = None) -> list[dict[str, Any]]:
    """The rows of ``parts`` (names of ``PARTS``); ``mesh``: dit24b's MeshConfig (default fsdp=4 x seq=2)."""
    import jax

    from flowcache_jax.sharding import MeshConfig

    checks: dict[str, Callable[[], dict[str, Any]]] = {
        "dit": lambda: check_dit(opt),
        "dit24b": lambda: check_dit24b(opt, mesh or MeshConfig(fsdp=4, seq=2)),
        "skyreels": lambda: check_skyreels(skyreels_1p3b(opt), opt),
        "skyreels_block": lambda: check_skyreels_block(skyreels_1p3b(opt), opt),
        "t5": lambda: check_text_encoder("t5", 800, opt), "umt5": lambda: check_text_encoder("umt5", 512, opt),
        "wan_vae": lambda: check_wan_vae(opt), "magi1_vae": lambda: check_magi1_vae(opt)}
    rows = []
    for name in parts:
        t0 = time.perf_counter()
        row = checks[name]()
        rows.append({"device": str(jax.devices()[0]), "dtype": opt.dtype, **row,
                     "wall_s": time.perf_counter() - t0})
        jax.clear_caches()
        print(f"{name}: per-device peak {row['per_device_peak_gb']:.2f} GB on {row['devices']} device(s), "
              f"{rows[-1]['wall_s']:.0f} s", flush=True)
    return rows


def write_rows(path: str, rows: list[dict[str, Any]], wall_s: float | None = None) -> None:
    """``{"rows": rows, "wall_s": ...}`` written atomically (a temporary name, then a rename)."""
    from flowcache_jax import io

    io.write_json(path, {"rows": rows, **({} if wall_s is None else {"wall_s": wall_s})})


def define_flags() -> None:
    """The CLI's flags, defined only when run as a script (tests import this module beside other CLIs' flags)."""
    flags.DEFINE_enum("part", "dit", [*PARTS, "all"], "What to check.")
    flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Transformer weights and activations.")
    flags.DEFINE_integer("buffer_chunks", 5, "MAGI-1 KV buffer size in chunks (5 = the shipped compressed buffer).")
    flags.DEFINE_integer("key_tile", 2048, "Keys per attention tile (the tiled attention).")
    flags.DEFINE_enum("attention", "tiled", list(ATTENTION), "The DiTs' attention (models.attention).")
    flags.DEFINE_string("mesh", "fsdp=4,seq=2", "The dit24b mesh: comma-separated axis=size of data, fsdp, seq "
                        "(product = devices).")
    flags.DEFINE_string("output_json", None, "Where to write the figures: {\"rows\": [...]}.")


def main(argv: list[str]) -> None:
    del argv
    f = flags.FLAGS
    opt = Options(dtype=f.dtype, buffer_chunks=f.buffer_chunks, key_tile=f.key_tile, attention=f.attention)
    if opt.buffer_chunks < 1 or opt.key_tile < 1:
        raise common.ConfigError("--buffer_chunks and --key_tile must be >= 1")
    mesh = parse_mesh(f.mesh)
    parts = list(PARTS) if f.part == "all" else [f.part]
    t0 = time.perf_counter()
    rows = run_parts(parts, opt, mesh)
    wall = time.perf_counter() - t0
    if f.output_json:
        write_rows(f.output_json, rows, wall)
    cols = ["part", "dtype", "devices", "mesh", "calls", "tflops", "per_device_peak_gb", "temp_gb", "argument_gb",
            "compile_s", "what"]
    print(common.format_table(rows, cols))
    print(f"wall {wall:.0f} s")


if __name__ == "__main__":
    define_flags()
    common.run_app(main, default=None)
