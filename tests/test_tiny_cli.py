"""The embedded default: the shipped tiny MAGI-1 checkpoint, README line 1, and the quality harness."""

import json

from experiments.configs.tiny_base import TINY_CHECKPOINT
from tests.test_cli import cli

SMALL = ["--override=video.num_chunks=3", "--override=sampler.num_steps=16"]


def test_shipped_checkpoint_is_small_and_documented():
    from pathlib import Path

    root = Path(TINY_CHECKPOINT)
    size = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    assert 0 < size <= 20 * 2**20
    meta = json.loads((root / "model_config.json").read_text())
    assert meta["model"] == "magi1" and meta["training"]["steps"] > 0
    assert meta["training"]["final_loss_mean100"] < 0.1


def test_default_run_is_tiny_fast_and_writes_a_video(tmp_path):
    p = cli("run.py", f"--output_dir={tmp_path}", "--noprogress")  # README line 1, no --config
    assert p.returncode == 0, p.stderr
    r = json.loads((tmp_path / "results.json").read_text())
    assert r["config_name"] == "tiny_fast" and r["computed_fraction"] < 0.6
    assert r["vs_vanilla"]["psnr"] >= 25.0
    for name in ("video.mp4", "video_frames.png", "latents.npz"):
        assert (tmp_path / name).stat().st_size > 0


def test_missing_checkpoint_is_one_line(tmp_path):
    p = cli("run.py", "--config=tiny_fast", f"--config.checkpoint={tmp_path / 'nope'}", f"--output_dir={tmp_path}")
    assert p.returncode == 2 and "Traceback" not in p.stderr and "nope" in p.stderr


def test_quality_harness_schema_and_outputs(tmp_path):
    from tests.test_lpips import export

    weights = export(tmp_path / "lpips_random.safetensors")  # random AlexNet: checks the plumbing, not the values
    p = cli("quality.py", "--config=tiny", "--seeds=0", "--repeats=1", "--sweep_points=2", *SMALL,
            f"--lpips_weights={weights}", f"--output_dir={tmp_path}", "--noprogress")
    assert p.returncode == 0, p.stderr
    q = json.loads((tmp_path / "quality.json").read_text())
    for name in ("tiny_fast", "tiny_slow", "tiny_teacache_fast", "tiny_first_block", "tiny_magcache"):
        assert {"speedup_ideal", "speedup_wall", "psnr", "ssim", "lpips"} <= set(q["methods"][name])
        assert (tmp_path / "side_by_side" / f"{name}.mp4").stat().st_size > 0
    assert {s["policy"] for s in q["sweep"]} == {"flowcache", "teacache", "first_block", "magcache"}
    assert q["methods"]["tiny_vanilla"]["speedup_ideal"] == 1.0
    assert q["methods"]["tiny_fast"]["speedup_ideal"] > 1.0
    assert (tmp_path / "pareto.png").stat().st_size > 0
    assert q["methods"]["tiny_vanilla"]["lpips"] < 1e-9 < q["methods"]["tiny_fast"]["lpips"]
    assert "speedup_wall" in p.stdout and "lpips" in p.stdout


def test_quality_unknown_family(tmp_path):
    p = cli("quality.py", "--config=nope", f"--output_dir={tmp_path}")
    assert p.returncode == 2 and "no preset nope_vanilla" in p.stderr


def test_time_grid_knobs_move_the_steps_and_reject_bad_values():
    import ml_collections
    import numpy as np
    import pytest

    from experiments.errors import ConfigError
    from experiments.magi_run import time_grid
    from flowcache_jax.schedules import magi_time_grid

    s = ml_collections.ConfigDict(dict(num_steps=8, shortcut_mode="8,16,16", time_power=2.0, time_shift=3.0))
    np.testing.assert_array_equal(time_grid(s), magi_time_grid(8))  # the defaults are MAGI-1's grid
    s.time_power, s.time_shift = 1.0, 1.0
    np.testing.assert_allclose(time_grid(s), np.linspace(0, 1, 9), atol=1e-6)  # uniform: steps dense near data too
    s.time_shift = 0.0
    with pytest.raises(ConfigError, match="time_shift"):
        time_grid(s)
