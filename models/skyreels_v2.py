"""SkyReels-V2 diffusion-forcing DiT (Wan 2.1 architecture) in JAX, with a Flax NNX module around it.

One forward denoises a window of latent frames, each frame at its own integer timestep (spec
skyreels_v2.md §2): per-frame 6-way adaLN from a learned table plus the time projection (and the fps
term of DF-1.3B), QK RMSNorm over the whole width, interleaved 3-D RoPE, self-attention that is full or
block-causal by frame blocks, cross-attention to the text without mask, GELU(tanh) FFN, per-frame head.
Parameters are a nested dict whose per-block leaves are stacked on a leading layer axis (one scan).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flowcache_jax.kv import compress as kvc
from models import attention as attn
from models.layers import ParamsModule, dense, layer_norm

# The released SkyReels-V2-DF-1.3B WanModel config (keys its loader ignores take the code defaults), spec §3.1.
SKYREELS_DF_1P3B = dict(model_type="t2v", dim=1536, ffn_dim=8960, freq_dim=256, in_dim=16, out_dim=16, num_heads=12,
                        num_layers=30, text_len=512, eps=1e-6, inject_sample_info=True)


@dataclasses.dataclass(frozen=True)
class SkyReelsConfig:
    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    freq_dim: int = 256
    text_dim: int = 4096
    in_dim: int = 16
    out_dim: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    inject_sample_info: bool = True  # the fps embedding of DF-1.3B
    dtype: str = "float32"  # activations, K/V buffers and text keys; the residual stream and norms stay float32
    attention_impl: str = "tiled"  # models.attention.IMPLEMENTATIONS (the tiled path is the parity reference)

    def __post_init__(self):
        attn.check(self.attention_impl)

    @classmethod
    def from_upstream(cls, config: dict, dtype: str = "float32") -> SkyReelsConfig:
        """From a WanModel kwargs dict (upstream ``config.json``); fields it leaves out keep the code defaults."""
        if config.get("model_type", "t2v") != "t2v":
            raise ValueError(f"model_type {config.get('model_type')!r} is not supported; only t2v")
        if not config.get("qk_norm", True) or not config.get("cross_attn_norm", True):
            raise ValueError("qk_norm and cross_attn_norm must be true (as in every released SkyReels-V2 model)")
        names = {f.name for f in dataclasses.fields(cls)} - {"dtype", "attention_impl"}
        kw = {k: v for k, v in config.items() if k in names}
        if "patch_size" in kw:
            kw["patch_size"] = tuple(kw["patch_size"])
        return cls(**kw, dtype=dtype)

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def patch_dim(self) -> int:
        return self.in_dim * math.prod(self.patch_size)


def param_shapes(cfg: SkyReelsConfig) -> dict:
    d, f, t = cfg.dim, cfg.ffn_dim, cfg.text_dim
    lin = lambda i, o: {"kernel": (i, o), "bias": (o,)}  # noqa: E731
    attn = lambda kv_in: {"q": lin(d, d), "k": lin(kv_in, d), "v": lin(kv_in, d), "o": lin(d, d),  # noqa: E731
                          "norm_q": {"scale": (d,)}, "norm_k": {"scale": (d,)}}
    layer = {"modulation": (6, d), "self_attn": attn(d), "norm3": {"scale": (d,), "bias": (d,)},
             "cross_attn": attn(d), "ffn": {"fc1": lin(d, f), "fc2": lin(f, d)}}
    out = {
        "patch": lin(cfg.patch_dim, d), "text": {"fc1": lin(t, d), "fc2": lin(d, d)},
        "time": {"fc1": lin(cfg.freq_dim, d), "fc2": lin(d, d)}, "time_proj": lin(d, 6 * d),
        "layers": jax.tree.map(lambda s: (cfg.num_layers, *s), layer, is_leaf=lambda x: isinstance(x, tuple)),
        "head": {"modulation": (2, d), **lin(d, cfg.out_dim * math.prod(cfg.patch_size))},
    }
    if cfg.inject_sample_info:
        out["fps_embedding"] = (2, d)
        out["fps_proj"] = {"fc1": lin(d, d), "fc2": lin(d, 6 * d)}
    return out


def init_params(cfg: SkyReelsConfig, key: jax.Array) -> dict:
    leaves, tree = jax.tree.flatten(param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(tree, [jax.random.normal(k, s) * 0.02 for k, s in zip(keys, leaves, strict=True)])


def timestep_table(freq_dim: int, max_t: int = 1000) -> np.ndarray:
    """[cos, sin] sinusoids of every integer timestep, computed in float64 as upstream and rounded once."""
    half = freq_dim // 2
    s = np.outer(np.arange(max_t + 1, dtype=np.float64), 10000.0 ** (-np.arange(half, dtype=np.float64) / half))
    return np.concatenate([np.cos(s), np.sin(s)], 1).astype(np.float32)


def rope_tables(head_dim: int, frames: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """(cos, sin) [frames·h·w, head_dim/2] of the interleaved 3-D RoPE, axes split c-2(c//3) / c//3 / c//3."""
    d = head_dim
    dims = (d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6))
    freqs = [1.0 / 10000.0 ** (np.arange(0, a, 2, dtype=np.float64) / a) for a in dims]
    grid = np.stack(np.meshgrid(np.arange(frames), np.arange(h), np.arange(w), indexing="ij"), -1).reshape(-1, 3)
    ang = np.concatenate([np.outer(grid[:, i], freqs[i]) for i in range(3)], 1).astype(np.float32)
    return np.cos(ang), np.sin(ang)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Adjacent pairs (2i, 2i+1) as complex numbers rotated by the token's angles; x [L, heads, d]."""
    xf = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    a, b = xf[..., 0], xf[..., 1]
    c, s = cos[:, None, :], sin[:, None, :]
    return jnp.stack([a * c - b * s, a * s + b * c], -1).reshape(x.shape).astype(x.dtype)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    xf = x.astype(jnp.float32)
    return (xf * jax.lax.rsqrt(jnp.mean(xf * xf, -1, keepdims=True) + eps) * scale).astype(x.dtype)


