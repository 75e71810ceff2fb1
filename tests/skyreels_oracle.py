"""A test oracle, not a runtime path: FlowCache's SkyReels-V2 group executor with KV compression, call by call on the
host, as the fork runs it (spec flowcache.md §2, §4.3). The reuse decisions come from the one rule,
``flowcache_jax.policies.group_flowcache`` (its per-call statuses); this file only executes them.

Each transformer call runs the window's groups oldest first; group g writes its K/V into slot g of the branch's
buffer and attends to the branch's clean groups plus the updating groups up to it. While more than
``budget_block`` groups are clean, every layer of the group pass scores the clean slots with the group's
queries and keeps the top tokens in the newest clean slot (the clean list shrinks after the last layer).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from flowcache_jax.kv.compress import CompressConfig
from flowcache_jax.policies.group_flowcache import COMPUTED, NOT_RUN, PREFIX, REUSED_STATUS
from flowcache_jax.solvers import FlowUniPC
from models.layers import dense
from models.skyreels_v2 import SkyReelsConfig, conditions, head, patchify, rope_tables, run_blocks, unpatchify


@functools.lru_cache(maxsize=8)
def _group_forward(cfg: SkyReelsConfig, frames_per_group: int, tpg: int, ccfg: CompressConfig | None):
    def fn(p, tok, e0, ctx, cos, sin, kv, g, key_mask, clean_rows, keep):
        h_in = dense(tok, p["patch"], jnp.float32)
        frame_of = jnp.arange(tpg) // (tpg // frames_per_group)
        ranges = jnp.zeros((tpg, 1, 2), jnp.int32)  # the rows come from the key mask
        comp = None if clean_rows is None else {"rows": clean_rows, "keep": keep, "cfg": ccfg}
        h_out, kv, extra = run_blocks(cfg, p, h_in, e0, frame_of, ctx, cos, sin, ranges, kv=kv, write_start=g * tpg,
                                      key_mask=key_mask, compress=comp)
        return h_in, h_out, kv, (extra[1] if comp is not None else None)

    return jax.jit(fn)


def run_window(cfg: SkyReelsConfig, params: dict, latents: np.ndarray, ctx_cond: jax.Array, ctx_uncond: jax.Array,
               fps: int, step_index: np.ndarray, update_mask: np.ndarray, prefix_frames: int, sigmas: np.ndarray,
               timesteps: np.ndarray, guidance: float, frames_per_group: int, status: np.ndarray, overlap: bool,
               addnoise_condition: int = 0, addnoise_eps: np.ndarray | None = None, budget_block: int = 1,
               compression: CompressConfig | None = None) -> tuple[np.ndarray, dict]:
    """Latents after every iteration [I, C, F, H, W] and the compression records (events, attention sizes).

    ``status`` [I * 2, G]: the rule's per-call group statuses (NOT_RUN, COMPUTED, REUSED_STATUS, PREFIX)."""
    c, frames, hh, ww = latents.shape
    pt, ph, pw = cfg.patch_size
    hw = (hh // ph) * (ww // pw)
    groups, tpg, steps = frames // frames_per_group, frames_per_group // pt * hw, len(timesteps)
    template = np.concatenate([[999], timesteps, [0]])
    model_t = template[step_index]
    p, a = prefix_frames, 0.001 * addnoise_condition
    if p:
        model_t[:, :p] = addnoise_condition
    cos_all, sin_all = rope_tables(cfg.head_dim, frames // pt, hh // ph, ww // pw)
    ccfg = dataclasses.replace(compression or CompressConfig(budget=1), budget=budget_block * tpg)
    group_fn = _group_forward(cfg, frames_per_group // pt, tpg, ccfg)
    cond_fn = jax.jit(lambda prm, t, ctx: conditions(cfg, prm, t, ctx, fps))
    solver = FlowUniPC(sigmas)
    x = jnp.asarray(latents)
    state = solver.init_state(x)
    buf = (jnp.zeros((cfg.num_layers, groups * tpg, cfg.num_heads, cfg.head_dim), jnp.float32),) * 2
    branches = {b: {"kv": buf, "cnt": np.zeros(groups, int), "res": [None] * groups, "clean": []}
                for b in (True, False)}
    events, attn, out, calls = [], [], [], 0
    for i in range(len(model_t)):
        mask_i = update_mask[i]
        x_in = x
        if p:
            x_in = x.at[:, :p].set(x[:, :p] * (1 - a) + jnp.asarray(addnoise_eps[i]) * a)
        tok = patchify(cfg, x_in)
        update = mask_i.reshape(groups, frames_per_group).any(1)
        v = {}
        for is_cond, ctx in ((True, ctx_cond), (False, ctx_uncond)):
            br = branches[is_cond]
            if overlap and calls in (1, 2):  # the prefix enters the other branch's clean list
                branches[calls == 1]["clean"].append(0)
            cond = cond_fn(params, jnp.asarray(model_t[i]), ctx)
            hidden = jnp.zeros((groups * tpg, cfg.dim), jnp.float32)
            for g in np.flatnonzero(status[calls] != NOT_RUN):
                g = int(g)
                fs, rows = slice(g * frames_per_group, (g + 1) * frames_per_group), slice(g * tpg, (g + 1) * tpg)
                if status[calls, g] in (COMPUTED, PREFIX):
                    clean = list(br["clean"])
                    active = [j for j in range(g + 1) if update[j] and j not in clean]
                    squeeze = len(clean) > budget_block
                    keep_slots = sorted(clean)[-budget_block:] if squeeze else sorted(clean)
                    mask = np.zeros(groups * tpg, bool)
                    for j in keep_slots + active or [g]:
                        mask[j * tpg:(j + 1) * tpg] = True
                    clean_rows = keep = None
                    if squeeze:
                        clean_rows = jnp.asarray(np.concatenate([np.arange(j * tpg, (j + 1) * tpg)
                                                                 for j in sorted(clean)]))
                        keep = jnp.int32(keep_slots[0] * tpg)
                    h_in, h_out, br["kv"], kept = group_fn(
                        params, tok[rows], cond["e0"][fs], cond["ctx"], jnp.asarray(cos_all[rows]),
                        jnp.asarray(sin_all[rows]), br["kv"], jnp.int32(g), jnp.asarray(mask), clean_rows, keep)
                    n_keys = int(mask.sum())
                    for layer in range(cfg.num_layers):
                        attn.append((calls, layer, g, n_keys, int(kept is not None)))
                    if kept is not None:
                        for layer in range(cfg.num_layers):
                            after = list(keep_slots) if layer == cfg.num_layers - 1 else sorted(clean)
                            events.append({"call": calls, "iter": i, "cond": is_cond, "layer": layer, "group": g,
                                           "budget": budget_block * tpg, "clean_tokens": len(clean) * tpg,
                                           "clean_before": sorted(clean), "clean_after": after,
                                           "keep_group": keep_slots[0], "n_keys": n_keys,
                                           "indices": np.asarray(kept[layer]).T})
                        br["clean"] = list(keep_slots)
                    if update[g]:
                        br["res"][g] = h_out - h_in
                else:
                    assert status[calls, g] == REUSED_STATUS
                    h_out = dense(tok[rows], params["patch"], jnp.float32) + br["res"][g]
                hidden = hidden.at[rows].set(h_out)
                if update[g]:
                    br["cnt"][g] += 1
                    if br["cnt"][g] >= steps:
                        br["clean"].append(g)
            y = head(cfg, params, hidden, cond["e"], jnp.arange(groups * tpg) // hw)
            v[is_cond] = unpatchify(cfg, y, frames, hh, ww)
            calls += 1
        x, state = solver.step(state, x, v[False] + guidance * (v[True] - v[False]), jnp.asarray(mask_i))
        out.append(np.asarray(x))
    return np.stack(out), {"events": events, "attn": np.asarray(attn, np.int64).reshape(-1, 5)}
