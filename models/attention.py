"""Self- and cross-attention behind one knob: the fused kernel where its masks can say what the model needs.

``attention`` is one of ``IMPLEMENTATIONS``:

- ``"tiled"``: ``models.layers.range_attention``, the hand-written online softmax over key tiles. It takes any
  per-query key ranges and is the parity reference.
- ``"xla"`` / ``"cudnn"``: ``jax.nn.dot_product_attention`` with that implementation (cuDNN flash attention on a
  GPU needs bf16/fp16 operands and masks it can express: none, or per-batch key lengths).
- ``"fused"``: cuDNN on a GPU for bf16/fp16 operands, XLA otherwise.

The models say what their masks *are* (``Keys``), not only which keys each query sees, so each implementation
gets its cheapest form: full attention is one call; a prefix of a key buffer (SkyReels' per-block forward) is
one call with a key length; block-causal attention over a window is one call per block on static key slices (the
masked-out upper triangle is never computed); arbitrary key sets (MAGI-1's buffer rows plus own rows) are split
by query group: XLA takes them as a mask, cuDNN as a per-group compaction of the visible keys to a prefix.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from models.layers import range_attention

IMPLEMENTATIONS = ("fused", "xla", "cudnn", "tiled")


def check(attention: str) -> str:
    if attention not in IMPLEMENTATIONS:
        raise ValueError(f"attention must be one of {', '.join(IMPLEMENTATIONS)}, got {attention!r}")
    return attention


def resolve(attention: str, dtype) -> str:
    """The implementation a knob value runs with for operands of ``dtype`` on the default backend."""
    check(attention)
    if attention != "fused":
        return attention
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    return "cudnn" if jax.default_backend() == "gpu" and half else "xla"


@dataclasses.dataclass(frozen=True)
class Keys:
    """Which keys the queries of one attention call see.

    kind ``"full"``: all of them. ``"prefix"``: keys [0, ``length``) (a traced scalar). ``"blocks"``: queries and
    keys are the same window cut into blocks of ``block`` tokens, block b sees keys [0, (b + 1)·block).
    ``"ranges"``: per-query half-open ``ranges`` [S, n, 2] (plus ``key_mask`` [L], keys every query sees) — the
    tiled path's general form; the fused paths take it only through a dense mask (small shapes, XLA).
    ``"mask"``: the keys where ``key_mask`` [L] is set, for every query (a ring buffer's filled rows): cuDNN gets
    them compacted to a prefix.
    """

    kind: str = "full"
    length: jax.Array | None = None
    block: int = 0
    ranges: jax.Array | None = None
    key_mask: jax.Array | None = None

    def as_ranges(self, s: int) -> jax.Array | None:
        """The same key sets as per-query ranges [S, n, 2] for ``range_attention`` (None: every key)."""
        if self.kind == "full":
            return None
        if self.kind == "prefix":
            return jnp.broadcast_to(jnp.stack([jnp.int32(0), jnp.asarray(self.length, jnp.int32)]), (s, 1, 2))
        if self.kind == "blocks":
            end = (jnp.arange(s) // self.block + 1) * self.block
            return jnp.stack([jnp.zeros_like(end), end], -1)[:, None, :].astype(jnp.int32)
        if self.kind == "mask":  # no range: the key mask alone says what is seen
            return jnp.zeros((s, 1, 2), jnp.int32)
        return self.ranges


def attend(q: jax.Array, k: jax.Array, v: jax.Array, keys: Keys, attention: str = "tiled",
           key_tile: int = 4096) -> jax.Array:
    """q [S, Hq, d], k / v [L, G, d] (GQA by consecutive head groups) -> [S, Hq, d] in q's dtype."""
    impl = resolve(attention, q.dtype)
    if impl == "tiled":
        return range_attention(q, k, v, keys.as_ranges(q.shape[0]), key_tile, keys.key_mask)
    k, v = k.astype(q.dtype), v.astype(q.dtype)
    if keys.kind == "full":
        return _sdpa(q[None], k[None], v[None], impl)[0]
    if keys.kind == "prefix":
        return _sdpa(q[None], k[None], v[None], impl, lengths=jnp.asarray(keys.length, jnp.int32)[None])[0]
    if keys.kind == "blocks":
        b, s = keys.block, q.shape[0]
        outs = [_sdpa(q[None, i:i + b], k[None, :i + b], v[None, :i + b], impl)[0] for i in range(0, s, b)]
        return jnp.concatenate(outs, 0)
    if keys.kind == "mask":
        return masked(q[None], k[None], v[None], keys.key_mask[None], impl)[0]
    if impl == "cudnn":
        raise ValueError("cuDNN attention cannot express arbitrary per-query key ranges; use attention=xla or tiled")
    j = jnp.arange(k.shape[0])
    r = keys.ranges
    ok = jnp.any((j[None, None, :] >= r[:, :, 0:1]) & (j[None, None, :] < r[:, :, 1:2]), axis=1)
    if keys.key_mask is not None:
        ok = ok | keys.key_mask[None, :]
    return _sdpa(q[None], k[None], v[None], impl, mask=ok[None, None])[0]


def masked(q: jax.Array, k: jax.Array, v: jax.Array, ok: jax.Array, attention: str, compact: bool = False
           ) -> jax.Array:
    """Attention of query groups q [R, T, Hq, d] over their keys k / v [R, L, G, d], group r seeing the keys where
    ``ok`` [R, L] is set (every group must see one): [R, T, Hq, d].

    cuDNN masks only by key length, so its keys are compacted per group (a stable sort puts the visible keys first;
    softmax does not care about order) and cut at their count; XLA takes the mask as it is (``compact`` runs the
    cuDNN form through XLA: how the compaction is checked where there is no GPU).
    """
    impl = resolve(attention, q.dtype)
    if impl == "tiled":
        raise ValueError("masked() is a fused path; the tiled path takes ranges (attend)")
    k, v = k.astype(q.dtype), v.astype(q.dtype)
    if impl == "cudnn" or compact:
        order = jnp.argsort(~ok, axis=-1, stable=True)[..., None, None]
        k, v = (jnp.take_along_axis(a, order, axis=1) for a in (k, v))
        return _sdpa(q, k, v, impl, lengths=ok.sum(-1).astype(jnp.int32))
    return _sdpa(q, k, v, impl, mask=ok[:, None, None, :])


def _sdpa(q: jax.Array, k: jax.Array, v: jax.Array, impl: str, lengths: jax.Array | None = None,
          mask: jax.Array | None = None) -> jax.Array:
    return jax.nn.dot_product_attention(q, k, v, mask=mask, key_value_seq_lengths=lengths, implementation=impl)
