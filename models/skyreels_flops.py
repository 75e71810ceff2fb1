"""Analytic FLOPs of SkyReels-V2 diffusion forcing (spec skyreels_v2.md §6): 2 FLOPs per MAC, matmuls only."""

from __future__ import annotations

import math


def windows(latent_frames: int, base: int, overlap: int) -> list[int]:
    """Prefix latents of each long-video window (0 for the first); SR's windowing (spec §4.6)."""
    if latent_frames <= base:
        return [0]
    n_iter = 1 + math.ceil((latent_frames - base) / (base - overlap))
    return [0] + [overlap] * (n_iter - 1)


def forward_flops(d: int, ffn: int, layers: int, text_tokens: int, frame_tokens: int, frames: int, block: int,
                  attention: str) -> dict[str, float]:
    """One transformer call over a window of ``frames`` latent frames."""
    n = frame_tokens * frames
    per_layer = (8 * n * d * d + 4 * n * d * d + 4 * text_tokens * d * d + 4 * n * text_tokens * d
                 + 4 * n * d * ffn)
    if attention == "full":
        core = 4 * n * n * d
    else:  # block j's queries see j blocks of keys
        b = frame_tokens * block
        core = sum(4 * b * b * d * j for j in range(1, frames // block + 1))
    embed = 2 * n * 64 * d + 2 * n * d * 64 + 2 * text_tokens * (4096 * d + d * d)
    return {"linear": per_layer * layers, "attention": core * layers, "embed_head": embed,
            "total": (per_layer + core) * layers + embed}


def run_flops(cfg, latent_frames: int, base_frames: int, overlap_frames: int, frame_tokens: int, steps: int,
              ar_step: int, block: int, attention: str, text_tokens: int = 512) -> dict:
    """The uncached DF run: every iteration runs the whole window twice (CFG)."""
    per = forward_flops(cfg.dim, cfg.ffn_dim, cfg.num_layers, text_tokens, frame_tokens, base_frames, block, attention)
    iters = []
    for prefix in windows(latent_frames, base_frames, overlap_frames):
        blocks = base_frames // block - prefix // block
        iters.append(steps + (blocks - 1) * ar_step)
    forwards = 2 * sum(iters)
    return {"iterations_per_window": iters, "forwards": forwards, "per_forward_tflops": per["total"] / 1e12,
            "total_pflops": forwards * per["total"] / 1e15}
