"""Shared base of the MAGI-1 presets (the FlowCache t2v run: 720x720, 240 frames, 64 steps, window 4)."""

import ml_collections
from ml_collections import config_dict


def get_base(name: str, policy: str, threshold: float = 0.0, semantics: str = "reference"
             ) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = name
    c.model = "magi1"
    c.checkpoint = ""  # the converter's output folder (python -m converters.convert --model=magi1 ...)
    c.caption_file = ""  # .safetensors/.npz with "y" [L, C] or [n_chunks, L, C] (+ "mask"); empty: null caption
    # A text prompt, encoded by the checkpoint's T5 (a release folder from converters.release); unset: caption_file
    # or the null caption. The encoding is cached on disk (text.cache_dir, default ~/.cache/flowcache_jax/prompts).
    c.prompt = config_dict.placeholder(str)
    c.text = ml_collections.ConfigDict(dict(cache_dir="", pad_hq=True, pad_duration=True))  # MAGI special tokens
    c.seed = 1234
    c.batch = 1
    c.video = ml_collections.ConfigDict(dict(num_chunks=10, latent_height=90, latent_width=90, chunk_width=6,
                                             fps=24))  # fps of the MP4 (MAGI-1 generates at 24)
    c.sampler = ml_collections.ConfigDict(dict(
        num_steps=64, window=4, clean_t=0.9999, shortcut_mode="8,16,16",  # the 12-step grid's split
        time_power=2.0, time_shift=3.0,  # the time grid: u = (k/N)^power, then the shift (MAGI-1: 2 and 3)
        # "reference": the FlowCache fork (no clean re-encode of finished chunks, nearly-clean duplicate dropped);
        # "magi": upstream MAGI-1 (clean re-encode, duplicate run and blended 0.7/0.3); threshold 0 = vanilla.
        semantics=semantics,
        # unset: follow semantics; true/false overrides (the fork's thr0dup / Physics-IQ runs)
        discard_duplicate=config_dict.placeholder(bool),
        kv_range="full",  # "full" history (FlowCache config) or "official" per-stage ranges [5, 4, 3, 2]
        # History guidance: v = v_alone + scale·(v − v_alone) while t <= t_max, v_alone a second forward of the chunk
        # without its history (MAGI-1 base: 1.5 up to t = 0.3; the distilled model: 1 = off, one forward per step).
        history_guidance=1.0, history_guidance_t_max=1.0,
        key_tile=2048))  # keys per attention tile: bounds the score block to [heads, 12150, 2048]
    c.kv = ml_collections.ConfigDict(dict(
        compress=False,  # FlowCache's KV compression: a fixed buffer of budget_chunks chunks (spec flowcache §4.2)
        budget_chunks=5,  # total_cache_chunk_nums as shipped: window + compressed history (here 1 chunk)
        mix_lambda=0.07, kernel=7, query_granularity="frame",
        # Fake quantization of finished chunks' K/V (flowcache_jax.kv.methods; fidelity only, the buffer stays
        # dense): "dense" or a method name; for "ours": tiers = (bits, fraction of a frame's tokens) by the score
        # (importance weight score_lambda), the rest in one summary token per frame and head (summary), and a frame
        # older than the recent_frames newest keeps its first aged_tiers tiers (-1: no ageing).
        method="dense", tiers=((8, 0.25), (4, 0.75)), summary=True, score_lambda=1.0, recent_frames=6,
        aged_tiers=0))
    # Video continuation (MAGI-1's v2v): the last `chunks` chunks of a clip, given clean. source "file": an .npz with
    # "latents" [16, T, H, W]; "video": an MP4 (`video`) encoded with the checkpoint's VAE (chunks 0 = all it holds).
    c.prefix = ml_collections.ConfigDict(dict(chunks=0, source="file", file="", video=""))
    c.policy = ml_collections.ConfigDict(dict(
        name=policy, threshold=threshold, warmup=5, coeffs=(), reuse="displacement", metric_dtype="float32",
        ratios=(), max_skips=4,  # MagCache: calibrated ratios per step (empty: calibrate), skip cap
        min_charge=0.0,  # FlowCache guard: least accumulator charge per step, caps a reuse run (0: reference rule)
        metric="input",  # what the rule reads: the chunk's input features
        semantics="intended"))  # TeaCache: "reference" = the FlowCache fork's MAGI rule (README, TeaCache)
    # Precision and attention (README, GPU execution): dtype of activations / K/V / caches and of the stored weights
    # ("" = the checkpoint's), attention "fused" (jax.nn.dot_product_attention: cuDNN flash on a GPU, XLA elsewhere),
    # "xla", "cudnn" or "tiled" (the hand-written online-softmax reference).
    c.compute = ml_collections.ConfigDict(dict(dtype="", param_dtype="", attention="fused"))
    # Device mesh (README, Device mesh): axis sizes whose product is the device count; data = CFG branches / batch,
    # fsdp = parameters sharded, seq = a chunk's tokens sharded for attention (context parallel).
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=1, seq=1))
    return c
