"""Self-Forcing from the command line on the converted fixture: run.py with FlowCache and with a quantized history,
the KV-quantization side-by-side script, and one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests import self_forcing_fixture as sf
from tests.test_cli import cli

SMALL = ["--config.video.height=64", "--config.video.width=96", "--config.video.num_frames=33",
         "--config.sampler.local_attn_size=6", "--config.sampler.sink_size=3"]  # 9 latent frames, rolling


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    from converters.convert import convert_to_dir

    d = sf.fixture_dir()
    return convert_to_dir("self_forcing", d / "weights.safetensors", tmp_path_factory.mktemp("sf") / "ckpt",
                          str(d / "config.json"))


def test_self_forcing_run_quantized_with_flowcache(converted, tmp_path):
    p = cli("run.py", "--config=self_forcing_fast", f"--config.checkpoint={converted}", *SMALL,
            "--config.kv.method=ours", f"--output_dir={tmp_path}", "--noprogress")
    assert p.returncode == 0, p.stderr
    r = json.loads((tmp_path / "results.json").read_text())
    assert r["num_chunks"] == 3 and r["num_steps"] == 12 and r["compiles"] == 1
    assert r["chunk_forwards_vanilla"] == 12 and 0 < r["computed_fraction"] <= 1
    assert "ours" in r["notes"]["kv"] and float(r["vs_vanilla"]["psnr"]) > 20
    assert r["flops"]["vanilla_pflops"] > 0
    assert (tmp_path / "video.mp4").stat().st_size > 0


def test_self_forcing_bad_input_is_one_line(converted, tmp_path):
    for args, msg in ((["--config.sampler.local_attn_size=4"], "must hold at least one block"),
                      (["--config.kv.method=int3"], "kv.method must be one of"),
                      (["--config.video.num_frames=30"], "must be 4k+1")):
        p = cli("run.py", "--config=self_forcing_vanilla", f"--config.checkpoint={converted}", *SMALL, *args,
                f"--output_dir={tmp_path / 'x'}")
        assert p.returncode == 2 and msg in p.stderr and "Traceback" not in p.stderr, p.stderr
    p = cli("run.py", "--config=self_forcing_vanilla", f"--output_dir={tmp_path / 'x'}")
    assert p.returncode == 2 and "converters.convert --model=self_forcing" in p.stderr
    assert not (tmp_path / "x").exists()


def test_kv_quant_side_by_side_script(tmp_path):
    """The side-by-side rows on a Self-Forcing-architecture model: every method, real bytes and peak memory."""
    p = cli("kv_quant.py", "--models=self_forcing", "--blocks=4", f"--output_dir={tmp_path}", "--noprogress")
    assert p.returncode == 0, p.stderr
    r = json.loads((tmp_path / "kv_quant.json").read_text())
    rows = {x["method"]: x for x in r["rows"]}
    assert set(rows) == {"bf16", "rtn_int8", "rtn_int4", "study_soft_prune_int4", "ours"}
    for x in rows.values():
        assert {"method", "compression", "kv_bytes", "peak_bytes", "wall_s", "psnr", "ssim"} <= set(x)
        assert x["kv_bytes"] > 0 and x["peak_bytes"] > 0 and x["wall_s"] > 0
    assert rows["bf16"]["compression"] == 1 and float(rows["bf16"]["psnr"]) == float("inf")
    assert rows["rtn_int8"]["compression"] < rows["rtn_int4"]["compression"] < rows["ours"]["compression"]
    for name in ("rtn_int8", "rtn_int4", "ours"):  # a real peak drop of at least the history bytes saved
        x = rows[name]
        assert x["peak_saving_bytes"] >= x["kv_saving_bytes"] > 0, name
    assert float(rows["rtn_int8"]["psnr"]) > float(rows["rtn_int4"]["psnr"])
    # real allocations: the study's fixed-shape store keeps INT4 room for folded frames, ours' aged ring is smaller
    assert rows["study_soft_prune_int4"]["allocated_bytes"] >= rows["rtn_int4"]["allocated_bytes"]
    assert rows["ours"]["allocated_bytes"] < rows["rtn_int4"]["allocated_bytes"] < rows["bf16"]["allocated_bytes"]
    full = {(x["method"], x["frames"]): x for x in r["fullsize"]}
    assert abs(full[("bf16", 42)]["kv_gib"] - 11.25) < 0.01  # the study's setting (65520 tokens x 30 layers)
    assert full[("ours", 42)]["compression"] > 5.49
    assert "compression" in p.stdout and "kv_gib" in p.stdout


def test_self_forcing_prompt_to_mp4(tmp_path):
    """A Self-Forcing release: the umT5 encoder, its tokenizer and the Wan VAE of the tiny fixtures (converted by the
    release command) beside a causal Wan whose caption width is the encoder's: prompt -> blocks -> decoded MP4."""
    import shutil

    from experiments.self_forcing_run import SMALL_MODEL, random_checkpoint
    from tests.test_prompt_to_mp4 import UMT5, WVAE, mp4_frames, release

    dst = tmp_path / "release"
    p = release("--model=skyreels_v2", f"--dst={tmp_path / 'sky'}", f"--dit={sf.ROOT.parent}/shared/fixtures/"
                "skyreels_v2_tiny/weights.safetensors",
                f"--dit_config={sf.ROOT.parent}/shared/fixtures/skyreels_v2_tiny/config.json",
                f"--text_encoder={UMT5 / 'weights_wan.safetensors'}", "--text_encoder_format=original",
                f"--tokenizer={UMT5 / 'tokenizer'}", f"--vae={WVAE / 'weights_diffusers.safetensors'}",
                "--vae_format=diffusers", f"--vae_config={WVAE / 'config.json'}")
    assert p.returncode == 0, p.stderr
    width = json.loads((UMT5 / "config.json").read_text())["d_model"]
    random_checkpoint(dst, model={**SMALL_MODEL, "text_dim": width})
    for part in ("text_encoder", "tokenizer", "vae"):
        shutil.copytree(tmp_path / "sky" / part, dst / part)
    out = tmp_path / "out"
    p = cli("run.py", "--config=self_forcing_vanilla", f"--config.checkpoint={dst}", "--config.prompt=a red fox",
            f"--config.text.cache_dir={tmp_path / 'cache'}", "--config.video.height=32", "--config.video.width=48",
            "--config.video.num_frames=21", f"--output_dir={out}", "--noprogress")
    assert p.returncode == 0, p.stderr
    r = json.loads((out / "results.json").read_text())
    assert r["decoded"] and r["text"]["tokens"] > 1 and r["wall_s"]["decode"] > 0
    frames = mp4_frames(out / "video.mp4")
    assert frames.shape[:3] == (21, 32, 48)  # 6 latent frames (2 blocks) -> 1 + 4 * 5 pixel frames
    assert frames.astype(np.float32).std(axis=0).mean() > 1.0
