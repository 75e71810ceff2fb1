"""LPIPS (Zhang et al. 2018, AlexNet variant, v0.1) in JAX, from a safetensors file of the official weights.

The weights are not downloadable here; make the file once where ``lpips`` is installed:

  python -c "import lpips; from safetensors.torch import save_file; m = lpips.LPIPS(net='alex');
             save_file({k: v.contiguous() for k, v in m.state_dict().items()}, 'lpips_alex.safetensors')"

Both that layout (``net.slice1.0.weight``, ``lin0.model.1.weight``) and torchvision's AlexNet names
(``features.0.weight``) plus ``lin{i}.model.1.weight`` are accepted.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

_CONVS = (0, 3, 6, 8, 10)  # torchvision AlexNet ``features`` indices of the five convolutions
_SLICE = {0: 1, 3: 2, 6: 3, 8: 4, 10: 5}  # lpips' slice holding each convolution
_STRIDE_PAD = {0: (4, 2), 3: (1, 2), 6: (1, 1), 8: (1, 1), 10: (1, 1)}
_POOL_BEFORE = {3, 6}  # 3x3/2 max-pool before these convolutions
_SHIFT = np.array([-0.030, -0.088, -0.188], np.float32)
_SCALE = np.array([0.458, 0.448, 0.450], np.float32)


def _conv(x: jax.Array, w: jax.Array, b: jax.Array, stride: int, pad: int) -> jax.Array:
    y = jax.lax.conv_general_dilated(x, w, (stride, stride), [(pad, pad)] * 2,
                                     dimension_numbers=("NCHW", "OIHW", "NCHW"))
    return y + b[None, :, None, None]


def _pool(x: jax.Array) -> jax.Array:
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 1, 3, 3), (1, 1, 2, 2), "VALID")


@dataclasses.dataclass(frozen=True)
class LPIPS:
    convs: tuple  # ((weight OIHW, bias), ...) of the five convolutions
    lins: tuple  # (weight [C],) per layer, the learned non-negative channel weights

    @classmethod
    def load(cls, path: str | Path) -> LPIPS:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"--lpips_weights {path} does not exist (see flowcache_jax/lpips.py for how to "
                                    "export lpips_alex.safetensors)")
        if path.suffix != ".safetensors":
            raise ValueError(f"--lpips_weights must be a .safetensors file, got {path.name}")
        from safetensors.numpy import load_file

        t = load_file(path)

        def get(*names: str) -> np.ndarray:
            for n in names:
                if n in t:
                    return np.asarray(t[n], np.float32)
            raise ValueError(f"{path.name} has none of {names}; is it an LPIPS AlexNet export?")

        convs = tuple((get(f"net.slice{_SLICE[i]}.{i}.weight", f"features.{i}.weight"),
                       get(f"net.slice{_SLICE[i]}.{i}.bias", f"features.{i}.bias")) for i in _CONVS)
        lins = tuple(get(f"lin{j}.model.1.weight").reshape(-1) for j in range(5))
        want = [(64, 3, 11, 11), (192, 64, 5, 5), (384, 192, 3, 3), (256, 384, 3, 3), (256, 256, 3, 3)]
        got = [w.shape for w, _ in convs]
        if got != want or [len(lw) for lw in lins] != [w[0] for w in want]:
            raise ValueError(f"{path.name}: AlexNet shapes {got} / lin sizes {[len(x) for x in lins]} differ from "
                             f"{want}")
        return cls(jax.tree.map(jnp.asarray, convs), jax.tree.map(jnp.asarray, lins))

    def features(self, x: jax.Array) -> list[jax.Array]:
        """The five ReLU outputs of AlexNet for images [N, 3, H, W] in [-1, 1]."""
        h = (x - _SHIFT[None, :, None, None]) / _SCALE[None, :, None, None]
        outs = []
        for i, (w, b) in zip(_CONVS, self.convs, strict=True):
            if i in _POOL_BEFORE:
                h = _pool(h)
            h = jax.nn.relu(_conv(h, w, b, *_STRIDE_PAD[i]))
            outs.append(h)
        return outs

    def distance(self, a: jax.Array, b: jax.Array) -> jax.Array:
        """Per-image LPIPS [N] of images [N, 3, H, W] in [-1, 1]."""
        d = 0.0
        for fa, fb, lw in zip(self.features(a), self.features(b), self.lins, strict=True):
            na = fa / (jnp.sqrt(jnp.sum(fa * fa, 1, keepdims=True)) + 1e-10)
            nb = fb / (jnp.sqrt(jnp.sum(fb * fb, 1, keepdims=True)) + 1e-10)
            d = d + jnp.mean(jnp.einsum("nchw,c->nhw", (na - nb) ** 2, lw), axis=(1, 2))
        return d

    def __call__(self, frames: np.ndarray, ref: np.ndarray) -> float:
        """Mean LPIPS of uint8 frames [T, H, W, 3] against the reference's."""
        to = lambda f: jnp.asarray(np.asarray(f, np.float32).transpose(0, 3, 1, 2) / 127.5 - 1.0)
        return float(jnp.mean(jax.jit(self.distance)(to(frames), to(ref))))
