"""Shared building blocks (pure functions over arrays): norms, sinusoids, RoPE, masked attention.

Attention always spans a static key array with per-query key ranges, so the caller never slices keys to
data-dependent lengths. Long key arrays are processed in tiles with an online softmax, so the score
matrix [heads, S, Lk] is never materialised at full size.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float, one_plus: bool = False) -> jax.Array:
    """LayerNorm over the last axis in float32 (biased variance); ``one_plus`` uses (1 + scale) as MAGI's 1p norms."""
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    var = jnp.square(xf - mean).mean(-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + eps)
    g = scale.astype(jnp.float32)
    g = 1.0 + g if one_plus else g
    return (y * g + bias.astype(jnp.float32)).astype(x.dtype)


def dense(x: jax.Array, p: dict, dtype=None) -> jax.Array:
    """x @ kernel (+ bias); PyTorch Linear weights are stored transposed as ``kernel`` [in, out]."""
    dtype = dtype or x.dtype
    y = jnp.matmul(x.astype(dtype), p["kernel"].astype(dtype), preferred_element_type=jnp.float32)
    if "bias" in p:
        y = y + p["bias"].astype(jnp.float32)
    return y.astype(dtype)


def sinusoid_freqs(half: int, max_period: float = 10000.0) -> np.ndarray:
    """exp(-ln(max_period) * i / half) in float32, correctly rounded from float64."""
    return np.exp(-math.log(max_period) * np.arange(half, dtype=np.float64) / half).astype(np.float32)


def timestep_sinusoid(t: jax.Array, freqs: jax.Array, scale: float = 1000.0) -> jax.Array:
    """[cos(a), sin(a)] with a = (t * freqs) * scale in float32, in that order (the reference's rounding)."""
    a = (t.astype(jnp.float32)[..., None] * freqs) * jnp.float32(scale)
    return jnp.concatenate([jnp.cos(a), jnp.sin(a)], -1)


