"""MAGI-1 port vs the upstream golden fixture (per-call cases A, B1, B2), sizes read from the fixture."""

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from converters.keymaps.magi1 import convert_magi1
from converters.safetensors_io import SafetensorsReader
from models.layers import sinusoid_freqs, timestep_sinusoid
from models.magi1 import Magi1Config, empty_buffer, forward_call
from tests.conftest import ROOT

FIXTURE = Path(os.environ.get("FLOWCACHE_MAGI1_FIXTURE", ROOT.parent / "shared" / "fixtures" / "magi1_tiny"))
TIGHT = dict(rtol=1e-5, atol=2e-5)  # README: with the fixture's frequency table


def close(x, ref, rtol, atol):
    x = np.asarray(x, np.float64)
    ref = np.asarray(ref, np.float64).reshape(x.shape)
    scale = np.abs(ref).max()
    np.testing.assert_allclose(x / scale, ref / scale, rtol=rtol, atol=atol)


@pytest.fixture(scope="module")
def model():
    cfg = Magi1Config.from_upstream(json.loads((FIXTURE / "config.json").read_text())["model_config"])
    params = convert_magi1(SafetensorsReader(FIXTURE / "weights.safetensors"), cfg)
    return cfg, params


def run_call(cfg, params, case, pre, cache=None, freqs=True, key_tile=4096, inter=False):
    p = dict(params)
    if freqs:
        p["t_freqs"] = case["timestep_freqs_f32"]
    p = jax.tree.map(jnp.asarray, p)
    r = int(case[pre + "fwd0_kw_denoising_range_num"])
    dup = bool(case[pre + "fwd0_kw_distill_nearly_clean_chunk"])
    write = (r - int(dup)) if bool(case.get(pre + "fwd0_update_kv_cache", False)) else 0
    sp = int(case[pre + "fwd0_kw_slice_point"])
    if cache is None:  # a buffer just large enough for the rows this call reads and writes
        ctn = int(case[pre + "fwd0_clip_token_nums"])
        cache = empty_buffer(cfg, (sp + write) * ctn)
    return forward_call(cfg, p, case[pre + "fwd0_x"][0], case[pre + "fwd0_t"][0], case[pre + "fwd0_y"][:, 0],
                        case[pre + "fwd0_xattn_mask"][:, 0], case[pre + "fwd0_kv_range"], cache, sp,
                        int(case[pre + "fwd0_kw_num_steps"]), write, case[pre + "fwd0_kw_distill_interval"],
                        key_tile=key_tile, with_intermediates=inter)


@pytest.fixture(scope="module")
def case_a():
    return dict(np.load(FIXTURE / "case_A.npz"))


@pytest.fixture(scope="module")
def case_b():
    return dict(np.load(FIXTURE / "case_B.npz"))


def test_case_a_intermediates_and_output(model, case_a):
    cfg, params = model
    vel, _, it = run_call(cfg, params, case_a, "", inter=True)
    a = case_a
    close(timestep_sinusoid(jnp.asarray(a["fwd0_temb_t_in"]), jnp.asarray(a["timestep_freqs_f32"])),
          a["fwd0_temb_t_freq"], **TIGHT)
    close(it["x_embed"], a["fwd0_x_embed"], **TIGHT)
    close(jnp.concatenate([it["rope_sin"], it["rope_cos"]], -1), a["fwd0_rope"], **TIGHT)
    close(it["temb_t"], a["fwd0_temb_t_out"], **TIGHT)
    close(it["temb_dt"], a["fwd0_temb_dt_out"], **TIGHT)
    close(it["condition"], a["fwd0_condition"], **TIGHT)
    mask = a["fwd0_xattn_mask"][:, 0] > 0
    close(np.asarray(it["y_xattn"])[mask], a["fwd0_y_xattn_flat"], **TIGHT)
    for i in range(cfg.num_layers):
        close(it["layer_out"][i], a[f"fwd0_layer{i}_out"], **TIGHT)
    close(it["final_norm_out"], a["fwd0_final_norm_out"], **TIGHT)
    close(vel, a["fwd0_out"][0], **TIGHT)


