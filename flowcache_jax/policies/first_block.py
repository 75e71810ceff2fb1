"""FirstBlockCache (ParaAttention's FBCache), chunkwise: reuse a chunk while its first block's residual stays
close to the one of the chunk's last *computed* step.

The metric is the rel-L1 of the first transformer block's residual (output minus input), which the sampler
gets from the denoiser's ``probe_features`` (one block of the chunk over the current KV buffer: the probe's
cost is paid at every step, reused or not). There is no accumulator: every step compares against the
anchor, which moves only when the chunk is computed. First/last global steps, new chunks and warm-up steps
always compute, as in FlowCache.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from flowcache_jax.policies.base import FORCED, NEW, REUSED, THRESHOLD, WARMUP, Decision, StepInfo, base_knobs


@dataclasses.dataclass(frozen=True)
class FirstBlockCache:
    threshold: float
    warmup: int = 3
    eps: float = 1e-8
    name: str = "first_block"
    features: str = "first_block"  # the sampler probes the first block for the metric
    anchor: str = "computed"  # previous features are kept from the last computed step

    def knobs(self) -> dict:
        return base_knobs(self.threshold, self.warmup)

    def init_global(self) -> Any:
        return jnp.zeros((), jnp.float32)

    def decide(self, acc: jax.Array, glob: Any, info: StepInfo, knobs: dict | None = None) -> Decision:
        kn = self.knobs() if knobs is None else knobs
        rel = info.diff_l1 / (info.prev_l1 + self.eps)
        forced = info.global_first | info.global_last
        new = ~info.present
        warm = info.k < kn["warmup"]
        reuse = info.active & ~forced & ~new & ~warm & (rel < kn["threshold"])
        acc_new = jnp.where(info.active & ~new, rel, acc).astype(jnp.float32)
        reason = jnp.select([forced, new, warm, reuse], [FORCED, NEW, WARMUP, REUSED], THRESHOLD).astype(jnp.int8)
        return Decision(compute=info.active & ~reuse, acc=acc_new, glob=glob, reason=reason)
