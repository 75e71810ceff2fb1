"""KV quantization: the study's RTN and soft-prune planner vs the kv_quant fixture, and the packed store.

Fixture folder: $FLOWCACHE_KV_QUANT_FIXTURE (relative paths from this folder), default ../shared/fixtures/kv_quant
next to the repository. Every size is read from the arrays, so fixtures of other shapes run unchanged.
"""

import math
import os
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flowcache_jax.kv import quant, quant_store, study
from tests.conftest import ROOT

TESTS = Path(__file__).resolve().parent
SUMMARY_TOL = 1e-6  # fp32 chunk means summed in another order (fixture README)


@pytest.fixture(scope="module")
def fixture_dir() -> Path:
    raw = os.environ.get("FLOWCACHE_KV_QUANT_FIXTURE")
    path = (TESTS / raw).resolve() if raw else ROOT.parent / "shared" / "fixtures" / "kv_quant"
    missing = [n for n in ("rtn.npz", "soft_prune.npz") if not (path / n).is_file()]
    if missing:
        pytest.fail(f"kv_quant fixture incomplete at {path}: missing {missing} (set FLOWCACHE_KV_QUANT_FIXTURE)")
    return path


@pytest.fixture(scope="module")
def rtn(fixture_dir):
    return dict(np.load(fixture_dir / "rtn.npz"))


@pytest.fixture(scope="module")
def sp(fixture_dir):
    return dict(np.load(fixture_dir / "soft_prune.npz"))


def case_bits(a: dict, case: str, part: str) -> int:
    """Bits of a case's K or V: the recorded ``_bits`` array, else the case name (int8, int4, k4v2)."""
    if f"{case}_{part}_bits" in a:
        return int(a[f"{case}_{part}_bits"])
    kv = re.search(r"k(\d)v(\d)", case)
    if kv:
        return int(kv.group(1 if part == "k" else 2))
    return int(re.search(r"int(\d)", case).group(1))


def test_kv_quant_rtn_cases_exact(rtn):
    cases = sorted(n[: -len("_k_codes")] for n in rtn if n.endswith("_k_codes"))
    assert cases, "no RTN cases in rtn.npz"
    group = int(rtn["block_size"])
    for case in cases:
        bf16 = "bf16" in case
        dtype = jnp.bfloat16 if bf16 else jnp.float32
        for part in "kv":
            x = rtn.get(f"{case}_{part}_in", rtn[part])
            xj = jnp.asarray(x).astype(dtype)
            np.testing.assert_array_equal(np.asarray(xj.astype(jnp.float32)), x)  # the input is exact in dtype
            codes, scales, pad = jax.jit(quant.quantize_groups, static_argnums=(1, 2))(
                xj, case_bits(rtn, case, part), group)
            np.testing.assert_array_equal(np.asarray(codes), rtn[f"{case}_{part}_codes"], err_msg=case)
            assert scales.dtype == jnp.float16
            np.testing.assert_array_equal(np.asarray(scales).view(np.uint16),
                                          rtn[f"{case}_{part}_scales"].view(np.uint16), err_msg=case)
            deq = quant.dequantize_groups(codes, scales, x.shape[1], dtype)
            assert deq.dtype == dtype and deq.shape == x.shape
            np.testing.assert_array_equal(np.asarray(deq.astype(jnp.float32)), rtn[f"{case}_{part}_deq"],
                                          err_msg=case)
            if f"{case}_pad_len" in rtn:
                assert pad == int(rtn[f"{case}_pad_len"])
        if f"{case}_memory_bytes" in rtn:
            b, length, h, d = rtn["k"].shape
            got = quant.study_memory_bytes(length, b, h, d, case_bits(rtn, case, "k"), case_bits(rtn, case, "v"),
                                           group)
            assert got == int(rtn[f"{case}_memory_bytes"]) == int(rtn[f"{case}_estimate_active_kv_bytes"])


def test_kv_quant_int8_primitive_and_special_groups(rtn):
    """INT8 (a generic-bits path, not a study config) and the fixture's all-zero / underflow groups."""
    codes, scales, _ = quant.quantize_groups(jnp.asarray(rtn["k"]), 8, int(rtn["block_size"]))
    np.testing.assert_array_equal(np.asarray(codes), rtn["prim_int8_k_codes"])
    assert int(np.abs(rtn["prim_int8_k_codes"]).max()) <= quant.qmax(8)
    _, s4, _ = quant.quantize_groups(jnp.asarray(rtn["k"]), 4, int(rtn["block_size"]))
    np.testing.assert_array_equal(np.asarray(s4) == 0, rtn["rtn_int4_k_scales"] == 0)  # fp16 underflow to 0


