"""Analytic flow fields: a video "model" whose optimal velocity is known in closed form.

Data. A chunk is a [frames, height, width, channels] latent. Every token's channel vector is drawn from
a Gaussian mixture whose means are shifted by ``rho`` times the same token of the previous chunk:
``x_c = rho * x_{c-1} + z``, ``z ~ sum_k pi_k N(m_k, s_k^2 I)``. So chunks are correlated and the
context (the previous chunk) matters, as in an AR video model.

Flow. Rectified flow in MAGI's convention (t = 0 noise, t = 1 data): ``x_t = t x_1 + (1 - t) eps`` with
``eps ~ N(0, noise_scale^2 I)``; the optimal velocity is ``E[x_1 - eps | x_t]``, closed form per mixture
component (below). The sampler's time grid gives the power law and shift (``schedules.flow_time_grid``).

Context. Like a transformer's K/V, each chunk forward writes its current clean estimate ``E[x_1 | x_t]``
into a ring of ``window + 1`` KV slots; chunk c reads chunk c-1's slot (stale if c-1 was reused, as with
real K/V). With window 1 the context is the finished previous chunk and sampling is exact in the limit.

Work. ``work`` orthogonal mixing layers (h Q Q^T in a ``hidden``-wide basis) sit in front of the analytic
velocity and really feed it, so a skipped forward saves measurable time; XLA cannot remove them because
the matrices are runtime parameters.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flowcache_jax.denoiser import ChunkOutput, SlotInfo


def _orthogonal(rng: np.random.Generator, n: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return (q * np.sign(np.diag(r))).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class SyntheticFlow:
    frames: int = 2
    height: int = 4
    width: int = 4
    channels: int = 4
    mixture: int = 3
    data_scale: float = 1.0  # spread of the component means
    component_std: float = 0.3  # component std, relative to data_scale
    noise_scale: float = 1.0
    rho: float = 0.5  # chunk-to-chunk correlation
    hidden: int = 64  # width of the mixing basis (>= channels)
    work: int = 0  # mixing layers per forward
    feat_dim: int = 8  # width of the metric embedding (a bias-free linear map, like a patch embedder)
    seed: int = 0

    def __post_init__(self):
        if self.hidden < self.channels:
            raise ValueError(f"synthetic.hidden={self.hidden} must be >= channels={self.channels}")
        for f in ("frames", "height", "width", "channels", "mixture", "feat_dim"):
            if getattr(self, f) < 1:
                raise ValueError(f"synthetic.{f} must be >= 1, got {getattr(self, f)}")
        if self.work < 0 or self.noise_scale <= 0 or self.data_scale <= 0 or self.component_std <= 0:
            raise ValueError("synthetic.work must be >= 0 and the scales > 0")

    @property
    def chunk_shape(self) -> tuple[int, int, int, int]:
        return (self.frames, self.height, self.width, self.channels)

    # ----- parameters ----------------------------------------------------------------------------
    def init_params(self) -> dict[str, jax.Array]:
        # One generator per group, so the data and the metric do not change with the cost knobs.
        rng_data, rng_mix, rng_embed = (np.random.default_rng([self.seed, i]) for i in range(3))
        k, c = self.mixture, self.channels
        means = rng_data.standard_normal((k, c)) * self.data_scale
        stds = self.component_std * self.data_scale * rng_data.uniform(0.5, 1.5, k)
        logits = rng_data.standard_normal(k) * 0.5
        proj = _orthogonal(rng_mix, self.hidden)[:c]  # [C, H], proj @ proj.T = I
        mix = np.stack([_orthogonal(rng_mix, self.hidden) for _ in range(self.work)]) if self.work else \
            np.zeros((0, self.hidden, self.hidden), np.float32)
        embed = rng_embed.standard_normal((c, self.feat_dim)) / math.sqrt(c)
        p = dict(means=means, stds=stds, log_weights=logits - np.log(np.exp(logits).sum()), proj=proj,
                 mix=mix, embed=embed)
        return {n: jnp.asarray(v, jnp.float32) for n, v in p.items()}

    # ----- closed forms --------------------------------------------------------------------------
    def posterior(self, params: dict, x: jax.Array, t: jax.Array, ctx: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(optimal velocity, E[x_1 | x_t]) per token; ``ctx`` is the previous chunk's clean estimate."""
        mu = params["means"] + self.rho * ctx[..., None, :]  # [..., K, C]
        s2 = params["stds"] ** 2
        a = t**2 * s2 + (1 - t) ** 2 * self.noise_scale**2  # [K]
        d = x[..., None, :] - t * mu
        logp = params["log_weights"] - 0.5 * self.channels * jnp.log(a) - 0.5 * jnp.sum(d * d, -1) / a
        r = jax.nn.softmax(logp, axis=-1)[..., None]
        v = jnp.sum(r * (mu + ((t * s2 - (1 - t) * self.noise_scale**2) / a)[:, None] * d), -2)
        x0 = jnp.sum(r * (mu + (t * s2 / a)[:, None] * d), -2)
        return v, x0

    def moments(self, params: dict) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel mean and variance of the innovation z (= chunk 0's distribution)."""
        w = np.exp(np.asarray(params["log_weights"]))[:, None]
        m, s2 = np.asarray(params["means"]), np.asarray(params["stds"])[:, None] ** 2
        mean = (w * m).sum(0)
        return mean, (w * (s2 + m**2)).sum(0) - mean**2

    def sample_data(self, params: dict, key: jax.Array, batch: int, n_chunks: int) -> jax.Array:
        """Exact ancestral samples of the data, [batch, n_chunks, *chunk_shape]."""
        shape = (batch, n_chunks, *self.chunk_shape[:-1])
        kc, kn = jax.random.split(key)
        comp = jax.random.categorical(kc, params["log_weights"], shape=shape)
        z = params["means"][comp] + params["stds"][comp][..., None] * jax.random.normal(kn, shape + (self.channels,))
        out, prev = [], jnp.zeros_like(z[:, 0])
        for c in range(n_chunks):
            prev = self.rho * prev + z[:, c]
            out.append(prev)
        return jnp.stack(out, 1)

    # ----- the Denoiser protocol -----------------------------------------------------------------
    def sample_noise(self, key: jax.Array, batch: int) -> jax.Array:
        return self.noise_scale * jax.random.normal(key, (batch, *self.chunk_shape), jnp.float32)

    def init_kv(self, batch: int, window: int) -> dict[str, jax.Array]:
        n = window + 1
        return {"x0": jnp.zeros((n, batch, *self.chunk_shape), jnp.float32), "owner": jnp.full((n,), -1, jnp.int32)}

    def metric_features(self, params: dict, x: jax.Array, t: jax.Array) -> jax.Array:
        return x @ params["embed"]

    def _mix(self, params: dict, x: jax.Array) -> jax.Array:
        if not self.work:
            return x
        h = x @ params["proj"]
        for q in params["mix"]:  # unrolled: XLA's cost analysis counts a loop body only once
            h = (h @ q) @ q.T
        return h @ params["proj"].T

    def forward_chunk(self, params: dict, cond: Any, x: jax.Array, info: SlotInfo,
                      kv: dict) -> tuple[ChunkOutput, dict]:
        n = kv["owner"].shape[0]
        src = (info.chunk - 1) % n
        ok = (info.chunk > 0) & (kv["owner"][src] == info.chunk - 1)
        ctx = jnp.where(ok, kv["x0"][src], 0.0)
        v, x0 = self.posterior(params, self._mix(params, x), info.t, ctx)
        dst = info.chunk % n
        kv = {"x0": kv["x0"].at[dst].set(x0), "owner": kv["owner"].at[dst].set(info.chunk)}
        return ChunkOutput(velocity=v, residual=v - x), kv

    def velocity_from_residual(self, params: dict, cond: Any, x: jax.Array, info: SlotInfo,
                               residual: jax.Array) -> jax.Array:
        return x + residual  # identity embedding and head: hidden_out = x + residual is the velocity

    def forward_flops(self, batch: int) -> int:
        """Analytic FLOPs of one chunk forward (matmuls and the mixture posterior)."""
        rows = batch * self.frames * self.height * self.width
        h, c, k = self.hidden, self.channels, self.mixture
        mix = (2 * 2 * rows * c * h + self.work * 2 * 2 * rows * h * h) if self.work else 0
        return mix + rows * k * c * 12
