r"""Lower and compile full-size components with abstract weights; print their memory and FLOP figures.

  python experiments/fullsize_check.py [--part=dit] [--dtype=bfloat16] [--buffer_chunks=5] [--key_tile=2048]
  python experiments/fullsize_check.py --part=all --dtype=bfloat16 --output_json=fullsize.json

Parts: ``dit`` (one 720p MAGI-1 4.5B chunk forward over a KV buffer), ``t5`` (T5 v1.1-XXL encoder, 800 tokens),
``umt5`` (umT5-XXL, 512 tokens), ``wan_vae`` (the Wan2.1 VAE decoding 97 frames at 544x960: its first-frame and
its per-block programs), ``magi1_vae`` (the MAGI-1 VAE decoding one 720p chunk: its one tile program). Nothing is
materialised: parameters and inputs are ShapeDtypeStructs. Memory is XLA's memory analysis of the compiled
program (peak = temporaries + arguments + outputs - aliased). FLOPs are XLA's cost analysis; XLA counts a loop
body once, so a model whose layers (or frames) are scanned is compiled at two depths and extrapolated, and
repeated calls (tiles, frame blocks) are multiplied by their count. On the CPU the bf16 figures are upper bounds:
the CPU backend upcasts bf16 matmul operands; on a GPU run the same command for the device figure.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from absl import flags  # noqa: E402

from experiments import common  # noqa: E402

_PART = flags.DEFINE_enum("part", "dit", ["dit", "t5", "umt5", "wan_vae", "magi1_vae", "all"], "What to check.")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Transformer weights and activations.")
_BUFFER = flags.DEFINE_integer("buffer_chunks", 5, "KV buffer size in chunks (5 = the shipped compressed buffer).")
_TILE = flags.DEFINE_integer("key_tile", 2048, "Keys per attention tile.")
_OUT = flags.DEFINE_string("output_json", None, "Where to write the figures.")


def memory(compiled) -> dict:
    mem = compiled.memory_analysis()
    out = {"temp_gb": mem.temp_size_in_bytes / 1e9, "argument_gb": mem.argument_size_in_bytes / 1e9,
           "output_gb": mem.output_size_in_bytes / 1e9, "aliased_gb": mem.alias_size_in_bytes / 1e9}
    out["peak_gb"] = out["temp_gb"] + out["argument_gb"] + out["output_gb"] - out["aliased_gb"]
    return out


def _abstract(shapes: dict, dtype_of) -> dict:
    import jax

    def leaf(path, s):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        return jax.ShapeDtypeStruct(s, dtype_of(name))
    return jax.tree_util.tree_map_with_path(leaf, shapes, is_leaf=lambda x: isinstance(x, tuple))


def _weights_dtype(name: str):
    """bf16 weights except norms (as converters.release --dtype=bf16 stores them)."""
    import jax.numpy as jnp

    return jnp.float32 if _DTYPE.value == "float32" or "norm" in name else jnp.bfloat16


def _compile(fn, *args):
    import jax

    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, time.perf_counter() - t0


def _flops(compiled) -> float:
    from flowcache_jax.flops import _flops as read

    return read(compiled.cost_analysis())


def _depth_extrapolated(make, depth: int) -> float:
    """FLOPs of a program whose layers are one scanned loop. XLA counts a loop body once whatever its trip count,
    but removes a loop of 0 trips and inlines a loop of 1: compiled at 0 and 1 layers, the difference is one
    layer, and the program costs f(0) + depth * (f(1) - f(0))."""
    f0, f1 = (_flops(_compile(*make(n))[0]) for n in (0, 1))
    return f0 + depth * (f1 - f0)


def check_text_encoder(name: str, tokens: int) -> dict:
    """T5 v1.1-XXL (MAGI-1, 800 tokens) or umT5-XXL (Wan / SkyReels, 512 tokens) on one prompt."""
    import dataclasses

    import jax
    import jax.numpy as jnp

    from models.t5 import T5_V1_1_XXL, UMT5_XXL, T5Config, encode, param_shapes

    cfg = T5Config.from_hf(T5_V1_1_XXL if name == "t5" else UMT5_XXL, dtype=_DTYPE.value)

    def make(c):
        p = _abstract(param_shapes(c), _weights_dtype)
        ids = jax.ShapeDtypeStruct((1, tokens), jnp.int32)
        return (lambda p, i, m: encode(c, p, i, m)), p, ids, ids

    compiled, secs = _compile(*make(cfg))
    flops = _depth_extrapolated(lambda n: make(dataclasses.replace(cfg, num_layers=n)), cfg.num_layers)
    return {"part": name, "what": f"{'T5 v1.1' if name == 't5' else 'umT5'}-XXL encoder, {tokens} tokens",
            "calls": 1, "tflops": flops / 1e12, "compile_s": secs, **memory(compiled)}


def check_wan_vae(frames: int = 97, height: int = 544, width: int = 960) -> dict:
    """The Wan2.1 VAE decoding a whole video: one first-frame program, then blocks of latent frames."""
    import jax
    import jax.numpy as jnp

    from models.wan_vae import WAN21_VAE, WanVAEConfig, param_shapes, programs_for

    cfg = WanVAEConfig.from_kwargs(WAN21_VAE, dtype=_DTYPE.value)
    prog = programs_for(cfg)
    p = _abstract(param_shapes(cfg), _weights_dtype)
    t_lat, h, w = (frames - 1) // cfg.temporal_stride + 1, height // cfg.spatial_stride, width // cfg.spatial_stride
    block = 4
    f32 = jnp.float32
    z1 = jax.ShapeDtypeStruct((cfg.z_dim, 1, h, w), f32)
    t0 = time.perf_counter()
    init = jax.jit(prog._dec_init).lower(p, z1).compile()
    state = jax.eval_shape(prog._dec_init, p, z1)[0]
    zb = jax.ShapeDtypeStruct((cfg.z_dim, block, h, w), f32)
    valid = jax.ShapeDtypeStruct((block,), bool)
    step = jax.jit(prog._dec_block).lower(p, state, zb, valid).compile()
    secs = time.perf_counter() - t0
    blocks = -(-(t_lat - 1) // block)
    # a block scans its frames (XLA counts a loop body once): one frame's FLOPs from a block of 1 (inlined loop)
    one = jax.jit(prog._dec_block).lower(p, state, jax.ShapeDtypeStruct((cfg.z_dim, 1, h, w), f32),
                                         jax.ShapeDtypeStruct((1,), bool)).compile()
    flops = _flops(init) + (t_lat - 1) * _flops(one)
    m_init, m_step = memory(init), memory(step)
    peak = max(m_init["peak_gb"], m_step["peak_gb"])
    return {"part": "wan_vae", "what": f"Wan2.1 VAE decode, {frames} frames {height}x{width} ({t_lat} latent frames:"
            f" 1 + {blocks} blocks of {block})", "calls": 1 + blocks, "tflops": flops / 1e12, "compile_s": secs,
            **{k: m_step[k] for k in m_step}, "peak_gb": peak, "first_frame_peak_gb": m_init["peak_gb"]}


def check_magi1_vae(latent_frames: int = 6, side: int = 90) -> dict:
    """The MAGI-1 VAE decoding one 720p chunk the pipeline's way: tiles through one program, then the blend."""
    import dataclasses

    import jax
    import jax.numpy as jnp
    import numpy as np

    from models.magi1_vae import MAGI1_VAE_DDCONFIG, Magi1VAEConfig, _decode_tile, decode_grid, param_shapes

    cfg = Magi1VAEConfig.from_ddconfig(MAGI1_VAE_DDCONFIG, dtype=_DTYPE.value)
    grid = decode_grid(cfg, (latent_frames, side, side))

    def make(c):
        p = _abstract(param_shapes(c), _weights_dtype)["decoder"]
        z = jax.ShapeDtypeStruct((c.z_chans, *grid.tile), jnp.float32)
        pos = jax.ShapeDtypeStruct((1 + int(np.prod(grid.tile)), c.embed_dim), jnp.float32)
        valid = jax.ShapeDtypeStruct((3,), jnp.int32)
        return (lambda p, z, pos, v: _decode_tile(c, p, z, pos, v)), p, z, pos, valid

    compiled, secs = _compile(*make(cfg))
    per_tile = _depth_extrapolated(lambda n: make(dataclasses.replace(cfg, depth=n)), cfg.depth)
    tiles = len(grid.sizes)
    return {"part": "magi1_vae", "what": f"MAGI-1 VAE decode of one 720p chunk ({latent_frames} latent frames, "
            f"{tiles} tiles of {grid.tile})", "calls": tiles, "tflops": per_tile * tiles / 1e12, "compile_s": secs,
            **memory(compiled)}


