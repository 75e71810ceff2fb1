"""Importance-redundancy KV compression (spec/flowcache.md §4.1), static shapes, streamed over queries.

Per KV head: importance = mean over queries of the softmax over the clean keys of the logits (max over
the GQA group of query heads), max-pooled along tokens; redundancy = softmax of each key's mean cosine
similarity to the others, in the mean-first form ``(k̂_i · Σ_j k̂_j − 1) / L`` (Eq. 20, O(L) not O(L²));
score = λ·pooled − (1−λ)·redundancy; keep the top-B keys (``lax.top_k``, B static). Kept keys keep their
positions (RoPE is already baked in) and come out in descending-score order, as in the reference.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

STRATEGIES = ("token", "group")
WEIGHTINGS = ("no_weight", "polynomial")


@dataclasses.dataclass(frozen=True)
class CompressConfig:
    budget: int  # keys kept per KV head (static)
    mix_lambda: float = 0.07
    kernel: int = 7  # max-pool window along tokens
    strategy: str = "token"  # "token", or "group": score groups of ``group`` tokens (frames, chunks), keep whole
    group: int = 1
    min_shift: bool = False  # MAGI's token path subtracts the per-head minimum (ranking-neutral)
    weighting: str = "no_weight"  # MAGI: "polynomial" multiplies by 0.1 + 0.9 (pos / (L - 1))^power
    power: float = 3.0
    query_tile: int = 1024  # queries per logits block: [H_kv, query_tile, L] at a time

    def __post_init__(self):
        if self.strategy not in STRATEGIES or self.weighting not in WEIGHTINGS:
            raise ValueError(f"strategy must be in {STRATEGIES}, weighting in {WEIGHTINGS}")
        if self.budget < 1 or self.kernel < 1 or self.group < 1 or self.budget % self.group:
            raise ValueError(f"budget ({self.budget}) must be a positive multiple of group ({self.group})")


def gqa_logits(q: jax.Array, k: jax.Array) -> jax.Array:
    """[H_kv, Lq, L] logits / sqrt(D), the max over each KV head's group of query heads (before softmax)."""
    lq, hq, d = q.shape
    hk = k.shape[1]
    qg = q.reshape(lq, hk, hq // hk, d).astype(jnp.float32)
    s = jnp.einsum("qhgd,lhd->hgql", qg, k.astype(jnp.float32)) / math.sqrt(d)
    return s.max(axis=1)


def importance(q: jax.Array, k: jax.Array, query_tile: int = 1024) -> jax.Array:
    """[H_kv, L]: mean over queries of softmax over keys, computed a block of queries at a time."""
    lq = q.shape[0]
    tile = min(query_tile, lq)
    pad = (-lq) % tile
    qp = jnp.pad(q, ((0, pad), (0, 0), (0, 0)))
    valid = jnp.arange(lq + pad) < lq

    def block(acc, i):
        qt = jax.lax.dynamic_slice_in_dim(qp, i, tile)
        ok = jax.lax.dynamic_slice_in_dim(valid, i, tile)
        p = jax.nn.softmax(gqa_logits(qt, k), axis=-1)
        return acc + jnp.sum(jnp.where(ok[None, :, None], p, 0.0), axis=1), None

    total, _ = jax.lax.scan(block, jnp.zeros((k.shape[1], k.shape[0]), jnp.float32), jnp.arange(0, lq + pad, tile))
    return total / lq


def max_pool(x: jax.Array, kernel: int) -> jax.Array:
    """Stride-1 max-pool along the last axis with -inf padding of kernel // 2 (same length for odd kernels)."""
    pad = kernel // 2
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, kernel), (1, 1), ((0, 0), (pad, kernel - 1 - pad)))


def redundancy(k: jax.Array) -> jax.Array:
    """[H_kv, L]: softmax over keys of the mean cosine similarity to the other keys (mean-first form)."""
    kf = k.astype(jnp.float32)
    kn = kf / (jnp.linalg.norm(kf, axis=-1, keepdims=True) + 1e-8)  # [L, H, D]
    total = kn.sum(0)  # [H, D]
    sim = (jnp.einsum("lhd,hd->hl", kn, total) - 1.0) / k.shape[0]
    return jax.nn.softmax(sim, axis=-1)


def scores(q: jax.Array, k: jax.Array, cfg: CompressConfig) -> dict[str, jax.Array]:
    """Every intermediate of the scoring, [H_kv, L] each (``final`` is what the selection ranks)."""
    imp = importance(q, k, cfg.query_tile)
    pooled = max_pool(imp, cfg.kernel)
    red = redundancy(k)
    raw = cfg.mix_lambda * pooled - (1 - cfg.mix_lambda) * red
    final = raw
    if cfg.strategy == "token":
        if cfg.min_shift:
            final = final - final.min(-1, keepdims=True)
        if cfg.weighting == "polynomial":
            pos = jnp.arange(k.shape[0], dtype=jnp.float32) / max(k.shape[0] - 1, 1)
            final = final * (0.1 + 0.9 * pos**cfg.power)
    return {"importance": imp, "pooled": pooled, "redundancy": red, "raw": raw, "final": final}


def select(final: jax.Array, cfg: CompressConfig) -> tuple[jax.Array, jax.Array | None]:
    """Kept token indices [H_kv, B] in descending-score order (and group scores for the group strategy)."""
    if cfg.strategy == "token":
        return jax.lax.top_k(final, cfg.budget)[1], None
    h, length = final.shape
    group_scores = final[:, : length // cfg.group * cfg.group].reshape(h, -1, cfg.group).mean(-1)
    _, groups = jax.lax.top_k(group_scores, cfg.budget // cfg.group)
    idx = groups[:, :, None] * cfg.group + jnp.arange(cfg.group)
    return idx.reshape(h, cfg.budget), group_scores


def gather(x: jax.Array, idx: jax.Array) -> jax.Array:
    """x [L, H, D], idx [H, B] -> [B, H, D] (row r of head h is token idx[h, r])."""
    return jnp.take_along_axis(x, idx.T[:, :, None], axis=0)


def compress(q: jax.Array, k: jax.Array, v: jax.Array, cfg: CompressConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Keep the top-B clean keys/values per KV head: (k [B, H, D], v [B, H, D], indices [H, B])."""
    if cfg.budget > k.shape[0]:
        raise ValueError(f"budget {cfg.budget} exceeds the {k.shape[0]} clean keys")
    idx, _ = select(scores(q, k, cfg)["final"], cfg)
    return gather(k, idx), gather(v, idx), idx


def select_queries(q: jax.Array, granularity: str, frame_tokens: int, last_tokens: int = 50) -> jax.Array:
    """MAGI's query window: the last 50 tokens ("token"), the last frame ("frame") or all ("chunk")."""
    if granularity == "token":
        return q[-last_tokens:]
    if granularity == "frame":
        return q[-frame_tokens:]
    if granularity == "chunk":
        return q
    raise ValueError(f"query granularity must be token, frame or chunk, got {granularity!r}")
