"""T5 v1.1 / umT5 text encoders (MAGI-1's t5-v1_1-xxl, Wan2.1/SkyReels-V2's umt5-xxl) in JAX, with an NNX wrapper.

One block type serves both (spec text_and_vae.md §1, §2): T5 RMSNorm in float32 (no mean subtraction), pre-norm
residuals, unscaled self-attention without biases plus a relative-position bias from bidirectional log buckets,
a gated tanh-GELU FFN and a final norm; no embedding scaling. T5 v1.1 computes the bias from block 0's table and
shares it (``shared_pos=True``); umT5 has a table per layer. The padding mask is added as finfo(float32).min
(as upstream), which is exact because every row has at least one valid key (the ``</s>``).

Precision (``T5Config.dtype`` / ``param_dtype``): ``dtype`` is the compute dtype: the operands of every matmul
(q/k/v/o, wi_0/wi_1/wo) and of the attention products (q k^T, p v) and the matmul outputs are rounded to it,
accumulation is float32 (``preferred_element_type``). What upstream computes in float32 stays float32 here:
the RMSNorms (HF/Wan take the variance in float32), the attention logits + position bias + mask and the softmax
(both upstreams do ``softmax(scores.float())``), the GELU gate and the residual stream (upstream bf16 keeps the
residual in bf16; float32 here is the more accurate side of that choice). ``param_dtype`` is the storage dtype of
the weights, applied once by ``cast_params``: the matmul kernels and the embedding table go to ``param_dtype``;
norm scales and the relative-position bias tables stay float32 (they are added / multiplied in float32 and are
0.004% of umT5-XXL's parameters). "" keeps the given arrays as they are (a bf16 checkpoint stays bf16).

Parameters are a nested dict whose per-block leaves are stacked on a leading layer axis (one ``lax.scan``):

    embed [V, D]                      pos_bias [buckets, H]          (shared_pos only)
    layers/norm1/scale [L, D]         layers/attn/{q,k,v}/kernel [L, D, H*dk]   layers/attn/o/kernel [L, H*dk, D]
    layers/pos_bias [L, buckets, H]   (per-layer bias only)
    layers/norm2/scale [L, D]         layers/ffn/{wi_0,wi_1}/kernel [L, D, F]   layers/ffn/wo/kernel [L, F, D]
    final_norm/scale [D]
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.layers import ParamsModule, cast_tree

# Real sizes in transformers config form (for abstract full-size checks: parameter counts, memory, shapes).
T5_V1_1_XXL = dict(model_type="t5", architectures=["T5EncoderModel"], vocab_size=32128, d_model=4096, d_kv=64,
                   num_heads=64, d_ff=10240, num_layers=24, relative_attention_num_buckets=32,
                   relative_attention_max_distance=128, layer_norm_epsilon=1e-6, feed_forward_proj="gated-gelu",
                   dense_act_fn="gelu_new", is_gated_act=True, tie_word_embeddings=False, pad_token_id=0,
                   eos_token_id=1)
UMT5_XXL = dict(T5_V1_1_XXL, model_type="umt5", architectures=["UMT5EncoderModel"], vocab_size=256384)


@dataclasses.dataclass(frozen=True)
class T5Config:
    vocab_size: int
    d_model: int
    d_kv: int
    num_heads: int
    d_ff: int
    num_layers: int
    num_buckets: int = 32
    max_distance: int = 128
    eps: float = 1e-6
    shared_pos: bool = dataclasses.field(kw_only=True)  # True: T5 v1.1 (block 0's table shared); False: umT5
    dtype: str = "float32"  # compute dtype of the matmul operands (float32 | bfloat16); see the module docstring
    param_dtype: str = ""  # storage dtype of kernels / embedding ("" = as given); norms and bias tables stay f32

    def __post_init__(self):
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")
        if self.param_dtype not in ("", "float32", "bfloat16"):
            raise ValueError(f"param_dtype must be '', float32 or bfloat16, got {self.param_dtype!r}")

    @classmethod
    def from_hf(cls, config: dict, dtype: str = "float32", param_dtype: str = "") -> T5Config:
        """From a transformers T5Config / UMT5Config dict; only the gated-GELU (v1.1) encoder is supported."""
        kind = config.get("model_type", "t5")
        if kind not in ("t5", "umt5"):
            raise ValueError(f"model_type {kind!r} is not a T5 encoder; expected 't5' (T5 v1.1) or 'umt5'")
        ffn = config.get("feed_forward_proj", "relu")
        if ffn != "gated-gelu":
            raise ValueError(f"feed_forward_proj {ffn!r} is not supported: only 'gated-gelu' (T5 v1.1 / umT5, "
                             "wo(gelu_tanh(wi_0 x) * wi_1 x)) is implemented")
        return cls(vocab_size=int(config["vocab_size"]), d_model=int(config["d_model"]), d_kv=int(config["d_kv"]),
                   num_heads=int(config["num_heads"]), d_ff=int(config["d_ff"]),
                   num_layers=int(config["num_layers"]),
                   num_buckets=int(config.get("relative_attention_num_buckets", 32)),
                   max_distance=int(config.get("relative_attention_max_distance", 128)),
                   eps=float(config.get("layer_norm_epsilon", 1e-6)), shared_pos=kind == "t5", dtype=dtype,
                   param_dtype=param_dtype)

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.d_kv


def config_from_wan_shapes(shapes: dict[str, tuple[int, ...]]) -> dict:
    """An HF-style config dict for a checkpoint in the original Wan layout, read off its tensor shapes.

    The Wan ``.pth`` ships without a config; every size is recoverable from the tensors (``dim_attn`` from
    ``attn.q``, heads from the bias table [buckets, heads], ``d_kv = dim_attn / heads``). A top-level
    ``pos_embedding`` (Wan ``shared_pos=True``) gives model_type 't5', per-block tables give 'umt5'.
    """
    def need(key: str) -> tuple[int, ...]:
        if key not in shapes:
            raise ValueError(f"{key} is missing: not a Wan-layout T5 encoder checkpoint")
        return tuple(int(s) for s in shapes[key])

    vocab, dim = need("token_embedding.weight")
    layers = sorted({int(m.group(1)) for k in shapes if (m := re.match(r"blocks\.(\d+)\.", k))})
    if not layers or layers != list(range(len(layers))):
        raise ValueError(f"block indices must be 0..n-1, found {layers[:8]}")
    shared = "pos_embedding.embedding.weight" in shapes
    buckets, heads = need("pos_embedding.embedding.weight" if shared else "blocks.0.pos_embedding.embedding.weight")
    dim_attn = need("blocks.0.attn.q.weight")[0]
    if dim_attn % heads:
        raise ValueError(f"attention width {dim_attn} is not a multiple of {heads} heads")
    d_ff = need("blocks.0.ffn.fc1.weight")[0]
    base = T5_V1_1_XXL if shared else UMT5_XXL
    return dict(base, vocab_size=vocab, d_model=dim, d_kv=dim_attn // heads, num_heads=heads, d_ff=d_ff,
                num_layers=len(layers), relative_attention_num_buckets=buckets)


def param_shapes(cfg: T5Config) -> dict:
    d, inner, f, n = cfg.d_model, cfg.inner_dim, cfg.d_ff, cfg.num_layers
    layer = {"norm1": {"scale": (d,)},
             "attn": {"q": {"kernel": (d, inner)}, "k": {"kernel": (d, inner)}, "v": {"kernel": (d, inner)},
                      "o": {"kernel": (inner, d)}},
             "norm2": {"scale": (d,)},
             "ffn": {"wi_0": {"kernel": (d, f)}, "wi_1": {"kernel": (d, f)}, "wo": {"kernel": (f, d)}}}
    if not cfg.shared_pos:
        layer["pos_bias"] = (cfg.num_buckets, cfg.num_heads)
    out = {"embed": (cfg.vocab_size, d),
           "layers": jax.tree.map(lambda s: (n, *s), layer, is_leaf=lambda x: isinstance(x, tuple)),
           "final_norm": {"scale": (d,)}}
    if cfg.shared_pos:
        out["pos_bias"] = (cfg.num_buckets, cfg.num_heads)
    return out


def num_params(cfg: T5Config) -> int:
    return sum(math.prod(s) for s in jax.tree.leaves(param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple)))


def init_params(cfg: T5Config, key: jax.Array) -> dict:
    """Random weights at the fixtures' scales: kernels N(0, 1/fan_in), embedding N(0, 1), norms 1, bias N(0, .5)."""
    flat, tree = jax.tree_util.tree_flatten_with_path(param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))
    keys = jax.random.split(key, len(flat))
    leaves = []
    for k, (path, shape) in zip(keys, flat, strict=True):
        name = jax.tree_util.keystr(path)
        if "scale" in name:
            leaves.append(jnp.ones(shape, jnp.float32))
        elif "kernel" in name:
            leaves.append(jax.random.normal(k, shape) / math.sqrt(shape[-2]))
        else:
            leaves.append(jax.random.normal(k, shape) * (0.5 if "pos_bias" in name else 1.0))
    return jax.tree.unflatten(tree, leaves)


