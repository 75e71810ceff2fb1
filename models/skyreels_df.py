"""SkyReels-V2 diffusion forcing, vanilla: the upstream DF loop of one window, compiled as one ``lax.scan``.

Every iteration runs the whole window through the model twice (prompt and negative prompt, combined with
guidance), then advances the frames of the update mask with their own FlowUniPC state (spec skyreels_v2.md
§4.3–4.5). Prefix frames of a long-video window are fed as ``(1 - a)·prefix + a·eps`` with a = 0.001 times
``addnoise_condition`` and the model timestep ``addnoise_condition``; they are never updated.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from flowcache_jax.schedules import df_frame_masks
from flowcache_jax.solvers import FlowUniPC
from models.skyreels_v2 import SkyReelsConfig, forward


def skyreels_sigmas(steps: int, shift: float = 8.0, sigma_max: float = 0.999) -> tuple[np.ndarray, np.ndarray]:
    """SR's table: sigmas [steps + 1] (last 0) and integer model timesteps [steps] (spec §4.2)."""
    s = np.linspace(sigma_max, 0.0, steps + 1)[:-1]
    sig = shift * s / (1 + (shift - 1) * s)
    t = (sig * 1000).astype(np.int64)
    return np.append(sig, 0.0).astype(np.float32), t


@dataclasses.dataclass(frozen=True)
class DFWindow:
    """One window's static plan: per-iteration step indices and update masks (frame level)."""

    step_index: np.ndarray  # int [I, F], into [999, t_0..t_{N-1}, 0]
    update_mask: np.ndarray  # bool [I, F]
    prefix_frames: int

    @classmethod
    def build(cls, frames: int, causal_block_size: int, steps: int, ar_step: int, prefix_frames: int = 0
              ) -> DFWindow:
        idx, upd = df_frame_masks(frames, causal_block_size, steps, ar_step, prefix_frames)
        return cls(idx, upd, prefix_frames)

    def model_t(self, timesteps: np.ndarray, addnoise_condition: int) -> np.ndarray:
        template = np.concatenate([[999], timesteps, [0]])
        t = template[self.step_index]
        t[:, : self.prefix_frames] = addnoise_condition if self.prefix_frames else t[:, : self.prefix_frames]
        return t


def run_window(cfg: SkyReelsConfig, params: dict, latents: jax.Array, ctx_cond: jax.Array, ctx_uncond: jax.Array,
               fps: int, plan: DFWindow, sigmas: np.ndarray, timesteps: np.ndarray, guidance: float = 6.0,
               causal_block_size: int = 0, addnoise_condition: int = 0, addnoise_eps: jax.Array | None = None,
               reference_aliasing: bool = True) -> jax.Array:
    """All latents after every iteration, [I, C, F, H, W]; ``latents`` [C, F, H, W] holds the prefix frames."""
    solver = FlowUniPC(sigmas, reference_aliasing=reference_aliasing)
    model_t = jnp.asarray(plan.model_t(timesteps, addnoise_condition))
    p = plan.prefix_frames
    a = 0.001 * addnoise_condition
    if addnoise_eps is None:
        addnoise_eps = jnp.zeros((len(plan.update_mask), latents.shape[0], p, *latents.shape[2:]), latents.dtype)

    def iteration(carry, xs):
        x, state = carry
        t, mask, eps = xs
        x_in = x
        if p:
            x_in = x.at[:, :p].set(x[:, :p] * (1 - a) + eps * a)
        v_c, _ = forward(cfg, params, x_in, t, ctx_cond, fps, causal_block_size)
        v_u, _ = forward(cfg, params, x_in, t, ctx_uncond, fps, causal_block_size)
        v = v_u + guidance * (v_c - v_u)
        x, state = solver.step(state, x, v, mask)
        return (x, state), x

    step = jax.jit(lambda x: jax.lax.scan(iteration, (x, solver.init_state(x)),
                                          (model_t, jnp.asarray(plan.update_mask), addnoise_eps))[1])
    return step(latents)
