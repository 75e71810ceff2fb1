"""A whole AR generation in bf16 (weights stored bf16, activations and K/V bf16) against the float32 run."""

import jax.numpy as jnp
import numpy as np

from experiments import common
from experiments.configs import tiny_vanilla

BF16_PSNR_DB = 40.0  # of the bf16 latents vs the float32 run's (measured 52.7 dB, rel L2 1.7e-2, 3 chunks)


def test_bf16_tiny_generation_matches_float32():
    videos = {}
    for dt in ("float32", "bfloat16"):
        c = tiny_vanilla.get_config()
        c.video.num_chunks = 3
        c.compute.dtype = dt
        c.compute.param_dtype = "" if dt == "float32" else dt
        run = common.build(c)
        assert run.notes["dtype"] == dt
        kv = run.denoiser.init_kv(1, run.table.window)
        assert kv["buf"].k.dtype == jnp.dtype(dt)
        if dt == "bfloat16":
            assert run.params["layers"]["fc1"]["kernel"].dtype == jnp.bfloat16
            assert run.params["t_freqs"].dtype == jnp.float32  # vectors keep their dtype
        res = run.sampler.run(run.params, run.cond, run.table, run.key, progress=False)
        videos[dt] = np.asarray(res.video, np.float64)
    a, b = videos["float32"], videos["bfloat16"]
    assert np.abs(a - b).max() > 0  # really another precision
    psnr = 10 * np.log10((a.max() - a.min()) ** 2 / np.mean((a - b) ** 2))
    assert psnr > BF16_PSNR_DB, psnr
