"""What a reuse policy sees and returns. Policies are pure functions over per-position arrays.

Positions are the window's chunks, oldest first (see ``schedules.ScheduleTable``). Decisions are cheap
arithmetic and are vectorised; the expensive compute/skip is done per position by the sampler with an
un-batched ``lax.cond``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np


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
    """A rule with two kinds of settings: its *structure* (which rule, how many coefficients: fixed in a compiled
    stage function) and its *knobs* (threshold, warm-up, coefficient values: arguments of that function, so a
    sweep over them compiles once)."""

    name: str

    def knobs(self) -> dict[str, Any]:
        """The runtime values the rule reads (numpy scalars / arrays)."""

    def init_global(self) -> Any:
        """Policy-global state (e.g. TeaCache's single accumulator)."""

    def decide(self, acc: jax.Array, glob: Any, info: StepInfo, knobs: dict | None = None) -> Decision:
        """Compute-or-reuse per position, new accumulators (``knobs`` None: this policy's own)."""


def structure(policy: Any) -> tuple:
    """What a compiled stage function depends on: the rule and the shapes of its knobs, not their values. A host
    policy's decisions reach it as a table, so every host policy has the same structure."""
    if getattr(policy, "host", False):
        return ("host",)
    shapes = tuple((k, np.shape(v), np.asarray(v).dtype.str) for k, v in sorted(policy.knobs().items()))
    static = tuple((f.name, getattr(policy, f.name)) for f in dataclasses.fields(policy)
                   if f.name not in policy.knobs() and f.name not in RUNTIME_FIELDS)
    return (type(policy).__name__, static, shapes)


RUNTIME_FIELDS = ("threshold", "warmup", "coeffs", "ratios", "max_skips", "min_charge")  # fields carried by knobs()


def base_knobs(threshold: float, warmup: int, coeffs: tuple[float, ...] = ()) -> dict[str, np.ndarray]:
    return {"threshold": np.float32(threshold), "warmup": np.int32(warmup),
            "coeffs": np.asarray(coeffs, np.float32).reshape(-1)}


def rescale(rel: jax.Array, coeffs: Any) -> jax.Array:
    """TeaCache's polynomial rescale of the raw metric (coefficients highest power first; none: identity)."""
    if np.shape(coeffs)[0] == 0:
        return rel
    return jnp.polyval(jnp.asarray(coeffs, jnp.float32), rel)
