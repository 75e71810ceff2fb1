"""Self-Forcing's CausalWanModel (Wan2.1-T2V made block-causal) on the Wan blocks of ``models.skyreels_v2``.

The parameters are Wan 2.1's (the SkyReels layout without the fps embedding), so the blocks, the key map and
the converters are shared; what is causal lives here: per-frame float timesteps, RoPE at absolute frame
positions, and self-attention over a fixed-shape K/V history (``models.self_forcing_denoiser``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from models import attention as attn
from models.layers import dense
from models.skyreels_v2 import SkyReelsConfig, head, patchify, run_blocks, time_conditions, unpatchify

# The released Self-Forcing generator (Wan2.1-T2V-1.3B), spec self_forcing §1.
SELF_FORCING_1P3B = dict(model_type="t2v", dim=1536, ffn_dim=8960, freq_dim=256, in_dim=16, out_dim=16, num_heads=12,
                         num_layers=30, text_len=512, text_dim=4096, eps=1e-6, qk_norm=True, cross_attn_norm=True)


def config_from_upstream(config: dict, dtype: str = "float32", attention_impl: str = "tiled") -> SkyReelsConfig:
    """A ``CausalWanModel(**kwargs)`` dict (``local_attn_size`` / ``sink_size`` are run knobs here, not model
    fields) -> the Wan config of the shared blocks, without SkyReels' fps embedding."""
    cfg = SkyReelsConfig.from_upstream({**config, "inject_sample_info": False}, dtype)
    return dataclasses.replace(cfg, attention_impl=attention_impl)


# ----- the causal forward ---------------------------------------------------------------------------------------
def rope_frequencies(head_dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Wan's per-axis RoPE frequencies (frame, height, width), float64, split c-2(c//3) / c//3 / c//3 pairs."""
    d = head_dim
    dims = (d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6))
    return tuple(1.0 / 10000.0 ** (np.arange(0, a, 2, dtype=np.float64) / a) for a in dims)


def causal_rope(head_dim: int, frames: int, h: int, w: int, start_frame: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(cos, sin) [frames·h·w, head_dim/2] at absolute frames ``start_frame`` ... (traced): the frame axis is the
    token's frame in the whole video (upstream's ``current_start // frame_seq_length``), h and w start at 0.

    The height/width angles are exact (float64 on the host); the frame angle is ``frame · f`` in float32, whose
    rounding (|angle|·6e-8) is far below bf16's. There is no 1024-frame ceiling (upstream's table size).
    """
    ft, fh, fw = rope_frequencies(head_dim)
    grid = np.stack(np.meshgrid(np.arange(h), np.arange(w), indexing="ij"), -1).reshape(-1, 2)
    spatial = np.concatenate([np.outer(grid[:, 0], fh), np.outer(grid[:, 1], fw)], 1)  # [h·w, n_h + n_w]
    frame = (jnp.asarray(start_frame, jnp.int32) + jnp.arange(frames)).astype(jnp.float32)
    a_t = jnp.repeat(frame[:, None] * jnp.asarray(ft, jnp.float32), h * w, 0)  # [frames·h·w, n_t]
    cs, ss = (jnp.asarray(np.tile(f(spatial), (frames, 1)), jnp.float32) for f in (np.cos, np.sin))
    return jnp.concatenate([jnp.cos(a_t), cs], 1), jnp.concatenate([jnp.sin(a_t), ss], 1)


def block_forward(cfg: SkyReelsConfig, p: dict, x: jax.Array, t: jax.Array, cross: tuple[jax.Array, jax.Array],
                  start_frame: jax.Array, kv: tuple[jax.Array, jax.Array] | None = None,
                  write_start: jax.Array | None = None, key_mask: jax.Array | None = None,
                  self_attention: tuple | None = None, key_tile: int = 4096, constrain=None,
                  with_intermediates: bool = False) -> tuple:
    """Flow (noise - x0) [C, F, H, W] of one block ``x`` at per-frame float timesteps ``t`` [F].

    Self-attention sees the block's own tokens and a history: either a K/V buffer [layers, rows, heads, hd] into
    whose rows [write_start, +n) the block's K/V are written (``key_mask`` [rows]: the rows it sees, its own
    included), or ``self_attention`` = (fn, per-layer tree) over a packed store (``run_blocks``). ``cross`` is the
    prompt's per-layer cross-attention (K, V) (``skyreels_v2.cross_kv``), computed once per prompt.
    Returns (flow, h_in, h_out, (K, V) — the updated buffer, or the block's own per-layer K/V —, intermediates; with
    a hook {"aux": its stacked per-layer outputs}).
    """
    _, frames, hh, ww = x.shape
    pt, ph, pw = cfg.patch_size
    fp, hp, wp = frames // pt, hh // ph, ww // pw
    hw, n = hp * wp, fp * hp * wp
    tok = patchify(cfg, x)
    h_in = dense(tok, p["patch"], jnp.float32)
    tc = time_conditions(cfg, p, jnp.asarray(t, jnp.float32), None)
    cos, sin = causal_rope(cfg.head_dim, fp, hp, wp, start_frame)
    frame_of = jnp.arange(n) // hw
    keys = attn.Keys("mask", key_mask=key_mask) if kv is not None else None
    h, new_kv, outs = run_blocks(cfg, p, h_in, tc["e0"], frame_of, cross, cos, sin, None, key_tile, kv=kv,
                                 write_start=write_start, keys=keys, constrain=constrain,
                                 self_attention=self_attention, with_intermediates=with_intermediates)
    y = head(cfg, p, h, tc["e"], frame_of)
    flow = unpatchify(cfg, y, frames, hh, ww)
    inter = None
    if self_attention is not None:  # the hook's per-layer outputs (e.g. the keys' scores)
        inter = {"aux": outs}
    elif with_intermediates:
        inter = {"patch_embed": h_in, "time_embed": tc["e"], "time_proj": tc["time_proj"], "blocks": outs,
                 "head": y}
    return flow, h_in, h, new_kv, inter


def forward_flops(cfg: SkyReelsConfig, frame_tokens: int, frames: int, key_frames: int, text_tokens: int) -> float:
    """Matmul FLOPs (2 per MAC) of one block forward of ``frames`` latent frames whose queries see ``key_frames``
    frames of keys (history + itself); the cross-attention K/V are computed once per prompt, not here."""
    d, n = cfg.dim, frame_tokens * frames
    keys = frame_tokens * key_frames
    per_layer = (8 * n * d * d + 2 * n * d * d + 4 * n * keys * d + 4 * n * text_tokens * d + 4 * n * d * cfg.ffn_dim)
    return float(per_layer * cfg.num_layers + 2 * n * cfg.patch_dim * d + 2 * n * d * cfg.patch_dim)