def patchify(cfg: SkyReelsConfig, x: jax.Array) -> jax.Array:
    """[C, F, H, W] -> [F'·H'·W', C·pt·ph·pw] tokens in (f, h, w) order, patch flattened as (c, kt, kh, kw)."""
    c, frames, hh, ww = x.shape
    pt, ph, pw = cfg.patch_size
    fp, hp, wp = frames // pt, hh // ph, ww // pw
    return x.astype(jnp.float32).reshape(c, fp, pt, hp, ph, wp, pw).transpose(1, 3, 5, 0, 2, 4, 6).reshape(
        fp * hp * wp, -1)


def text_embed(cfg: SkyReelsConfig, p: dict, context: jax.Array) -> jax.Array:
    """The text keys' source ``ctx`` [L, D]: the context MLP (constant over a run, so computed once)."""
    return dense(jax.nn.gelu(dense(context.astype(jnp.float32), p["text"]["fc1"], jnp.float32), approximate=True),
                 p["text"]["fc2"], jnp.float32).astype(jnp.dtype(cfg.dtype))


def sinusoid(freq_dim: int, t: jax.Array) -> jax.Array:
    """[cos, sin] sinusoids [F, freq_dim] of timesteps ``t`` [F] as upstream computes them in float64.

    Integer timesteps (SkyReels) index the float64 table; float ones (Self-Forcing's warped 937.5, 833.33...)
    split into an integer part from that table and a fraction r < 1 rotated in float32 (angle addition), so the
    large phases never lose their precision to float32 rounding.
    """
    table = jnp.asarray(timestep_table(freq_dim))
    t = jnp.asarray(t)
    if jnp.issubdtype(t.dtype, jnp.integer):
        return table[t.astype(jnp.int32)]
    half = freq_dim // 2
    n = jnp.clip(jnp.floor(t), 0, 1000).astype(jnp.int32)
    cn, sn = table[n, :half], table[n, half:]
    freqs = jnp.asarray(10000.0 ** (-np.arange(half, dtype=np.float64) / half), jnp.float32)
    a = (t.astype(jnp.float32) - n.astype(jnp.float32))[:, None] * freqs
    cr, sr = jnp.cos(a), jnp.sin(a)
    return jnp.concatenate([cn * cr - sn * sr, sn * cr + cn * sr], -1)


