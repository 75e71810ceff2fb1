"""MAGI-1 from the command line: converted fixture weights -> run.py / benchmark.py; flops.py; clear errors."""

import json

import pytest

from tests.test_cli import cli
from tests.test_converter import CONFIG, WEIGHTS, convert

SMALL = ["--config.video.num_chunks=3", "--config.video.latent_height=8", "--config.video.latent_width=8",
         "--config.sampler.num_steps=16", "--config.policy.warmup=2", "--noprogress"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    dst = tmp_path_factory.mktemp("magi") / "ckpt"
    p = convert(f"--src={WEIGHTS}", f"--dst={dst}", f"--model_config={CONFIG}")
    assert p.returncode == 0, p.stderr
    return dst


@pytest.mark.parametrize("name,cached,steps", [("magi_fast", True, 16), ("magi_vanilla", False, 12)])
def test_run_on_converted_weights(ckpt, tmp_path, name, cached, steps):
    p = cli("run.py", f"--config={name}", f"--config.checkpoint={ckpt}", *SMALL, f"--config.sampler.num_steps={steps}",
            f"--output_dir={tmp_path}", "--nocompare_to_vanilla")
    assert p.returncode == 0, p.stderr
    r = json.loads((tmp_path / "results.json").read_text())
    assert r["num_chunks"] == 3 and r["chunk_forwards_vanilla"] == 3 * steps
    assert (r["computed_fraction"] < 1) if cached else (r["computed_fraction"] == 1)
    assert r["notes"]["caption"].startswith("null caption")
    passes = r["flops"]["chunk_passes"]
    assert passes["noisy"] == r["chunk_forwards_computed"]
    assert ("clean" in passes) == (not cached)  # the MAGI semantics re-encode finished chunks


def test_missing_checkpoint_says_how_to_convert(tmp_path):
    for extra in ([], [f"--config.checkpoint={tmp_path / 'nope'}"]):
        p = cli("run.py", "--config=magi_fast", *extra, f"--output_dir={tmp_path / 'out'}")
        assert p.returncode == 2 and "Traceback" not in p.stderr
        assert "python -m converters.convert --model=magi1" in p.stderr
        assert len(p.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_flops_reproduce_the_paper(tmp_path):
    out = tmp_path / "flops.json"
    p = cli("flops.py", "--config=magi_vanilla", f"--output_json={out}")
    assert p.returncode == 0, p.stderr
    r = json.loads(out.read_text())
    assert abs(r["total_pflops"] / 306.0 - 1) < 0.05
    assert r["chunk_passes"] == {"noisy": 640, "duplicate": 160, "clean": 9}  # spec §6.2
    assert abs(r["total_pflops_without_clean_reencodes"] - 306.0) < 0.5
    assert abs(r["xla_check"]["ratio"] - 1) < 0.05


def test_benchmark_on_converted_weights(ckpt, tmp_path):
    p = cli("benchmark.py", "--config=magi_fast", f"--config.checkpoint={ckpt}", *SMALL[:-1], "--repeats=1",
            f"--output_dir={tmp_path}")
    assert p.returncode == 0, p.stderr
    b = json.loads((tmp_path / "benchmark.json").read_text())
    assert b["speedup_ideal"] > 1 and b["compiles"]["per_run"] == [1, 1]


def test_caption_file_is_used_and_checked(ckpt, tmp_path):
    import numpy as np

    width = json.loads(CONFIG.read_text())["model_config"]["caption_channels"]
    cap = tmp_path / "caption.npz"
    np.savez(cap, y=np.random.default_rng(0).normal(size=(5, width)).astype(np.float32))
    p = cli("run.py", "--config=magi_vanilla", f"--config.checkpoint={ckpt}", f"--config.caption_file={cap}", *SMALL,
            f"--output_dir={tmp_path / 'a'}", "--nocompare_to_vanilla")
    assert p.returncode == 0, p.stderr
    assert json.loads((tmp_path / "a" / "results.json").read_text())["notes"]["caption"] == f"caption from {cap}"
    for bad, needle in ((dict(y=np.zeros((5, width - 1), np.float32)), "caption 'y' must be"),
                        (dict(y=np.zeros((5, width), np.float32), mask=np.zeros(5)), "at least one valid token"),
                        (dict(y=np.zeros((5, width), np.float32), mask=np.ones(4)), "does not fit")):
        np.savez(cap, **bad)
        p = cli("run.py", "--config=magi_vanilla", f"--config.checkpoint={ckpt}", f"--config.caption_file={cap}",
                *SMALL, f"--output_dir={tmp_path / 'b'}")
        assert p.returncode == 2 and needle in p.stderr and "Traceback" not in p.stderr


def test_memory_is_bounded_with_compression(ckpt, tmp_path):
    out = tmp_path / "memory.json"
    p = cli("memory.py", "--config=magi_fast", f"--config.checkpoint={ckpt}", "--config.video.latent_height=8",
            "--config.video.latent_width=8", "--config.sampler.num_steps=8", "--num_chunks=4,16",
            f"--output_json={out}")
    assert p.returncode == 0, p.stderr
    r = json.loads(out.read_text())
    by = {(x["compression"], x["num_chunks"]): x for x in r["runs"]}
    assert by[(True, 16)]["kv_bytes"] == by[(True, 4)]["kv_bytes"]
    assert by[(True, 16)]["peak_bytes"] <= 1.05 * by[(True, 4)]["peak_bytes"]
    assert by[(False, 16)]["kv_bytes"] == 4 * by[(False, 4)]["kv_bytes"]
    assert by[(False, 16)]["peak_bytes"] > by[(False, 4)]["peak_bytes"]
    assert abs(r["full_size_estimate"]["kv_gb_full_history"] - 16.9) < 0.1  # spec/magi1.md §5.5
