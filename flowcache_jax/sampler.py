"""The one AR sampler: a Python loop over stages, one compiled stage function per shape, for every model.

``stage_fn(params, cond, state, tables[stage], noise, knobs) -> (state, per-step records)`` scans over the
stage's steps; inside a step the policy decides for all window positions at once (cheap arithmetic, or a
decision table made on the host for rules that read only the timesteps), then either

- per position (oldest first, a ``lax.scan``) an *un-batched* ``lax.cond`` per chunk and CFG branch: the
  compute branch is one chunk forward over the model's KV structure, the reuse branch replays the cache; or
- ``joint``: one forward of the whole window per branch under one ``lax.cond`` (SkyReels' whole-window DiT
  call, full or block-causal attention), reused as a whole.

Then the solver slot (Euler, or FlowUniPC with a state per chunk) advances the chunks being updated.
Nothing is vmapped around a cond, so a reused chunk really skips its forward. Policy knobs (threshold,
warm-up, coefficients), the solver's grid and the schedule are arguments: a sweep compiles once.

With a ``layout`` (``flowcache_jax.sharding``) the stage is compiled for a device mesh: its arguments are placed
with shardings (parameters as the caller sharded them, K/V buffers and token-major caches over "seq", CFG branch
axes over "data", everything the host or the policy reads replicated) and the decisions are constrained to one
replicated value, so every device takes the same branch of every cond.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from flowcache_jax import sharding
from flowcache_jax.denoiser import Denoiser, SlotInfo
from flowcache_jax.policies import Decision, Policy, StepInfo
from flowcache_jax.policies.base import NEW, structure
from flowcache_jax.schedules import ScheduleTable
from flowcache_jax.solvers import Euler
from flowcache_jax.state import SamplerState, init_state

REUSE_MODES = ("displacement", "residual")
METRIC_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_STEP_KEYS = ("chunk", "k", "t", "dt", "active", "refresh", "plan", "plan_reason", "step_valid", "global_first",
              "global_last")
_REC_NAN = ("rel", "update_l1", "acc_before", "acc", "diff_l1", "prev_l1", "velocity_l1", "cache_rel")


@dataclasses.dataclass
class RunResult:
    video: np.ndarray  # [B, n_chunks, *chunk_shape], final latents
    decisions: np.ndarray  # int8 [steps * branches, W]: 1 computed, 0 reused, -1 not run (oldest first); one
    #                        row per model call: step-major, CFG branch-minor (one branch: one row per step)
    chunk: np.ndarray  # int32 [steps * branches, W]: chunk id at each position of each call, -1 where not run
    rel: np.ndarray  # float32 [steps, W]: raw rel-L1 of the metric features (nan if no previous)
    update_l1: np.ndarray  # float32 [steps, W]: mean|x_new - x| / mean|x|, Theorem 1's L1_rel
    acc_before: np.ndarray  # float32 [steps, W]: the chunk's accumulator before the decision
    acc: np.ndarray  # float32 [steps, W]: after it
    reason: np.ndarray  # int8 [steps, W]: policies.base FORCED/NEW/WARMUP/THRESHOLD/REUSED, -1 empty
    diff_l1: np.ndarray  # float32 [steps, W]: mean |feat - prev_feat| (nan if no previous)
    prev_l1: np.ndarray  # float32 [steps, W]: mean |prev_feat|
    velocity_l1: np.ndarray  # float32 [steps, W]: mean |x_new - x| / |dt| (MagCache's calibration input)
    computed: int  # chunk forwards run (each CFG branch counts)
    chunk_forwards_vanilla: int  # chunk forwards of the uncached run: every held chunk, every branch, every step
    wall: dict[str, float]  # compile / denoise seconds
    traces: int  # times the stage function was traced (compiled) by this sampler
    stage_latents: np.ndarray | None = None  # [stages, B, n_chunks, ...]: every chunk after each stage
    stage_reports: list | None = None  # per stage, the denoiser's ``report(kv)`` (e.g. compression events)
    probes: int = 0  # first-block probes run (FirstBlockCache), each ``probe_cost`` of a chunk forward
    probe_cost: float = 0.0
    branches: int = 1
    structure_skipped: int = 0  # forwards the executor's structure skips exactly (finished / not-started chunks)
    plan_records: dict | None = None  # a host policy's own per-call records (parity with its reference)
    plan_state: Any = None  # a host policy's state after the run (carried into the next DF window)
    windows: list | None = None  # a windowed (long DF) run: the result of each window
    # float32 [steps, W]: mean |new cache - old cache| / mean |old cache| of a chunk that computed over a cache (what
    # a reuse would have replayed; nan elsewhere, and under displacement reuse): TeaCache's fitting target
    cache_rel: np.ndarray | None = None

    @property
    def computed_fraction(self) -> float:
        return self.computed / max(self.chunk_forwards_vanilla, 1)

    @property
    def speedup_ideal(self) -> float:
        """Vanilla chunk forwards over the forwards run, probes counted at their share of a forward."""
        return self.chunk_forwards_vanilla / max(self.computed + self.probes * self.probe_cost, 1e-12)

    @property
    def cache_skipped(self) -> int:
        """Forwards the policy's reuse skipped (the rest of the saving is the structure's)."""
        return self.chunk_forwards_vanilla - self.structure_skipped - self.computed


@dataclasses.dataclass
class ResumePoint:
    """Where a run stands after a stage: everything the rest of the run reads, so another process continues it
    bit-identically (``flowcache_jax.resume`` writes and reads it)."""

    stage: int  # stages done
    state: SamplerState  # the device state after them (latents, caches, accumulators, K/V, solver, counters)
    video: np.ndarray  # the host's video so far (finished chunks final, entered ones their entering noise)
    recs: list  # the per-stage records so far (numpy)
    t_denoise: float  # denoise seconds spent so far


def _take(a: jax.Array, i: jax.Array) -> jax.Array:
    return jax.lax.dynamic_index_in_dim(a, i, keepdims=False)


def _put(a: jax.Array, i: jax.Array, v: jax.Array) -> jax.Array:
    return jax.lax.dynamic_update_index_in_dim(a, v.astype(a.dtype), i, 0)


def _cache_rel(new: jax.Array, old: jax.Array, had: jax.Array) -> jax.Array:
    """Relative L1 change of a chunk's cache over one computed step (nan when it held none before)."""
    new, old = new.astype(jnp.float32), old.astype(jnp.float32)
    return jnp.where(had, jnp.mean(jnp.abs(new - old)) / (jnp.mean(jnp.abs(old)) + 1e-8), jnp.nan)