def time_conditions(cfg: SkyReelsConfig, p: dict, t: jax.Array, fps: int | jax.Array | None) -> dict:
    """Per-frame time embedding ``e`` [F, D] and modulation ``e0`` [F, 6, D] of timesteps ``t`` [F] (integer, or
    float for Self-Forcing); ``fps`` is read only with the fps embedding (``inject_sample_info``)."""
    d = cfg.dim
    sinus = sinusoid(cfg.freq_dim, t)
    e = dense(jax.nn.silu(dense(sinus, p["time"]["fc1"], jnp.float32)), p["time"]["fc2"], jnp.float32)
    proj = dense(jax.nn.silu(e), p["time_proj"], jnp.float32)
    e0 = proj.reshape(-1, 6, d)
    if cfg.inject_sample_info:
        fe = p["fps_embedding"][jnp.asarray(fps, jnp.int32)].astype(jnp.float32)
        fe = dense(jax.nn.silu(dense(fe, p["fps_proj"]["fc1"], jnp.float32)), p["fps_proj"]["fc2"], jnp.float32)
        e0 = e0 + fe.reshape(6, d)
    return {"e": e, "e0": e0, "time_proj": proj}


def cross_kv(cfg: SkyReelsConfig, p: dict, ctx: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Every block's cross-attention keys (after their RMSNorm) and values [layers, L, heads, hd] of one text:
    constant over a run, so computed once per prompt instead of once per block forward."""
    heads, hd, eps = cfg.num_heads, cfg.head_dim, cfg.eps

    def one(ca):
        kx = rms_norm(dense(ctx, ca["k"]), ca["norm_k"]["scale"], eps).reshape(-1, heads, hd)
        return kx, dense(ctx, ca["v"]).reshape(-1, heads, hd)

    return jax.vmap(one)(p["layers"]["cross_attn"])


def conditions(cfg: SkyReelsConfig, p: dict, t: jax.Array, context: jax.Array, fps: int | jax.Array) -> dict:
    """Text keys' source ``ctx``, per-frame time embedding ``e`` [F, D] and modulation ``e0`` [F, 6, D]."""
    return {"ctx": text_embed(cfg, p, context), **time_conditions(cfg, p, t, fps)}


def run_blocks(cfg: SkyReelsConfig, p: dict, h: jax.Array, e0: jax.Array, frame_of: jax.Array, ctx: jax.Array,
               cos: jax.Array, sin: jax.Array, ranges: jax.Array | None, key_tile: int = 4096,
               kv: tuple[jax.Array, jax.Array] | None = None, write_start: jax.Array | None = None,
               with_intermediates: bool = False, key_mask: jax.Array | None = None, compress: dict | None = None,
               keys: attn.Keys | None = None, constrain=None, self_attention: tuple | None = None) -> tuple:
    """The transformer blocks on tokens ``h`` [n, D] (frame of each token: ``frame_of`` into ``e0``).

    Without ``kv`` self-attention sees the call's own tokens within ``ranges``. With a K/V buffer
    [layers, rows, heads, hd] the tokens' K/V are written at ``write_start`` first and the ranges (or
    ``key_mask`` over the buffer rows) index the buffer: FlowCache's per-group forward, where a group sees the
    (possibly stale) slots of earlier groups. ``compress`` = {"rows": clean rows [Lk], "keep": first row of the
    slot that receives the kept tokens, "cfg": CompressConfig} compresses the clean rows in every layer with
    the tokens' own queries (spec flowcache §4.3); the kept indices are returned per layer.
    ``keys`` says what ``ranges`` / ``key_mask`` mean (full, a prefix, block-causal) so that a fused attention
    (``cfg.attention_impl``) gets its cheapest form; ``ctx`` is the text embedding [L, D] or its per-layer
    cross-attention (K, V) from ``cross_kv``. ``constrain(x, logical_axes)`` is the sharding hook (None: one device).
    ``self_attention`` = (fn, per-layer tree): the caller's own K/V store instead of a buffer (Self-Forcing's packed
    history): ``fn(q, k, v, layer_tree) -> (o [n, heads, hd], aux)`` with the tokens' post-RoPE ``k`` and raw ``v``
    (``aux``: anything per layer, e.g. a score of the keys, or None); the tokens' K/V of every layer are then
    returned in place of the buffer, and the stacked ``aux`` in place of the intermediates.
    """
    n, d = h.shape
    heads, hd, eps = cfg.num_heads, cfg.head_dim, cfg.eps
    dt_ = jnp.dtype(cfg.dtype)
    ones, zeros = jnp.ones((d,)), jnp.zeros((d,))
    shard = constrain or (lambda a, axes: a)
    if keys is None:
        keys = attn.Keys("full") if ranges is None and key_mask is None else attn.Keys(
            "ranges", ranges=ranges, key_mask=key_mask)
    elif key_mask is not None:
        raise ValueError("pass key_mask inside keys")
    if compress is not None and attn.resolve(cfg.attention_impl, dt_) != "tiled":
        raise ValueError("KV compression inside the blocks runs on the tiled attention only")
    pre_kv = isinstance(ctx, tuple)
    if self_attention is not None and kv is not None:
        raise ValueError("pass either a K/V buffer or a self_attention hook")
    xs = (p["layers"], jnp.arange(cfg.num_layers)) + ((ctx[0].astype(dt_), ctx[1].astype(dt_)) if pre_kv else ())
    xs = xs + ((self_attention[1],) if self_attention is not None else ())

    def block(h, inputs):
        lp, li = inputs[:2]
        h = shard(h, ("tokens", "embed"))
        m = lp["modulation"].astype(jnp.float32) + e0  # [F, 6, D]
        shift1, scale1, gate1, shift2, scale2, gate2 = (m[:, i][frame_of] for i in range(6))
        y = (layer_norm(h, ones, zeros, eps) * (1 + scale1) + shift1).astype(dt_)
        sa = lp["self_attn"]
        q = apply_rope(rms_norm(dense(y, sa["q"]), sa["norm_q"]["scale"], eps).reshape(n, heads, hd), cos, sin)
        k = apply_rope(rms_norm(dense(y, sa["k"]), sa["norm_k"]["scale"], eps).reshape(n, heads, hd), cos, sin)
        v = dense(y, sa["v"]).reshape(n, heads, hd)
        q = shard(q, ("tokens", "heads", "head_dim"))
        kept = (None, None, None)
        if kv is None:
            keys_, values = k, v
        else:
            keys_ = jax.lax.dynamic_update_slice_in_dim(kv[0][li], k.astype(kv[0].dtype), write_start, 0)
            values = jax.lax.dynamic_update_slice_in_dim(kv[1][li], v.astype(kv[1].dtype), write_start, 0)
            if compress is not None:
                kc, vc = keys_[compress["rows"]], values[compress["rows"]]
                idx, _ = kvc.select(kvc.scores(q, kc, compress["cfg"])["final"], compress["cfg"])
                kept = (kvc.gather(kc, idx), kvc.gather(vc, idx), idx)
                keys_ = jax.lax.dynamic_update_slice_in_dim(keys_, kept[0], compress["keep"], 0)
                values = jax.lax.dynamic_update_slice_in_dim(values, kept[1], compress["keep"], 0)
        aux = None
        if self_attention is not None:
            o, aux = self_attention[0](q, k, v, inputs[-1])
        else:
            keys_, values = (shard(a, ("kv_tokens", "kv_heads", "head_dim")) for a in (keys_, values))
            o = attn.attend(q, keys_, values, keys, cfg.attention_impl, key_tile)
        o = dense(o.reshape(n, d), sa["o"])
        h = h + o.astype(jnp.float32) * gate1
        xn = layer_norm(h, lp["norm3"]["scale"], lp["norm3"]["bias"], eps).astype(dt_)
        ca = lp["cross_attn"]
        qx = rms_norm(dense(xn, ca["q"]), ca["norm_q"]["scale"], eps).reshape(n, heads, hd)
        if pre_kv:
            kx, vx = inputs[2:4]
        else:
            kx = rms_norm(dense(ctx, ca["k"]), ca["norm_k"]["scale"], eps).reshape(-1, heads, hd)
            vx = dense(ctx, ca["v"]).reshape(-1, heads, hd)
        o_x = attn.attend(qx, kx, vx, attn.Keys("full"), cfg.attention_impl, key_tile)
        h = h + dense(o_x.reshape(n, d), ca["o"]).astype(jnp.float32)
        y = (layer_norm(h, ones, zeros, eps) * (1 + scale2) + shift2).astype(dt_)
        f = lp["ffn"]
        y = dense(jax.nn.gelu(dense(y, f["fc1"]).astype(jnp.float32), approximate=True).astype(dt_), f["fc2"])
        h = h + y.astype(jnp.float32) * gate2
        own = (k, v) if kv is not None or self_attention is not None else (None, None)
        return h, (aux if self_attention is not None else h if with_intermediates else None, *own, *kept)

    h, (outs, ks, vs, k_keep, v_keep, idx) = jax.lax.scan(block, h, xs)
    if self_attention is not None:
        return h, (ks, vs), outs
    if kv is not None:  # the tokens' K/V (and kept rows) go into the buffer once, after the layer loop
        zero = jnp.int32(0)
        kv = (jax.lax.dynamic_update_slice(kv[0], ks.astype(kv[0].dtype), (zero, write_start, zero, zero)),
              jax.lax.dynamic_update_slice(kv[1], vs.astype(kv[1].dtype), (zero, write_start, zero, zero)))
        if compress is not None:
            start = (zero, compress["keep"], zero, zero)
            kv = (jax.lax.dynamic_update_slice(kv[0], k_keep.astype(kv[0].dtype), start),
                  jax.lax.dynamic_update_slice(kv[1], v_keep.astype(kv[1].dtype), start))
            return h, kv, (outs, idx)
    return h, kv, outs


def head(cfg: SkyReelsConfig, p: dict, h: jax.Array, e: jax.Array, frame_of: jax.Array) -> jax.Array:
    """Per-frame shift/scale from the raw time embedding, then the output projection: [n, out·pt·ph·pw]."""
    d = cfg.dim
    hm = p["head"]["modulation"].astype(jnp.float32)
    shift, scale = (hm[0] + e)[frame_of], (hm[1] + e)[frame_of]
    y = layer_norm(h, jnp.ones((d,)), jnp.zeros((d,)), cfg.eps) * (1 + scale) + shift
    return dense(y, {"kernel": p["head"]["kernel"], "bias": p["head"]["bias"]}, jnp.float32)


def unpatchify(cfg: SkyReelsConfig, y: jax.Array, frames: int, hh: int, ww: int) -> jax.Array:
    pt, ph, pw = cfg.patch_size
    fp, hp, wp = frames // pt, hh // ph, ww // pw
    return y.reshape(fp, hp, wp, pt, ph, pw, cfg.out_dim).transpose(6, 0, 3, 1, 4, 2, 5).reshape(
        cfg.out_dim, frames, hh, ww)


def forward(cfg: SkyReelsConfig, p: dict, x: jax.Array, t: jax.Array, context: jax.Array, fps: int | jax.Array,
            causal_block_size: int = 0, key_tile: int = 4096, with_intermediates: bool = False, constrain=None
            ) -> tuple:
    """Velocity [C, F, H, W] of one window; ``t`` [F] integer timesteps; ``causal_block_size`` 0 = full attention."""
    c, frames, hh, ww = x.shape
    pt, ph, pw = cfg.patch_size
    fp, hp, wp = frames // pt, hh // ph, ww // pw
    hw, n = hp * wp, fp * hp * wp
    tok = patchify(cfg, x)
    h = dense(tok, p["patch"], jnp.float32)
    cond = conditions(cfg, p, t, context, fps)
    cos, sin = (jnp.asarray(a) for a in rope_tables(cfg.head_dim, fp, hp, wp))
    frame_of = jnp.arange(n) // hw
    keys = attn.Keys("blocks", block=causal_block_size * hw) if causal_block_size else attn.Keys("full")
    h, _, outs = run_blocks(cfg, p, h, cond["e0"], frame_of, cond["ctx"], cos, sin, None, key_tile,
                            with_intermediates=with_intermediates, keys=keys, constrain=constrain)
    y = head(cfg, p, h, cond["e"], frame_of)
    out = unpatchify(cfg, y, frames, hh, ww)
    inter = None
    if with_intermediates:
        inter = {"patch_embed": dense(tok, p["patch"], jnp.float32), "text_embed": cond["ctx"],
                 "time_embed": cond["e"], "time_proj": cond["time_proj"], "blocks": outs, "head": y}
    return out, inter


class SkyReelsDiT(ParamsModule):
    """The SkyReels-V2 DiT as an NNX module: parameters as ``nnx.Param`` leaves of the layout above."""

    def __init__(self, cfg: SkyReelsConfig, params: dict | None = None, *, rngs: nnx.Rngs | None = None):
        super().__init__(cfg, params, init_params, rngs)

    def __call__(self, x, t, context, fps, causal_block_size: int = 0):
        return forward(self.cfg, self.param_dict(), x, t, context, fps, causal_block_size)[0]
