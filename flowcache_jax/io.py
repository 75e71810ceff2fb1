"""Atomic outputs: everything is written to a temporary name in the same folder, then renamed."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[str]:
    """Yield a temporary path beside ``path``; rename onto it only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, np.generic):
        return _jsonable(x.item())
    if isinstance(x, float) and not np.isfinite(x):
        return None if np.isnan(x) else ("inf" if x > 0 else "-inf")
    return x


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(_jsonable(obj), f, indent=1)
        f.write("\n")


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)


def write_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez_compressed(tmp, **arrays)


def save_figure(fig: Any, path: str | os.PathLike, dpi: int = 120) -> None:
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png")


def write_png(path: str | os.PathLike, image: np.ndarray) -> None:
    """An RGB uint8 image [H, W, 3]."""
    import imageio.v3 as iio

    with atomic_path(path, suffix=".png") as tmp:
        iio.imwrite(tmp, np.asarray(image, np.uint8), extension=".png")


def write_mp4(path: str | os.PathLike, frames: np.ndarray, fps: int = 8) -> None:
    """RGB uint8 frames [T, H, W, 3] as H.264 (yuv420p; sides padded to even sizes by the encoder's block)."""
    import warnings

    import imageio.v2 as imageio

    frames = np.asarray(frames, np.uint8)
    h, w = frames.shape[1:3]
    frames = np.pad(frames, ((0, 0), (0, (-h) % 16), (0, (-w) % 16), (0, 0)), mode="edge")
    with atomic_path(path, suffix=".mp4") as tmp, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="os.fork")  # the encoder runs as a subprocess; JAX warns
        writer = imageio.get_writer(tmp, format="FFMPEG", mode="I", fps=fps, codec="libx264", macro_block_size=16,
                                    pixelformat="yuv420p", ffmpeg_params=["-crf", "18"], ffmpeg_log_level="error")
        try:
            for f in frames:
                writer.append_data(f)
        finally:
            writer.close()


def frame_strip(frames, per_row: int = 8, gap: int = 2):
    """uint8 frames [T, H, W, 3] tiled left to right, ``per_row`` per row, on a white background."""
    t, h, w, _ = frames.shape
    rows = -(-t // per_row)
    cols = min(t, per_row)
    out = np.full((rows * (h + gap) - gap, cols * (w + gap) - gap, 3), 255, np.uint8)
    for i, f in enumerate(frames):
        r, c = divmod(i, per_row)
        out[r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = f
    return out


def read_mp4(path: str | os.PathLike) -> tuple[np.ndarray, float]:
    """(RGB uint8 frames [T, H, W, 3], fps) of a video file (any format ffmpeg reads)."""
    import warnings

    import imageio.v2 as imageio

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="os.fork")
        reader = imageio.get_reader(str(path), format="FFMPEG")
        try:
            fps = float(reader.get_meta_data().get("fps", 0.0))
            frames = np.stack([np.asarray(f, np.uint8)[..., :3] for f in reader])
        finally:
            reader.close()
    return frames, fps
