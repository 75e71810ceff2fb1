"""A fixed-shape KV buffer for chunked AR models: memory stays bounded for any video length.

Layout (``Layout``): rows [0, B) hold the history (before the first compression: chunks 0..b-1 verbatim,
B = b·ctn; afterwards the compressed history); chunks from b on live in a ring of ``window`` chunk slots
after it, so nothing is ever moved. Per row the buffer keeps its owner (a chunk id, ``COMPRESSED`` —
older than every active chunk — or ``EMPTY``) and, per layer and KV head, the absolute frame index of the
token it holds (compression keeps different tokens per head; kept keys keep their RoPE positions).
All operations are pure; K/V themselves are written by the model inside its layer loop.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from flowcache_jax.kv import compress as kvc

EMPTY, COMPRESSED = -1, -2


@dataclasses.dataclass(frozen=True)
class Layout:
    tokens_per_chunk: int
    frames_per_chunk: int
    window: int
    history_chunks: int  # b

    @property
    def history_rows(self) -> int:
        return self.history_chunks * self.tokens_per_chunk

    @property
    def rows(self) -> int:
        return (self.history_chunks + self.window) * self.tokens_per_chunk

    def slot_start(self, chunk: jax.Array) -> jax.Array:
        b, ctn = self.history_chunks, self.tokens_per_chunk
        return jnp.where(chunk < b, chunk * ctn, b * ctn + ((chunk - b) % self.window) * ctn).astype(jnp.int32)


@struct.dataclass
class KVBuffer:
    k: jax.Array  # [layers, rows, kv_heads, head_dim]
    v: jax.Array
    owner: jax.Array  # int32 [rows]
    frame: jax.Array  # int32 [layers, kv_heads, rows]: absolute latent frame of the token (RoPE position)


def empty(layout: Layout, layers: int, kv_heads: int, head_dim: int, dtype) -> KVBuffer:
    z = jnp.zeros((layers, layout.rows, kv_heads, head_dim), dtype)
    return KVBuffer(k=z, v=z, owner=jnp.full((layout.rows,), EMPTY, jnp.int32),
                    frame=jnp.full((layers, kv_heads, layout.rows), -1, jnp.int32))


def read_mask(buf: KVBuffer, chunk: jax.Array, first: jax.Array | None) -> jax.Array:
    """Rows a forward of ``chunk`` sees: chunks in [first, chunk) and, when first == 0, the compressed history.

    ``first`` None: no rows (a chunk that attends only to itself).
    """
    if first is None:
        return jnp.zeros_like(buf.owner, bool)
    return ((buf.owner == COMPRESSED) & (first == 0)) | ((buf.owner >= first) & (buf.owner < chunk))


def mark_written(buf: KVBuffer, layout: Layout, chunk: jax.Array) -> KVBuffer:
    """Record that ``chunk``'s K/V now fill its slot (ownership and token frames)."""
    ctn, start = layout.tokens_per_chunk, layout.slot_start(chunk)
    owner = jax.lax.dynamic_update_slice_in_dim(buf.owner, jnp.full((ctn,), chunk, jnp.int32), start, 0)
    local = jnp.arange(ctn) // (ctn // layout.frames_per_chunk)  # tokens are frame-major
    frames = jnp.broadcast_to(chunk * layout.frames_per_chunk + local, buf.frame.shape[:2] + (ctn,))
    frame = jax.lax.dynamic_update_slice_in_dim(buf.frame, frames.astype(jnp.int32), start, 2)
    return buf.replace(owner=owner, frame=frame)


def compact(buf: KVBuffer, layout: Layout, chunk: jax.Array, queries: jax.Array, cfg: kvc.CompressConfig
            ) -> tuple[KVBuffer, jax.Array]:
    """History ++ ``chunk``'s slot -> the top-B rows per layer and KV head, written to [0, B); frees the slot.

    ``queries`` [layers, Lq, Hq, d] score the keys. Returns the buffer and the kept indices [layers, G, B]
    (into the concatenation [history rows ; chunk rows]).
    """
    ctn, b = layout.tokens_per_chunk, layout.history_rows
    cfg = dataclasses.replace(cfg, budget=b)
    start = layout.slot_start(chunk)

    def layer(_, xs):
        k, v, f, q = xs
        kc = jnp.concatenate([k[:b], jax.lax.dynamic_slice_in_dim(k, start, ctn)])
        vc = jnp.concatenate([v[:b], jax.lax.dynamic_slice_in_dim(v, start, ctn)])
        fc = jnp.concatenate([f[:, :b], jax.lax.dynamic_slice_in_dim(f, start, ctn, 1)], 1)  # [G, B + ctn]
        idx, _ = kvc.select(kvc.scores(q, kc, cfg)["final"], cfg)
        return None, (kvc.gather(kc, idx), kvc.gather(vc, idx), jnp.take_along_axis(fc, idx, 1), idx)

    _, (k_new, v_new, f_new, idx) = jax.lax.scan(layer, None, (buf.k, buf.v, buf.frame, queries))
    owner = buf.owner.at[:b].set(COMPRESSED)
    owner = jax.lax.dynamic_update_slice_in_dim(owner, jnp.full((ctn,), EMPTY, jnp.int32), start, 0)
    frame = jax.lax.dynamic_update_slice_in_dim(buf.frame.at[:, :, :b].set(f_new),
                                                jnp.full(buf.frame.shape[:2] + (ctn,), -1, jnp.int32), start, 2)
    k = buf.k.at[:, :b].set(k_new.astype(buf.k.dtype))
    v = buf.v.at[:, :b].set(v_new.astype(buf.v.dtype))
    return buf.replace(k=k, v=v, owner=owner, frame=frame), idx


def nbytes(buf: KVBuffer) -> int:
    return int(buf.k.size * buf.k.dtype.itemsize + buf.v.size * buf.v.dtype.itemsize)
