"""Quality and speed measurements: rel-L1, PSNR/SSIM (dm-pix) vs a reference run, wall-time splits."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import dm_pix
import jax.numpy as jnp
import numpy as np


def rel_l1(cur: np.ndarray, prev: np.ndarray, eps: float = 1e-8) -> float:
    """mean|cur - prev| / (mean|prev| + eps): the paper's relative L1 with ``prev`` the older step."""
    cur, prev = np.asarray(cur, np.float64), np.asarray(prev, np.float64)
    return float(np.mean(np.abs(cur - prev)) / (np.mean(np.abs(prev)) + eps))


def _unit_range(x: np.ndarray, ref: np.ndarray, data_range: tuple[float, float] | None = None
                ) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Map both arrays to [0, 1] with ``data_range`` (images) or the reference's own range (latents have no peak)."""
    lo, hi = (float(np.min(ref)), float(np.max(ref))) if data_range is None else data_range
    scale = max(hi - lo, 1e-12)
    return jnp.asarray((x - lo) / scale, jnp.float32), jnp.asarray((ref - lo) / scale, jnp.float32)


def _as_images(x: np.ndarray) -> np.ndarray:
    """[..., H, W, C] -> [N, H, W, C]."""
    return np.asarray(x).reshape(-1, *np.shape(x)[-3:])


def psnr(x: np.ndarray, ref: np.ndarray, data_range: tuple[float, float] | None = None) -> float:
    """PSNR in dB over everything; peak = ``data_range`` (e.g. (-1, 1) for frames) or the reference's range."""
    a, b = _unit_range(_as_images(x), _as_images(ref), data_range)
    if not bool(jnp.any(a != b)):
        return float("inf")
    return float(dm_pix.psnr(a.reshape(1, -1, 1, 1), b.reshape(1, -1, 1, 1))[0])  # one MSE over everything


def ssim(x: np.ndarray, ref: np.ndarray, data_range: tuple[float, float] | None = None) -> float:
    """Mean SSIM over all frames ([..., H, W, C]); the Gaussian window shrinks for tiny latents."""
    a, b = _unit_range(_as_images(x), _as_images(ref), data_range)
    size = int(min(11, a.shape[1], a.shape[2]))
    size -= 1 - size % 2  # odd window
    return float(jnp.mean(dm_pix.ssim(a, b, max_val=1.0, filter_size=size, filter_sigma=1.5 * size / 11)))


class WallTimer:
    """Named wall-time sections: ``with timer('load'): ...`` then ``timer.seconds``."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
