"""MAGI-1 (videodit_ardf): upstream PyTorch key -> ``models.magi1`` parameter path, with explicit transforms."""

from __future__ import annotations

import numpy as np

from converters.engine import Rule
from converters.keymaps.transforms import conv_patch, copy, linear

L = "videodit_blocks.layers.{i}."


def _kv_interleaved(w: np.ndarray, cfg) -> tuple[np.ndarray, np.ndarray]:
    """linear_kv_xattn rows are [K_g | V_g] blocks per group: [G, 2, d, in] -> K, V kernels [in, G·d]."""
    g, d = cfg.num_query_groups, cfg.kv_channels
    w = w.reshape(g, 2, d, w.shape[-1])
    return w[:, 0].reshape(g * d, -1).T, w[:, 1].reshape(g * d, -1).T


def proj_columns(q_dim: int, blocks: int = 8) -> np.ndarray:
    """Stored column of each natural input dim of linear_proj (upstream permuted (n hn hd) -> (hn n hd))."""
    hd = q_dim // blocks
    s = np.arange(q_dim)
    self_cols = 2 * hd * (s // hd) + s % hd
    return np.concatenate([self_cols, self_cols + hd])


def _proj_permute(w: np.ndarray, cfg) -> tuple[np.ndarray]:
    cols = proj_columns(cfg.num_attention_heads * cfg.kv_channels)
    if w.shape[1] != len(cols):
        raise ValueError(f"linear_proj has {w.shape[1]} input columns, expected {len(cols)}")
    return (w[:, cols].T,)


TRANSFORMS = {"copy": copy, "linear": linear, "conv_patch": conv_patch, "kv_interleaved": _kv_interleaved,
              "proj_permute": _proj_permute}


def _norm(src: str, dst: str, per_layer: bool = True) -> tuple[Rule, Rule]:
    return (Rule(src + ".weight", (dst + "/scale",), "copy", per_layer),
            Rule(src + ".bias", (dst + "/bias",), "copy", per_layer))


RULES: tuple[Rule, ...] = (
    Rule("x_embedder.weight", ("x_embed/kernel",), "conv_patch"),
    Rule("t_embedder.mlp.0.weight", ("t_embed/fc1/kernel",), "linear"),
    Rule("t_embedder.mlp.0.bias", ("t_embed/fc1/bias",)),
    Rule("t_embedder.mlp.2.weight", ("t_embed/fc2/kernel",), "linear"),
    Rule("t_embedder.mlp.2.bias", ("t_embed/fc2/bias",)),
    Rule("y_embedder.y_proj_xattn.0.weight", ("y_embed/xattn/kernel",), "linear"),
    Rule("y_embedder.y_proj_xattn.0.bias", ("y_embed/xattn/bias",)),
    Rule("y_embedder.y_proj_adaln.0.weight", ("y_embed/adaln/kernel",), "linear"),
    Rule("y_embedder.y_proj_adaln.0.bias", ("y_embed/adaln/bias",)),
    Rule("y_embedder.null_caption_embedding", ("y_embed/null_caption",)),
    Rule("rope.bands", ("rope_bands",)),
    *_norm("videodit_blocks.final_layernorm", "final_norm", per_layer=False),
    Rule("final_linear.linear.weight", ("final/kernel",), "linear"),
    Rule(L + "ada_modulate_layer.proj.0.weight", ("layers/gate/kernel",), "linear", True),
    Rule(L + "ada_modulate_layer.proj.0.bias", ("layers/gate/bias",), "copy", True),
    *_norm(L + "self_attention.linear_qkv.layer_norm", "layers/pre_norm"),
    Rule(L + "self_attention.linear_qkv.q.weight", ("layers/q/kernel",), "linear", True),
    Rule(L + "self_attention.linear_qkv.k.weight", ("layers/k/kernel",), "linear", True),
    Rule(L + "self_attention.linear_qkv.v.weight", ("layers/v/kernel",), "linear", True),
    Rule(L + "self_attention.linear_qkv.qx.weight", ("layers/qx/kernel",), "linear", True),
    Rule(L + "self_attention.linear_kv_xattn.weight", ("layers/kx/kernel", "layers/vx/kernel"), "kv_interleaved",
         True),
    Rule(L + "self_attention.linear_proj.weight", ("layers/proj/kernel",), "proj_permute", True),
    *_norm(L + "self_attention.q_layernorm", "layers/q_norm"),
    *_norm(L + "self_attention.k_layernorm", "layers/k_norm"),
    *_norm(L + "self_attention.q_layernorm_xattn", "layers/qx_norm"),
    *_norm(L + "self_attention.k_layernorm_xattn", "layers/kx_norm"),
    *_norm(L + "self_attn_post_norm", "layers/attn_post_norm"),
    *_norm(L + "mlp.layer_norm", "layers/mlp_norm"),
    Rule(L + "mlp.linear_fc1.weight", ("layers/fc1/kernel",), "linear", True),
    Rule(L + "mlp.linear_fc2.weight", ("layers/fc2/kernel",), "linear", True),
    *_norm(L + "mlp_post_norm", "layers/mlp_post_norm"),
)


def convert_magi1(reader, cfg, dtype=None, sink=None) -> dict:
    """Upstream state dict -> parameter dict of ``models.magi1`` (adds the timestep frequency table)."""
    from converters.engine import convert
    from models.layers import sinusoid_freqs
    from models.magi1 import param_shapes

    params = convert(reader, RULES, TRANSFORMS, cfg, param_shapes(cfg), cfg.num_layers, dtype, sink)
    params["t_freqs"] = sinusoid_freqs(128)
    return params
