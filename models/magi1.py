"""MAGI-1 DiT (videodit_ardf) in JAX, with a Flax NNX module around pure functions.

One *call* denoises R chunks of a latent slab at once, each chunk with its own time, caption and key
range (spec/magi1.md §3). Self-attention keys are [cached rows of earlier chunks ; this call's rows];
``kv_range`` gives each chunk its half-open key range in that index space. Parameters are a nested dict
(``init_params`` shows the layout; ``converters/keymaps/magi1.py`` fills it from upstream checkpoints),
with every per-layer leaf stacked on a leading layer axis so the layers run under one ``lax.scan``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import attention as attn
from models.layers import (
    ParamsModule,
    dense,
    layer_norm,
    range_attention,
    rotate_half,
    sinusoid_freqs,
    timestep_sinusoid,
)

# The released 4.5B-distill model_config (example/4.5B/4.5B_distill_config.json), spec §1.1.
MAGI1_4P5B_DISTILL = dict(
    model_name="videodit_ardf", num_layers=34, hidden_size=3072, ffn_hidden_size=12288, num_attention_heads=24,
    num_query_groups=8, kv_channels=128, layernorm_epsilon=1e-6, apply_layernorm_1p=True, x_rescale_factor=1,
    half_channel_vae=False, params_dtype="torch.bfloat16", patch_size=2, t_patch_size=1, in_channels=16,
    out_channels=16, cond_hidden_ratio=0.25, caption_channels=4096, caption_max_length=800,
    xattn_cond_hidden_ratio=1.0, cond_gating_ratio=1.0, gated_linear_unit=False)

_PROJ_BLOCKS = 8  # upstream linear_proj input is permuted "(n hn hd) -> (hn n hd)" with hn = 8 hard-coded


@dataclasses.dataclass(frozen=True)
class Magi1Config:
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    layernorm_epsilon: float = 1e-6
    apply_layernorm_1p: bool = True
    x_rescale_factor: float = 1.0
    patch_size: int = 2
    t_patch_size: int = 1
    in_channels: int = 16
    out_channels: int = 16
    cond_hidden_ratio: float = 0.25
    caption_channels: int = 4096
    caption_max_length: int = 800
    xattn_cond_hidden_ratio: float = 1.0
    cond_gating_ratio: float = 1.0
    dtype: str = "float32"  # activations and K/V: float32 (fixtures) or bfloat16 (released weights)
    gated_linear_unit: bool = False  # SwiGLU MLP (the 24B model): fc1 gives [gate ; up], silu(gate) * up
    attention_impl: str = "tiled"  # models.attention.IMPLEMENTATIONS (the tiled path is the parity reference)

    def __post_init__(self):
        attn.check(self.attention_impl)

    @classmethod
    def from_upstream(cls, model_config: dict, dtype: str | None = None) -> Magi1Config:
        """Build from an upstream ``model_config`` dict (a fixture's config.json or the released one)."""
        if model_config.get("half_channel_vae"):
            raise ValueError("half_channel_vae=true (24B) is not supported")
        names = {f.name for f in dataclasses.fields(cls)} - {"dtype", "attention_impl"}
        missing = sorted(n for n in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                                     "num_query_groups", "kv_channels") if n not in model_config)
        if missing:
            raise ValueError(f"model_config lacks {', '.join(missing)}")
        kw = {k: v for k, v in model_config.items() if k in names}
        if dtype is None:
            dtype = "bfloat16" if "bfloat16" in str(model_config.get("params_dtype", "")) else "float32"
        return cls(**kw, dtype=dtype)

    @property
    def fc1_width(self) -> int:
        return self.ffn_hidden_size * (2 if self.gated_linear_unit else 1)

    @property
    def cond_dim(self) -> int:
        return int(self.hidden_size * self.cond_hidden_ratio)

    @property
    def n_bands(self) -> int:
        return self.kv_channels // 8

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.t_patch_size * self.patch_size**2

    @property
    def jdtype(self):
        return jnp.dtype(self.dtype)


