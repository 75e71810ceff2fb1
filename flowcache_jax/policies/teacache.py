"""TeaCache baseline: one decision for the whole window from one accumulator.

``semantics="intended"`` (default): the metric is the rel-L1 of the whole window's features against the previous
step, over the chunks present in both steps (the reference mis-aligns windows after a slide, spec §3.1; we compare
each chunk with itself). Chunks that just entered have nothing cached and are always computed. Warm-up counts
*global* steps, as in the reference.

``semantics="reference"``: the decision rule of the FlowCache fork's MAGI TeaCache (``cache/cachereuse.py``
``TeaCache.should_reuse`` plus the partial branch of ``teacache.py``), read from its code and checked against the
fixture runs:

- metric: mean|cur - prev| / mean|prev| (no epsilon) of the patch-embedded window against the previous call's,
  aligned only when the window size changes: a grown window drops its newest chunk, a shrunk previous window its
  oldest (both = the chunks present in both calls, as here); at a slide (same size, one chunk left, one entered) the
  two windows are compared position by position, i.e. chunk c against chunk c-1 (``lag_*`` fields below);
- forced (accumulator 0): global first and last call, and the first ``warmup`` calls;
- otherwise ``a = acc + rel``; ``a < threshold``: full reuse (keep ``a``), ``a >= threshold``: compute, ``acc = 0``;
- **every call whose window grew is "partial"** as soon as the accumulator after the check is below the threshold,
  which also holds when the call was forced or the threshold was just exceeded (both leave ``acc = 0``): only the
  entering (newest) chunk is forwarded. So with any threshold > 0 every growing stage boundary is partial, warm-up
  included; with threshold 0 none is.

What the reference does *around* that decision is not expressible in a policy: at a partial call the older chunks
are not advanced at all (they are overwritten by the window latent saved at the previous stage's last call, so
their stored displacement becomes 0 and later full reuses keep them frozen), the newest chunk is forwarded alone
(at slice_point 0 it attends only to itself, and with the nearly-clean duplicate the fork forwards the second-newest
chunk's input instead), a full reuse replays the last computed call's displacement by window position (after a
slide chunk c gets chunk c-1's, an entering chunk included), and it crashes at a partial call whose previous call
was reused. In the sampler the older chunks of a partial call replay their own last displacement and entering
chunks are always computed, so trajectories agree with the reference only up to the first partial call that has
older chunks.

Optional step-info fields (``getattr``; not yet filled by the sampler) for the slide metric: ``lag_diff_l1`` [W]
mean|feat - prev_feat of chunk c-1|, ``lag_prev_l1`` [W] mean|prev_feat of chunk c-1|, ``lag_present`` [W] chunk
c-1 was in the previous window. Without them a slide is compared chunk by chunk, as in the intended semantics.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from flowcache_jax.policies.base import FORCED, NEW, REUSED, THRESHOLD, Decision, StepInfo, base_knobs, rescale

SEMANTICS = ("intended", "reference")


@dataclasses.dataclass(frozen=True)
class TeaCache:
    threshold: float
    warmup: int = 5
    coeffs: tuple[float, ...] = ()  # polynomial rescale, highest power first; empty = none (MAGI ref)
    name: str = "teacache"
    semantics: str = "intended"  # or "reference": the FlowCache fork's MAGI rule (module docstring)

    def __post_init__(self):
        if self.semantics not in SEMANTICS:
            raise ValueError(f"TeaCache semantics must be one of {SEMANTICS}, got {self.semantics!r}")

    def knobs(self) -> dict:
        return base_knobs(self.threshold, self.warmup, self.coeffs)

    def init_global(self) -> Any:
        if self.semantics == "reference":  # the accumulator and the previous call's window size
            return {"acc": jnp.zeros((), jnp.float32), "n_prev": jnp.zeros((), jnp.int32)}
        return jnp.zeros((), jnp.float32)

    def decide(self, acc: jax.Array, glob: Any, info: StepInfo, knobs: dict | None = None) -> Decision:
        kn = self.knobs() if knobs is None else knobs
        if self.semantics == "reference":
            return self._decide_reference(acc, glob, info, kn)
        both = info.active & info.present
        num = jnp.sum(jnp.where(both, info.diff_l1, 0.0))
        den = jnp.sum(jnp.where(both, info.prev_l1, 0.0))
        rel = rescale(jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), jnp.inf), kn["coeffs"])
        forced = info.global_first | info.global_last | (info.step < kn["warmup"]) | ~jnp.any(both)
        a = glob + rel
        reuse_all = ~forced & (a < kn["threshold"])
        new_glob = jnp.where(reuse_all, a, 0.0).astype(jnp.float32)
        compute = info.active & ~(reuse_all & info.present)
        reason = jnp.where(~info.present, NEW, jnp.where(forced, FORCED, jnp.where(reuse_all, REUSED, THRESHOLD)))
        return Decision(compute=compute, acc=acc, glob=new_glob, reason=reason.astype(jnp.int8))

    def _decide_reference(self, acc: jax.Array, glob: Any, info: StepInfo, kn: dict) -> Decision:
        n = jnp.sum(info.active.astype(jnp.int32))
        both = info.active & info.present
        entered = info.active & ~info.present
        grew = n > glob["n_prev"]
        slide = (n == glob["n_prev"]) & jnp.any(entered)
        num = jnp.sum(jnp.where(both, info.diff_l1, 0.0))
        den = jnp.sum(jnp.where(both, info.prev_l1, 0.0))
        if getattr(info, "lag_diff_l1", None) is not None:  # position-aligned metric at a slide
            lag = info.active & info.lag_present
            num = jnp.where(slide, jnp.sum(jnp.where(lag, info.lag_diff_l1, 0.0)), num)
            den = jnp.where(slide, jnp.sum(jnp.where(lag, info.lag_prev_l1, 0.0)), den)
        rel = rescale(jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), jnp.inf), kn["coeffs"])
        forced = info.global_first | info.global_last | (info.step < kn["warmup"])
        a = glob["acc"] + rel
        below = ~forced & (a < kn["threshold"])
        new_acc = jnp.where(below, a, 0.0).astype(jnp.float32)
        partial = grew & (new_acc < kn["threshold"])  # forced or exceeded leave 0, which is below any threshold > 0
        reuse_all = below & ~grew
        compute = info.active & jnp.where(partial, entered, ~reuse_all)
        reason = jnp.where(entered, NEW, jnp.where(~compute, REUSED, jnp.where(forced, FORCED, THRESHOLD)))
        return Decision(compute=compute, acc=acc, glob={"acc": new_acc, "n_prev": n}, reason=reason.astype(jnp.int8))
