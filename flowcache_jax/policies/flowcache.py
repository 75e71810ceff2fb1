"""FlowCache's chunkwise rule (spec/flowcache.md §1.4), one accumulator per chunk.

Order of checks for each chunk, exactly as the reference:
1. global first/last step of the video -> compute, accumulator untouched;
2. chunk absent from the previous step's window (just entered) -> compute, accumulator untouched;
3. warm-up: local step ``k < warmup`` -> compute, accumulator reset to 0;
4. ``a = acc + rel``; reuse iff ``a < threshold`` (strict), storing ``a``; else compute and reset to 0
   (the current increment is discarded).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from flowcache_jax.policies.base import FORCED, NEW, REUSED, THRESHOLD, WARMUP, Decision, StepInfo, base_knobs, rescale


@dataclasses.dataclass(frozen=True)
class FlowCache:
    threshold: float
    warmup: int = 5
    eps: float = 1e-8  # reference: mean|cur - prev| / (mean|prev| + 1e-8)
    coeffs: tuple[float, ...] = ()  # optional polynomial rescale (SkyReels variant); empty = none
    name: str = "flowcache"

    def knobs(self) -> dict:
        return base_knobs(self.threshold, self.warmup, self.coeffs)

    def init_global(self) -> Any:
        return jnp.zeros((), jnp.float32)

    def decide(self, acc: jax.Array, glob: Any, info: StepInfo, knobs: dict | None = None) -> Decision:
        kn = self.knobs() if knobs is None else knobs
        rel = rescale(info.diff_l1 / (info.prev_l1 + self.eps), kn["coeffs"])
        forced = info.global_first | info.global_last
        new = ~info.present
        warm = info.k < kn["warmup"]
        a = acc + rel
        reuse = info.active & ~forced & ~new & ~warm & (a < kn["threshold"])
        keep = forced | new | ~info.active
        new_acc = jnp.where(keep, acc, jnp.where(reuse, a, 0.0))
        reason = jnp.select([forced, new, warm, reuse], [FORCED, NEW, WARMUP, REUSED], THRESHOLD).astype(jnp.int8)
        return Decision(compute=info.active & ~reuse, acc=new_acc.astype(jnp.float32), glob=glob, reason=reason)
