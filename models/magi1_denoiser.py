"""MAGI-1 seen chunk by chunk: the Denoiser protocol over ``models.magi1.forward_call``.

Each computed chunk is its own forward (the FlowCache reference's per-chunk path): it writes its K/V
into its rows of a static buffer and attends to the rows of earlier chunks (fresh if they were computed
this step, stale if reused) plus its own, within its key range. With every chunk computed this equals
upstream MAGI's joint window forward, because attention is block-causal by chunk. The nearly-clean
duplicate (spec §5.4 step 4) is a second, self-only forward inside the oldest chunk's compute branch,
and the clean re-encode (step 2) is ``encode_clean``, called by the sampler at stage starts.

With a KV quantization method (``kv_method``, ``flowcache_jax.kv.methods``) the buffer stays dense but each
chunk's rows are replaced, once, when the chunk is final (the prefix chunks in ``prepare_kv``, the generated
ones in ``end_stage``), by what the method's packed store would return: fake quantization, for the methods'
fidelity (the memory saving is Self-Forcing's real store). A clean re-encode (``encode_clean`` of a generated
chunk, semantics "magi") would rewrite quantized rows, so runs with a method use the reference semantics.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flowcache_jax.denoiser import ChunkOutput, SlotInfo
from flowcache_jax.kv import buffer as kvbuf
from flowcache_jax.kv import methods as kvm
from flowcache_jax.kv.compress import CompressConfig
from models.magi1 import Magi1Config, caption_projection, forward_call, patchify


@dataclasses.dataclass(frozen=True)
class Magi1Denoiser:
    cfg: Magi1Config
    chunk_frames: int  # latent frames per chunk (chunk_width)
    latent_h: int
    latent_w: int
    n_chunks: int  # sizes the KV buffer when it is not compressed: one row block per chunk of the video
    num_steps: int  # per chunk; sets the distill step-size embedding
    steps_per_stage: int
    clean_t: float = 0.9999
    nearly_clean_k: int | None = None  # first local step whose time is > 0.3 (None: no duplicate)
    discard_duplicate: bool = True  # FlowCache presets never run the duplicate
    prev_chunks_scale: float = 0.7
    noise2clean_kvrange: tuple[int, ...] = ()  # () = full history; official config (5, 4, 3, 2)
    clean_chunk_kvrange: int = 1
    distill_intervals: tuple[float, ...] = (1.0,)  # per step inside a stage (only used with 12 steps)
    key_tile: int = 4096
    cache_chunks: int | None = None  # KV compression: buffer of this many chunks (None: the whole video)
    compression: CompressConfig | None = None  # scoring settings; its budget is set from the layout
    query_granularity: str = "frame"  # queries scored at a compression: last 50 tokens / last frame / chunk
    prefix_chunks: int = 0  # clean chunks given before the video (continuation): ``cond["prefix"]``, see prepare_kv
    constrain: Any = None  # the sharding hook (flowcache_jax.sharding.Layout); None on one device
    kv_method: kvm.QuantMethod | None = None  # finished chunks' K/V fake-quantized by this method (None: dense)
    # History guidance (MAGI-1 base's prev_chunk_scales, Diffusion Forcing's history guidance): while a chunk's time
    # is at most history_t_max, v = v_alone + history_scale·(v − v_alone), v_alone from a second forward of the
    # chunk that sees only itself (no K/V written). 1.0 = off (one forward, the distilled model's sampling).
    history_scale: float = 1.0
    history_t_max: float = 1.0

    def __post_init__(self):
        m = self.kv_method
        if m is None:
            return
        if self.compression is not None or self.cache_chunks is not None:
            raise ValueError("kv_method does not combine with KV compression (compression / cache_chunks): the "
                             "quantized chunks stay in the whole video's buffer")
        if m.store.frame_tokens != self.frame_tokens:
            raise ValueError(f"the kv method is built for {m.store.frame_tokens}-token frames, the model's "
                             f"(patchified) latent frames have {self.frame_tokens}")

    @property
    def chunk_shape(self) -> tuple[int, int, int, int]:
        return (self.cfg.in_channels, self.chunk_frames, self.latent_h, self.latent_w)

    @property
    def tokens_per_chunk(self) -> int:
        p, pt = self.cfg.patch_size, self.cfg.t_patch_size
        return (self.chunk_frames // pt) * (self.latent_h // p) * (self.latent_w // p)

    @property
    def frame_tokens(self) -> int:
        """Tokens of one patchified latent frame (a chunk's tokens are frame-major)."""
        p = self.cfg.patch_size
        return (self.latent_h // p) * (self.latent_w // p)

    @property
    def window(self) -> int:
        return self.num_steps // self.steps_per_stage

    @property
    def layout(self) -> kvbuf.Layout:
        """The fixed-shape buffer: b history chunk slots (compressed region) + a ring of ``window`` slots."""
        b = max(self.n_chunks - self.window, 0) if self.cache_chunks is None else self.cache_chunks - self.window
        return kvbuf.Layout(self.tokens_per_chunk, self.chunk_frames // self.cfg.t_patch_size, self.window, b)

    @property
    def query_rows(self) -> int:
        ctn, hw = self.tokens_per_chunk, (self.latent_h // self.cfg.patch_size) * (self.latent_w // self.cfg.patch_size)
        return {"token": min(50, ctn), "frame": hw, "chunk": ctn}[self.query_granularity]

    @property
    def captured_queries(self) -> int:
        """Query rows every forward keeps as ``last_q``: compression's granularity, a ranked method's whole chunk
        (its score reads the last forward's queries over a finished chunk's keys), else none."""
        if self.compression is not None:
            return self.query_rows
        if self.kv_method is not None and self.kv_method.ranked:
            return self.tokens_per_chunk
        return 0

    @property
    def quant_slots(self) -> int:
        """Frames the buffer holds (the quantization bookkeeping and the study planner's static capacity)."""
        return self.layout.rows // self.frame_tokens

    def sample_noise(self, key: jax.Array, batch: int) -> jax.Array:
        return jax.random.normal(key, (batch, *self.chunk_shape), jnp.float32)

    def init_kv(self, batch: int, window: int) -> dict:
        """The K/V buffer (and compression state) of one video, with a leading batch axis for ``batch`` > 1."""
        c, lay = self.cfg, self.layout
        buf = kvbuf.empty(lay, c.num_layers, c.num_query_groups, c.kv_channels, c.jdtype)
        kv = {"buf": buf}
        if self.captured_queries:
            q_shape = (c.num_layers, self.captured_queries, c.num_attention_heads, c.kv_channels)
            kv["last_q"] = jnp.zeros(q_shape, buf.k.dtype)
        if self.compression is not None:
            kv.update(last_idx=jnp.zeros((c.num_layers, c.num_query_groups, lay.history_rows), jnp.int32),
                      events=jnp.zeros((), jnp.int32))
        if self.kv_method is not None:  # per frame slot: absolute frame once quantized (-1 before), summarised
            s = self.quant_slots
            kv["quant"] = {"frames": jnp.full((s,), -1, jnp.int32), "folded": jnp.zeros((s,), bool),
                           "plan": kvm.init_state(self.kv_method, s, c.num_query_groups)}
            if self.kv_method.ages:  # each stored frame's token ranks, for its ageing later
                kv["quant"]["rank"] = jnp.zeros((c.num_layers, s, c.num_query_groups, self.frame_tokens), jnp.int32)
        if batch == 1:
            return kv
        axes = self._kv_axes(kv)
        return jax.tree.map(lambda a, ax: a if ax is None else jnp.broadcast_to(a, (batch, *a.shape)), kv, axes)

    @staticmethod
    def _batched(kv: dict) -> bool:
        return kv["buf"].k.ndim == 5  # [batch, layers, rows, G, d]

    def _kv_axes(self, kv: dict) -> dict:
        """The K/V structure's batch axes: the videos' K/V (and compression state) have one; the slot owners are the
        same for every video (the decisions are shared), so the read masks stay unbatched and a key tile no chunk
        sees is still skipped for real inside the vmap; token frames differ per video only after a compression."""
        shared = {"owner"} | (set() if self.compression is not None else {"frame"})
        return jax.tree_util.tree_map_with_path(
            lambda path, _: None if getattr(path[-1], "name", None) in shared else 0, kv)

    def _videos(self, fn, x: jax.Array, kv: dict, out_kv: bool = True):
        """``fn(x [1, ...], kv)`` of every video of a batch (vmapped over the videos and their buffers): a batch
        shares the decisions and conditions, each video has its own latents and K/V."""
        axes = self._kv_axes(kv)
        out = axes if out_kv else 0
        return jax.vmap(lambda xb, kvb: fn(xb[None], kvb), in_axes=(0, axes), out_axes=out)(x, kv)

    def metric_features(self, params: dict, x: jax.Array, t: jax.Array) -> jax.Array:
        """The patch embedder's output (bias-free linear), FlowCache's MAGI metric (spec flowcache §1.3)."""
        tok = jax.vmap(lambda xb: patchify(self.cfg, xb.astype(jnp.float32) * self.cfg.x_rescale_factor))(x)
        out = tok @ params["x_embed"]["kernel"].astype(jnp.float32)
        return out[0] if x.shape[0] == 1 else out

    def _first_key_chunk(self, chunk: jax.Array, k: jax.Array | None) -> jax.Array:
        """Oldest chunk a chunk attends to: 0 (full history) or its stage's window of chunks."""
        if not self.noise2clean_kvrange:
            return jnp.int32(0)
        if k is None:
            n = jnp.int32(self.clean_chunk_kvrange)
        else:
            table = jnp.asarray(self.noise2clean_kvrange, jnp.int32)
            n = table[jnp.minimum(k // self.steps_per_stage, len(self.noise2clean_kvrange) - 1)]
        return jnp.maximum(0, chunk + 1 - n)

    def _kv_start(self, chunk: jax.Array, k: jax.Array | None) -> jax.Array:
        """First key row of a chunk's range in the reference's index space."""
        return self._first_key_chunk(chunk, k) * self.tokens_per_chunk

    def prepare_cond(self, params: dict, cond: dict) -> dict:
        """The captions' cross-attention projections (``y_x``, ``null_y_x``), once per prompt instead of per call."""
        fn = _projection_fn(self.cfg.jdtype)
        return dict(cond, y_x=fn(params, jnp.asarray(cond["y"])), null_y_x=fn(params, jnp.asarray(cond["null_y"])))

    def _call(self, params: dict, x: jax.Array, t: jax.Array, y: jax.Array, mask: jax.Array, kv: dict,
              chunk: jax.Array, first: jax.Array | None, write: bool, k: jax.Array,
              y_x: jax.Array | None = None) -> tuple[jax.Array, dict]:
        """One chunk forward at ``chunk``'s position; it sees buffer rows of chunks in [first, chunk) (none if
        ``first`` is None) plus itself, and writes its K/V into its slot when ``write``."""
        ctn, buf = self.tokens_per_chunk, kv["buf"]
        kv_range = jnp.stack([chunk * ctn, (chunk + 1) * ctn])[None]
        interval = jnp.asarray(self.distill_intervals, jnp.float32)[k % len(self.distill_intervals)]
        nq = self.captured_queries
        vel, (bk, bv), inter = forward_call(
            self.cfg, params, x[0], t[None], y[None], mask[None], kv_range, (buf.k, buf.v), chunk, self.num_steps,
            int(write), interval, self.key_tile, buffer_mask=kvbuf.read_mask(buf, chunk, first),
            write_start=self.layout.slot_start(chunk), capture_queries=nq,
            y_x=None if y_x is None else y_x[None], constrain=self.constrain)
        buf = buf.replace(k=bk, v=bv)
        kv = dict(kv, buf=kvbuf.mark_written(buf, self.layout, chunk) if write else buf)
        if nq:
            kv["last_q"] = inter["queries"].astype(kv["last_q"].dtype)  # the reference keeps the last forward's
        return vel[None], kv

    def forward_chunk(self, params: dict, cond: dict, x: jax.Array, info: SlotInfo, kv: dict
                      ) -> tuple[ChunkOutput, dict]:
        if not self._batched(kv):
            return self._forward_one(params, cond, x, info, kv)
        axes = self._kv_axes(kv)
        out, kv = jax.vmap(lambda xb, kvb: self._forward_one(params, cond, xb[None], info, kvb), in_axes=(0, axes),
                           out_axes=(0, axes))(x, kv)
        return jax.tree.map(lambda a: a[:, 0], out), kv

    def _forward_one(self, params: dict, cond: dict, x: jax.Array, info: SlotInfo, kv: dict
                     ) -> tuple[ChunkOutput, dict]:
        y, mask = cond["y"][info.chunk], cond["mask"][info.chunk]
        y_x = cond["y_x"][info.chunk] if "y_x" in cond else None
        chunk = info.chunk + self.prefix_chunks  # the model's chunk index (RoPE, KV slot) counts the prefix
        v, kv = self._call(params, x, info.t, y, mask, kv, chunk, self._first_key_chunk(chunk, info.k), True, info.k,
                           y_x)
        # Both guide the chunk by its history: v_alone + s·(v − v_alone), v_alone from the chunk alone at the slot
        # after the window (it sees only itself). MAGI-1's nearly-clean duplicate blends 0.7 / 0.3 at the last
        # steps of the window's oldest chunk; history guidance (MAGI-1 base) applies s wherever t <= t_max.
        if self.history_scale != 1.0:
            on, scale = info.t <= self.history_t_max, self.history_scale
        elif self.nearly_clean_k is not None and not self.discard_duplicate:
            on, scale = (info.position == 0) & (info.k >= self.nearly_clean_k), self.prev_chunks_scale
        else:
            return ChunkOutput(velocity=v, residual=v), kv

        def guided(kv):
            va, kv = self._call(params, x, info.t, y, mask, kv, info.window_end + self.prefix_chunks, None, False,
                                info.k, y_x)
            return scale * v + (1 - scale) * va, kv

        v, kv = jax.lax.cond(on, guided, lambda kv: (v, kv), kv)
        return ChunkOutput(velocity=v, residual=v), kv

    @property
    def probe_cost(self) -> float:
        """A first-block probe's share of a chunk forward (one of ``num_layers`` blocks)."""
        return 1.0 / self.cfg.num_layers

    def probe_features(self, params: dict, cond: dict, x: jax.Array, info: SlotInfo, kv: dict) -> jax.Array:
        """FirstBlockCache's metric: the first block's residual [S, D] of the chunk over the current buffer."""
        if self._batched(kv):
            return self._videos(lambda xb, kvb: self._probe_one(params, cond, xb, info, kvb), x, kv, out_kv=False)
        return self._probe_one(params, cond, x, info, kv)

    def _probe_one(self, params: dict, cond: dict, x: jax.Array, info: SlotInfo, kv: dict) -> jax.Array:
        cfg1 = dataclasses.replace(self.cfg, num_layers=1)
        p1 = dict(params, layers=jax.tree.map(lambda a: a[:1], params["layers"]))
        buf, ctn, chunk = kv["buf"], self.tokens_per_chunk, info.chunk + self.prefix_chunks
        interval = jnp.asarray(self.distill_intervals, jnp.float32)[info.k % len(self.distill_intervals)]
        _, _, inter = forward_call(
            cfg1, p1, x[0], info.t[None], cond["y"][info.chunk][None], cond["mask"][info.chunk][None],
            jnp.stack([chunk * ctn, (chunk + 1) * ctn])[None], (buf.k[:1], buf.v[:1]), chunk, self.num_steps, 0,
            interval, self.key_tile, with_intermediates=True,
            buffer_mask=kvbuf.read_mask(buf, chunk, self._first_key_chunk(chunk, info.k)),
            write_start=self.layout.slot_start(chunk), constrain=self.constrain,
            y_x=cond["y_x"][info.chunk][None] if "y_x" in cond else None)
        return inter["layer_out"][0].astype(jnp.float32) - inter["x_embed"].astype(jnp.float32)

    def velocity_from_residual(self, params: dict, cond: dict, x: jax.Array, info: SlotInfo,
                               residual: jax.Array) -> jax.Array:
        return residual  # MAGI has no cheap head: "residual" reuse replays the model output

    def encode_clean(self, params: dict, cond: dict, x: jax.Array, info: SlotInfo, kv: dict) -> dict:
        """Re-encode a finished chunk at ``clean_t`` with the null caption, only to write its K/V."""
        if self._batched(kv):
            return self._videos(lambda xb, kvb: self._encode_one(params, cond, xb, info, kvb), x, kv)
        return self._encode_one(params, cond, x, info, kv)

    def _encode_one(self, params: dict, cond: dict, x: jax.Array, info: SlotInfo, kv: dict) -> dict:
        chunk, row = info.chunk + self.prefix_chunks, jnp.maximum(info.chunk, 0)
        y_x = cond["null_y_x"][row] if "null_y_x" in cond else None
        _, kv = self._call(params, x, jnp.float32(self.clean_t), cond["null_y"][row], cond["null_mask"][row], kv,
                           chunk, self._first_key_chunk(chunk, None), True, jnp.int32(0), y_x)
        return kv

    def prepare_kv(self, params: dict, cond: dict, kv: dict) -> dict:
        """Before the video: encode the given clean prefix chunks (``cond["prefix"]`` [p, C, F, H, W]) into the
        buffer, oldest first, so the generated chunks continue them (MAGI-1's video continuation)."""
        for i in range(self.prefix_chunks):
            info = SlotInfo(chunk=jnp.int32(i - self.prefix_chunks), k=jnp.int32(0), t=jnp.float32(self.clean_t),
                            dt=jnp.float32(0.0), position=jnp.int32(-1), window_end=jnp.int32(i + 1))
            x = cond["prefix"][i][None]  # the given clip is every video's start
            if self._batched(kv):
                x = jnp.broadcast_to(x, (kv["buf"].k.shape[0], *x.shape[1:]))
            kv = self.encode_clean(params, cond, x, info, kv)
            if self.kv_method is not None:  # a given chunk is final once encoded
                kv = self._each_video(lambda kv, c=i: self._quantize_chunk(kv, jnp.int32(c)), kv)
        return kv

    def _each_video(self, fn, kv: dict) -> dict:
        """``fn(kv)`` of every video's K/V (vmapped over a batch; the shared owners pass through)."""
        if not self._batched(kv):
            return fn(kv)
        axes = self._kv_axes(kv)
        return jax.vmap(fn, in_axes=(axes,), out_axes=axes)(kv)

    def _quantize_chunk(self, kv: dict, chunk: jax.Array) -> dict:
        """One video: a final chunk's rows (every layer, K and V) replaced by what the method's store returns for
        them (``kvm.fake_quantize_block``, ranked by the last forward's queries), and its frames recorded as
        held; the study's recipe then re-plans every held frame and folds the frames it summarises."""
        m, lay, fsl = self.kv_method, self.layout, self.frame_tokens
        ctn, fpc = lay.tokens_per_chunk, lay.frames_per_chunk
        buf, st = kv["buf"], kv["quant"]
        start = lay.slot_start(chunk)
        k, v = (jax.lax.dynamic_slice_in_dim(a, start, ctn, 1) for a in (buf.k, buf.v))  # [L, ctn, G, d]
        if m.ranked:
            kq, vq, rank = jax.lax.map(lambda a: kvm.fake_quantize_block(m, a[2], a[0], a[1], fpc),
                                       (k, v, kv["last_q"]))
        else:
            kq, vq, rank = jax.lax.map(lambda a: kvm.fake_quantize_block(m, None, a[0], a[1], fpc), (k, v))
        bk, bv = (jax.lax.dynamic_update_slice_in_dim(a, x.astype(a.dtype), start, 1)
                  for a, x in ((buf.k, kq), (buf.v, vq)))
        frames = jax.lax.dynamic_update_slice_in_dim(
            st["frames"], (chunk * fpc + jnp.arange(fpc)).astype(jnp.int32), start // fsl, 0)
        folded, plan = st["folded"], st["plan"]
        quant = {"frames": frames, "plan": plan}
        if m.study is not None:
            bk, bv, folded, plan = kvm.dense_study_replan(m, bk, bv, frames, folded, plan)
            quant["plan"] = plan
        if m.ages:  # frames past the recent ones keep their first tiers, the rest folds into the mean
            ranks = jax.lax.dynamic_update_slice_in_dim(st["rank"], rank.astype(jnp.int32), start // fsl, 1)
            bk, bv, folded = kvm.age_dense(m, bk, bv, frames, folded, ranks)
            quant["rank"] = ranks
        quant["folded"] = folded
        return dict(kv, buf=buf.replace(k=bk, v=bv), quant=quant)

    def _quantize_finished(self, kv: dict, finished: jax.Array) -> dict:
        """Fake-quantize every chunk that finished this stage (ring slot -> chunk id or -1), oldest first."""
        none = jnp.iinfo(jnp.int32).max
        order = jnp.sort(jnp.where(finished >= 0, finished, none))

        def videos(kv):
            def one(kv, c):
                return jax.lax.cond(c != none, lambda kv: self._quantize_chunk(kv, c + self.prefix_chunks),
                                    lambda kv: kv, kv), None
            return jax.lax.scan(one, kv, order)[0]

        return jax.lax.cond(jnp.any(finished >= 0), lambda kv: self._each_video(videos, kv), lambda kv: kv, kv)

    def end_stage(self, params: dict, kv: dict, finished: jax.Array, n_chunks: jax.Array) -> dict:
        """Compress when the reference does: a chunk of the ring finished and another one will enter its slot;
        with a quantization method, fake-quantize the chunks that finished instead."""
        if self.kv_method is not None:
            return self._quantize_finished(kv, finished)
        lay = self.layout
        if self.compression is None or lay.history_chunks < 1:
            return kv
        c = jnp.max(finished) + self.prefix_chunks
        trigger = (c >= lay.history_chunks) & (c + self.window < n_chunks + self.prefix_chunks)

        def compress(kv):
            def one(kv):
                buf, idx = kvbuf.compact(kv["buf"], lay, c, kv["last_q"], self.compression)
                return dict(kv, buf=buf, last_idx=idx, events=kv["events"] + 1)
            if not self._batched(kv):
                return one(kv)
            axes = self._kv_axes(kv)
            return jax.vmap(one, in_axes=(axes,), out_axes=axes)(kv)

        return jax.lax.cond(trigger, compress, lambda kv: kv, kv)

    def report(self, kv: dict) -> dict:
        """What a stage leaves behind for inspection: compression events and the last kept indices; with a
        quantization method the frame held by every frame slot (-1: not yet quantized) and which are summarised."""
        if self.kv_method is not None:
            return {"quant_frames": kv["quant"]["frames"], "quant_folded": kv["quant"]["folded"]}
        if self.compression is None:
            return {}
        return {"events": kv["events"], "last_idx": kv["last_idx"]}


@functools.lru_cache(maxsize=8)
def _projection_fn(dtype):
    return jax.jit(lambda p, y: caption_projection(p, y, dtype))


def nearly_clean_step(grid: np.ndarray, threshold: float = 0.3) -> int | None:
    """First local step whose fp32 time exceeds the threshold as a Python float compare (t[48] = 0.30000001)."""
    above = np.flatnonzero(np.asarray(grid[:-1], np.float32).astype(np.float64) > threshold)
    return int(above[0]) if len(above) else None


def null_captions(params: dict, n_chunks: int, valid: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """The null branch: the learned null caption for every chunk, first ``valid`` rows unmasked (spec §5.8)."""
    null = np.asarray(params["y_embed"]["null_caption"], np.float32)
    mask = (np.arange(null.shape[0]) < min(valid, null.shape[0])).astype(np.float32)
    return np.repeat(null[None], n_chunks, 0), np.repeat(mask[None], n_chunks, 0)


def reference_calls(table, den: Magi1Denoiser, reencode: bool, width: int) -> dict[str, np.ndarray]:
    """The upstream dispatcher's per-call metadata implied by a schedule (for parity checks and reports).

    One call per step: [clean re-encode of the chunk finished at the previous stage end, at step 0] ++ the
    window's noisy chunks, oldest first; ``width`` pads the per-chunk columns.
    """
    ctn = den.tokens_per_chunk
    steps = table.num_steps
    out = {"call_window_chunk_ids": np.full((steps, width), -1, np.int64),
           "call_window_t": np.full((steps, width), np.nan, np.float32),
           "call_kv_range": np.full((steps, width, 2), -1, np.int32),
           "call_slice_point": np.zeros(steps, np.int64), "call_denoising_range_num": np.zeros(steps, np.int64),
           "call_range_num": np.zeros(steps, np.int64), "call_fwd_extra_1st_chunk": np.zeros(steps, bool),
           "call_nearly_clean": np.zeros(steps, bool), "call_stage": np.zeros(steps, np.int64),
           "call_step": np.zeros(steps, np.int64), "call_distill_interval": np.zeros(steps, np.float32)}
    g = 0
    for s in range(table.num_stages):
        clean = table.stage(s)["reencode"]
        clean = sorted(int(c) for c in clean if c >= 0) if reencode else []
        for d in range(table.steps_per_stage):
            if not table.step_valid[s, d]:
                continue
            act = table.active[s, d]
            ids, ks = list(table.chunk[s, d][act]), list(table.k[s, d][act])
            ts = list(table.t[s, d][act])
            extra = clean if d == 0 else []
            ids_all = extra + [int(c) for c in ids]
            ts_all = [np.float32(den.clean_t)] * len(extra) + ts
            sp = ids_all[0]
            for j, c in enumerate(ids_all):
                end = (sp + j + 1) * ctn
                k = None if j < len(extra) else ks[j - len(extra)]
                start = int(den._kv_start(jnp.int32(c), None if k is None else jnp.int32(k)))
                out["call_kv_range"][g, j] = (start, end)
            n = len(ids_all)
            out["call_window_chunk_ids"][g, :n] = ids_all
            out["call_window_t"][g, :n] = ts_all
            out["call_slice_point"][g], out["call_denoising_range_num"][g] = sp, n
            out["call_range_num"][g] = sp + n
            out["call_fwd_extra_1st_chunk"][g] = bool(extra)
            out["call_nearly_clean"][g] = den.nearly_clean_k is not None and ks[0] >= den.nearly_clean_k
            out["call_stage"][g], out["call_step"][g] = s, d
            out["call_distill_interval"][g] = den.distill_intervals[d % len(den.distill_intervals)]
            g += 1
    return out


def from_upstream_config(cfg: Magi1Config, config: dict, n_chunks: int, latent_h: int, latent_w: int,
                         discard_duplicate: bool = False, grid: np.ndarray | None = None) -> Magi1Denoiser:
    """A denoiser from an upstream MagiConfig dict (``runtime_config``/``engine_config`` sections)."""
    from flowcache_jax.schedules import magi_time_grid

    rt, eng = config.get("runtime_config", {}), config.get("engine_config", {})
    steps, window = int(rt.get("num_steps", 64)), int(rt.get("window_size", 4))
    grid = magi_time_grid(steps, eng.get("shortcut_mode", "8,16,16")) if grid is None else grid
    distill = bool(eng.get("distill", True))
    return Magi1Denoiser(
        cfg=cfg, chunk_frames=int(rt.get("chunk_width", 6)), latent_h=latent_h, latent_w=latent_w, n_chunks=n_chunks,
        num_steps=steps, steps_per_stage=steps // window, clean_t=float(rt.get("clean_t", 0.9999)),
        nearly_clean_k=nearly_clean_step(grid, float(eng.get("distill_nearly_clean_chunk_threshold", 0.3)))
        if distill else None,
        discard_duplicate=discard_duplicate, noise2clean_kvrange=tuple(rt.get("noise2clean_kvrange", ())),
        clean_chunk_kvrange=int(rt.get("clean_chunk_kvrange", 1)),
        distill_intervals=tuple(distill_interval_table(steps, eng.get("shortcut_mode", "8,16,16"), window)))


def distill_interval_table(num_steps: int, shortcut_mode: str, window: int) -> list[float]:
    """Per step inside a stage: the shortcut interval ([2,1,1] repeated for "8,16,16"); all ones otherwise."""
    p = num_steps // window
    if num_steps % 3:
        return [1.0] * p
    modes = [int(m) for m in shortcut_mode.split(",")]
    base = [max(modes) // m for m in modes]  # "8,16,16" -> [2, 1, 1]
    return [float(base[i % len(base)]) for i in range(p)]
