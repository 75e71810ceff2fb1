"""Read upstream checkpoints without pickle: one ``.safetensors`` file, or a folder with an index json."""

from __future__ import annotations

import json
from pathlib import Path

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


def load_pytorch_weights_only(path: str | Path) -> dict[str, np.ndarray]:
    """Explicit opt-in reader for ``.pt/.bin`` files: ``torch.load(weights_only=True)`` (needs torch)."""
    try:
        import torch
    except ImportError as e:
        raise CheckpointError("reading .pt/.bin needs PyTorch (pip install torch); or convert to .safetensors") from e
    sd = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy() for k, v in sd.items()}
