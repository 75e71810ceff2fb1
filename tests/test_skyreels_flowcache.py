"""FlowCache on SkyReels-V2 (the per-block rule on e0, the groups executor) through the one sampler vs the fork's
whole DF runs (e2e_flowcache_{sync,async,long}.npz): every call's group statuses, counters and rule records,
and the final latents of every window."""

import numpy as np
import pytest

from flowcache_jax.policies import Vanilla
from flowcache_jax.policies.group_flowcache import GroupFlowCache
from flowcache_jax.schedules import df_frame_masks
from tests.skyreels_runs import call_kwargs, fixture_windows, run_fixture, windowed
from tests.test_skyreels_parity import FIXTURE, model  # noqa: F401  (module-scoped fixture)

FILES = sorted(FIXTURE.glob("e2e_flowcache_*.npz"))
FILES = [f for f in FILES if "_kv_" not in f.name]
CASES = [(f, str(r), float(t)) for f in FILES for r, t in zip(np.load(f)["runs"], np.load(f)["thresholds"],
                                                                  strict=True)]
TOL = dict(atol=2e-5, rtol=0)


def vanilla_twin(path):
    """The vanilla file with the same noise (the long case shares the long call; sync/async their short twins)."""
    return np.load(FIXTURE / path.name.replace("e2e_flowcache_", "e2e_vanilla_"))


def policy_of(thr: float):
    """No threshold: the fork's restructured forward alone (the groups executor without reuse)."""
    return Vanilla() if np.isnan(thr) else GroupFlowCache(thr)


def prefix_refresh(f, thr: float) -> str:
    # the fork sets its overlap flag only when the cache is on and ar_step > 0 (fixture README, defect 3)
    return "first" if not np.isnan(thr) and call_kwargs(f)[1] > 0 else "every"


def statuses(res, table_active: np.ndarray) -> np.ndarray:
    """The fork's per-call group status from the sampler's decisions: 0 not run, 1 computed update, 2 reused,
    3 computed without update (the long-video prefix)."""
    dec = res.decisions
    return np.where(dec < 0, 0, np.where(dec == 0, 2, np.where(table_active, 1, 3))).astype(np.int8)


@pytest.mark.parametrize("path,run,thr", CASES, ids=lambda v: v.stem if hasattr(v, "stem") else str(v))
def test_flowcache_df_run(model, path, run, thr):  # noqa: F811
    f, van = np.load(path), vanilla_twin(path)
    refresh = prefix_refresh(f, thr)
    res, finals = run_fixture(model, van, policy_of(thr), "groups", f, run, prefix_refresh=refresh)
    block, ar, _ = call_kwargs(van)
    ws, _ = windowed(model, van, policy_of(thr), "groups", refresh)
    tables = ws.tables(fixture_windows(van, f, run)[0])
    active = []
    for w, (final, table) in enumerate(zip(finals, tables, strict=True)):
        pre = f[f"{run}_w{w}_prefix_latents"].shape[1] if f"{run}_w{w}_prefix_latents" in f else 0
        _, upd = df_frame_masks(final.shape[1], block, len(van["sched_timesteps"]), ar, pre)
        np.testing.assert_array_equal(upd, f[f"{run}_w{w}_update_mask"])
        if pre:  # our own previous window's tail
            np.testing.assert_allclose(finals[w - 1][:, -pre:], f[f"{run}_w{w}_prefix_latents"], **TOL)
        np.testing.assert_allclose(final, f[f"{run}_w{w}_final_latents"], **TOL, err_msg=f"window {w}")
        act = table.active.reshape(-1, table.window)[table.step_valid.reshape(-1)]
        active.append(np.repeat(act, 2, 0))  # one row per call: prompt, negative prompt
    width = max(a.shape[1] for a in active)
    active = np.concatenate([np.pad(a, ((0, 0), (0, width - a.shape[1]))) for a in active])
    np.testing.assert_array_equal(statuses(res, active), f[f"{run}_status"])
    np.testing.assert_array_equal(active, f[f"{run}_group_update"])
    assert res.computed + res.cache_skipped + res.structure_skipped == res.chunk_forwards_vanilla
    assert res.cache_skipped == int((f[f"{run}_status"] == 2).sum())
    if np.isnan(thr):
        return
    rec = res.plan_records
    for key in ("status", "group_update", "group_cnt_before"):
        np.testing.assert_array_equal(rec[key], f[f"{run}_{key}"], err_msg=key)
    for key in ("rel_l1", "rescaled", "acc_after"):
        ours, ref = rec[key], f[f"{run}_{key}"]
        np.testing.assert_array_equal(np.isnan(ours), np.isnan(ref), err_msg=key)
        ok = ~np.isnan(ref)
        np.testing.assert_allclose(ours[ok], ref[ok], rtol=1e-4, atol=1e-7, err_msg=key)



def test_one_compilation_for_any_threshold(model):  # noqa: F811
    """Thresholds are data (the host rule's decision table): a sweep runs on one compiled function."""
    import jax

    van = np.load(FIXTURE / "e2e_vanilla_async.npz")
    plan, noise, _ = fixture_windows(van)
    ws, cond = windowed(model, van, GroupFlowCache(0.1), "groups")
    computed = []
    for thr in (0.05, 0.15, 0.5):
        res = ws.run(model[1], cond, plan, jax.random.PRNGKey(0), progress=False, noise=noise,
                     policy=GroupFlowCache(thr))
        computed.append(res.computed)
    assert ws.traces == 1
    assert computed[0] > computed[-1]
