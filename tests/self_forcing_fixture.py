"""The self_forcing_tiny fixture (``FLOWCACHE_SELF_FORCING_FIXTURE``) as the tests' model, denoiser and runs.

Every size comes from the fixture's files (config.json, the arrays), so fixtures of other sizes pass unchanged.
Latents are [B, F, C, H, W] in the fixture and [B, C, F, H, W] per block here.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def fixture_dir() -> Path:
    d = Path(os.environ.get("FLOWCACHE_SELF_FORCING_FIXTURE", ROOT.parent / "shared/fixtures/self_forcing_tiny"))
    if not (d / "config.json").is_file():
        pytest.fail(f"Self-Forcing fixture not found at {d}: set FLOWCACHE_SELF_FORCING_FIXTURE to the "
                    "self_forcing_tiny folder")
    return d


@functools.lru_cache(maxsize=1)
def load() -> tuple[dict, object, dict]:
    """(fixture config.json, model config, params) converted by the project's converter."""
    from converters.components import convert_component
    from models.self_forcing import config_from_upstream

    d = fixture_dir()
    conf = json.loads((d / "config.json").read_text())
    params, meta = convert_component("self_forcing", d / "weights.safetensors", config_path=str(d / "config.json"))
    return conf, config_from_upstream(meta["model_config"]), jax.tree.map(jnp.asarray, params)


def npz(name: str) -> dict:
    with np.load(fixture_dir() / name, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def steps() -> tuple[np.ndarray, np.ndarray]:
    from flowcache_jax.schedules import self_forcing_steps

    pl = load()[0]["pipeline"]
    return self_forcing_steps(pl["denoising_step_list"], pl["timestep_shift"], pl["warp_denoising_step"])


def denoiser(**kw):
    from models.self_forcing_denoiser import SelfForcingDenoiser

    conf, cfg, _ = load()
    pl = conf["pipeline"]
    kw.setdefault("kv_frames", pl["kv_cache_frames_default"])
    return SelfForcingDenoiser(cfg, block=pl["num_frame_per_block"], latent_h=pl["latent_height"],
                               latent_w=pl["latent_width"], **kw)


def blocks(a: np.ndarray, block: int) -> np.ndarray:
    """[B, F, C, H, W] -> [B, F / block, C, block, H, W]."""
    b, f, c, h, w = a.shape
    return a.reshape(b, f // block, block, c, h, w).transpose(0, 1, 3, 2, 4, 5)


def frames(a: np.ndarray) -> np.ndarray:
    """[B, n, C, block, H, W] -> [B, n·block, C, H, W]."""
    b, n, c, f, h, w = a.shape
    return a.transpose(0, 1, 3, 2, 4, 5).reshape(b, n * f, c, h, w)


def sampler(den, policy=None, solver_sigmas=None):
    from flowcache_jax.policies import Vanilla
    from flowcache_jax.sampler import Sampler
    from flowcache_jax.solvers import ReNoise

    sig = steps()[1] if solver_sigmas is None else solver_sigmas
    return Sampler(den, policy or Vanilla(), window=1, reuse="residual", reencode_clean=True, solver=ReNoise(sig))


def run(den, z: dict, prefix: str = "", n_blocks: int | None = None, on_stage=None, smp=None, **kw):
    """A whole generation with the fixture's noise and re-noise draws ([b, s, F, C, H, W] per block and step)."""
    from flowcache_jax.schedules import magi_schedule

    conf, _, params = load()
    t, sig = steps()
    noise = blocks(z[prefix + "noise"], den.block)
    n = noise.shape[1] if n_blocks is None else n_blocks
    eps = z[prefix + "renoise_eps"][None].transpose(0, 1, 2, 4, 3, 5, 6)  # [B, b, s, C, F, H, W]
    cond = den.prepare_cond(params, z["context"], t, conf["pipeline"]["context_noise"], **kw)
    smp = smp or sampler(den)
    table = magi_schedule(n, 1, len(t), grid=1.0 - sig)
    return smp.run(params, cond, table, jax.random.PRNGKey(0), progress=False, initial_noise=noise[:, :n],
                   solver_noise=eps[:, :n], on_stage=on_stage), smp
