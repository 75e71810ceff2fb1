"""The study's FLOWCACHE soft-prune INT4 recipe (spec/self_forcing.md §4): the baseline our store must beat.

Per layer the cache is cut into chunks of ``frame_seq_length`` tokens (one latent frame). Each chunk gets a
summary (mean|K| + mean|V| per head) and a score ``alpha * delta + beta * recency`` where delta is the
relative change of its summary against the previous plan's, aligned from the tail. The newest chunks are
"recent", the best-scoring old ones "important", the next "retained" (all three RTN INT4), and every other
chunk is replaced by its mean token. ``plan`` is pure JAX with static shapes (the planner can run inside a
compiled sampler); ``study_roundtrip`` is host-side reference code for parity with the kv_quant fixture.

Counts use Python's ``round`` on float64 products (half to even). They depend only on the chunk count, so
``count_table`` evaluates them exactly on the host for every possible count and the graph indexes the table:
no float32 re-derivation of a float64 rounding.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from flowcache_jax.kv import quant

RECENT, IMPORTANT, RETAINED, SUMMARISED, BEYOND = 0, 1, 2, 3, -1


@dataclasses.dataclass(frozen=True)
class SoftPruneParams:
    """Constructor arguments of the study's ``FLOWCACHE_NATIVE_SOFT_PRUNE_INT4`` (its CLI defaults)."""

    bits: int = 4  # retained tier
    block_size: int = 16
    chunk_recent_ratio: float = 0.25
    recent_bits: int = 4  # recent and important tiers
    recent_method: str = "RTN"
    old_method: str = "RTN"
    layer_budget_table: tuple[tuple[int, float], ...] | None = None  # (layer, budget) pairs
    min_layer_budget_scale: float = 0.75
    max_layer_budget_scale: float = 1.25
    important_old_ratio: float = 0.20
    retained_old_ratio: float = 0.30
    importance_alpha: float = 0.7
    importance_beta: float = 0.3
    refresh_gap_chunks: int = 1  # has no effect: the study re-plans on any change of the chunk count

    @classmethod
    def from_json(cls, text: str) -> SoftPruneParams:
        """Parse the fixture's ``params_json`` (a JSON object of constructor kwargs)."""
        raw = json.loads(text)
        table = raw.get("layer_budget_table")
        if isinstance(table, Mapping):
            raw["layer_budget_table"] = tuple(sorted((int(k), float(b)) for k, b in table.items()))
        return cls(**raw)


def layer_budget(params: SoftPruneParams, layer: int, num_layers: int | None) -> float:
    """Budget scale of a layer: the table's entry, else linear from min (layer 0) to max (last layer)."""
    table = dict(params.layer_budget_table or ())
    if layer in table:
        return float(table[layer])
    if not num_layers or num_layers <= 1:
        return 1.0
    progress = float(max(0, min(layer, num_layers - 1))) / float(num_layers - 1)
    return params.min_layer_budget_scale + progress * (params.max_layer_budget_scale - params.min_layer_budget_scale)


def tier_counts(params: SoftPruneParams, budget: float, n: int) -> tuple[int, int, int]:
    """(recent, important, retained) chunk counts for n chunks, in the study's float64 + ``round`` arithmetic."""
    if n <= 0:
        return 0, 0, 0
    recent = min(max(1, int(round(min(params.chunk_recent_ratio * budget, 1.0) * n))), n)
    old = n - recent
    important = 0
    if old and params.important_old_ratio > 0.0:
        important = min(old, max(1, int(round(params.important_old_ratio * budget * old))))
    rest = old - important
    retained = 0
    if rest and params.retained_old_ratio > 0.0:
        retained = min(rest, max(1, int(round(params.retained_old_ratio * budget * rest))))
    return recent, important, retained


def count_table(params: SoftPruneParams, budget: float, n_cap: int) -> np.ndarray:
    """int32 [n_cap + 1, 3]: ``tier_counts`` for every chunk count 0..n_cap (stack these for traced layers)."""
    return np.asarray([tier_counts(params, budget, n) for n in range(n_cap + 1)], np.int32)


