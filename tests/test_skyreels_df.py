"""Vanilla diffusion forcing (SkyReels-V2) vs whole upstream DF runs: sync, async and a two-window long video."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.skyreels_df import DFWindow, run_window, skyreels_sigmas
from tests.test_skyreels_parity import FIXTURE, model  # noqa: F401  (module-scoped fixture)

RUNS = sorted(FIXTURE.glob("e2e_vanilla_*.npz"))
REPORT = json.loads((FIXTURE / "e2e_gen_report.json").read_text())
LATENT_TOL = dict(atol=2e-5, rtol=0)  # README's float32 tolerance


@pytest.mark.parametrize("path", RUNS, ids=lambda p: p.stem)
def test_vanilla_df_run(model, path):  # noqa: F811
    cfg, params = model
    d = dict(np.load(path))
    kw = json.loads(str(d["call_kwargs_json"]))
    sig, ts = skyreels_sigmas(len(d["sched_timesteps"]), float(REPORT["shift"]))
    np.testing.assert_array_equal(sig, d["sched_sigmas"])
    np.testing.assert_array_equal(ts, d["sched_timesteps"])
    block = int(kw.get("causal_block_size", REPORT["V"]["block"]))  # common parameters live in the report
    assert len(ts) == int(REPORT["steps"])
    prev_final = None
    w = 0
    while f"w{w}_noise" in d:
        x = d[f"w{w}_noise"].copy()
        pre = d[f"w{w}_prefix_latents"].shape[1] if f"w{w}_prefix_latents" in d else 0
        plan = DFWindow.build(x.shape[1], block, len(ts), int(kw.get("ar_step", 0)), pre)
        np.testing.assert_array_equal(plan.step_index, d[f"w{w}_step_index"])
        np.testing.assert_array_equal(plan.update_mask, d[f"w{w}_update_mask"])
        np.testing.assert_array_equal(plan.model_t(ts, int(kw.get("addnoise_condition", 0))), d[f"w{w}_model_t"])
        if pre:  # the prefix is the end of our own previous window (the identity VAE of the fixture)
            np.testing.assert_allclose(prev_final[:, -pre:], d[f"w{w}_prefix_latents"], **LATENT_TOL)
            x[:, :pre] = prev_final[:, -pre:]
        eps = jnp.asarray(d[f"w{w}_addnoise_eps"]) if pre else None
        ctx_c, ctx_u = jnp.asarray(d["context_cond"][0]), jnp.asarray(d["context_uncond"][0])
        lat = np.asarray(run_window(cfg, params, jnp.asarray(x), ctx_c, ctx_u, int(d["fps_index"][0]), plan, sig, ts,
                                    float(REPORT["guidance"]), block, int(kw.get("addnoise_condition", 0)), eps))
        for i, ref in enumerate(d[f"w{w}_latents"]):
            np.testing.assert_allclose(lat[i], ref, **LATENT_TOL, err_msg=f"window {w} iteration {i}")
        np.testing.assert_allclose(lat[-1], d[f"w{w}_final_latents"], **LATENT_TOL)
        prev_final = lat[-1]
        w += 1
    assert w >= 1
    jax.clear_caches()
