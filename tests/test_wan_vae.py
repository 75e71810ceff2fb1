"""Wan2.1 VAE port vs the upstream golden fixture (``wan_vae_tiny``), both checkpoint layouts.

Everything is derived from the fixture's config.json and array shapes, so another fixture of the same format
(other widths, frame counts, resolutions) can be pointed at with FLOWCACHE_WAN_VAE_FIXTURE.
"""

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from converters.engine import CheckpointError
from converters.keymaps.wan_vae import convert_wan_vae, detect_format, key_map
from converters.safetensors_io import SafetensorsReader
from models import wan_vae as wv
from tests.conftest import ROOT

FIXTURE = Path(os.environ.get("FLOWCACHE_WAN_VAE_FIXTURE", ROOT.parent / "shared" / "fixtures" / "wan_vae_tiny"))
FILES = {"original": "weights_wan.safetensors", "diffusers": "weights_diffusers.safetensors"}
LAT = dict(atol=1e-4, rtol=1e-4)  # README: latents / moments
PIX = dict(atol=5e-4, rtol=0)  # README: decoded frames (unclamped)
BF16_MAX, BF16_MEAN = 6e-2, 1e-2  # bf16 vs f32 decode: README suggests ~3e-2; observed 3.5e-2 max, 4.4e-3 mean

pytestmark = pytest.mark.skipif(not FIXTURE.is_dir(), reason=f"fixture {FIXTURE} not found")


@pytest.fixture(scope="module")
def fx():
    config = json.loads((FIXTURE / "config.json").read_text())
    cases = {k: v[0] if v.ndim == 5 else v for k, v in np.load(FIXTURE / "cases.npz").items()}  # drop batch
    cfg = wv.WanVAEConfig.from_kwargs(config["diffusers_AutoencoderKLWan_kwargs"])
    real = wv.WanVAEConfig.from_kwargs({**config["wan_WanVAE_kwargs"], "latents_mean": config["real_latent_mean_16"],
                                        "latents_std": config["real_latent_std_16"]})
    return config, cases, cfg, real


@pytest.fixture(scope="module")
def params(fx):
    cfg = fx[2]
    return {fmt: jax.tree.map(jnp.asarray, convert_wan_vae(SafetensorsReader(FIXTURE / f), cfg, fmt))
            for fmt, f in FILES.items()}


@pytest.fixture(scope="module")
def decoded(fx, params):
    """The one-shot f32 decode of ``dec_latent`` with the original-layout weights (shared by several tests)."""
    _, c, cfg, _ = fx
    return np.asarray(wv.decode(cfg, params["original"], wv.denormalize(cfg, c["dec_latent"])))


def _close(got, want, what, **tol):
    got = np.asarray(got)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    np.testing.assert_allclose(got, want, err_msg=what, **tol)


def test_vae_config_from_both_kwarg_sets(fx):
    config, c, cfg, real = fx
    wan = wv.WanVAEConfig.from_kwargs({**config["wan_WanVAE_kwargs"], "latents_mean": config["tiny_latent_mean"],
                                       "latents_std": config["tiny_latent_std"]})
    assert wan == cfg
    np.testing.assert_array_equal(np.float32(cfg.latents_mean), c["latent_mean_tiny"])
    np.testing.assert_array_equal(np.float32(cfg.latents_std), c["latent_std_tiny"])
    assert real.latents_mean == wv.WAN21_LATENTS_MEAN and real.latents_std == wv.WAN21_LATENTS_STD
    np.testing.assert_array_equal(np.float32(wv.WAN21_LATENTS_MEAN), c["latent_mean_real"])
    np.testing.assert_array_equal(np.float32(wv.WAN21_LATENTS_STD), c["latent_std_real"])
    assert wv.WanVAEConfig.from_kwargs(config["real_wan_WanVAE_kwargs"]) == wv.WanVAEConfig.from_kwargs(wv.WAN21_VAE)
    assert wv.WanVAEConfig.from_kwargs(wv.WAN21_VAE) == wv.WanVAEConfig()
    t_lat, h_lat = c["latent_norm"].shape[1], c["latent_norm"].shape[2]
    assert (c["video"].shape[1] - 1) // cfg.temporal_stride + 1 == t_lat
    assert wv.latent_hw(cfg, *c["video"].shape[2:]) == (h_lat, c["latent_norm"].shape[3])
    assert wv.param_count(cfg) == config["param_count"]
    with pytest.raises(ValueError, match="is_residual"):
        wv.WanVAEConfig.from_kwargs({**config["diffusers_AutoencoderKLWan_kwargs"], "is_residual": True})
    with pytest.raises(ValueError, match="unknown"):
        wv.WanVAEConfig.from_kwargs({"dim": 8, "no_such_option": 1})


