"""FlowCache's SkyReels-V2 rule (spec flowcache.md §2): per block ("group"), from its time modulation e0.

For each block being updated: its first ``warmup`` (ret) updates and its last compute with the accumulator
reset; otherwise the polynomial-rescaled relative L1 change of the block's e0 against its previous update
accumulates, and the block reuses its transformer residual while the sum stays below the threshold
(computing resets it). The rule reads only the timesteps, so it is a host policy: the decisions are made
before the run. Both CFG branches see the same e0 and make the same decisions.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from flowcache_jax.policies.base import FORCED, REUSED, THRESHOLD, WARMUP, base_knobs
from flowcache_jax.policies.host import HostPolicy, rel_l1, scatter_plan, valid_features, valid_rows

POLY_1P3B_RET = (-5.21862437e4, 9.23041404e3, -5.28275948e2, 1.36987616e1, -4.99875664e-2)  # spec §2.3
NOT_RUN, COMPUTED, REUSED_STATUS, PREFIX = 0, 1, 2, 3  # the fork's per-call group statuses


@dataclasses.dataclass(frozen=True)
class GroupFlowCache(HostPolicy):
    threshold: float
    warmup: int = 5  # the fork's ret_steps
    coeffs: tuple[float, ...] = POLY_1P3B_RET
    name: str = "flowcache"

    def knobs(self) -> dict:
        return base_knobs(self.threshold, self.warmup, self.coeffs)

    def plan(self, table, feats: dict, branches: int, state: Any = None) -> tuple[dict, dict, Any]:
        """Decisions [S, P, branches, W], reasons, and the fork's per-call records (calls = steps x branches)."""
        coeffs = np.asarray(self.coeffs, np.float64)  # float64 as the fork's host arithmetic
        rows, e0 = valid_rows(table), valid_features(table, feats["e0"])[:, :, 0]  # a block's first frame
        active, refresh, k = rows["active"], rows["refresh"], rows["k"]
        steps, w = active.shape
        n = table.steps_per_chunk
        acc, prev, cnt = np.zeros(w), [None] * w, np.zeros(w, np.int64)
        compute, reason = np.ones((steps, w), bool), np.zeros((steps, w), np.int8)
        rec = {key: [] for key in ("status", "group_update", "group_cnt_before", "rel_l1", "rescaled", "acc_after")}
        for i in range(steps):
            status, rel, resc, before = np.zeros(w, np.int8), np.full(w, np.nan), np.full(w, np.nan), cnt.copy()
            for g in range(w):
                if active[i, g]:
                    s = int(k[i, g])
                    if s < self.warmup or s >= n - 1:
                        acc[g], c = 0.0, True
                        reason[i, g] = WARMUP if s < self.warmup else FORCED
                    else:
                        rel[g] = rel_l1(e0[i, g], prev[g])
                        resc[g] = float(np.polyval(coeffs, rel[g]))
                        acc[g] += resc[g]
                        c = bool(acc[g] >= self.threshold)
                        if c:
                            acc[g] = 0.0
                        reason[i, g] = THRESHOLD if c else REUSED
                    compute[i, g] = c
                    prev[g] = e0[i, g]
                    cnt[g] += 1
                    status[g] = COMPUTED if c else REUSED_STATUS
                elif refresh[i, g]:
                    status[g] = PREFIX
            for _ in range(branches):  # the branches decide alike; the records are per call
                for key, v in (("status", status), ("group_update", active[i]), ("group_cnt_before", before),
                               ("rel_l1", rel), ("rescaled", resc), ("acc_after", acc.copy())):
                    rec[key].append(v)
        plan = scatter_plan(table, np.repeat(compute[:, None], branches, 1), reason)
        return plan, {key: np.asarray(v) for key, v in rec.items()}, state
