"""FLOP counting: XLA's compiled cost analysis per chunk forward, times the forwards actually run."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax


def _flops(cost: Any) -> float:
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", 0.0))


def lowered_flops(fn: Callable, *args: Any) -> float:
    """FLOPs of the unoptimised HLO of ``jit(fn)`` (no compilation; args may be ShapeDtypeStructs)."""
    return _flops(jax.jit(fn).lower(*args).cost_analysis())


def compiled_flops(fn: Callable, *args: Any) -> float:
    """FLOPs XLA reports for ``jit(fn)(*args)`` after compilation (0 if the backend reports none).

    XLA counts the body of a while loop (``lax.scan``/``fori_loop``) once, whatever its trip count, so
    a model whose layers are scanned must be counted per layer and multiplied.
    """
    return _flops(jax.jit(fn).lower(*args).compile().cost_analysis())


def chunk_forward_flops(denoiser: Any, params: Any, cond: Any, batch: int, window: int) -> float:
    """Compiled FLOPs of one chunk forward of ``denoiser`` (mid-trajectory slot, empty KV)."""
    import jax.numpy as jnp

    from flowcache_jax.denoiser import SlotInfo

    x = jnp.zeros((batch, *denoiser.chunk_shape), jnp.float32)
    info = SlotInfo(jnp.int32(1), jnp.int32(1), jnp.float32(0.5), jnp.float32(0.01), jnp.int32(1), jnp.int32(2))
    kv = denoiser.init_kv(batch, window)
    return compiled_flops(lambda p, x, i, kv: denoiser.forward_chunk(p, cond, x, i, kv), params, x, info, kv)


def flops_report(per_forward: float, computed: int, vanilla: int, analytic_per_forward: float | None = None
                 ) -> dict[str, float]:
    """Run FLOPs (computed forwards) beside the uncached count; ratio = ideal speedup."""
    out = {"per_forward_compiled": per_forward, "computed": per_forward * computed,
           "vanilla": per_forward * vanilla, "ideal_speedup": vanilla / max(computed, 1)}
    if analytic_per_forward is not None:
        out["per_forward_analytic"] = float(analytic_per_forward)
    return out


def transformer_pass_flops(hidden: int, q_dim: int, kv_dim: int, ffn: int, layers: int, tokens: int, keys: int,
                           caption_tokens: int = 0, gated: bool = False) -> dict[str, float]:
    """Analytic FLOPs (2 per MAC) of one chunk pass of a MAGI-style DiT: big matmuls, self- and cross-attention.

    Linear: q, qx (hidden x q_dim), k, v (hidden x kv_dim), proj (2 q_dim x hidden), MLP (2 x hidden x ffn; a
    ``gated`` SwiGLU MLP has a 2·ffn-wide fc1, so 3 x hidden x ffn).
    Attention: QK^T and PV over ``keys`` keys, 4 * tokens * keys * q_dim per layer (GQA does not reduce it).
    """
    big = 2 * hidden * q_dim + 2 * hidden * kv_dim + 2 * q_dim * hidden + (3 if gated else 2) * hidden * ffn
    linear = 2.0 * big * tokens * layers
    attn = 4.0 * tokens * keys * q_dim * layers
    cross = (4.0 * tokens * caption_tokens * q_dim + 2.0 * caption_tokens * hidden * 2 * kv_dim) * layers
    return {"linear": linear, "attention": attn, "cross_attention": cross, "total": linear + attn + cross}
