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


def test_compare_pytorch(tmp_path):
    """Agreement with diffusers when torch and diffusers are installed; otherwise a one-line error saying so."""
    import importlib.util

    have = all(importlib.util.find_spec(m) for m in ("torch", "diffusers"))
    out = tmp_path / "cmp.json"
    p = cli("compare_pytorch.py", "--num_layers=1", "--frames=2", "--latent_height=8", "--latent_width=8",
            "--repeats=1", f"--output_json={out}")
    if have:
        assert p.returncode == 0, p.stderr
        r = json.loads(out.read_text())
        assert r["max_rel_diff"] < 1e-4 and r["speedup_vs_pytorch"] > 0
    else:
        assert p.returncode == 2 and "pip install torch diffusers" in p.stderr and "Traceback" not in p.stderr
