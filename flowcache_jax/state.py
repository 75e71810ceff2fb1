"""The sampler state: one pytree threaded through every jitted stage.

Per-chunk arrays live in a ring of ``window`` slots (chunk c in slot ``c % window``), so the state's
shape does not depend on the video length: finished chunks are emitted to the host at stage ends and
entering chunks get fresh noise in the same slot.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class SamplerState:
    latents: jax.Array  # [W, B, *chunk_shape]
    chunk: jax.Array  # int32 [W]: chunk id held by each ring slot, -1 if none
    acc: jax.Array  # float32 [W]: per-chunk accumulated metric
    prev_feat: jax.Array  # [W, B, *feat_shape]: metric features at the chunk's previous step
    prev_present: jax.Array  # bool [W]: prev_feat is from the immediately preceding step
    cache: jax.Array  # [W, B, ...]: last latent displacement or model residual, per chunk
    has_cache: jax.Array  # bool [W]
    kv: Any  # the model's fixed-shape KV structure
    glob: Any  # policy-global state
    step: jax.Array  # int32 []: global steps done
    computed: jax.Array  # int32 []: chunk forwards run so far
    probed: jax.Array  # int32 []: first-block probes run so far (FirstBlockCache)
    solver: Any = None  # the solver's per-chunk state, leading ring axis (FlowUniPC's history; Euler: {})
    skipped: Any = None  # int32 []: forwards the executor's structure skipped (held chunks not run)


def init_state(latent: jax.ShapeDtypeStruct, feat: jax.ShapeDtypeStruct, cache: jax.ShapeDtypeStruct,
               window: int, kv: Any, glob: Any, solver: Any = None) -> SamplerState:
    """An empty state; shapes are per chunk ([B, ...]) and get a leading ring axis of ``window``."""

    def zeros(s: jax.ShapeDtypeStruct) -> jax.Array:
        return jnp.zeros((window, *s.shape), s.dtype)

    return SamplerState(
        latents=zeros(latent), chunk=jnp.full((window,), -1, jnp.int32), acc=jnp.zeros((window,), jnp.float32),
        prev_feat=zeros(feat), prev_present=jnp.zeros((window,), bool), cache=zeros(cache),
        has_cache=jnp.zeros((window,), bool), kv=kv, glob=glob, step=jnp.zeros((), jnp.int32),
        computed=jnp.zeros((), jnp.int32), probed=jnp.zeros((), jnp.int32), solver={} if solver is None else solver,
        skipped=jnp.zeros((), jnp.int32))
