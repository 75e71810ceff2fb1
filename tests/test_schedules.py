"""Schedule tables: the MAGI window and the diffusion-forcing step matrix, checked by properties."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flowcache_jax.schedules import (
    ScheduleTable,
    df_frame_masks,
    df_schedule,
    df_step_matrix,
    flow_time_grid,
    magi_schedule,
)


def flat(tab: ScheduleTable, name: str) -> np.ndarray:
    a = getattr(tab, name)
    return a.reshape(-1, *a.shape[2:])[tab.step_valid.reshape(-1)]


def check_table(tab: ScheduleTable) -> None:
    """Invariants every table must satisfy."""
    chunk, k, active = flat(tab, "chunk"), flat(tab, "k"), flat(tab, "active")
    n, steps = tab.n_chunks, tab.steps_per_chunk
    assert (tab.active[~tab.step_valid] == 0).all()
    for c in range(n):
        where = np.argwhere((chunk == c) & active)
        g = where[:, 0]
        # exactly its number of updates, in order, at consecutive global steps
        assert len(g) == steps
        assert (np.diff(g) == 1).all()
        assert (k[where[:, 0], where[:, 1]] == np.arange(steps)).all()
        assert (flat(tab, "first")[where[:, 0], where[:, 1]] == (np.arange(steps) == 0)).all()
        assert (flat(tab, "last")[where[:, 0], where[:, 1]] == (np.arange(steps) == steps - 1)).all()
        t = flat(tab, "t")[where[:, 0], where[:, 1]]
        dt = flat(tab, "dt")[where[:, 0], where[:, 1]]
        np.testing.assert_array_equal(t, tab.grid[:-1])
        np.testing.assert_allclose(t + dt, tab.grid[1:], rtol=1e-6)
        # entering / finishing stage of the chunk's ring slot
        s_first, s_last = g[0] // tab.steps_per_stage, g[-1] // tab.steps_per_stage
        assert tab.enter[s_first, c % tab.window] == c and tab.finish[s_last, c % tab.window] == c
    for row_c, row_a in zip(chunk, active, strict=True):
        ids = row_c[row_a]
        # positions filled from 0 without gaps, oldest first, the window is a contiguous id range
        assert row_a[: len(ids)].all() and not row_a[len(ids):].any()
        assert (np.diff(ids) == 1).all()
        # two active chunks never share a ring slot
        assert len(set(ids % tab.window)) == len(ids)
    assert (tab.enter >= 0).sum() == n and (tab.finish >= 0).sum() == n
    assert flat(tab, "global_first")[0] and flat(tab, "global_last")[-1]
    assert flat(tab, "global_first").sum() == 1 and flat(tab, "global_last").sum() == 1


def test_time_grid_magi_landmarks():
    t = flow_time_grid(64, power=2.0, shift=3.0)
    assert t[0] == 0.0 and abs(t[64] - 1.0) < 1e-6
    np.testing.assert_allclose(t[[16, 32, 48]], [0.0217391, 0.1, 0.3], rtol=1e-5)
    np.testing.assert_allclose(t[[1, 8, 63]], [8.14e-5, 0.00526, 0.91241], rtol=2e-3)
    assert (np.diff(t) > 0).all()


def test_magi_reference_run():
    """The FlowCache MAGI-1 preset: 10 chunks, window 4, 64 steps -> 13 stages, 208 forwards."""
    tab = magi_schedule(10, 4, 64)
    check_table(tab)
    assert tab.num_stages == 13 and tab.steps_per_stage == 16 and tab.num_steps == 208
    sizes = tab.active[:, 0].sum(-1)
    assert sizes.tolist() == [1, 2, 3, 4, 4, 4, 4, 4, 4, 4, 3, 2, 1]
    # stage 5, step d: window chunks 2..5 at grid indices 48+d, 32+d, 16+d, d (oldest first)
    d = 7
    assert tab.chunk[5, d].tolist() == [2, 3, 4, 5]
    assert tab.k[5, d].tolist() == [48 + d, 32 + d, 16 + d, d]


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 9), window=st.integers(1, 5), per_stage=st.integers(1, 6))
def test_magi_properties(n, window, per_stage):
    tab = magi_schedule(n, window, window * per_stage)
    check_table(tab)
    assert tab.num_steps == (n + window - 1) * per_stage
    for s in range(tab.num_stages):  # chunk c enters at stage c
        assert tab.enter[s][tab.enter[s] >= 0].tolist() == ([s] if s < n else [])


def test_df_reference_rows():
    """SkyReels segment: 5 blocks, 50 steps, ar_step 5 -> 70 rows; block b updated on rows 5b+1..5b+50."""
    idx, upd = df_step_matrix(5, 50, 5)
    assert len(idx) == 70
    for r in (1, 6, 21, 50, 51, 70):
        np.testing.assert_array_equal(idx[r - 1], np.clip(r - 5 * np.arange(5), 0, 51))
    for b in range(5):
        assert np.flatnonzero(upd[:, b]).tolist() == list(range(5 * b, 5 * b + 50))
    idx2, upd2 = df_step_matrix(5, 50, 5, prefix_blocks=1)
    assert len(idx2) == 65 and not upd2[:, 0].any() and (idx2[:, 0] == 51).all()
    fidx, fupd = df_frame_masks(25, 5, 50, 5)
    assert fidx.shape == (70, 25) and (fupd[:, :5] == upd[:, :1]).all()


@settings(max_examples=40, deadline=None)
@given(nb=st.integers(1, 8), steps=st.integers(1, 20), ar=st.integers(0, 6), p=st.integers(0, 3))
def test_df_closed_form(nb, steps, ar, p):
    """Spec closed form (valid while ar_step <= steps; beyond, the next block starts when one finishes)."""
    p = min(p, nb - 1)
    idx, upd = df_step_matrix(nb, steps, ar, p)
    ar = min(ar, steps)
    r = np.arange(1, len(idx) + 1)[:, None]
    expect = np.clip(r - (np.arange(nb) - p) * ar, 0, steps + 1)
    expect[:, :p] = steps + 1
    np.testing.assert_array_equal(idx, expect)
    assert len(idx) == steps + (nb - p - 1) * ar
    assert (upd.sum(0)[p:] == steps).all()


@settings(max_examples=30, deadline=None)
@given(nb=st.integers(1, 8), steps=st.integers(1, 16), ar=st.integers(0, 6))
def test_df_table_properties(nb, steps, ar):
    check_table(df_schedule(nb, steps, ar))


@pytest.mark.parametrize("n,window,per_stage", [(6, 4, 3), (3, 4, 2), (5, 1, 4)])
def test_df_equals_magi_when_ar_step_is_stage(n, window, per_stage):
    """MAGI's window is diffusion forcing with ar_step = steps per stage: both builders agree."""
    grid = flow_time_grid(window * per_stage)
    a, b = magi_schedule(n, window, window * per_stage, grid), df_schedule(n, window * per_stage, per_stage, grid)
    for name in ("chunk", "k", "t", "dt", "active", "first", "last", "enter", "finish", "step_valid"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


def test_schedule_errors():
    with pytest.raises(ValueError, match="multiple of window"):
        magi_schedule(4, 4, 30)
    with pytest.raises(ValueError, match="time grid"):
        magi_schedule(4, 4, 32, grid=np.zeros(10))
    with pytest.raises(ValueError, match="invalid DF"):
        df_step_matrix(3, 10, -1)


def test_magi_shortcut_grid():
    """12 steps: the 16-step grid without indices 1, 5, 9, 13 ("8,16,16"), or 3, 7, 11, 15 ("16,16,8")."""
    from flowcache_jax.schedules import magi_time_grid

    g16 = magi_time_grid(16)
    np.testing.assert_array_equal(magi_time_grid(12), np.delete(g16, [1, 5, 9, 13]))
    np.testing.assert_array_equal(magi_time_grid(12, "16,16,8"), np.delete(g16, [3, 7, 11, 15]))
    tab = magi_schedule(3, 4, 12, magi_time_grid(12))
    check_table(tab)
    assert float(tab.grid[9]) > 0.3  # the last stage is nearly clean, as in the fp32 reference


def test_linspace_rounding_matches_reference():
    """Points of the upper half are counted down from 1 (torch's linspace), 1 ulp off k/N for some N."""
    from flowcache_jax.schedules import _linspace01_f32

    for n in (16, 24, 48, 64):
        u = _linspace01_f32(n)
        assert u[0] == 0 and u[-1] == 1 and np.abs(u - np.arange(n + 1) / n).max() < 1e-7
