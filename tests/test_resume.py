"""Resumable runs: a run continued from a saved point (in another sampler, or another process after a real kill)
gives bit-identical latents and records to the uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np

from experiments import common
from experiments.configs import tiny_vanilla
from flowcache_jax import resume
from tests.test_cli import ROOT


def _cfg(chunks: int = 3):
    c = tiny_vanilla.get_config()
    c.video.num_chunks = chunks
    return c


def test_resume_point_continues_bit_identically(tmp_path):
    full, _ = common.build(_cfg()).sample(progress=False)
    points = []
    run = common.build(_cfg())
    run.sample(progress=False, checkpoint_every=2, on_checkpoint=points.append)
    assert [p.stage for p in points] == list(range(2, run.table.num_stages, 2))
    print_ = resume.fingerprint(run.cfg.to_dict(), run.table)
    resume.save(tmp_path / "resume", points[0], print_)
    fresh = common.build(_cfg())  # another sampler: a new compilation, the point read back from disk
    point = resume.load(tmp_path / "resume", fresh.sampler.init_state(fresh.params, fresh.cond), print_)
    assert point.stage == points[0].stage
    res, _ = fresh.sample(progress=False, resume=point)
    np.testing.assert_array_equal(res.video, full.video)
    np.testing.assert_array_equal(res.decisions, full.decisions)
    assert res.computed == full.computed
    other = resume.fingerprint(_cfg(4).to_dict(), common.build(_cfg(4)).table)
    try:
        resume.load(tmp_path / "resume", fresh.sampler.init_state(fresh.params, fresh.cond), other)
    except ValueError as e:
        assert "another run" in str(e)
    else:
        raise AssertionError("a point of another run was accepted")


def test_run_killed_mid_way_resumes_to_the_same_latents(tmp_path):
    """A real SIGKILL while the run is saving its points, then the same command: 'resumed at stage K of N' and the
    latents of an uninterrupted run, byte for byte."""
    args = ["--config=tiny_vanilla", "--config.video.num_chunks=12", "--nocompare_to_vanilla", "--noprogress"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    run = [sys.executable, str(ROOT / "experiments" / "run.py"), *args]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([*run, f"--output_dir={killed}", "--checkpoint_every=1"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    point = killed / "resume" / "model_config.json"
    deadline = time.time() + 240
    while not point.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert point.exists() and proc.poll() is None, "the run ended before its first resume point"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (killed / "latents.npz").exists()
    again = subprocess.run([*run, f"--output_dir={killed}", "--checkpoint_every=1"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    line = [ln for ln in again.stdout.splitlines() if ln.startswith("resumed at stage")]
    assert line and 0 < int(line[0].split()[3]) < int(line[0].split()[5]), again.stdout
    c = _cfg(12)  # the uninterrupted run of the same config (here, in this process)
    ref, _ = common.build(c).sample(progress=False)
    with np.load(killed / "latents.npz") as a:
        np.testing.assert_array_equal(a["latents"], ref.video)
        np.testing.assert_array_equal(a["decisions"], ref.decisions)
    assert not (killed / "resume").exists()  # a finished run removes its point
