"""Reuse policies, selected by name from a config."""

from __future__ import annotations

from typing import Any

from flowcache_jax.policies.base import Decision, Policy, StepInfo
from flowcache_jax.policies.first_block import FirstBlockCache
from flowcache_jax.policies.flowcache import FlowCache
from flowcache_jax.policies.magcache import MagCache
from flowcache_jax.policies.teacache import TeaCache
from flowcache_jax.policies.vanilla import Vanilla

POLICIES = ("vanilla", "teacache", "flowcache", "first_block", "magcache")

__all__ = ["Decision", "FirstBlockCache", "FlowCache", "MagCache", "POLICIES", "Policy", "StepInfo", "TeaCache",
           "Vanilla", "make_policy"]


def make_policy(cfg: Any) -> Policy:
    """Build a policy from a config block with ``name``, ``threshold``, ``warmup``, ``coeffs`` (MagCache: ``ratios``,
    ``max_skips``)."""
    name = cfg.name
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}")
    if name == "vanilla":
        return Vanilla()
    if cfg.threshold < 0:
        raise ValueError(f"policy.threshold must be >= 0, got {cfg.threshold}")
    if cfg.warmup < 0:
        raise ValueError(f"policy.warmup must be >= 0, got {cfg.warmup}")
    coeffs = tuple(float(c) for c in cfg.get("coeffs", ()))
    if name == "teacache":
        return TeaCache(threshold=float(cfg.threshold), warmup=int(cfg.warmup), coeffs=coeffs)
    if name == "first_block":
        return FirstBlockCache(threshold=float(cfg.threshold), warmup=int(cfg.warmup))
    if name == "magcache":
        ratios = tuple(float(r) for r in cfg.get("ratios", ()))
        return MagCache(threshold=float(cfg.threshold), ratios=ratios, warmup=int(cfg.warmup),
                        max_skips=int(cfg.get("max_skips", 4)))
    return FlowCache(threshold=float(cfg.threshold), warmup=int(cfg.warmup), coeffs=coeffs)
