"""A tiny end-to-end release: the fixture DiT + text encoder + tokenizer + VAE converted with the one command, then
run from a prompt to an MP4, for MAGI-1 and SkyReels-V2; and the errors a user meets on the way.

Sizes are read from the fixtures (the DiT's caption width must equal the encoder's, which the release checks)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT
from tests.test_cli import cli

SHARED = ROOT.parent / "shared" / "fixtures"


def fixture(var: str, name: str) -> Path:
    return Path(os.environ.get(var, SHARED / name))


MAGI = fixture("FLOWCACHE_MAGI1_FIXTURE", "magi1_tiny")
T5 = fixture("FLOWCACHE_T5_FIXTURE", "t5_tiny")
MVAE = fixture("FLOWCACHE_MAGI1_VAE_FIXTURE", "magi1_vae_tiny")
SKY = fixture("FLOWCACHE_SKYREELS_FIXTURE", "skyreels_v2_tiny")
UMT5 = fixture("FLOWCACHE_UMT5_FIXTURE", "umt5_tiny")
WVAE = fixture("FLOWCACHE_WAN_VAE_FIXTURE", "wan_vae_tiny")


def release(*args, env_extra=None):
    env = dict(os.environ, JAX_PLATFORMS="cpu", **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "converters.release", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=600)


def magi_parts(tmp: Path) -> list[str]:
    caption = json.loads((MAGI / "config.json").read_text())["model_config"]["caption_channels"]
    special = tmp / "special_tokens.npz"
    np.savez(special, other_tokens=np.random.default_rng(0).normal(size=(100, caption)).astype(np.float64))
    return [f"--dit={MAGI / 'weights.safetensors'}", f"--dit_config={MAGI / 'config.json'}",
            f"--text_encoder={T5 / 'weights.safetensors'}", f"--text_encoder_config={T5 / 'config.json'}",
            f"--tokenizer={T5 / 'tokenizer'}", f"--vae={MVAE / 'weights.safetensors'}",
            f"--vae_config={MVAE / 'config.json'}", f"--special_tokens={special}"]


@pytest.fixture(scope="module")
def magi_release(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("magi_release")
    p = release("--model=magi1", f"--dst={tmp / 'ckpt'}", *magi_parts(tmp))
    assert p.returncode == 0, p.stderr
    return tmp / "ckpt"


def magi_video_args() -> tuple[list[str], int, int]:
    """A video the tiny VAE decodes with edge tiles: one tile and a bit in space, chunks of one temporal tile."""
    dit = json.loads((MAGI / "config.json").read_text())["model_config"]
    tiling = json.loads((MVAE / "config.json").read_text())["tiling"]
    p = dit["patch_size"]
    side = -(-(tiling["tile_sample_min_height"] // 8 + 1) // p) * p
    tp = dit["t_patch_size"]
    width = -(-max(tiling["tile_sample_min_length"] // 4, 1) // tp) * tp  # one temporal tile, whole time patches
    return ["--config.video.num_chunks=2", f"--config.video.latent_height={side}",
            f"--config.video.latent_width={side}", f"--config.video.chunk_width={width}",
            "--config.sampler.num_steps=8", "--config.policy.warmup=2", "--noprogress"], side, width


def mp4_frames(path: Path) -> np.ndarray:
    from flowcache_jax import io

    return io.read_mp4(path)[0]


def test_prompt_to_mp4_magi1(magi_release, tmp_path):
    args, side, width = magi_video_args()
    cache = tmp_path / "cache"
    long_prompt = "a red fox runs through deep snow past tall pine trees " * 8  # longer than the DiT's captions
    out = tmp_path / "fast"
    p = cli("run.py", "--config=magi_fast", f"--config.checkpoint={magi_release}", f"--config.prompt={long_prompt}",
            f"--config.text.cache_dir={cache}", *args, f"--output_dir={out}")
    assert p.returncode == 0, p.stderr
    assert "truncated" in p.stdout
    r = json.loads((out / "results.json").read_text())
    assert r["decoded"] and r["text"]["truncated"] and not r["text"]["cached"] and r["text"]["special_tokens"]
    assert r["wall_s"]["text_encode"] > 0 and r["wall_s"]["decode"] > 0 and r["wall_s"]["denoise"] > 0
    assert r["vs_vanilla"]["space"] == "pixels" and "latent_psnr" in r["vs_vanilla"]
    frames = mp4_frames(out / "video.mp4")
    assert frames.shape[0] == 2 * width * 4 and frames.shape[1:3] == (8 * side, 8 * side)
    assert frames.astype(np.float32).std(axis=0).mean() > 2.0  # the frames move
    assert frames.astype(np.float32).std() > 5.0  # and are not flat
    assert (out / "video_frames.png").is_file()

    # the same prompt again: the embedding comes from the on-disk cache (no encoder run); a clip continued
    clip = tmp_path / "clip.mp4"
    from flowcache_jax import io

    io.write_mp4(clip, frames[: width * 4], fps=24)
    out2 = tmp_path / "cached"
    p = cli("run.py", "--config=magi_vanilla", f"--config.checkpoint={magi_release}",
            f"--config.prompt={long_prompt}", f"--config.text.cache_dir={cache}", f"--config.prefix.video={clip}",
            *args, f"--output_dir={out2}", "--nocompare_to_vanilla")
    assert p.returncode == 0, p.stderr
    r2 = json.loads((out2 / "results.json").read_text())
    assert r2["text"]["cached"] and r2["text"]["tokens"] == r["text"]["tokens"]
    assert "1 given clean chunk(s), video" in r2["notes"]["prefix"]
    assert mp4_frames(out2 / "video.mp4").shape[0] == 3 * width * 4  # the given chunk, then two generated


@pytest.fixture(scope="module")
def skyreels_release(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sky_release")
    p = release("--model=skyreels_v2", f"--dst={tmp / 'ckpt'}", f"--dit={SKY / 'weights.safetensors'}",
                f"--dit_config={SKY / 'config.json'}", f"--text_encoder={UMT5 / 'weights_wan.safetensors'}",
                "--text_encoder_format=original", f"--tokenizer={UMT5 / 'tokenizer'}",
                f"--vae={WVAE / 'weights_diffusers.safetensors'}", "--vae_format=diffusers",
                f"--vae_config={WVAE / 'config.json'}")
    assert p.returncode == 0, p.stderr
    return tmp / "ckpt"


def test_prompt_to_mp4_skyreels(skyreels_release, tmp_path):
    from tests.test_skyreels_cli import SMALL

    out = tmp_path / "sky"
    p = cli("run.py", "--config=skyreels_fast", f"--config.checkpoint={skyreels_release}",
            "--config.prompt=A cat sitting on a windowsill, watching the rain.", "--config.negative_prompt=blurry",
            f"--config.text.cache_dir={tmp_path / 'cache'}", *SMALL, "--config.sampler.num_steps=4",
            f"--output_dir={out}", "--noprogress")
    assert p.returncode == 0, p.stderr
    r = json.loads((out / "results.json").read_text())
    assert r["decoded"] and r["text"]["tokens"] > 1 and r["wall_s"]["decode"] > 0
    assert r["vs_vanilla"]["space"] == "pixels"
    frames = mp4_frames(out / "video.mp4")
    flags = dict(a.lstrip("-").split("=", 1) for a in SMALL)
    assert frames.shape[0] == int(flags["config.video.num_frames"])
    assert frames.shape[1:3] == (int(flags["config.video.height"]), int(flags["config.video.width"]))
    assert frames.astype(np.float32).std(axis=0).mean() > 2.0


def test_prompt_to_mp4_missing_text_encoder_says_how_to_convert(tmp_path):
    dst = tmp_path / "dit_only"
    p = release("--model=magi1", f"--dst={dst}", f"--dit={MAGI / 'weights.safetensors'}",
                f"--dit_config={MAGI / 'config.json'}")
    assert p.returncode == 0, p.stderr
    p = cli("run.py", "--config=magi_vanilla", f"--config.checkpoint={dst}", "--config.prompt=a fox",
            f"--output_dir={tmp_path / 'out'}", "--noprogress")
    assert p.returncode == 2 and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert "text_encoder/" in p.stderr and "tokenizer/" in p.stderr and "converters.release" in p.stderr
    assert not (tmp_path / "out").exists()


def test_prompt_to_mp4_release_in_the_other_layout_hints_and_writes_nothing(tmp_path):
    dst = tmp_path / "bad"
    p = release("--model=skyreels_v2", f"--dst={dst}", f"--dit={SKY / 'weights.safetensors'}",
                f"--dit_config={SKY / 'config.json'}", f"--text_encoder={UMT5 / 'weights_wan.safetensors'}",
                "--text_encoder_format=hf", f"--text_encoder_config={UMT5 / 'config.json'}",
                f"--tokenizer={UMT5 / 'tokenizer'}")
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "missing key" in p.stderr and "--text_encoder_format=original" in p.stderr
    assert not dst.exists() and not list(tmp_path.glob(".bad*"))  # nothing partial
    p = release("--model=magi1", f"--dst={dst}", f"--dit={MAGI / 'weights.safetensors'}",
                f"--dit_config={MAGI / 'config.json'}", f"--text_encoder={T5 / 'weights.safetensors'}")
    assert p.returncode == 2 and "--tokenizer" in p.stderr and not dst.exists()


def test_prompt_to_mp4_tokenizer_that_does_not_load_is_named(tmp_path):
    bad = tmp_path / "tok"
    bad.mkdir()
    (bad / "spiece.model").write_bytes(b"not a sentencepiece model")
    p = release("--model=magi1", f"--dst={tmp_path / 'x'}", *magi_parts(tmp_path)[:4], f"--tokenizer={bad}")
    assert p.returncode == 2 and "--tokenizer" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "x").exists()


def test_prompt_to_mp4_quality_in_pixels(magi_release, tmp_path):
    """quality.py and benchmark.py score decoded frames against the uncached run when the checkpoint has a VAE."""
    args, side, width = magi_video_args()
    over = [f"checkpoint={magi_release}", "prompt=a red fox", f"text.cache_dir={tmp_path / 'cache'}",
            f"video.latent_height={side}", f"video.latent_width={side}", f"video.chunk_width={width}",
            "video.num_chunks=2", "sampler.num_steps=8", "policy.warmup=2"]
    p = cli("quality.py", "--config=magi", *(f"--override={o}" for o in over), "--seeds=0", "--repeats=1",
            "--nosweep", f"--output_dir={tmp_path / 'q'}", "--noprogress")
    assert p.returncode == 0, p.stderr
    q = json.loads((tmp_path / "q" / "quality.json").read_text())
    assert q["space"].startswith("pixels") and all("latent_psnr" in m for m in q["methods"].values())
    assert (tmp_path / "q" / "side_by_side" / "magi_fast.mp4").is_file()
    p = cli("benchmark.py", "--config=magi_fast", f"--config.checkpoint={magi_release}", "--config.prompt=a red fox",
            f"--config.text.cache_dir={tmp_path / 'cache'}", *args[:-1], "--repeats=1",
            f"--output_dir={tmp_path / 'b'}")
    assert p.returncode == 0, p.stderr
    b = json.loads((tmp_path / "b" / "benchmark.json").read_text())
    assert b["vs_vanilla"]["space"] == "pixels" and b["decode_s"] > 0
