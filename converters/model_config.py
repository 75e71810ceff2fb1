"""Reading an upstream model config: a fixture's config.json, a released *_config.json, or the built-in one."""

from __future__ import annotations

import json
from pathlib import Path

from converters.safetensors_io import CheckpointError


def read_model_config(path: str | None) -> dict:
    """The ``model_config`` dict of an upstream config file; None gives the released 4.5B-distill config."""
    from models.magi1 import MAGI1_4P5B_DISTILL

    if path is None:
        return dict(MAGI1_4P5B_DISTILL)
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"--model_config {p} does not exist")
    try:
        d = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"--model_config {p} is not valid JSON ({e})") from e
    d = d.get("model_config", d) if isinstance(d, dict) else d
    if not isinstance(d, dict):
        raise CheckpointError(f"--model_config {p} must hold a JSON object (an upstream config)")
    return d
