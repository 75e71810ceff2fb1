"""FlowCache's SkyReels-V2 executor compiled: one ``lax.scan`` per window, a ``lax.cond`` per group.

The reuse decisions of the per-group executor depend only on the timesteps (the rule reads the time
modulation e0), so ``group_schedule`` makes them on the host first: per iteration, branch and group, a
status (0 not run, 1 computed update, 2 reused, 3 computed without update: the long-video prefix). The
window then runs as one compiled scan over iterations; inside, a scan over the groups switches per group
between its forward over the branch's K/V buffer (attending to slots 0..g, stale where not rerun), the
replay of its cached residual, and nothing. Statuses are data, so every window of a shape shares one
executable. Same semantics as ``models.skyreels_flowcache.run_window`` without KV compression.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from flowcache_jax.solvers import FlowUniPC
from models.layers import dense
from models.skyreels_df import DFWindow, cached_conditions
from models.skyreels_flowcache import GroupCache
from models.skyreels_v2 import SkyReelsConfig, head, patchify, rope_tables, run_blocks, unpatchify

NOT_RUN, COMPUTED, REUSED, PREFIX = 0, 1, 2, 3


def group_schedule(cfg: SkyReelsConfig, params: dict, plan: DFWindow, timesteps: np.ndarray, fps: int,
                   frames_per_group: int, cache: GroupCache, overlap: bool, addnoise_condition: int = 0,
                   calls_before: int = 0) -> np.ndarray:
    """Statuses [I, 2, G] (cond, uncond) of the per-group executor's rule (see ``skyreels_flowcache``)."""
    model_t = plan.model_t(timesteps, addnoise_condition)
    iters, frames = plan.update_mask.shape
    groups, steps, p = frames // frames_per_group, len(timesteps), plan.prefix_frames
    e0_all = np.asarray(_e0_table(cfg, fps)(params, jnp.asarray(model_t)), np.float64)  # [I, F, 6, D], one call
    br = [{"cnt": np.zeros(groups, int), "acc": np.zeros(groups), "prev": [None] * groups} for _ in range(2)]
    out = np.zeros((iters, 2, groups), np.int8)
    calls = calls_before
    for i in range(iters):
        update = plan.update_mask[i].reshape(groups, frames_per_group).any(1)
        last = int(np.flatnonzero(update).max()) if update.any() else -1
        e0 = e0_all[i]
        for b in range(2):
            s = br[b]
            for g in range(last + 1):
                if s["cnt"][g] >= steps or (overlap and g * frames_per_group < p and calls > 1):
                    continue
                e0_g, compute = e0[g * frames_per_group], True
                if update[g] and cache.threshold is not None:
                    if s["cnt"][g] < cache.ret_steps or s["cnt"][g] >= steps - 1:
                        s["acc"][g] = 0.0
                    else:
                        rel = float(np.abs(e0_g - s["prev"][g]).mean() / np.abs(s["prev"][g]).mean())
                        s["acc"][g] += float(np.polyval(cache.coeffs, rel))
                        compute = s["acc"][g] >= cache.threshold
                        if compute:
                            s["acc"][g] = 0.0
                if update[g]:
                    s["prev"][g] = e0_g
                    s["cnt"][g] += 1
                out[i, b, g] = (COMPUTED if update[g] else PREFIX) if compute else REUSED
            calls += 1
    return out


@functools.lru_cache(maxsize=32)
def _e0_table(cfg: SkyReelsConfig, fps: int):
    """e0 for every iteration's per-frame timesteps at once (the rule's only input)."""
    zeros = jnp.zeros((1, cfg.text_dim), jnp.float32)
    fn = cached_conditions(cfg, fps)
    return jax.jit(lambda prm, ts: jax.vmap(lambda t: fn(prm, t, zeros)["e0"])(ts))


def run_window(cfg: SkyReelsConfig, params: dict, latents: np.ndarray, ctx_cond: jax.Array, ctx_uncond: jax.Array,
               fps: int, plan: DFWindow, sigmas: np.ndarray, timesteps: np.ndarray, guidance: float,
               frames_per_group: int, status: np.ndarray, addnoise_condition: int = 0,
               addnoise_eps: np.ndarray | None = None) -> jax.Array:
    """Latents after every iteration [I, C, F, H, W], following the statuses of ``group_schedule``."""
    p, iters = plan.prefix_frames, len(plan.update_mask)
    if addnoise_eps is None:
        addnoise_eps = np.zeros((iters, latents.shape[0], p, *latents.shape[2:]), np.float32)
    fn = _window_fn(cfg, tuple(latents.shape), frames_per_group, float(guidance), int(addnoise_condition), p,
                    np.asarray(sigmas, np.float32).tobytes())
    return fn(params, jnp.asarray(latents), ctx_cond, ctx_uncond, jnp.int32(fps),
              jnp.asarray(plan.model_t(timesteps, addnoise_condition)), jnp.asarray(plan.update_mask),
              jnp.asarray(addnoise_eps), jnp.asarray(status))


