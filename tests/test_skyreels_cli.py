"""SkyReels-V2 from the command line: FLOPs, runs and benchmarks on the converted fixture weights, errors."""

import json

import pytest

from tests.test_cli import cli
from tests.test_converter import convert


def test_flops_reproduce_the_paper(tmp_path):
    out = tmp_path / "flops.json"
    p = cli("flops.py", "--config=skyreels_vanilla", f"--output_json={out}")
    assert p.returncode == 0, p.stderr
    r = json.loads(out.read_text())
    assert abs(r["total_pflops"] / 113.0 - 1) < 0.05
    assert r["forwards"] == 270 and r["iterations_per_window"] == [70, 65]  # spec §4.7
    assert r["total_pflops_full"] > 1.4 * r["total_pflops"]  # full attention: 165 PF


SMALL = ["--config.video.height=64", "--config.video.width=96", "--config.video.num_frames=37",
         "--config.video.base_num_frames=21", "--config.video.overlap_history=5",
         "--config.sampler.causal_block_size=2", "--config.sampler.ar_step=2", "--config.sampler.num_steps=12"]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    from tests.test_skyreels_parity import FIXTURE

    dst = tmp_path_factory.mktemp("sky") / "ckpt"
    p = convert("--model=skyreels_v2", f"--src={FIXTURE / 'weights.safetensors'}",
                f"--model_config={FIXTURE / 'config.json'}", f"--dst={dst}")
    assert p.returncode == 0, p.stderr
    return dst


def test_run_flowcache_small_video(converted, tmp_path):
    p = cli("run.py", "--config=skyreels_fast", f"--config.checkpoint={converted}", *SMALL, f"--output_dir={tmp_path}",
            "--noprogress")
    assert p.returncode == 0, p.stderr
    r = json.loads((tmp_path / "results.json").read_text())
    assert 0 < r["computed_fraction"] < 1 and r["num_chunks"] == 5  # 10 latent frames in blocks of 2
    assert r["notes"]["windows"] == [[6, 0], [6, 2]]
    assert r["vs_vanilla"]["psnr"] > 30
    assert (tmp_path / "video.mp4").stat().st_size > 0


def test_benchmark_and_teacache(converted, tmp_path):
    p = cli("benchmark.py", "--config=skyreels_teacache_fast", f"--config.checkpoint={converted}", *SMALL,
            "--repeats=1", "--nolength_check", f"--output_dir={tmp_path}")  # test_cli checks the lengths
    assert p.returncode == 0, p.stderr
    r = json.loads((tmp_path / "benchmark.json").read_text())
    assert r["speedup_ideal"] >= 1 and r["speedup_wall"] > 0 and r["flops"]["vanilla_pflops"] > 0


def test_run_without_checkpoint_is_one_line(tmp_path):
    p = cli("run.py", "--config=skyreels_fast", f"--output_dir={tmp_path}")
    assert p.returncode == 2 and "Traceback" not in p.stderr and "converters.convert --model=skyreels_v2" in p.stderr
    assert not any(tmp_path.iterdir())


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
