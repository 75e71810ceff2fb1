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
    from flowcache_jax.io import read_mp4

    video, _ = read_mp4(tmp_path / "continuation.mp4")  # true | generated | error, given frames first
    assert video.shape[0] == r["given_frames"] + frames and video.shape[2] >= 3 * video.shape[1]
    sh, bg = r["regions"]["shapes"], r["regions"]["background"]
    assert 0.0 < sh["area"] < 1.0 and np.isclose(sh["area"] + bg["area"], 1.0) and 0.0 <= sh["error_share"] <= 1.0
    # The two regions' pooled errors make up the whole: their MSEs, weighted by area, give the frames' overall MSE,
    # which bounds the per-frame figures (the mean of per-frame PSNRs is at least the PSNR of the pooled MSE).
    mse = lambda db: 4.0 * 10 ** (-db / 10)
    pooled = sh["area"] * mse(sh["psnr"]) + bg["area"] * mse(bg["psnr"])
    assert np.isclose(sh["error_share"], sh["area"] * mse(sh["psnr"]) / pooled)
    assert r["mean_psnr"] >= 10 * np.log10(4.0 / pooled) - 1e-6


def test_shape_mask_splits_a_clip_into_its_shapes_and_their_background():
    from experiments.procedural_videos import clip, shape_mask
    from experiments.scoring import regions

    frames, h, w = 4, 16, 24
    truth = np.asarray(clip(3, frames, h, w))
    mask = np.asarray(shape_mask(3, frames, h, w))
    assert mask.shape == (frames, h, w) and 0 < mask.mean() < 1
    assert not np.asarray(shape_mask(3, frames, h, w, "p_visible=0")).any()  # no shapes drawn: nothing to mask
    background = np.asarray(clip(3, frames, h, w, "p_visible=0"))
    assert np.abs(truth - background).max(-1)[~mask].max() <= 0.02  # outside the mask the clip is its background
    off = truth + 0.1 * mask[..., None]  # an error in the shapes only
    split = regions(off, truth, truth, mask)  # the baseline is the truth itself
    assert split["shapes"]["error_share"] == 1.0 and np.isclose(split["shapes"]["psnr"], 10 * np.log10(4 / 0.01))
    assert split["background"]["psnr"] > 100 and split["shapes"]["baseline_psnr"] > 100
    assert np.isclose(split["shapes"]["area"], mask.mean())


def test_continuation_needs_a_procedural_prefix(tmp_path):
    p = cli("continuation.py", "--config=synthetic_fast", f"--output_dir={tmp_path}")
    assert p.returncode == 2 and "procedural" in p.stderr and "Traceback" not in p.stderr


def test_history_guidance_knobs_are_checked():
    import pytest

    from experiments.configs.tiny_vanilla import get_config
    from experiments.errors import ConfigError
    from experiments.magi_run import validate_magi

    cfg = get_config()
    assert cfg.sampler.history_guidance == 1.0  # off by default: one forward per computed chunk
    for key, value in (("history_guidance", 0.0), ("history_guidance_t_max", 1.5)):
        bad = cfg.copy_and_resolve_references()
        bad.sampler[key] = value
        with pytest.raises(ConfigError, match="history_guidance"):
            validate_magi(bad)
    bad = cfg.copy_and_resolve_references()
    bad.sampler.history_guidance = 1.25
    validate_magi(bad)
    bad.sampler.discard_duplicate = False  # the 0.7/0.3 duplicate blend and history guidance do not combine
    with pytest.raises(ConfigError, match="discard_duplicate"):
        validate_magi(bad)


def test_prefix_world_names_the_clip_a_continuation_is_given():
    import types

    import pytest

    from experiments.configs.tiny_vanilla import get_config
    from experiments.errors import ConfigError
    from experiments.magi_run import load_prefix, procedural_truth
    from experiments.procedural_videos import to_latent

    cfg = get_config()
    mcfg = types.SimpleNamespace(in_channels=3)
    default = load_prefix(cfg, mcfg, 0)
    cfg.prefix.world = "n_shapes=0"  # the same seed's background alone
    other = load_prefix(cfg, mcfg, 0)
    assert default.shape == other.shape and np.abs(default - other).max() > 0.1
    truth = to_latent(procedural_truth(cfg, 0))  # what it is scored against: the same world, the given frames first
    np.testing.assert_array_equal(other[0], np.asarray(truth)[:, :cfg.video.chunk_width])
    cfg.prefix.world = "shapes=2"
    with pytest.raises(ConfigError, match="prefix.world: world override 'shapes=2': use key=value"):
        load_prefix(cfg, mcfg, 0)
