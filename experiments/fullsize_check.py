r"""Lower and compile one full-size MAGI-1 4.5B chunk forward with abstract weights; print its memory figure.

  python experiments/fullsize_check.py [--dtype=bfloat16] [--buffer_chunks=5] [--key_tile=2048]

Nothing is materialised: parameters, latents, captions and the KV buffer are ShapeDtypeStructs. This is
the check to run on a GPU (bf16); on the CPU use --dtype=float32, because the CPU backend upcasts bf16
matmul operands (whole stacked weights and buffers) and its bf16 figure says nothing about a GPU.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from absl import flags  # noqa: E402

from experiments import common  # noqa: E402

_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Transformer weights and activations.")
_BUFFER = flags.DEFINE_integer("buffer_chunks", 5, "KV buffer size in chunks (5 = the shipped compressed buffer).")
_TILE = flags.DEFINE_integer("key_tile", 2048, "Keys per attention tile.")
_OUT = flags.DEFINE_string("output_json", None, "Where to write the figures.")


def main(argv: list[str]) -> None:
    del argv
    import jax
    import jax.numpy as jnp

    from flowcache_jax import io
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
    mem = compiled.memory_analysis()
    report = {"device": str(jax.devices()[0]), "dtype": _DTYPE.value, "buffer_chunks": _BUFFER.value,
              "tokens": ctn, "compile_s": time.perf_counter() - t0,
              "temp_gb": mem.temp_size_in_bytes / 1e9, "argument_gb": mem.argument_size_in_bytes / 1e9,
              "output_gb": mem.output_size_in_bytes / 1e9, "aliased_gb": mem.alias_size_in_bytes / 1e9}
    report["peak_estimate_gb"] = report["temp_gb"] + report["argument_gb"] + report["output_gb"] - report["aliased_gb"]
    if _OUT.value:
        io.write_json(_OUT.value, report)
    print(common.format_table([report], list(report)))


if __name__ == "__main__":
    common.run_app(main, default=None)
