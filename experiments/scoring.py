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


def regions(frames: np.ndarray, baseline: np.ndarray, truth: np.ndarray, shapes: np.ndarray) -> dict:
    """A continuation's error split between its shapes and its background (``shapes``, [..., H, W] bool): PSNR over
    each region's pixels (``metrics.psnr``, range [-1, 1]) for the model's ``frames`` and the ``baseline``, each
    region's share of the pixels, and the shapes' share of the model's squared error."""
    from flowcache_jax import metrics

    out = {}
    for name, m in (("shapes", shapes), ("background", ~shapes)):
        out[name] = {"psnr": metrics.psnr(frames[m][None, None], truth[m][None, None], (-1.0, 1.0)),
                     "baseline_psnr": metrics.psnr(baseline[m][None, None], truth[m][None, None], (-1.0, 1.0)),
                     "area": float(m.mean())}
    e = np.square(frames - truth).mean(-1)
    out["shapes"]["error_share"] = float(e[shapes].sum() / max(e.sum(), 1e-30))
    return out
