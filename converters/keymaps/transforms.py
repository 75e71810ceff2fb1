"""Weight transforms shared by the key maps: PyTorch layouts -> the Flax parameter layouts."""

from __future__ import annotations

import numpy as np


def copy(w: np.ndarray, cfg) -> tuple[np.ndarray]:
    return (w,)


def linear(w: np.ndarray, cfg) -> tuple[np.ndarray]:
    """Linear weight [out, in] -> kernel [in, out]."""
    if w.ndim != 2:
        raise ValueError("a Linear weight must be 2-D")
    return (w.T,)


def conv_patch(w: np.ndarray, cfg) -> tuple[np.ndarray]:
    """Conv3d [D, C, kt, kh, kw] (kernel = stride) -> Dense [C·kt·kh·kw, D] in (c, kt, kh, kw) order."""
    if w.ndim != 5:
        raise ValueError("a patch embedding must be a 5-D Conv3d weight")
    return (w.reshape(w.shape[0], -1).T,)