def half_precision_leaf(path: str) -> bool:
    """Whether the leaf at '/'-joined ``path`` is stored in ``param_dtype``: matmul kernels and the embedding
    table. Norm scales and relative-position bias tables stay float32 (also what ``--dtype=bf16`` writes)."""
    leaf = path.rsplit("/", 1)[-1]
    return leaf in ("kernel", "embed")


def cast_params(cfg: T5Config, params: dict) -> dict:
    """The parameters in their storage dtypes (see ``half_precision_leaf``); ``param_dtype`` "" returns them as is."""
    return cast_tree(params, cfg.param_dtype, lambda path, a: half_precision_leaf(path), jnp.float32)


def relative_position_buckets(q_len: int, k_len: int, num_buckets: int = 32, max_distance: int = 128) -> np.ndarray:
    """Bidirectional T5 bucket of (key j - query i), [q_len, k_len] int64, bit-exact with the torch float32 path.

    Half the buckets per direction; distances below a quarter of the buckets are exact, larger ones log-spaced
    up to ``max_distance``. Upstream computes the log in float32 and truncates, so integer boundaries (16, 32,
    64) depend on the rounding: the log is taken in float64 and rounded once to float32 (a correctly rounded
    float32 log, platform independent), then divided and scaled in float32 as upstream.
    """
    rel = np.arange(k_len, dtype=np.int64)[None, :] - np.arange(q_len, dtype=np.int64)[:, None]
    half = num_buckets // 2
    max_exact = half // 2
    n = np.abs(rel)
    ratio = np.maximum(n, max_exact).astype(np.float32) / np.float32(max_exact)
    logv = np.log(ratio.astype(np.float64)).astype(np.float32)
    large = logv / np.float32(math.log(max_distance / max_exact)) * np.float32(half - max_exact)
    large = np.minimum(max_exact + large.astype(np.int64), half - 1)
    return (rel > 0).astype(np.int64) * half + np.where(n < max_exact, n, large)


