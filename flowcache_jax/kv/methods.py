"""The K/V storage methods of a finished-frame history, by name: what the models and the KV study share.

``dense`` keeps K/V in the compute dtype. The others quantize each frame once, when it is final, into a
``quant_store.QuantStore``:

- ``rtn_int8`` / ``rtn_int4`` / ``rtn_int2``: every token in one tier (the study's RTN, groups of 16 tokens of a
  head and channel, fp16 scales), bit-packed;
- ``study_soft_prune_int4``: the KV-quant study's best practical point (``kv.study``): every token INT4, then at
  each new block its planner re-plans the held frames and the frames it marks as summarised fold into one mean
  token per head (folding is irreversible: a frame the next plan would promote keeps its summary, as the study's
  re-quantized broadcast mean would). One plan for every layer, from layer 0's summaries, as the study's shipped
  patch runs it (every layer reports layer 0);
- ``ours``: precision per token by FlowCache's importance-redundancy score (``kv.compress.scores``, the block's
  clean-pass queries over its keys, per KV head; ``mix_lambda`` weighs importance against redundancy, and the
  default 1 keeps importance only: it chose precision better than the compression's 0.07 on the trained tiny
  MAGI-1, 30.65 vs 29.92 dB with INT4 tiers): the best ``tiers`` fractions at their bits, the rest one
  summary token per (frame, head) carrying its count; and by age, FlowCache's other observation (attention
  concentrates on recent frames): a frame older than the ``recent_frames`` newest keeps only its first
  ``aged_tiers`` tiers, the rest of its tokens folding into its summary (their codes are read, never
  re-quantized). In a packed store the aged frames live in a second, smaller ring, so the saving is real memory.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from flowcache_jax.kv import compress as kvc
from flowcache_jax.kv import quant_store as qs
from flowcache_jax.kv import study

METHODS = ("dense", "rtn_int8", "rtn_int4", "rtn_int2", "study_soft_prune_int4", "ours")


@dataclasses.dataclass(frozen=True)
class QuantMethod:
    name: str
    store: qs.StoreConfig
    ranked: bool  # tiers chosen by the importance-redundancy score (else every token in the one tier)
    mix_lambda: float = 1.0  # the score's importance weight (FlowCache's lambda; 1: importance only)
    study: study.SoftPruneParams | None = None  # the study's planner runs at every new block
    recent_frames: int = 0  # frames that keep every tier (0 with aged_tiers None: no ageing)
    aged_tiers: int | None = None  # tiers an older frame keeps (the rest fold into its summary); None: no ageing

    @property
    def ages(self) -> bool:
        return self.aged_tiers is not None

    @property
    def aged_store(self) -> qs.StoreConfig:
        """The store of aged frames: the first ``aged_tiers`` tiers, everything else in the summary."""
        return qs.StoreConfig(self.store.frame_tokens, self.store.tiers[:self.aged_tiers], True, self.store.group)

    @property
    def score_cfg(self) -> kvc.CompressConfig:
        """The score's settings; its queries are folded one frame at a time (a logits tile the size of the
        attention's own)."""
        return kvc.CompressConfig(budget=1, mix_lambda=self.mix_lambda, query_tile=self.store.frame_tokens)