def needs_refresh(n: jax.Array | int, prev_n: jax.Array | int) -> jax.Array:
    """The study re-plans iff the chunk count changed (``prev_n`` 0: no plan yet)."""
    return jnp.logical_or(jnp.asarray(prev_n) == 0, jnp.asarray(n) != jnp.asarray(prev_n))


def _rank(score: jax.Array, eligible: jax.Array) -> jax.Array:
    """Position of each row in descending score order among eligible rows (ties: older row first)."""
    order = jnp.argsort(jnp.where(eligible, -score, jnp.inf), stable=True)
    return jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))


def delta_scores(summary: jax.Array, n_valid: jax.Array, prev_summary: jax.Array, prev_n: jax.Array
                 ) -> jax.Array:
    """[N_cap] relative L1 change per chunk vs the previous summaries, tail-aligned; 1.0 without a partner.

    Row i (of n_valid) is compared with previous row i - n_valid + prev_n, so after growth the newest
    chunks meet the old newest ones and the oldest chunks score 1.0 (the study's quirk). Rows past n_valid: 0.
    """
    n_cap = summary.shape[0]
    idx = jnp.arange(n_cap)
    overlap = jnp.minimum(prev_n, n_valid)
    paired = (idx < n_valid) & (idx >= n_valid - overlap)
    prev = prev_summary[jnp.clip(idx - n_valid + prev_n, 0, prev_summary.shape[0] - 1)].astype(jnp.float32)
    cur = summary.astype(jnp.float32)
    rel = jnp.mean(jnp.abs(cur - prev), axis=1) / jnp.maximum(jnp.mean(jnp.abs(prev), axis=1), 1e-6)
    return jnp.where(paired, rel, jnp.where(idx < n_valid, 1.0, 0.0)).astype(jnp.float32)


def plan_with_counts(summary: jax.Array, n_valid: jax.Array, prev_summary: jax.Array, prev_n: jax.Array,
                     counts: jax.Array, params: SoftPruneParams = SoftPruneParams()
                     ) -> tuple[jax.Array, jax.Array]:
    """``plan`` with the budget given as its ``count_table`` ([N_cap + 1, 3], may be traced)."""
    n_cap = summary.shape[0]
    idx = jnp.arange(n_cap)
    n_valid = jnp.asarray(n_valid, jnp.int32)
    n_recent, n_important, n_retained = jnp.asarray(counts)[n_valid]
    delta = delta_scores(summary, n_valid, prev_summary, jnp.asarray(prev_n, jnp.int32))
    ramp = idx.astype(jnp.float32) / jnp.maximum(n_valid - 1, 1).astype(jnp.float32)  # linspace(0, 1, n)
    combined = jnp.float32(params.importance_alpha) * delta + jnp.float32(params.importance_beta) * ramp
    valid = idx < n_valid
    recent = valid & (idx >= n_valid - n_recent)
    old = valid & ~recent
    important = old & (_rank(combined, old) < n_important)
    rest = old & ~important
    retained = rest & (_rank(combined, rest) < n_retained)
    tiers = jnp.select([~valid, recent, important, retained], [BEYOND, RECENT, IMPORTANT, RETAINED], SUMMARISED)
    return tiers.astype(jnp.int8), delta


def plan(summary: jax.Array, n_valid: jax.Array, prev_summary: jax.Array, prev_n: jax.Array, budget: float,
         params: SoftPruneParams = SoftPruneParams()) -> tuple[jax.Array, jax.Array]:
    """Tier per chunk (int8 [N_cap]: 0 recent, 1 important, 2 retained, 3 summarised, -1 past n_valid), delta.

    ``summary`` / ``prev_summary`` [N_cap, H] rows oldest -> newest, the first ``n_valid`` / ``prev_n``
    meaningful (``prev_n`` 0: first call, delta 1). ``budget`` is a Python float (``layer_budget``).
    Whether to call at all is ``needs_refresh``; a non-refresh call reuses the plan and the old summaries.
    """
    return plan_with_counts(summary, n_valid, prev_summary, prev_n, count_table(params, budget, summary.shape[0]),
                            params)


