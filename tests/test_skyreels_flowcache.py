"""FlowCache's SkyReels-V2 executor vs the fork's whole DF runs (e2e_flowcache_{sync,async,long}.npz)."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from models.skyreels_df import DFWindow
from models.skyreels_flowcache import GroupCache, run_window
from tests.test_skyreels_df import REPORT
from tests.test_skyreels_parity import FIXTURE, model  # noqa: F401  (module-scoped fixture)

FILES = sorted(FIXTURE.glob("e2e_flowcache_*.npz"))
FILES = [f for f in FILES if "_kv_" not in f.name]
CASES = [(f, str(r), float(t)) for f in FILES for r, t in zip(np.load(f)["runs"], np.load(f)["thresholds"],
                                                                  strict=True)]
TOL = dict(atol=2e-5, rtol=0)


def vanilla_twin(path):
    """The vanilla file with the same noise (the long case shares the long call; sync/async their short twins)."""
    return np.load(FIXTURE / path.name.replace("e2e_flowcache_", "e2e_vanilla_"))


def fork_windows(f, van, run, cache, step, check_prefix=False):
    """Walk a fork run's windows: the twin's noise with the previous window's tail as prefix, the window's plan and
    overlap flag. ``step(w, x, plan, overlap, addnoise, eps)`` runs one window and returns its final latent."""
    kw = json.loads(str(f["call_kwargs_json"]))
    ar, addnoise = int(kw.get("ar_step", 0)), int(kw.get("addnoise_condition", 0))
    prev, w = None, 0
    while f"{run}_w{w}_final_latents" in f:
        x = van[f"w{w}_noise"].copy()
        key = f"{run}_w{w}_prefix_latents"
        pre = f[key].shape[1] if key in f else 0
        if pre:  # our own previous window's tail
            if check_prefix:
                np.testing.assert_allclose(prev[:, -pre:], f[key], **TOL)
            x[:, :pre] = prev[:, -pre:]
        plan = DFWindow.build(x.shape[1], int(REPORT["V"]["block"]), len(van["sched_timesteps"]), ar, pre)
        # the fork sets its overlap flag only when the cache is on and ar_step > 0 (fixture README, defect 3)
        overlap = bool(pre) and cache.threshold is not None and ar > 0
        prev = step(w, x, plan, overlap, addnoise, van[f"w{w}_addnoise_eps"] if pre else None)
        w += 1
    return w


@pytest.mark.parametrize("path,run,thr", CASES, ids=lambda v: v.stem if hasattr(v, "stem") else str(v))
def test_flowcache_df_run(model, path, run, thr):  # noqa: F811
    cfg, params = model
    f, van = np.load(path), vanilla_twin(path)
    cache = GroupCache(None if np.isnan(thr) else thr)
    recs = []

    def step(w, x, plan, overlap, addnoise, eps):
        np.testing.assert_array_equal(plan.update_mask, f[f"{run}_w{w}_update_mask"])
        ctx_c, ctx_u = jnp.asarray(van["context_cond"][0]), jnp.asarray(van["context_uncond"][0])
        lat, rec = run_window(cfg, params, x, ctx_c, ctx_u, int(van["fps_index"][0]), plan, van["sched_sigmas"],
                              van["sched_timesteps"], float(REPORT["guidance"]), int(REPORT["V"]["block"]), cache,
                              overlap, addnoise, eps)
        np.testing.assert_allclose(lat[-1], f[f"{run}_w{w}_final_latents"], **TOL, err_msg=f"window {w}")
        recs.append(rec)
        return lat[-1]

    assert fork_windows(f, van, run, cache, step, check_prefix=True) >= 1
    for key in ("status", "group_update", "group_cnt_before"):
        np.testing.assert_array_equal(np.concatenate([r[key] for r in recs]), f[f"{run}_{key}"], err_msg=key)
    for key in ("rel_l1", "rescaled", "acc_after"):
        ours, ref = np.concatenate([r[key] for r in recs]), f[f"{run}_{key}"]
        np.testing.assert_array_equal(np.isnan(ours), np.isnan(ref), err_msg=key)
        ok = ~np.isnan(ref)
        np.testing.assert_allclose(ours[ok], ref[ok], rtol=1e-4, atol=1e-7, err_msg=key)
