"""A run's figures against its uncached twin (PSNR/SSIM on decoded frames or latents) and its pipeline times; a
continuation's error split between regions of the frame."""

from __future__ import annotations

import numpy as np


def pipeline_times(run) -> dict:
    """Seconds of the prompt encoding and of the VAE decode of the last video, where the run had them."""
    out = {}
    if run.text:
        out["text_encode"] = float(run.text["seconds"])
    if run.decoder is not None:
        out["decode"] = float(run.decoder.seconds)
    return out


def compare(run, res, frames, ref, ref_frames) -> dict:
    """A video against the uncached one: PSNR / SSIM on the decoded uint8 frames (what the paper reports) when
    there is a VAE, on the latents otherwise; latent figures kept as secondary."""
    from flowcache_jax import metrics

    a, b = run.images(res.video), run.images(ref.video)
    out = {"space": "latent", "psnr": metrics.psnr(a, b, run.data_range), "ssim": metrics.ssim(a, b, run.data_range),
           "rel_l1": metrics.rel_l1(res.video, ref.video)}
    if frames is not None and ref_frames is not None:
        fa, fb = to_unit(frames), to_unit(ref_frames)
        out = {"space": "pixels", "psnr": metrics.psnr(fa, fb, (-1.0, 1.0)), "ssim": metrics.ssim(fa, fb, (-1.0, 1.0)),
               "latent_psnr": out["psnr"], "latent_ssim": out["ssim"], "rel_l1": out["rel_l1"]}
    return out


def to_unit(frames_u8):
    """uint8 frames -> float32 in [-1, 1] (the range PSNR/SSIM/LPIPS take)."""
    return np.asarray(frames_u8, np.float32)[None] / 127.5 - 1.0


def region_errors(frames: np.ndarray, truth: np.ndarray, shapes: np.ndarray) -> np.ndarray:
    """Summed squared error (channel mean) and pixel count in the shapes and in the background, [2, 2]."""
    e = np.square(frames - truth).mean(-1)
    return np.array([[e[shapes].sum(), shapes.sum()], [e[~shapes].sum(), (~shapes).sum()]], np.float64)


def regions(model: np.ndarray, base: np.ndarray) -> dict:
    """PSNR over each region's pooled pixels ([-1, 1] range, peak-to-peak 2) from ``region_errors`` sums."""
    psnr = lambda se, n: float(10 * np.log10(4.0 / max(se / max(n, 1), 1e-12)))
    out = {}
    for i, name in enumerate(("shapes", "background")):
        out[name] = {"psnr": psnr(*model[i]), "baseline_psnr": psnr(*base[i]),
                     "area": float(model[i, 1] / model[:, 1].sum())}
    out["shapes"]["error_share"] = float(model[0, 0] / max(model[:, 0].sum(), 1e-30))
    return out