@functools.lru_cache(maxsize=32)
def _window_fn(cfg: SkyReelsConfig, shape: tuple[int, ...], fpg: int, guidance: float, addnoise_condition: int,
               p: int, sigmas: bytes):
    from models.skyreels_v2 import conditions

    solver = FlowUniPC(np.frombuffer(sigmas, np.float32))
    a = 0.001 * addnoise_condition
    c, frames, hh, ww = shape
    pt, ph, pw = cfg.patch_size
    hw = (hh // ph) * (ww // pw)
    groups, tpg = frames // fpg, fpg // pt * hw
    n = groups * tpg
    cos_all, sin_all = (jnp.asarray(t) for t in rope_tables(cfg.head_dim, frames // pt, hh // ph, ww // pw))
    frame_in_group = jnp.arange(tpg) // hw

    def branch(params, tok, t, ctx, fps, status, kv, res):
        cond = conditions(cfg, params, t, ctx, fps)
        h_in = dense(tok, params["patch"], jnp.float32)

        def group(carry, g):
            hidden, kv, res = carry
            rows = g * tpg
            hg = jax.lax.dynamic_slice_in_dim(h_in, rows, tpg)

            def forward(kv, res):
                e0 = jax.lax.dynamic_slice_in_dim(cond["e0"], g * (fpg // pt), fpg // pt)
                ranges = jnp.broadcast_to(jnp.stack([jnp.int32(0), (g + 1) * tpg]), (tpg, 1, 2))
                h_out, kv, _ = run_blocks(cfg, params, hg, e0, frame_in_group, cond["ctx"],
                                          jax.lax.dynamic_slice_in_dim(cos_all, rows, tpg),
                                          jax.lax.dynamic_slice_in_dim(sin_all, rows, tpg), ranges, kv=kv,
                                          write_start=rows)
                res = jnp.where(status[g] == COMPUTED, res.at[g].set(h_out - hg), res)
                return h_out, kv, res

            def replay(kv, res):
                return hg + res[g], kv, res

            def skip(kv, res):
                return jnp.zeros_like(hg), kv, res

            idx = jnp.select([status[g] == NOT_RUN, status[g] == REUSED], [0, 1], 2)
            h_out, kv, res = jax.lax.switch(idx, (skip, replay, forward), kv, res)
            return (jax.lax.dynamic_update_slice_in_dim(hidden, h_out, rows, 0), kv, res), None

        (hidden, kv, res), _ = jax.lax.scan(group, (jnp.zeros((n, cfg.dim), jnp.float32), kv, res),
                                            jnp.arange(groups))
        v = unpatchify(cfg, head(cfg, params, hidden, cond["e"], jnp.arange(n) // hw), frames, hh, ww)
        return v, kv, res

    def run(params, latents, ctx_cond, ctx_uncond, fps, model_t, update_mask, addnoise_eps, status):
        def iteration(carry, xs):
            x, state, kv_c, kv_u, res_c, res_u = carry
            t, mask, eps, st = xs
            x_in = x.at[:, :p].set(x[:, :p] * (1 - a) + eps * a) if p else x
            tok = patchify(cfg, x_in)
            v_c, kv_c, res_c = branch(params, tok, t, ctx_cond, fps, st[0], kv_c, res_c)
            v_u, kv_u, res_u = branch(params, tok, t, ctx_uncond, fps, st[1], kv_u, res_u)
            x, state = solver.step(state, x, v_u + guidance * (v_c - v_u), mask)
            return (x, state, kv_c, kv_u, res_c, res_u), x

        kv = (jnp.zeros((cfg.num_layers, n, cfg.num_heads, cfg.head_dim), jnp.float32),) * 2
        res = jnp.zeros((groups, tpg, cfg.dim), jnp.float32)
        init = (latents, solver.init_state(latents), kv, kv, res, res)
        return jax.lax.scan(iteration, init, (model_t, update_mask, addnoise_eps, status))[1]

    return jax.jit(run)
