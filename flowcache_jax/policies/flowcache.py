"""FlowCache's chunkwise rule (spec/flowcache.md §1.4), one accumulator per chunk.

Order of checks for each chunk, exactly as the reference:
1. global first/last step of the video -> compute, accumulator untouched;
2. chunk absent from the previous step's window (just entered) -> compute, accumulator untouched;
3. warm-up: local step ``k < warmup`` -> compute, accumulator reset to 0;
4. ``a = acc + rel``; reuse iff ``a < threshold`` (strict), storing ``a``; else compute and reset to 0
   (the current increment is discarded).

``min_charge`` (a guard, not in the reference; 0 = off, bit-identical) charges every step at least that much:
``a = acc + max(rel, min_charge)``. A reused chunk replays its last displacement, so its input moves by that
replayed step and ``rel`` stays as small as it was when the cache was filled, however much the true update has
grown since (on the synthetic flows: 27 reuses in a row from a near-noise step whose dt is 60x too small). The
floor caps a run of reuses at ``ceil(threshold / min_charge)`` steps, so reuse vanishes as the threshold does.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flowcache_jax.policies.base import FORCED, NEW, REUSED, THRESHOLD, WARMUP, Decision, StepInfo, base_knobs, rescale


@dataclasses.dataclass(frozen=True)
class FlowCache:
    threshold: float
    warmup: int = 5
    eps: float = 1e-8  # reference: mean|cur - prev| / (mean|prev| + 1e-8)
    coeffs: tuple[float, ...] = ()  # optional polynomial rescale (SkyReels variant); empty = none
    min_charge: float = 0.0  # guard: least charge per step (0 = the reference rule); a runtime knob
    name: str = "flowcache"

    def knobs(self) -> dict:
        return {**base_knobs(self.threshold, self.warmup, self.coeffs), "min_charge": np.float32(self.min_charge)}

    def init_global(self) -> Any:
        return jnp.zeros((), jnp.float32)

    def decide(self, acc: jax.Array, glob: Any, info: StepInfo, knobs: dict | None = None) -> Decision:
        kn = self.knobs() if knobs is None else knobs
        rel = rescale(info.diff_l1 / (info.prev_l1 + self.eps), kn["coeffs"])
        forced = info.global_first | info.global_last
        new = ~info.present
        warm = info.k < kn["warmup"]
        floor = jnp.asarray(kn.get("min_charge", 0.0), jnp.float32)
        a = acc + jnp.where(floor > 0, jnp.maximum(rel, floor), rel)  # off: rel itself (even negative or nan)
        reuse = info.active & ~forced & ~new & ~warm & (a < kn["threshold"])
        keep = forced | new | ~info.active
        new_acc = jnp.where(keep, acc, jnp.where(reuse, a, 0.0))
        reason = jnp.select([forced, new, warm, reuse], [FORCED, NEW, WARMUP, REUSED], THRESHOLD).astype(jnp.int8)
        return Decision(compute=info.active & ~reuse, acc=new_acc.astype(jnp.float32), glob=glob, reason=reason)
