"""Calibration to a target (issue 15, part 2): the search, the fits, and calibrate.py -> run.py --flagfile."""

import json
import types

import numpy as np
import pytest

from experiments.calibration import fit_polynomial, flag_lines, search
from experiments.errors import ConfigError
from tests.test_cli import cli

SMALL = ["--config.schedule.n_chunks=4", "--config.schedule.steps_per_chunk=16", "--config.schedule.window=2",
         "--config.synthetic.work=1", "--config.synthetic.hidden=16", "--config.synthetic.height=4",
         "--config.synthetic.width=4", "--config.policy.warmup=2"]


def staircase(t: float) -> dict:
    """A discrete decision count: speedup rises and PSNR falls in steps with the threshold."""
    forwards = max(10, 100 - int(400 * t))
    return {"threshold": t, "speedup": 100 / forwards, "psnr": 60.0 - 80.0 * t}


def test_search_reaches_a_speedup_and_keeps_a_psnr():
    p = search(staircase, 2.5, "speedup", 0.001, 20)
    assert abs(p["speedup"] / 2.5 - 1) <= 0.01
    q = search(staircase, 40.0, "psnr", 0.001, 20)
    assert q["psnr"] >= 40.0 and q["threshold"] > 0.24  # the largest threshold that keeps it (0.25 exactly)
    with pytest.raises(ConfigError, match="not reached"):
        search(staircase, 50.0, "speedup", 0.001, 5)  # the staircase saturates at 10x
    with pytest.raises(ConfigError, match="threshold 0"):
        search(staircase, 70.0, "psnr", 0.001, 5)


def test_polynomial_fit_recovers_the_map_from_input_to_output_change():
    rng = np.random.default_rng(0)
    runs = []
    for _ in range(2):
        x = rng.uniform(0.0, 0.2, (30, 3))
        x[0] = np.nan  # no previous features on the first step
        runs.append(types.SimpleNamespace(rel=x, cache_rel=0.5 * x + 2.0 * x**2))
    coeffs, info = fit_polynomial(runs, 2)
    np.testing.assert_allclose(coeffs, [2.0, 0.5, 0.0], atol=1e-8)
    assert info["points"] == 2 * 29 * 3 and info["r2"] > 0.999
    with pytest.raises(ConfigError, match="too few"):
        fit_polynomial([types.SimpleNamespace(rel=x[:2], cache_rel=x[:2])], 4)


def test_flag_lines_keep_the_users_overrides_and_replace_the_calibrated_ones():
    argv = ["calibrate.py", "--config=/x/tiny_fast.py", "--config.video.num_chunks=4", "--config.policy.threshold=9",
            "--target_speedup=2"]
    pol = types.SimpleNamespace(threshold=0.125)
    lines = flag_lines("tiny_fast", argv, pol, {"coeffs": (1.0, 0.5)})
    assert lines == ["--config=tiny_fast", "--config.video.num_chunks=4", "--config.policy.threshold=0.125",
                     "--config.policy.coeffs=(1.0, 0.5)"]


def test_calibrate_hits_the_target_on_heldout_seeds_and_run_reads_its_flag_file(tmp_path):
    out = tmp_path / "cal.json"
    p = cli("calibrate.py", "--config=synthetic_fast", *SMALL, "--target_speedup=2.0", f"--output_dir={tmp_path}",
            f"--output_json={out}", "--calib_seeds=2", "--heldout_seeds=2", "--noprogress")
    assert p.returncode == 0, p.stderr
    r = json.loads(out.read_text())
    assert r["target_speedup"] == 2.0 and r["threshold"] > 0
    assert abs(r["heldout_speedup"] / 2.0 - 1) <= 0.10, r
    assert r["compiles"] == 1 and r["evaluations"] >= 3  # every threshold ran on one compiled stage function
    flags = tmp_path / "calibrated.flags"
    assert "--config.schedule.n_chunks=4" in flags.read_text().splitlines()
    q = cli("run.py", f"--flagfile={flags}", f"--output_dir={tmp_path / 'run'}", "--nocompare_to_vanilla",
            "--noprogress")
    assert q.returncode == 0, q.stderr
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["threshold"] == pytest.approx(r["threshold"]) and res["num_chunks"] == 4
    bad = cli("run.py", f"--flagfile={tmp_path / 'missing.flags'}")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        f"error: --flagfile {tmp_path / 'missing.flags'} does not exist (write it with experiments/calibrate.py "
        "--output_flags=...)"]
