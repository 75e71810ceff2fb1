"""Wan2.1 causal 3-D VAE (SkyReels-V2 ships the same network) in JAX: chunked encode, per-latent-frame decode.

Upstream runs the encoder on frames [0:1], [1:5], [5:9], ... and the decoder on one latent frame at a time,
every causal conv keeping the last two input frames of the previous chunk (spec text_and_vae.md §4, fixture
``wan_vae_tiny/README.md``). Here every such cache is a fixed-shape array of two frames that starts as zeros:
zero history is exactly what upstream's causal zero padding gives before a cache exists, so after the first
chunk all chunks have the same shapes. The first chunk (where the temporal resamplers are skipped and the
frame counts differ) is one jitted function, every later chunk runs in a ``lax.scan`` over a fixed block of
K chunks with a ``lax.cond`` that leaves the cache untouched for padded slots. So a resolution compiles two
executables per direction, whatever the frame count, and a stream of latent frames can be decoded piece by
piece with the state carried between calls (identical to a one-shot decode).

Precision (``WanVAEConfig.dtype`` / ``param_dtype``; upstream runs this VAE in float32). With
``dtype="bfloat16"`` the conv / dense / attention operands and every causal-conv cache (the scan state carried
between chunks, half the bytes) are bfloat16; accumulation (``preferred_element_type``), biases, the RMS norms,
SiLU, the attention softmax and the residual stream between blocks stay float32, as do the normalisation
constants and the returned moments / frames (relative L2 error of a bf16 decode vs float32 ~1e-2 on the tiny
fixture). ``param_dtype`` is the storage dtype of the conv / dense kernels, applied once by ``cast_params``;
norm scales and biases stay float32 ("" keeps the given arrays as they are).

Layout: activations channels-last [T, H, W, C]; 3-D conv kernels [kt, kh, kw, I, O], 2-D [kh, kw, I, O],
1x1(x1) convs as dense kernels [I, O]; norms hold ``scale`` [C]. Public arrays are channel-first as upstream:
video [3, T, H, W] in [-1, 1], moments [2z, T_lat, h, w], latents [z, T_lat, h, w].
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.layers import ParamsModule, cast_tree

F32 = jnp.float32

# Wan2.1 ``WanVAE.__init__`` (identical in SkyReels-V2 and as diffusers' ``latents_mean`` / ``latents_std``).
WAN21_LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134, -0.0715,
                      0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN21_LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526, 2.8652,
                     1.5579, 1.6382, 1.1253, 2.8251, 1.9160)
# The released ``Wan2.1_VAE.pth`` (``_video_vae`` kwargs of ``WanVAE_``).
WAN21_VAE = dict(dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                 temperal_downsample=[False, True, True], dropout=0.0)

# diffusers ``AutoencoderKLWan`` arguments that must keep these values for the Wan2.1 network.
_DIFFUSERS_FIXED = {"is_residual": False, "in_channels": 3, "out_channels": 3, "patch_size": None}
_IGNORED = {"dropout", "clip_output", "scale_factor_temporal", "scale_factor_spatial", "decoder_base_dim"}


@dataclasses.dataclass(frozen=True)
class WanVAEConfig:
    dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temperal_downsample: tuple[bool, ...] = (False, True, True)  # upstream's spelling
    latents_mean: tuple[float, ...] = WAN21_LATENTS_MEAN
    latents_std: tuple[float, ...] = WAN21_LATENTS_STD
    dtype: str = "float32"  # compute dtype of the convs / attention and the caches; norms, accumulation f32
    param_dtype: str = ""  # storage dtype of the kernels ("" = as given); norm scales and biases stay float32

    def __post_init__(self):
        for name in ("dim_mult", "attn_scales", "temperal_downsample", "latents_mean", "latents_std"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(self, "temperal_downsample", tuple(bool(b) for b in self.temperal_downsample))
        object.__setattr__(self, "latents_mean", tuple(float(v) for v in self.latents_mean))
        object.__setattr__(self, "latents_std", tuple(float(v) for v in self.latents_std))
        if len(self.temperal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(f"temperal_downsample needs {len(self.dim_mult) - 1} entries (one per downsample), "
                             f"got {len(self.temperal_downsample)}")
        if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
            raise ValueError(f"latents_mean / latents_std need z_dim={self.z_dim} entries, got "
                             f"{len(self.latents_mean)} / {len(self.latents_std)}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")
        if self.param_dtype not in ("", "float32", "bfloat16"):
            raise ValueError(f"param_dtype must be '', float32 or bfloat16, got {self.param_dtype!r}")

    @classmethod
    def from_kwargs(cls, d: Mapping[str, Any], dtype: str = "float32", param_dtype: str = "") -> WanVAEConfig:
        """From ``WanVAE_`` kwargs (``dim``) or diffusers ``AutoencoderKLWan`` kwargs (``base_dim``), or a mix.

        Keys starting with ``_`` (diffusers' ``_class_name`` ...) are ignored; unknown keys and diffusers
        options that describe another network (Wan2.2's ``is_residual``, ``patch_size``) raise ValueError.
        """
        d = {k: v for k, v in d.items() if not k.startswith("_")}
        for k, want in _DIFFUSERS_FIXED.items():
            if k in d and d[k] != want:
                raise ValueError(f"{k}={d[k]!r} is not the Wan2.1 VAE (needs {want!r})")
        if "dim" in d and "base_dim" in d and d["dim"] != d["base_dim"]:
            raise ValueError(f"dim={d['dim']} and base_dim={d['base_dim']} disagree")
        dim = d.get("dim", d.get("base_dim", cls.dim))
        if d.get("decoder_base_dim") not in (None, dim):
            raise ValueError(f"decoder_base_dim={d['decoder_base_dim']} differs from the encoder's {dim}")
        names = {f.name for f in dataclasses.fields(cls)} - {"dim", "dtype", "param_dtype"}
        unknown = sorted(set(d) - names - _IGNORED - set(_DIFFUSERS_FIXED) - {"dim", "base_dim"})
        if unknown:
            raise ValueError(f"unknown Wan VAE config keys: {', '.join(unknown)}")
        kw = {k: d[k] for k in names if k in d and d[k] is not None}
        cfg = cls(dim=int(dim), **kw, dtype=dtype, param_dtype=param_dtype)
        for k, got in (("scale_factor_temporal", cfg.temporal_stride), ("scale_factor_spatial", cfg.spatial_stride)):
            if k in d and d[k] != got:
                raise ValueError(f"{k}={d[k]} but the structure gives {got}")
        return cfg

    @property
    def temporal_stride(self) -> int:
        return 2 ** sum(self.temperal_downsample)

    @property
    def spatial_stride(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)


# ----- structure (shared with the key maps) ------------------------------------------------------------------
class Layer(NamedTuple):
    """One entry of upstream's ``encoder.downsamples`` / ``decoder.upsamples`` Sequential."""

    kind: str  # "res" | "attn" | "down2d" | "down3d" | "up2d" | "up3d"
    cin: int
    cout: int
    stage: int  # resolution level (diffusers' up_blocks index)
    pos: int  # index of a "res" inside its stage (diffusers' resnets index)


def encoder_layout(cfg: WanVAEConfig) -> list[Layer]:
    """``Encoder3d.downsamples`` in order: res blocks (+ attention at ``attn_scales``), then a downsample."""
    dims = [cfg.dim * u for u in (1, *cfg.dim_mult)]
    out, scale = [], 1.0
    for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        for j in range(cfg.num_res_blocks):
            out.append(Layer("res", cin, cout, i, j))
            if scale in cfg.attn_scales:
                out.append(Layer("attn", cout, cout, i, j))
            cin = cout
        if i != len(cfg.dim_mult) - 1:
            out.append(Layer("down3d" if cfg.temperal_downsample[i] else "down2d", cout, cout, i, 0))
            scale /= 2.0
    return out


def decoder_layout(cfg: WanVAEConfig) -> list[Layer]:
    """``Decoder3d.upsamples``: per stage num_res_blocks + 1 res blocks, then an upsample that halves channels."""
    dims = [cfg.dim * u for u in (cfg.dim_mult[-1], *cfg.dim_mult[::-1])]
    up_t = cfg.temperal_downsample[::-1]
    out, scale = [], 1.0 / 2 ** (len(cfg.dim_mult) - 2)
    for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        if i > 0:
            cin //= 2  # the previous stage's upsample conv halved the channels
        for j in range(cfg.num_res_blocks + 1):
            out.append(Layer("res", cin, cout, i, j))
            if scale in cfg.attn_scales:
                out.append(Layer("attn", cout, cout, i, j))
            cin = cout
        if i != len(cfg.dim_mult) - 1:
            out.append(Layer("up3d" if up_t[i] else "up2d", cout, cout // 2, i, 0))
            scale *= 2.0
    return out


def _conv3(i: int, o: int) -> dict:
    return {"kernel": (3, 3, 3, i, o), "bias": (o,)}


def _dense(i: int, o: int) -> dict:
    return {"kernel": (i, o), "bias": (o,)}


def _res_shapes(cin: int, cout: int) -> dict:
    d = {"norm1": {"scale": (cin,)}, "conv1": _conv3(cin, cout), "norm2": {"scale": (cout,)},
         "conv2": _conv3(cout, cout)}
    if cin != cout:
        d["shortcut"] = _dense(cin, cout)
    return d


def _attn_shapes(c: int) -> dict:
    return {"norm": {"scale": (c,)}, "qkv": _dense(c, 3 * c), "proj": _dense(c, c)}


def _layer_shapes(layer: Layer) -> dict:
    c = layer.cin
    if layer.kind == "res":
        return _res_shapes(layer.cin, layer.cout)
    if layer.kind == "attn":
        return _attn_shapes(c)
    d = {"conv": {"kernel": (3, 3, c, layer.cout), "bias": (layer.cout,)}}
    if layer.kind == "down3d":
        d["time_conv"] = {"kernel": (3, 1, 1, c, c), "bias": (c,)}
    elif layer.kind == "up3d":
        d["time_conv"] = {"kernel": (3, 1, 1, c, 2 * c), "bias": (2 * c,)}
    return d


def _mid_shapes(c: int) -> dict:
    return {"res0": _res_shapes(c, c), "attn": _attn_shapes(c), "res1": _res_shapes(c, c)}


def param_shapes(cfg: WanVAEConfig) -> dict:
    """The parameter tree's shapes; ``down`` / ``up`` are keyed by the upstream Sequential index."""
    enc, dec = encoder_layout(cfg), decoder_layout(cfg)
    ce, cd, z = enc[-1].cout, cfg.dim * cfg.dim_mult[-1], cfg.z_dim
    return {
        "encoder": {"conv_in": _conv3(3, cfg.dim), "down": {str(k): _layer_shapes(la) for k, la in enumerate(enc)},
                    "mid": _mid_shapes(ce), "head": {"norm": {"scale": (ce,)}, "conv": _conv3(ce, 2 * z)}},
        "quant": _dense(2 * z, 2 * z),
        "post_quant": _dense(z, z),
        "decoder": {"conv_in": _conv3(z, cd), "mid": _mid_shapes(cd),
                    "up": {str(k): _layer_shapes(la) for k, la in enumerate(dec)},
                    "head": {"norm": {"scale": (dec[-1].cout,)}, "conv": _conv3(dec[-1].cout, 3)}},
    }


def _is_shape(x: Any) -> bool:
    return isinstance(x, tuple)


def init_params(cfg: WanVAEConfig, key: jax.Array) -> dict:
    """Random weights N(0, 1/fan_in), zero biases, unit norm scales (for tests and shape checks).

    One random draw for all kernels, cut on the host: a draw per leaf would compile ~200 random programs.
    """
    flat, tree = jax.tree_util.tree_flatten_with_path(param_shapes(cfg), is_leaf=_is_shape)
    sizes = [math.prod(s) if path[-1].key == "kernel" else 0 for path, s in flat]
    draw = np.asarray(jax.random.normal(key, (sum(sizes),), F32))
    leaves, at = [], 0
    for (path, shape), n in zip(flat, sizes, strict=True):
        if n:
            leaves.append(draw[at:at + n].reshape(shape) / np.float32(math.sqrt(math.prod(shape[:-1]))))
            at += n
        else:
            leaves.append(np.full(shape, 1.0 if path[-1].key == "scale" else 0.0, np.float32))
    return jax.tree.unflatten(tree, [jnp.asarray(v) for v in leaves])


def half_precision_leaf(path: str) -> bool:
    """Whether the leaf at '/'-joined ``path`` is stored in ``param_dtype``: conv and dense kernels. Norm scales
    and biases stay float32 (also what ``--dtype=bf16`` writes)."""
    return path.rsplit("/", 1)[-1] == "kernel"


def cast_params(cfg: WanVAEConfig, params: dict) -> dict:
    """The parameters in their storage dtypes (see ``half_precision_leaf``); ``param_dtype`` "" returns them as is."""
    return cast_tree(params, cfg.param_dtype, lambda path, a: half_precision_leaf(path), jnp.float32)


def param_count(cfg: WanVAEConfig) -> int:
    return sum(math.prod(s) for s in jax.tree.leaves(param_shapes(cfg), is_leaf=_is_shape))


# ----- building blocks (channels-last) --------------------------------------------------------------------------
class _Caches:
    """Causal caches read in network order from the previous chunk's list and written for the next one.

    ``old is None`` marks the first chunk: nothing is cached yet (upstream's ``feat_cache[idx] is None``).
    """

    def __init__(self, old: list | None):
        self.old, self.new, self._i = old, [], 0

    def get(self) -> jax.Array | None:
        if self.old is None:
            return None
        self._i += 1
        return self.old[self._i - 1]

    def put(self, value: jax.Array) -> None:
        self.new.append(value)


def _rms(x: jax.Array, p: dict) -> jax.Array:
    """F.normalize over channels (L2 norm clamped at 1e-12) * sqrt(C) * gamma, in float32."""
    xf = x.astype(F32)
    n = jnp.sqrt(jnp.sum(xf * xf, -1, keepdims=True))
    return xf / jnp.maximum(n, 1e-12) * math.sqrt(x.shape[-1]) * p["scale"].astype(F32)


def _dense_op(x: jax.Array, p: dict, dt) -> jax.Array:
    y = jnp.matmul(x.astype(dt), p["kernel"].astype(dt), preferred_element_type=F32)
    return y + p["bias"].astype(F32)


def _conv(x: jax.Array, p: dict, dt, stride: tuple[int, ...], padding: tuple) -> jax.Array:
    """conv_general_dilated on [N, (T,) H, W, C] with a [(kt,) kh, kw, I, O] kernel, float32 accumulation."""
    nd = p["kernel"].ndim - 2
    dn = ("NDHWC", "DHWIO", "NDHWC") if nd == 3 else ("NHWC", "HWIO", "NHWC")
    y = jax.lax.conv_general_dilated(x.astype(dt), p["kernel"].astype(dt), stride, padding,
                                     dimension_numbers=dn, preferred_element_type=F32)
    return y + p["bias"].astype(F32)


def _causal_conv(x: jax.Array, p: dict, caches: _Caches, dt) -> jax.Array:
    """CausalConv3d k=3 pad 1: two frames of history (cache, or zeros) in front, spatial zero padding."""
    prev = caches.get()
    if prev is None:
        prev = jnp.zeros((2, *x.shape[1:]), dt)
    xin = jnp.concatenate([prev, x.astype(dt)], 0)
    caches.put(xin[-2:])
    return _conv(xin[None], p, dt, (1, 1, 1), ((0, 0), (1, 1), (1, 1)))[0]


def _res(x: jax.Array, p: dict, caches: _Caches, dt) -> jax.Array:
    h = _dense_op(x, p["shortcut"], dt) if "shortcut" in p else x.astype(F32)
    y = _causal_conv(jax.nn.silu(_rms(x, p["norm1"])), p["conv1"], caches, dt)
    y = _causal_conv(jax.nn.silu(_rms(y, p["norm2"])), p["conv2"], caches, dt)
    return y + h


def _attn(x: jax.Array, p: dict, dt) -> jax.Array:
    """Single-head self-attention over each frame's h*w positions, residual."""
    t, hh, ww, c = x.shape
    qkv = _dense_op(_rms(x, p["norm"]).reshape(t, hh * ww, c), p["qkv"], dt).astype(dt)
    q, k, v = (a[:, :, None, :] for a in jnp.split(qkv, 3, -1))
    o = jax.nn.dot_product_attention(q, k, v)[:, :, 0, :]
    return _dense_op(o, p["proj"], dt).reshape(x.shape) + x.astype(F32)


def _resample(x: jax.Array, p: dict, kind: str, caches: _Caches, dt) -> jax.Array:
    if kind.startswith("up"):
        if kind == "up3d":
            prev = caches.get()
            if prev is None:  # first chunk: no time conv (upstream 'Rep'); the next chunk sees zero history
                caches.put(jnp.zeros((2, *x.shape[1:]), dt))
            else:
                xin = jnp.concatenate([prev, x.astype(dt)], 0)
                caches.put(xin[-2:])
                t, hh, ww, c = x.shape
                y = _conv(xin[None], p["time_conv"], dt, (1, 1, 1), ((0, 0), (0, 0), (0, 0)))[0]
                # channels [g*c + ch] become frame 2t + g
                x = y.reshape(t, hh, ww, 2, c).transpose(0, 3, 1, 2, 4).reshape(2 * t, hh, ww, c)
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # nearest(-exact) x2
        return _conv(x, p["conv"], dt, (1, 1), ((1, 1), (1, 1)))
    x = _conv(x, p["conv"], dt, (2, 2), ((0, 1), (0, 1)))  # ZeroPad2d(0, 1, 0, 1) + stride 2
    if kind == "down3d":
        prev = caches.get()
        caches.put(x[-1:].astype(dt))
        if prev is not None:  # the first chunk only caches its frame
            xin = jnp.concatenate([prev, x.astype(dt)], 0)
            x = _conv(xin[None], p["time_conv"], dt, (2, 1, 1), ((0, 0), (0, 0), (0, 0)))[0]
    return x


def _layer(x: jax.Array, p: dict, layer: Layer, caches: _Caches, dt) -> jax.Array:
    if layer.kind == "res":
        return _res(x, p, caches, dt)
    if layer.kind == "attn":
        return _attn(x, p, dt)
    return _resample(x, p, layer.kind, caches, dt)


def _mid(x: jax.Array, p: dict, caches: _Caches, dt) -> jax.Array:
    return _res(_attn(_res(x, p["res0"], caches, dt), p["attn"], dt), p["res1"], caches, dt)


def _encode_chunk(cfg: WanVAEConfig, p: dict, x: jax.Array, caches: _Caches) -> jax.Array:
    """Frames [t, H, W, 3] (1 first, then temporal_stride) -> moments [1, h, w, 2z] (after ``conv1``)."""
    dt, e = cfg.compute_dtype, p["encoder"]
    x = _causal_conv(x, e["conv_in"], caches, dt)
    for k, layer in enumerate(encoder_layout(cfg)):
        x = _layer(x, e["down"][str(k)], layer, caches, dt)
    x = _mid(x, e["mid"], caches, dt)
    x = _causal_conv(jax.nn.silu(_rms(x, e["head"]["norm"])), e["head"]["conv"], caches, dt)
    return _dense_op(x, p["quant"], dt)


def _decode_frame(cfg: WanVAEConfig, p: dict, z: jax.Array, caches: _Caches) -> jax.Array:
    """One raw latent frame [1, h, w, z] -> frames [1 (first) or temporal_stride, H, W, 3], unclamped."""
    dt, d = cfg.compute_dtype, p["decoder"]
    x = _dense_op(z, p["post_quant"], dt)  # conv2 (1x1x1: per frame is the same as over all frames)
    x = _causal_conv(x, d["conv_in"], caches, dt)
    x = _mid(x, d["mid"], caches, dt)
    for k, layer in enumerate(decoder_layout(cfg)):
        x = _layer(x, d["up"][str(k)], layer, caches, dt)
    return _causal_conv(jax.nn.silu(_rms(x, d["head"]["norm"])), d["head"]["conv"], caches, dt)


# ----- compiled programs (one set per architecture and dtype; latents mean/std do not enter) ----------------------
class _Programs:
    """The four jitted functions of one architecture; ``traces`` counts how often each was traced (= compiled)."""

    def __init__(self, cfg: WanVAEConfig):
        self.cfg = cfg
        self.traces: collections.Counter = collections.Counter()
        donate = (1,) if jax.default_backend() != "cpu" else ()  # reuse the cache buffers on accelerators
        self.enc_init = jax.jit(self._enc_init)
        self.enc_block = jax.jit(self._enc_block, donate_argnums=donate)
        self.dec_init = jax.jit(self._dec_init)
        self.dec_block = jax.jit(self._dec_block, donate_argnums=donate)

    def _enc_init(self, params, frame):
        self.traces["enc_init"] += 1
        caches = _Caches(None)
        m = _encode_chunk(self.cfg, params, jnp.moveaxis(frame, 0, -1), caches)
        return caches.new, jnp.moveaxis(m, -1, 0)

    def _dec_init(self, params, z):
        self.traces["dec_init"] += 1
        caches = _Caches(None)
        y = _decode_frame(self.cfg, params, jnp.moveaxis(z, 0, -1).astype(F32), caches)
        return caches.new, jnp.moveaxis(y, -1, 0)

    def _scan(self, fn, params, state, xs, valid):
        def run(state, x):
            caches = _Caches(state)
            y = fn(self.cfg, params, x, caches)
            return caches.new, y

        def step(state, inp):
            x, ok = inp
            out = jax.eval_shape(run, state, x)[1]
            return jax.lax.cond(ok, run, lambda s, _: (s, jnp.zeros(out.shape, out.dtype)), state, x)

        return jax.lax.scan(step, state, (xs, valid))

    def _enc_block(self, params, state, frames, valid):
        self.traces["enc_block"] += 1
        n = valid.shape[0]
        c, t, hh, ww = frames.shape
        xs = jnp.moveaxis(frames, 0, -1).reshape(n, t // n, hh, ww, c)
        state, m = self._scan(_encode_chunk, params, state, xs, valid)  # m [K, 1, h, w, 2z]
        return state, jnp.moveaxis(m[:, 0], -1, 0)

    def _dec_block(self, params, state, z, valid):
        self.traces["dec_block"] += 1
        xs = jnp.moveaxis(z, 0, -1).astype(F32)[:, None]  # [K, 1, h, w, z]
        state, y = self._scan(_decode_frame, params, state, xs, valid)  # y [K, ts, H, W, 3]
        return state, jnp.moveaxis(y.reshape(-1, *y.shape[2:]), -1, 0)


@functools.cache
def _programs(cfg: WanVAEConfig) -> _Programs:
    return _Programs(cfg)


def programs_for(cfg: WanVAEConfig) -> _Programs:
    """The shared compiled functions of ``cfg`` (the normalisation constants and the storage dtype do not matter
    to them: jit specialises on the parameters' dtypes)."""
    return _programs(dataclasses.replace(cfg, latents_mean=(0.0,) * cfg.z_dim, latents_std=(1.0,) * cfg.z_dim,
                                         param_dtype=""))


def _pad_to(x: jax.Array, n: int, axis: int) -> jax.Array:
    if x.shape[axis] == n:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, n - x.shape[axis])
    return jnp.pad(x, pad)


# ----- encoder / decoder objects ---------------------------------------------------------------------------------
class WanVAEDecoder:
    """Per-latent-frame causal decoder: ``init`` on the first latent frame, ``step_block`` on K more at a time.

    ``decode(z)`` runs both over any number of latent frames with the same two executables per resolution;
    ``stream()`` keeps the state between calls so latent frames can be decoded as they are produced.
    Inputs are raw latents (``denormalize`` the DiT's output first, or pass ``normalized=True``). ``params`` are
    cast once to their storage dtypes (``cast_params``).
    """

    def __init__(self, cfg: WanVAEConfig, params: dict, block: int = 4):
        if block < 1:
            raise ValueError("block must be >= 1")
        self.cfg, self.params, self.block = cfg, cast_params(cfg, params), block
        self._prog = programs_for(cfg)

    @property
    def trace_count(self) -> int:
        """How often the decoder functions of this architecture were traced (each trace is one compilation)."""
        return self._prog.traces["dec_init"] + self._prog.traces["dec_block"]

    def init(self, z_first: jax.Array) -> tuple[list, jax.Array]:
        """Raw latent frame [z, 1, h, w] -> (state, frames [3, 1, H, W])."""
        return self._prog.dec_init(self.params, jnp.asarray(z_first, F32))

    def step_block(self, state: list, z_block: jax.Array, valid: jax.Array) -> tuple[list, jax.Array]:
        """K raw latent frames [z, K, h, w] (``valid`` [K] bool; False slots leave the state alone) ->
        (state, frames [3, ts*K, H, W]). The input state may be donated (invalid afterwards) on accelerators."""
        return self._prog.dec_block(self.params, state, jnp.asarray(z_block, F32), jnp.asarray(valid, bool))

    def feed(self, state: list | None, z: jax.Array) -> tuple[list | None, jax.Array]:
        """Functional streaming: raw latents [z, n, h, w] continuing ``state`` (None: a new video) ->
        (state, frames [3, n_out, H, W]), 1 + ts*(n-1) frames for the first piece, ts*n after it."""
        cfg = self.cfg
        z = jnp.asarray(z, F32)
        if z.ndim != 4 or z.shape[0] != cfg.z_dim:
            raise ValueError(f"expected latents [{cfg.z_dim}, n, h, w], got shape {tuple(z.shape)}")
        s = cfg.spatial_stride
        outs = [jnp.zeros((3, 0, z.shape[2] * s, z.shape[3] * s), F32)]
        if z.shape[1] and state is None:
            state, f = self.init(z[:, :1])
            outs.append(f)
            z = z[:, 1:]
        k, ts = self.block, cfg.temporal_stride
        for start in range(0, z.shape[1], k):
            piece = z[:, start:start + k]
            n = piece.shape[1]
            state, f = self.step_block(state, _pad_to(piece, k, 1), np.arange(k) < n)
            outs.append(f[:, :n * ts])
        return state, (jnp.concatenate(outs, 1) if len(outs) > 2 else outs[-1])

    def stream(self, normalized: bool = False) -> DecodeStream:
        """A stateful wrapper around ``feed``; ``normalized=True`` takes the DiT's normalised latents."""
        return DecodeStream(self, normalized)

    def decode(self, z: jax.Array, normalized: bool = False) -> jax.Array:
        """Latents [z, T_lat, h, w] -> video [3, 1 + ts*(T_lat - 1), H, W], unclamped."""
        if z.ndim != 4 or z.shape[1] < 1:
            raise ValueError(f"expected latents [z, T_lat >= 1, h, w], got shape {tuple(z.shape)}")
        return self.stream(normalized).push(z)


class DecodeStream:
    """Decode latent frames in pieces: ``push(z_piece)`` returns the pixel frames of exactly those latents."""

    def __init__(self, decoder: WanVAEDecoder, normalized: bool = False):
        self.decoder, self.normalized = decoder, normalized
        self.state: list | None = None

    def push(self, z: jax.Array) -> jax.Array:
        """Latents [z, n, h, w] (n >= 0) -> frames [3, n_out, H, W]: 1 + ts*(n-1) for the first piece, ts*n later."""
        z = jnp.asarray(z, F32)
        if self.normalized:
            z = denormalize(self.decoder.cfg, z)
        self.state, out = self.decoder.feed(self.state, z)
        return out


class WanVAEEncoder:
    """Chunked causal encoder: ``init`` on frame 0, ``step_block`` on K chunks of ``temporal_stride`` frames."""

    def __init__(self, cfg: WanVAEConfig, params: dict, block: int = 4):
        if block < 1:
            raise ValueError("block must be >= 1")
        self.cfg, self.params, self.block = cfg, cast_params(cfg, params), block
        self._prog = programs_for(cfg)

    @property
    def trace_count(self) -> int:
        return self._prog.traces["enc_init"] + self._prog.traces["enc_block"]

    def init(self, frame: jax.Array) -> tuple[list, jax.Array]:
        """First frame [3, 1, H, W] -> (state, moments [2z, 1, h, w])."""
        return self._prog.enc_init(self.params, jnp.asarray(frame, F32))

    def step_block(self, state: list, frames: jax.Array, valid: jax.Array) -> tuple[list, jax.Array]:
        """K chunks [3, ts*K, H, W] (``valid`` [K]) -> (state, moments [2z, K, h, w])."""
        return self._prog.enc_block(self.params, state, jnp.asarray(frames, F32), jnp.asarray(valid, bool))

    def stream(self) -> EncodeStream:
        return EncodeStream(self)

    def encode(self, video: jax.Array) -> jax.Array:
        """Video [3, 1 + ts*k, H, W] in [-1, 1] -> moments [2z, 1 + k, h, w] (mu then raw logvar)."""
        ts = self.cfg.temporal_stride
        if video.ndim != 4 or video.shape[0] != 3:
            raise ValueError(f"expected a video [3, T, H, W], got shape {tuple(video.shape)}")
        t = video.shape[1]
        if t < 1 or (t - 1) % ts:
            raise ValueError(f"the Wan VAE encodes 1 + {ts}k frames (first frame alone, then chunks of {ts}); "
                             f"got {t}: upstream would silently drop the last {(t - 1) % ts}, trim or pad the "
                             "video first")
        return self.stream().push(video)


class EncodeStream:
    """Encode frames in pieces; frames that do not yet fill a chunk wait in ``pending`` for the next push."""

    def __init__(self, encoder: WanVAEEncoder):
        self.encoder = encoder
        self.state: list | None = None
        self.pending: jax.Array | None = None

    def push(self, frames: jax.Array) -> jax.Array:
        """Frames [3, n, H, W] -> moments [2z, m, h, w] of every chunk completed so far (m may be 0)."""
        enc, cfg = self.encoder, self.encoder.cfg
        x = jnp.asarray(frames, F32)
        outs = []
        if x.shape[1] and self.state is None:
            self.state, m = enc.init(x[:, :1])
            outs.append(m)
            x = x[:, 1:]
        if self.pending is not None:
            x = jnp.concatenate([self.pending, x], 1)
        ts, k = cfg.temporal_stride, enc.block
        whole = x.shape[1] // ts * ts
        self.pending = x[:, whole:] if x.shape[1] > whole else None
        for start in range(0, whole, ts * k):
            piece = x[:, start:min(start + ts * k, whole)]
            n = piece.shape[1] // ts
            self.state, m = enc.step_block(self.state, _pad_to(piece, ts * k, 1), np.arange(k) < n)
            outs.append(m[:, :n])
        if not outs:
            h, w = latent_hw(cfg, x.shape[2], x.shape[3])
            return jnp.zeros((2 * cfg.z_dim, 0, h, w), F32)
        return jnp.concatenate(outs, 1) if len(outs) > 1 else outs[0]


def latent_hw(cfg: WanVAEConfig, hh: int, ww: int) -> tuple[int, int]:
    """Latent height / width of an H x W video (H / 8 when divisible; upstream's padding rule otherwise)."""
    for _ in range(len(cfg.dim_mult) - 1):  # ZeroPad2d(0, 1, 0, 1) + 3x3 stride 2
        hh, ww = (hh - 2) // 2 + 1, (ww - 2) // 2 + 1
    return hh, ww


# ----- functional API ---------------------------------------------------------------------------------------------
def encode(cfg: WanVAEConfig, params: dict, video: jax.Array, block: int = 4) -> jax.Array:
    """Video [3, 1 + 4k, H, W] in [-1, 1] -> moments [2z, 1 + k, h, w]: raw ``conv1`` output, mu then logvar
    (logvar not clamped; diffusers clamps it to [-30, 20] when sampling)."""
    return WanVAEEncoder(cfg, params, block).encode(video)


def split_moments(moments: jax.Array) -> tuple[jax.Array, jax.Array]:
    """moments [2z, ...] -> (mu, logvar)."""
    z = moments.shape[0] // 2
    return moments[:z], moments[z:]


def _stats(cfg: WanVAEConfig, ndim: int) -> tuple[jax.Array, jax.Array]:
    shape = (cfg.z_dim,) + (1,) * (ndim - 1)
    mean = jnp.asarray(np.asarray(cfg.latents_mean, np.float32)).reshape(shape)
    inv = 1.0 / jnp.asarray(np.asarray(cfg.latents_std, np.float32)).reshape(shape)  # float32, as upstream
    return mean, inv


def normalize(cfg: WanVAEConfig, mu: jax.Array) -> jax.Array:
    """(mu - mean) * (1/std): what the DiT sees; multiplies by the float32 reciprocal as upstream does."""
    mean, inv = _stats(cfg, mu.ndim)
    return (jnp.asarray(mu, F32) - mean) * inv


def denormalize(cfg: WanVAEConfig, z: jax.Array) -> jax.Array:
    """z / (1/std) + mean: the inverse of ``normalize`` with upstream's rounding (not z * std)."""
    mean, inv = _stats(cfg, z.ndim)
    return jnp.asarray(z, F32) / inv + mean


def decode(cfg: WanVAEConfig, params: dict, z: jax.Array, block: int = 4, normalized: bool = False) -> jax.Array:
    """Raw latents [z, T_lat, h, w] (``normalized=True``: the DiT's normalised ones) -> video
    [3, 1 + 4(T_lat - 1), H, W], UNCLAMPED (callers clamp to [-1, 1] as every upstream wrapper does)."""
    return WanVAEDecoder(cfg, params, block).decode(z, normalized)


class WanVAE(ParamsModule):
    """The Wan2.1 VAE as an NNX module: parameters as ``nnx.Param`` leaves of the layout above."""

    def __init__(self, cfg: WanVAEConfig, params: dict | None = None, *, rngs: nnx.Rngs | None = None):
        """``params`` (or random ones) are held in their storage dtypes (``cast_params``: once, here)."""
        super().__init__(cfg, None if params is None else cast_params(cfg, params),
                         lambda c, k: cast_params(c, init_params(c, k)), rngs)

    def encode(self, video: jax.Array) -> jax.Array:
        return encode(self.cfg, self.param_dict(), video)

    def decode(self, z: jax.Array, normalized: bool = False) -> jax.Array:
        return decode(self.cfg, self.param_dict(), z, normalized=normalized)