def position_bias(table: jax.Array, q_len: int, k_len: int, max_distance: int = 128) -> jax.Array:
    """Bias [heads, q_len, k_len] in float32 gathered from a table [num_buckets, heads]."""
    buckets = relative_position_buckets(q_len, k_len, table.shape[0], max_distance)
    return jnp.asarray(table, jnp.float32)[jnp.asarray(buckets, jnp.int32)].transpose(2, 0, 1)


def layer_position_biases(cfg: T5Config, params: dict, length: int) -> jax.Array:
    """[num_layers, heads, L, L]: the bias every layer adds before masking (shared_pos: one table for all)."""
    if cfg.shared_pos:
        b = position_bias(params["pos_bias"], length, length, cfg.max_distance)
        return jnp.broadcast_to(b, (cfg.num_layers, *b.shape))
    return jax.vmap(lambda t: position_bias(t, length, length, cfg.max_distance))(params["layers"]["pos_bias"])


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """T5LayerNorm: x / rms(x) * scale in float32, no mean subtraction (upstream order: normalise, then scale)."""
    xf = x.astype(jnp.float32)
    return scale.astype(jnp.float32) * (xf * jax.lax.rsqrt(jnp.mean(xf * xf, -1, keepdims=True) + eps))


def _mm(x: jax.Array, kernel: jax.Array, dtype) -> jax.Array:
    """x @ kernel with operands in ``dtype`` and float32 accumulation, returned in ``dtype``."""
    return jnp.matmul(x.astype(dtype), kernel.astype(dtype), preferred_element_type=jnp.float32).astype(dtype)


