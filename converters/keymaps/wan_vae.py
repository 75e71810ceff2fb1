"""Wan2.1 VAE key maps: original ``Wan2.1_VAE.pth`` names and diffusers ``AutoencoderKLWan`` names ->
``models.wan_vae`` parameter paths.

Both tables are generated from the config's structure (``encoder_layout`` / ``decoder_layout``), so they hold
for any ``dim_mult`` / ``num_res_blocks``. The diffusers encoder keeps upstream's flat ``down_blocks`` list;
its decoder nests ``up_blocks.{stage}.resnets.{j}`` and ``up_blocks.{stage}.upsamplers.0``.
"""

from __future__ import annotations

import numpy as np

from converters.engine import Rule
from converters.keymaps.transforms import copy
from models.wan_vae import Layer, WanVAEConfig, decoder_layout, encoder_layout, param_shapes

FORMATS = ("original", "diffusers")


def _conv3d(w: np.ndarray, cfg) -> tuple[np.ndarray]:
    """Conv3d [O, I, kt, kh, kw] -> [kt, kh, kw, I, O]."""
    if w.ndim != 5:
        raise ValueError("a Conv3d weight must be 5-D")
    return (w.transpose(2, 3, 4, 1, 0),)


def _conv2d(w: np.ndarray, cfg) -> tuple[np.ndarray]:
    """Conv2d [O, I, kh, kw] -> [kh, kw, I, O]."""
    if w.ndim != 4:
        raise ValueError("a Conv2d weight must be 4-D")
    return (w.transpose(2, 3, 1, 0),)


def _pointwise(w: np.ndarray, cfg) -> tuple[np.ndarray]:
    """1x1 Conv2d / 1x1x1 Conv3d [O, I, 1, 1(, 1)] -> dense kernel [I, O]."""
    if w.ndim not in (4, 5) or any(s != 1 for s in w.shape[2:]):
        raise ValueError("a pointwise conv weight must be [O, I, 1, 1] or [O, I, 1, 1, 1]")
    return (w.reshape(w.shape[:2]).T,)


def _gamma(w: np.ndarray, cfg) -> tuple[np.ndarray]:
    """RMS_norm gamma [C, 1, 1(, 1)] -> [C]."""
    if w.ndim < 1 or any(s != 1 for s in w.shape[1:]):
        raise ValueError("an RMS_norm gamma must be [C, 1, ...]")
    return (w.reshape(-1),)


TRANSFORMS = {"copy": copy, "conv3d": _conv3d, "conv2d": _conv2d, "point": _pointwise, "gamma": _gamma}

# (original suffix, diffusers suffix, parameter sub-path, transform of the weight)
_RES = (("residual.0", "norm1", "norm1", "gamma"), ("residual.2", "conv1", "conv1", "conv3d"),
        ("residual.3", "norm2", "norm2", "gamma"), ("residual.6", "conv2", "conv2", "conv3d"))
_SHORTCUT = ("shortcut", "conv_shortcut", "shortcut", "point")
_ATTN = (("norm", "norm", "norm", "gamma"), ("to_qkv", "to_qkv", "qkv", "point"), ("proj", "proj", "proj", "point"))
_RESAMPLE = ("resample.1", "resample.1", "conv", "conv2d")
_TIME = ("time_conv", "time_conv", "time_conv", "conv3d")


def _parts(layer: Layer) -> tuple[tuple[str, str, str, str], ...]:
    if layer.kind == "res":
        return _RES + ((_SHORTCUT,) if layer.cin != layer.cout else ())
    if layer.kind == "attn":
        return _ATTN
    return (_RESAMPLE,) + ((_TIME,) if layer.kind.endswith("3d") else ())


def _rules(orig: str, diff: str, path: str, kind: str, fmt: str) -> tuple[Rule, ...]:
    stem = orig if fmt == "original" else diff
    if kind == "gamma":
        return (Rule(stem + ".gamma", (path + "/scale",), "gamma"),)
    return Rule(stem + ".weight", (path + "/kernel",), kind), Rule(stem + ".bias", (path + "/bias",))


def _block(orig: str, diff: str, path: str, parts, fmt: str) -> list[Rule]:
    return [r for o, d, sub, kind in parts for r in _rules(f"{orig}.{o}", f"{diff}.{d}", f"{path}/{sub}", kind, fmt)]