def rotate_half(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
    """GPT-NeoX rotary on the first 2·n dims of the last axis (n = sin.shape[-1]); the rest passes through."""
    n = sin.shape[-1]
    a, b, rest = x[..., :n], x[..., n:2 * n], x[..., 2 * n:]
    xf = [v.astype(jnp.float32) for v in (a, b)]
    out = jnp.concatenate([xf[0] * cos - xf[1] * sin, xf[1] * cos + xf[0] * sin], -1).astype(x.dtype)
    return jnp.concatenate([out, rest], -1)


def _scores(q: jax.Array, k: jax.Array) -> jax.Array:
    """q [S, G, r, d], k [L, G, d] -> [G, r, S, L] in float32."""
    return jnp.einsum("sgrd,lgd->grsl", q, k, preferred_element_type=jnp.float32)


def _in_ranges(j: jax.Array, ranges: jax.Array) -> jax.Array:
    """[S, T] mask: key j lies in one of the query's half-open ranges ([S, n, 2])."""
    lo, hi = ranges[:, :, 0][:, :, None], ranges[:, :, 1][:, :, None]
    return jnp.any((j[None, None, :] >= lo) & (j[None, None, :] < hi), axis=1)


def range_attention(q: jax.Array, k: jax.Array, v: jax.Array, ranges: jax.Array | None, key_tile: int = 4096,
                    key_mask: jax.Array | None = None) -> jax.Array:
    """Softmax attention where query i sees the keys in its ranges; GQA by consecutive head groups.

    q [S, Hq, d], k/v [L, G, d], ranges [S, n, 2] int32 half-open (None: every query sees every key, no mask).
    Returns [S, Hq, d] in q's dtype. Every query must have at least one key; ``key_mask`` [L] (optional) adds
    keys every query sees. Keys are processed in tiles of ``key_tile`` with an online softmax.
    """
    s, hq, d = q.shape
    length, g, _ = k.shape
    qg = q.reshape(s, g, hq // g, d)
    scale = 1.0 / math.sqrt(d)  # applied to the fp32 scores, not to (bf16) queries

    def tile(carry, start):
        kt = jax.lax.dynamic_slice_in_dim(k, start, key_tile)
        vt = jax.lax.dynamic_slice_in_dim(v, start, key_tile)
        ok = _in_ranges(start + jnp.arange(key_tile), ranges)  # [S, T]
        if key_mask is not None:
            ok = ok | jax.lax.dynamic_slice_in_dim(key_mask, start, key_tile)[None, :]

        def attend(carry):
            m, l_sum, acc = carry
            sc = jnp.where(ok, _scores(qg, kt) * scale, -jnp.inf)
            m_new = jnp.maximum(m, sc.max(-1))
            safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
            p = jnp.exp(sc - safe[..., None])
            corr = jnp.exp(jnp.where(jnp.isfinite(m), m - safe, -jnp.inf))
            l_sum = l_sum * corr + p.sum(-1)
            acc = acc * corr[..., None] + jnp.einsum("grsl,lgd->grsd", p.astype(v.dtype), vt,
                                                     preferred_element_type=jnp.float32)
            return m_new, l_sum, acc

        # A tile no query may see is skipped for real (a scalar-predicated cond, not a select).
        return jax.lax.cond(jnp.any(ok), attend, lambda c: c, carry), None

    if ranges is None and key_mask is None and length <= key_tile:  # unmasked: plain softmax
        p = jax.nn.softmax(_scores(qg, k) * scale, axis=-1)
        out = jnp.einsum("grsl,lgd->grsd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return out.transpose(2, 0, 1, 3).reshape(s, hq, d).astype(q.dtype)
    if ranges is None:
        ranges = jnp.broadcast_to(jnp.asarray([0, length], jnp.int32), (s, 1, 2))
    if length <= key_tile:  # one tile: plain masked softmax
        ok = _in_ranges(jnp.arange(length), ranges)
        if key_mask is not None:
            ok = ok | key_mask[None, :]
        p = jax.nn.softmax(jnp.where(ok, _scores(qg, k) * scale, -jnp.inf), axis=-1)
        out = jnp.einsum("grsl,lgd->grsd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    else:
        pad = (-length) % key_tile
        k = jnp.pad(k, ((0, pad), (0, 0), (0, 0)))
        v = jnp.pad(v, ((0, pad), (0, 0), (0, 0)))
        key_mask = None if key_mask is None else jnp.pad(key_mask, (0, pad))
        shape = (g, hq // g, s)
        init = (jnp.full(shape, -jnp.inf), jnp.zeros(shape), jnp.zeros(shape + (d,)))
        (m, l_sum, acc), _ = jax.lax.scan(tile, init, jnp.arange(0, length + pad, key_tile))
        out = acc / l_sum[..., None]
    return out.transpose(2, 0, 1, 3).reshape(s, hq, d).astype(q.dtype)


def cast_tree(params: dict, param_dtype: str, half, rest_dtype=None) -> dict:
    """Weights stored in ``param_dtype`` ("" returns them as they are): the leaves ``half(path, leaf)`` selects take
    it ('/'-joined path), the others keep their dtype, or ``rest_dtype`` when given. Host arrays stay on the host."""
    if not param_dtype:
        return params
    dt = jnp.dtype(param_dtype)

    def one(path, a):
        if half("/".join(str(getattr(k, "key", k)) for k in path), a):
            return a.astype(dt)
        return a if rest_dtype is None else a.astype(rest_dtype)

    return jax.tree_util.tree_map_with_path(one, params)


def dit_half_precision_leaf(path: str) -> bool:
    """The DiTs' storage rule ('/'-joined parameter path): the transformer blocks (``layers/...``) take the weight
    dtype; the embedders, the head and the tables stay float32, where MAGI-1 and Wan apply them (also what
    ``converters`` write with ``--dtype=bf16``)."""
    return path.startswith("layers/")


def cast_params(params: dict, param_dtype: str) -> dict:
    """A DiT's weights in ``param_dtype`` by ``dit_half_precision_leaf`` ("" returns them as they are)."""
    return cast_tree(params, param_dtype, lambda path, a: dit_half_precision_leaf(path))


class ParamsModule(nnx.Module):
    """A model's nested parameter dict held as ``nnx.Param`` leaves; the forward stays a pure function."""

    def __init__(self, cfg, params: dict | None, init_fn, rngs: nnx.Rngs | None):
        self.cfg = cfg
        if params is None:
            params = init_fn(cfg, (rngs or nnx.Rngs(0)).params())
        self.params = nnx.data(jax.tree.map(nnx.Param, params))

    def param_dict(self) -> dict:
        return jax.tree.map(lambda v: v[...], self.params, is_leaf=lambda v: isinstance(v, nnx.Variable))
