"""Read upstream checkpoints without pickle: one ``.safetensors`` file, or a folder with an index json."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message says what is wrong and how to fix it."""


class SafetensorsReader:
    """Name -> numpy array over one file or shards listed by ``*.safetensors.index.json`` (numpy reader, bf16 ok)."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.exists():
            raise CheckpointError(f"checkpoint {path} does not exist")
        if path.is_dir():
            index = sorted(path.glob("*.safetensors.index.json"))
            if index:
                weight_map = json.loads(index[0].read_text())["weight_map"]
                self._where = {k: path / v for k, v in weight_map.items()}
            else:
                files = sorted(path.glob("*.safetensors"))
                if len(files) != 1:
                    raise CheckpointError(f"{path} holds {len(files)} .safetensors files and no "
                                          "*.safetensors.index.json; pass one file or a folder with an index")
                self._where = None
                path = files[0]
        elif path.suffix in (".pt", ".pth", ".bin", ".ckpt"):
            raise CheckpointError(f"{path} is a pickle-based PyTorch file; convert it to .safetensors first "
                                  "(pickles are never loaded implicitly)")
        if path.is_file():
            with safe_open(path, framework="np") as f:
                self._where = {k: path for k in f.keys()}
        missing = sorted({str(p) for p in self._where.values() if not Path(p).is_file()})
        if missing:
            raise CheckpointError(f"shards listed in the index are missing: {', '.join(missing)}")
        self._handles: dict[Path, object] = {}

    def keys(self) -> list[str]:
        return sorted(self._where)

    def _file(self, key: str):
        p = self._where[key]
        if p not in self._handles:
            self._handles[p] = safe_open(p, framework="np")
        return self._handles[p]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._file(key).get_slice(key).get_shape())

    def dtype(self, key: str) -> str:
        return str(self._file(key).get_slice(key).get_dtype())

    def __getitem__(self, key: str) -> np.ndarray:
        return self._file(key).get_tensor(key)

    def rows(self, key: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of a tensor, read without the rest of it."""
        sl = self._file(key).get_slice(key)
        return sl[start:min(stop, sl.get_shape()[0])]

    def read(self, key: str, dtype, block_bytes: int = 1 << 28) -> np.ndarray:
        """The tensor cast to ``dtype`` while it is read, block of rows by block of rows: a 4 GB fp32 embedding
        converted to bf16 costs 2 GB (the result) plus one block, not 4 + 2 GB."""
        sl = self._file(key).get_slice(key)
        if not sl.get_dtype().startswith(("F", "BF")):
            return self[key]  # not a float: the caller reports it
        shape = tuple(sl.get_shape())
        nbytes = int(np.prod(shape)) * 4
        if len(shape) < 2 or nbytes <= block_bytes:
            return np.asarray(self[key], dtype=dtype)
        out = np.empty(shape, dtype)
        rows = max(1, block_bytes * shape[0] // nbytes)
        for r in range(0, shape[0], rows):
            out[r:r + rows] = sl[r:min(r + rows, shape[0])]
        return out


class PickleReader:
    """Explicit opt-in reader for PyTorch pickle files (``.pt/.pth/.bin``, or shards listed by an index json).

    ``torch.load(weights_only=True, mmap=True)``: the restricted unpickler (no arbitrary code) over a memory
    map, and each tensor becomes numpy only when asked for (bf16 stays bf16), so a 22 GB file is never
    resident at once. ``entry`` picks a nested state dict (e.g. ``generator_ema``); a sequence of names picks the
    first one the file holds, ``None`` among them meaning the top level itself when it is a flat state dict (no
    nested dicts), so one call reads a training checkpoint ({"generator_ema": {...}, "critic": {...}}) or a bare
    state dict. ``entry`` afterwards names what was read and ``top_level`` lists the file's own keys.
    """

    def __init__(self, path: str | Path, entry: str | Sequence[str | None] | None = None):
        try:
            import torch
        except ImportError as e:
            raise CheckpointError("reading .pt/.pth/.bin needs PyTorch (pip install torch), or convert the file to "
                                  ".safetensors") from e
        self._torch = torch
        path = Path(path)
        if path.is_dir():
            index = sorted(path.glob("*.bin.index.json")) + sorted(path.glob("*.pt.index.json"))
            if index:
                files = sorted({path / v for v in json.loads(index[0].read_text())["weight_map"].values()})
            else:
                files = sorted(p for ext in ("*.bin", "*.pt", "*.pth") for p in path.glob(ext))
            if not files:
                raise CheckpointError(f"{path} holds no .bin/.pt/.pth files")
        else:
            files = [path]
        self._sd: dict = {}
        self.top_level: list[str] = []
        chosen: set[str] = set()
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"checkpoint file {f} does not exist")
            try:
                sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # noqa: BLE001 - torch raises many types for a bad file
                raise CheckpointError(f"cannot read {f} with torch.load(weights_only=True): {e}") from e
            if not isinstance(sd, dict):
                raise CheckpointError(f"{f} holds a {type(sd).__name__}, not a state dict")
            self.top_level += [str(k) for k in sd]
            name = _pick_entry(f, sd, entry)
            if name is not None:
                sd = sd[name]
                chosen.add(name)
            self._sd.update({k: v for k, v in sd.items() if isinstance(v, torch.Tensor)})
        self.entry: str | None = ", ".join(sorted(chosen)) or None

    def keys(self) -> list[str]:
        return sorted(self._sd)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._sd[key].shape)

    def rows(self, key: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of a tensor (the memory map is only touched there)."""
        return self._numpy(self._sd[key][start:stop])

    def read(self, key: str, dtype, block_bytes: int = 1 << 28) -> np.ndarray:
        """The tensor cast to ``dtype`` block of rows by block of rows (see ``SafetensorsReader.read``)."""
        t = self._sd[key]
        if t.ndim < 2 or t.numel() * 4 <= block_bytes or not t.dtype.is_floating_point:
            return np.asarray(self[key], dtype=dtype) if t.dtype.is_floating_point else self[key]
        out = np.empty(tuple(t.shape), dtype)
        step = max(1, block_bytes * t.shape[0] // (t.numel() * 4))
        for r in range(0, t.shape[0], step):
            out[r:r + step] = self._numpy(t[r:r + step])
        return out

    def __getitem__(self, key: str) -> np.ndarray:
        return self._numpy(self._sd[key])

    def _numpy(self, t) -> np.ndarray:
        t = t.detach()
        if t.dtype == self._torch.bfloat16:
            import ml_dtypes

            return t.contiguous().view(self._torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.contiguous().numpy()


def _pick_entry(f: Path, sd: dict, entry: str | Sequence[str | None] | None) -> str | None:
    """The nested dict of ``sd`` to read (None: the top level); an error lists the top-level keys when the
    wanted entries are all absent, since a training checkpoint's layout is otherwise invisible."""
    if entry is None:
        return None
    wanted = (entry,) if isinstance(entry, str) else tuple(entry)
    flat = not any(isinstance(v, dict) for v in sd.values())
    for name in wanted:
        if name is None and flat:
            return None
        if name is not None and isinstance(sd.get(name), dict):
            return name
    names = " or ".join(repr(n) for n in wanted if n is not None)
    top = ", ".join(str(k) for k in list(sd)[:20]) + (f", ... ({len(sd)} in all)" if len(sd) > 20 else "")
    raise CheckpointError(f"{f} holds no {names} state dict (top-level keys: {top or 'none'})")


class PrefixView:
    """A reader whose keys lose a common prefix (``model.`` of a diffusion wrapper's state dict): the key maps
    name the bare module's keys, and the prefix depends on how the upstream trainer wrapped the model."""

    def __init__(self, reader: Any, prefix: str):
        self._reader, self.prefix = reader, prefix
        self.entry = getattr(reader, "entry", None)

    def keys(self) -> list[str]:
        n = len(self.prefix)
        return sorted(k[n:] for k in self._reader.keys())

    def shape(self, key: str) -> tuple[int, ...]:
        return self._reader.shape(self.prefix + key)

    def rows(self, key: str, start: int, stop: int) -> np.ndarray:
        return self._reader.rows(self.prefix + key, start, stop)

    def read(self, key: str, dtype, block_bytes: int = 1 << 28) -> np.ndarray:
        return self._reader.read(self.prefix + key, dtype, block_bytes)

    def __getitem__(self, key: str) -> np.ndarray:
        return self._reader[self.prefix + key]


def strip_prefix(reader: Any, prefixes: Sequence[str]) -> Any:
    """``reader`` seen without the first of ``prefixes`` that every key carries (longest first, so
    ``model._fsdp_wrapped_module.`` wins over ``model.``); unchanged when no prefix is common to all keys."""
    keys = reader.keys()
    for p in sorted(prefixes, key=len, reverse=True):
        if keys and all(k.startswith(p) for k in keys):
            return PrefixView(reader, p)
    return reader


PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def _is_pickle(path: Path) -> bool:
    if path.is_file():
        return path.suffix in PICKLE_SUFFIXES
    return path.is_dir() and not any(path.glob("*.safetensors")) and any(
        p for ext in PICKLE_SUFFIXES for p in path.glob(f"*{ext}"))


def open_reader(path: str | Path, allow_pickle_weights_only: bool = False,
                entry: str | Sequence[str | None] | None = None):
    """The reader of a checkpoint path: safetensors (file, or folder with an index); pickles only when allowed
    (``entry``: the nested state dict to read, see ``PickleReader``; safetensors are flat and ignore it)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if _is_pickle(path):
        if not allow_pickle_weights_only:
            raise CheckpointError(f"{path} is a pickle-based PyTorch checkpoint; pickles are never loaded "
                                  "implicitly: convert it to .safetensors, or pass --allow_pickle_weights_only "
                                  "(read with torch.load(weights_only=True))")
        return PickleReader(path, entry)
    return SafetensorsReader(path)