def encode(cfg: T5Config, params: dict, ids: jax.Array, mask: jax.Array,
           with_intermediates: bool = False) -> jax.Array | tuple[jax.Array, dict]:
    """last_hidden_state [B, L, D] float32 for token ids [B, L] and mask [B, L] (1 = real token, incl. ``</s>``).

    All positions are returned (pads hold real values: MAGI keeps them, Wan zeroes them, see ``wan_context``).
    ``cfg.dtype`` sets the matmul operands and activations (bfloat16 possible); norms, softmax and the residual
    stream stay float32; weights are first cast by ``cast_params`` (a no-op for ``param_dtype`` "", and for
    weights already stored that way). With ``with_intermediates`` also returns {"embeddings" [B, L, D], "blocks"
    [B, num_layers, L, D] (raw block outputs, before the final norm), "final" [B, L, D]}.
    """
    dt = jnp.dtype(cfg.dtype)
    params = cast_params(cfg, params)
    ids = jnp.asarray(ids, jnp.int32)
    b, length = ids.shape
    h_, dk = cfg.num_heads, cfg.d_kv
    # float32 parity needs true float32 matmuls on GPU/TPU (their default passes are TF32/bf16)
    prec = jax.default_matmul_precision("highest") if dt == jnp.float32 else contextlib.nullcontext()
    with prec:
        emb = jnp.asarray(params["embed"])[ids].astype(jnp.float32)
        valid = jnp.asarray(mask)[:, None, None, :] > 0
        mask_bias = jnp.where(valid, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)  # [B, 1, 1, L]
        shared = position_bias(params["pos_bias"], length, length, cfg.max_distance) if cfg.shared_pos else None

        def block(h, lp):
            y = rms_norm(h, lp["norm1"]["scale"], cfg.eps)
            a = lp["attn"]
            q, k, v = (_mm(y, a[n]["kernel"], dt).reshape(b, length, h_, dk) for n in "qkv")
            pos = shared if cfg.shared_pos else position_bias(lp["pos_bias"], length, length, cfg.max_distance)
            o = jax.nn.dot_product_attention(q, k, v, bias=pos[None] + mask_bias, scale=1.0)
            h = h + _mm(o.reshape(b, length, h_ * dk), a["o"]["kernel"], dt).astype(jnp.float32)
            y = rms_norm(h, lp["norm2"]["scale"], cfg.eps)
            f = lp["ffn"]
            gate = jax.nn.gelu(_mm(y, f["wi_0"]["kernel"], dt).astype(jnp.float32), approximate=True)
            g = (gate * _mm(y, f["wi_1"]["kernel"], dt).astype(jnp.float32)).astype(dt)
            h = h + _mm(g, f["wo"]["kernel"], dt).astype(jnp.float32)
            return h, (h if with_intermediates else None)

        h, outs = jax.lax.scan(block, emb, params["layers"])
        out = rms_norm(h, params["final_norm"]["scale"], cfg.eps)
    if not with_intermediates:
        return out
    return out, {"embeddings": emb, "blocks": jnp.swapaxes(outs, 0, 1), "final": out}


def wan_context(hidden: jax.Array, mask: jax.Array) -> jax.Array:
    """What the Wan/SkyReels DiT consumes: pad positions set to exactly +0 (Wan trims and zero-pads back)."""
    return jnp.where(jnp.asarray(mask)[..., None] > 0, hidden, jnp.zeros((), hidden.dtype))


def magi_caption(hidden: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """MAGI-1's (caption_embs [B, 1, L, D] float32, mask [B, L]): pads keep their values, the DiT masks them."""
    return jnp.asarray(hidden, jnp.float32)[:, None], jnp.asarray(mask)


class T5Encoder(ParamsModule):
    """The T5 v1.1 / umT5 encoder as an NNX module: parameters as ``nnx.Param`` leaves of the layout above."""

    def __init__(self, cfg: T5Config, params: dict | None = None, *, rngs: nnx.Rngs | None = None):
        """``params`` (or random ones) are held in their storage dtypes (``cast_params``: once, here)."""
        super().__init__(cfg, None if params is None else cast_params(cfg, params),
                         lambda c, k: cast_params(c, init_params(c, k)), rngs)

    def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
        return encode(self.cfg, self.param_dict(), ids, mask)
