"""Solvers: Euler in the project's time convention (t = 0 noise, t = 1 clean), SkyReels' FlowUniPC in sigma
(sigma = 1 - t; x = (1 - sigma) x0 + sigma noise, the model predicts v = noise - x0), and the few-step re-noising
sampler of Self-Forcing / CausVid / DMD."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def euler_step(x: jax.Array, velocity: jax.Array, dt: jax.Array) -> jax.Array:
    """MAGI-1's update: x <- x + v * dt (dt > 0 moves towards data)."""
    return x + velocity * dt.astype(x.dtype)


class Euler:
    """The sampler's solver slot for MAGI-1 and the synthetic flows: stateless, the step is the table's dt."""

    stateless = True

    def chunk_state(self, latent: jax.ShapeDtypeStruct) -> dict:
        return {}

    def consts(self) -> dict:
        return {}

    def update(self, state: dict, x: jax.Array, v: jax.Array, dt: jax.Array, consts: dict
               ) -> tuple[jax.Array, dict]:
        return euler_step(x, v, dt), state


class FlowUniPC:
    """SkyReels' FlowUniPCMultistep (order 2, bh2, x0-prediction, lower-order final), one state per frame.

    Frames advance independently (diffusion forcing): ``k`` counts each frame's updates and the update mask
    says which frames step now. Scalars depend only on ``k``, so they are gathered per frame from tables.
    """

    def __init__(self, sigmas: np.ndarray, order: int = 2, reference_aliasing: bool = True):
        if order not in (1, 2):
            raise ValueError(f"solver order must be 1 or 2, got {order}")
        self.sigmas = np.asarray(sigmas, np.float32)  # [N + 1], last = 0
        self.steps = len(self.sigmas) - 1
        self.order = order
        self.reference_aliasing = reference_aliasing  # reproduce SkyReels' k = 1 corrector (see step)
        s = self.sigmas.astype(np.float64)
        with np.errstate(divide="ignore"):
            self.lam = np.log(1.0 - s) - np.log(s)  # lambda_N = +inf

    stateless = False

    def consts(self) -> dict:
        """The step grid as runtime arrays (a compiled sampler serves any grid of the same length)."""
        return {"sigmas": self.sigmas, "lam": np.where(np.isfinite(self.lam), self.lam, 0.0).astype(np.float32)}

    def chunk_state(self, latent: jax.ShapeDtypeStruct, frame_axis: int = 2) -> dict:
        """The state of one chunk [B, C, F, H, W] (its frames at ``frame_axis``)."""
        return self.init_state(jnp.zeros(latent.shape, latent.dtype), frame_axis)

    def update(self, state: dict, x: jax.Array, v: jax.Array, dt: jax.Array, consts: dict, frame_axis: int = 2
               ) -> tuple[jax.Array, dict]:
        """One update of every frame of a chunk (the sampler only calls it for chunks being updated)."""
        mask = jnp.ones((x.shape[frame_axis],), bool)
        return self.step(state, x, v, mask, frame_axis, consts["sigmas"], consts["lam"])

    def init_state(self, x: jax.Array, frame_axis: int = 1) -> dict:
        f = x.shape[frame_axis]
        z = jnp.zeros_like(x)
        return {"k": jnp.zeros((f,), jnp.int32), "x0_1": z, "x0_2": z, "last": z, "order": jnp.zeros((f,), jnp.int32)}

    def step(self, state: dict, x: jax.Array, v: jax.Array, mask: jax.Array, frame_axis: int = 1,
             sigmas: jax.Array | None = None, lam: jax.Array | None = None) -> tuple[jax.Array, dict]:
        """One update of the frames in ``mask`` (x, v: [..., F, ...] with F at ``frame_axis``); ``sigmas`` /
        ``lam`` (from ``consts``) replace the constructor's grid, e.g. as traced arguments."""
        n = self.steps
        c = self.consts()
        sig = jnp.asarray(c["sigmas"] if sigmas is None else sigmas)
        lam = jnp.asarray(c["lam"] if lam is None else lam, jnp.float32)
        k = state["k"]
        x_in = x
        shape = [1] * x.ndim
        shape[frame_axis] = -1

        def per_frame(a):
            return a.reshape(shape)

        km1, km2, kp1 = jnp.maximum(k - 1, 0), jnp.maximum(k - 2, 0), jnp.minimum(k + 1, n)
        s_k, s_m1, s_p1 = sig[k], sig[km1], sig[kp1]
        l_k, l_m1, l_m2, l_p1 = lam[k], lam[km1], lam[km2], lam[kp1]
        x0 = x - per_frame(s_k) * v
        # corrector (k >= 1), with the previous step's order
        h = l_k - l_m1
        hh = -h
        phi = jnp.expm1(hh)
        hh_safe = jnp.where(hh == 0, 1.0, hh)
        phi_safe = jnp.where(phi == 0, 1.0, phi)
        b1 = (phi / hh_safe - 1.0) / phi_safe
        b2 = 2.0 * ((phi / hh_safe - 1.0) / hh_safe - 0.5) / phi_safe
        r = (l_m2 - l_m1) / jnp.where(h == 0, 1.0, h)
        two = state["order"] == 2
        rho1 = jnp.where(two, (b1 - b2) / jnp.where(1.0 - r == 0, 1.0, 1.0 - r), 0.0)
        rho_last = jnp.where(two, b1 - rho1, 0.5)
        d_c = (state["x0_2"] - state["x0_1"]) / per_frame(jnp.where(r == 0, 1.0, r))
        alpha_k = 1.0 - s_k
        corr = per_frame(jnp.where(two, rho1, 0.0)) * d_c
        # Upstream steps a view of the latents at k = 0 and stores that view as its "last sample", so the
        # assignment of the step's result overwrites it: at k = 1 the corrector starts from the current x.
        last = jnp.where(per_frame(k == 1), x, state["last"]) if self.reference_aliasing else state["last"]
        x_c = (per_frame(s_k / jnp.where(s_m1 == 0, 1.0, s_m1)) * last
               - per_frame(alpha_k * phi) * state["x0_1"]
               - per_frame(alpha_k * phi) * (corr + per_frame(rho_last) * (x0 - state["x0_1"])))
        x = jnp.where(per_frame(k >= 1), x_c, x)
        # predictor to sigma_{k+1}
        order = jnp.minimum(jnp.minimum(self.order, n - k), k + 1)
        hp = l_p1 - l_k
        phi_p = jnp.expm1(-hp)
        alpha_p1 = 1.0 - s_p1
        x_p = per_frame(s_p1 / s_k) * x - per_frame(alpha_p1 * phi_p) * x0
        rp = (l_m1 - l_k) / jnp.where(hp == 0, 1.0, hp)
        d_p = (state["x0_1"] - x0) / per_frame(jnp.where(rp == 0, 1.0, rp))
        x_p = x_p - per_frame(jnp.where(order == 2, alpha_p1 * phi_p * 0.5, 0.0)) * d_p
        x_new = jnp.where(per_frame(kp1 == n), x0, x_p)  # the last step lands on x0 exactly
        m = per_frame(mask)
        new = {"k": jnp.where(mask, k + 1, k), "x0_1": jnp.where(m, x0, state["x0_1"]),
               "x0_2": jnp.where(m, state["x0_1"], state["x0_2"]), "last": jnp.where(m, x, state["last"]),
               "order": jnp.where(mask, order, state["order"])}
        return jnp.where(m, x_new, x_in), new