def test_vae_layouts_give_identical_params(fx, params):
    cfg = fx[2]
    jax.tree.map(np.testing.assert_array_equal, params["original"], params["diffusers"])
    shapes = jax.tree.map(lambda a: a.shape, params["original"])
    assert shapes == wv.param_shapes(cfg)
    # the generated tables are the fixture's complete bijection
    assert key_map(cfg) == json.loads((FIXTURE / "key_map_wan_to_diffusers.json").read_text())
    init = wv.init_params(cfg, jax.random.key(0))
    assert jax.tree.map(lambda a: a.shape, init) == shapes


def test_vae_wrong_layout_raises(fx):
    cfg = fx[2]
    for fmt, f in FILES.items():
        reader = SafetensorsReader(FIXTURE / f)
        assert detect_format(reader.keys()) == fmt
        other = "diffusers" if fmt == "original" else "original"
        with pytest.raises(CheckpointError) as e:
            convert_wan_vae(reader, cfg, other)
        assert any(p.startswith("missing key") for p in e.value.problems)
        assert any(p.startswith("unexpected key") for p in e.value.problems)
    assert detect_format(["foo.weight"]) is None
    # a right-layout file with a wrong shape: the problem names the key
    reader = SafetensorsReader(FIXTURE / FILES["original"])
    sd = {k: reader[k] for k in reader.keys()}
    sd["decoder.head.2.weight"] = sd["decoder.head.2.weight"][:, :, :1]
    with pytest.raises(CheckpointError, match="decoder.head.2.weight"):
        convert_wan_vae(sd, cfg, "original")


@pytest.mark.parametrize("fmt", list(FILES))
def test_vae_encode_parity(fx, params, fmt):
    _, c, cfg, real = fx
    p = params[fmt]
    moments = wv.encode(cfg, p, c["video"])
    _close(moments, c["enc_moments"], "enc_moments", **LAT)
    mu, logvar = wv.split_moments(moments)
    _close(mu, c["enc_mean"], "enc_mean", **LAT)
    _close(logvar, c["enc_logvar"], "enc_logvar", **LAT)
    _close(wv.normalize(cfg, mu), c["latent_norm"], "latent_norm", **LAT)
    _close(wv.normalize(real, mu), c["latent_norm_realconst"], "latent_norm_realconst", **LAT)
    image = wv.encode(cfg, p, c["image"])  # 1 frame -> 1 latent frame, the same as the video's first
    _close(image, c["enc_moments_image"], "enc_moments_image", **LAT)
    _close(wv.normalize(cfg, wv.split_moments(image)[0]), c["latent_norm_image"], "latent_norm_image", **LAT)


@pytest.mark.parametrize("fmt", list(FILES))
def test_vae_decode_parity(fx, params, decoded, fmt):
    _, c, cfg, real = fx
    p = params[fmt]
    raw = np.asarray(wv.decode(cfg, p, wv.denormalize(cfg, c["dec_latent"])))
    _close(raw, c["dec_raw"], "dec_raw", **PIX)
    _close(np.clip(raw, -1, 1), c["dec"], "dec", **PIX)
    np.testing.assert_array_equal(raw, decoded)  # same executables, same weights
    one = np.asarray(wv.decode(cfg, p, c["dec_latent_tlat1"], normalized=True))
    _close(one, c["dec_raw_tlat1"], "dec_raw_tlat1", **PIX)
    _close(np.clip(one, -1, 1), c["dec_tlat1"], "dec_tlat1", **PIX)
    _close(wv.decode(real, p, wv.denormalize(real, c["dec_latent"])), c["dec_raw_realconst"], "dec_raw_realconst",
           **PIX)


def test_vae_encode_rejects_other_frame_counts(fx, params):
    _, c, cfg, _ = fx
    ts = cfg.temporal_stride
    video = np.concatenate([c["video"], c["video"][:, :2]], 1)  # 2 frames past a whole chunk
    with pytest.raises(ValueError, match=f"1 \\+ {ts}k frames"):
        wv.encode(cfg, params["original"], video)