def _mid(side: str, fmt: str) -> list[Rule]:
    res = _RES  # the middle res blocks keep their width: no shortcut
    return (_block(f"{side}.middle.0", f"{side}.mid_block.resnets.0", f"{side}/mid/res0", res, fmt)
            + _block(f"{side}.middle.1", f"{side}.mid_block.attentions.0", f"{side}/mid/attn", _ATTN, fmt)
            + _block(f"{side}.middle.2", f"{side}.mid_block.resnets.1", f"{side}/mid/res1", res, fmt))


def rules(cfg: WanVAEConfig, fmt: str = "original") -> tuple[Rule, ...]:
    """Every tensor of the checkpoint of ``cfg`` in layout ``fmt`` -> its parameter path (all non-per-layer)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown Wan VAE layout {fmt!r}; one of {', '.join(FORMATS)}")
    out: list[Rule] = []
    out += _rules("encoder.conv1", "encoder.conv_in", "encoder/conv_in", "conv3d", fmt)
    for k, layer in enumerate(encoder_layout(cfg)):
        out += _block(f"encoder.downsamples.{k}", f"encoder.down_blocks.{k}", f"encoder/down/{k}", _parts(layer), fmt)
    out += _mid("encoder", fmt)
    out += _rules("encoder.head.0", "encoder.norm_out", "encoder/head/norm", "gamma", fmt)
    out += _rules("encoder.head.2", "encoder.conv_out", "encoder/head/conv", "conv3d", fmt)
    out += _rules("conv1", "quant_conv", "quant", "point", fmt)
    out += _rules("conv2", "post_quant_conv", "post_quant", "point", fmt)
    out += _rules("decoder.conv1", "decoder.conv_in", "decoder/conv_in", "conv3d", fmt)
    out += _mid("decoder", fmt)
    for k, layer in enumerate(decoder_layout(cfg)):
        if layer.kind == "attn" and fmt == "diffusers":
            raise ValueError("diffusers' AutoencoderKLWan decoder has no attention at attn_scales; this config "
                             "cannot be loaded from the diffusers layout")
        where = (f"decoder.up_blocks.{layer.stage}.resnets.{layer.pos}" if layer.kind == "res"
                 else f"decoder.up_blocks.{layer.stage}.upsamplers.0")
        out += _block(f"decoder.upsamples.{k}", where, f"decoder/up/{k}", _parts(layer), fmt)
    out += _rules("decoder.head.0", "decoder.norm_out", "decoder/head/norm", "gamma", fmt)
    out += _rules("decoder.head.2", "decoder.conv_out", "decoder/head/conv", "conv3d", fmt)
    return tuple(out)


def key_map(cfg: WanVAEConfig) -> dict[str, str]:
    """{original key: diffusers key} of every tensor (the fixture's ``key_map_wan_to_diffusers.json``)."""
    return {a.src: b.src for a, b in zip(rules(cfg, "original"), rules(cfg, "diffusers"), strict=True)}


def detect_format(keys: list[str]) -> str | None:
    """Which layout a checkpoint's key names belong to ("original" / "diffusers"), None if neither."""
    keys = list(keys)
    if any(k.startswith(("encoder.downsamples.", "decoder.upsamples.", "encoder.conv1.", "decoder.conv1."))
           or k in ("conv1.weight", "conv2.weight") for k in keys):
        return "original"
    if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.", "encoder.conv_in.", "decoder.conv_in.",
                         "quant_conv.", "post_quant_conv.")) for k in keys):
        return "diffusers"
    return None


def convert_wan_vae(reader, cfg: WanVAEConfig, fmt: str = "original", dtype=None, sink=None) -> dict:
    """A Wan2.1 VAE state dict (``fmt`` layout) -> the parameter dict of ``models.wan_vae``.

    ``dtype``: None keeps the source dtypes, else a dtype or a function of the destination path (engine rule).
    Every problem (missing / unexpected keys, shapes) is listed in one ``CheckpointError``; callers point at the
    right layout with ``detect_format`` (``converters.components`` adds the ``--format`` hint).
    """
    from converters.engine import convert

    return convert(reader, rules(cfg, fmt), TRANSFORMS, cfg, param_shapes(cfg), 0, dtype, sink)
