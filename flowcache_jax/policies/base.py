"""What a reuse policy sees and returns. Policies are pure functions over per-position arrays.

Positions are the window's chunks, oldest first (see ``schedules.ScheduleTable``). Decisions are cheap
arithmetic and are vectorised; the expensive compute/skip is done per position by the sampler with an
un-batched ``lax.cond``.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp


class StepInfo(NamedTuple):
    active: jax.Array  # bool [W]: the position holds a chunk updated at this step
    present: jax.Array  # bool [W]: that chunk was in the previous step's window (features exist)
    k: jax.Array  # int32 [W]: the chunk's completed updates before this step (local step)
    diff_l1: jax.Array  # float32 [W]: mean |feat - prev_feat| of the chunk
    prev_l1: jax.Array  # float32 [W]: mean |prev_feat| of the chunk
    global_first: jax.Array  # bool []: first step of the video
    global_last: jax.Array  # bool []: last step of the video
    step: jax.Array  # int32 []: global step counter before this step


# Why a chunk was computed or reused (recorded per step; the MAGI reference's codes).
FORCED, NEW, WARMUP, THRESHOLD, REUSED = 0, 1, 2, 3, 4


class Decision(NamedTuple):
    compute: jax.Array  # bool [W]
    acc: jax.Array  # float32 [W], per-chunk accumulators (gathered by position)
    glob: Any  # policy-global state
    reason: jax.Array  # int8 [W]: FORCED, NEW, WARMUP, THRESHOLD or REUSED


class Policy(Protocol):
    name: str

    def init_global(self) -> Any:
        """Policy-global state (e.g. TeaCache's single accumulator)."""

    def decide(self, acc: jax.Array, glob: Any, info: StepInfo) -> Decision:
        """Compute-or-reuse per position, new accumulators."""


def rescale(rel: jax.Array, coeffs: tuple[float, ...]) -> jax.Array:
    """TeaCache's polynomial rescale of the raw metric (coefficients highest power first)."""
    if not coeffs:
        return rel
    return jnp.polyval(jnp.asarray(coeffs, jnp.float32), rel)
