"""MAGI-1 ViT VAE (upstream ``ViTVAE`` state dict) -> ``models.magi1_vae`` parameter paths, with transforms."""

from __future__ import annotations

import numpy as np

from converters.engine import Rule
from converters.keymaps.transforms import conv_patch, copy, linear


def _cls(w: np.ndarray, cfg) -> tuple[np.ndarray]:
    """cls_token [1, 1, D] -> [D]."""
    if w.ndim != 3 or w.shape[:2] != (1, 1):
        raise ValueError("a cls_token must be [1, 1, D]")
    return (w[0, 0],)


def _table(w: np.ndarray, cfg) -> tuple[np.ndarray]:
    """pos_embed [1, 1 + N, D] -> [1 + N, D] (CLS row first, then the (t, h, w) grid)."""
    if w.ndim != 3 or w.shape[0] != 1:
        raise ValueError("a pos_embed must be [1, N, D]")
    return (w[0],)


def _conv3d(w: np.ndarray, cfg) -> tuple[np.ndarray]:
    """Conv3d weight [O, I, kt, kh, kw] -> DHWIO kernel [kt, kh, kw, I, O] (lax.conv_general_dilated)."""
    if w.ndim != 5:
        raise ValueError("a Conv3d weight must be 5-D")
    return (w.transpose(2, 3, 4, 1, 0),)


TRANSFORMS = {"copy": copy, "linear": linear, "conv_patch": conv_patch, "cls": _cls, "table": _table, "conv3d": _conv3d}


def _linear(src: str, dst: str, per_layer: bool = False, bias: bool = True) -> tuple[Rule, ...]:
    w = Rule(src + ".weight", (dst + "/kernel",), "linear", per_layer)
    return (w, Rule(src + ".bias", (dst + "/bias",), "copy", per_layer)) if bias else (w,)


def _norm(src: str, dst: str, per_layer: bool = False) -> tuple[Rule, Rule]:
    return (Rule(src + ".weight", (dst + "/scale",), "copy", per_layer),
            Rule(src + ".bias", (dst + "/bias",), "copy", per_layer))


def _blocks(src: str, dst: str, qkv_bias: bool) -> tuple[Rule, ...]:
    b, d = src + ".blocks.{i}.", dst + "/layers/"
    return (*_linear(b + "attn.qkv", d + "qkv", True, qkv_bias), *_linear(b + "attn.proj", d + "proj", True),
            *_norm(b + "norm2", d + "norm2", True), *_linear(b + "mlp.fc1", d + "fc1", True),
            *_linear(b + "mlp.fc2", d + "fc2", True))


def rules(qkv_bias: bool = True) -> tuple[Rule, ...]:
    """The key map; ``qkv_bias`` = the ddconfig flag (without it the checkpoint has no qkv.bias keys)."""
    return (
        Rule("encoder.patch_embed.proj.weight", ("encoder/patch/kernel",), "conv_patch"),
        Rule("encoder.patch_embed.proj.bias", ("encoder/patch/bias",)),
        Rule("encoder.cls_token", ("encoder/cls_token",), "cls"),
        Rule("encoder.pos_embed", ("encoder/pos_embed",), "table"),
        *_blocks("encoder", "encoder", qkv_bias),
        *_norm("encoder.norm", "encoder/norm"),
        *_linear("encoder.last_layer", "encoder/out"),
        *_linear("decoder.proj_in", "decoder/proj_in"),
        Rule("decoder.cls_token", ("decoder/cls_token",), "cls"),
        Rule("decoder.pos_embed", ("decoder/pos_embed",), "table"),
        *_blocks("decoder", "decoder", qkv_bias),
        *_norm("decoder.norm", "decoder/norm"),
        Rule("decoder.last_layer.weight", ("decoder/conv_out/kernel",), "conv3d"),
        Rule("decoder.last_layer.bias", ("decoder/conv_out/bias",)),
    )


RULES: tuple[Rule, ...] = rules(True)


def convert_magi1_vae(reader, cfg, dtype=None, sink=None) -> dict:
    """Upstream ViTVAE state dict -> parameter dict of ``models.magi1_vae`` (CheckpointError lists every misfit)."""
    from converters.engine import convert
    from models.magi1_vae import param_shapes

    return convert(reader, rules(cfg.qkv_bias), TRANSFORMS, cfg, param_shapes(cfg), cfg.depth, dtype, sink)