class ReNoise:
    """Few-step sampling of distilled models (Self-Forcing, CausVid, DMD): at step k the model's flow v gives
    x0 = x - sigma_k v, and the chunk restarts from x0 re-noised with *fresh* noise to the next level,
    x = (1 - sigma_{k+1}) x0 + sigma_{k+1} eps_k; the last step (sigma_N = 0) lands on x0.

    The noise is part of the chunk's state: the sampler draws ``noise_draws`` normals per chunk when the chunk
    enters (or takes them from the caller, e.g. a reference run's recorded eps) and ``with_noise`` stores them, so
    a run is a pure function of its noise and a compiled stage serves any grid of the same length.
    """

    stateless = False

    def __init__(self, sigmas: np.ndarray):
        self.sigmas = np.asarray(sigmas, np.float32)  # [N + 1], last = 0
        if self.sigmas.ndim != 1 or len(self.sigmas) < 2 or self.sigmas[-1] != 0:
            raise ValueError(f"ReNoise needs sigmas [N + 1] ending at 0, got {self.sigmas}")
        self.steps = len(self.sigmas) - 1
        self.noise_draws = self.steps - 1

    def consts(self) -> dict:
        return {"sigmas": self.sigmas}

    def chunk_state(self, latent: jax.ShapeDtypeStruct) -> dict:
        return {"k": jnp.zeros((), jnp.int32), "eps": jnp.zeros((max(self.noise_draws, 1), *latent.shape),
                                                                latent.dtype)}

    def with_noise(self, state: dict, eps: jax.Array) -> dict:
        """The state with its chunks' re-noising draws ``eps`` [..., noise_draws, *latent]."""
        return {**state, "eps": eps.astype(state["eps"].dtype)} if self.noise_draws else state

    def update(self, state: dict, x: jax.Array, v: jax.Array, dt: jax.Array, consts: dict
               ) -> tuple[jax.Array, dict]:
        sig = jnp.asarray(consts["sigmas"], jnp.float32)
        k = state["k"]
        s_k, s_next = sig[jnp.minimum(k, self.steps - 1)], sig[jnp.minimum(k + 1, self.steps)]
        x0 = x - s_k.astype(x.dtype) * v.astype(x.dtype)
        eps = jax.lax.dynamic_index_in_dim(state["eps"], jnp.clip(k, 0, state["eps"].shape[0] - 1), keepdims=False)
        x_new = jnp.where(s_next > 0, (1.0 - s_next) * x0 + s_next * eps.astype(x.dtype), x0)
        return x_new, {**state, "k": k + 1}
