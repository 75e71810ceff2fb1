"""The command lines, run as a user runs them (subprocesses), on tiny overrides."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

TINY = ["--config.schedule.n_chunks=3", "--config.schedule.steps_per_chunk=8", "--config.schedule.window=2",
        "--config.synthetic.work=1", "--config.synthetic.hidden=16", "--config.synthetic.height=4",
        "--config.synthetic.width=4", "--config.policy.warmup=2"]


def cli(script, *args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, str(ROOT / "experiments" / script), *args], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=300)


def test_run_writes_results(tmp_path):
    p = cli("run.py", "--config=synthetic_fast", *TINY, f"--output_dir={tmp_path}", "--noprogress")
    assert p.returncode == 0, p.stderr
    r = json.loads((tmp_path / "results.json").read_text())
    for k in ("config_name", "policy", "num_chunks", "chunk_forwards_vanilla", "chunk_forwards_computed",
              "computed_fraction", "wall_s", "decisions"):
        assert k in r
    assert set(r["wall_s"]) == {"load", "compile", "denoise"}
    assert r["config_name"] == "synthetic_fast" and r["num_chunks"] == 3
    assert len(r["decisions"]) == (3 + 2 - 1) * 4 and len(r["decisions"][0]) == 2
    assert sum(v == 1 for row in r["decisions"] for v in row) == r["chunk_forwards_computed"]
    assert r["chunk_forwards_vanilla"] == 3 * 8
    for name in ("video_frames.png", "video.mp4", "latents.npz"):
        assert (tmp_path / name).stat().st_size > 0
    assert "computed_fraction" in p.stdout


@pytest.mark.parametrize("override,needle", [
    ("--config.policy.threshold=-0.5", "threshold"),
    ("--config.policy.warmup=99", "warmup"),
    ("--config.policy.name=magic", "unknown policy"),
    ("--config.schedule.window=3", "multiple of"),
])
def test_bad_values_exit_with_one_line(tmp_path, override, needle):
    p = cli("run.py", "--config=synthetic_fast", override, f"--output_dir={tmp_path}")
    assert p.returncode == 2
    assert "Traceback" not in p.stderr and needle in p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("error:")
    assert not any(tmp_path.iterdir())  # nothing written


def test_unknown_config_name():
    p = cli("run.py", "--config=not_a_config")
    assert p.returncode == 2 and "unknown config" in p.stderr and "Traceback" not in p.stderr


def test_benchmark_side_by_side(tmp_path):
    p = cli("benchmark.py", "--config=synthetic_fast", *TINY, "--repeats=1", f"--output_dir={tmp_path}")
    assert p.returncode == 0, p.stderr
    b = json.loads((tmp_path / "benchmark.json").read_text())
    assert b["speedup_ideal"] == b["chunk_forwards"]["vanilla"] / b["chunk_forwards"]["synthetic_fast"]
    assert b["speedup_wall"] > 0
    assert b["compiles"]["per_run"] == [1, 1] and b["compiles"]["one_sampler_all_lengths"] == 1
