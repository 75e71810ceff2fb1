"""A fixed-shape, bit-packed K/V store of finished frames, read by attention one tile at a time.

What the study (spec/self_forcing.md §4) does not: every token is quantized **once**, when its frame is
finished (``encode_frame`` + ``write``); codes stay bit-packed (``quant.pack``); ``attend`` dequantizes one
slot's tier at a time inside its online softmax, so no full-precision copy of the history ever exists.

Layout, for layers L, slots S (one latent frame each, a ring the caller manages), KV heads H, head dim D:
per tier i (``TierSpec(bits, tokens)``), the frame's ``tokens`` most important tokens *of each head* that the
tiers before it did not take, in increasing token order, padded to ``n_pad`` (a multiple of the scale group)
with zero rows; codes uint8 [L, S, H, n_pad, D*bits//8], float16 scales [L, S, H, n_pad//group, D] (one per
16 tokens of a head and channel, the study's RTN). Tokens in no tier fold into one summary key per
(frame, head): mean K, mean V and log(count), which in attention equals that mean token repeated count times.
Keys keep their RoPE (they are stored after it), so no positions are kept.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import struct

from flowcache_jax.kv import quant


@dataclasses.dataclass(frozen=True)
class TierSpec:
    bits: int  # 2, 4 or 8
    tokens: int  # per frame and head


@dataclasses.dataclass(frozen=True)
class StoreConfig:
    frame_tokens: int  # tokens of one latent frame
    tiers: tuple[TierSpec, ...]  # most important first
    summary: bool  # fold the tokens of no tier into a summary key (else they are dropped)
    group: int = 16  # tokens per scale

    def __post_init__(self):
        if self.frame_tokens < 1 or self.group < 1:
            raise ValueError(f"frame_tokens ({self.frame_tokens}) and group ({self.group}) must be >= 1")
        if not isinstance(self.tiers, tuple) or not all(isinstance(t, TierSpec) for t in self.tiers):
            raise ValueError("tiers must be a tuple of TierSpec")
        for t in self.tiers:
            if t.bits not in quant.BITS or t.tokens < 1:
                raise ValueError(f"tier {t}: bits must be one of {quant.BITS} and tokens >= 1")
        if self.kept > self.frame_tokens:
            raise ValueError(f"the tiers hold {self.kept} tokens, more than a frame's {self.frame_tokens}")

    @property
    def kept(self) -> int:
        return sum(t.tokens for t in self.tiers)

    @property
    def summarised(self) -> int:
        """Tokens per frame and head that fold into the summary (or are dropped without one)."""
        return self.frame_tokens - self.kept

    def n_pad(self, i: int) -> int:
        return -(-self.tiers[i].tokens // self.group) * self.group

    def offset(self, i: int) -> int:
        return sum(t.tokens for t in self.tiers[:i])


@struct.dataclass
class QuantStore:
    k_codes: tuple[jax.Array, ...]  # per tier: uint8 [L, S, H, n_pad, D*bits//8]
    v_codes: tuple[jax.Array, ...]
    k_scales: tuple[jax.Array, ...]  # per tier: float16 [L, S, H, n_pad//group, D]
    v_scales: tuple[jax.Array, ...]
    tier_on: jax.Array  # bool [S, n_tiers]: the slot's tier is readable
    sum_k: jax.Array  # [L, S, H, D] compute dtype: mean K of the summarised tokens
    sum_v: jax.Array
    sum_logn: jax.Array  # float32 [L, S, H]: log(count), -inf where none
    summary_on: jax.Array  # bool [S]
    frame: jax.Array  # int32 [S]: absolute frame held, -1 empty
    cfg: StoreConfig = struct.field(pytree_node=False)

    @property
    def dtype(self):
        return self.sum_k.dtype


@struct.dataclass
class FrameEntry:
    """One frame of one layer, encoded (``encode_frame``); stacked over layers (leading L) for ``write``."""

    k_codes: tuple[jax.Array, ...]  # per tier: uint8 [H, n_pad, D*bits//8]
    v_codes: tuple[jax.Array, ...]
    k_scales: tuple[jax.Array, ...]  # per tier: float16 [H, n_pad//group, D]
    v_scales: tuple[jax.Array, ...]
    sum_k: jax.Array  # [H, D]
    sum_v: jax.Array
    sum_logn: jax.Array  # float32 [H]


def empty(cfg: StoreConfig, layers: int, slots: int, heads: int, dim: int, dtype) -> QuantStore:
    """An all-empty store; ``dtype`` is the compute dtype (summaries, dequantized tiles)."""
    for t in cfg.tiers:
        if (dim * t.bits) % 8:
            raise ValueError(f"head dim {dim} does not pack into bytes at {t.bits} bits")
    codes = tuple(jnp.zeros((layers, slots, heads, cfg.n_pad(i), dim * t.bits // 8), jnp.uint8)
                  for i, t in enumerate(cfg.tiers))
    scales = tuple(jnp.zeros((layers, slots, heads, cfg.n_pad(i) // cfg.group, dim), jnp.float16)
                   for i in range(len(cfg.tiers)))
    z = jnp.zeros((layers, slots, heads, dim), dtype)
    return QuantStore(k_codes=codes, v_codes=codes, k_scales=scales, v_scales=scales,
                      tier_on=jnp.zeros((slots, len(cfg.tiers)), bool), sum_k=z, sum_v=z,
                      sum_logn=jnp.full((layers, slots, heads), -jnp.inf, jnp.float32),
                      summary_on=jnp.zeros((slots,), bool), frame=jnp.full((slots,), -1, jnp.int32), cfg=cfg)


def rank_tokens(score: jax.Array) -> jax.Array:
    """[H, T] importance (e.g. ``compress.scores(q, k, cfg)["final"]``) -> token indices, best first (ties: lower)."""
    return jnp.argsort(-score, axis=-1, stable=True).astype(jnp.int32)


def _encode_tier(x: jax.Array, idx: jax.Array, bits: int, group: int) -> tuple[jax.Array, jax.Array]:
    """x [T, H, D], idx [H, n] -> packed codes [H, n_pad, D*bits//8], scales [H, n_pad//group, D]."""
    h, n = idx.shape
    xt = jnp.take_along_axis(jnp.swapaxes(x, 0, 1), idx[:, :, None], axis=1)  # [H, n, D]
    codes, scales, _ = quant.quantize_groups(jnp.swapaxes(xt, 0, 1)[None], bits, group)
    codes = jnp.transpose(codes[0], (2, 0, 1, 3)).reshape(h, -1, x.shape[-1])  # [H, n_pad, D]
    return quant.pack(codes, bits), jnp.swapaxes(scales[0, :, 0], 0, 1)


def encode_frame(k: jax.Array, v: jax.Array, rank: jax.Array, cfg: StoreConfig) -> FrameEntry:
    """Quantize one layer's finished frame: k, v [T, H, D], rank [H, T] (``rank_tokens``), T = frame_tokens.

    Tier i takes ranks [offset_i, offset_i + tokens_i) of each head, sorted by token index; the rest is
    averaged in float32 into the summary (cast to k's dtype). vmap over layers to get ``write``'s input.
    """
    if k.shape[0] != cfg.frame_tokens or rank.shape != (k.shape[1], cfg.frame_tokens):
        raise ValueError(f"k {k.shape} / rank {rank.shape} do not match frame_tokens={cfg.frame_tokens}")
    parts = []
    for i, t in enumerate(cfg.tiers):
        idx = jnp.sort(rank[:, cfg.offset(i):cfg.offset(i) + t.tokens], axis=-1)
        parts.append((_encode_tier(k, idx, t.bits, cfg.group), _encode_tier(v, idx, t.bits, cfg.group)))
    h, d = k.shape[1:]
    rest = rank[:, cfg.kept:]
    if cfg.summary and cfg.summarised:
        def mean(x):
            xt = jnp.take_along_axis(jnp.swapaxes(x, 0, 1), rest[:, :, None], axis=1)
            return xt.astype(jnp.float32).mean(axis=1).astype(x.dtype)
        sum_k, sum_v = mean(k), mean(v)
        logn = jnp.full((h,), math.log(cfg.summarised), jnp.float32)
    else:
        sum_k, sum_v = jnp.zeros((h, d), k.dtype), jnp.zeros((h, d), v.dtype)
        logn = jnp.full((h,), -jnp.inf, jnp.float32)
    return FrameEntry(k_codes=tuple(p[0][0] for p in parts), v_codes=tuple(p[1][0] for p in parts),
                      k_scales=tuple(p[0][1] for p in parts), v_scales=tuple(p[1][1] for p in parts),
                      sum_k=sum_k, sum_v=sum_v, sum_logn=logn)


def _put(dst: jax.Array, src: jax.Array, slot: jax.Array) -> jax.Array:
    return jax.lax.dynamic_update_index_in_dim(dst, src.astype(dst.dtype), slot, 1)


def write(store: QuantStore, entries: FrameEntry, slot: jax.Array | int, frame_index: jax.Array | int
          ) -> QuantStore:
    """Put one frame (``entries`` stacked over all L layers) into ``slot`` (traced ok), replacing its content."""
    slot = jnp.asarray(slot, jnp.int32)
    n_tiers = len(store.cfg.tiers)

    def put_all(dst, src):
        return tuple(_put(a, b, slot) for a, b in zip(dst, src, strict=True))

    on = store.cfg.summary and store.cfg.summarised > 0
    return store.replace(
        k_codes=put_all(store.k_codes, entries.k_codes), v_codes=put_all(store.v_codes, entries.v_codes),
        k_scales=put_all(store.k_scales, entries.k_scales), v_scales=put_all(store.v_scales, entries.v_scales),
        sum_k=_put(store.sum_k, entries.sum_k, slot), sum_v=_put(store.sum_v, entries.sum_v, slot),
        sum_logn=_put(store.sum_logn, entries.sum_logn, slot),
        tier_on=jax.lax.dynamic_update_index_in_dim(store.tier_on, jnp.ones((n_tiers,), bool), slot, 0),
        summary_on=store.summary_on.at[slot].set(on),
        frame=store.frame.at[slot].set(jnp.asarray(frame_index, jnp.int32)))


def _tile(a: jax.Array, layer: jax.Array, slot: jax.Array) -> jax.Array:
    """a [L, S, ...] -> a[layer, slot] as a dynamic slice (reads one tile, copies nothing else)."""
    start = (layer, slot) + (jnp.int32(0),) * (a.ndim - 2)
    return jax.lax.dynamic_slice(a, start, (1, 1) + a.shape[2:])[0, 0]


def dequantize_tier(codes: jax.Array, scales: jax.Array, bits: int, group: int, dim: int, dtype) -> jax.Array:
    """One tier of one frame: packed codes [H, n_pad, D*bits//8], scales [H, n_pad//group, D] -> [H, n_pad, D]."""
    c = quant.unpack(codes, bits, dim)
    h, n, _ = c.shape
    x = c.reshape(h, n // group, group, dim).astype(dtype) * scales[:, :, None].astype(dtype)
    return x.reshape(h, n, dim)


def _deq_tier(store: QuantStore, i: int, layer: jax.Array, slot: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Tier i of one slot and layer, dequantized in the store dtype: k, v [H, n_pad, D] (pad rows are 0)."""
    bits, g = store.cfg.tiers[i].bits, store.cfg.group
    d = store.sum_k.shape[-1]

    def deq(codes, scales):
        return dequantize_tier(_tile(codes, layer, slot), _tile(scales, layer, slot), bits, g, d, store.dtype)

    return deq(store.k_codes[i], store.k_scales[i]), deq(store.v_codes[i], store.v_scales[i])


def slot_tokens(store: QuantStore, layer: jax.Array | int, slot: jax.Array | int
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Every tier of a slot dequantized, concatenated: k, v [H, Σ n_pad, D], readable [Σ n_pad] (tests, debug)."""
    layer, slot = jnp.asarray(layer, jnp.int32), jnp.asarray(slot, jnp.int32)
    ks, vs, ok = [], [], []
    for i, t in enumerate(store.cfg.tiers):
        k, v = _deq_tier(store, i, layer, slot)
        ks.append(k)
        vs.append(v)
        ok.append((jnp.arange(store.cfg.n_pad(i)) < t.tokens) & store.tier_on[slot, i])
    return jnp.concatenate(ks, 1), jnp.concatenate(vs, 1), jnp.concatenate(ok)


def fold_tier(store: QuantStore, slot: jax.Array | int, tier: int) -> QuantStore:
    """Switch a slot's tier off, folding its (dequantized) tokens into the summary, in every layer.

    This is how a caller degrades an old frame later: folding every tier leaves one key per head.
    """
    slot = jnp.asarray(slot, jnp.int32)
    on = store.tier_on[slot, tier]
    tokens = store.cfg.tiers[tier].tokens

    def per_layer(layer):
        k, v = _deq_tier(store, tier, layer, slot)
        return k[:, :tokens].astype(jnp.float32).sum(1), v[:, :tokens].astype(jnp.float32).sum(1)

    tk, tv = jax.vmap(per_layer)(jnp.arange(store.sum_k.shape[0], dtype=jnp.int32))  # [L, H, D]
    logn = jnp.where(store.summary_on[slot], store.sum_logn[:, slot], -jnp.inf)  # [L, H]
    n_old = jnp.exp(logn)
    n_new = n_old + tokens

    def fold(mean, tier_sum):
        new = (mean[:, slot].astype(jnp.float32) * n_old[..., None] + tier_sum) / n_new[..., None]
        return mean.at[:, slot].set(jnp.where(on, new, mean[:, slot].astype(jnp.float32)).astype(mean.dtype))

    return store.replace(
        sum_k=fold(store.sum_k, tk), sum_v=fold(store.sum_v, tv),
        sum_logn=store.sum_logn.at[:, slot].set(jnp.where(on, jnp.log(n_new), store.sum_logn[:, slot])),
        summary_on=store.summary_on.at[slot].set(store.summary_on[slot] | on),
        tier_on=store.tier_on.at[slot, tier].set(False))


def _online(carry, qg: jax.Array, k: jax.Array, v: jax.Array, ok: jax.Array, bias: jax.Array | None = None):
    """One key tile into the running (max, denominator, numerator); qg [H, g, Sq, D], k, v [H, n, D], ok [H|1, n]."""
    m, den, acc = carry
    s = jnp.einsum("hgqd,hnd->hgqn", qg, k.astype(jnp.float32))
    if bias is not None:
        s = s + bias[:, None, None, :]
    s = jnp.where(ok[:, None, None, :], s, -jnp.inf)
    m_new = jnp.maximum(m, s.max(-1))
    m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # nothing visible yet: keep exp() away from inf - inf
    alpha = jnp.exp(m - m_safe)
    p = jnp.exp(s - m_safe[..., None])
    acc = acc * alpha[..., None] + jnp.einsum("hgqn,hnd->hgqd", p, v.astype(jnp.float32))
    return m_new, den * alpha + p.sum(-1), acc


def _dense_part(carry, qg, k, v, valid, key_tile, layer=None):
    """Fold a full-precision part k, v [N, H, D] (or a whole per-layer buffer [L, N, H, D] read at ``layer``),
    valid [N], in tiles of ``key_tile`` keys; a tile with no valid key is skipped (``lax.cond``)."""
    layered = k.ndim == 4
    n = k.shape[-3]
    tile = max(1, min(key_tile, n))
    if layered and n % tile:
        raise ValueError(f"a per-layer buffer of {n} rows must be a whole number of {tile}-key tiles")
    pad = (-n) % tile
    if not layered and pad:
        k, v = (jnp.pad(x, ((0, pad), (0, 0), (0, 0))) for x in (k, v))
    okp = jnp.pad(valid.astype(bool), (0, pad))

    def rows(x, start):
        if layered:
            z = jnp.int32(0)
            return jax.lax.dynamic_slice(x, (layer, start, z, z), (1, tile, *x.shape[2:]))[0]
        return jax.lax.dynamic_slice_in_dim(x, start, tile)

    def body(c, start):
        ok = jax.lax.dynamic_slice_in_dim(okp, start, tile)

        def fold(c):
            kt, vt = (jnp.swapaxes(rows(x, start), 0, 1) for x in (k, v))
            return _online(c, qg, kt, vt, ok[None])

        return jax.lax.cond(jnp.any(ok), fold, lambda c: c, c), None

    if n + pad == tile:
        return body(carry, 0)[0]
    return jax.lax.scan(body, carry, jnp.arange(0, n + pad, tile))[0]


def attend(q: jax.Array, store: QuantStore | Sequence[QuantStore] | None, layer: jax.Array | int,
           dense: Sequence[tuple[jax.Array, jax.Array, jax.Array]] = (), key_tile: int = 512,
           min_frame: jax.Array | int = 0) -> jax.Array:
    """Softmax attention of q [Sq, Hq, D] over the dense parts and the store's layer ``layer`` -> [Sq, Hq, D].

    ``store`` is the whole store and ``layer`` a Python or traced int (the layer loop's counter): each slot's
    tiles are dynamic slices of it, so a layer is never copied out. ``dense``: full-precision parts
    (k [N, H, D], v [N, H, D], valid bool [N]), e.g. the current block, folded in tiles of ``key_tile``; a part
    may also be a whole per-layer buffer (k, v [L, N, H, D]), read at ``layer`` tile by tile (a dense history
    without a copy of it). ``store`` None: the dense parts only; a sequence of stores: each in turn (e.g. recent
    frames at full precision and aged ones with fewer tiers).
    Then a ``lax.scan`` over slots; a slot that is empty or holds a frame < ``min_frame`` is skipped by
    ``lax.cond`` (a real skip, not a mask; under vmap it degrades to a select). Per readable tier one tile:
    that slot's codes unpacked and dequantized, pad rows masked; then the summary key with logit + log(count).
    One online softmax in float32 throughout; scale 1/sqrt(D); GQA: query heads h*g..h*g+g-1 use KV head h.
    """
    sq, hq, d = q.shape
    stores = () if store is None else (store,) if isinstance(store, QuantStore) else tuple(store)
    h = stores[0].sum_k.shape[2] if stores else dense[0][0].shape[-2]
    if hq % h:
        raise ValueError(f"{hq} query heads are not a multiple of {h} KV heads")
    g = hq // h
    qg = jnp.transpose((q.astype(jnp.float32) / math.sqrt(d)).reshape(sq, h, g, d), (1, 2, 0, 3))
    carry = (jnp.full((h, g, sq), -jnp.inf, jnp.float32), jnp.zeros((h, g, sq), jnp.float32),
             jnp.zeros((h, g, sq, d), jnp.float32))
    layer = jnp.asarray(layer, jnp.int32)
    for k, v, valid in dense:
        carry = _dense_part(carry, qg, k, v, valid, key_tile, layer)
    for st in stores:
        carry = _attend_store(carry, qg, st, layer, floor=jnp.maximum(jnp.asarray(min_frame, jnp.int32), 0))
    return _finish(carry, sq, hq, d, q.dtype)


def _attend_store(carry, qg: jax.Array, store: QuantStore, layer: jax.Array, floor: jax.Array):
    """Fold one store's readable slots (a ``lax.scan``; empty slots skipped by ``lax.cond``)."""

    def read_slot(c, slot):
        for i, t in enumerate(store.cfg.tiers):
            pad_ok = (jnp.arange(store.cfg.n_pad(i)) < t.tokens)[None]

            def tier(c, i=i, pad_ok=pad_ok):
                k, v = _deq_tier(store, i, layer, slot)
                return _online(c, qg, k, v, pad_ok)

            c = jax.lax.cond(store.tier_on[slot, i], tier, lambda c: c, c)
        sk = _tile(store.sum_k, layer, slot)[:, None]  # [H, 1, D]
        sv = _tile(store.sum_v, layer, slot)[:, None]
        logn = _tile(store.sum_logn, layer, slot)[:, None]  # [H, 1]
        return _online(c, qg, sk, sv, jnp.broadcast_to(store.summary_on[slot], (1, 1)), logn)

    def body(c, slot):
        return jax.lax.cond(store.frame[slot] >= floor, read_slot, lambda c, s: c, c, slot), None

    carry, _ = jax.lax.scan(body, carry, jnp.arange(store.frame.shape[0], dtype=jnp.int32))
    return carry


def _finish(carry, sq: int, hq: int, d: int, dtype) -> jax.Array:
    _, den, acc = carry
    out = acc / jnp.where(den > 0, den, 1.0)[..., None]
    return jnp.transpose(out, (2, 0, 1, 3)).reshape(sq, hq, d).astype(dtype)


def nbytes(store: QuantStore) -> int:
    """Bytes the store's arrays really occupy (everything allocated, used or not)."""
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(store)))


def frame_stats(cfg: StoreConfig, heads: int, dim: int, summary_itemsize: int = 2) -> dict[str, float]:
    """Per frame and layer (K + V): accounted bytes, the bf16 bytes they replace, and the ratio."""
    codes = sum(heads * cfg.n_pad(i) * dim * t.bits // 8 for i, t in enumerate(cfg.tiers))
    scales = sum(heads * cfg.n_pad(i) // cfg.group * dim * 2 for i in range(len(cfg.tiers)))
    summary = heads * dim * summary_itemsize if cfg.summary and cfg.summarised else 0
    accounted = 2 * (codes + scales + summary)
    bf16 = 2 * cfg.frame_tokens * heads * dim * 2
    return {"kept_tokens": cfg.kept, "summarised_tokens": cfg.summarised, "codes_bytes": 2 * codes,
            "scale_bytes": 2 * scales, "summary_bytes": 2 * summary, "bytes": accounted, "bf16_bytes": bf16,
            "compression": bf16 / accounted}


def accounted_bytes(cfg: StoreConfig, frames_used: int, heads: int, dim: int, layers: int,
                    summary_itemsize: int = 2) -> int:
    """Meaningful bytes of ``frames_used`` frames over all layers: packed codes, fp16 scales, summaries.

    The per-slot metadata (frame, flags, log-counts) is left out: it follows from the config.
    """
    return int(frames_used * layers * frame_stats(cfg, heads, dim, summary_itemsize)["bytes"])
