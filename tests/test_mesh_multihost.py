"""The mesh across processes: 2 CPU processes on localhost (``jax.distributed``, gloo collectives), 4 devices each,
one global 8-device mesh, give the single-process decisions and outputs (``tests/mesh_worker.py``)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from tests.mesh_worker import run_magi

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8, reason=f"the mesh tests need 8 devices, found {jax.device_count()}: run them with "
    "XLA_FLAGS=--xla_force_host_platform_device_count=8 (tests/conftest.py sets it unless XLA_FLAGS is set)")

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "mesh_worker.py"
# (data, fsdp, seq): parameters split across the two processes, K/V rows within each; then K/V rows across them
MESHES = {"1x2x4": (1, 2, 4), "1x1x8": (1, 1, 8)}
TIMEOUT = 240  # seconds for the whole job (about 50 s on 2 cores)
TOL = dict(rtol=1e-5, atol=1e-5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(out: Path, processes: int = 2, devices: int = 4) -> list[subprocess.CompletedProcess]:
    """The job: ``processes`` workers, each its own ``devices`` CPU devices; all killed if one fails or time runs
    out."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    port = free_port()
    args = [f"--coordinator=127.0.0.1:{port}", f"--num_processes={processes}", f"--out={out}",
            *(f"--meshes={','.join(map(str, m))}" for m in MESHES.values())]
    logs = [open(out / f"log{i}.txt", "w+") for i in range(processes)]  # noqa: SIM115
    procs = [subprocess.Popen([sys.executable, str(WORKER), *args, f"--process_id={i}"], env=env, cwd=ROOT,
                              stdout=logs[i], stderr=subprocess.STDOUT) for i in range(processes)]
    deadline = time.monotonic() + TIMEOUT
    try:
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline or any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    done = []
    for p, log in zip(procs, logs, strict=True):
        log.seek(0)
        done.append(subprocess.CompletedProcess(p.args, p.returncode, log.read()))
        log.close()
    return done


def test_mesh_multihost_two_processes_match_one(tmp_path):
    t0 = time.perf_counter()
    jobs = launch(tmp_path)
    wall = time.perf_counter() - t0
    for i, j in enumerate(jobs):
        assert j.returncode == 0, f"process {i} failed (rc {j.returncode}, {wall:.0f} s):\n{j.stdout[-3000:]}"
    outs = [dict(np.load(tmp_path / f"process{i}.npz")) for i in range(2)]
    _, ref, _ = run_magi(None)  # this process, one device
    for out in outs:
        assert out["process_count"] == 2 and out["device_count"] == 8 and out["local_device_count"] == 4
    for name in MESHES:
        a, b = (o[f"{name}_decisions"] for o in outs)
        np.testing.assert_array_equal(a, b)  # both processes hold the one decision table
        np.testing.assert_array_equal(a, ref.decisions, err_msg=name)
        assert outs[0][f"{name}_computed"] == ref.computed
        np.testing.assert_allclose(outs[0][f"{name}_video"], ref.video, **TOL, err_msg=name)
        np.testing.assert_array_equal(outs[0][f"{name}_video"], outs[1][f"{name}_video"])
        # every device of both processes holds the same accumulators after every stage
        acc = np.concatenate([o[f"{name}_acc_copies"] for o in outs], 1)  # [stages, 8 devices, W]
        np.testing.assert_array_equal(acc, np.broadcast_to(acc[:, :1], acc.shape))
    # the placement really spans the processes: FSDP weights (their embed axis) split between them on 1x2x4,
    # the K/V rows on 1x1x8
    for out in outs:
        assert out["1x2x4_q_embed_here"] == 0.5 and out["1x2x4_kv_rows_here"] == 1.0
        assert out["1x1x8_kv_rows_here"] == 0.5
