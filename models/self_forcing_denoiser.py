"""Self-Forcing seen block by block: the Denoiser protocol of the one sampler over ``models.self_forcing``.

A chunk is one block of ``block`` latent frames; the sampler runs one block at a time (window 1) through the
few-step grid with the re-noising solver (``flowcache_jax.solvers.ReNoise``) and, when the block is final, its
clean pass at ``context_noise`` (``encode_clean``) writes the block's K/V into the history.

The history is a fixed-shape K/V buffer of frame slots with per-slot absolute frame positions: ``sink_frames``
pinned slots for the first frames of the video and a ring of the most recent ones, so nothing is ever moved and
memory is constant for any length (upstream shifts its cache left, and without ``local_attn_size`` fails past
21 latent frames). Self-attention of a block sees the filled history slots and the block itself (its K/V go to
the buffer's tail rows, ``block`` frames, rewritten by every step): the same key set as upstream's
``cache[max(0, end - kv_frames·fsl) : end]`` for any sink / window. Keys are stored after RoPE, at their
absolute frame positions, so a ring slot's key keeps its true position.

With the tiled attention (``cfg.attention_impl``) the buffer holds the history only: a step's own K/V never
enter it (they are recomputed by every step), attention folds the block and then the history one frame of keys at
a time (``quant_store.attend``, no copy of the buffer), and the clean pass writes the block's frames into their
slots. With a quantization method (``kv_method``, ``flowcache_jax.kv.methods``) the history is a bit-packed
``QuantStore`` read the same way: each frame is quantized once, by the block's clean pass, and dequantized one
tile at a time inside the online softmax; the block itself stays in full precision. The fused attentions
(cuDNN / XLA) take the buffer with the block's rows at its tail instead.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from flowcache_jax.denoiser import ChunkOutput, SlotInfo
from flowcache_jax.kv import methods as kvm
from flowcache_jax.kv import quant_store as qs
from models import attention as attn
from models.layers import dense
from models.self_forcing import block_forward
from models.skyreels_v2 import SkyReelsConfig, cross_kv, head, patchify, text_embed, time_conditions, unpatchify


@dataclasses.dataclass(frozen=True)
class SelfForcingDenoiser:
    cfg: SkyReelsConfig
    block: int  # latent frames per block (num_frame_per_block)
    latent_h: int
    latent_w: int
    kv_frames: int = 21  # frames self-attention sees, its own block included (local_attn_size; upstream's buffer 21)
    sink_frames: int = 0  # the video's first frames, never evicted (sink_size)
    key_tile: int = 4096
    prefix_frames: int = 0  # clean frames (initial_latent: image-to-video / extension) encoded before the first step
    independent_first_frame: bool = False  # the prefix is pushed through as blocks [1, block, block, ...]
    constrain: Any = None  # the sharding hook; None on one device
    kv_method: kvm.QuantMethod | None = None  # the history's quantization (None: dense K/V in the compute dtype)
    context_pass: str = "clean"  # "clean": the sampler's re-encode writes the history; "skip": the last step's K/V

    def __post_init__(self):
        pt, ph, pw = self.cfg.patch_size
        if pt != 1 or self.latent_h % ph or self.latent_w % pw:
            raise ValueError(f"latent {self.latent_h}x{self.latent_w} does not tile by the patch {self.cfg.patch_size}")
        if self.block < 1 or self.sink_frames < 0:
            raise ValueError(f"block must be >= 1 and sink_frames >= 0, got {self.block}, {self.sink_frames}")
        if self.kv_frames - self.sink_frames < self.block:
            raise ValueError(f"kv_frames ({self.kv_frames}) - sink_frames ({self.sink_frames}) must be at least one "
                             f"block ({self.block} frames): the block itself has to fit beside the sink")
        if self.kv_method is not None and self.kv_method.store.frame_tokens != self.frame_tokens:
            raise ValueError(f"the kv method is built for {self.kv_method.store.frame_tokens}-token frames, the "
                             f"model's frames have {self.frame_tokens}")
        if self.context_pass not in ("clean", "skip"):
            raise ValueError(f"context_pass must be clean or skip, got {self.context_pass!r}")
        first = 1 if self.independent_first_frame else 0
        if self.prefix_frames and (self.prefix_frames - first) % self.block:
            raise ValueError(f"prefix_frames ({self.prefix_frames}) must be {'1 + ' if first else ''}a multiple of "
                             f"the block ({self.block})")

    # ----- layout -----------------------------------------------------------------------------------
    @property
    def chunk_shape(self) -> tuple[int, int, int, int]:
        return (self.cfg.in_dim, self.block, self.latent_h, self.latent_w)

    @property
    def frame_tokens(self) -> int:
        _, ph, pw = self.cfg.patch_size
        return (self.latent_h // ph) * (self.latent_w // pw)

    @property
    def history_frames(self) -> int:
        return self.kv_frames - self.block

    @property
    def ring_frames(self) -> int:
        return self.history_frames - self.sink_frames

    @property
    def prefix_chunks(self) -> int:
        """Truthy when the sampler has to call ``prepare_kv`` (the prefix's frames, not a chunk count)."""
        return self.prefix_frames

    def start_frame(self, chunk: jax.Array) -> jax.Array:
        """Absolute latent frame of a generated chunk's first frame (after the prefix)."""
        return self.prefix_frames + chunk * self.block

    def slot_of(self, frame: jax.Array, end: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(history slot, kept) of ``frame`` when the frames before ``end`` are final: the sink holds the first
        frames; later ones cycle through the ring, and a frame a later frame of the same write overwrites is not
        kept (a ring shorter than a block)."""
        s, ring = self.sink_frames, self.ring_frames
        in_sink = frame < s
        slot = jnp.where(in_sink, frame, s + jnp.mod(frame - s, max(ring, 1)))
        kept = in_sink | ((ring > 0) & (frame >= end - ring))
        return slot.astype(jnp.int32), kept

    @property
    def store_slots(self) -> tuple[int, int]:
        """(recent, aged) slots of a quantized history: the sink and the ``recent_frames`` newest frames keep every
        tier; older frames live in the aged store (0 slots: no ageing)."""
        m, hist = self.kv_method, self.history_frames
        if m is None or not m.ages or hist - self.sink_frames - max(m.recent_frames, 1) <= 0:
            return hist, 0
        recent = self.sink_frames + max(m.recent_frames, 1)
        return recent, hist - recent

    @property
    def streamed(self) -> bool:
        """Attention folds the history tile by tile (tiled attention, or a quantized store); else a fused call
        over the buffer with the block's rows at its tail."""
        return self.kv_method is not None or attn.resolve(self.cfg.attention_impl, self.cfg.dtype) == "tiled"

    def init_kv(self, batch: int, window: int) -> dict:
        """K/V [B, layers, rows, heads, hd] (history slots; for a fused attention then the block's rows) and the
        absolute frame of every history slot (-1 empty); quantized: a ``QuantStore`` per video (leading batch
        axis) and the method's planner state."""
        c = self.cfg
        if self.kv_method is not None:
            recent, aged = self.store_slots
            dt = jnp.dtype(c.dtype)
            kv = {"store": qs.empty(self.kv_method.store, c.num_layers, recent, c.num_heads, c.head_dim, dt),
                  "plan": kvm.init_state(self.kv_method, self.history_frames, c.num_heads)}
            if aged:
                kv["aged"] = qs.empty(self.kv_method.aged_store, c.num_layers, aged, c.num_heads, c.head_dim, dt)
            return jax.tree.map(lambda a: jnp.broadcast_to(a, (batch, *a.shape)), kv)
        rows = (self.history_frames + (0 if self.streamed else self.block)) * self.frame_tokens
        z = jnp.zeros((batch, c.num_layers, rows, c.num_heads, c.head_dim), jnp.dtype(c.dtype))
        return {"k": z, "v": z, "frame": jnp.full((self.history_frames,), -1, jnp.int32)}

    def report(self, kv: dict) -> dict:
        if self.kv_method is not None:
            st = kv["store"]
            out = {"frame": st.frame[0], "tier_on": st.tier_on[0], "summary_on": st.summary_on[0]}
            if "tiers" in kv["plan"]:  # the study's plan, oldest held frame first
                out["plan_tiers"] = kv["plan"]["tiers"][0]
            if "aged" in kv:
                out["aged_frame"] = kv["aged"].frame[0]
            return out
        return {"frame": kv["frame"]}

    def held_frames(self, kv: dict) -> jax.Array:
        """The absolute frame of every history slot (-1 empty; quantized with ageing: recent slots, then aged)."""
        if self.kv_method is None:
            return kv["frame"]
        return jnp.concatenate([kv["store"].frame[0]] + ([kv["aged"].frame[0]] if "aged" in kv else []))

    # ----- conditions -------------------------------------------------------------------------------
    def prepare_cond(self, params: dict, context: jax.Array, timesteps: Any, context_noise: float = 0.0,
                     prefix: jax.Array | None = None) -> dict:
        """The run's conditions: every layer's cross-attention K/V of the prompts ``context`` [B, L, text_dim] once
        (upstream's crossattn cache), the steps' model timesteps [N] and the clean pass's timestep as traced values,
        and the prefix latents [B, C, prefix_frames, H, W] when there is one."""
        cross = jax.vmap(lambda c: _cross_fn(self.cfg)(params, c))(jnp.asarray(context))
        cond = {"cross": cross, "timesteps": jnp.asarray(timesteps, jnp.float32),
                "context_t": jnp.float32(context_noise)}
        if self.prefix_frames:
            if prefix is None or prefix.shape[2] != self.prefix_frames:
                raise ValueError(f"the denoiser expects {self.prefix_frames} prefix frames, got "
                                 f"{None if prefix is None else prefix.shape[2]}")
            cond["prefix"] = jnp.asarray(prefix, jnp.float32)
        return cond

    # ----- the Denoiser protocol --------------------------------------------------------------------
    def sample_noise(self, key: jax.Array, batch: int) -> jax.Array:
        return jax.random.normal(key, (batch, *self.chunk_shape), jnp.float32)

    def metric_features(self, params: dict, x: jax.Array, t: jax.Array) -> jax.Array:
        """The block's patch embedding (the chunkwise policies' input feature)."""
        return jax.vmap(lambda xb: dense(patchify(self.cfg, xb), params["patch"], jnp.float32))(x)

    def _run(self, params: dict, cond: dict, x: jax.Array, t: jax.Array, start: jax.Array, kv: dict,
             commit: bool = False) -> tuple[jax.Array, jax.Array, jax.Array, dict]:
        """The block ``x`` [B, C, f, H, W] (f <= block frames) at model timestep ``t`` from absolute frame ``start``:
        flow, h_in, h_out, and the buffer with the block's K/V in its tail rows (quantized: with the block's
        frames written into the store when ``commit``)."""
        if self.streamed:
            return self._run_streamed(params, cond, x, t, start, kv, commit)
        f, fsl = x.shape[2], self.frame_tokens
        hist = self.history_frames * fsl
        rows = kv["k"].shape[2]
        own = (jnp.arange(rows) >= hist) & (jnp.arange(rows) < hist + f * fsl)
        mask = jnp.concatenate([jnp.repeat(kv["frame"] >= 0, fsl), jnp.zeros((rows - hist,), bool)]) | own
        tf = jnp.full((f,), t, jnp.float32)

        def one(xb, cross, k, v):
            flow, h_in, h_out, (k, v), _ = block_forward(self.cfg, params, xb, tf, cross, start, kv=(k, v),
                                                         write_start=jnp.int32(hist), key_mask=mask,
                                                         key_tile=self.key_tile, constrain=self.constrain)
            return flow, h_in, h_out, k, v

        flow, h_in, h_out, k, v = jax.vmap(one)(x, cond["cross"], kv["k"], kv["v"])
        kv = {**kv, "k": k, "v": v}
        if isinstance(commit, bool):
            return flow, h_in, h_out, (self._commit(kv, start, f) if commit else kv)
        return flow, h_in, h_out, jax.lax.cond(commit, lambda kv: self._commit(kv, start, f), lambda kv: kv, kv)

    def _run_streamed(self, params: dict, cond: dict, x: jax.Array, t: jax.Array, start: jax.Array, kv: dict,
                      commit: bool) -> tuple[jax.Array, jax.Array, jax.Array, dict]:
        """As ``_run``, attention folding the block's own K/V and then the history one frame of keys at a time
        (videos one after the other, ``lax.map``, so an empty slot or tier is skipped for real); ``commit``
        writes the block's frames into the history (quantized once, with a method)."""
        method, f, fsl = self.kv_method, x.shape[2], self.frame_tokens
        tf = jnp.full((f,), t, jnp.float32)
        quantized = method is not None
        traced = not isinstance(commit, bool)  # decided in the graph (context_pass=skip: the last step writes)
        writes = traced or commit
        if not quantized:
            valid = jnp.repeat(kv["frame"] >= 0, fsl)

        def one(args):
            xb, cross, hist = args
            own = jnp.ones((f * fsl,), bool)

            def attend(q, k, v, li):
                if quantized:
                    stores = (hist["store"], hist["aged"]) if "aged" in hist else hist["store"]
                    o = qs.attend(q, stores, li, dense=((k, v, own),), key_tile=fsl)
                else:
                    o = qs.attend(q, None, li, dense=((k, v, own), (hist["k"], hist["v"], valid)), key_tile=fsl)
                if writes and quantized and method.ranked:
                    if not traced:
                        return o, kvm.frame_ranks(method, q, k, f)
                    zero = jnp.zeros((f, k.shape[1], fsl), jnp.int32)  # the score runs on the writing step only
                    return o, jax.lax.cond(commit, lambda: kvm.frame_ranks(method, q, k, f), lambda: zero)
                return o, None

            layers = jnp.arange(self.cfg.num_layers, dtype=jnp.int32)
            flow, h_in, h_out, (ks, vs), inter = block_forward(self.cfg, params, xb, tf, cross, start,
                                                               self_attention=(attend, layers),
                                                               key_tile=self.key_tile, constrain=self.constrain)
            if writes:
                ranks = inter["aux"] if quantized and method.ranked else None

                def write(hist):
                    if quantized:
                        return self._write_frames(hist, ks, vs, ranks, start, f)
                    return self._write_rows(hist, ks, vs, start, f)

                hist = jax.lax.cond(commit, write, lambda h: h, hist) if traced else write(hist)
            return flow, h_in, h_out, hist

        per_video = {k: kv[k] for k in (("store", "plan", "aged") if quantized else ("k", "v")) if k in kv}
        flow, h_in, h_out, hist = jax.lax.map(one, (x, cond["cross"], per_video))
        kv = {**kv, **hist}
        if writes and not quantized:
            held = self._held_after(kv["frame"], start, f)
            kv["frame"] = jnp.where(commit, held, kv["frame"]) if traced else held
        return flow, h_in, h_out, kv

    def _held_after(self, frame: jax.Array, start: jax.Array, frames: int) -> jax.Array:
        """The history slots' frames once the block's ``frames`` frames from ``start`` are written."""
        for i in range(frames):
            slot, kept = self.slot_of(start + i, start + frames)
            frame = jnp.where(kept, frame.at[slot].set(start + i), frame)
        return frame

    def _write_rows(self, hist: dict, ks: jax.Array, vs: jax.Array, start: jax.Array, frames: int) -> dict:
        """The block's clean K/V ([layers, f·fsl, H, d]) into the history slots of its frames (one video), a slot
        update per frame (in place: a scatter over the rows would need a buffer-sized temporary)."""
        fsl = self.frame_tokens
        k, v = hist["k"], hist["v"]
        if self.history_frames == 0:
            return hist
        for i in range(frames):
            slot, kept = self.slot_of(start + i, start + frames)

            def put(kv_, i=i, slot=slot):
                rows = (src[:, i * fsl:(i + 1) * fsl] for src in (ks, vs))
                return tuple(jax.lax.dynamic_update_slice_in_dim(a, r.astype(a.dtype), slot * fsl, axis=1)
                             for a, r in zip(kv_, rows, strict=True))

            k, v = jax.lax.cond(kept, put, lambda kv_: kv_, (k, v))
        return {"k": k, "v": v}

    def _write_frames(self, hist: dict, ks: jax.Array, vs: jax.Array, ranks: jax.Array | None, start: jax.Array,
                      frames: int) -> dict:
        """Quantize the block's clean K/V ([layers, f·fsl, H, d]) frame by frame into their history slots, once
        (one video). With ageing, a recent slot's previous frame first moves to the aged store (``kvm.demote``):
        the sink and the newest frames in the recent ring, the ones before them in the aged ring."""
        method, fsl = self.kv_method, self.frame_tokens
        store, plan, aged = hist["store"], hist["plan"], hist.get("aged")
        if self.history_frames == 0:
            return hist
        n_recent, n_aged = self.store_slots
        ring = n_recent - self.sink_frames
        for i in range(frames):
            f = start + i
            k, v = ks[:, i * fsl:(i + 1) * fsl], vs[:, i * fsl:(i + 1) * fsl]
            if ranks is None:
                rank = jnp.broadcast_to(jnp.arange(fsl, dtype=jnp.int32), (ks.shape[0], ks.shape[2], fsl))
            else:
                rank = ranks[:, i]  # [layers, H, fsl]
            entries = jax.vmap(lambda k, v, r: qs.encode_frame(k, v, r, method.store))(k, v, rank)
            if aged is None:
                slot, kept = self.slot_of(f, start + frames)
            else:  # every frame enters the recent ring; its previous frame is aged, not dropped
                slot = jnp.where(f < self.sink_frames, f, self.sink_frames + jnp.mod(f - self.sink_frames, ring))
                kept = jnp.bool_(True)
                prev = store.frame[slot]
                move = (prev >= self.sink_frames) & (f >= self.sink_frames)
                aged = jax.lax.cond(move, lambda a, st=store, s=slot, p=prev: kvm.demote(
                    method, st, s, a, jnp.mod(p - self.sink_frames, n_aged)), lambda a: a, aged)
            store = jax.lax.cond(kept, lambda s, e=entries, sl=slot, f=f: qs.write(s, e, sl, f), lambda s: s, store)
        if method.study is not None:
            store, plan = kvm.study_replan(method, store, plan)
        out = {"store": store, "plan": plan}
        if aged is not None:
            out["aged"] = aged
        return out

    def _commit(self, kv: dict, start: jax.Array, frames: int) -> dict:
        """Copy the block's tail rows (its clean K/V) into the history slots of its frames."""
        if self.history_frames == 0:
            return kv
        fsl, hist = self.frame_tokens, self.history_frames * self.frame_tokens
        k, v = kv["k"], kv["v"]
        for i in range(frames):
            slot, kept = self.slot_of(start + i, start + frames)

            def put(a, i=i, slot=slot):
                rows = jax.lax.dynamic_slice_in_dim(a, hist + i * fsl, fsl, axis=2)
                return jax.lax.dynamic_update_slice_in_dim(a, rows, slot * fsl, axis=2)

            k, v = jax.lax.cond(kept, lambda kv_, put=put: tuple(put(a) for a in kv_), lambda kv_: kv_, (k, v))
        return {**kv, "k": k, "v": v, "frame": self._held_after(kv["frame"], start, frames)}

    def _t(self, cond: dict, info: SlotInfo) -> jax.Array:
        steps = cond["timesteps"]
        return steps[jnp.clip(info.k, 0, steps.shape[0] - 1)]

    def forward_chunk(self, params: dict, cond: dict, x: jax.Array, info: SlotInfo, kv: dict
                      ) -> tuple[ChunkOutput, dict]:
        # context_pass=skip: the block's last step writes its own (noisy) K/V as the history, no clean pass
        commit = False if self.context_pass == "clean" else info.k == cond["timesteps"].shape[0] - 1
        flow, h_in, h_out, kv = self._run(params, cond, x, self._t(cond, info), self.start_frame(info.chunk), kv,
                                          commit)
        return ChunkOutput(velocity=flow, residual=h_out - h_in), kv

    def velocity_from_residual(self, params: dict, cond: dict, x: jax.Array, info: SlotInfo,
                               residual: jax.Array) -> jax.Array:
        """The head on (the block's patch embedding + the cached transformer residual) at this step's time."""
        c = self.cfg
        tc = time_conditions(c, params, jnp.full((self.block,), self._t(cond, info)), None)
        frame_of = jnp.arange(self.block * self.frame_tokens) // self.frame_tokens

        def one(xb, rb):
            h = dense(patchify(c, xb), params["patch"], jnp.float32) + rb
            return unpatchify(c, head(c, params, h, tc["e"], frame_of), self.block, self.latent_h, self.latent_w)

        return jax.vmap(one)(x, residual)

    def encode_clean(self, params: dict, cond: dict, x: jax.Array, info: SlotInfo, kv: dict) -> dict:
        """The final block's clean pass at ``context_noise``: its K/V become history (the output is discarded)."""
        start = self.start_frame(info.chunk)
        return self._run(params, cond, x, cond["context_t"], start, kv, commit=True)[3]

    def prepare_kv(self, params: dict, cond: dict, kv: dict) -> dict:
        """The prefix's clean K/V, pushed through block by block as upstream does (each block sees the earlier
        ones and itself), before the first step."""
        sizes = ([1] if self.independent_first_frame else []) + [self.block] * (
            (self.prefix_frames - int(self.independent_first_frame)) // self.block)
        start = 0
        for f in sizes:
            x = cond["prefix"][:, :, start:start + f]
            kv = self._run(params, cond, x, cond["context_t"], jnp.int32(start), kv, commit=True)[3]
            start += f
        return kv


@functools.lru_cache(maxsize=16)
def _cross_fn(cfg: SkyReelsConfig):
    return jax.jit(lambda p, ctx: cross_kv(cfg, p, text_embed(cfg, p, ctx)))