def main(argv: list[str]) -> None:
    del argv
    import jax

    from flowcache_jax import io

    if _BUFFER.value < 1 or _TILE.value < 1:
        raise common.ConfigError("--buffer_chunks and --key_tile must be >= 1")
    checks = {"dit": check_dit, "t5": lambda: check_text_encoder("t5", 800),
              "umt5": lambda: check_text_encoder("umt5", 512), "wan_vae": check_wan_vae, "magi1_vae": check_magi1_vae}
    parts = list(checks) if _PART.value == "all" else [_PART.value]
    rows = []
    for name in parts:
        rows.append({"device": str(jax.devices()[0]), "dtype": _DTYPE.value, **checks[name]()})
        print(f"{name}: peak {rows[-1]['peak_gb']:.2f} GB", flush=True)
    if _OUT.value:
        io.write_json(_OUT.value, rows if len(rows) > 1 else rows[0])
    cols = ["part", "dtype", "calls", "tflops", "peak_gb", "temp_gb", "argument_gb", "compile_s", "what"]
    print(common.format_table(rows, cols))


def check_dit() -> dict:
    """One 720p chunk forward of MAGI-1 4.5B-distill over a KV buffer of ``--buffer_chunks`` chunks."""
    import jax
    import jax.numpy as jnp

    from models.magi1 import MAGI1_4P5B_DISTILL, Magi1Config, forward_call, param_shapes

    if _BUFFER.value < 1 or _TILE.value < 1:
        raise common.ConfigError("--buffer_chunks and --key_tile must be >= 1")
    dt = jnp.dtype(_DTYPE.value)
    cfg = Magi1Config.from_upstream(MAGI1_4P5B_DISTILL, _DTYPE.value)
    shapes = param_shapes(cfg)
    is_shape = lambda x: isinstance(x, tuple)  # noqa: E731
    params = {k: jax.tree.map(lambda s, k=k: jax.ShapeDtypeStruct(s, dt if k == "layers" else jnp.float32), v,
                              is_leaf=is_shape) for k, v in shapes.items()}
    ctn = 6 * 45 * 45
    rows = _BUFFER.value * ctn
    buf = jax.ShapeDtypeStruct((cfg.num_layers, rows, cfg.num_query_groups, cfg.kv_channels), dt)
    chunk = _BUFFER.value - 1  # the newest chunk of the buffer: it sees every other row

    def fn(p, x, t, y, m, bk, bv, mask):
        return forward_call(cfg, p, x, t, y, m, jnp.asarray([[chunk * ctn, (chunk + 1) * ctn]]), (bk, bv), chunk, 64,
                            1, 1.0, _TILE.value, buffer_mask=mask, write_start=jnp.int32(chunk * ctn))[:2]

    f32 = jnp.float32
    args = (params, jax.ShapeDtypeStruct((16, 6, 90, 90), f32), jax.ShapeDtypeStruct((1,), f32),
            jax.ShapeDtypeStruct((1, 800, 4096), f32), jax.ShapeDtypeStruct((1, 800), f32), buf, buf,
            jax.ShapeDtypeStruct((rows,), bool))
    t0 = time.perf_counter()
    compiled = jax.jit(fn, donate_argnums=(5, 6)).lower(*args).compile()
    return {"part": "dit", "what": f"MAGI-1 4.5B chunk forward, {ctn} tokens, {_BUFFER.value}-chunk buffer",
            "calls": 1, "compile_s": time.perf_counter() - t0, **memory(compiled)}


if __name__ == "__main__":
    common.run_app(main, default=None)
