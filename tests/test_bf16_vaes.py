"""bf16 Wan2.1 VAE and MAGI-1 ViT VAE: encode / decode vs the float32 golden fixtures, caches and tile buffers.

The references are the fixtures' float32 arrays (upstream's float32 run), which our float32 port reproduces to
~1e-6 relative (``test_wan_vae`` / ``test_magi1_vae`` assert it; a second float32 compile here would double the
cost), so "vs golden" is "vs float32". Tolerance: relative L2 <= 2e-2, as for the encoders (bf16 keeps 8
significant bits, ~2.3e-3 rms per rounding; ~40 stacked convs or 2 ViT blocks give ~0.5-1.1e-2 measured).
Every size comes from the fixture files (FLOWCACHE_WAN_VAE_FIXTURE / FLOWCACHE_MAGI1_VAE_FIXTURE).
"""

import dataclasses
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from converters.keymaps.magi1_vae import convert_magi1_vae
from converters.keymaps.wan_vae import convert_wan_vae
from converters.safetensors_io import SafetensorsReader
from models import magi1_vae as mv
from models import wan_vae as wv
from tests.conftest import ROOT
from tests.test_bf16_encoders import BF16, BF16_REL, check_precision, rel

SHARED = ROOT.parent / "shared" / "fixtures"
WAN = Path(os.environ.get("FLOWCACHE_WAN_VAE_FIXTURE", SHARED / "wan_vae_tiny"))
MAGI = Path(os.environ.get("FLOWCACHE_MAGI1_VAE_FIXTURE", SHARED / "magi1_vae_tiny"))


def _cases(folder: Path) -> dict:
    return {k: v[0] if v.ndim == 5 else v for k, v in np.load(folder / "cases.npz").items()}  # drop batch 1


def _spec(tree):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


def _dtypes(tree) -> set[str]:
    return {str(a.dtype) for a in jax.tree.leaves(tree)}


