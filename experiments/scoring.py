"""A run's figures against its uncached twin (PSNR/SSIM on decoded frames or latents) and its pipeline times."""

from __future__ import annotations


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
    import numpy as np

    return np.asarray(frames_u8, np.float32)[None] / 127.5 - 1.0
