"""experiments/fullsize_check.py at a tiny size on one device: its rows (per-device peak bytes, devices, FLOPs) and
its JSON (``{"rows": [...]}``). The 8-device rows are in tests/test_fullsize_mesh.py."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

from experiments import fullsize_check as fc
from experiments.errors import ConfigError
from models.magi1 import Magi1Config
from models.skyreels_v2 import SkyReelsConfig

OPT = fc.Options(dtype="bfloat16", buffer_chunks=2, key_tile=16, attention="tiled")


def tiny_magi1(**kw) -> Magi1Config:
    """A 24B-shaped MAGI-1 (SwiGLU, 32 in/out channels from the doubled 16-channel latent), tiny."""
    base = dict(fc.MAGI1_24B_DISTILL, num_layers=2, hidden_size=128, ffn_hidden_size=256, num_attention_heads=4,
                num_query_groups=2, kv_channels=32, caption_channels=32, caption_max_length=8)
    return Magi1Config(**{**base, **kw}, dtype="bfloat16")


def tiny_skyreels() -> SkyReelsConfig:
    return SkyReelsConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=2, text_dim=32, dtype="bfloat16")


def check_row(row: dict, devices: int) -> None:
    assert row["devices"] == devices
    assert isinstance(row["per_device_peak_bytes"], int) and row["per_device_peak_bytes"] > 0
    assert row["per_device_peak_gb"] == pytest.approx(row["per_device_peak_bytes"] / 1e9)
    assert row["tflops"] > 0 and row["compile_s"] > 0
    assert 0 < row["no_hoist_peak_bytes"] <= row["per_device_peak_bytes"]  # bf16 on the CPU


def test_fullsize_rows_one_device(tmp_path: Path):
    magi = fc.check_magi1(tiny_magi1(), OPT, "dit", "tiny MAGI-1", side=8, frames=2)
    check_row(magi, 1)
    assert "mesh" not in magi and magi["attention"] == "tiled"
    assert "32 tokens" in magi["what"] and "2-chunk KV buffer (64 rows)" in magi["what"]

    sky = fc.check_skyreels(tiny_skyreels(), OPT, frames=9, height=64, width=64, block=1)
    check_row(sky, 1)
    assert "3x8x8 latent, 48 tokens" in sky["what"]
    block = fc.check_skyreels_block(tiny_skyreels(), OPT, frames=9, height=64, width=64, block=1)
    check_row(block, 1)
    assert "(16 tokens)" in block["what"] and "3 blocks (48 rows per branch)" in block["what"]

    out = tmp_path / "fullsize.json"
    fc.write_rows(str(out), [magi, sky, block], 1.5)
    got = json.loads(out.read_text())
    assert got["wall_s"] == 1.5 and [r["part"] for r in got["rows"]] == ["dit", "skyreels", "skyreels_block"]
    assert all(r["per_device_peak_bytes"] > 0 and r["devices"] == 1 for r in got["rows"])
    assert [p.name for p in tmp_path.iterdir()] == ["fullsize.json"]  # no temporary left behind


def test_fullsize_float32_has_no_second_compile():
    row = fc.check_magi1(dataclasses.replace(tiny_magi1(), dtype="float32"), dataclasses.replace(OPT, dtype="float32"),
                         "dit", "tiny MAGI-1", side=8, frames=2)
    assert row["per_device_peak_bytes"] > 0 and "no_hoist_peak_bytes" not in row


def test_fullsize_mesh_flag_and_host_devices(monkeypatch: pytest.MonkeyPatch):
    mc = fc.parse_mesh("fsdp=4, seq=2")
    assert mc.shape == (1, 4, 2) and mc.size == 8
    assert fc.parse_mesh("").shape == (1, 1, 1)
    for bad in ("tp=8", "fsdp=0", "fsdp=x", "fsdp"):
        with pytest.raises(ConfigError, match="--mesh"):
            fc.parse_mesh(bad)
    with pytest.raises(ConfigError, match="xla_force_host_platform_device_count=64"):
        fc.make_layout(fc.parse_mesh("fsdp=64"))

    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x")
    fc.ensure_host_devices()
    assert os.environ["XLA_FLAGS"] == "--xla_dump_to=/tmp/x --xla_force_host_platform_device_count=8"
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    fc.ensure_host_devices()
    assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2"  # a user's count wins
    monkeypatch.delenv("XLA_FLAGS")
    fc.ensure_host_devices(4)
    assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=4"


def test_fullsize_24b_config_is_the_released_one():
    c = fc.magi1_24b(OPT)
    assert (c.num_layers, c.hidden_size, c.ffn_hidden_size, c.fc1_width) == (48, 6144, 16384, 32768)
    assert (c.num_attention_heads, c.num_query_groups, c.kv_channels) == (48, 8, 128)
    assert (c.in_channels, c.out_channels, c.x_rescale_factor, c.gated_linear_unit) == (32, 32, 0.1, True)
    assert c.attention_impl == "tiled" and c.dtype == "bfloat16"