def _check_rule(cast: dict, half_precision_leaf) -> None:
    """Kernels in bf16, everything else (norm scales, biases, tables, CLS tokens) float32."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(cast):
        name = "/".join(str(k.key) for k in path)
        want = "bfloat16" if name.endswith("/kernel") else "float32"
        assert str(leaf.dtype) == want and half_precision_leaf(name) == (want == "bfloat16"), name


# ----- Wan2.1 VAE --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def wan():
    if not WAN.is_dir():
        pytest.skip(f"fixture {WAN} not found")
    config = json.loads((WAN / "config.json").read_text())
    cfg = wv.WanVAEConfig.from_kwargs(config["diffusers_AutoencoderKLWan_kwargs"])
    params = jax.tree.map(jnp.asarray, convert_wan_vae(SafetensorsReader(WAN / "weights_wan.safetensors"), cfg,
                                                       "original"))
    return dict(cases=_cases(WAN), cfg=cfg, cfg16=dataclasses.replace(cfg, **BF16), params=params,
                kwargs=config["diffusers_AutoencoderKLWan_kwargs"])


def test_bf16_wan_vae_encode_decode_close_to_f32(wan):
    """Decode of every latent frame (the first-frame and the K-frame executables, caches carried in bf16) and the
    single-frame encode (image-to-video). The K-chunk encode executable is checked structurally below (traced,
    not compiled: one more conv-heavy compile would cost ~4 s; measured 1.1e-2 on the fixture's video)."""
    c, cfg16, p = wan["cases"], wan["cfg16"], wan["params"]
    errs = {}
    for what, got, ref in (
            ("encode image", wv.encode(cfg16, p, c["image"]), c["enc_moments_image"]),
            ("decode", wv.decode(cfg16, p, c["dec_latent"], normalized=True), c["dec_raw"]),
            ("decode 1 frame", wv.decode(cfg16, p, c["dec_latent_tlat1"], normalized=True), c["dec_raw_tlat1"])):
        got = np.asarray(got)
        assert got.dtype == np.float32 and got.shape == ref.shape and np.all(np.isfinite(got)), what
        errs[what] = rel(got, ref)
    latent = np.asarray(wv.normalize(cfg16, wv.split_moments(wv.encode(cfg16, p, c["image"]))[0]))
    errs["latent_norm image"] = rel(latent, c["latent_norm_image"])
    print("\nwan vae bf16 rel L2 vs f32:", {k: f"{v:.2e}" for k, v in errs.items()})
    assert max(errs.values()) < BF16_REL, errs


def test_bf16_wan_vae_caches_are_bf16_and_stream_exactly(wan):
    """Every causal-conv cache (the carried scan state) is bf16 under dtype=bfloat16 (float32 otherwise), the
    frames stay float32, and a frame-by-frame streamed bf16 decode equals the one-shot bf16 decode exactly."""
    c, cfg16, p = wan["cases"], wan["cfg16"], wan["params"]
    z = np.asarray(wv.denormalize(cfg16, c["dec_latent"]))
    dec = wv.WanVAEDecoder(cfg16, p)
    assert _dtypes(dec.params) == {"bfloat16", "float32"}  # kernels cast once, at construction
    state, frames = dec.init(z[:, :1])
    assert _dtypes(state) == {"bfloat16"} and frames.dtype == jnp.float32
    k = dec.block
    state, frames = dec.step_block(state, np.zeros((z.shape[0], k, *z.shape[2:]), np.float32), np.ones(k, bool))
    assert _dtypes(state) == {"bfloat16"} and frames.dtype == jnp.float32
    enc = wv.WanVAEEncoder(cfg16, p)
    enc_state = enc.init(c["video"][:, :1])[0]
    assert _dtypes(enc_state) == {"bfloat16"}
    ts, kb = cfg16.temporal_stride, enc.block  # the K-chunk encoder keeps its caches bf16 (traced only)
    chunks = jax.ShapeDtypeStruct((3, ts * kb, *c["video"].shape[2:]), jnp.float32)
    out = jax.eval_shape(enc._prog._enc_block, _spec(enc.params), _spec(enc_state), chunks,
                         jax.ShapeDtypeStruct((kb,), bool))
    assert _dtypes(out[0]) == {"bfloat16"} and out[1].dtype == jnp.float32
    prog32 = wv.programs_for(wan["cfg"])  # float32: traced only (no compile)
    assert _dtypes(jax.eval_shape(prog32._dec_init, _spec(p), jax.ShapeDtypeStruct(z[:, :1].shape, jnp.float32))[0]) \
        == {"float32"}
    stream = dec.stream()
    parts = [np.asarray(stream.push(z[:, i:i + 1])) for i in range(z.shape[1])]
    np.testing.assert_array_equal(np.concatenate(parts, 1), np.asarray(dec.decode(z)))


def test_bf16_wan_vae_param_dtype_and_traced_precision(wan):
    cfg16, p = wan["cfg16"], wan["params"]
    cast = wv.cast_params(cfg16, p)
    _check_rule(cast, wv.half_precision_leaf)
    assert wv.cast_params(wan["cfg"], p) is p  # param_dtype "" keeps the given arrays
    assert jax.tree.map(lambda a: a.dtype, wv.WanVAE(cfg16, p).param_dict()) == jax.tree.map(lambda a: a.dtype, cast)
    assert wv.programs_for(cfg16) is wv.programs_for(dataclasses.replace(cfg16, param_dtype=""))  # shared compiles
    assert wv.WanVAEConfig.from_kwargs(wan["kwargs"], **BF16) == cfg16
    with pytest.raises(ValueError, match="param_dtype"):
        dataclasses.replace(cfg16, param_dtype="bf16")
    # traced: every conv / matmul operand bf16; RMS norms (sqrt), SiLU (logistic), softmax (exp) float32
    prog, z = wv.programs_for(cfg16), wan["cases"]["dec_latent"]
    first = jax.ShapeDtypeStruct((z.shape[0], 1, *z.shape[2:]), jnp.float32)
    check_precision(jax.make_jaxpr(prog._dec_init)(_spec(cast), first), "bfloat16")
    state = jax.eval_shape(prog._dec_init, _spec(cast), first)[0]
    block = jax.ShapeDtypeStruct((z.shape[0], 2, *z.shape[2:]), jnp.float32)
    seen = check_precision(jax.make_jaxpr(prog._dec_block)(_spec(cast), state, block,
                                                           jax.ShapeDtypeStruct((2,), bool)), "bfloat16")
    assert {"sqrt", "logistic"} <= set(seen)
    v = wan["cases"]["video"]
    frame = jax.ShapeDtypeStruct((3, 1, *v.shape[2:]), jnp.float32)
    check_precision(jax.make_jaxpr(prog._enc_init)(_spec(cast), frame), "bfloat16")
    state = jax.eval_shape(prog._enc_init, _spec(cast), frame)[0]
    chunks = jax.ShapeDtypeStruct((3, 2 * cfg16.temporal_stride, *v.shape[2:]), jnp.float32)
    check_precision(jax.make_jaxpr(prog._enc_block)(_spec(cast), state, chunks, jax.ShapeDtypeStruct((2,), bool)),
                    "bfloat16")


# ----- MAGI-1 ViT VAE ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def magi():
    if not MAGI.is_dir():
        pytest.skip(f"fixture {MAGI} not found")
    cfg = mv.Magi1VAEConfig.from_config(json.loads((MAGI / "config.json").read_text()))
    params = jax.tree.map(jnp.asarray, convert_magi1_vae(SafetensorsReader(MAGI / "weights.safetensors"), cfg))
    return dict(cases=_cases(MAGI), cfg=cfg, cfg16=dataclasses.replace(cfg, **BF16), params=params)


def test_bf16_magi1_vae_encode_decode_close_to_f32(magi):
    """Untiled encode and the pipeline's tiled decode (bf16 tile buffers, float32 blending; several tiles, so
    edge tiles with a resized position table). The untiled decode is the same tile function on another grid:
    traced below, not compiled (measured 4.5e-3)."""
    c, cfg16, p = magi["cases"], magi["cfg16"], magi["params"]
    tiled = mv.tiled_decode(cfg16, p, c["tiled_dec_dit_latent"] / cfg16.scale_factor)
    errs = {}
    for what, got, ref in (("encode (mode)", mv.encode(cfg16, p, c["video"]), c["enc_mode"]),
                           ("tiled decode", tiled, c["tiled_dec"])):
        assert got.dtype == jnp.float32 and got.shape == ref.shape and bool(jnp.all(jnp.isfinite(got))), what
        errs[what] = rel(got, ref)
    u8 = np.asarray(mv.to_uint8_tchw(tiled), np.int32) - c["tiled_dec_uint8"].astype(np.int32)
    print("\nmagi1 vae bf16 rel L2 vs f32:", {k: f"{v:.2e}" for k, v in errs.items()},
          f"uint8 frames: mean |d| {np.abs(u8).mean():.3f}, max {np.abs(u8).max()}")
    assert max(errs.values()) < BF16_REL, errs
    # uint8: ~2e-2 relative on values of O(1) is a few of 255 levels; on average well under one
    assert np.abs(u8).mean() < 1.0 and np.abs(u8).max() <= 16


def test_bf16_magi1_vae_tile_buffers_and_traced_precision(magi):
    """The tile functions return their buffers in the compute dtype; every matmul / conv operand bf16; the
    per-head q/k/v norm, LayerNorms (rsqrt / sqrt) and softmax (exp) float32. Traced only."""
    c, cfg16, p = magi["cases"], magi["cfg16"], magi["params"]
    cast = mv.cast_params(cfg16, p)
    _check_rule(cast, mv.half_precision_leaf)
    assert mv.cast_params(magi["cfg"], p) is p
    assert jax.tree.map(lambda a: a.dtype, mv.Magi1VAE(cfg16, p).param_dict()) == jax.tree.map(lambda a: a.dtype,
                                                                                                cast)
    z, video = c["dec_latent"], c["video"]
    grid = tuple(z.shape[1:])
    pos = jax.ShapeDtypeStruct((1 + int(np.prod(grid)), cfg16.embed_dim), jnp.float32)
    valid = jax.ShapeDtypeStruct((3,), jnp.int32)
    for cfg, want in ((cfg16, "bfloat16"), (magi["cfg"], "float32")):
        out = jax.eval_shape(lambda q, x, t, v, cf=cfg: mv._decode_tile(cf, q["decoder"], x, t, v), _spec(cast),
                             jax.ShapeDtypeStruct(z.shape, jnp.float32), pos, valid)
        assert str(out.dtype) == want
        out = jax.eval_shape(lambda q, x, t, v, cf=cfg: mv._encode_tile(cf, q["encoder"], x, t, v), _spec(cast),
                             jax.ShapeDtypeStruct(video.shape, jnp.float32), pos, valid)
        assert str(out.dtype) == want
    seen = check_precision(jax.make_jaxpr(lambda q, x: mv.decode(cfg16, q, x))(_spec(cast), _spec(z)), "bfloat16")
    assert {"exp", "rsqrt", "sqrt"} <= set(seen)
    check_precision(jax.make_jaxpr(lambda q, x: mv.encode(cfg16, q, x))(_spec(cast), _spec(video)), "bfloat16")
    with pytest.raises(ValueError, match="dtype"):
        dataclasses.replace(cfg16, dtype="float16")
