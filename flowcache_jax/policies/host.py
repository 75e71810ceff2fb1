"""Shared plumbing of the host policies: rules that read only the timesteps decide before the run.

Such a rule (SkyReels' FlowCache and window TeaCache read the time modulation e0) sees the whole schedule
table and the model's timestep features up front, so its decisions are a table — data for the compiled
stage function, which a threshold sweep therefore never recompiles.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


class HostPolicy:
    """The in-graph side of a host policy: no global state, no in-graph decision (the sampler reads the table)."""

    host = True

    def init_global(self) -> Any:
        return jnp.zeros((), jnp.float32)

    def decide(self, acc: jax.Array, glob: Any, info: Any, knobs: dict | None = None) -> Any:
        raise NotImplementedError(f"{type(self).__name__} decides on the host (plan), not in the graph")


def valid_rows(table) -> dict[str, np.ndarray]:
    """The table's per-step arrays [T, W] over its valid steps, in run order."""
    valid = table.step_valid.reshape(-1)
    out = {}
    for name in ("chunk", "k", "active", "t"):
        a = getattr(table, name)
        out[name] = a.reshape(-1, a.shape[-1])[valid]
    ref = table.refresh if table.refresh is not None else np.zeros_like(table.active)
    out["refresh"] = ref.reshape(-1, ref.shape[-1])[valid]
    return out


def valid_features(table, feats: np.ndarray) -> np.ndarray:
    """[S, P, W, ...] features -> [T, W, ...] over the valid steps."""
    valid = table.step_valid.reshape(-1)
    return feats.reshape(-1, *feats.shape[2:])[valid]


def scatter_plan(table, compute: np.ndarray, reason: np.ndarray) -> dict[str, np.ndarray]:
    """[T, branches, W] decisions and [T, W] reasons back onto the table's [S, P, ...] grid (padding: compute)."""
    s, p, w = table.active.shape
    valid = table.step_valid.reshape(-1)
    full = np.ones((s * p, compute.shape[1], w), bool)
    full[valid] = compute
    why = np.zeros((s * p, w), np.int8)
    why[valid] = reason
    return {"compute": full.reshape(s, p, -1, w), "reason": why.reshape(s, p, w)}


def rel_l1(cur: np.ndarray, prev: np.ndarray) -> float:
    """TeaCache's relative L1 change, in float64 as the references compute it on the host."""
    return float(np.abs(cur - prev).mean() / np.abs(prev).mean())
