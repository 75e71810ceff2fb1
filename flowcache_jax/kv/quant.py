"""KV quantization primitives: the study's symmetric group RTN (spec/self_forcing.md §4) and bit packing.

RTN, for x [B, L, H, D]: tokens are zero-padded to a multiple of ``group`` (16) and cut into groups; one
scale per (group, head, channel). The scale is computed in the input's dtype (``max(absmax / qmax, 1e-8)``),
the codes with that scale, but only its float16 cast is stored, and dequantization multiplies by the float16
scale in the target dtype. That asymmetry is the study's; keeping it lets a port match its goldens bit for
bit (tests/test_kv_quant.py against the kv_quant fixture). The study stores one int8 per code and only
*accounts* for packed bytes; ``pack``/``unpack`` make the packing real (two INT4 or four INT2 per byte).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

BITS = (2, 4, 8)
EPS = 1e-8


def qmax(bits: int) -> int:
    """Largest positive code: 2^(bits-1) - 1 (the negative end is -qmax - 1 but RTN never reaches it)."""
    return (1 << (bits - 1)) - 1


def _check_bits(bits: int) -> None:
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")


def round_to(x: jax.Array, dtype) -> jax.Array:
    """Round float32 ``x`` to ``dtype``'s precision (nearest even), still as float32.

    bfloat16 uses integer bit arithmetic so that XLA's excess-precision rewrites (which may drop an
    f32 -> bf16 -> f32 convert pair inside a fusion) cannot skip a rounding the reference performs.
    """
    dtype = jnp.dtype(dtype)
    if dtype == jnp.float32:
        return x
    if dtype == jnp.bfloat16:
        u = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
        u = (u + jnp.uint32(0x7FFF) + ((u >> 16) & jnp.uint32(1))) & jnp.uint32(0xFFFF0000)
        return jax.lax.bitcast_convert_type(u, jnp.float32)
    return x.astype(dtype).astype(jnp.float32)


def quantize_groups(x: jax.Array, bits: int, group: int = 16) -> tuple[jax.Array, jax.Array, int]:
    """x [B, L, H, D] -> (codes int8 [B, nb, group, H, D], scales float16 [B, nb, 1, H, D], pad_len).

    Arithmetic happens in x's own dtype, each step rounded as the reference's torch ops on that dtype are
    (so bf16 input gets a bf16 scale and bf16 ``x / scale`` before rounding to the code; the kv_quant
    fixture's ``rtn_int4_bf16`` case pins this). Codes use that scale, the stored one is its float16 cast.
    Rounding to codes is half to even, like ``torch.round``.
    """
    _check_bits(bits)
    dt = jnp.dtype(x.dtype)
    b, length, h, d = x.shape
    pad = (-length) % group
    xf = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, pad), (0, 0), (0, 0)))
    xb = xf.reshape(b, (length + pad) // group, group, h, d)
    q = qmax(bits)
    eps = float(np.asarray(EPS, dt))  # torch's clamp_min(1e-8) compares in the input dtype
    scale = jnp.maximum(round_to(jnp.max(jnp.abs(xb), axis=2, keepdims=True) / q, dt), eps)
    codes = jnp.clip(jnp.round(round_to(xb / scale, dt)), -q - 1, q).astype(jnp.int8)
    return codes, scale.astype(jnp.float16), pad


def dequantize_groups(codes: jax.Array, scales: jax.Array, length: int, dtype) -> jax.Array:
    """codes [B, nb, group, H, D] * float16 scales (both cast to ``dtype`` first) -> [B, length, H, D]."""
    b, nb, g, h, d = codes.shape
    x = codes.astype(dtype) * scales.astype(dtype)
    return x.reshape(b, nb * g, h, d)[:, :length]


def study_memory_bytes(length: int, batch: int, heads: int, dim: int, key_bits: int, value_bits: int,
                       group: int = 16) -> int:
    """The study's accounted bytes of an RTN-quantized K/V pair (codes as if packed, padding included)."""
    nb = math.ceil(length / group)
    codes = batch * nb * group * heads * dim
    scales = batch * nb * heads * dim
    return sum(math.ceil(codes * bits / 8) + 2 * scales for bits in (key_bits, value_bits))


def pack(codes: jax.Array, bits: int) -> jax.Array:
    """int8 codes [..., D] -> uint8 [..., D * bits // 8]: two's complement fields, element j at bit j * bits.

    Fields are little-endian inside a byte (code 2i in the low nibble for INT4), so unpacking is shifts
    and masks on whole bytes, cheap enough to do per key tile inside attention.
    """
    _check_bits(bits)
    per = 8 // bits
    d = codes.shape[-1]
    if d % per:
        raise ValueError(f"last axis {d} is not a multiple of {per} ({bits}-bit codes per byte)")
    fields = codes.astype(jnp.uint8) & jnp.uint8((1 << bits) - 1)
    if per == 1:
        return fields
    fields = fields.reshape(codes.shape[:-1] + (d // per, per))
    shifts = (jnp.arange(per, dtype=jnp.uint8) * bits).astype(jnp.uint8)
    return jnp.bitwise_or.reduce(fields << shifts, axis=-1).astype(jnp.uint8)


def unpack(packed: jax.Array, bits: int, dim: int) -> jax.Array:
    """uint8 [..., dim * bits // 8] -> int8 codes [..., dim] (inverse of ``pack``, sign-extended)."""
    _check_bits(bits)
    per = 8 // bits
    if packed.shape[-1] * per != dim:
        raise ValueError(f"{packed.shape[-1]} bytes of {bits}-bit codes do not hold {dim} values")
    if per == 1:
        return jax.lax.bitcast_convert_type(packed, jnp.int8)
    shifts = (jnp.arange(per, dtype=jnp.uint8) * bits).astype(jnp.uint8)
    fields = (packed[..., None] >> shifts) & jnp.uint8((1 << bits) - 1)
    # Move the field to the top of the byte, reinterpret as int8, arithmetic shift back: sign extension.
    top = jax.lax.bitcast_convert_type((fields << jnp.uint8(8 - bits)).astype(jnp.uint8), jnp.int8)
    return (top >> jnp.int8(8 - bits)).reshape(packed.shape[:-1] + (dim,))