def test_vae_compile_count_independent_of_frame_count(fx, params, decoded):
    _, c, cfg, _ = fx
    p = params["original"]
    dec, enc = wv.WanVAEDecoder(cfg, p), wv.WanVAEEncoder(cfg, p)
    z = wv.denormalize(cfg, c["dec_latent"])
    wv.encode(cfg, p, c["video"])  # both directions compiled at this resolution (module fixtures did it too)
    n_dec, n_enc = dec.trace_count, enc.trace_count  # per process: other tests may have traced other param dtypes
    assert n_dec >= 2 and n_enc >= 1
    ts, t_lat = cfg.temporal_stride, z.shape[1]
    for n in (1, 2, 2 * t_lat - 1, t_lat + 2 * dec.block + 1):  # several blocks, partial blocks, a single frame
        idx = np.arange(n) % t_lat
        out = dec.decode(z[:, idx])
        assert out.shape == (3, 1 + ts * (n - 1), *decoded.shape[2:])
    long_video = np.concatenate([c["video"], c["video"][:, 1:], c["video"][:, 1:]], 1)
    m = enc.encode(long_video)
    assert m.shape[1] == 1 + (long_video.shape[1] - 1) // ts
    enc.encode(c["video"][:, :1])
    assert (dec.trace_count, enc.trace_count) == (n_dec, n_enc)
    # the prefix of a longer decode is the shorter decode (causal)
    np.testing.assert_allclose(np.asarray(dec.decode(jnp.concatenate([z, z], 1)))[:, :decoded.shape[1]], decoded,
                               atol=1e-6)


def test_vae_streaming_decode_matches_one_shot(fx, params, decoded):
    _, c, cfg, _ = fx
    dec = wv.WanVAEDecoder(cfg, params["original"])
    zn = c["dec_latent"]
    t_lat = zn.shape[1]
    for cut in sorted({1, max(1, t_lat // 2), t_lat - 1} - {0}):
        s = dec.stream(normalized=True)
        a, empty, b = s.push(zn[:, :cut]), s.push(zn[:, cut:cut]), s.push(zn[:, cut:])
        assert a.shape[1] == 1 + cfg.temporal_stride * (cut - 1) and empty.shape[1] == 0
        np.testing.assert_array_equal(np.concatenate([np.asarray(a), np.asarray(b)], 1), decoded)
    state, parts = None, []  # the functional form: state None starts a video
    for a, b in ((0, 1), (1, 1), (1, t_lat)):
        state, f = dec.feed(state, wv.denormalize(cfg, zn[:, a:b]))
        parts.append(np.asarray(f))
    np.testing.assert_array_equal(np.concatenate(parts, 1), decoded)
    # the same for the encoder, frames fed one by one
    enc = wv.WanVAEEncoder(cfg, params["original"])
    s = enc.stream()
    got = np.concatenate([np.asarray(s.push(c["video"][:, i:i + 1])) for i in range(c["video"].shape[1])], 1)
    assert s.pending is None
    np.testing.assert_array_equal(got, np.asarray(enc.encode(c["video"])))


def test_vae_bf16_decode_close_to_f32(fx, params, decoded):
    config, c, cfg, _ = fx
    cfg16 = wv.WanVAEConfig.from_kwargs(config["diffusers_AutoencoderKLWan_kwargs"], dtype="bfloat16")
    out = np.asarray(wv.decode(cfg16, params["original"], wv.denormalize(cfg16, c["dec_latent"])))
    err = np.abs(out - decoded)
    assert out.dtype == np.float32 and err.max() < BF16_MAX and err.mean() < BF16_MEAN, (err.max(), err.mean())


def test_vae_nnx_module(fx, params, decoded):
    _, c, cfg, _ = fx
    mod = wv.WanVAE(cfg, params["diffusers"])
    np.testing.assert_array_equal(np.asarray(mod.decode(c["dec_latent"], normalized=True)), decoded)
    _close(mod.encode(c["video"]), c["enc_moments"], "enc_moments", **LAT)
    assert len(jax.tree.leaves(nnx.state(mod, nnx.Param))) == len(jax.tree.leaves(params["diffusers"]))