# ----- parameters ------------------------------------------------------------------------------------
def param_shapes(cfg: Magi1Config) -> dict:
    """The parameter layout: nested dict of shapes; ``layers`` leaves have a leading [num_layers] axis."""
    d, f, dc, hd = cfg.hidden_size, cfg.ffn_hidden_size, cfg.cond_dim, cfg.kv_channels
    q, kv, cc = cfg.num_attention_heads * hd, cfg.num_query_groups * hd, cfg.caption_channels
    dx = int(d * cfg.xattn_cond_hidden_ratio)
    norm = lambda n: {"scale": (n,), "bias": (n,)}
    lin = lambda i, o, b=False: {"kernel": (i, o), **({"bias": (o,)} if b else {})}
    layer = {
        "gate": lin(dc, int(2 * d * cfg.cond_gating_ratio), True), "pre_norm": norm(d),
        "q": lin(d, q), "k": lin(d, kv), "v": lin(d, kv), "qx": lin(d, q), "kx": lin(dx, kv), "vx": lin(dx, kv),
        "q_norm": norm(hd), "k_norm": norm(hd), "qx_norm": norm(hd), "kx_norm": norm(hd),
        "proj": lin(2 * q, d), "attn_post_norm": norm(d), "mlp_norm": norm(d), "fc1": lin(d, cfg.fc1_width),
        "fc2": lin(f, d), "mlp_post_norm": norm(d),
    }
    layers = jax.tree.map(lambda s: (cfg.num_layers, *s), layer, is_leaf=lambda x: isinstance(x, tuple))
    return {
        "x_embed": lin(cfg.patch_dim, d),
        "t_embed": {"fc1": lin(256, dc, True), "fc2": lin(dc, dc, True)},
        "y_embed": {"xattn": lin(cc, dx, True), "adaln": lin(cc, dc, True),
                    "null_caption": (cfg.caption_max_length, cc)},
        "rope_bands": (cfg.n_bands,),
        "t_freqs": (128,),
        "layers": layers,
        "final_norm": norm(d),
        "final": lin(d, cfg.t_patch_size * cfg.patch_size**2 * cfg.out_channels),
    }


def init_params(cfg: Magi1Config, key: jax.Array, dtype=jnp.float32) -> dict:
    """Random parameters of the right layout (tests, abstract shapes, training from scratch)."""
    shapes = param_shapes(cfg)
    leaves, tree = jax.tree.flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
    keys = jax.random.split(key, len(leaves))
    out = [jax.random.normal(k, s, jnp.float32) * (1.0 / math.sqrt(s[-2]) if len(s) >= 2 else 0.02)
           for k, s in zip(keys, leaves, strict=True)]
    p = jax.tree.unflatten(tree, [o.astype(dtype) for o in out])
    p["t_freqs"] = jnp.asarray(sinusoid_freqs(128))
    p["rope_bands"] = jnp.asarray(10000.0 ** (-np.arange(cfg.n_bands) / cfg.n_bands), jnp.float32)
    return p


