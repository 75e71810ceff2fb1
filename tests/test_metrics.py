"""Metrics, FLOP counting and atomic outputs."""

import math

import numpy as np
import pytest

from flowcache_jax import flops, io, metrics
from flowcache_jax.synthetic import SyntheticFlow


def test_rel_l1():
    assert metrics.rel_l1(np.array([2.0, 2.0]), np.array([1.0, 1.0]), eps=0.0) == 1.0


def test_psnr_matches_definition():
    rng = np.random.default_rng(0)
    ref = rng.uniform(-2, 3, (2, 3, 8, 8, 4)).astype(np.float32)
    x = ref + rng.normal(0, 0.05, ref.shape).astype(np.float32)
    peak = ref.max() - ref.min()
    expect = 10 * math.log10(peak**2 / np.mean((x.astype(np.float64) - ref) ** 2))
    assert metrics.psnr(x, ref) == pytest.approx(expect, abs=1e-3)
    assert metrics.psnr(ref, ref) == float("inf")


def test_ssim_bounds():
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(4, 8, 8, 3)).astype(np.float32)
    assert metrics.ssim(ref, ref) == pytest.approx(1.0, abs=1e-5)
    noisy = metrics.ssim(ref + rng.normal(0, 1.0, ref.shape).astype(np.float32), ref)
    assert 0 < noisy < 0.9


def test_compiled_flops_track_work():
    """XLA's count follows the analytic model and grows with the work knob (the skipped cost is real)."""
    counts = []
    for work in (2, 6):
        flow = SyntheticFlow(frames=1, height=4, width=4, channels=4, hidden=64, work=work)
        c = flops.chunk_forward_flops(flow, flow.init_params(), None, batch=2, window=2)
        a = flow.forward_flops(2)
        assert 0.5 < c / a < 2.0, (c, a)
        counts.append(c)
    per_layer = 2 * 2 * 2 * 16 * 64 * 64
    assert counts[1] - counts[0] == pytest.approx(4 * per_layer, rel=0.05)


def test_flops_report():
    r = flops.flops_report(10.0, computed=5, vanilla=20)
    assert r["computed"] == 50.0 and r["vanilla"] == 200.0 and r["ideal_speedup"] == 4.0


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out" / "results.json"
    with pytest.raises(RuntimeError), io.atomic_path(target) as tmp, open(tmp, "w") as f:
        f.write("partial")
        raise RuntimeError("boom")
    assert not target.exists() and list(target.parent.iterdir()) == []
    io.write_json(target, {"a": np.float32(1.5), "b": np.arange(3), "c": float("nan")})
    assert target.read_text().count("1.5") == 1 and list(target.parent.iterdir()) == [target]
