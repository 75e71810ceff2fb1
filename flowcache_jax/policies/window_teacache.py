"""TeaCache over a whole DF window (SkyReels-V2's): one decision per transformer call, per CFG branch.

The metric is the relative L1 change of the window's time modulation (e0 with ret-steps, else the time
embedding e), polynomial-rescaled and accumulated; the call reuses its whole-window residual while the sum is
below the threshold. ``counter="intended"`` counts each branch's iterations of the window (warm-up: the
first ``warmup`` iterations with ret-steps, else 1; cut-off: none with ret-steps, else the last iteration).
``counter="reference"`` keeps upstream's call counter, which resets after ``num_steps`` calls and carries
over into the next window (the fixture README's defect 5); its state is returned for the next window.
A host policy: it reads only the timesteps.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from flowcache_jax.policies.base import FORCED, REUSED, THRESHOLD, base_knobs
from flowcache_jax.policies.group_flowcache import POLY_1P3B_RET
from flowcache_jax.policies.host import HostPolicy, rel_l1, scatter_plan, valid_features, valid_rows

POLY_1P3B_NORET = (2.39676752e3, -1.31110545e3, 2.01331979e2, -8.29855975, 1.37887774e-1)  # spec flowcache §2.3
COUNTERS = ("intended", "reference")


@dataclasses.dataclass(frozen=True)
class WindowTeaCache(HostPolicy):
    threshold: float
    use_ret_steps: bool = True
    counter: str = "intended"
    num_steps: int = 0  # the reference counter's reset value (calls); 0: upstream's per-window count (below)
    coeffs: tuple[float, ...] = ()  # empty: the 1.3B polynomial of the ret-steps mode in use
    warmup: int = 5  # ret-steps iterations (without ret-steps upstream warms up for 1)
    ar_step: int = 0  # the DF offset: upstream's step count of a window reads it (reference counter)
    name: str = "teacache"

    def __post_init__(self):
        if self.counter not in COUNTERS:
            raise ValueError(f"counter must be one of {COUNTERS}, got {self.counter!r}")

    @property
    def branch_alike(self) -> bool:
        """The intended counter decides alike for both branches; upstream's call counter may not."""
        return self.counter == "intended"

    @property
    def poly(self) -> tuple[float, ...]:
        return tuple(self.coeffs) or (POLY_1P3B_RET if self.use_ret_steps else POLY_1P3B_NORET)

    def knobs(self) -> dict:
        return base_knobs(self.threshold, self.warmup, self.poly)

    def reference_steps(self, table) -> int:
        """Upstream's ``num_steps`` of a window: steps + (blocks - prefix blocks - 1) * ar_step (steps alone when
        ar_step is 0), which differs from the window's iteration count when ar_step > steps."""
        if self.num_steps:
            return self.num_steps
        rows = valid_rows(table)
        blocks = int(((rows["chunk"] >= 0).any(0) & rows["active"].any(0)).sum())  # prefix blocks never update
        return table.steps_per_chunk + (blocks - 1) * self.ar_step if self.ar_step > 0 else table.steps_per_chunk

    def plan(self, table, feats: dict, branches: int, state: Any = None) -> tuple[dict, dict, Any]:
        """Decisions [S, P, branches, W] (one per call, all blocks alike), reasons, per-call records, state.

        ``feats["e0"]`` / ``feats["e"]``: [S, P, W, frames, ...] per block and frame (the window's frames are
        compared)."""
        coeffs = np.asarray(self.poly, np.float64)  # float64 as upstream's host arithmetic
        rows = valid_rows(table)
        m_all = valid_features(table, feats["e0"] if self.use_ret_steps else feats["e"])
        held = rows["chunk"] >= 0
        iters, w = held.shape
        num_steps = self.reference_steps(table)
        if state is None or self.counter == "intended":
            # upstream initialises its TeaCache once per video: warm-up and cut-off come from the first window's
            # step count and stay; only the counter's reset value follows each window
            state = {"cnt": 0, "acc": [0.0] * branches, "prev": [None] * branches,
                     "cutoff": branches * num_steps if self.use_ret_steps else branches * num_steps - branches}
        ret = self.warmup if self.use_ret_steps else 1
        cutoff = iters if self.use_ret_steps else iters - 1
        out = np.zeros((iters, branches), bool)
        reason = np.zeros((iters, w), np.int8)
        rec = {k: [] for k in ("computed", "cnt_before", "rel_l1", "rescaled", "acc_after")}
        for i in range(iters):
            m = m_all[i][held[i]]
            for pos in range(branches):  # prompt, then negative prompt
                cnt = state["cnt"]
                b = cnt % branches if self.counter == "reference" else pos  # upstream keys its state on parity
                if self.counter == "reference":
                    forced = cnt < branches * ret or cnt >= state["cutoff"]
                else:
                    forced = i < ret or i >= cutoff
                rel = resc = np.nan
                if forced:
                    compute, state["acc"][b] = True, 0.0
                else:
                    rel = rel_l1(m, state["prev"][b])
                    resc = float(np.polyval(coeffs, rel))
                    state["acc"][b] += resc
                    compute = bool(state["acc"][b] >= self.threshold)
                    if compute:
                        state["acc"][b] = 0.0
                state["prev"][b] = m
                out[i, pos] = compute
                if pos == 0:
                    reason[i] = FORCED if forced else (THRESHOLD if compute else REUSED)
                # recorded per branch (upstream's records read the prompt's slot for the prompt's call), which is
                # the slot used only while the counter's parity follows the branches
                for k, v in (("computed", compute), ("cnt_before", cnt), ("rel_l1", rel), ("rescaled", resc),
                             ("acc_after", state["acc"][pos])):
                    rec[k].append(v)
                state["cnt"] = cnt + 1
                if self.counter == "reference" and state["cnt"] >= num_steps:
                    state["cnt"] = 0
        plan = scatter_plan(table, np.repeat(out[:, :, None], w, 2), reason)
        return plan, {k: np.asarray(v) for k, v in rec.items()}, state