def make_method(name: str, frame_tokens: int, tiers: tuple = ((8, 0.25), (4, 0.75)), summary: bool = True,
                mix_lambda: float = 1.0, recent_frames: int = 6, aged_tiers: int | None = 0) -> QuantMethod | None:
    """The method called ``name`` for frames of ``frame_tokens`` tokens (None: dense). ``ours`` only: ``tiers`` are
    (bits, fraction of a frame's tokens) pairs, most important first; ``aged_tiers`` (None: no ageing) of them
    stay with a frame once it is older than the ``recent_frames`` newest."""
    if name not in METHODS:
        raise ValueError(f"kv method must be one of {', '.join(METHODS)}, got {name!r}")
    if name == "dense":
        return None
    if name.startswith("rtn_int"):
        return QuantMethod(name, qs.StoreConfig(frame_tokens, (qs.TierSpec(int(name[7:]), frame_tokens),), False),
                           False)
    if name == "study_soft_prune_int4":
        return QuantMethod(name, qs.StoreConfig(frame_tokens, (qs.TierSpec(4, frame_tokens),), True), False,
                           study=study.SoftPruneParams())
    specs, used, g = [], 0, qs.StoreConfig.group
    for bits, frac in tiers:  # whole scale groups (no padding rows) where the frame is long enough
        n = max(g, int(round(float(frac) * frame_tokens / g)) * g) if frame_tokens >= 2 * g else \
            int(round(float(frac) * frame_tokens))
        n = min(n, frame_tokens - used)
        if n < 1 or frac <= 0:
            raise ValueError(f"kv tiers {tiers}: ({bits} bits, {frac}) keeps no token of a {frame_tokens}-token frame")
        specs.append(qs.TierSpec(int(bits), n))
        used += n
    if aged_tiers is not None and not 0 <= aged_tiers < len(specs):
        raise ValueError(f"kv aged_tiers={aged_tiers} must fold at least one of the {len(specs)} tiers (0: an aged "
                         "frame is one summary token per head; kv.aged_tiers=-1: no ageing)")
    if aged_tiers is not None and recent_frames < 1:
        raise ValueError(f"kv recent_frames must be >= 1 with ageing (the newest frame keeps its tiers), got "
                         f"{recent_frames}")
    return QuantMethod(name, qs.StoreConfig(frame_tokens, tuple(specs), bool(summary)), True, mix_lambda,
                       recent_frames=int(recent_frames), aged_tiers=aged_tiers)


def from_config(kv, frame_tokens: int) -> QuantMethod | None:
    """The method of a run config's ``kv`` block (``method``, ``tiers``, ``summary``, ``score_lambda``,
    ``recent_frames``, ``aged_tiers`` (-1: no ageing)); fields it lacks keep ``make_method``'s defaults."""
    kw = {}
    if "tiers" in kv:
        kw["tiers"] = tuple(tuple(t) for t in kv["tiers"])
    for name, key, cast in (("summary", "summary", bool), ("mix_lambda", "score_lambda", float),
                            ("recent_frames", "recent_frames", int)):
        if key in kv:
            kw[name] = cast(kv[key])
    if "aged_tiers" in kv:
        kw["aged_tiers"] = None if int(kv["aged_tiers"]) < 0 else int(kv["aged_tiers"])
    return make_method(kv.get("method", "dense"), frame_tokens, **kw)


def frame_ranks(method: QuantMethod, q: jax.Array, k: jax.Array, frames: int) -> jax.Array:
    """Per frame, each KV head's tokens best first [frames, H, fsl]: by the score of the block's queries q
    [n, Hq, d] over its keys k [n, H, d] (``ours``), else in token order."""
    fsl, h = method.store.frame_tokens, k.shape[1]
    if not method.ranked:
        return jnp.broadcast_to(jnp.arange(fsl, dtype=jnp.int32), (frames, h, fsl))
    score = kvc.scores(q, k, method.score_cfg)["final"]  # [H, n]
    return jax.vmap(qs.rank_tokens)(jnp.moveaxis(score.reshape(h, frames, fsl), 1, 0))


def init_state(method: QuantMethod, slots: int, heads: int) -> dict:
    """The planner's memory between blocks (the study's previous summaries and chunk count); {} for others."""
    if method.study is None:
        return {}
    return {"summary": jnp.zeros((slots, heads), jnp.float32), "n": jnp.zeros((), jnp.int32),
            "tiers": jnp.full((slots,), study.BEYOND, jnp.int8)}


def _slot_summary(store: qs.QuantStore, slot: jax.Array) -> jax.Array:
    """The study's chunk summary of a held slot at layer 0: mean|K| + mean|V| per head of what the cache holds
    (its dequantized INT4 tokens, or its mean token once summarised)."""
    k, v, ok = qs.slot_tokens(store, 0, slot)  # [H, n, D]
    w = ok.astype(jnp.float32)[None, :, None]
    full = ((jnp.abs(k.astype(jnp.float32)) * w).sum((1, 2)) + (jnp.abs(v.astype(jnp.float32)) * w).sum((1, 2))
            ) / jnp.maximum(w.sum() * k.shape[-1], 1.0)
    mean = jnp.abs(store.sum_k[0, slot].astype(jnp.float32)).mean(-1) + jnp.abs(
        store.sum_v[0, slot].astype(jnp.float32)).mean(-1)
    return jnp.where(store.tier_on[slot, 0], full, mean)


