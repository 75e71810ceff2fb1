"""The one place that talks to orbax: parameter trees plus a JSON of metadata, written atomically."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import numpy as np

META = "model_config.json"


class CheckpointNotFound(FileNotFoundError):
    """A checkpoint directory that does not exist or is incomplete."""


def write(folder: str | Path, params: Any, meta: dict) -> Path:
    """Write ``folder/params`` (orbax) and ``folder/model_config.json`` into a new folder (not atomic: callers
    build inside a temporary folder; see ``save``)."""
    import orbax.checkpoint as ocp

    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(folder / "params", jax.tree.map(np.asarray, params))
    (folder / META).write_text(json.dumps(meta, indent=1) + "\n")
    return folder


def save(dst: str | Path, params: Any, meta: dict, overwrite: bool = False) -> Path:
    """Write ``dst/params`` (orbax) and ``dst/model_config.json``; built beside ``dst`` then renamed."""
    dst = Path(dst).resolve()
    if dst.exists() and any(dst.iterdir()) and not overwrite:
        raise FileExistsError(f"{dst} exists and is not empty; choose another --dst or pass --overwrite")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        write(tmp, params, meta)
        replace_dir(tmp, dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return dst


def replace_dir(tmp: Path, dst: Path) -> None:
    """Move a finished folder into place (an old ``dst`` is removed first)."""
    if dst.exists():
        shutil.rmtree(dst)
    os.replace(tmp, dst)


def load_meta(src: str | Path) -> dict:
    src = Path(src)
    if not (src / META).is_file() or not (src / "params").is_dir():
        raise CheckpointNotFound(f"{src} is not a converted checkpoint (needs {META} and params/)")
    return json.loads((src / META).read_text())


def load(src: str | Path, target: Any | None = None) -> tuple[Any, dict]:
    """(params, metadata); ``target`` (arrays or ShapeDtypeStructs) fixes the tree, shapes and dtypes."""
    import orbax.checkpoint as ocp

    meta = load_meta(src)
    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(Path(src).resolve() / "params", target)
    return params, meta
