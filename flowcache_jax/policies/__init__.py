"""Reuse policies, selected by name from a config; one set for every model.

``policy.metric`` says what a rule reads: ``input`` (the chunk's input features, compared in the graph: MAGI-1,
the synthetic flows, and any model with ``metric_features``) or ``timestep`` (the model's time modulation e0,
known before the run: SkyReels-V2's FlowCache and window TeaCache, decided on the host as a table).
"""

from __future__ import annotations

from typing import Any

from flowcache_jax.policies.base import Decision, Policy, StepInfo, structure
from flowcache_jax.policies.first_block import FirstBlockCache
from flowcache_jax.policies.flowcache import FlowCache
from flowcache_jax.policies.group_flowcache import POLY_1P3B_RET, GroupFlowCache
from flowcache_jax.policies.magcache import MagCache
from flowcache_jax.policies.teacache import TeaCache
from flowcache_jax.policies.vanilla import Vanilla
from flowcache_jax.policies.window_teacache import WindowTeaCache

POLICIES = ("vanilla", "teacache", "flowcache", "first_block", "magcache")
METRICS = ("input", "timestep")
TIMESTEP_POLICIES = ("vanilla", "teacache", "flowcache")  # the rules that exist on the timestep metric

__all__ = ["METRICS", "POLICIES", "TIMESTEP_POLICIES", "Decision", "FirstBlockCache", "FlowCache", "GroupFlowCache",
           "MagCache", "Policy", "StepInfo", "TeaCache", "Vanilla", "WindowTeaCache", "make_policy", "structure"]


def make_policy(cfg: Any) -> Policy:
    """Build a policy from a config block with ``name``, ``threshold``, ``warmup``, ``coeffs``, ``metric`` (MagCache:
    ``ratios``, ``max_skips``; TeaCache: ``semantics`` on the input metric, ``counter`` / ``use_ret_steps`` on the
    timestep metric; FlowCache on the input metric: ``min_charge``, its reuse-run guard, 0 = the reference)."""
    name, metric = cfg.name, cfg.get("metric", "input")
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}")
    if metric not in METRICS:
        raise ValueError(f"unknown policy metric {metric!r}; choose one of {', '.join(METRICS)}")
    if name == "vanilla":
        return Vanilla()
    if cfg.threshold < 0:
        raise ValueError(f"policy.threshold must be >= 0, got {cfg.threshold}")
    if cfg.warmup < 0:
        raise ValueError(f"policy.warmup must be >= 0, got {cfg.warmup}")
    coeffs = tuple(float(c) for c in cfg.get("coeffs", ()))
    min_charge = float(cfg.get("min_charge", 0.0))
    if not min_charge >= 0:
        raise ValueError(f"policy.min_charge must be >= 0, got {min_charge}")
    if min_charge > 0 and (name != "flowcache" or metric != "input"):
        raise ValueError(f"policy.min_charge is FlowCache's guard on the input metric; {name} ({metric}) ignores it")
    if metric == "timestep":
        if name == "flowcache":
            return GroupFlowCache(threshold=float(cfg.threshold), warmup=int(cfg.warmup),
                                  coeffs=coeffs or POLY_1P3B_RET)
        if name == "teacache":
            return WindowTeaCache(threshold=float(cfg.threshold), use_ret_steps=bool(cfg.get("use_ret_steps", True)),
                                  counter=str(cfg.get("counter", "intended")), coeffs=coeffs, warmup=int(cfg.warmup))
        raise ValueError(f"policy {name!r} reads input features; with policy.metric=timestep use one of "
                         f"{', '.join(TIMESTEP_POLICIES)}")
    if name == "teacache":
        return TeaCache(threshold=float(cfg.threshold), warmup=int(cfg.warmup), coeffs=coeffs,
                        semantics=str(cfg.get("semantics", "intended")))
    if name == "first_block":
        return FirstBlockCache(threshold=float(cfg.threshold), warmup=int(cfg.warmup))
    if name == "magcache":
        ratios = tuple(float(r) for r in cfg.get("ratios", ()))
        return MagCache(threshold=float(cfg.threshold), ratios=ratios, warmup=int(cfg.warmup),
                        max_skips=int(cfg.get("max_skips", 4)))
    return FlowCache(threshold=float(cfg.threshold), warmup=int(cfg.warmup), coeffs=coeffs, min_charge=min_charge)