def _plan_by_age(method: QuantMethod, frames: jax.Array, summaries, state: dict
                 ) -> tuple[jax.Array, jax.Array, dict]:
    """The study's plan over the held frames (``frames`` [S], -1 empty), oldest first, re-made iff their count
    changed: (slot order by age, which of them it summarises (by age), the planner's new state). ``summaries(order)``
    gives their chunk summaries [S, H] in that order (a store's or a dense buffer's)."""
    slots = frames.shape[0]
    held = frames >= 0
    order = jnp.argsort(jnp.where(held, frames, jnp.iinfo(jnp.int32).max), stable=True)  # oldest first
    n = jnp.sum(held.astype(jnp.int32))
    summary = summaries(order)
    counts = jnp.asarray(study.count_table(method.study, 1.0, slots))
    refresh = study.needs_refresh(n, state["n"])
    tiers = jax.lax.cond(refresh, lambda: study.plan_with_counts(summary, n, state["summary"], state["n"], counts,
                                                                 method.study)[0], lambda: state["tiers"])
    by_age = (tiers == study.SUMMARISED) & (jnp.arange(slots) < n)
    new = {"summary": jnp.where(refresh, summary, state["summary"]), "n": jnp.where(refresh, n, state["n"]),
           "tiers": tiers}
    return order, by_age, new


def study_replan(method: QuantMethod, store: qs.QuantStore, state: dict) -> tuple[qs.QuantStore, dict]:
    """After a block's frames were written: the study's plan over the held frames (oldest first), re-made iff
    their count changed, and every frame it summarises folded into its mean token."""
    order, fold, new = _plan_by_age(method, store.frame,
                                    lambda order: jax.lax.map(lambda s: _slot_summary(store, s), order), state)

    def one(store, i):
        return jax.lax.cond(fold[i] & store.tier_on[order[i], 0], lambda s: qs.fold_tier(s, order[i], 0),
                            lambda s: s, store), None

    store, _ = jax.lax.scan(one, store, jnp.arange(store.frame.shape[0]))
    return store, new


