"""Vanilla diffusion forcing (SkyReels-V2) vs whole upstream DF runs: sync, async and a two-window long video,
through the one sampler (whole-window calls, per-block FlowUniPC) and, block by block, the groups executor."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from flowcache_jax.policies import Vanilla
from flowcache_jax.schedules import df_frame_masks, df_window_table, skyreels_sigmas
from tests.skyreels_runs import call_kwargs, latents_of, run_fixture
from tests.test_skyreels_parity import FIXTURE, model  # noqa: F401  (module-scoped fixture)

RUNS = sorted(FIXTURE.glob("e2e_vanilla_*.npz"))
REPORT = json.loads((FIXTURE / "e2e_gen_report.json").read_text())
LATENT_TOL = dict(atol=2e-5, rtol=0)  # README's float32 tolerance


@pytest.mark.parametrize("path", RUNS, ids=lambda p: p.stem)
def test_vanilla_df_run(model, path):  # noqa: F811
    d = dict(np.load(path))
    sig, ts = skyreels_sigmas(len(d["sched_timesteps"]), float(REPORT["shift"]))
    np.testing.assert_array_equal(sig, d["sched_sigmas"])
    np.testing.assert_array_equal(ts, d["sched_timesteps"])
    block, ar, addnoise = call_kwargs(d)
    assert len(ts) == int(REPORT["steps"])
    res, finals = run_fixture(model, d, Vanilla(), "window", stage_len=1, record_stages=True)
    assert len(finals) >= 1
    for w, final in enumerate(finals):
        frames, pre = res.windows[w].video.shape[1] * block, (d[f"w{w}_prefix_latents"].shape[1]
                                                              if f"w{w}_prefix_latents" in d else 0)
        idx, upd = df_frame_masks(frames, block, len(ts), ar, pre)
        np.testing.assert_array_equal(idx, d[f"w{w}_step_index"])
        np.testing.assert_array_equal(upd, d[f"w{w}_update_mask"])
        table = df_window_table(idx, upd, block, ts, sig, pre, addnoise)
        model_t = np.round((1.0 - table.t[0, : len(idx)]) * 1000).astype(int)
        np.testing.assert_array_equal(np.repeat(model_t, block, 1), d[f"w{w}_model_t"])
        if pre:  # the prefix is the end of our own previous window (the identity VAE of the fixture)
            np.testing.assert_allclose(finals[w - 1][:, -pre:], d[f"w{w}_prefix_latents"], **LATENT_TOL)
        for i, ref in enumerate(d[f"w{w}_latents"]):  # one stage per iteration: the latents after each
            np.testing.assert_allclose(latents_of(res.windows[w].stage_latents[i]), ref, **LATENT_TOL,
                                       err_msg=f"window {w} iteration {i}")
        np.testing.assert_allclose(final, d[f"w{w}_final_latents"], **LATENT_TOL)
    assert res.computed == res.chunk_forwards_vanilla and res.structure_skipped == 0
    jax.clear_caches()


def test_fused_attention_df_run(model):  # noqa: F811
    """jax.nn.dot_product_attention in the whole-window call (one attention per causal block on its key prefix)
    gives the fixture's final latents at the float32 tolerance, as the tiled reference does."""
    cfg, params = model
    d = dict(np.load(RUNS[0]))
    fused = (dataclasses.replace(cfg, attention_impl="xla"), params)
    _, finals = run_fixture(fused, d, Vanilla(), "window")
    for w, final in enumerate(finals):
        np.testing.assert_allclose(final, d[f"w{w}_final_latents"], **LATENT_TOL, err_msg=f"window {w}")
    jax.clear_caches()  # (the groups executor's fused form, a key prefix: tests/test_attention.py)
