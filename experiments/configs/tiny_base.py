"""Shared base of the tiny presets: a small MAGI-1 trained here on procedural videos (the embedded default).

The model is this codebase's MAGI-1 DiT at a tiny width; its frames are RGB used directly as latents. The
checkpoint ships in ``experiments/assets/tiny_magi`` (``python experiments/train_tiny.py`` rebuilds it).
The schedule is MAGI-1's, scaled down: 32 steps per chunk, a window of 4 chunks, 8 steps per stage.
"""

from pathlib import Path

import ml_collections

from experiments.configs.magi_base import get_base as get_magi_base

TINY_CHECKPOINT = str(Path(__file__).resolve().parents[1] / "assets" / "tiny_magi")

# Upstream-style model_config of the tiny model (what the exported checkpoint's model_config.json holds).
TINY_MODEL = dict(
    model_name="videodit_ardf", num_layers=4, hidden_size=128, ffn_hidden_size=512, num_attention_heads=4,
    num_query_groups=2, kv_channels=32, layernorm_epsilon=1e-6, apply_layernorm_1p=True, x_rescale_factor=1,
    half_channel_vae=False, params_dtype="torch.float32", patch_size=4, t_patch_size=1, in_channels=3,
    out_channels=3, cond_hidden_ratio=0.25, caption_channels=32, caption_max_length=8,
    xattn_cond_hidden_ratio=1.0, cond_gating_ratio=1.0, gated_linear_unit=False)


def get_base(name: str, policy: str, threshold: float = 0.0) -> ml_collections.ConfigDict:
    c = get_magi_base(name, policy, threshold, "reference")
    c.checkpoint = TINY_CHECKPOINT
    c.seed = 0
    c.video = ml_collections.ConfigDict(dict(num_chunks=8, latent_height=32, latent_width=32, chunk_width=2))
    c.sampler.num_steps = 32
    c.sampler.window = 4
    c.sampler.key_tile = 4096
    c.policy.warmup = 3
    # Replay the cached velocity with the current step size. The MAGI reference replays the last latent
    # displacement verbatim, which is only harmless while steps are nearly equal: MAGI's grid grows the step
    # 500x from the first to the last step, so a displacement cached early freezes the chunk at noise.
    c.policy.reuse = "residual"
    # A continuation, as MAGI-1's video-to-video mode: the first chunk of a procedural clip (of the run's seed)
    # is given clean and the model generates the next num_chunks chunks after it.
    # prefix.world: overrides of the procedural world ("n_shapes=2,..."); the world the checkpoint was trained on.
    c.prefix = ml_collections.ConfigDict(dict(chunks=1, source="procedural", file="", video="", world=""))
    c.output = ml_collections.ConfigDict(dict(decode="rgb", fps=8, scale=4, per_row=8))  # RGB frames; MP4 fps, upscale
    return c