def fake_quantize(method: QuantMethod, k: jax.Array, v: jax.Array, rank: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One frame's k, v [T, H, D] as a dense buffer holds them after ``encode_frame``: its tiers dequantized and
    its summarised tokens replaced by their mean (attention over that equals the store's summary key). For a
    model whose attention reads a dense buffer (MAGI-1): the fidelity of a method without its memory saving."""
    entry = qs.encode_frame(k, v, rank, method.store)
    cfg = method.store
    out_k, out_v = jnp.zeros_like(k), jnp.zeros_like(v)
    h, d = k.shape[1:]
    if cfg.summary and cfg.summarised:
        rest = rank[:, cfg.kept:]  # [H, n]
        hh = jnp.broadcast_to(jnp.arange(h)[:, None], rest.shape)
        out_k = out_k.at[rest, hh].set(jnp.broadcast_to(entry.sum_k[:, None], (*rest.shape, d)).astype(k.dtype))
        out_v = out_v.at[rest, hh].set(jnp.broadcast_to(entry.sum_v[:, None], (*rest.shape, d)).astype(v.dtype))
    for i, t in enumerate(cfg.tiers):
        idx = jnp.sort(rank[:, cfg.offset(i):cfg.offset(i) + t.tokens], axis=-1)  # [H, n]
        kd, vd = (qs.dequantize_tier(c, s, t.bits, cfg.group, d, k.dtype)[:, :t.tokens]
                  for c, s in ((entry.k_codes[i], entry.k_scales[i]), (entry.v_codes[i], entry.v_scales[i])))
        hh = jnp.broadcast_to(jnp.arange(h)[:, None], idx.shape)
        out_k = out_k.at[idx, hh].set(kd)
        out_v = out_v.at[idx, hh].set(vd)
    return out_k, out_v


def fake_quantize_block(method: QuantMethod, q: jax.Array | None, k: jax.Array, v: jax.Array, frames: int
                        ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One layer's finished block k, v [frames·fsl, H, D] (frame-major) as a dense buffer holds it once stored:
    ranked per frame by q [n, Hq, D] over the block's keys (``frame_ranks``; q unused, may be None, unless the
    method is ranked), each frame through ``fake_quantize``; also the ranks [frames, H, fsl] (for ``age_dense``)."""
    fsl = method.store.frame_tokens
    rank = frame_ranks(method, q, k, frames)

    def split(x):
        return x.reshape(frames, fsl, *x.shape[1:])

    kq, vq = jax.vmap(lambda a, b, r: fake_quantize(method, a, b, r))(split(k), split(v), rank)
    return kq.reshape(k.shape), vq.reshape(v.shape), rank


def frame_summaries(k: jax.Array, v: jax.Array, frame_tokens: int) -> jax.Array:
    """The study's chunk summary of every frame slot of one layer's dense rows k, v [S·fsl, H, D]: mean|K| +
    mean|V| per head [S, H], of what the buffer holds (as ``_slot_summary`` reads a store: a folded frame's rows
    are its mean token, so their mean|.| is the mean token's)."""
    def mean_abs(x):
        return jnp.abs(x.astype(jnp.float32)).reshape(-1, frame_tokens, *x.shape[1:]).mean((1, 3))

    return mean_abs(k) + mean_abs(v)


def fold_frames(k: jax.Array, v: jax.Array, fold: jax.Array, frame_tokens: int) -> tuple[jax.Array, jax.Array]:
    """k, v [L, S·fsl, H, D] with the rows of every frame slot where ``fold`` [S] is set replaced by their
    per-(layer, head, channel) float32 mean, cast back: attention over them equals ``fold_tier``'s summary key."""
    def one(x):
        xs = x.reshape(x.shape[0], -1, frame_tokens, *x.shape[2:])
        mean = xs.astype(jnp.float32).mean(2, keepdims=True).astype(x.dtype)
        return jnp.where(fold[None, :, None, None, None], mean, xs).reshape(x.shape)

    return one(k), one(v)


def dense_study_replan(method: QuantMethod, k: jax.Array, v: jax.Array, frames: jax.Array, folded: jax.Array,
                       state: dict) -> tuple[jax.Array, jax.Array, jax.Array, dict]:
    """``study_replan`` for a model whose attention reads a dense buffer (fake quantization): k, v [L, S·fsl, H, D]
    hold S frame slots, ``frames`` [S] the absolute frame of each finished one (-1 otherwise), ``folded`` [S]
    which are already summarised. The plan over the finished frames (oldest first, layer 0's summaries), re-made
    iff their count changed, and every frame it summarises and not yet folded folded, once -> (k, v, folded,
    state)."""
    fsl = method.store.frame_tokens
    order, by_age, new = _plan_by_age(method, frames, lambda order: frame_summaries(k[0], v[0], fsl)[order], state)
    fold = jnp.zeros(frames.shape, bool).at[order].set(by_age) & (frames >= 0) & ~folded
    k, v = jax.lax.cond(jnp.any(fold), lambda kv: fold_frames(*kv, fold, fsl), lambda kv: kv, (k, v))
    return k, v, folded | fold, new


def demote(method: QuantMethod, recent: qs.QuantStore, r_slot: jax.Array, old: qs.QuantStore, o_slot: jax.Array
           ) -> qs.QuantStore:
    """Move the frame of ``recent``'s slot into ``old``'s slot (every layer), aged: its first ``aged_tiers`` tiers'
    packed codes and scales copied as they are, the other tiers' tokens (dequantized) folded with its summary
    into one mean key per head with their count. Nothing is re-quantized."""
    a = method.aged_tiers
    cfg = method.store
    layers = recent.sum_k.shape[0]

    on = recent.tier_on[r_slot]  # a tier already off (folded) is not folded twice

    def per_layer(layer):
        tot_k = jnp.zeros(recent.sum_k.shape[2:], jnp.float32)
        tot_v = jnp.zeros_like(tot_k)
        count = jnp.float32(0)
        for i in range(a, len(cfg.tiers)):
            k, v = qs._deq_tier(recent, i, layer, r_slot)
            n, w = cfg.tiers[i].tokens, on[i].astype(jnp.float32)
            tot_k = tot_k + w * k[:, :n].astype(jnp.float32).sum(1)
            tot_v = tot_v + w * v[:, :n].astype(jnp.float32).sum(1)
            count = count + w * n
        logn = jnp.where(recent.summary_on[r_slot], recent.sum_logn[layer, r_slot], -jnp.inf)
        n_old = jnp.exp(logn)[:, None]
        n_new = jnp.maximum(n_old + count, 1e-30)
        mk = (recent.sum_k[layer, r_slot].astype(jnp.float32) * n_old + tot_k) / n_new
        mv = (recent.sum_v[layer, r_slot].astype(jnp.float32) * n_old + tot_v) / n_new
        return mk, mv, jnp.log(n_old[:, 0] + count)

    mk, mv, logn = jax.vmap(per_layer)(jnp.arange(layers, dtype=jnp.int32))

    def take(x):  # [L, S, ...] at r_slot -> [L, ...]
        return jax.lax.dynamic_index_in_dim(x, r_slot, 1, keepdims=False)

    entry = qs.FrameEntry(k_codes=tuple(take(x) for x in recent.k_codes[:a]),
                          v_codes=tuple(take(x) for x in recent.v_codes[:a]),
                          k_scales=tuple(take(x) for x in recent.k_scales[:a]),
                          v_scales=tuple(take(x) for x in recent.v_scales[:a]), sum_k=mk, sum_v=mv, sum_logn=logn)
    old = qs.write(old, entry, o_slot, recent.frame[r_slot])
    return old.replace(tier_on=old.tier_on.at[o_slot].set(on[:a]),
                       summary_on=old.summary_on.at[o_slot].set(jnp.any(jnp.isfinite(logn))))


def age_dense(method: QuantMethod, k: jax.Array, v: jax.Array, frames: jax.Array, aged: jax.Array,
              ranks: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``demote`` for a dense buffer (fake quantization): k, v [L, S·fsl, H, D] with S frame slots, ``frames``
    [S] the absolute frame of each stored one (-1 none), ``aged`` [S] already aged, ``ranks`` [L, S, H, fsl]
    each frame's tokens best first (as stored). Every stored frame older than the ``recent_frames`` newest and
    not aged yet gets the tokens beyond its first ``aged_tiers`` tiers replaced by their mean, per (layer, head,
    channel) -> (k, v, aged)."""
    fsl = method.store.frame_tokens
    keep = sum(t.tokens for t in method.store.tiers[:method.aged_tiers])
    held = frames >= 0
    if method.recent_frames >= frames.shape[0]:
        return k, v, aged
    cut = jnp.sort(jnp.where(held, frames, -1))[::-1][method.recent_frames]  # the newest frame that is not recent
    age = held & (frames <= cut) & ~aged

    def one(x, r):  # x [S·fsl, H, D], r [S, H, fsl]
        xs = x.reshape(-1, fsl, *x.shape[1:])  # [S, fsl, H, D]
        rest = jnp.zeros(r.shape, bool)
        hh = jnp.arange(r.shape[1])[:, None]
        rest = jax.vmap(lambda m, rr: m.at[hh, rr[:, keep:]].set(True))(rest, r)  # [S, H, fsl]
        w = jnp.swapaxes(rest, 1, 2)[..., None].astype(jnp.float32)  # [S, fsl, H, 1]
        mean = (xs.astype(jnp.float32) * w).sum(1, keepdims=True) / jnp.maximum(w.sum(1, keepdims=True), 1.0)
        out = jnp.where((w > 0) & age[:, None, None, None], mean.astype(x.dtype), xs)
        return out.reshape(x.shape)

    k2 = jax.vmap(one)(k, ranks)
    v2 = jax.vmap(one)(v, ranks)
    return k2, v2, aged | age
