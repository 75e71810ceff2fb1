"""FlowCache's SkyReels-V2 executor (spec flowcache.md §2): per-group forwards over a K/V buffer, per-group reuse.

Each transformer call runs the window's groups (blocks of frames) one after another, oldest first; group g
writes its K/V into slot g of the branch's buffer and attends to slots 0..g, so finished groups keep their
stale K/V. Groups after the last updating one and finished groups are not run; in long-video windows
("overlap") the prefix group runs only on the first two calls. A group being updated decides per step:
its first ``ret_steps`` and its last update compute; otherwise the polynomial-rescaled relative L1 change of
its time modulation e0 accumulates and the group reuses its transformer residual while below the threshold.
The decisions depend only on timesteps, so they are made on the host; a reused group runs nothing.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from flowcache_jax.kv.compress import CompressConfig
from flowcache_jax.solvers import FlowUniPC
from models.layers import dense
from models.skyreels_df import DFWindow, cached_conditions
from models.skyreels_v2 import SkyReelsConfig, head, patchify, rope_tables, run_blocks, unpatchify

POLY_1P3B_RET = (-5.21862437e4, 9.23041404e3, -5.28275948e2, 1.36987616e1, -4.99875664e-2)  # spec §2.3


@dataclasses.dataclass(frozen=True)
class GroupCache:
    threshold: float | None  # None: no reuse (the reference's restructured forward alone)
    ret_steps: int = 5
    coeffs: tuple[float, ...] = POLY_1P3B_RET


@functools.lru_cache(maxsize=32)
def _group_forward(cfg: SkyReelsConfig, frames_per_group: int, tpg: int, ccfg: CompressConfig | None = None):
    """Compiled per-group forwards: (params, tokens, e0, ctx, cos, sin, kv, g, key_mask, clean_rows, keep)
    -> (h_in, h_out, kv, kept indices). ``key_mask`` None: slots 0..g (the plain executor); otherwise the
    buffer rows the group sees (compress mode), and with ``clean_rows`` the clean rows are compressed first."""

    def fn(p, tok, e0, ctx, cos, sin, kv, g, key_mask, clean_rows, keep):
        h_in = dense(tok, p["patch"], jnp.float32)
        frame_of = jnp.arange(tpg) // (tpg // frames_per_group)
        if key_mask is None:
            ranges = jnp.broadcast_to(jnp.stack([jnp.int32(0), (g + 1) * tpg]), (tpg, 1, 2))
        else:  # the own rows come from the mask too
            ranges = jnp.zeros((tpg, 1, 2), jnp.int32)
        comp = None if clean_rows is None else {"rows": clean_rows, "keep": keep, "cfg": ccfg}
        h_out, kv, extra = run_blocks(cfg, p, h_in, e0, frame_of, ctx, cos, sin, ranges, kv=kv, write_start=g * tpg,
                                      key_mask=key_mask, compress=comp)
        return h_in, h_out, kv, (extra[1] if comp is not None else None)

    return jax.jit(fn)


@functools.lru_cache(maxsize=32)
def _head_fn(cfg: SkyReelsConfig, hw: int):
    return jax.jit(lambda prm, h, e: head(cfg, prm, h, e, jnp.arange(h.shape[0]) // hw))


def run_window(cfg: SkyReelsConfig, params: dict, latents: np.ndarray, ctx_cond: jax.Array, ctx_uncond: jax.Array,
               fps: int, plan: DFWindow, sigmas: np.ndarray, timesteps: np.ndarray, guidance: float,
               frames_per_group: int, cache: GroupCache, overlap: bool = False, addnoise_condition: int = 0,
               addnoise_eps: np.ndarray | None = None, budget_block: int = 0,
               compression: CompressConfig | None = None) -> tuple[np.ndarray, dict]:
    """Latents after every iteration [I, C, F, H, W] and per-call records (status, counters, rel-L1, ...).

    ``budget_block`` > 0 turns on FlowCache's KV compression (spec flowcache §4.3): a group attends to the
    branch's clean groups plus the updating groups up to it, and while more than ``budget_block`` groups are
    clean, every layer of the group pass scores the clean slots with the group's queries and keeps the top
    tokens in the newest clean slot (the clean list shrinks after the last layer). Events are recorded.
    """
    if budget_block not in (0, 1):
        raise ValueError(f"budget_block must be 0 (off) or 1 (as shipped), got {budget_block}")
    c, frames, hh, ww = latents.shape
    pt, ph, pw = cfg.patch_size
    hw = (hh // ph) * (ww // pw)
    groups = frames // frames_per_group
    tpg = frames_per_group // pt * hw
    steps = len(timesteps)
    cutoff = steps - 1
    model_t = plan.model_t(timesteps, addnoise_condition)
    p = plan.prefix_frames
    a = 0.001 * addnoise_condition
    cos_all, sin_all = rope_tables(cfg.head_dim, frames // pt, hh // ph, ww // pw)
    ccfg = None
    if budget_block:
        base = compression or CompressConfig(budget=1)
        ccfg = dataclasses.replace(base, budget=budget_block * tpg)
    group_fn = _group_forward(cfg, frames_per_group // pt, tpg, ccfg)
    head_fn, cond_fn = _head_fn(cfg, hw), cached_conditions(cfg, fps)
    solver = FlowUniPC(sigmas)
    x = jnp.asarray(latents)
    state = solver.init_state(x)
    buf = (jnp.zeros((cfg.num_layers, groups * tpg, cfg.num_heads, cfg.head_dim), jnp.float32),) * 2
    branches = {b: {"kv": buf, "cnt": np.zeros(groups, int), "acc": np.zeros(groups), "prev_e0": [None] * groups,
                    "res": [None] * groups, "clean": []} for b in (True, False)}
    rec = {k: [] for k in ("status", "group_update", "group_cnt_before", "rel_l1", "rescaled", "acc_after",
                           "call_iter", "call_cond")}
    events, attn = [], []
    out, calls = [], 0
    for i in range(len(model_t)):
        mask_i = plan.update_mask[i]
        x_in = x
        if p:
            x_in = x.at[:, :p].set(x[:, :p] * (1 - a) + jnp.asarray(addnoise_eps[i]) * a)
        tok = patchify(cfg, x_in)
        update = mask_i.reshape(groups, frames_per_group).any(1)
        last = int(np.flatnonzero(update).max()) if update.any() else -1
        v = {}
        for is_cond, ctx in ((True, ctx_cond), (False, ctx_uncond)):
            br = branches[is_cond]
            if overlap and budget_block and calls in (1, 2):  # the prefix enters the other branch's clean list
                branches[calls == 1]["clean"].append(0)
            cond = cond_fn(params, jnp.asarray(model_t[i]), ctx)
            e0 = np.asarray(cond["e0"])
            hidden = jnp.zeros((groups * tpg, cfg.dim), jnp.float32)
            status = np.zeros(groups, np.int8)
            rel_l1, rescaled = np.full(groups, np.nan), np.full(groups, np.nan)
            cnt_before = br["cnt"].copy()
            for g in range(last + 1):
                if br["cnt"][g] >= steps or (overlap and g * frames_per_group < p and calls > 1):
                    continue  # finished, or the prefix after the first cond and uncond calls
                fs = slice(g * frames_per_group, (g + 1) * frames_per_group)
                e0_g = e0[g * frames_per_group]
                compute = True
                if update[g] and cache.threshold is not None:
                    s = br["cnt"][g]
                    if s < cache.ret_steps or s >= cutoff:
                        br["acc"][g] = 0.0
                    else:
                        prev = br["prev_e0"][g]
                        rel_l1[g] = float(np.abs(e0_g.astype(np.float64) - prev).mean() / np.abs(prev).mean())
                        rescaled[g] = float(np.polyval(cache.coeffs, rel_l1[g]))
                        br["acc"][g] += rescaled[g]
                        compute = br["acc"][g] >= cache.threshold
                        if compute:
                            br["acc"][g] = 0.0
                if update[g]:
                    br["prev_e0"][g] = e0_g.astype(np.float64)
                rows = slice(g * tpg, (g + 1) * tpg)
                if compute:
                    mask = clean_rows = keep = None
                    if budget_block:
                        clean = list(br["clean"])
                        active = [j for j in range(g + 1) if update[j] and j not in clean]
                        squeeze = len(clean) > budget_block
                        keep_slots = sorted(clean)[-budget_block:] if squeeze else sorted(clean)
                        slots = keep_slots + active or [g]
                        mask = np.zeros(groups * tpg, bool)
                        for j in slots:
                            mask[j * tpg:(j + 1) * tpg] = True
                        if squeeze:
                            clean_rows = jnp.asarray(np.concatenate([np.arange(j * tpg, (j + 1) * tpg)
                                                                     for j in sorted(clean)]))
                            keep = jnp.int32(keep_slots[0] * tpg)
                        mask = jnp.asarray(mask)
                    h_in, h_out, br["kv"], kept = group_fn(
                        params, tok[rows], cond["e0"][fs], cond["ctx"], jnp.asarray(cos_all[rows]),
                        jnp.asarray(sin_all[rows]), br["kv"], jnp.int32(g), mask, clean_rows, keep)
                    if budget_block:
                        n_keys = int(np.asarray(mask).sum())
                        for layer in range(cfg.num_layers):
                            attn.append((calls, layer, g, n_keys, int(kept is not None)))
                        if kept is not None:
                            for layer in range(cfg.num_layers):
                                after = list(keep_slots) if layer == cfg.num_layers - 1 else sorted(clean)
                                events.append({"call": calls, "iter": i, "cond": is_cond, "layer": layer,
                                               "group": g, "budget": budget_block * tpg,
                                               "clean_tokens": len(clean) * tpg, "clean_before": sorted(clean),
                                               "clean_after": after, "keep_group": keep_slots[0], "n_keys": n_keys,
                                               "indices": np.asarray(kept[layer]).T})
                            br["clean"] = list(keep_slots)
                    if update[g]:
                        br["res"][g] = h_out - h_in
                    status[g] = 1 if update[g] else 3
                else:
                    h_out = dense(tok[rows], params["patch"], jnp.float32) + br["res"][g]
                    status[g] = 2
                hidden = hidden.at[rows].set(h_out)
                if update[g]:
                    br["cnt"][g] += 1
                    if br["cnt"][g] >= steps:
                        br["clean"].append(g)
            v[is_cond] = unpatchify(cfg, head_fn(params, hidden, cond["e"]), frames, hh, ww)
            for k, val in (("status", status), ("group_update", update), ("group_cnt_before", cnt_before),
                           ("rel_l1", rel_l1), ("rescaled", rescaled), ("acc_after", br["acc"].copy()),
                           ("call_iter", i), ("call_cond", is_cond)):
                rec[k].append(val)
            calls += 1
        x, state = solver.step(state, x, v[False] + guidance * (v[True] - v[False]), jnp.asarray(mask_i))
        out.append(np.asarray(x))
    records = {k: np.asarray(val) for k, val in rec.items()}
    records["events"], records["attn"] = events, np.asarray(attn, np.int64).reshape(-1, 5)
    return np.stack(out), records
