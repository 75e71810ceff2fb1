"""SkyReels-V2 seen block by block: the Denoiser protocol of the one sampler over ``models.skyreels_v2``.

A diffusion-forcing window of ``groups`` causal blocks is one sampler window; a block ("group") is a chunk.
Two executors, both driven by ``flowcache_jax.sampler``:

- ``groups`` (FlowCache's): each block is its own forward, oldest first, over a per-branch K/V buffer —
  block g writes its slot and attends to slots 0..g, fresh where rerun this call and stale otherwise. Blocks
  the schedule does not run (finished, not started) cost nothing.
- ``window`` (upstream's, ``forward_window``): one DiT call over the whole window, block-causal or full.

Classifier-free guidance is two branches (0: prompt, 1: negative prompt) with their own K/V and residual
caches, combined by ``combine`` with the guidance scale from ``cond``. Long-video prefix blocks get
``(1 - a)·x + a·eps`` (a = 0.001·addnoise_condition, eps per iteration and video from ``cond["eps"]``).

A batch of videos (x [B, ...] with B > 1) rides inside each forward: every video has its own tokens, K/V buffer
and residuals (vmapped over the videos), while the time and text conditions and the cache decisions (timestep
rules, or one input metric over the batch) are shared. With B = 1 the arrays keep their batch-free shapes
(K/V [branches, layers, rows, heads, hd], residual [tokens, D]); with B > 1 a batch axis follows the branch axis
(K/V [branches, B, layers, ...], residual [B, tokens, D]), as MAGI-1 does it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flowcache_jax.denoiser import ChunkOutput, SlotInfo
from models import attention as attn
from models.layers import dense
from models.skyreels_v2 import (
    SkyReelsConfig,
    cross_kv,
    head,
    patchify,
    rope_tables,
    run_blocks,
    text_embed,
    time_conditions,
    unpatchify,
)

EXECUTORS = ("groups", "window")


@dataclasses.dataclass(frozen=True)
class SkyReelsDenoiser:
    cfg: SkyReelsConfig
    groups: int  # causal blocks in the window (the sampler's window)
    block: int  # latent frames per block
    latent_h: int
    latent_w: int
    executor: str = "groups"
    attention: str = "block_causal"  # the window executor's self-attention: "block_causal" or "full"
    key_tile: int = 4096
    branches: int = 2
    constrain: Any = None  # the sharding hook (flowcache_jax.sharding.Layout); None on one device

    def __post_init__(self):
        if self.executor not in EXECUTORS:
            raise ValueError(f"executor must be one of {EXECUTORS}, got {self.executor!r}")
        if self.attention not in ("block_causal", "full"):
            raise ValueError(f"attention must be block_causal or full, got {self.attention!r}")
        if self.executor == "groups" and self.attention != "block_causal":
            raise ValueError("the groups executor is block-causal by construction: use attention=block_causal")

    @property
    def chunk_shape(self) -> tuple[int, int, int, int]:
        return (self.cfg.in_dim, self.block, self.latent_h, self.latent_w)

    @property
    def hw(self) -> int:
        _, ph, pw = self.cfg.patch_size
        return (self.latent_h // ph) * (self.latent_w // pw)

    @property
    def tokens_per_group(self) -> int:
        return self.block // self.cfg.patch_size[0] * self.hw

    def _rope(self) -> tuple[np.ndarray, np.ndarray]:
        pt, ph, pw = self.cfg.patch_size
        return rope_tables(self.cfg.head_dim, self.groups * self.block // pt, self.latent_h // ph,
                           self.latent_w // pw)

    # ----- conditions -----------------------------------------------------------------------------
    def prepare_cond(self, params: dict, context: jax.Array, negative_context: jax.Array, fps: int,
                     guidance: float, addnoise_condition: int = 0) -> dict:
        """The run's conditions: both texts' cross-attention K/V of every block once (``ctx`` per branch: a (K, V)
        pair [layers, L, heads, hd]), fps index, guidance and addnoise as traced values."""
        embed = _text_fn(self.cfg)
        ctx = (embed(params, jnp.asarray(context)), embed(params, jnp.asarray(negative_context)))
        # texts of one length: one stacked tree the branches share (and batch over); else one tree per branch
        texts = ({"ctx_both": jax.tree.map(lambda a, b: jnp.stack([a, b]), *ctx)}
                 if ctx[0][0].shape == ctx[1][0].shape else {"ctx": ctx})
        return {**texts,
                "fps": jnp.int32(fps), "guidance": jnp.float32(guidance),
                "a": jnp.float32(0.001 * addnoise_condition)}

    @staticmethod
    def window_cond(cond: dict, prefix_groups: int, eps: np.ndarray | None, iterations: int,
                    prefix_slots: int, eps_shape: tuple[int, ...]) -> dict:
        """``cond`` of one DF window: its prefix block count and addnoise noise [I, slots, B, C, block, h, w] (one
        draw per video, as a batch-wide ``randn_like`` gives; zeros where unused, so that windows with and without
        a prefix share one compiled function). ``eps_shape`` is (B, C, block, h, w)."""
        e = np.zeros((iterations, max(prefix_slots, 1), *eps_shape), np.float32)
        if eps is not None:
            e[: eps.shape[0], : eps.shape[1]] = eps
        return {**cond, "prefix_groups": jnp.int32(prefix_groups), "eps": jnp.asarray(e)}

    # ----- the Denoiser protocol ------------------------------------------------------------------
    def sample_noise(self, key: jax.Array, batch: int) -> jax.Array:
        return jax.random.normal(key, (batch, *self.chunk_shape), jnp.float32)

    def init_kv(self, batch: int, window: int) -> tuple:
        """(K, V) [branches, (B,) layers, groups · tokens, heads, head_dim], the batch axis only for B > 1; the
        window executor needs none."""
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        if self.executor == "window":
            return ()
        c = self.cfg
        shape = (self.branches, *((batch,) if batch > 1 else ()), c.num_layers, self.groups * self.tokens_per_group,
                 c.num_heads, c.head_dim)
        return jnp.zeros(shape, jnp.dtype(c.dtype)), jnp.zeros(shape, jnp.dtype(c.dtype))

    def _model_t(self, t: jax.Array) -> jax.Array:
        """The integer model timestep the schedule encoded as t = 1 - model_t / 1000."""
        return jnp.round((1.0 - t) * 1000.0)

    def _input(self, cond: dict, x: jax.Array, position: jax.Array, step: jax.Array) -> jax.Array:
        """A prefix block's input x [B, ...] is its latent noised with the iteration's eps of each video; the
        others' their latent."""
        prefix = position < cond["prefix_groups"]
        slots = cond["eps"].shape[1]
        eps = cond["eps"][step, jnp.clip(position, 0, slots - 1)]  # [B, C, block, h, w] (or one unbatched draw)
        return jnp.where(prefix, x * (1 - cond["a"]) + eps * cond["a"], x)

    def step_conditions(self, params: dict, cond: dict, t: jax.Array) -> dict:
        """Every block's time embedding e [P, W, D] and modulation e0 [P, W, 6, D] for a stage's steps at once
        (the blocks' frames share their time; both CFG branches and the whole-window call read them)."""
        tc = time_conditions(self.cfg, params, self._model_t(t).reshape(-1), cond["fps"])
        p, w = t.shape
        return {"e": tc["e"].reshape(p, w, -1), "e0": tc["e0"].reshape(p, w, 6, -1)}

    def _time(self, params: dict, cond: dict, info: SlotInfo) -> dict:
        """The block's per-frame e [f, D] / e0 [f, 6, D]: from the step's conditions when the sampler gives them."""
        frames = self.block // self.cfg.patch_size[0]
        if "step" in cond:
            sc = cond["step"]
            return {k: jnp.repeat(jax.lax.dynamic_index_in_dim(sc[k], info.position, keepdims=True), frames, 0)
                    for k in ("e", "e0")}
        return time_conditions(self.cfg, params, jnp.full((frames,), self._model_t(info.t)), cond["fps"])

    def _patch_embed(self, params: dict, x: jax.Array) -> jax.Array:
        """Patch tokens [n, D] of latents x [1, C, frames, h, w] (one video); [B, n, D] of a batch's."""
        one = lambda xb: dense(patchify(self.cfg, xb), params["patch"], jnp.float32)  # noqa: E731
        return one(x[0]) if x.shape[0] == 1 else jax.vmap(one)(x)

    def _embed(self, params: dict, cond: dict, x: jax.Array, info: SlotInfo) -> tuple[jax.Array, dict]:
        return (self._patch_embed(params, self._input(cond, x, info.position, info.step)),
                self._time(params, cond, info))

    def _velocity(self, params: dict, h: jax.Array, e: jax.Array) -> jax.Array:
        """Velocity [B, C, block, h, w] from the stack's output h [n, D] (one video) or [B, n, D]."""
        if h.ndim == 3:
            return jax.vmap(lambda hb: self._velocity(params, hb, e)[0])(h)
        y = head(self.cfg, params, h, e, jnp.arange(h.shape[0]) // self.hw)
        return unpatchify(self.cfg, y, self.block, self.latent_h, self.latent_w)[None]

    def metric_features(self, params: dict, x: jax.Array, t: jax.Array) -> jax.Array:
        """The block's patch embedding [B, n, D] (the input-feature metric of the chunkwise policies: one decision
        for a batch, from the mean over its videos)."""
        f = self._patch_embed(params, x)
        return f[None] if x.shape[0] == 1 else f

    @staticmethod
    def branch_ctx(cond: dict, b: int | jax.Array) -> tuple[jax.Array, jax.Array]:
        """Branch ``b``'s cross-attention (K, V) [layers, L, heads, hd]."""
        if "ctx_both" in cond:
            return jax.tree.map(lambda a: a[b], cond["ctx_both"])
        return cond["ctx"][b]

    def _blocks(self, params: dict, h_in: jax.Array, e0: jax.Array, ctx: jax.Array, k: jax.Array, v: jax.Array,
                g: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Block g's transformer pass over one branch's buffer: writes its slot, attends to slots 0..g. A batch
        (h_in [B, n, D], buffers [B, layers, ...]) is vmapped over its videos, conditions shared."""
        if h_in.ndim == 3:
            return jax.vmap(lambda h, kb, vb: self._blocks(params, h, e0, ctx, kb, vb, g))(h_in, k, v)
        n = self.tokens_per_group
        cos, sin = (jax.lax.dynamic_slice_in_dim(jnp.asarray(a), g * n, n) for a in self._rope())
        h_out, (k, v), _ = run_blocks(self.cfg, params, h_in, e0, jnp.arange(n) // self.hw, ctx, cos, sin, None,
                                      self.key_tile, kv=(k, v), write_start=g * n,
                                      keys=attn.Keys("prefix", length=(g + 1) * n), constrain=self.constrain)
        return h_out, k, v

    def forward_chunk(self, params: dict, cond: dict, x: jax.Array, info: SlotInfo, kv: tuple
                      ) -> tuple[ChunkOutput, tuple]:
        h_in, tc = self._embed(params, cond, x, info)
        b = info.branch
        h_out, k, v = self._blocks(params, h_in, tc["e0"], self.branch_ctx(cond, b), kv[0][b], kv[1][b],
                                     info.position)
        kv = (kv[0].at[b].set(k), kv[1].at[b].set(v))
        return ChunkOutput(velocity=self._velocity(params, h_out, tc["e"]), residual=h_out - h_in), kv

    def batches_branches(self, cond: dict) -> bool:
        """Both branches as one batched forward (their contexts have one shape; the decisions are the caller's)."""
        return "ctx_both" in cond

    def forward_branches(self, params: dict, cond: dict, x: jax.Array, info: SlotInfo, kv: tuple
                         ) -> tuple[jax.Array, jax.Array, tuple]:
        """Both CFG branches of block ``info.position`` at once (vmapped over contexts and buffers, and inside over
        the videos of a batch): velocities [branches, B, ...] and residuals [branches, (B,) n, D]."""
        h_in, tc = self._embed(params, cond, x, info)
        h_out, k, v = jax.vmap(lambda c, kb, vb: self._blocks(params, h_in, tc["e0"], c, kb, vb, info.position))(
            cond["ctx_both"], kv[0], kv[1])
        vel = jax.vmap(lambda h: self._velocity(params, h, tc["e"]))(h_out)
        return vel, h_out - h_in[None], (k, v)

    def velocity_branches(self, params: dict, cond: dict, x: jax.Array, info: SlotInfo, residual: jax.Array
                          ) -> jax.Array:
        h_in, tc = self._embed(params, cond, x, info)
        return jax.vmap(lambda r: self._velocity(params, h_in + r, tc["e"]))(residual)

    def velocity_from_residual(self, params: dict, cond: dict, x: jax.Array, info: SlotInfo,
                               residual: jax.Array) -> jax.Array:
        h_in, tc = self._embed(params, cond, x, info)
        return self._velocity(params, h_in + residual, tc["e"])

    def combine(self, params: dict, cond: dict, velocities: list) -> jax.Array:
        v_c, v_u = velocities
        return v_u + cond["guidance"] * (v_c - v_u)

    def forward_window(self, params: dict, cond: dict, x: jax.Array, infos: SlotInfo, kv: tuple
                       ) -> tuple[jax.Array, jax.Array, tuple]:
        """One DiT call over the whole window (positions = blocks in order) per video: velocity [W, B, ...] and
        residual [W, (B,) n, D] per block."""
        embed = self._window_embed(params, cond, x, infos)
        v, res = self._window_call(params, embed, self.branch_ctx(cond, infos.branch), x.shape[0])
        return v, res, kv

    def window_branches(self, params: dict, cond: dict, x: jax.Array, infos: SlotInfo, kv: tuple
                        ) -> tuple[jax.Array, jax.Array, tuple]:
        """Both CFG branches' whole-window calls at once (vmapped over the contexts): [branches, W, ...]."""
        embed = self._window_embed(params, cond, x, infos)
        v, res = jax.vmap(lambda c: self._window_call(params, embed, c, x.shape[0]))(cond["ctx_both"])
        return v, res, kv

    def _window_embed(self, params: dict, cond: dict, x: jax.Array, infos: SlotInfo) -> tuple:
        """The window's tokens h_in [N, D] (one video) or [B, N, D], and its per-frame time conditions."""
        c, w, pt = self.cfg, x.shape[0], self.cfg.patch_size[0]
        x_in = jax.vmap(lambda xi, pos: self._input(cond, xi, pos, infos.step))(x, infos.position)
        full = jnp.moveaxis(x_in, 0, 2).reshape(x.shape[1], c.in_dim, w * self.block, self.latent_h, self.latent_w)
        h_in = self._patch_embed(params, full)
        if "step" in cond:
            tc = {k: jnp.repeat(cond["step"][k], self.block // pt, 0) for k in ("e", "e0")}
        else:
            tc = time_conditions(c, params, jnp.repeat(self._model_t(infos.t), self.block // pt), cond["fps"])
        return h_in, tc

    def _window_call(self, params: dict, embed: tuple, ctx: jax.Array, w: int) -> tuple[jax.Array, jax.Array]:
        """Velocity [W, B, ...] and residual [W, (B,) n, D] of one branch's whole-window call."""
        (h_in, tc), c = embed, self.cfg
        if h_in.ndim == 3:  # a batch: one call per video (vmapped), the time conditions shared
            v, res = jax.vmap(lambda h: self._window_call(params, (h, tc), ctx, w))(h_in)
            return jnp.moveaxis(v[:, :, 0], 0, 1), jnp.moveaxis(res, 0, 1)
        n = h_in.shape[0]
        frame_of = jnp.arange(n) // self.hw
        keys = attn.Keys("blocks", block=self.tokens_per_group) if self.attention == "block_causal" else \
            attn.Keys("full")
        cos, sin = (jnp.asarray(a) for a in self._rope())
        h, _, _ = run_blocks(c, params, h_in, tc["e0"], frame_of, ctx, cos, sin, None, self.key_tile, keys=keys,
                             constrain=self.constrain)
        y = unpatchify(c, head(c, params, h, tc["e"], frame_of), w * self.block, self.latent_h, self.latent_w)
        v = jnp.moveaxis(y.reshape(c.out_dim, w, self.block, self.latent_h, self.latent_w), 1, 0)[:, None]
        return v, (h - h_in).reshape(w, self.tokens_per_group, c.dim)

    def timestep_features(self, params: dict, cond: dict, table) -> dict:
        """Host arrays of the rules that read only the timesteps: per step, block and frame, e0 [.., 6, D] and
        e [.., D] of the conditioning time, float64. Computed frame by frame, one call per step, as the references
        do (their rules threshold differences of nearly equal values, so the rounding of e0 matters)."""
        fn = _time_fn(self.cfg)
        frames = self.block // self.cfg.patch_size[0]
        t = np.asarray(self._model_t(jnp.asarray(table.t.reshape(-1, table.window))))
        e0, e = [], []
        for row in t:
            tc = fn(params, jnp.asarray(np.repeat(row, frames)), cond["fps"])
            e0.append(np.asarray(tc["e0"], np.float64))
            e.append(np.asarray(tc["e"], np.float64))
        shape = (*table.t.shape, frames)
        return {"e0": np.stack(e0).reshape(*shape, *e0[0].shape[1:]), "e": np.stack(e).reshape(*shape, -1)}


@functools.lru_cache(maxsize=16)
def _text_fn(cfg: SkyReelsConfig):
    return jax.jit(lambda p, ctx: cross_kv(cfg, p, text_embed(cfg, p, ctx)))


@functools.lru_cache(maxsize=16)
def _time_fn(cfg: SkyReelsConfig):
    return jax.jit(lambda p, t, fps: time_conditions(cfg, p, t, fps))
