"""The ``compute`` block of a run config: activation dtype, weight storage dtype and attention implementation.

One place that turns ``--config.compute.*`` into a model config and parameters, so every model and CLI reads
them the same way and results.json records what actually ran (the implementation ``fused`` resolved to).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections

from experiments.errors import ConfigError

DTYPES = ("", "float32", "bfloat16")
DEFAULT_ATTENTION = "fused"  # the configs' compute.attention


def param_dtype(cfg: ml_collections.ConfigDict) -> str:
    """``compute.param_dtype`` checked: the loader casts the weights once, on the host (``experiments.loaded``)."""
    value = cfg.get("compute", {}).get("param_dtype", "")
    if value not in DTYPES:
        raise ConfigError(f"compute.param_dtype must be one of {', '.join(repr(d) for d in DTYPES)}, got {value!r}")
    return value


def apply(cfg: ml_collections.ConfigDict, mcfg: Any) -> tuple[Any, dict]:
    """(model config, notes) with the run's compute settings; "" keeps the checkpoint's dtype. The weights' storage
    dtype is the loader's (``param_dtype`` above), applied once when they are read."""
    from models import attention

    comp = cfg.get("compute", {})
    if comp.get("dtype", "") not in DTYPES:
        raise ConfigError(f"compute.dtype must be one of {', '.join(repr(d) for d in DTYPES)}, "
                          f"got {comp.get('dtype')!r}")
    impl = comp.get("attention", DEFAULT_ATTENTION)
    if impl not in attention.IMPLEMENTATIONS:
        raise ConfigError(f"compute.attention must be one of {', '.join(attention.IMPLEMENTATIONS)}, got {impl!r}")
    mcfg = dataclasses.replace(mcfg, dtype=comp.get("dtype", "") or mcfg.dtype, attention_impl=impl)
    resolved = attention.resolve(impl, mcfg.dtype)
    return mcfg, {"dtype": mcfg.dtype, "param_dtype": comp.get("param_dtype", "") or "checkpoint's",
                  "attention_impl": impl if impl == resolved else f"{impl} ({resolved})"}
