"""SkyReels-V2 from the command line: the FLOPs model, and a clear message where runs are not wired yet."""

import json

from tests.test_cli import cli


def test_flops_reproduce_the_paper(tmp_path):
    out = tmp_path / "flops.json"
    p = cli("flops.py", "--config=skyreels_vanilla", f"--output_json={out}")
    assert p.returncode == 0, p.stderr
    r = json.loads(out.read_text())
    assert abs(r["total_pflops"] / 113.0 - 1) < 0.05
    assert r["forwards"] == 270 and r["iterations_per_window"] == [70, 65]  # spec §4.7
    assert r["total_pflops_full"] > 1.4 * r["total_pflops"]  # full attention: 165 PF


def test_run_says_what_is_missing():
    p = cli("run.py", "--config=skyreels_fast")
    assert p.returncode == 2 and "Traceback" not in p.stderr and "not wired into run.py" in p.stderr