def test_case_a_own_frequencies(model, case_a):
    """With frequencies computed here (not the fixture's table): the README's looser budget."""
    cfg, params = model
    assert np.abs(sinusoid_freqs(128) - case_a["timestep_freqs_f32"]).max() < 1e-6
    vel, _, _ = run_call(cfg, params, case_a, "", freqs=False)
    close(vel, case_a["fwd0_out"][0], rtol=1e-3, atol=2e-3)


def empty_cache(cfg, case_b):
    shape = case_b["B1_fwd0_kv_cache_after"].shape
    assert shape[-1] == 2 * cfg.kv_channels and shape[0] == cfg.num_layers
    z = jnp.zeros(shape[:-1] + (cfg.kv_channels,), jnp.float32)
    return z, z


def split(cache_kv):
    h = cache_kv.shape[-1] // 2
    return jnp.asarray(cache_kv[..., :h]), jnp.asarray(cache_kv[..., h:])


def joined(cache):
    return np.concatenate([np.asarray(cache[0]), np.asarray(cache[1])], -1)


@pytest.mark.parametrize("key_tile", [4096, 64])
def test_case_b_write_then_read(model, case_b, key_tile):
    """B1 writes K/V from an empty cache; B2 reads B1's rows and writes its own (also with tiled keys)."""
    cfg, params = model
    vel, cache, _ = run_call(cfg, params, case_b, "B1_", empty_cache(cfg, case_b), key_tile=key_tile)
    close(vel, case_b["B1_fwd0_out"][0], **TIGHT)
    close(joined(cache), case_b["B1_fwd0_kv_cache_after"], **TIGHT)
    vel, cache, _ = run_call(cfg, params, case_b, "B2_", cache, key_tile=key_tile)
    close(vel, case_b["B2_fwd0_out"][0], **TIGHT)
    close(joined(cache), case_b["B2_fwd0_kv_cache_after"], **TIGHT)


def test_case_b2_standalone(model, case_b):
    cfg, params = model
    vel, _, _ = run_call(cfg, params, case_b, "B2_", split(case_b["B1_fwd0_kv_cache_after"]))
    close(vel, case_b["B2_fwd0_out"][0], **TIGHT)


def test_case_b2_traced_slice_point_and_stale_rows(model, case_b):
    """One compiled call for any chunk: slice_point traced, a larger buffer whose rows past it hold garbage."""
    cfg, params = model
    b = case_b
    k, v = split(b["B1_fwd0_kv_cache_after"])
    ctn = int(b["B2_fwd0_clip_token_nums"])
    sp = int(b["B2_fwd0_kw_slice_point"])
    junk = jax.random.normal(jax.random.PRNGKey(0), (k.shape[0], 3 * ctn, *k.shape[2:]))
    k = jnp.concatenate([k[:, : sp * ctn], junk[:, : k.shape[1] - sp * ctn], junk], 1)
    v = jnp.concatenate([v[:, : sp * ctn], junk[:, : v.shape[1] - sp * ctn], junk], 1)
    p = jax.tree.map(jnp.asarray, dict(params, t_freqs=b["timestep_freqs_f32"]))
    r = int(b["B2_fwd0_kw_denoising_range_num"])
    dup = bool(b["B2_fwd0_kw_distill_nearly_clean_chunk"])
    write = (r - int(dup)) if bool(b["B2_fwd0_update_kv_cache"]) else 0
    fn = jax.jit(lambda p, buf, sp: forward_call(cfg, p, b["B2_fwd0_x"][0], b["B2_fwd0_t"][0], b["B2_fwd0_y"][:, 0],
                                                 b["B2_fwd0_xattn_mask"][:, 0], b["B2_fwd0_kv_range"], buf, sp,
                                                 int(b["B2_fwd0_kw_num_steps"]), write)[:2])
    vel, buf = fn(p, (k, v), jnp.int32(sp))
    close(vel, b["B2_fwd0_out"][0], **TIGHT)
    close(joined(buf)[:, : b["B2_fwd0_kv_cache_after"].shape[1]], b["B2_fwd0_kv_cache_after"], **TIGHT)