# ----- pieces of the forward -------------------------------------------------------------------------
def patchify(cfg: Magi1Config, x: jax.Array) -> jax.Array:
    """[C, T, H, W] -> [S, C·pt·ph·pw] tokens in (T, H, W) order, patch flattened as (c, kt, kh, kw)."""
    c, t, h, w = x.shape
    pt, p = cfg.t_patch_size, cfg.patch_size
    x = x.reshape(c, t // pt, pt, h // p, p, w // p, p).transpose(1, 3, 5, 0, 2, 4, 6)
    return x.reshape(-1, c * pt * p * p)


def unpatchify(cfg: Magi1Config, y: jax.Array, t: int, h: int, w: int) -> jax.Array:
    """[S, pt·ph·pw·C] (channel fastest) -> [C, T, H, W]."""
    pt, p, c = cfg.t_patch_size, cfg.patch_size, cfg.out_channels
    y = y.reshape(t // pt, h // p, w // p, pt, p, p, c).transpose(6, 0, 3, 1, 4, 2, 5)
    return y.reshape(c, t, h, w)


def rope_table(bands: jax.Array, frame_offset: jax.Array, frames: int, hp: int, wp: int
               ) -> tuple[jax.Array, jax.Array]:
    """(sin, cos) [frames·hp·wp, 3·nb] for frames ``frame_offset + [0, frames)`` of the video (spec §3.2).

    Time is the absolute latent-frame index; space is centred and squeezed to a 16-wide reference grid.
    """
    def centred(n: int, ref: float) -> np.ndarray:
        if n == 1:  # a size-1 axis keeps coordinate 0
            return np.zeros(1, np.float32)
        return ((np.arange(n, dtype=np.float32) - np.float32((n - 1) / 2)) * np.float32((ref - 1) / (n - 1))
                ).astype(np.float32)

    scale = math.sqrt(hp * wp / 256.0)
    tc = jnp.asarray(frame_offset, jnp.float32) + jnp.arange(frames, dtype=jnp.float32)
    hc, wc = jnp.asarray(centred(hp, hp / scale)), jnp.asarray(centred(wp, wp / scale))
    grid = jnp.stack(jnp.meshgrid(tc, hc, wc, indexing="ij"), -1).reshape(-1, 3)
    ang = (grid[:, :, None] * bands.astype(jnp.float32)[None, None, :]).reshape(grid.shape[0], -1)
    return jnp.sin(ang), jnp.cos(ang)


def t_embed(p: dict, t: jax.Array, dtype) -> jax.Array:
    """Timestep MLP on the cos-first sinusoid (rounded to the activation dtype as upstream)."""
    e = timestep_sinusoid(t, p["t_freqs"]).astype(dtype).astype(jnp.float32)
    e = jax.nn.silu(dense(e, p["t_embed"]["fc1"], jnp.float32))
    return dense(e, p["t_embed"]["fc2"], jnp.float32)


def distill_dt(num_steps: int, distill_interval: jax.Array | float) -> jax.Array:
    """The distill step-size input: num_steps / 2, or 8 / interval for the 12-step shortcut grid."""
    if num_steps == 12:
        return jnp.float32(8.0) / jnp.asarray(distill_interval, jnp.float32)
    return jnp.float32(num_steps / 2)


def caption_projection(p: dict, y: jax.Array, dtype) -> jax.Array:
    """The captions' cross-attention source silu(y W) [..., L, Dx]: constant over a run, so computed once per prompt."""
    return jax.nn.silu(dense(y.astype(jnp.float32), p["y_embed"]["xattn"], jnp.float32)).astype(dtype)


def cross_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, impl: str = "tiled") -> jax.Array:
    """Chunk r's queries [R, n, Hq, d] attend its own caption keys [R, L, G, d] where mask [R, L] is set."""
    if impl != "tiled":
        return attn.masked(q, k, v, mask > 0, impl)
    r, n, hq, d = q.shape
    g = k.shape[2]
    qg = q.reshape(r, n, g, hq // g, d)
    s = jnp.einsum("rngjd,rlgd->rgjnl", qg, k, preferred_element_type=jnp.float32) / math.sqrt(d)
    s = jnp.where(mask[:, None, None, None, :] > 0, s, -jnp.inf)
    pr = jax.nn.softmax(s, -1).astype(v.dtype)
    o = jnp.einsum("rgjnl,rlgd->rngjd", pr, v, preferred_element_type=jnp.float32)
    return o.reshape(r, n, hq, d).astype(q.dtype)


def forward_call(cfg: Magi1Config, p: dict, x: jax.Array, t: jax.Array, y: jax.Array, y_mask: jax.Array,
                 kv_range: jax.Array, buffer: tuple[jax.Array, jax.Array], slice_point: jax.Array | int,
                 num_steps: int, write_chunks: int, distill_interval: jax.Array | float = 1.0,
                 key_tile: int = 4096, with_intermediates: bool = False, buffer_mask: jax.Array | None = None,
                 write_start: jax.Array | None = None, capture_queries: int = 0, y_x: jax.Array | None = None,
                 constrain=None) -> tuple:
    """One upstream ``VideoDiTModel.forward`` of R chunks: velocity [C, T, H, W], new buffer, intermediates.

    ``kv_range`` [R, 2] indexes the reference's key space [rows 0..slice_point·ctn of the cache ; this
    call's rows]. ``buffer`` is (K, V) [layers, rows, G, d] with a static row count; its rows below
    ``slice_point·ctn`` are read, and rows from there receive this call's K/V (post norm and RoPE) for its
    first ``write_chunks`` chunks. ``slice_point`` may be traced, so one compiled call serves every chunk.
    A fixed-size (compressed) buffer passes ``buffer_mask`` [rows] (the buffer rows every query sees, in place
    of the reference ranges into the buffer) and ``write_start``. ``capture_queries`` > 0 returns the last that
    many query rows of every layer (post norm and RoPE) as ``inter["queries"]`` [layers, n, Hq, d].
    ``y_x``: the captions' projection (``caption_projection``) when the caller computed it once per prompt.
    ``constrain(x, logical_axes)``: the sharding hook (``flowcache_jax.sharding.Layout``; None on one device).
    Self-attention runs on ``cfg.attention_impl``: tiled over the key ranges, or fused per chunk over the keys the
    ranges select (``models.attention.masked``).
    """
    dt_ = cfg.jdtype
    c, tt, hh, ww = x.shape
    r = t.shape[0]
    hp, wp, frames = hh // cfg.patch_size, ww // cfg.patch_size, tt // cfg.t_patch_size
    s = frames * hp * wp
    ctn = s // r
    hq, g, hd, d = cfg.num_attention_heads, cfg.num_query_groups, cfg.kv_channels, cfg.hidden_size
    eps, one_p = cfg.layernorm_epsilon, cfg.apply_layernorm_1p
    n_buf = buffer[0].shape[1]
    c0 = jnp.asarray(slice_point, jnp.int32) * ctn

    tokens = patchify(cfg, x.astype(jnp.float32) * cfg.x_rescale_factor)
    h = dense(tokens, p["x_embed"], jnp.float32).astype(dt_)
    sin, cos = rope_table(p["rope_bands"], jnp.asarray(slice_point) * (frames // r), frames, hp, wp)
    e_t = t_embed(p, t, dt_)
    e_dt = t_embed(p, jnp.broadcast_to(distill_dt(num_steps, distill_interval), t.shape), dt_)
    c_y = dense(p["y_embed"]["null_caption"][-2].astype(jnp.float32), p["y_embed"]["adaln"], jnp.float32)
    cond = (e_t + e_dt + c_y).astype(dt_)  # [R, Dc]
    cmap = jnp.repeat(jnp.arange(r), ctn)
    y_x = caption_projection(p, y, dt_) if y_x is None else y_x.astype(dt_)  # [R, L, Dx]
    impl = attn.resolve(cfg.attention_impl, dt_)
    shard = constrain or (lambda a, axes: a)
    # The reference's key range [a, b) split into buffer rows [a, min(b, c0)) and own rows shifted past the buffer.
    a_, b_ = kv_range[:, 0].astype(jnp.int32), kv_range[:, 1].astype(jnp.int32)
    chunk_ranges = jnp.stack([jnp.stack([a_, jnp.minimum(b_, c0)], -1),
                              jnp.stack([jnp.maximum(a_, c0) - c0 + n_buf, b_ - c0 + n_buf], -1)], 1)  # [R, 2, 2]
    ranges = chunk_ranges[cmap]
    n_write = write_chunks * ctn
    w0 = c0 if write_start is None else jnp.asarray(write_start, jnp.int32)
    key_mask = None
    if buffer_mask is not None:  # the buffer segment comes from the mask, not from a range
        ranges = ranges.at[:, 0, 1].set(ranges[:, 0, 0])
        chunk_ranges = chunk_ranges.at[:, 0, 1].set(chunk_ranges[:, 0, 0])
        key_mask = jnp.concatenate([buffer_mask.astype(bool), jnp.zeros((s,), bool)])
    if impl != "tiled":  # the keys each chunk sees, as one mask row per chunk over [buffer ; own rows]
        j = jnp.arange(n_buf + s)
        seen = jnp.any((j[None, None] >= chunk_ranges[:, :, :1]) & (j[None, None] < chunk_ranges[:, :, 1:]), 1)
        seen = seen | (False if key_mask is None else key_mask[None])

    def layer(h, inputs):
        # The buffer is only read inside the layer loop; the new rows leave it as small per-layer outputs and
        # are written once afterwards, so the whole buffer is never copied (it can be updated in place).
        lp, li = inputs
        bk, bv = buffer[0][li], buffer[1][li]
        gates = jnp.tanh(dense(jax.nn.silu(cond.astype(jnp.float32)).astype(dt_), lp["gate"]).astype(jnp.float32))
        gates = gates.astype(dt_)
        g_attn, g_mlp = gates[:, :d][cmap], gates[:, d:][cmap]
        h = shard(h, ("tokens", "embed"))
        u = layer_norm(h, lp["pre_norm"]["scale"], lp["pre_norm"]["bias"], eps)
        q = dense(u, lp["q"]).reshape(s, hq, hd)
        k = dense(u, lp["k"]).reshape(s, g, hd)
        v = dense(u, lp["v"]).reshape(s, g, hd)
        qx = dense(u, lp["qx"]).reshape(s, hq, hd)
        q = rotate_half(layer_norm(q.astype(jnp.float32), lp["q_norm"]["scale"], lp["q_norm"]["bias"], eps, one_p),
                        sin[:, None], cos[:, None]).astype(dt_)
        k = rotate_half(layer_norm(k.astype(jnp.float32), lp["k_norm"]["scale"], lp["k_norm"]["bias"], eps, one_p),
                        sin[:, None], cos[:, None]).astype(dt_)
        q = shard(q, ("tokens", "heads", "head_dim"))
        k_all = shard(jnp.concatenate([bk.astype(dt_), k], 0), ("kv_tokens", "kv_heads", "head_dim"))
        v_all = shard(jnp.concatenate([bv.astype(dt_), v], 0), ("kv_tokens", "kv_heads", "head_dim"))
        if impl == "tiled":
            o_self = range_attention(q, k_all, v_all, ranges, key_tile, key_mask)
        else:
            o_self = attn.masked(q.reshape(r, ctn, hq, hd), *(jnp.broadcast_to(a[None], (r, *a.shape))
                                                              for a in (k_all, v_all)), seen, impl)
        o_self = o_self.reshape(s, hq * hd)
        qx = layer_norm(qx, lp["qx_norm"]["scale"], lp["qx_norm"]["bias"], eps, one_p)
        kx = layer_norm(dense(y_x, lp["kx"]).reshape(r, -1, g, hd), lp["kx_norm"]["scale"], lp["kx_norm"]["bias"],
                        eps, one_p)
        vx = dense(y_x, lp["vx"]).reshape(r, -1, g, hd)
        o_x = cross_attention(qx.reshape(r, ctn, hq, hd), kx, vx, y_mask, impl).reshape(s, hq * hd)
        a = dense(jnp.concatenate([o_self, o_x], -1).astype(jnp.float32), lp["proj"], jnp.float32)
        pn = lp["attn_post_norm"]
        h = (h.astype(jnp.float32) + layer_norm(a * g_attn.astype(jnp.float32), pn["scale"], pn["bias"], eps, one_p)
             ).astype(dt_)
        m = layer_norm(h, lp["mlp_norm"]["scale"], lp["mlp_norm"]["bias"], eps)
        z = dense(m, lp["fc1"]).astype(jnp.float32)
        if cfg.gated_linear_unit:  # SwiGLU: silu of the first half times the second
            act = jax.nn.silu(z[:, :cfg.ffn_hidden_size]) * z[:, cfg.ffn_hidden_size:]
        else:
            act = jax.nn.gelu(z, approximate=False)
        m = dense(act.astype(dt_), lp["fc2"])
        pn = lp["mlp_post_norm"]
        h = (h.astype(jnp.float32) + layer_norm(m.astype(jnp.float32) * g_mlp.astype(jnp.float32), pn["scale"],
                                                pn["bias"], eps, one_p)).astype(dt_)
        return h, (k[:n_write], v[:n_write], h if with_intermediates else None,
                   q[s - capture_queries:] if capture_queries else None)

    h, (rows_k, rows_v, layer_outs, queries) = jax.lax.scan(layer, h, (p["layers"], jnp.arange(cfg.num_layers)))
    new_k, new_v = buffer
    if n_write:
        zero = jnp.int32(0)
        new_k = jax.lax.dynamic_update_slice(new_k, rows_k.astype(new_k.dtype), (zero, w0, zero, zero))
        new_v = jax.lax.dynamic_update_slice(new_v, rows_v.astype(new_v.dtype), (zero, w0, zero, zero))
    hf = layer_norm(h.astype(jnp.float32), p["final_norm"]["scale"], p["final_norm"]["bias"], eps, one_p)
    out = dense(hf, p["final"], jnp.float32)
    vel = unpatchify(cfg, out, tt, hh, ww) / cfg.x_rescale_factor
    inter = {"queries": queries} if capture_queries else None
    if with_intermediates:
        inter = {"x_embed": tokens @ p["x_embed"]["kernel"], "rope_sin": sin, "rope_cos": cos, "temb_t": e_t,
                 "temb_dt": e_dt, "condition": cond, "y_xattn": y_x, "layer_out": layer_outs, "final_norm_out": hf,
                 "queries": queries}
    return vel, (new_k, new_v), inter


def empty_buffer(cfg: Magi1Config, rows: int, dtype=None) -> tuple[jax.Array, jax.Array]:
    """A zeroed (K, V) buffer [layers, rows, G, d]; rows must be >= 1 (shapes are static)."""
    z = jnp.zeros((cfg.num_layers, max(rows, 1), cfg.num_query_groups, cfg.kv_channels), dtype or cfg.jdtype)
    return z, z


# ----- the NNX module --------------------------------------------------------------------------------
class Magi1DiT(ParamsModule):
    """The MAGI-1 DiT as an NNX module: parameters as ``nnx.Param`` leaves of the layout above."""

    def __init__(self, cfg: Magi1Config, params: dict | None = None, *, rngs: nnx.Rngs | None = None):
        super().__init__(cfg, params, init_params, rngs)

    def __call__(self, x, t, y, y_mask, kv_range, buffer, slice_point, num_steps, write_chunks,
                 distill_interval=1.0) -> Any:
        return forward_call(self.cfg, self.param_dict(), x, t, y, y_mask, kv_range, buffer, slice_point, num_steps,
                            write_chunks, distill_interval)
