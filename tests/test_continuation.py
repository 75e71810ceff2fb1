"""The embedded default continues its procedural clip (issue 15, part 1): continuation.py on the shipped model."""

import json

import numpy as np

from tests.test_cli import cli


def test_shipped_model_continues_the_clip_far_better_than_repeating_it(tmp_path):
    p = cli("continuation.py", f"--output_dir={tmp_path}", "--noprogress")  # tiny_vanilla, the config's seed
    assert p.returncode == 0, p.stderr
    r = json.loads((tmp_path / "continuation.json").read_text())
    frames = r["generated_frames"]
    assert frames == 16 and len(r["per_frame_psnr"]) == frames and r["seeds"] == [0]
    # The goal (mean >= 25 dB, no frame below 22) is not reached yet (README); what holds: the shipped model
    # continues its seed's clip better than copying the last given frame does.
    assert r["mean_psnr"] > r["baseline_mean_psnr"] + 2.0, r
    assert r["per_frame_psnr"][0] > 25.0 and r["min_psnr"] <= r["per_frame_psnr"][0]
    assert np.isclose(np.mean(r["per_frame_psnr"]), r["mean_psnr"]) and min(r["per_frame_psnr"]) >= r["min_psnr"]
    for name in ("continuation.png", "psnr_per_frame.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_continuation_needs_a_procedural_prefix(tmp_path):
    p = cli("continuation.py", "--config=synthetic_fast", f"--output_dir={tmp_path}")
    assert p.returncode == 2 and "procedural" in p.stderr and "Traceback" not in p.stderr