def test_nnx_module_matches_the_function(model, case_a):
    """The NNX module holds the same parameters as nnx.Param leaves and computes the same velocity."""
    from flax import nnx

    from models.magi1 import Magi1DiT

    cfg, params = model
    a = case_a
    p = jax.tree.map(jnp.asarray, dict(params, t_freqs=a["timestep_freqs_f32"]))
    dit = Magi1DiT(cfg, p)
    assert len(jax.tree.leaves(nnx.state(dit, nnx.Param))) == len(jax.tree.leaves(p))
    vel, _, _ = dit(a["fwd0_x"][0], a["fwd0_t"][0], a["fwd0_y"][:, 0], a["fwd0_xattn_mask"][:, 0], a["fwd0_kv_range"],
                    empty_buffer(cfg, 1), int(a["fwd0_kw_slice_point"]), int(a["fwd0_kw_num_steps"]), 0,
                    a["fwd0_kw_distill_interval"])
    close(vel, a["fwd0_out"][0], **TIGHT)


def test_tiled_attention_skips_masked_tiles_exactly():
    """Online-softmax tiles (with fully masked tiles skipped) equal one dense masked softmax."""
    from models.layers import range_attention

    key = jax.random.PRNGKey(0)
    q = jax.random.normal(key, (40, 4, 8))
    k = jax.random.normal(jax.random.fold_in(key, 1), (300, 2, 8))
    v = jax.random.normal(jax.random.fold_in(key, 2), (300, 2, 8))
    lo = jnp.repeat(jnp.asarray([0, 100, 250, 10]), 10)
    ranges = jnp.stack([jnp.stack([lo, lo + 30], -1), jnp.stack([lo * 0 + 290, lo * 0 + 300], -1)], 1)
    dense = range_attention(q, k, v, ranges, key_tile=512)
    tiled = range_attention(q, k, v, ranges, key_tile=16)
    np.testing.assert_allclose(tiled, dense, rtol=1e-5, atol=1e-6)


def test_bf16_activations(model, case_a):
    """The released weights run in bf16: same function within a bf16 budget (spec §3.10: ~1e-2 relative)."""
    import dataclasses

    import ml_dtypes

    cfg, params = model
    cfg16 = dataclasses.replace(cfg, dtype="bfloat16")
    p = dict(params)
    p["layers"] = jax.tree.map(lambda x: np.asarray(x).astype(ml_dtypes.bfloat16), p["layers"])
    vel, _, _ = run_call(cfg16, p, case_a, "")
    assert vel.dtype == jnp.float32
    err = np.abs(np.asarray(vel) - case_a["fwd0_out"][0]).max() / np.abs(case_a["fwd0_out"]).max()
    assert err < 3e-2, err


@pytest.mark.parametrize("impl", ["xla"])  # "fused" is XLA on a CPU (models.attention.resolve)
def test_fused_attention_matches_the_fixture(model, case_a, case_b, impl):
    """jax.nn.dot_product_attention (one masked call per chunk over [buffer ; own rows]) on every case: the
    fixture's outputs and K/V at the tight budget, as the tiled reference."""
    import dataclasses

    cfg, params = model
    cfg = dataclasses.replace(cfg, attention_impl=impl)
    vel, _, _ = run_call(cfg, params, case_a, "")
    close(vel, case_a["fwd0_out"][0], **TIGHT)
    vel, cache, _ = run_call(cfg, params, case_b, "B1_", empty_cache(cfg, case_b))
    close(vel, case_b["B1_fwd0_out"][0], **TIGHT)
    vel, cache, _ = run_call(cfg, params, case_b, "B2_", cache)
    close(vel, case_b["B2_fwd0_out"][0], **TIGHT)
    close(joined(cache), case_b["B2_fwd0_kv_cache_after"], **TIGHT)
