"""Shared base of the Self-Forcing presets (causal Wan2.1-T2V-1.3B, self_forcing_dmd): 81 frames at 480x832,
blocks of 3 latent frames, 4 warped steps, the clean context pass after each block."""

import ml_collections
from ml_collections import config_dict


def get_base(name: str, policy: str, threshold: float = 0.0) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = name
    c.model = "self_forcing"
    c.checkpoint = ""  # python -m converters.convert --model=self_forcing (or converters.release) output folder
    c.caption_file = ""  # .npz with "context" [L, 4096] (umT5 outputs); empty: a zero context
    c.prompt = config_dict.placeholder(str)  # encoded by the release's umT5 when set
    c.text = ml_collections.ConfigDict(dict(cache_dir=""))
    c.initial_latent = ""  # .npz with "latents" [C, F, H, W]: clean latent frames the video continues (I2V: F = 1)
    c.seed = 0
    c.batch = 1
    c.video = ml_collections.ConfigDict(dict(num_frames=81, height=480, width=832, fps=16))
    c.sampler = ml_collections.ConfigDict(dict(
        denoising_step_list=(1000, 750, 500, 250), warp_denoising_step=True, shift=5.0, num_frame_per_block=3,
        context_noise=0.0,
        # "clean": upstream's extra pass at context_noise that rewrites a finished block's K/V (5 forwards per block);
        # "skip": its last denoising step's K/V become the history instead (4 forwards per block)
        context_pass="clean",
        # frames self-attention sees, its own block included (upstream local_attn_size; -1 there = its 21-frame
        # buffer, which fails past 21 frames: here the ring keeps the most recent ones), and pinned first frames
        local_attn_size=21, sink_size=0,
        independent_first_frame=False, key_tile=4096))
    c.policy = ml_collections.ConfigDict(dict(
        name=policy, threshold=threshold, warmup=1, coeffs=(), reuse="residual", metric_dtype="float32",
        metric="input", semantics="intended", ratios=(), max_skips=1,
        min_charge=0.0))  # FlowCache guard: least accumulator charge per step (0: reference rule)
    # the history's storage (README, KV quantization): "dense" (compute dtype), "rtn_int8", "rtn_int4", "rtn_int2",
    # "study_soft_prune_int4" (the KV-quant study's recipe), "ours": tiers (bits, fraction of a frame's tokens) by
    # FlowCache's importance-redundancy score (importance weight score_lambda), the rest one summary token per frame
    # and head (summary); a frame older than the recent_frames newest keeps its first aged_tiers tiers (-1: never)
    c.kv = ml_collections.ConfigDict(dict(method="dense", tiers=((8, 0.25), (4, 0.75)), summary=True,
                                          score_lambda=1.0, recent_frames=6, aged_tiers=0))
    # "tiled": attention folds the block and the history one frame of keys at a time (no copy of the buffer; the
    # quantized stores always run so); fused / xla / cudnn: one call over the buffer with the block at its tail
    c.compute = ml_collections.ConfigDict(dict(dtype="", param_dtype="", attention="tiled"))
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=1, seq=1))
    return c
