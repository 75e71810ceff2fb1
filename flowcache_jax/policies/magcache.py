"""MagCache (Ma et al. 2025), chunkwise: an offline error model from the magnitude ratio of successive outputs.

Calibration (one uncached run) gives ``ratios[k] = mean ||v_k|| / ||v_{k-1}||`` per local step k of a chunk.
Skipping steps k_c+1..k after a compute at k_c is modelled as the error
``E[k_c, k] = sum_{i=k_c+1..k} |1 - prod_{j=k_c+1..i} ratios[j]|``; a chunk reuses its cached output while
``E < threshold`` and at most ``max_skips`` steps in a row were skipped. The decision needs no feature at
all, so the per-chunk accumulator is just the local step of the chunk's last compute.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flowcache_jax.policies.base import FORCED, NEW, REUSED, THRESHOLD, WARMUP, Decision, StepInfo


def error_table(ratios: np.ndarray) -> np.ndarray:
    """E[c, k] for 0 <= c < k < N: the modelled error of reusing the output of step c at steps c+1..k."""
    r = np.asarray(ratios, np.float64)
    n = len(r)
    e = np.full((n, n), np.inf)
    for c in range(n):
        prod, err = 1.0, 0.0
        for k in range(c + 1, n):
            prod *= r[k]
            err += abs(1.0 - prod)
            e[c, k] = err
    return e


def calibrate_ratios(norms: np.ndarray) -> np.ndarray:
    """Per local step, the mean over chunks of ||v_k|| / ||v_{k-1}|| from norms [chunks, N] (ratio[0] = 1)."""
    norms = np.asarray(norms, np.float64)
    ratio = np.ones(norms.shape[1])
    ratio[1:] = np.nanmean(norms[:, 1:] / np.maximum(norms[:, :-1], 1e-30), axis=0)
    return ratio


@dataclasses.dataclass(frozen=True)
class MagCache:
    threshold: float
    ratios: tuple[float, ...]  # per local step, from ``calibrate_ratios``
    warmup: int = 3
    max_skips: int = 4
    name: str = "magcache"

    def __post_init__(self):
        if len(self.ratios) < 2:
            raise ValueError("MagCache needs calibrated ratios (one per local step); run an uncached calibration")

    def knobs(self) -> dict:
        """The error table is built on the host from the ratios; it is a knob, like the threshold."""
        return {"threshold": np.float32(self.threshold), "warmup": np.int32(self.warmup),
                "max_skips": np.int32(self.max_skips),
                "table": np.minimum(error_table(np.asarray(self.ratios)), 1e30).astype(np.float32)}

    def init_global(self) -> Any:
        return jnp.zeros((), jnp.float32)

    def decide(self, acc: jax.Array, glob: Any, info: StepInfo, knobs: dict | None = None) -> Decision:
        kn = self.knobs() if knobs is None else knobs
        n = len(self.ratios)
        table = jnp.asarray(kn["table"], jnp.float32)
        last = jnp.clip(acc.astype(jnp.int32), 0, n - 1)  # acc holds the chunk's last computed local step
        k = jnp.clip(info.k, 0, n - 1)
        err = table[last, k]
        forced = info.global_first | info.global_last
        new = ~info.present
        warm = info.k < kn["warmup"]
        reuse = (info.active & ~forced & ~new & ~warm & (k > last) & (k - last <= kn["max_skips"])
                 & (err < kn["threshold"]))
        acc_new = jnp.where(info.active & ~reuse, info.k.astype(jnp.float32), acc)
        reason = jnp.select([forced, new, warm, reuse], [FORCED, NEW, WARMUP, REUSED], THRESHOLD).astype(jnp.int8)
        return Decision(compute=info.active & ~reuse, acc=acc_new.astype(jnp.float32), glob=glob, reason=reason)
