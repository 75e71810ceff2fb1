"""The host policies' rules on constructed tables: upstream's TeaCache step count, frozen cut-off, per-branch records;
FlowCache's per-block rule; one compiled sampler for any threshold."""

import numpy as np

from flowcache_jax.policies.group_flowcache import GroupFlowCache
from flowcache_jax.policies.window_teacache import WindowTeaCache
from flowcache_jax.schedules import df_frame_masks, df_window_table, skyreels_sigmas


def table(frames: int, block: int, steps: int, ar: int, prefix: int = 0):
    sig, ts = skyreels_sigmas(steps)
    idx, upd = df_frame_masks(frames, block, steps, ar, prefix)
    return df_window_table(idx, upd, block, ts, sig, prefix)


def features(tab, seed: int = 0) -> dict:
    """e0 that changes a little at every step (the rule's only input)."""
    rng = np.random.default_rng(seed)
    s, p, w = tab.t.shape
    base = rng.normal(size=(1, 1, w, 1, 6, 4))
    drift = np.cumsum(rng.normal(scale=0.01, size=(s, p, w, 1, 6, 4)), axis=1)
    e0 = np.broadcast_to(base + drift, (s, p, w, 2, 6, 4)).copy()
    return {"e0": e0, "e": e0[..., 0, :]}


def test_upstream_step_count_differs_from_the_iterations_when_ar_step_exceeds_steps():
    tab = table(frames=6, block=2, steps=4, ar=6)  # 3 blocks; a block starts after its predecessor ends
    tc = WindowTeaCache(0.1, counter="reference", ar_step=6)
    assert int(tab.step_valid.sum()) == 4 + 2 * 4  # iterations: ar_step is capped at the step count
    assert tc.reference_steps(tab) == 4 + 2 * 6  # upstream's formula is not
    assert WindowTeaCache(0.1, counter="reference").reference_steps(tab) == 4  # ar_step 0: the steps alone


def test_cutoff_is_frozen_and_records_follow_the_branch():
    first, second = table(8, 2, 5, 2), table(6, 2, 5, 2, prefix=2)
    tc = WindowTeaCache(1e9, counter="reference", ar_step=2, use_ret_steps=False)  # never reuse unless forced
    _, rec1, state = tc.plan(first, features(first), 2)
    n0 = tc.reference_steps(first)
    assert state["cutoff"] == 2 * n0 - 2
    _, rec2, state2 = tc.plan(second, features(second, 1), 2, state)
    assert state2["cutoff"] == state["cutoff"]  # the second window keeps the first window's cut-off
    n1 = tc.reference_steps(second)
    assert n1 < n0 and n1 % 2 == 1  # an odd reset value: the counter's parity leaves the branches
    cnt = rec2["cnt_before"]
    flipped = np.flatnonzero((cnt % 2) != (np.arange(len(cnt)) % 2))
    assert len(flipped)  # the slot used differs from the branch there, and the record is the branch's slot
    assert np.isfinite(rec2["acc_after"]).all()


def test_group_rule_reuses_more_with_a_higher_threshold():
    tab = table(8, 2, 10, 2)
    feats = features(tab)
    runs = [GroupFlowCache(t, warmup=2, coeffs=(1.0, 0.0)).plan(tab, feats, 2)[0]["compute"] for t in (0.0, 0.05, 1.0)]
    active = tab.active[:, :, None, :]
    computed = [int((c & active).sum()) for c in runs]
    assert computed[0] == 2 * int(active.sum())  # threshold 0: every update computes, in both branches
    assert computed[0] >= computed[1] >= computed[2] and computed[0] > computed[2]
    for c in runs:  # both CFG branches decide alike
        np.testing.assert_array_equal(c[:, :, 0], c[:, :, 1])
