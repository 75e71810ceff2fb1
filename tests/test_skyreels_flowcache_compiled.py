"""The compiled FlowCache DF executor vs the fork's whole runs: statuses exact, finals within tolerance."""

import jax.numpy as jnp
import numpy as np
import pytest

from models.skyreels_flowcache import GroupCache
from models.skyreels_flowcache_compiled import group_schedule, run_window
from tests.test_skyreels_df import REPORT
from tests.test_skyreels_flowcache import CASES, TOL, fork_windows, vanilla_twin
from tests.test_skyreels_parity import model  # noqa: F401  (module-scoped fixture)


@pytest.mark.parametrize("path,run,thr", CASES, ids=lambda v: v.stem if hasattr(v, "stem") else str(v))
def test_compiled_executor_matches_the_fork(model, path, run, thr):  # noqa: F811
    cfg, params = model
    f, van = np.load(path), vanilla_twin(path)
    cache = GroupCache(None if np.isnan(thr) else thr)
    block, fps = int(REPORT["V"]["block"]), int(van["fps_index"][0])
    statuses = []

    def step(w, x, plan, overlap, addnoise, eps):
        status = group_schedule(cfg, params, plan, van["sched_timesteps"], fps, block, cache, overlap, addnoise)
        lat = np.asarray(run_window(cfg, params, x, jnp.asarray(van["context_cond"][0]),
                                    jnp.asarray(van["context_uncond"][0]), fps, plan, van["sched_sigmas"],
                                    van["sched_timesteps"], float(REPORT["guidance"]), block, status, addnoise, eps))
        np.testing.assert_allclose(lat[-1], f[f"{run}_w{w}_final_latents"], **TOL, err_msg=f"window {w}")
        statuses.append(status.reshape(-1, status.shape[-1]))
        return lat[-1]

    fork_windows(f, van, run, cache, step)
    np.testing.assert_array_equal(np.concatenate(statuses), f[f"{run}_status"])
