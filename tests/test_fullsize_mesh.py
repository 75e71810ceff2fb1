"""experiments/fullsize_check.py's sharded row at a tiny size on 8 host devices: its per-device peak is per device
(below the one-device peak of the same model) and its row says the mesh.

Runs under ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (tests/conftest.py sets it unless XLA_FLAGS is
already set); skipped with a reason when fewer devices exist.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import pytest

from experiments import fullsize_check as fc
from tests.test_fullsize_check import OPT, tiny_magi1

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8, reason=f"the fullsize mesh row needs 8 devices, found {jax.device_count()}: run with "
    "XLA_FLAGS=--xla_force_host_platform_device_count=8 (tests/conftest.py sets it unless XLA_FLAGS is set)")


def test_fullsize_mesh_row_divides_memory(tmp_path: Path):
    cfg = tiny_magi1()
    one = fc.check_magi1(cfg, OPT, "dit24b", "tiny MAGI-1", side=8, frames=2)
    eight = fc.check_magi1(cfg, OPT, "dit24b", "tiny MAGI-1", side=8, frames=2,
                           layout=fc.make_layout(fc.parse_mesh("fsdp=4,seq=2")))
    assert one["devices"] == 1 and "mesh" not in one
    assert eight["devices"] == 8 and eight["mesh"] == "data=1 x fsdp=4 x seq=2" and eight["mesh_shape"] == [1, 4, 2]
    for row in (one, eight):
        assert isinstance(row["per_device_peak_bytes"], int) and row["per_device_peak_bytes"] > 0
    # sharding really divides memory: parameters over fsdp, the chunk's tokens and the buffer's rows over seq
    assert eight["per_device_peak_bytes"] < one["per_device_peak_bytes"]
    assert eight["argument_gb"] < one["argument_gb"] / 3
    assert eight["no_hoist_peak_bytes"] < one["no_hoist_peak_bytes"]
    # the same model FLOPs; each device computes a share of them
    assert eight["tflops"] == pytest.approx(one["tflops"])
    assert 0 < eight["tflops_per_device"] < one["tflops"]

    out = tmp_path / "rows.json"
    fc.write_rows(str(out), [one, eight])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["devices"], r["per_device_peak_bytes"]) for r in rows] == [
        (1, one["per_device_peak_bytes"]), (8, eight["per_device_peak_bytes"])]
