"""Shared base of the SkyReels-V2 DF-1.3B-540P presets (the FlowCache run: 177 frames, 2 windows, 50 steps)."""

import ml_collections
from ml_collections import config_dict


def get_base(name: str, policy: str, threshold: float = 0.0) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = name
    c.model = "skyreels_v2"
    c.checkpoint = ""  # the converter's output folder (python -m converters.convert --model=skyreels_v2 ...)
    c.caption_file = ""  # .npz with "context" [L, 4096] (+ "negative_context"): umT5 outputs; empty: zero contexts
    # A text prompt (and the CFG branch's negative prompt), encoded by the checkpoint's umT5 (a release folder from
    # converters.release), cached on disk; unset: caption_file or zero contexts.
    c.prompt = config_dict.placeholder(str)
    c.negative_prompt = ""
    c.text = ml_collections.ConfigDict(dict(cache_dir=""))
    c.seed = 1024
    c.batch = 1
    c.video = ml_collections.ConfigDict(dict(
        num_frames=177, base_num_frames=97, overlap_history=17, height=544, width=960, fps=24))
    c.sampler = ml_collections.ConfigDict(dict(
        num_steps=50, shift=8.0, guidance=6.0, ar_step=5, causal_block_size=5, addnoise_condition=20,
        attention="block_causal",  # "block_causal" (what the paper counts) or "full" (SR without --causal_attention)
        # "groups": a forward per causal block over a K/V buffer (FlowCache's; finished / not-started blocks cost
        # nothing); "window": upstream's whole-window call; "": groups for flowcache, window otherwise
        executor="",
        reference_aliasing=True))  # reproduce SkyReels' UniPC quirk at the second step (README, SkyReels-V2)
    c.policy = ml_collections.ConfigDict(dict(
        name=policy, threshold=threshold, warmup=5, coeffs=(), reuse="residual", metric_dtype="float32",
        metric="timestep",  # FlowCache's and TeaCache's SkyReels rules read the time modulation e0 ("input": the
        #                     blocks' patch embeddings, compared in the graph like MAGI-1's)
        counter="intended",  # window TeaCache: "reference" = upstream's call counter (fixture README, defect 5)
        use_ret_steps=True, semantics="intended", ratios=(), max_skips=4))
    # Precision and attention (README, GPU execution): dtype of activations / K/V / caches and of the stored weights
    # ("" = the checkpoint's), attention "fused" (jax.nn.dot_product_attention: cuDNN flash on a GPU, XLA elsewhere),
    # "xla", "cudnn" or "tiled" (the hand-written online-softmax reference).
    c.compute = ml_collections.ConfigDict(dict(dtype="", param_dtype="", attention="fused"))
    # Device mesh (README, Device mesh): axis sizes whose product is the device count; data = CFG branches / batch,
    # fsdp = parameters sharded, seq = a chunk's tokens sharded for attention (context parallel).
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=1, seq=1))
    return c
