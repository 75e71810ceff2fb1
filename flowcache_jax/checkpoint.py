"""The one place that talks to orbax: parameter trees plus a JSON of metadata, written atomically.

Two layouts of ``params/``, both read by ``load``:
- one orbax tree (``save``/``write``): small models, training checkpoints;
- groups of leaves, each its own orbax item, listed by ``params/leaves.json`` (``LeafWriter``): a converter
  hands every tensor over as soon as it is converted and the writer flushes it to disk within a group of about
  ``group_bytes``, so the host never holds the model. Orbax stages a whole tree in memory while it writes it
  (measured: about 2x the tree), which for umT5-XXL in bf16 (11.4 GB) does not fit beside the tree on a
  24 GiB host; per group it costs a few times the largest tensor (``experiments/convert_memory.py``).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np

META = "model_config.json"
LEAVES = "leaves.json"


class CheckpointNotFound(FileNotFoundError):
    """A checkpoint directory that does not exist or is incomplete."""


def write(folder: str | Path, params: Any, meta: dict) -> Path:
    """Write ``folder/params`` (one orbax tree) and ``folder/model_config.json`` into a new folder (not atomic:
    callers build inside a temporary folder; see ``save``)."""
    import orbax.checkpoint as ocp

    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(folder / "params", jax.tree.map(np.asarray, params))
    (folder / META).write_text(json.dumps(meta, indent=1) + "\n")
    return folder


def _trim_heap() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them per thread arena after orbax's writer threads)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class LeafWriter:
    """Streams a parameter tree to ``folder/params`` leaf by leaf: ``put(path, array)`` then ``close(meta)``.

    Leaves are gathered into groups of about ``group_bytes`` (a larger leaf is a group of its own); each group
    is written as one orbax item ``params/<n>`` and dropped. ``paths`` are '/'-joined keys of the nested dict.
    """

    def __init__(self, folder: str | Path, group_bytes: int = 1 << 28):
        self.folder = Path(folder).resolve()
        (self.folder / "params").mkdir(parents=True, exist_ok=True)
        self.group_bytes = group_bytes
        self._pending: dict[str, np.ndarray] = {}
        self._bytes = 0
        self._where: dict[str, int] = {}
        self._groups = 0

    def put(self, path: str, value: Any) -> None:
        if path in self._where or path in self._pending:
            raise ValueError(f"parameter {path} written twice")
        value = np.asarray(value)
        if self._pending and self._bytes + value.nbytes > self.group_bytes:
            self.flush()
        self._pending[path] = value
        self._bytes += value.nbytes

    def put_tree(self, tree: dict, prefix: str = "") -> None:
        for k, v in tree.items():
            if isinstance(v, dict):
                self.put_tree(v, f"{prefix}{k}/")
            else:
                self.put(f"{prefix}{k}", v)

    def flush(self) -> None:
        import orbax.checkpoint as ocp

        if not self._pending:
            return
        n = self._groups
        items = {str(i): v for i, v in enumerate(self._pending.values())}
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(self.folder / "params" / str(n), items)
        self._where.update(dict.fromkeys(self._pending, n))
        self._pending, self._bytes, self._groups = {}, 0, n + 1
        _trim_heap()

    def close(self, meta: dict) -> Path:
        self.flush()
        (self.folder / "params" / LEAVES).write_text(json.dumps({"groups": self._groups, "leaves": self._where},
                                                                indent=0) + "\n")
        (self.folder / META).write_text(json.dumps(meta, indent=1) + "\n")
        return self.folder


@contextlib.contextmanager
def staged_dir(dst: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """A temporary folder beside ``dst`` that becomes ``dst`` when the block succeeds and vanishes otherwise:
    nothing partial is ever left at ``dst``. A non-empty ``dst`` is refused unless ``overwrite``."""
    dst = Path(dst).resolve()
    if dst.exists() and (not dst.is_dir() or (any(dst.iterdir()) and not overwrite)):
        raise FileExistsError(f"{dst} exists and is not an empty folder; choose another --dst or pass --overwrite")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        yield tmp
        replace_dir(tmp, dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def save(dst: str | Path, params: Any, meta: dict, overwrite: bool = False) -> Path:
    """Write ``dst/params`` (orbax) and ``dst/model_config.json``; built beside ``dst`` then renamed."""
    with staged_dir(dst, overwrite) as tmp:
        write(tmp, params, meta)
    return Path(dst).resolve()


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


def _get(tree: Any, path: str) -> Any:
    for k in path.split("/"):
        tree = tree[k]
    return tree


def _load_leaves(folder: Path, target: Any | None) -> dict:
    import orbax.checkpoint as ocp

    index = json.loads((folder / LEAVES).read_text())
    by_group: dict[int, list[str]] = {}
    for path, g in index["leaves"].items():
        by_group.setdefault(int(g), []).append(path)
    out: dict = {}
    with ocp.StandardCheckpointer() as ckptr:
        for g, paths in sorted(by_group.items()):
            want = None if target is None else {str(i): _get(target, p) for i, p in enumerate(paths)}
            items = ckptr.restore(folder / str(g), want)
            for i, p in enumerate(paths):
                *parents, leaf = p.split("/")
                node = out
                for k in parents:
                    node = node.setdefault(k, {})
                node[leaf] = items[str(i)]
    return out


def load(src: str | Path, target: Any | None = None) -> tuple[Any, dict]:
    """(params, metadata); ``target`` (arrays or ShapeDtypeStructs) fixes the tree, shapes and dtypes."""
    import orbax.checkpoint as ocp

    meta = load_meta(src)
    folder = Path(src).resolve() / "params"
    if (folder / LEAVES).is_file():
        return _load_leaves(folder, target), meta
    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(folder, target)
    return params, meta
