"""SkyReels-V2 / Wan 2.1 (original WanModel keys) -> ``models.skyreels_v2`` parameter paths."""

from __future__ import annotations

import numpy as np

from converters.engine import Rule
from converters.keymaps.transforms import conv_patch, copy, linear

B = "blocks.{i}."


def _table(w: np.ndarray, cfg) -> tuple[np.ndarray]:
    """Modulation tables [1, n, D] -> [n, D]."""
    if w.ndim != 3 or w.shape[0] != 1:
        raise ValueError("a modulation table must be [1, n, dim]")
    return (w[0],)


TRANSFORMS = {"copy": copy, "linear": linear, "conv_patch": conv_patch, "table": _table}


def _lin(src: str, dst: str, per_layer: bool = False) -> tuple[Rule, Rule]:
    return Rule(src + ".weight", (dst + "/kernel",), "linear", per_layer), Rule(src + ".bias", (dst + "/bias",),
                                                                                  "copy", per_layer)


def _attn(src: str, dst: str) -> tuple[Rule, ...]:
    return (*(r for x in "qkvo" for r in _lin(f"{B}{src}.{x}", f"layers/{dst}/{x}", True)),
            Rule(f"{B}{src}.norm_q.weight", (f"layers/{dst}/norm_q/scale",), "copy", True),
            Rule(f"{B}{src}.norm_k.weight", (f"layers/{dst}/norm_k/scale",), "copy", True))


RULES: tuple[Rule, ...] = (
    Rule("patch_embedding.weight", ("patch/kernel",), "conv_patch"), Rule("patch_embedding.bias", ("patch/bias",)),
    *_lin("text_embedding.0", "text/fc1"), *_lin("text_embedding.2", "text/fc2"),
    *_lin("time_embedding.0", "time/fc1"), *_lin("time_embedding.2", "time/fc2"),
    *_lin("time_projection.1", "time_proj"),
    Rule(B + "modulation", ("layers/modulation",), "table", True),
    *_attn("self_attn", "self_attn"), *_attn("cross_attn", "cross_attn"),
    Rule(B + "norm3.weight", ("layers/norm3/scale",), "copy", True),
    Rule(B + "norm3.bias", ("layers/norm3/bias",), "copy", True),
    *_lin(B + "ffn.0", "layers/ffn/fc1", True), *_lin(B + "ffn.2", "layers/ffn/fc2", True),
    Rule("head.modulation", ("head/modulation",), "table"), *_lin("head.head", "head"),
)
FPS_RULES: tuple[Rule, ...] = (
    Rule("fps_embedding.weight", ("fps_embedding",)),
    *_lin("fps_projection.0", "fps_proj/fc1"), *_lin("fps_projection.2", "fps_proj/fc2"),
)


def convert_skyreels(reader, cfg, dtype=None, sink=None) -> dict:
    """Upstream WanModel state dict -> parameter dict of ``models.skyreels_v2``."""
    from converters.engine import convert
    from models.skyreels_v2 import param_shapes

    rules = RULES + (FPS_RULES if cfg.inject_sample_info else ())
    return convert(reader, rules, TRANSFORMS, cfg, param_shapes(cfg), cfg.num_layers, dtype, sink)


# The diffusers checkpoint (SkyReelsV2Transformer3DModel) holds the same tensors under other names (spec
# skyreels_v2.md §3.3): module stems, original -> diffusers. Note the norm swap: original norm3 = diffusers norm2.
DIFFUSERS_STEMS = {
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "fps_projection.0": "fps_projection.net.0.proj",
    "fps_projection.2": "fps_projection.net.2",
    "head.modulation": "scale_shift_table",
    "head.head": "proj_out",
    B + "modulation": B + "scale_shift_table",
    B + "norm3": B + "norm2",
    B + "ffn.0": B + "ffn.net.0.proj",
    B + "ffn.2": B + "ffn.net.2",
    **{f"{B}{a}.{x}": f"{B}{b}.to_{x}" for a, b in (("self_attn", "attn1"), ("cross_attn", "attn2")) for x in "qkv"},
    **{f"{B}{a}.o": f"{B}{b}.to_out.0" for a, b in (("self_attn", "attn1"), ("cross_attn", "attn2"))},
    **{f"{B}{a}.{n}": f"{B}{b}.{n}" for a, b in (("self_attn", "attn1"), ("cross_attn", "attn2"))
       for n in ("norm_q", "norm_k")},
}


def diffusers_key(src: str) -> str:
    """The diffusers name of an original key (pattern); stems missing from the table keep their name."""
    for suffix in (".weight", ".bias"):
        if src.endswith(suffix) and src[: -len(suffix)] in DIFFUSERS_STEMS:
            return DIFFUSERS_STEMS[src[: -len(suffix)]] + suffix
    return DIFFUSERS_STEMS.get(src, src)


def convert_skyreels_diffusers(reader, cfg, dtype=None, sink=None) -> dict:
    """A diffusers-format state dict -> the same parameter dict as ``convert_skyreels``."""
    import dataclasses

    from converters.engine import convert
    from models.skyreels_v2 import param_shapes

    rules = RULES + (FPS_RULES if cfg.inject_sample_info else ())
    rules = tuple(dataclasses.replace(r, src=diffusers_key(r.src)) for r in rules)
    return convert(reader, rules, TRANSFORMS, cfg, param_shapes(cfg), cfg.num_layers, dtype, sink)