def chunk_summaries(k: jax.Array, v: jax.Array, frame_seq_length: int, active_len: int) -> jax.Array:
    """[N, H] float32: mean|k| + mean|v| over (batch, tokens, dim) of each chunk of ``active_len`` tokens."""
    n = math.ceil(active_len / frame_seq_length)
    pad = n * frame_seq_length - active_len

    def per_chunk(x):
        a = jnp.abs(jnp.asarray(x)[:, :active_len].astype(jnp.float32))
        a = jnp.pad(a, ((0, 0), (0, pad), (0, 0), (0, 0)))
        b, _, h, d = a.shape
        sums = a.reshape(b, n, frame_seq_length, h, d).sum(axis=(0, 2, 4))
        lengths = np.minimum(frame_seq_length, active_len - np.arange(n) * frame_seq_length)
        return sums / jnp.asarray(lengths * b * d, jnp.float32)[:, None]

    return per_chunk(k) + per_chunk(v)


def _tier_tokens(tiers: np.ndarray, tier: int, frame_seq_length: int, active_len: int) -> np.ndarray:
    """Token indices of a tier's chunks, increasing (the last chunk may be short)."""
    parts = [np.arange(c * frame_seq_length, min((c + 1) * frame_seq_length, active_len))
             for c in np.flatnonzero(tiers == tier)]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def _tier_bits(params: SoftPruneParams, tier: int) -> int:
    return params.recent_bits if tier in (RECENT, IMPORTANT) else params.bits


def study_roundtrip(k: jax.Array, v: jax.Array, tiers: np.ndarray, frame_seq_length: int, active_len: int,
                    params: SoftPruneParams = SoftPruneParams(), dtype=jnp.float32) -> tuple[jax.Array, jax.Array]:
    """Reference (host) quantize -> dequantize of one layer's cache [B, S, H, D] under a chunk plan.

    Each tier's tokens, concatenated in increasing order, go through ``quantize_groups`` (groups straddle
    chunk boundaries, each tier padded on its own); a summarised chunk becomes its float32 token mean cast
    to k's dtype; tokens past ``active_len`` are 0. Output in ``dtype`` (the study's ``tensor_dtype``).
    """
    n = math.ceil(active_len / frame_seq_length)
    tiers = np.asarray(tiers)[:n]
    out = []
    for x in (jnp.asarray(k), jnp.asarray(v)):
        y = jnp.zeros(x.shape, dtype)
        for tier in (RECENT, IMPORTANT, RETAINED):
            idx = _tier_tokens(tiers, tier, frame_seq_length, active_len)
            if idx.size:
                codes, scales, _ = quant.quantize_groups(x[:, idx], _tier_bits(params, tier), params.block_size)
                y = y.at[:, idx].set(quant.dequantize_groups(codes, scales, idx.size, dtype))
        for c in np.flatnonzero(tiers == SUMMARISED):
            lo, hi = c * frame_seq_length, min((c + 1) * frame_seq_length, active_len)
            mean = x[:, lo:hi].astype(jnp.float32).mean(axis=1, keepdims=True).astype(x.dtype)
            y = y.at[:, lo:hi].set(jnp.broadcast_to(mean, (x.shape[0], hi - lo) + x.shape[2:]).astype(dtype))
        out.append(y)
    return out[0], out[1]


def study_layer_bytes(tiers: np.ndarray, frame_seq_length: int, active_len: int, batch: int, heads: int, dim: int,
                      params: SoftPruneParams = SoftPruneParams(), summary_itemsize: int = 4) -> int:
    """The study's ``memory_bytes`` of one layer's state: RTN bytes per tier, 8 bytes per stored token index
    (int64), the summary tokens (K and V, ``summary_itemsize`` each: the cache dtype) and 16 bytes per span."""
    n = math.ceil(active_len / frame_seq_length)
    tiers = np.asarray(tiers)[:n]
    total = 0
    for tier in (RECENT, IMPORTANT, RETAINED):
        count = _tier_tokens(tiers, tier, frame_seq_length, active_len).size
        if count:
            bits = _tier_bits(params, tier)
            total += quant.study_memory_bytes(count, batch, heads, dim, bits, bits, params.block_size) + 8 * count
    spans = int(np.sum(tiers == SUMMARISED))
    return total + spans * (2 * batch * heads * dim * summary_itemsize + 16)
