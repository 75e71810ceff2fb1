"""No reuse: every active chunk is computed at every step."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from flowcache_jax.policies.base import FORCED, Decision, StepInfo


@dataclasses.dataclass(frozen=True)
class Vanilla:
    name: str = "vanilla"

    def knobs(self) -> dict:
        return {}

    def init_global(self) -> Any:
        return jnp.zeros((), jnp.float32)

    def decide(self, acc: jax.Array, glob: Any, info: StepInfo, knobs: dict | None = None) -> Decision:
        return Decision(compute=info.active, acc=acc, glob=glob, reason=jnp.full(acc.shape, FORCED, jnp.int8))
