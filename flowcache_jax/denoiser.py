"""The Denoiser protocol: what a model (or the synthetic flow) gives the sampler.

The sampler never knows which model it drives; policies never see the model. A chunk forward may
read and write the model's own KV structure (``kv``), which the sampler threads through the scan.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

import jax

PyTree = Any


class SlotInfo(NamedTuple):
    """What a chunk forward knows about its chunk at this step (traced scalars)."""

    chunk: jax.Array  # int32 absolute chunk id
    k: jax.Array  # int32 completed updates of this chunk
    t: jax.Array  # float32 time, 0 = noise, 1 = clean
    dt: jax.Array  # float32 Euler step of this update
    position: jax.Array  # int32 place in the window, 0 = oldest chunk
    window_end: jax.Array  # int32 one past the newest chunk of the window (MAGI's duplicate sits there)
    step: jax.Array | None = None  # int32 steps of the run so far (e.g. which per-step noise a prefix gets)
    branch: int = 0  # static: the CFG branch of this call (``branches`` > 1: 0 = prompt, 1 = negative prompt)


class ChunkOutput(NamedTuple):
    velocity: jax.Array  # [B, *chunk_shape], d x / d t
    residual: jax.Array  # what residual reuse caches (transformer-stack output minus its input)


class Denoiser(Protocol):
    """A model seen chunk by chunk. All methods are pure and traceable."""

    chunk_shape: tuple[int, ...]  # per-sample latent shape of one chunk

    def sample_noise(self, key: jax.Array, batch: int) -> jax.Array:
        """Initial latent of one chunk, [batch, *chunk_shape], at t = 0."""

    def init_kv(self, batch: int, window: int) -> PyTree:
        """An empty fixed-shape KV structure for a run with this window."""

    def metric_features(self, params: PyTree, x: jax.Array, t: jax.Array) -> jax.Array:
        """The cheap input feature the policies compare between steps (MAGI: patch embedding)."""

    def forward_chunk(self, params: PyTree, cond: PyTree, x: jax.Array, info: SlotInfo,
                      kv: PyTree) -> tuple[ChunkOutput, PyTree]:
        """One chunk attends to itself and the valid KV rows; writes its own K/V."""

    def velocity_from_residual(self, params: PyTree, cond: PyTree, x: jax.Array, info: SlotInfo,
                               residual: jax.Array) -> jax.Array:
        """The cheap head applied to (current input embedding + cached residual)."""

    # Optional: ``encode_clean(params, cond, x, info, kv) -> kv`` re-encodes a just-finished chunk's K/V
    # (MAGI's clean re-encode); the sampler calls it at the next stage start when asked to.
    # Optional: ``prefix_chunks > 0`` with ``prepare_kv(params, cond, kv) -> kv``: clean chunks a video continues,
    # encoded once before the first step (no call, and no copy of the buffer, when there is no prefix).
    # Optional: ``probe_features(params, cond, x, info, kv)`` and ``probe_cost``: FirstBlockCache's metric.
    # Optional: ``branches > 1`` (classifier-free guidance) with ``combine(params, cond, velocities) -> velocity``;
    # each branch is its own forward (``info.branch``) with its own cache, skipped or not on its own.
    # Optional: ``forward_window(params, cond, x [W, B, ...], infos, kv) -> (velocity, residual, kv)`` per position:
    # the whole window as one model call (the sampler's ``joint`` execution).
    # Optional: ``step_conditions(params, cond, t [P, W]) -> pytree [P, ...]``: per-step conditions of every position
    # computed once per stage (vectorised); a step's slice reaches the forwards as ``cond["step"]``.
    # Optional: ``timestep_features(params, cond, table) -> dict`` of host arrays for rules that read only the
    # timesteps (their decisions are made on the host before the run).
