"""KV compression vs the FlowCache reference compressors (kv_compress fixture), plus properties."""

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flowcache_jax.kv import compress as kvc
from tests.conftest import ROOT

FIXTURE = Path(os.environ.get("FLOWCACHE_KV_FIXTURE", ROOT.parent / "shared" / "fixtures" / "kv_compress"))
PARAMS = json.loads((FIXTURE / "params.json").read_text())
CASES = sorted(k for k in PARAMS if not k.startswith("_"))
SCORE_TOL = dict(rtol=1e-5, atol=1e-7)  # README's suggested port tolerances


def case_setup(name: str):
    p = PARAMS[name]
    a = dict(np.load(FIXTURE / f"{name}.npz"))
    l_clean = int(p["L_clean"])
    magi = "MAGI" in p["implementation"]
    group = 1
    if p["compress_strategy"] != "token":
        group = int(p.get("frame_size") or p.get("tokens_per_frame"))
    cfg = kvc.CompressConfig(
        budget=int(p["budget"]), mix_lambda=float(p["mix_lambda"]), kernel=int(p["kernel_size"]),
        strategy="token" if p["compress_strategy"] == "token" else "group", group=group,
        min_shift=magi, weighting=p.get("score_weighting_method", "no_weight"), power=float(p.get("power", 3)))
    q = a["q"]
    if magi:
        q = kvc.select_queries(jnp.asarray(q), p["query_granularity"], int(p["tokens_per_frame"]))
        np.testing.assert_array_equal(q, a["q_used"])
    return p, a, cfg, jnp.asarray(q), l_clean


@pytest.mark.parametrize("name", CASES)
def test_scores_and_kept_indices(name):
    p, a, cfg, q, l_clean = case_setup(name)
    k, v = jnp.asarray(a["k"]), jnp.asarray(a["v"])
    np.testing.assert_allclose(kvc.gqa_logits(q, k), a["attn_logits"], atol=1e-5)
    s = kvc.scores(q, k[:l_clean], cfg)
    np.testing.assert_allclose(s["importance"], a["importance"], **SCORE_TOL)
    np.testing.assert_allclose(s["pooled"], a["pooled_importance"], **SCORE_TOL)
    np.testing.assert_allclose(s["redundancy"], a["redundancy"], **SCORE_TOL)
    if "final_score" in a:  # frame cases keep the raw score (their group scores are checked below)
        np.testing.assert_allclose(s["final"], a["final_score"], **SCORE_TOL)
    if "final_score_raw" in a:
        np.testing.assert_allclose(s["raw"], a["final_score_raw"], **SCORE_TOL)
    idx, group_scores = kvc.select(s["final"], cfg)
    np.testing.assert_array_equal(idx, a["selected_indices"])  # same tokens, same (descending-score) order
    if "frame_scores" in a:
        np.testing.assert_allclose(group_scores, a["frame_scores"], **SCORE_TOL)
    kc, vc, _ = kvc.compress(q, k[:l_clean], v[:l_clean], cfg)
    np.testing.assert_array_equal(jnp.concatenate([kc, k[l_clean:]]), a["k_compressed"])
    np.testing.assert_array_equal(jnp.concatenate([vc, v[l_clean:]]), a["v_compressed"])


@pytest.mark.parametrize("name", CASES)
def test_query_streaming_does_not_change_scores(name):
    _, a, cfg, q, l_clean = case_setup(name)
    k = jnp.asarray(a["k"])[:l_clean]
    whole = kvc.importance(q, k, query_tile=4096)
    np.testing.assert_allclose(kvc.importance(q, k, query_tile=7), whole, rtol=1e-6, atol=1e-9)


def random_qk(seed, lq=24, hq=4, hk=2, length=40, d=8):
    key = jax.random.PRNGKey(seed)
    q = jax.random.normal(key, (lq, hq, d))
    k = jax.random.normal(jax.random.fold_in(key, 1), (length, hk, d))
    return q, k


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 1000), budget=st.integers(1, 40))
def test_lambda_extremes(seed, budget):
    """λ = 1: the top pooled-importance values; λ = 0: the B least redundant keys."""
    q, k = random_qk(seed)
    s = kvc.scores(q, k, kvc.CompressConfig(budget=budget))
    idx1, _ = kvc.select(kvc.scores(q, k, kvc.CompressConfig(budget=budget, mix_lambda=1.0))["final"],
                         kvc.CompressConfig(budget=budget))
    kept = np.take_along_axis(np.asarray(s["pooled"]), np.asarray(idx1), -1)  # ties: compare values, not indices
    np.testing.assert_allclose(np.sort(kept, -1), np.sort(np.asarray(s["pooled"]), -1)[:, ::-1][:, :budget][:, ::-1])
    idx0, _ = kvc.select(kvc.scores(q, k, kvc.CompressConfig(budget=budget, mix_lambda=0.0))["final"],
                         kvc.CompressConfig(budget=budget))
    red = np.asarray(s["redundancy"])
    np.testing.assert_array_equal(np.sort(idx0, -1), np.sort(np.argsort(red, -1, kind="stable")[:, :budget], -1))


def test_idempotent_under_budget():
    """Compressing a buffer that already fits the budget keeps every key (as a set, per head)."""
    q, k = random_qk(3)
    kc, vc, idx = kvc.compress(q, k, k, kvc.CompressConfig(budget=k.shape[0]))
    for h in range(k.shape[1]):
        assert sorted(np.asarray(idx[h]).tolist()) == list(range(k.shape[0]))
    kc2, _, _ = kvc.compress(q, kc, vc, kvc.CompressConfig(budget=kc.shape[0]))
    assert {tuple(r) for r in np.asarray(kc2[:, 0])} == {tuple(r) for r in np.asarray(k[:, 0])}


def test_mean_first_equals_full_matrix():
    """Eq. 20's mean-first redundancy equals the explicit L x L cosine form (up to the 1e-8 norm epsilon)."""
    _, k = random_qk(5, length=33)
    kn = np.asarray(k, np.float64)
    kn = kn / (np.linalg.norm(kn, axis=-1, keepdims=True) + 1e-8)
    full = np.einsum("ihd,jhd->hij", kn, kn)
    for h in range(full.shape[0]):
        np.fill_diagonal(full[h], 0.0)
    m = full.mean(-1)
    ref = np.exp(m - m.max(-1, keepdims=True))
    ref /= ref.sum(-1, keepdims=True)
    np.testing.assert_allclose(kvc.redundancy(k), ref, rtol=1e-5)


def test_budget_errors():
    with pytest.raises(ValueError, match="multiple of group"):
        kvc.CompressConfig(budget=10, strategy="group", group=4)
    q, k = random_qk(0)
    with pytest.raises(ValueError, match="exceeds"):
        kvc.compress(q, k, k, kvc.CompressConfig(budget=k.shape[0] + 1))
