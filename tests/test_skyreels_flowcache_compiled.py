"""The compiled FlowCache DF executor vs the fork's whole runs: statuses exact, finals within tolerance."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from models.skyreels_df import DFWindow
from models.skyreels_flowcache import GroupCache
from models.skyreels_flowcache_compiled import group_schedule, run_window
from tests.test_skyreels_df import REPORT
from tests.test_skyreels_flowcache import CASES, TOL, vanilla_twin
from tests.test_skyreels_parity import model  # noqa: F401  (module-scoped fixture)


@pytest.mark.parametrize("path,run,thr", CASES, ids=lambda v: v.stem if hasattr(v, "stem") else str(v))
def test_compiled_executor_matches_the_fork(model, path, run, thr):  # noqa: F811
    cfg, params = model
    f, van = np.load(path), vanilla_twin(path)
    kw = json.loads(str(f["call_kwargs_json"]))
    block = int(REPORT["V"]["block"])
    cache = GroupCache(None if np.isnan(thr) else thr)
    statuses, prev_final, w = [], None, 0
    while f"{run}_w{w}_final_latents" in f:
        x = van[f"w{w}_noise"].copy()
        pre = f[f"{run}_w{w}_prefix_latents"].shape[1] if f"{run}_w{w}_prefix_latents" in f else 0
        if pre:
            x[:, :pre] = prev_final[:, -pre:]
        plan = DFWindow.build(x.shape[1], block, len(van["sched_timesteps"]), int(kw.get("ar_step", 0)), pre)
        overlap = bool(pre) and cache.threshold is not None and int(kw.get("ar_step", 0)) > 0
        fps, addnoise = int(van["fps_index"][0]), int(kw.get("addnoise_condition", 0))
        status = group_schedule(cfg, params, plan, van["sched_timesteps"], fps, block, cache, overlap, addnoise)
        lat = np.asarray(run_window(cfg, params, x, jnp.asarray(van["context_cond"][0]),
                                    jnp.asarray(van["context_uncond"][0]), fps, plan, van["sched_sigmas"],
                                    van["sched_timesteps"], float(REPORT["guidance"]), block, status, addnoise,
                                    van[f"w{w}_addnoise_eps"] if pre else None))
        np.testing.assert_allclose(lat[-1], f[f"{run}_w{w}_final_latents"], **TOL, err_msg=f"window {w}")
        statuses.append(status.reshape(-1, status.shape[-1]))
        prev_final = lat[-1]
        w += 1
    np.testing.assert_array_equal(np.concatenate(statuses), f[f"{run}_status"])
