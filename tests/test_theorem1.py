"""Theorem-1 study: the monotonicity helper on hand-made sequences, and the quick CLI end to end."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from experiments import theorem1_stats as stats
from experiments import theorem1_thresholds as thresholds

ROOT = Path(__file__).resolve().parents[1]
VERDICTS = {"holds", "mostly", "breaks"}


def test_verdict_thresholds():
    assert stats.verdict(1.0) == "holds"
    assert stats.verdict(0.95) == "mostly"
    assert stats.verdict(0.9) == "mostly"
    assert stats.verdict(0.89) == "breaks"


def test_monotonicity_on_hand_made_sequences():
    t = np.linspace(0.0, 1.0, 11)
    up = stats.monotonicity(np.arange(11.0), t)
    assert up["nondecreasing_fraction"] == 1.0 and up["verdict"] == "holds"
    assert up["spearman"] == pytest.approx(1.0) and len(up["breaks_at_t"]) == 0 and up["breaks_t_range"] is None

    one_dip = np.arange(11.0)
    one_dip[4] = 2.5  # 3 -> 2.5 is the only decrease, in 10 pairs
    r = stats.monotonicity(one_dip, t)
    assert r["nondecreasing_fraction"] == pytest.approx(0.9) and r["verdict"] == "mostly"
    assert r["breaks_at_t"].tolist() == [t[4]] and r["breaks_t_range"] == [t[4], t[4]]

    down = stats.monotonicity(np.array([3.0, 2.0, 1.0]), t[:3])
    assert down["nondecreasing_fraction"] == 0.0 and down["verdict"] == "breaks"
    assert down["spearman"] == pytest.approx(-1.0)

    flat = stats.monotonicity(np.array([1.0, 1.0 - 1e-9, 1.0]), t[:3])  # within the relative tolerance
    assert flat["verdict"] == "holds"
    assert stats.monotonicity(np.array([1.0, 0.999]), t[:2])["verdict"] == "breaks"


def test_monotonicity_rejects_bad_input():
    with pytest.raises(ValueError):
        stats.monotonicity(np.array([1.0]), np.array([0.0]))
    with pytest.raises(ValueError):
        stats.monotonicity(np.array([1.0, np.nan]), np.array([0.0, 1.0]))


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("theorem1")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "theorem1.py"), "--quick", f"--output_dir={out}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads((out / "theorem1.json").read_text())


def test_quick_outputs(quick_run):
    out, res = quick_run
    factors = {r["factor"] for r in res["regimes"]}
    assert factors == set(stats.QUICK_SWEEP)
    for r in res["regimes"]:
        assert isinstance(r["assumption_data_gt_noise"], bool)
        for name in stats.QUANTITIES:
            q = r["quantities"][name]
            assert q["verdict"] in VERDICTS and q["chunk0"]["verdict"] in VERDICTS
            assert len(q["values"]) == r["settings"]["steps_per_chunk"] - 1  # first step of the chunk excluded
    for name in [*(f"fig2_{f}.png" for f in factors), "metric_ar.png", "error_vs_threshold.png"]:
        assert (out / name).stat().st_size > 0, name
    assert res["summary"]


def rows_of(res, regime, policy):
    return sorted((e for e in res["error_vs_threshold"] if e["regime"] == regime and e["policy"] == policy),
                  key=lambda e: e["threshold"])


def test_threshold_zero_is_exact_and_error_grows(quick_run):
    _, res = quick_run
    for regime in thresholds.AR_REGIMES:
        for policy in thresholds.POLICIES:
            rows = rows_of(res, regime, policy)
            assert [e["threshold"] for e in rows] == thresholds.QUICK_THRESHOLDS
            assert rows[0]["computed_fraction"] == 1.0 and rows[0]["rel_l2"] == 0.0
    fc = rows_of(res, "base", "flowcache")
    assert all(a["computed_fraction"] > b["computed_fraction"] for a, b in zip(fc, fc[1:], strict=False))
    assert all(a["rel_l2"] < b["rel_l2"] for a, b in zip(fc, fc[1:], strict=False))


def test_guard_error_falls_with_the_threshold_and_caps_runs(quick_run):
    """Unguarded, the steep grid's error jumps to the all-reused value and stays (one cache held from the warm-up
    to the end); the guard's error falls with the threshold in every regime, its runs capped by min_charge."""
    _, res = quick_run
    for regime in thresholds.AR_REGIMES:
        guard = rows_of(res, regime, thresholds.GUARD)
        m = guard[0]["min_charge"]
        assert m > 0 and all(e["min_charge"] == m for e in guard)
        assert all(a["rel_l2"] < b["rel_l2"] for a, b in zip(guard[1:], guard[2:], strict=False))
        assert all(e["longest_reuse"] <= math.ceil(e["threshold"] / m) for e in guard)
        assert f"{regime}/guard_cost" in res["summary"] and f"{regime}/flowcache+guard_thresholds" in res["summary"]
    steep = rows_of(res, "power=3", "flowcache")
    assert steep[-1]["rel_l2"] == steep[-2]["rel_l2"] > 0.5  # saturated: thresholds 0.03 and 0.12 alike
    assert rows_of(res, "power=3", thresholds.GUARD)[-2]["rel_l2"] < 0.1 * steep[-2]["rel_l2"]
    assert res["threshold_study_samplers"] == 3  # exact, TeaCache, FlowCache (+ guard): thresholds are knobs


def test_direction_depends_on_the_schedule_and_the_assumption(quick_run):
    """L1_rel rises along denoising at the base schedule (the theorem's direction in our convention), but
    with data much larger than noise the straight-line rate |x1 - eps| / |x_t| falls: the proof's assumption
    pushes the constant-dt form the other way, so the rise comes from the growing dt."""
    _, res = quick_run
    base = next(r for r in res["regimes"] if r["settings"] == {**r["settings"], **stats.BASE})
    assert base["quantities"]["l1_rel"]["spearman"] > 0.9
    big = next(r for r in res["regimes"] if r["factor"] == "data_scale" and r["value"] == 4.0)
    assert big["assumption_data_gt_noise"]
    assert big["quantities"]["l1_conditional_rate"]["spearman"] < 0
    assert big["quantities"]["l1_rel"]["spearman"] > 0