def _mean_abs(x: jax.Array) -> jax.Array:
    return jnp.mean(jnp.abs(x).reshape(x.shape[0], -1).astype(jnp.float32), axis=1)


class Sampler:
    """Binds a denoiser, a policy, a solver and a window; compiles the stage function once per shape."""

    def __init__(self, denoiser: Denoiser, policy: Policy, window: int, batch: int = 1,
                 reuse: str = "displacement", metric_dtype: str = "float32", reencode_clean: bool = False,
                 solver: Any = None, joint: bool = False, features: str | None = None,
                 identity_ring: bool = False, layout: sharding.Layout | None = None):
        if reuse not in REUSE_MODES:
            raise ValueError(f"reuse must be one of {REUSE_MODES}, got {reuse!r}")
        if metric_dtype not in METRIC_DTYPES:
            raise ValueError(f"metric_dtype must be one of {tuple(METRIC_DTYPES)}, got {metric_dtype!r}")
        self.denoiser, self.policy, self.window, self.batch = denoiser, policy, window, batch
        self.solver = Euler() if solver is None else solver
        self.noise_draws = int(getattr(self.solver, "noise_draws", 0))  # fresh normals per chunk (ReNoise)
        self.branches = int(getattr(denoiser, "branches", 1))
        self.host = bool(getattr(policy, "host", False))  # decisions from a table made on the host
        # what the step computes for the policy: "input" features, a "first_block" probe, or "none" (host tables; a
        # caller whose rules read other features, e.g. SkyReels' timestep metric, says so with ``features``)
        self.features = "none" if self.host else (features or getattr(policy, "features", "input"))
        self.identity_ring = identity_ring  # position j always holds chunk j in slot j (a DF window): no gathers
        self.anchor = getattr(policy, "anchor", "previous")  # compare with the previous or last computed step
        self.joint = joint
        # CFG branches as one batched forward where the model can and the policy decides alike for all branches
        self.branch_alike = (self.branches > 1 and hasattr(denoiser, "forward_branches")
                             and bool(getattr(policy, "branch_alike", True)))
        if self.features == "first_block" and not hasattr(denoiser, "probe_features"):
            raise ValueError(f"policy {policy.name!r} probes the first block, which {type(denoiser).__name__} "
                             "does not have (use a transformer model such as MAGI-1)")
        if reencode_clean and not hasattr(denoiser, "encode_clean"):
            raise ValueError(f"{type(denoiser).__name__} has no encode_clean; set reencode_clean=False")
        if reuse == "displacement" and not self.solver.stateless:
            raise ValueError("a multistep solver needs reuse='residual' (a replayed displacement would skip its "
                             "state update)")
        if joint and (not hasattr(denoiser, "forward_window") or reuse != "residual"):
            raise ValueError(f"joint execution needs reuse='residual' and a denoiser with forward_window "
                             f"({type(denoiser).__name__})")
        if self.host and not hasattr(denoiser, "timestep_features"):
            raise ValueError(f"policy {policy.name!r} reads the model's timestep features, which "
                             f"{type(denoiser).__name__} does not give")
        self.reuse, self.metric_dtype, self.reencode_clean = reuse, METRIC_DTYPES[metric_dtype], reencode_clean
        self.layout = layout if layout is not None and layout.size > 1 else None  # a device mesh (None: one device)
        self.traces = 0
        self.compile_seconds = 0.0
        self._compiled: dict[tuple[int, int], Any] = {}  # per (steps per stage, window): one executable
        self._noise = jax.jit(lambda k: denoiser.sample_noise(k, batch))
        self._prepare = None

    # ----- state -------------------------------------------------------------------------------
    def init_state(self, params: Any, cond: Any) -> SamplerState:
        d, b, w = self.denoiser, self.batch, self.window
        latent = jax.ShapeDtypeStruct((b, *d.chunk_shape), jnp.float32)
        t = jax.ShapeDtypeStruct((), jnp.float32)
        types = (jnp.int32, jnp.int32, jnp.float32, jnp.float32, jnp.int32, jnp.int32, jnp.int32)
        info = SlotInfo(*(jax.ShapeDtypeStruct((), dt) for dt in types))

        def static_branch(fn):  # the branch is a Python int, not an abstract leaf
            return lambda p, c, x, i, kv: fn(p, c, x, i._replace(branch=0), kv)

        if self.features == "first_block":
            feat = jax.eval_shape(static_branch(d.probe_features), params, cond, latent, info, d.init_kv(b, w))
        elif self.features == "none":
            feat = jax.ShapeDtypeStruct((b, 1), jnp.float32)
        else:
            feat = jax.eval_shape(d.metric_features, params, latent, t)
        feat = jax.ShapeDtypeStruct(feat.shape, self.metric_dtype)
        if self.reuse == "displacement":
            cache = latent
        else:
            if self.joint:  # the residual of one position of a whole-window call
                xs = jax.ShapeDtypeStruct((w, *latent.shape), latent.dtype)
                infos = SlotInfo(*(jax.ShapeDtypeStruct((w,), dt) for dt in types[:6]),
                                 jax.ShapeDtypeStruct((), jnp.int32))
                _, res, _ = jax.eval_shape(lambda p, c, x, i, kv: d.forward_window(p, c, x, i._replace(branch=0), kv),
                                           params, cond, xs, infos, d.init_kv(b, w))
                res = jax.ShapeDtypeStruct(res.shape[1:], res.dtype)
            else:
                out, _ = jax.eval_shape(static_branch(d.forward_chunk), params, cond, latent, info, d.init_kv(b, w))
                res = out.residual
            cache = jax.ShapeDtypeStruct((self.branches, *res.shape), res.dtype)
        solver = jax.tree.map(lambda a: jnp.zeros((w, *a.shape), a.dtype), self.solver.chunk_state(latent))
        return init_state(latent, feat, cache, w, d.init_kv(b, w), self.policy.init_global(), solver)

    # ----- one step ----------------------------------------------------------------------------
    def _decide(self, params: Any, cond: Any, state: SamplerState, row: dict, x: jax.Array, ring: jax.Array,
                info_of: Any, knobs: dict) -> tuple[Decision, jax.Array, StepInfo, jax.Array, jax.Array]:
        """(decision, features, step info, probes run, acc before) of the step's positions."""
        d, w, active = self.denoiser, self.window, row["active"]
        if self.features == "first_block":  # one block per active chunk, un-batched cond: inactive ones cost nothing
            zeros = jnp.zeros(state.prev_feat.shape[1:], self.metric_dtype)
            feats = jax.lax.map(lambda j: jax.lax.cond(
                active[j], lambda: d.probe_features(params, cond, x[j], info_of(j, 0), state.kv).astype(zeros.dtype),
                lambda: zeros), jnp.arange(w))
            probed = jnp.sum(active.astype(jnp.int32))
        elif self.features == "none":
            feats = jnp.zeros(state.prev_feat.shape, self.metric_dtype)
            probed = jnp.zeros((), jnp.int32)
        else:
            feats = jax.vmap(lambda xi, ti: d.metric_features(params, xi, ti))(x, row["t"]).astype(self.metric_dtype)
            probed = jnp.zeros((), jnp.int32)
        prev = state.prev_feat[ring]
        present = active & state.prev_present[ring]
        # On a mesh the metric's reductions are one replicated value (reduced over every shard) before any rule
        # reads them, and so is the decision: every device branches alike.
        diff_l1, prev_l1 = sharding.replicate(self.layout, (_mean_abs(feats - prev), _mean_abs(prev)))
        info = StepInfo(active=active, present=present, k=row["k"], diff_l1=diff_l1, prev_l1=prev_l1,
                        global_first=row["global_first"], global_last=row["global_last"], step=state.step)
        acc_before = state.acc[ring]
        if self.host:  # the table's decision; the host rule's accumulators are in its own records
            dec = Decision(compute=active, acc=acc_before, glob=state.glob, reason=row["plan_reason"])
        else:
            dec = self.policy.decide(acc_before, state.glob, info, knobs["policy"])
        return sharding.replicate(self.layout, dec), feats, info, probed, acc_before

    def _step(self, params: Any, cond: Any, state: SamplerState, row: dict, knobs: dict
              ) -> tuple[SamplerState, dict]:
        w, nb = self.window, self.branches
        active, chunk, refresh = row["active"], row["chunk"], row["refresh"]
        held = chunk >= 0
        ring = jnp.where(held, chunk % w, 0)
        ring_drop = jnp.where(active, chunk % w, w)  # out of range -> scatter dropped
        x = state.latents if self.identity_ring else state.latents[ring]
        window_end = jnp.max(jnp.where(held, chunk, -1)) + 1

        def info_of(j, b):
            return SlotInfo(chunk=chunk[j], k=row["k"][j], t=row["t"][j], dt=row["dt"][j], position=j,
                            window_end=window_end, step=state.step, branch=b)

        dec, feats, info, probed, acc_before = self._decide(params, cond, state, row, x, ring, info_of, knobs)
        empty = active & ~state.has_cache[ring]  # never reuse an empty cache: compute, as a new chunk
        compute = dec.compute | empty
        dec = dec._replace(acc=jnp.where(empty & ~dec.compute, 0.0, dec.acc),
                           reason=jnp.where(empty & ~dec.compute, jnp.int8(NEW), dec.reason))
        # per CFG branch: the policy's decision, restricted by a host table, plus K/V-only refreshes
        per_branch = (compute[None, :] & (row["plan"] | empty[None, :])) | refresh[None, :]
        run_pos = active | refresh
        consts = knobs["solver"]
        if self.joint:
            state, ran, upd, vel_l1, crel = self._joint(params, cond, state, row, x, ring, held, per_branch, consts)
            calls = jnp.where(held[None, :], ran[:, None].astype(jnp.int8), jnp.int8(-1))
        else:
            state, ran, upd, vel_l1, crel = self._positions(params, cond, state, row, x, ring, run_pos, per_branch,
                                                            info_of,
                                                      consts)
            calls = jnp.where(run_pos[None, :], ran.astype(jnp.int8), jnp.int8(-1))
        # The metric's anchor: every step's features, or (FirstBlockCache) those of the last computed step.
        keep_feat = active & (compute if self.anchor == "computed" else True)
        state = state.replace(
            glob=dec.glob, acc=state.acc.at[ring_drop].set(dec.acc, mode="drop"),
            prev_feat=state.prev_feat.at[jnp.where(keep_feat, ring, w)].set(feats, mode="drop"),
            prev_present=jnp.zeros_like(state.prev_present).at[ring_drop].set(True, mode="drop"),
            probed=state.probed + probed, step=state.step + 1,
            skipped=state.skipped + nb * jnp.sum((held & ~(run_pos | self.joint)).astype(jnp.int32)))
        rel = jnp.where(info.present, info.diff_l1 / (info.prev_l1 + 1e-8), jnp.nan)
        nan = jnp.float32(jnp.nan)
        shown = calls >= 0
        rec = {"decisions": calls, "chunk": jnp.where(shown, chunk[None, :], -1), "rel": rel, "update_l1": upd,
               "acc_before": jnp.where(active, acc_before, nan), "acc": jnp.where(active, dec.acc, nan),
               "reason": jnp.where(active, dec.reason, jnp.int8(-1)).astype(jnp.int8),
               "diff_l1": jnp.where(info.present, info.diff_l1, nan),
               "prev_l1": jnp.where(info.present, info.prev_l1, nan), "velocity_l1": vel_l1,
               "cache_rel": jnp.where(active, crel, nan)}
        return state, rec

    def _apply(self, state: SamplerState, x: jax.Array, v: jax.Array, computed: jax.Array, row: dict,
               ring: jax.Array, held: jax.Array, consts: dict) -> tuple[SamplerState, jax.Array, jax.Array]:
        """The step's updates of every position at once, after its forwards and replays: the solver (or the replayed
        displacement) for the chunks being updated; the others keep latent and solver state. Chunk j's latent is
        read by no other position within the step, so deferring its update to here changes nothing."""
        w, active, dt = self.window, row["active"], row["dt"]
        sol = state.solver if self.identity_ring else jax.tree.map(lambda a: a[ring], state.solver)
        x_new, st_new = jax.vmap(lambda xi, vi, si, di: self.solver.update(si, xi, vi, di, consts))(x, v, sol, dt)
        cache = None
        if self.reuse == "displacement":  # a reused chunk replays its last displacement verbatim
            cache = state.cache if self.identity_ring else state.cache[ring]
            back = computed.reshape((w,) + (1,) * (x.ndim - 1))
            x_new = jnp.where(back, x_new, x + cache.astype(x.dtype))
            cache = jnp.where(back, (x_new - x).astype(cache.dtype), cache)
        upd = active.reshape((w,) + (1,) * (x.ndim - 1))
        x_new = jnp.where(upd, x_new, x)
        st_new = jax.tree.map(lambda n, o: jnp.where(active.reshape((w,) + (1,) * (n.ndim - 1)), n, o), st_new, sol)
        step_l1 = jnp.mean(jnp.abs(x_new - x).reshape(w, -1), axis=1)
        rel = step_l1 / jnp.maximum(jnp.mean(jnp.abs(x).reshape(w, -1), axis=1), 1e-30)
        vel = jnp.where(dt != 0, step_l1 / jnp.abs(jnp.where(dt != 0, dt, 1.0)), jnp.nan)
        nan = jnp.float32(jnp.nan)
        rel, vel = jnp.where(active, rel, nan), jnp.where(active, vel, nan).astype(jnp.float32)
        if self.identity_ring:
            state = state.replace(latents=x_new, solver=st_new, cache=state.cache if cache is None else cache)
        else:
            drop = jnp.where(active, ring, w)  # only updated chunks are written back
            state = state.replace(latents=state.latents.at[drop].set(x_new, mode="drop"),
                                  solver=jax.tree.map(lambda a, s: a.at[drop].set(s, mode="drop"), state.solver,
                                                      st_new))
            if cache is not None:
                state = state.replace(cache=state.cache.at[drop].set(cache, mode="drop"))
        return state, rel, vel

    def _positions(self, params, cond, state, row, x, ring, run_pos, per_branch, info_of, consts):
        """Per position, oldest first: an un-batched cond per CFG branch (forward or replay); then ``_apply``."""
        d, nb, w = self.denoiser, self.branches, self.window
        active = row["active"]
        zero_v = jnp.zeros_like(x[0])
        batched = self.branch_alike and d.batches_branches(cond)
        nan = jnp.float32(jnp.nan)

        def position(carry, j):
            def run(carry):
                cache, has_cache, kv, n = carry
                r, xj = ring[j], x[j]
                if self.reuse == "displacement":  # one decision for all branches: replay the whole step
                    def forward(kv):
                        outs = []
                        for b in range(nb):
                            out, kv = d.forward_chunk(params, cond, xj, info_of(j, b), kv)
                            outs.append(out.velocity)
                        v = outs[0] if nb == 1 else d.combine(params, cond, outs)
                        return v.astype(zero_v.dtype), kv, jnp.ones((nb,), jnp.int32)

                    v, kv, ran = jax.lax.cond(per_branch[0, j], forward,
                                              lambda kv: (zero_v, kv, jnp.zeros((nb,), jnp.int32)), kv)
                    crel = nan
                elif batched:  # both branches decide alike: one batched forward (or replay) for both
                    cj = _take(cache, r)
                    slot = info_of(j, 0)

                    def forward(kv):
                        vb, res, kv = d.forward_branches(params, cond, xj, slot, kv)
                        return vb, res.astype(cj.dtype), kv, jnp.ones((nb,), jnp.int32)

                    def replay(kv):
                        return d.velocity_branches(params, cond, xj, slot, cj), cj, kv, jnp.zeros((nb,), jnp.int32)

                    vb, c_new, kv, ran = jax.lax.cond(per_branch[0, j], forward, replay, kv)
                    v = d.combine(params, cond, [vb[b] for b in range(nb)]).astype(zero_v.dtype)
                    crel = _cache_rel(c_new, cj, has_cache[r])
                    cache = _put(cache, r, c_new)
                else:
                    vs, rans, cs = [], [], []
                    for b in range(nb):
                        cb = _take(cache, r)[b]
                        slot = info_of(j, b)

                        def forward(kv, slot=slot, cb=cb):
                            out, kv = d.forward_chunk(params, cond, xj, slot, kv)
                            return out.velocity, out.residual.astype(cb.dtype), kv, jnp.ones((), jnp.int32)

                        def replay(kv, slot=slot, cb=cb):
                            v = d.velocity_from_residual(params, cond, xj, slot, cb)
                            return v, cb, kv, jnp.zeros((), jnp.int32)

                        v_b, c_new, kv, ran_b = jax.lax.cond(per_branch[b, j], forward, replay, kv)
                        vs.append(v_b)
                        cs.append(c_new)
                        rans.append(ran_b)
                    v = (vs[0] if nb == 1 else d.combine(params, cond, vs)).astype(zero_v.dtype)
                    ran = jnp.stack(rans)
                    crel = _cache_rel(jnp.stack(cs), _take(cache, r), has_cache[r])
                    cache = _put(cache, r, jnp.stack(cs))
                has_cache = has_cache.at[r].set(has_cache[r] | (jnp.all(ran > 0) & active[j]))
                crel = jnp.where(jnp.all(ran > 0), crel, nan)
                return (cache, has_cache, kv, n + jnp.sum(ran)), (v, ran, crel)

            return jax.lax.cond(run_pos[j], run, lambda c: (c, (zero_v, jnp.zeros((nb,), jnp.int32), nan)), carry)

        carry = (state.cache, state.has_cache, state.kv, state.computed)
        (cache, has_cache, kv, computed), (v, ran, crel) = jax.lax.scan(position, carry, jnp.arange(w))
        state = state.replace(cache=cache, has_cache=has_cache, kv=kv, computed=computed)
        state, upd, vel = self._apply(state, x, v, ran[:, 0] > 0, row, ring, row["chunk"] >= 0, consts)
        return state, ran.T, upd, vel, crel

    def _joint(self, params, cond, state, row, x, ring, held, per_branch, consts):
        """One forward of the whole window per CFG branch (reused as a whole), then ``_apply``."""
        d, nb, w = self.denoiser, self.branches, self.window
        active = row["active"]
        infos = SlotInfo(chunk=row["chunk"], k=row["k"], t=row["t"], dt=row["dt"], position=jnp.arange(w),
                         window_end=jnp.max(jnp.where(held, row["chunk"], -1)) + 1, step=state.step, branch=0)
        cache = state.cache if self.identity_ring else state.cache[ring]  # [W, branches, ...]
        kv, vs, rans, cs = state.kv, [], [], []

        def window_replay(fn, branch, residual):  # every position's cheap head on its cached residual
            def one(xi, c, k, t, dt, pos, ri):
                return fn(params, cond, xi, SlotInfo(c, k, t, dt, pos, infos.window_end, state.step, branch), ri)

            return jax.vmap(one)(x, row["chunk"], row["k"], row["t"], row["dt"], jnp.arange(w), residual)

        if self.branch_alike and d.batches_branches(cond):  # both branches decide alike: one batched call
            def forward(kv):
                v, res, kv = d.window_branches(params, cond, x, infos, kv)
                res = jnp.moveaxis(res, 0, 1).astype(cache.dtype)
                return jnp.moveaxis(v, 0, 1), res, kv, jnp.ones((nb,), jnp.int32)

            def replay(kv):
                return window_replay(d.velocity_branches, 0, cache), cache, kv, jnp.zeros((nb,), jnp.int32)

            v, new_cache, kv, ran = jax.lax.cond(jnp.any(per_branch[0] & active), forward, replay, kv)
            vs, cs, rans = [v[:, b] for b in range(nb)], [new_cache[:, b] for b in range(nb)], list(ran)
        for b in range(0 if vs else nb):
            info_b = infos._replace(branch=b)
            cb = cache[:, b]

            def forward(kv, info_b=info_b, cb=cb):
                v, res, kv = d.forward_window(params, cond, x, info_b, kv)
                return v, res.astype(cb.dtype), kv, jnp.ones((), jnp.int32)

            def replay(kv, b=b, cb=cb):
                return window_replay(d.velocity_from_residual, b, cb), cb, kv, jnp.zeros((), jnp.int32)

            # the window call runs when a block being updated computes (prefix refreshes ride along)
            v, c_new, kv, ran_b = jax.lax.cond(jnp.any(per_branch[b] & active), forward, replay, kv)
            vs.append(v)
            cs.append(c_new)
            rans.append(ran_b)
        v = vs[0] if nb == 1 else d.combine(params, cond, vs)
        ran = jnp.stack(rans)
        new_cache = jnp.stack(cs, 1)
        had = state.has_cache if self.identity_ring else state.has_cache[ring]
        crel = jnp.where(held & jnp.all(ran > 0), jax.vmap(_cache_rel)(new_cache, cache, had), jnp.nan)
        if self.identity_ring:
            state = state.replace(cache=new_cache, has_cache=state.has_cache | (held & jnp.all(ran > 0)))
        else:
            drop = jnp.where(held, ring, w)
            state = state.replace(cache=state.cache.at[drop].set(new_cache, mode="drop"),
                                  has_cache=state.has_cache.at[drop].set(state.has_cache[ring] | jnp.all(ran > 0),
                                                                         mode="drop"))
        state = state.replace(kv=kv, computed=state.computed + jnp.sum(held.astype(jnp.int32)) * jnp.sum(ran))
        state, upd, vel = self._apply(state, x, v.astype(x.dtype), jnp.full((w,), True), row, ring, held, consts)
        return state, ran, upd, vel, crel

    def _reencode(self, params: Any, cond: Any, state: SamplerState, chunks: jax.Array) -> SamplerState:
        """Re-encode chunks that finished in the previous stage (ring slot -> chunk id or -1), oldest first."""
        w = self.window
        order = jnp.argsort(jnp.where(chunks >= 0, chunks, jnp.iinfo(jnp.int32).max))

        def one(kv, r):
            c = chunks[r]
            info = SlotInfo(chunk=c, k=jnp.int32(0), t=jnp.float32(1.0), dt=jnp.float32(0.0),
                            position=jnp.int32(-1), window_end=c + 1, step=state.step)
            kv = jax.lax.cond(c >= 0, lambda kv: self.denoiser.encode_clean(params, cond, state.latents[r], info, kv),
                              lambda kv: kv, kv)
            return kv, None

        kv, _ = jax.lax.scan(one, state.kv, order[:w])
        return state.replace(kv=kv)

    def _stage(self, params: Any, cond: Any, state: SamplerState, tab: dict, noise: jax.Array, knobs: dict
               ) -> tuple[SamplerState, dict]:
        self.traces += 1  # Python side effect: runs once per trace, i.e. per compilation
        w, nb = self.window, self.branches
        if self.reencode_clean:
            state = self._reencode(params, cond, state, tab["reencode"])
        enter = tab["enter"]
        ent = enter >= 0
        bcast = ent.reshape((w,) + (1,) * (state.latents.ndim - 1))
        fresh = jax.tree.map(lambda a: jnp.zeros_like(a), state.solver)
        if self.noise_draws:  # the entering chunks' re-noising draws ride along with their initial noise
            noise, extra = noise
            fresh = self.solver.with_noise(fresh, extra)
        state = state.replace(
            latents=jnp.where(bcast, noise.astype(state.latents.dtype), state.latents),
            chunk=jnp.where(ent, enter, state.chunk), acc=jnp.where(ent, 0.0, state.acc),
            has_cache=state.has_cache & ~ent, prev_present=state.prev_present & ~ent,
            solver=jax.tree.map(lambda z, a: jnp.where(ent.reshape((w,) + (1,) * (a.ndim - 1)), z, a), fresh,
                                state.solver))

        def step(state, row):
            def skip(state):
                nan = jnp.full((w,), jnp.nan, jnp.float32)
                neg = jnp.full((w,), -1, jnp.int8)
                return state, {"decisions": jnp.full((nb, w), -1, jnp.int8), "chunk": jnp.full((nb, w), -1, jnp.int32),
                               "reason": neg, **{k: nan for k in _REC_NAN}}
            # a model's per-step conditions (e.g. SkyReels' time embeddings of every block) ride along with the row
            c = cond if "step_cond" not in row else {**cond, "step": row["step_cond"]}
            return jax.lax.cond(row["step_valid"], lambda s: self._step(params, c, s, row, knobs), skip, state)

        rows = {k: tab[k] for k in _STEP_KEYS}
        if hasattr(self.denoiser, "step_conditions"):  # computed once per stage for all its steps, vectorised
            rows["step_cond"] = self.denoiser.step_conditions(params, cond, tab["t"])
        state, rec = jax.lax.scan(step, state, rows)
        if hasattr(self.denoiser, "end_stage"):  # e.g. KV compression when a chunk has finished
            state = state.replace(kv=self.denoiser.end_stage(params, state.kv, tab["finish"], tab["n_chunks"]))
        return state, rec

    def entering_noise(self, table: ScheduleTable, stage: int, key: jax.Array, initial_noise: np.ndarray | None,
                       solver_noise: np.ndarray | None = None) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Noise of the chunks entering at ``stage`` per ring slot: ``initial_noise[:, c]`` or fold_in(key, c); with
        a solver that draws fresh noise (``noise_draws``), also its draws [W, draws, B, ...]: ``solver_noise[:, c]``
        or fold_in(fold_in(key, c), 1 + j)."""
        shape = (self.window, self.batch, *self.denoiser.chunk_shape)
        out = np.zeros(shape, np.float32)
        extra = np.zeros((self.window, self.noise_draws, *shape[1:]), np.float32)
        for r, c in enumerate(table.enter[stage]):
            if c >= 0:
                kc = jax.random.fold_in(key, int(c))
                out[r] = initial_noise[:, c] if initial_noise is not None else np.asarray(self._noise(kc))
                for j in range(self.noise_draws):
                    extra[r, j] = (solver_noise[:, c, j] if solver_noise is not None
                                   else np.asarray(self._noise(jax.random.fold_in(kc, 1 + j))))
        return (out, extra) if self.noise_draws else out

    # ----- host loop -------------------------------------------------------------------------------
    def compiled_temp_bytes(self, table: ScheduleTable) -> int:
        """XLA's temporary-buffer size of the compiled stage function (0 where the backend reports none)."""
        exe = self._compiled.get((table.steps_per_stage, table.window))
        mem = exe.memory_analysis() if exe is not None else None
        return int(getattr(mem, "temp_size_in_bytes", 0) or 0)

    def _stage_tables(self, table: ScheduleTable, plan: dict | None) -> list[dict]:
        tabs = [table.stage(s) for s in range(table.num_stages)]
        for s, tab in enumerate(tabs):
            p, w = tab["active"].shape
            tab["plan"] = np.ones((p, self.branches, w), bool) if plan is None else plan["compute"][s]
            tab["plan_reason"] = np.zeros((p, w), np.int8) if plan is None else plan["reason"][s]
        return tabs

    def knobs_of(self, policy: Policy | None) -> dict:
        """The runtime knobs of ``policy`` (default: the sampler's own, which it must share the structure of) and
        of the solver."""
        if policy is not None and structure(policy) != structure(self.policy):
            raise ValueError(f"policy {policy!r} does not have the structure this sampler was compiled for "
                             f"({self.policy!r}): build another sampler")
        return {"policy": (policy or self.policy).knobs(), "solver": self.solver.consts()}

    def compile(self, params: Any, cond: Any, state: SamplerState, table: ScheduleTable) -> float:
        """AOT-compile the stage function once per (steps per stage, window): the stage, the video length and
        the policy's knobs (threshold, warm-up, coefficients) are arguments, not constants."""
        if table.window != self.window:
            raise ValueError(f"schedule window {table.window} != sampler window {self.window}")
        shape = (table.steps_per_stage, table.window)
        if shape in self._compiled:
            return 0.0
        t0 = time.perf_counter()
        noise = jax.ShapeDtypeStruct((self.window, self.batch, *self.denoiser.chunk_shape), jnp.float32)
        if self.noise_draws:
            noise = (noise, jax.ShapeDtypeStruct((self.window, self.noise_draws, *noise.shape[1:]), jnp.float32))
        # The state (latents, caches, KV buffer) is donated so that accelerators update it in place; the CPU
        # backend cannot use donated buffers and would only warn.
        donate = () if jax.default_backend() == "cpu" else (2,)
        args = (params, cond, state, self._stage_tables(table, None)[0], noise, self.knobs_of(None))
        kw = {}
        if self.layout is not None:  # compiled for the mesh: the arguments' shardings, the state's kept
            ins = self._placement(params, cond, state)
            args = (*self._place(args[:4], ins[:4]),
                    jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=ins[4]), noise),
                    sharding.put(args[5], ins[5]))
            kw = dict(in_shardings=ins, out_shardings=(ins[2], self.layout.replicated))
        self._compiled[shape] = jax.jit(self._stage, donate_argnums=donate, **kw).lower(*args).compile()
        jax.block_until_ready(self._noise(jax.random.PRNGKey(0)))  # compile the noise sampler here too
        dt = time.perf_counter() - t0
        self.compile_seconds += dt
        return dt

    def _placement(self, params: Any, cond: Any, state: SamplerState) -> tuple:
        """Shardings of the stage's (params, cond, state, table, noise, knobs) on the mesh: the parameters' own
        (``sharding.shard_params``; replicated where unplaced), the state's by ``sharding.state_shardings``, the
        rest replicated."""
        lay = self.layout
        return (sharding.shardings_of(params, lay), lay.replicated,
                sharding.state_shardings(state, lay, self.reuse == "residual"), lay.replicated, lay.replicated,
                lay.replicated)

    def _place(self, args: tuple, shardings: tuple) -> tuple:
        return tuple(sharding.put(a, s) for a, s in zip(args, shardings, strict=True))

    def plan(self, params: Any, cond: Any, table: ScheduleTable, policy: Policy, plan_state: Any = None
             ) -> tuple[dict | None, dict | None, Any]:
        """A host policy's decision table for ``table`` (None for in-graph policies)."""
        if not self.host:
            return None, None, None
        feats = self.denoiser.timestep_features(params, cond, table)
        return policy.plan(table, feats, self.branches, plan_state)

    def run(self, params: Any, cond: Any, table: ScheduleTable, key: jax.Array, progress: bool = True,
            initial_noise: np.ndarray | None = None, record_stages: bool = False,
            on_stage: Any = None, on_chunk: Any = None, policy: Policy | None = None,
            plan_state: Any = None, solver_noise: np.ndarray | None = None, resume: ResumePoint | None = None,
            on_checkpoint: Any = None, checkpoint_every: int = 0) -> RunResult:
        """Generate a video. ``initial_noise`` [B, n_chunks, *chunk_shape] replaces the seeded noise;
        ``on_stage(stage, state)`` is called after every stage (inspection, memory sampling);
        ``on_chunk(chunk, latent [B, *chunk_shape])`` as soon as a chunk is final (e.g. to decode it with a VAE
        while the later chunks are still being denoised). ``policy`` (same rule, other knobs, e.g. another threshold)
        runs on the same compiled function; ``plan_state`` carries a host policy's state from a previous window;
        ``solver_noise`` [B, n_chunks, draws, *chunk_shape] replaces a re-noising solver's seeded draws.
        ``on_checkpoint(ResumePoint)`` is called after every ``checkpoint_every``-th stage (not after the last);
        ``resume`` continues such a point: the same call with it produces the same result as the run it came from
        (the finished chunks are handed to ``on_chunk`` again first, so a streaming decoder rebuilds its state)."""
        knobs = self.knobs_of(policy)
        limit = getattr(self.denoiser, "n_chunks", None)
        if limit is not None and table.n_chunks > limit:
            raise ValueError(f"the schedule has {table.n_chunks} chunks but the denoiser's KV buffer holds {limit}")
        state = self.init_state(params, cond)
        ins = None
        if self.layout is not None:  # everything on the mesh, as the stage was compiled for it
            ins = self._placement(params, cond, state)
            params, cond, state = self._place((params, cond, state), ins[:3])
        if resume is not None:  # the saved state replaces the fresh one (its K/V already hold any prefix)
            if record_stages or not 0 < resume.stage < table.num_stages:
                raise ValueError(f"cannot resume at stage {resume.stage} of {table.num_stages}"
                                 + (" with record_stages" if record_stages else ""))
            if jax.tree.structure(resume.state) != jax.tree.structure(state):
                raise ValueError("the resume point's state does not have this sampler's structure")
            state = jax.tree.map(lambda a, b: jnp.asarray(a, b.dtype), resume.state, state)
            if ins is not None:
                state = sharding.put(state, ins[2])
        elif getattr(self.denoiser, "prefix_chunks", 0):  # the clean prefix of a video continuation
            if self._prepare is None:
                kw = {} if ins is None else dict(out_shardings=ins[2].kv)
                self._prepare = jax.jit(self.denoiser.prepare_kv, **kw)
            state = state.replace(kv=self._prepare(params, cond, state.kv))
        t_compile = self.compile(params, cond, state, table)
        compiled = self._compiled[(table.steps_per_stage, table.window)]
        t_plan = time.perf_counter()
        plan, plan_records, plan_state = self.plan(params, cond, table, policy or self.policy, plan_state)
        t_plan = time.perf_counter() - t_plan
        tabs = self._stage_tables(table, plan)
        video = np.zeros((self.batch, table.n_chunks, *self.denoiser.chunk_shape), np.float32)
        recs, stage_latents, reports = [], [], []
        if initial_noise is not None:
            initial_noise = np.asarray(initial_noise, np.float32)
            want = (self.batch, table.n_chunks, *self.denoiser.chunk_shape)
            if initial_noise.shape != want:
                raise ValueError(f"initial_noise has shape {initial_noise.shape}, expected {want}")
        if solver_noise is not None:
            solver_noise = np.asarray(solver_noise, np.float32)
            want = (self.batch, table.n_chunks, self.noise_draws, *self.denoiser.chunk_shape)
            if not self.noise_draws or solver_noise.shape != want:
                raise ValueError(f"solver_noise has shape {solver_noise.shape}, expected {want}"
                                 + ("" if self.noise_draws else " (this solver draws no noise)"))
        noises = [self.entering_noise(table, st, key, initial_noise, solver_noise) for st in range(table.num_stages)]
        starts = [n[0] if self.noise_draws else n for n in noises]  # the entering latents
        if record_stages:  # chunks that have not entered yet show their initial noise
            for st, noise in enumerate(starts):
                for r in np.flatnonzero(table.enter[st] >= 0):
                    video[:, table.enter[st][r]] = noise[r]
        first, t_before = 0, 0.0
        if resume is not None:
            first, t_before = resume.stage, resume.t_denoise
            video, recs = np.array(resume.video, np.float32), list(resume.recs)
            if on_chunk is not None:  # the chunks finished before the resume point, in order
                for st in range(first):
                    for r in np.flatnonzero(table.finish[st] >= 0):
                        on_chunk(int(table.finish[st][r]), video[:, table.finish[st][r]].copy())
        t0, t_callbacks = time.perf_counter(), 0.0
        for s in tqdm(range(first, table.num_stages), desc=f"{self.policy.name} stages", disable=not progress,
                      leave=False, initial=first, total=table.num_stages):
            noise = noises[s]
            for r in np.flatnonzero(table.enter[s] >= 0):  # not-yet-finished chunks show their current latent
                video[:, table.enter[s][r]] = starts[s][r]
            if ins is None:
                state, rec = compiled(params, cond, state, tabs[s], noise, knobs)
            else:
                state, rec = compiled(params, cond, state, *self._place((tabs[s], noise, knobs), ins[3:]))
            recs.append(rec)
            if on_stage is not None:
                on_stage(s, state)
            fin = table.finish[s]
            if (fin >= 0).any() or record_stages:
                lat = np.asarray(state.latents)
                ids = np.asarray(state.chunk) if record_stages else fin
                for r in np.flatnonzero(ids >= 0):
                    video[:, ids[r]] = lat[r]
                if on_chunk is not None:
                    t_cb = time.perf_counter()
                    for r in np.flatnonzero(fin >= 0):
                        on_chunk(int(fin[r]), lat[r])
                    t_callbacks += time.perf_counter() - t_cb
            if record_stages:
                stage_latents.append(video.copy())
                if hasattr(self.denoiser, "report"):
                    reports.append(jax.tree.map(np.asarray, self.denoiser.report(state.kv)))
            if on_checkpoint is not None and checkpoint_every > 0 and (s + 1) % checkpoint_every == 0 and \
                    s + 1 < table.num_stages:
                t_cb = time.perf_counter()
                recs = [jax.tree.map(np.asarray, r) for r in recs]
                on_checkpoint(ResumePoint(s + 1, state, video.copy(), list(recs),  # (the loop appends to recs)
                                          t_before + t_cb - t0 - t_callbacks))
                t_callbacks += time.perf_counter() - t_cb
        computed, probing = int(state.computed), self.features == "first_block"
        t_denoise = t_before + time.perf_counter() - t0 - t_callbacks  # decoding in on_chunk is the caller's
        valid = table.step_valid.reshape(-1)
        rec = {k: np.concatenate([np.asarray(r[k]) for r in recs])[valid] for k in recs[0]}
        for k in ("decisions", "chunk"):  # one row per model call
            rec[k] = rec[k].reshape(-1, rec[k].shape[-1])
        wall = {"compile": t_compile, "denoise": t_denoise}
        if self.host:
            wall["plan"] = t_plan
        return RunResult(video=video, decisions=rec["decisions"], chunk=rec["chunk"], rel=rec["rel"],
                         update_l1=rec["update_l1"], acc_before=rec["acc_before"], acc=rec["acc"],
                         reason=rec["reason"], diff_l1=rec["diff_l1"], prev_l1=rec["prev_l1"],
                         velocity_l1=rec["velocity_l1"], computed=computed, probes=int(state.probed),
                         probe_cost=float(getattr(self.denoiser, "probe_cost", 0.0)) if probing else 0.0,
                         chunk_forwards_vanilla=table.chunk_forwards * self.branches,
                         wall=wall, traces=self.traces,
                         stage_latents=np.stack(stage_latents) if record_stages else None,
                         stage_reports=reports if record_stages else None, branches=self.branches,
                         structure_skipped=int(state.skipped), plan_records=plan_records, plan_state=plan_state,
                         cache_rel=rec["cache_rel"])