@pytest.mark.parametrize("bits", quant.BITS)
def test_kv_quant_pack_exhaustive(bits):
    q = quant.qmax(bits)
    per = 8 // bits
    values = np.arange(-q - 1, q + 1, dtype=np.int8)
    # every code at every field position of a byte
    codes = np.stack([np.roll(np.resize(values, values.size * per), s) for s in range(per)])
    codes = codes.reshape(per, -1)
    packed = quant.pack(jnp.asarray(codes), bits)
    assert packed.dtype == jnp.uint8 and packed.shape == (per, codes.shape[1] * bits // 8)
    np.testing.assert_array_equal(np.asarray(quant.unpack(packed, bits, codes.shape[1])), codes)
    if bits == 4:  # two's complement nibbles, element 2i low
        assert int(quant.pack(jnp.asarray([[-1, 3]], jnp.int8), 4)[0, 0]) == 0x3F


ROUNDTRIP = {bits: jax.jit(lambda c, bits=bits: quant.unpack(quant.pack(c, bits), bits, c.shape[-1]))
             for bits in quant.BITS}


@settings(max_examples=30, deadline=None)
@given(bits=st.sampled_from(quant.BITS), seed=st.integers(0, 2**31))
def test_kv_quant_pack_roundtrip_random(bits, seed):
    q = quant.qmax(bits)
    codes = np.random.default_rng(seed).integers(-q - 1, q + 1, (3, 2, 16)).astype(np.int8)
    np.testing.assert_array_equal(np.asarray(ROUNDTRIP[bits](jnp.asarray(codes))), codes)


# ---------------------------------------------------------------- soft-prune planner


def planner_cases(sp: dict, params: study.SoftPruneParams) -> list[dict]:
    """Every recorded quantize_kv call in order: layer data, active length, budget, plan stream (quantizer, layer)."""
    fsl, num_layers = int(sp["frame_seq_length"]), int(sp["num_layers"])
    out = []
    calls = sorted(int(m.group(1)) for n in sp for m in [re.fullmatch(r"call(\d+)_k", n)] if m)
    for c in calls:
        for layer in range(sp[f"call{c}_k"].shape[0]):
            k, v = sp[f"call{c}_k"][layer], sp[f"call{c}_v"][layer]
            out.append(dict(name=f"call{c}_layer{layer}", k=k, v=v, active=k.shape[1], fsl=fsl, stream=("calls", layer),
                            budget=study.layer_budget(params, layer, num_layers)))
    # The patch's meta carries only the dtype: the whole buffer is active (zero tail included), layer 0,
    # no layer count (budget 1.0). The active meta: local_end_index, layer 0 of num_layers. Fresh quantizers.
    for meta in sorted(n[len("buffer_"): -len("_tier")] for n in sp if n.startswith("buffer_") and n.endswith("_tier")):
        patch = meta == "patchmeta"
        active = sp["buffer_k"].shape[1] if patch else int(sp["buffer_active_len"])
        out.append(dict(name=f"buffer_{meta}", k=sp["buffer_k"], v=sp["buffer_v"], active=active, fsl=fsl,
                        stream=(meta, 0), budget=study.layer_budget(params, 0, None if patch else num_layers)))
    return out


def test_kv_quant_params_match_fixture(sp):
    assert study.SoftPruneParams.from_json(str(sp["params_json"])) == study.SoftPruneParams()


def test_kv_quant_planner_and_roundtrip(sp):
    params = study.SoftPruneParams.from_json(str(sp["params_json"]))
    cases = planner_cases(sp, params)
    n_cap = max(math.ceil(c["active"] / c["fsl"]) for c in cases)
    plan = jax.jit(study.plan_with_counts, static_argnames="params")
    streams: dict = {}  # per stream (quantizer instance, layer): (summary, n, plan)
    for case in cases:
        name, k, v, active, fsl = case["name"], case["k"], case["v"], case["active"], case["fsl"]
        n = math.ceil(active / fsl)
        for key in ("layer_budget", "active_seq_len"):
            if f"{name}_{key}" in sp:
                want = case["budget"] if key == "layer_budget" else active
                assert float(sp[f"{name}_{key}"]) == want, name
        heads = k.shape[2]
        prev_s, prev_n, prev_plan = streams.get(case["stream"], (jnp.zeros((n_cap, heads)), 0, None))
        refresh = bool(study.needs_refresh(n, prev_n))
        if f"{name}_plan_refreshed" in sp:
            assert refresh == bool(sp[f"{name}_plan_refreshed"]), name
        if refresh:
            summary = jnp.zeros((n_cap, heads), jnp.float32).at[:n].set(study.chunk_summaries(k, v, fsl, active))
            counts = jnp.asarray(study.count_table(params, case["budget"], n_cap))
            tiers, delta = plan(summary, n, prev_s, prev_n, counts, params=params)
            tiers = np.asarray(tiers)
            assert (tiers[n:] == study.BEYOND).all()
            tiers = tiers[:n]
            if f"{name}_delta_scores" in sp:
                np.testing.assert_allclose(np.asarray(delta)[:n], sp[f"{name}_delta_scores"], atol=1e-6, err_msg=name)
            streams[case["stream"]] = (summary, n, tiers)
        else:
            tiers = prev_plan
        np.testing.assert_array_equal(tiers, sp[f"{name}_tier"], err_msg=name)
        # the whole quantize -> dequantize of the layer
        summarised = np.repeat(tiers == study.SUMMARISED, fsl)[: k.shape[1]]
        summarised = np.pad(summarised, (0, k.shape[1] - summarised.size))
        deq = study.study_roundtrip(k, v, tiers, fsl, active, params)
        for part, got in zip("kv", deq, strict=True):
            want, got = sp[f"{name}_deq_{part}"], np.asarray(got)
            np.testing.assert_array_equal(got[:, ~summarised], want[:, ~summarised], err_msg=f"{name} {part}")
            np.testing.assert_allclose(got[:, summarised], want[:, summarised], atol=SUMMARY_TOL, rtol=0)
            assert not got[:, active:].any()
        if f"{name}_memory_bytes" in sp:
            b, _, h, d = k.shape
            assert study.study_layer_bytes(tiers, fsl, active, b, h, d, params, k.dtype.itemsize) == int(
                sp[f"{name}_memory_bytes"]), name


def test_kv_quant_planner_counts_python_round():
    """Counts are Python's round on float64 products, half to even, for any size."""
    params = study.SoftPruneParams()
    for budget in (0.75, 1.0, 1.1, 1.25, 4.5):
        table = study.count_table(params, budget, 200)
        for n in range(1, 201):
            recent = max(1, round(min(0.25 * budget, 1.0) * n))
            old = n - recent
            imp = min(old, max(1, round(0.2 * budget * old))) if old else 0
            ret = min(old - imp, max(1, round(0.3 * budget * (old - imp)))) if old - imp else 0
            assert tuple(table[n]) == (recent, imp, ret)
    assert tuple(study.count_table(params, 1.0, 10)[10]) == (2, 2, 2)  # round(2.5) = 2


def test_kv_quant_planner_ties_and_first_call():
    """delta = 1 on a first call: the recency ramp ranks; exact ties go to the older chunk."""
    h, n_cap = 2, 12
    summary = jnp.ones((n_cap, h))
    tiers, delta = study.plan(summary, 10, jnp.zeros((n_cap, h)), 0, 1.0)
    np.testing.assert_array_equal(np.asarray(delta), [1.0] * 10 + [0.0] * 2)
    np.testing.assert_array_equal(np.asarray(tiers), [3, 3, 3, 3, 2, 2, 1, 1, 0, 0, -1, -1])
    params = study.SoftPruneParams(importance_beta=0.0)  # all combined scores tie
    tiers, _ = study.plan(summary, 10, jnp.zeros((n_cap, h)), 0, 1.0, params)
    np.testing.assert_array_equal(np.asarray(tiers)[:10], [1, 1, 2, 2, 3, 3, 3, 3, 0, 0])
    assert not bool(study.needs_refresh(10, 10)) and bool(study.needs_refresh(10, 0))


# ---------------------------------------------------------------- packed store

MIX = quant_store.StoreConfig(frame_tokens=40, tiers=(quant_store.TierSpec(8, 5), quant_store.TierSpec(4, 10),
                                                      quant_store.TierSpec(2, 17)), summary=True)


def filled_store(cfg, layers, slots, heads, dim, frames, seed=0):
    """A store with ``frames`` = [(frame, slot), ...] written from random K/V and rankings; also the inputs."""
    rng = np.random.default_rng(seed)
    store = quant_store.empty(cfg, layers, slots, heads, dim, jnp.float32)
    encode = jax.jit(jax.vmap(lambda k, v, r: quant_store.encode_frame(k, v, r, cfg)))
    write = jax.jit(quant_store.write)
    inputs = {}
    for frame, slot in frames:
        k, v = (jnp.asarray(rng.standard_normal((layers, cfg.frame_tokens, heads, dim)), jnp.float32) for _ in "kv")
        rank = jax.vmap(quant_store.rank_tokens)(jnp.asarray(rng.standard_normal((layers, heads, cfg.frame_tokens))))
        store = write(store, encode(k, v, rank), slot, frame)
        inputs[slot] = (k, v, rank)
    return store, inputs


SLOT_TOKENS = jax.jit(quant_store.slot_tokens)


def reference_attention(q, store, layer, dense):
    """Plain softmax over the dense keys, every readable dequantized token, summaries repeated count times."""
    ks, vs = [k[valid] for k, _, valid in dense], [v[valid] for _, v, valid in dense]
    for slot in range(store.frame.shape[0]):
        if int(store.frame[slot]) < 0:
            continue
        k, v, ok = SLOT_TOKENS(store, layer, slot)
        ks.append(jnp.swapaxes(k[:, ok], 0, 1))
        vs.append(jnp.swapaxes(v[:, ok], 0, 1))
        if bool(store.summary_on[slot]):
            count = int(round(math.exp(float(store.sum_logn[layer, slot, 0]))))
            ks.append(jnp.repeat(store.sum_k[layer, slot][None], count, 0))
            vs.append(jnp.repeat(store.sum_v[layer, slot][None], count, 0))
    k, v = jnp.concatenate(ks), jnp.concatenate(vs)
    g = q.shape[1] // k.shape[1]
    k, v = jnp.repeat(k, g, axis=1), jnp.repeat(v, g, axis=1)
    p = jax.nn.softmax(jnp.einsum("qhd,nhd->hqn", q, k) / math.sqrt(q.shape[-1]), axis=-1)
    return jnp.einsum("hqn,nhd->qhd", p, v)


def test_kv_quant_store_config_errors():
    spec = quant_store.TierSpec
    with pytest.raises(ValueError, match="more than"):
        quant_store.StoreConfig(frame_tokens=8, tiers=(spec(4, 6), spec(2, 4)), summary=True)
    with pytest.raises(ValueError, match="bits"):
        quant_store.StoreConfig(frame_tokens=8, tiers=(spec(3, 4),), summary=False)
    with pytest.raises(ValueError, match="tuple"):
        quant_store.StoreConfig(frame_tokens=8, tiers=[spec(4, 4)], summary=False)
    with pytest.raises(ValueError, match="pack"):
        quant_store.empty(quant_store.StoreConfig(8, (spec(2, 4),), False), 1, 1, 1, 6, jnp.float32)


def test_kv_quant_store_encode_matches_rtn():
    """Each tier holds RTN of exactly the tokens its ranks name (per head, increasing), the rest is the summary."""
    layers, heads, dim = 2, 2, 16
    store, inputs = filled_store(MIX, layers, 3, heads, dim, [(7, 1)])
    k, v, rank = inputs[1]
    got_k, got_v, ok = SLOT_TOKENS(store, 1, 1)
    rtn = jax.jit(lambda x, bits: quant.dequantize_groups(*quant.quantize_groups(x, bits, MIX.group)[:2], x.shape[1],
                                                           jnp.float32), static_argnums=1)
    start = 0
    for i, t in enumerate(MIX.tiers):
        n_pad = MIX.n_pad(i)
        assert not ok[start + t.tokens: start + n_pad].any() and ok[start: start + t.tokens].all()
        for h in range(heads):
            idx = np.sort(np.asarray(rank[1, h, MIX.offset(i): MIX.offset(i) + t.tokens]))
            for x, got in ((k, got_k), (v, got_v)):
                want = rtn(x[1, idx, h][None, :, None], t.bits)[0, :, 0]
                np.testing.assert_array_equal(np.asarray(got[h, start: start + t.tokens]), np.asarray(want))
                assert not got[h, start + t.tokens: start + n_pad].any()
        start += n_pad
    rest = np.asarray(rank[1, :, MIX.kept:])
    for h in range(heads):
        np.testing.assert_allclose(store.sum_k[1, 1, h], k[1, rest[h], h].mean(0), atol=1e-6)
        np.testing.assert_allclose(store.sum_v[1, 1, h], v[1, rest[h], h].mean(0), atol=1e-6)
    np.testing.assert_allclose(store.sum_logn[:, 1], math.log(MIX.summarised), rtol=1e-6)
    assert int(store.frame[1]) == 7 and bool(store.summary_on[1]) and bool(store.tier_on[1].all())
    assert int(store.frame[0]) == -1 and not store.tier_on[0].any()


def test_kv_quant_store_attend_matches_reference():
    """Mixed 8/4/2-bit tiers, GQA 2, empty slots, a switched-off tier, a folded tier, a tiled dense part."""
    heads, dim = 2, 16
    store, _ = filled_store(MIX, 2, 6, heads, dim, [(0, 0), (1, 1), (2, 3), (3, 4)], seed=1)
    store = store.replace(tier_on=store.tier_on.at[3, 1].set(False))
    before = store
    store = jax.jit(quant_store.fold_tier, static_argnums=2)(store, 4, 2)
    k2, _, ok2 = SLOT_TOKENS(before, 0, 4)
    ok2 = ok2 & (jnp.arange(ok2.size) >= MIX.n_pad(0) + MIX.n_pad(1))  # tier 2's rows
    folded = (before.sum_k[0, 4] * MIX.summarised + k2[:, ok2].sum(1)) / (MIX.summarised + MIX.tiers[2].tokens)
    np.testing.assert_allclose(store.sum_k[0, 4], folded, atol=1e-6)
    rng = np.random.default_rng(2)
    q = jnp.asarray(rng.standard_normal((7, 2 * heads, dim)), jnp.float32)
    dense = [(jnp.asarray(rng.standard_normal((9, heads, dim)), jnp.float32),
              jnp.asarray(rng.standard_normal((9, heads, dim)), jnp.float32), jnp.arange(9) < 7)]
    attend = jax.jit(quant_store.attend, static_argnames="key_tile")
    for layer in (0, 1):
        got = attend(q, store, layer, dense, key_tile=4)
        np.testing.assert_allclose(got, reference_attention(q, store, layer, dense), atol=1e-5)
    late = attend(q, store, 1, dense, key_tile=4, min_frame=3)  # frames < 3 skipped
    only = store.replace(frame=jnp.where(store.frame >= 3, store.frame, -1))
    np.testing.assert_allclose(late, reference_attention(q, only, 1, dense), atol=1e-5)
    assert not bool(store.tier_on[4, 2]) and math.isclose(math.exp(float(store.sum_logn[0, 4, 0])),
                                                          MIX.summarised + MIX.tiers[2].tokens, rel_tol=1e-5)


def test_kv_quant_store_int8_close_to_full_precision():
    t, heads, dim = 32, 2, 16
    cfg = quant_store.StoreConfig(frame_tokens=t, tiers=(quant_store.TierSpec(8, t),), summary=False)
    store, inputs = filled_store(cfg, 1, 3, heads, dim, [(0, 0), (1, 2)], seed=3)
    q = jnp.asarray(np.random.default_rng(4).standard_normal((5, 4, dim)), jnp.float32)
    got = jax.jit(quant_store.attend)(q, store, 0)
    k = jnp.concatenate([inputs[s][0][0] for s in (0, 2)])
    v = jnp.concatenate([inputs[s][1][0] for s in (0, 2)])
    p = jax.nn.softmax(jnp.einsum("qhd,nhd->hqn", q, jnp.repeat(k, 2, 1)) / math.sqrt(dim), axis=-1)
    np.testing.assert_allclose(got, jnp.einsum("hqn,nhd->qhd", p, jnp.repeat(v, 2, 1)), atol=5e-3)


def test_kv_quant_store_attend_no_full_copy():
    """XLA's temp memory for attend stays far below one float32 dequantized copy of the store."""
    cfg = quant_store.StoreConfig(frame_tokens=256, tiers=(quant_store.TierSpec(8, 32), quant_store.TierSpec(4, 64),
                                                           quant_store.TierSpec(2, 96)), summary=True)
    slots, heads, dim = 64, 2, 64
    store = quant_store.empty(cfg, 1, slots, heads, dim, jnp.float32)
    q = jnp.zeros((16, 2 * heads, dim))
    dense = [(jnp.zeros((64, heads, dim)), jnp.zeros((64, heads, dim)), jnp.ones((64,), bool))]
    compiled = jax.jit(quant_store.attend, static_argnames="key_tile").lower(q, store, 0, dense, key_tile=32).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    full = 2 * slots * heads * sum(cfg.n_pad(i) for i in range(len(cfg.tiers))) * dim * 4
    assert temp < full / 8, (temp, full)
    assert quant_store.nbytes(store) < full / 4
    stats = quant_store.frame_stats(cfg, heads, dim)
    want = 2 * heads * (32 * dim + 64 * dim // 2 + 96 * dim // 4 + (32 + 64 + 96) // 16 * dim * 2 + dim * 2)
    assert stats["bytes"] == want and quant_store.accounted_bytes(cfg, 10, heads, dim, 3) == 30 * want
