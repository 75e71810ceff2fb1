"""Weights loaded once per process: every build of a sweep, a benchmark or a quality table shares one copy.

``checkpoint.load`` reads a converted folder (DiT, text encoder, VAE) from disk; here the device arrays of each
folder are kept for the life of the process (keyed by the resolved path and its metadata's modification
time, so a reconverted folder is read again). ``loads`` counts the disk reads, for the CLIs' records.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from flowcache_jax import checkpoint


def _stamp(path: Path) -> float:
    meta = path / "model_config.json"
    return meta.stat().st_mtime if meta.is_file() else 0.0


@functools.lru_cache(maxsize=16)
def _load(path: str, stamp: float, param_dtype: str) -> tuple[Any, dict]:
    from models.layers import cast_params

    params, meta = checkpoint.load(path)
    # cast on the host, so the device never holds the stored copy beside the cast one
    return jax.tree.map(jnp.asarray, cast_params(params, param_dtype)), meta


def load(path: str | Path, param_dtype: str = "") -> tuple[Any, dict]:
    """(device params, metadata) of a converted folder, read from disk the first time only; ``param_dtype``
    (``compute.param_dtype``) casts the weights' matrices once, before they reach the device."""
    p = Path(path).resolve()
    return _load(str(p), _stamp(p), param_dtype)


def loads() -> int:
    """Folders read from disk so far in this process."""
    return _load.cache_info().misses


def load_model(path: str, model: str, hint: str, param_dtype: str = "") -> tuple[Any, dict]:
    """A converted DiT folder of ``model``, or one ``ConfigError`` line saying how to convert it (``hint``)."""
    from experiments.errors import ConfigError

    if not path:
        raise ConfigError(f"config.checkpoint is empty: {hint}")
    try:
        params, meta = load(path, param_dtype)
    except checkpoint.CheckpointNotFound as e:
        raise ConfigError(f"{e}: {hint}") from e
    if meta.get("model") != model:
        raise ConfigError(f"{path} holds a {meta.get('model')!r} checkpoint, not {model}: {hint}")
    return params, meta
