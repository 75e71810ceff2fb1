"""TeaCache baseline: one decision for the whole window from one accumulator.

The metric is the rel-L1 of the whole window's features against the previous step, over the chunks
present in both steps (the reference mis-aligns windows after a slide, spec §3.1; we compare each chunk
with itself). Chunks that just entered have nothing cached and are always computed. Warm-up counts
*global* steps, as in the reference.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from flowcache_jax.policies.base import FORCED, NEW, REUSED, THRESHOLD, Decision, StepInfo, rescale


@dataclasses.dataclass(frozen=True)
class TeaCache:
    threshold: float
    warmup: int = 5
    coeffs: tuple[float, ...] = ()  # polynomial rescale, highest power first; empty = none (MAGI ref)
    name: str = "teacache"

    def init_global(self) -> Any:
        return jnp.zeros((), jnp.float32)

    def decide(self, acc: jax.Array, glob: Any, info: StepInfo) -> Decision:
        both = info.active & info.present
        num = jnp.sum(jnp.where(both, info.diff_l1, 0.0))
        den = jnp.sum(jnp.where(both, info.prev_l1, 0.0))
        rel = rescale(jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), jnp.inf), self.coeffs)
        forced = info.global_first | info.global_last | (info.step < self.warmup) | ~jnp.any(both)
        a = glob + rel
        reuse_all = ~forced & (a < self.threshold)
        new_glob = jnp.where(reuse_all, a, 0.0).astype(jnp.float32)
        compute = info.active & ~(reuse_all & info.present)
        reason = jnp.where(~info.present, NEW, jnp.where(forced, FORCED, jnp.where(reuse_all, REUSED, THRESHOLD)))
        return Decision(compute=compute, acc=acc, glob=new_glob, reason=reason.astype(jnp.int8))
