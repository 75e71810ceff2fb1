"""LPIPS (AlexNet) in JAX: loading a safetensors export strictly, and the distance's basic properties."""

import numpy as np
import pytest
from safetensors.numpy import save_file

from flowcache_jax.lpips import LPIPS

SHAPES = [(64, 3, 11, 11), (192, 64, 5, 5), (384, 192, 3, 3), (256, 384, 3, 3), (256, 256, 3, 3)]


def export(path, names="lpips", drop=None):
    rng = np.random.default_rng(0)
    t = {}
    for (i, slice_), s in zip([(0, 1), (3, 2), (6, 3), (8, 4), (10, 5)], SHAPES, strict=True):
        pre = f"net.slice{slice_}.{i}" if names == "lpips" else f"features.{i}"
        t[f"{pre}.weight"] = (rng.standard_normal(s) / np.sqrt(np.prod(s[1:]))).astype(np.float32)
        t[f"{pre}.bias"] = (0.1 * rng.standard_normal(s[0])).astype(np.float32)
    for j, s in enumerate(SHAPES):
        t[f"lin{j}.model.1.weight"] = np.abs(rng.standard_normal((1, s[0], 1, 1))).astype(np.float32)
    if drop:
        del t[drop]
    save_file(t, str(path))
    return path


def test_distance_properties(tmp_path):
    m = LPIPS.load(export(tmp_path / "w.safetensors"))
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (2, 64, 64, 3)).astype(np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-30, 30, a.shape), 0, 255).astype(np.uint8)
    c = np.clip(a.astype(int) + rng.integers(-90, 90, a.shape), 0, 255).astype(np.uint8)
    assert m(a, a) == pytest.approx(0.0, abs=1e-9)
    assert m(a, b) == pytest.approx(m(b, a), rel=1e-5)
    assert 0 < m(a, b) < m(a, c)  # more distortion, larger distance


def test_torchvision_names_give_the_same_model(tmp_path):
    a = LPIPS.load(export(tmp_path / "a.safetensors"))
    b = LPIPS.load(export(tmp_path / "b.safetensors", names="torchvision"))
    x = np.random.default_rng(2).integers(0, 256, (1, 48, 48, 3)).astype(np.uint8)
    y = 255 - x
    assert a(x, y) == pytest.approx(b(x, y), rel=1e-6)


def test_bad_files_say_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LPIPS.load(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="lin2.model.1.weight"):
        LPIPS.load(export(tmp_path / "w.safetensors", drop="lin2.model.1.weight"))
    (tmp_path / "w.pth").write_bytes(b"x")
    with pytest.raises(ValueError, match="safetensors"):
        LPIPS.load(tmp_path / "w.pth")
