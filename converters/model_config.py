"""Reading an upstream model config: a fixture's config.json, a released *_config.json, or the built-in one."""

from __future__ import annotations

import json
from pathlib import Path

from converters.safetensors_io import CheckpointError


def read_model_config(path: str | None, model: str = "magi1") -> dict:
    """The model config of an upstream config file (MAGI: its ``model_config`` section; SkyReels: the WanModel
    kwargs; Self-Forcing: the CausalWanModel kwargs, or a fixture's ``model`` section; ``_``-prefixed keys
    dropped); None gives the released model's config."""
    if path is None:
        if model == "magi1":
            from models.magi1 import MAGI1_4P5B_DISTILL

            return dict(MAGI1_4P5B_DISTILL)
        if model == "self_forcing":
            from models.self_forcing import SELF_FORCING_1P3B

            return dict(SELF_FORCING_1P3B)
        from models.skyreels_v2 import SKYREELS_DF_1P3B

        return dict(SKYREELS_DF_1P3B)
    d = read_json(path, "--model_config")
    # a kwargs file is flat (its "model_type" is a string); a fixture's config.json nests them under "model"
    section = "model" if model == "self_forcing" and isinstance(d.get("model"), dict) else "model_config"
    d = d.get(section, d)
    if not isinstance(d, dict):
        raise CheckpointError(f"--model_config {path}: its model_config must be a JSON object (an upstream config)")
    return {k: v for k, v in d.items() if not k.startswith("_")}


def read_json(path: str | Path, what: str) -> dict:
    """A JSON object from a file, or a CheckpointError naming the flag (``what``) and what is wrong."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{what} {p} does not exist")
    try:
        d = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{what} {p} is not valid JSON ({e})") from e
    if not isinstance(d, dict):
        raise CheckpointError(f"{what} {p} must hold a JSON object")
    return d
