"""What the CLIs write and print: MP4 + PNG strips of a run's frames, and plain fixed-width tables."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ml_collections


def output_fps(cfg: ml_collections.ConfigDict) -> int:
    return int(cfg.get("output", {}).get("fps", 0) or cfg.get("video", {}).get("fps", 8))


def write_video_outputs(run, video, out: Path, name: str = "video", frames=None) -> list[Path]:
    """``name``.mp4 and ``name``_frames.png (a strip of every frame) of the first video; ``frames`` (uint8,
    decoded by the VAE) replace the latent preview."""
    import numpy as np

    from flowcache_jax import io

    given = isinstance(run.cond, dict) and "prefix" in run.cond  # a continuation: show the given frames first
    if frames is None:
        frames = run.rgb_frames(video)
        if given:
            frames = np.concatenate([run.rgb_frames(np.asarray(run.cond["prefix"])[None]), frames])
    elif given and hasattr(run.decoder, "decode"):
        frames = np.concatenate([*(run.decoder.decode(np.asarray(c)) for c in run.cond["prefix"]), frames])
    fps = output_fps(run.cfg)
    paths = [out / f"{name}.mp4", out / f"{name}_frames.png"]
    io.write_mp4(paths[0], frames, fps)
    io.write_png(paths[1], io.frame_strip(strip_frames(frames), per_row=run.cfg.get("output", {}).get("per_row", 8)))
    return paths


def strip_frames(frames, max_frames: int = 24, max_side: int = 256):
    """The frames a PNG strip shows: all of a short small video; else evenly spaced ones, box-downscaled so the
    longer side is at most ``max_side`` (a 720p, 240-frame video would make a 370 MB strip)."""
    import numpy as np

    t, h, w, _ = frames.shape
    if t > max_frames:
        frames = frames[np.linspace(0, t - 1, max_frames).round().astype(int)]
    f = -(-max(h, w) // max_side)
    if f > 1:
        hh, ww = h // f * f, w // f * f
        frames = frames[:, :hh, :ww].reshape(len(frames), hh // f, f, ww // f, f, 3).mean((2, 4)).astype(np.uint8)
    return frames


def format_table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    """A plain fixed-width table."""

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(cols)]
    line = "  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join([line, sep, *body])
