"""The AR sampler: a Python loop over stages, one compiled function per run.

``stage_fn(params, cond, state, tables[stage]) -> (state, per-step records)`` scans over the stage's
steps; inside a step, the policy decides for all window positions at once (cheap arithmetic), then a
``lax.scan`` over positions (oldest first) runs an *un-batched* ``lax.cond`` per chunk: the compute
branch is one chunk forward, the reuse branch replays the cache. Nothing is vmapped around the cond,
so a reused chunk really skips its forward.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from flowcache_jax.denoiser import Denoiser, SlotInfo
from flowcache_jax.policies import Policy, StepInfo
from flowcache_jax.policies.base import NEW
from flowcache_jax.schedules import ScheduleTable
from flowcache_jax.solvers import euler_step
from flowcache_jax.state import SamplerState, init_state

REUSE_MODES = ("displacement", "residual")
METRIC_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_STEP_KEYS = ("chunk", "k", "t", "dt", "active", "step_valid", "global_first", "global_last")


@dataclasses.dataclass
class RunResult:
    video: np.ndarray  # [B, n_chunks, *chunk_shape], final latents
    decisions: np.ndarray  # int8 [steps, W]: 1 computed, 0 reused, -1 empty (positions oldest first)
    chunk: np.ndarray  # int32 [steps, W]: chunk id at each position, -1 empty
    rel: np.ndarray  # float32 [steps, W]: raw rel-L1 of the metric features (nan if no previous)
    update_l1: np.ndarray  # float32 [steps, W]: mean|x_new - x| / mean|x|, Theorem 1's L1_rel
    acc_before: np.ndarray  # float32 [steps, W]: the chunk's accumulator before the decision
    acc: np.ndarray  # float32 [steps, W]: after it
    reason: np.ndarray  # int8 [steps, W]: policies.base FORCED/NEW/WARMUP/THRESHOLD/REUSED, -1 empty
    diff_l1: np.ndarray  # float32 [steps, W]: mean |feat - prev_feat| (nan if no previous)
    prev_l1: np.ndarray  # float32 [steps, W]: mean |prev_feat|
    velocity_l1: np.ndarray  # float32 [steps, W]: mean |x_new - x| / |dt| (MagCache's calibration input)
    computed: int  # chunk forwards run
    chunk_forwards_vanilla: int
    wall: dict[str, float]  # compile / denoise seconds
    traces: int  # times the stage function was traced (compiled) by this sampler
    stage_latents: np.ndarray | None = None  # [stages, B, n_chunks, ...]: every chunk after each stage
    stage_reports: list | None = None  # per stage, the denoiser's ``report(kv)`` (e.g. compression events)
    probes: int = 0  # first-block probes run (FirstBlockCache), each ``probe_cost`` of a chunk forward
    probe_cost: float = 0.0

    @property
    def computed_fraction(self) -> float:
        return self.computed / max(self.chunk_forwards_vanilla, 1)

    @property
    def speedup_ideal(self) -> float:
        """Vanilla chunk forwards over the forwards run, probes counted at their share of a forward."""
        return self.chunk_forwards_vanilla / max(self.computed + self.probes * self.probe_cost, 1e-12)


def _take(a: jax.Array, i: jax.Array) -> jax.Array:
    return jax.lax.dynamic_index_in_dim(a, i, keepdims=False)


def _put(a: jax.Array, i: jax.Array, v: jax.Array) -> jax.Array:
    return jax.lax.dynamic_update_index_in_dim(a, v.astype(a.dtype), i, 0)


def _mean_abs(x: jax.Array) -> jax.Array:
    return jnp.mean(jnp.abs(x).reshape(x.shape[0], -1).astype(jnp.float32), axis=1)


class Sampler:
    """Binds a denoiser, a policy and a window; compiles the stage function once."""

    def __init__(self, denoiser: Denoiser, policy: Policy, window: int, batch: int = 1,
                 reuse: str = "displacement", metric_dtype: str = "float32", reencode_clean: bool = False):
        if reuse not in REUSE_MODES:
            raise ValueError(f"reuse must be one of {REUSE_MODES}, got {reuse!r}")
        if metric_dtype not in METRIC_DTYPES:
            raise ValueError(f"metric_dtype must be one of {tuple(METRIC_DTYPES)}, got {metric_dtype!r}")
        self.denoiser, self.policy, self.window, self.batch = denoiser, policy, window, batch
        self.features = getattr(policy, "features", "input")  # "input" metric or a "first_block" probe
        self.anchor = getattr(policy, "anchor", "previous")  # compare with the previous or last computed step
        if self.features == "first_block" and not hasattr(denoiser, "probe_features"):
            raise ValueError(f"policy {policy.name!r} probes the first block, which {type(denoiser).__name__} "
                             "does not have (use a transformer model such as MAGI-1)")
        if reencode_clean and not hasattr(denoiser, "encode_clean"):
            raise ValueError(f"{type(denoiser).__name__} has no encode_clean; set reencode_clean=False")
        self.reuse, self.metric_dtype, self.reencode_clean = reuse, METRIC_DTYPES[metric_dtype], reencode_clean
        self.traces = 0
        self._compiled: dict[tuple[int, int], Any] = {}  # per (steps per stage, window): one executable
        self._noise = jax.jit(lambda k: denoiser.sample_noise(k, batch))
        self._prepare = None

    # ----- state -------------------------------------------------------------------------------
    def init_state(self, params: Any, cond: Any) -> SamplerState:
        d, b = self.denoiser, self.batch
        latent = jax.ShapeDtypeStruct((b, *d.chunk_shape), jnp.float32)
        t = jax.ShapeDtypeStruct((), jnp.float32)
        types = (jnp.int32, jnp.int32, jnp.float32, jnp.float32, jnp.int32, jnp.int32)
        info = SlotInfo(*(jax.ShapeDtypeStruct((), dt) for dt in types))
        if self.features == "first_block":
            feat = jax.eval_shape(d.probe_features, params, cond, latent, info, d.init_kv(b, self.window))
        else:
            feat = jax.eval_shape(d.metric_features, params, latent, t)
        feat = jax.ShapeDtypeStruct(feat.shape, self.metric_dtype)
        if self.reuse == "displacement":
            cache = latent
        else:
            out, _ = jax.eval_shape(d.forward_chunk, params, cond, latent, info, d.init_kv(b, self.window))
            cache = out.residual
        return init_state(latent, feat, cache, self.window, d.init_kv(b, self.window),
                          self.policy.init_global())

    # ----- one step ----------------------------------------------------------------------------
    def _step(self, params: Any, cond: Any, state: SamplerState, row: dict) -> tuple[SamplerState, dict]:
        d, w = self.denoiser, self.window
        active, chunk = row["active"], row["chunk"]
        ring = jnp.where(active, chunk % w, 0)
        ring_drop = jnp.where(active, chunk % w, w)  # out of range -> scatter dropped
        x = state.latents[ring]
        window_end = jnp.max(jnp.where(active, chunk, -1)) + 1

        def slot_info(j):
            return SlotInfo(chunk=chunk[j], k=row["k"][j], t=row["t"][j], dt=row["dt"][j], position=j,
                            window_end=window_end)

        if self.features == "first_block":  # one block per active chunk, un-batched cond: inactive ones cost nothing
            zeros = jnp.zeros(state.prev_feat.shape[1:], self.metric_dtype)
            feats = jax.lax.map(lambda j: jax.lax.cond(
                active[j], lambda: d.probe_features(params, cond, x[j], slot_info(j), state.kv).astype(zeros.dtype),
                lambda: zeros), jnp.arange(w))
            probed = jnp.sum(active.astype(jnp.int32))
        else:
            feats = jax.vmap(lambda xi, ti: d.metric_features(params, xi, ti))(x, row["t"]).astype(self.metric_dtype)
            probed = jnp.zeros((), jnp.int32)
        prev = state.prev_feat[ring]
        present = active & state.prev_present[ring]
        info = StepInfo(active=active, present=present, k=row["k"], diff_l1=_mean_abs(feats - prev),
                        prev_l1=_mean_abs(prev), global_first=row["global_first"],
                        global_last=row["global_last"], step=state.step)
        acc_before = state.acc[ring]
        dec = self.policy.decide(acc_before, state.glob, info)
        empty = active & ~state.has_cache[ring]  # never reuse an empty cache: compute, as a new chunk
        compute = dec.compute | empty
        dec = dec._replace(acc=jnp.where(empty & ~dec.compute, 0.0, dec.acc),
                           reason=jnp.where(empty & ~dec.compute, jnp.int8(NEW), dec.reason))

        def position(carry, j):
            def run(carry):
                latents, cache, has_cache, kv, n = carry
                r = ring[j]
                xj, cj = _take(latents, r), _take(cache, r)
                slot = slot_info(j)

                def forward(kv):
                    out, kv = d.forward_chunk(params, cond, xj, slot, kv)
                    x_new = euler_step(xj, out.velocity, slot.dt)
                    c_new = x_new - xj if self.reuse == "displacement" else out.residual
                    return x_new, c_new.astype(cj.dtype), kv, jnp.ones((), jnp.int32)

                def replay(kv):
                    if self.reuse == "displacement":
                        x_new = xj + cj
                    else:
                        v = d.velocity_from_residual(params, cond, xj, slot, cj)
                        x_new = euler_step(xj, v, slot.dt)
                    return x_new, cj, kv, jnp.zeros((), jnp.int32)

                x_new, c_new, kv, ran = jax.lax.cond(compute[j], forward, replay, kv)
                step_l1 = jnp.mean(jnp.abs(x_new - xj))
                upd = step_l1 / jnp.maximum(jnp.mean(jnp.abs(xj)), 1e-30)
                vel = jnp.where(slot.dt != 0, step_l1 / jnp.abs(jnp.where(slot.dt != 0, slot.dt, 1.0)), jnp.nan)
                carry = (_put(latents, r, x_new), _put(cache, r, c_new),
                         has_cache.at[r].set(has_cache[r] | (ran > 0)), kv, n + ran)
                return carry, (upd, vel.astype(jnp.float32))

            nan = jnp.float32(jnp.nan)
            return jax.lax.cond(active[j], run, lambda c: (c, (nan, nan)), carry)

        carry = (state.latents, state.cache, state.has_cache, state.kv, state.computed)
        (latents, cache, has_cache, kv, computed), (upd, vel_l1) = jax.lax.scan(position, carry, jnp.arange(w))
        # The metric's anchor: every step's features, or (FirstBlockCache) those of the last computed step.
        keep_feat = active & (compute if self.anchor == "computed" else True)
        state = state.replace(
            latents=latents, cache=cache, has_cache=has_cache, kv=kv, computed=computed, glob=dec.glob,
            acc=state.acc.at[ring_drop].set(dec.acc, mode="drop"),
            prev_feat=state.prev_feat.at[jnp.where(keep_feat, ring, w)].set(feats, mode="drop"),
            prev_present=jnp.zeros_like(state.prev_present).at[ring_drop].set(True, mode="drop"),
            probed=state.probed + probed, step=state.step + 1)
        rel = jnp.where(present, info.diff_l1 / (info.prev_l1 + 1e-8), jnp.nan)
        nan = jnp.float32(jnp.nan)
        rec = {"decisions": jnp.where(active, compute.astype(jnp.int8), jnp.int8(-1)),
               "chunk": jnp.where(active, chunk, -1), "rel": rel, "update_l1": upd,
               "acc_before": jnp.where(active, acc_before, nan), "acc": jnp.where(active, dec.acc, nan),
               "reason": jnp.where(active, dec.reason, jnp.int8(-1)).astype(jnp.int8),
               "diff_l1": jnp.where(present, info.diff_l1, nan), "prev_l1": jnp.where(present, info.prev_l1, nan),
               "velocity_l1": vel_l1}
        return state, rec

    def _reencode(self, params: Any, cond: Any, state: SamplerState, chunks: jax.Array) -> SamplerState:
        """Re-encode chunks that finished in the previous stage (ring slot -> chunk id or -1), oldest first."""
        w = self.window
        order = jnp.argsort(jnp.where(chunks >= 0, chunks, jnp.iinfo(jnp.int32).max))

        def one(kv, r):
            c = chunks[r]
            info = SlotInfo(chunk=c, k=jnp.int32(0), t=jnp.float32(1.0), dt=jnp.float32(0.0),
                            position=jnp.int32(-1), window_end=c + 1)
            kv = jax.lax.cond(c >= 0, lambda kv: self.denoiser.encode_clean(params, cond, state.latents[r], info, kv),
                              lambda kv: kv, kv)
            return kv, None

        kv, _ = jax.lax.scan(one, state.kv, order[:w])
        return state.replace(kv=kv)

    def _stage(self, params: Any, cond: Any, state: SamplerState, tab: dict, noise: jax.Array
               ) -> tuple[SamplerState, dict]:
        self.traces += 1  # Python side effect: runs once per trace, i.e. per compilation
        w = self.window
        if self.reencode_clean:
            state = self._reencode(params, cond, state, tab["reencode"])
        enter = tab["enter"]
        ent = enter >= 0
        bcast = ent.reshape((w,) + (1,) * (state.latents.ndim - 1))
        state = state.replace(
            latents=jnp.where(bcast, noise.astype(state.latents.dtype), state.latents),
            chunk=jnp.where(ent, enter, state.chunk), acc=jnp.where(ent, 0.0, state.acc),
            has_cache=state.has_cache & ~ent, prev_present=state.prev_present & ~ent)

        def step(state, row):
            def skip(state):
                nan = jnp.full((w,), jnp.nan, jnp.float32)
                neg = jnp.full((w,), -1, jnp.int8)
                return state, {"decisions": neg, "chunk": jnp.full((w,), -1, jnp.int32), "rel": nan,
                               "update_l1": nan, "acc_before": nan, "acc": nan, "reason": neg, "diff_l1": nan,
                               "prev_l1": nan, "velocity_l1": nan}
            return jax.lax.cond(row["step_valid"], lambda s: self._step(params, cond, s, row), skip, state)

        rows = {k: tab[k] for k in _STEP_KEYS}
        state, rec = jax.lax.scan(step, state, rows)
        if hasattr(self.denoiser, "end_stage"):  # e.g. KV compression when a chunk has finished
            state = state.replace(kv=self.denoiser.end_stage(params, state.kv, tab["finish"], tab["n_chunks"]))
        return state, rec

    def entering_noise(self, table: ScheduleTable, stage: int, key: jax.Array,
                       initial_noise: np.ndarray | None) -> np.ndarray:
        """Noise of the chunks entering at ``stage`` per ring slot: ``initial_noise[:, c]`` or fold_in(key, c)."""
        shape = (self.window, self.batch, *self.denoiser.chunk_shape)
        out = np.zeros(shape, np.float32)
        for r, c in enumerate(table.enter[stage]):
            if c >= 0:
                out[r] = (initial_noise[:, c] if initial_noise is not None
                          else np.asarray(self._noise(jax.random.fold_in(key, int(c)))))
        return out

    # ----- host loop -------------------------------------------------------------------------------
    def compiled_temp_bytes(self, table: ScheduleTable) -> int:
        """XLA's temporary-buffer size of the compiled stage function (0 where the backend reports none)."""
        exe = self._compiled.get((table.steps_per_stage, table.window))
        mem = exe.memory_analysis() if exe is not None else None
        return int(getattr(mem, "temp_size_in_bytes", 0) or 0)

    def compile(self, params: Any, cond: Any, state: SamplerState, table: ScheduleTable) -> float:
        """AOT-compile the stage function once (shapes do not depend on the stage or video length)."""
        if table.window != self.window:
            raise ValueError(f"schedule window {table.window} != sampler window {self.window}")
        shape = (table.steps_per_stage, table.window)
        if shape in self._compiled:
            return 0.0
        t0 = time.perf_counter()
        noise = jax.ShapeDtypeStruct((self.window, self.batch, *self.denoiser.chunk_shape), jnp.float32)
        # The state (latents, caches, KV buffer) is donated so that accelerators update it in place; the CPU
        # backend cannot use donated buffers and would only warn.
        donate = () if jax.default_backend() == "cpu" else (2,)
        self._compiled[shape] = jax.jit(self._stage, donate_argnums=donate).lower(
            params, cond, state, table.stage(0), noise).compile()
        jax.block_until_ready(self._noise(jax.random.PRNGKey(0)))  # compile the noise sampler here too
        return time.perf_counter() - t0

    def run(self, params: Any, cond: Any, table: ScheduleTable, key: jax.Array, progress: bool = True,
            initial_noise: np.ndarray | None = None, record_stages: bool = False,
            on_stage: Any = None, on_chunk: Any = None) -> RunResult:
        """Generate a video. ``initial_noise`` [B, n_chunks, *chunk_shape] replaces the seeded noise;
        ``on_stage(stage, state)`` is called after every stage (inspection, memory sampling);
        ``on_chunk(chunk, latent [B, *chunk_shape])`` as soon as a chunk is final (e.g. to decode it with a VAE
        while the later chunks are still being denoised)."""
        limit = getattr(self.denoiser, "n_chunks", None)
        if limit is not None and table.n_chunks > limit:
            raise ValueError(f"the schedule has {table.n_chunks} chunks but the denoiser's KV buffer holds {limit}")
        state = self.init_state(params, cond)
        if getattr(self.denoiser, "prefix_chunks", 0):  # the clean prefix of a video continuation
            if self._prepare is None:
                self._prepare = jax.jit(self.denoiser.prepare_kv)
            state = state.replace(kv=self._prepare(params, cond, state.kv))
        t_compile = self.compile(params, cond, state, table)
        compiled = self._compiled[(table.steps_per_stage, table.window)]
        video = np.zeros((self.batch, table.n_chunks, *self.denoiser.chunk_shape), np.float32)
        recs, stage_latents, reports = [], [], []
        if initial_noise is not None:
            initial_noise = np.asarray(initial_noise, np.float32)
            want = (self.batch, table.n_chunks, *self.denoiser.chunk_shape)
            if initial_noise.shape != want:
                raise ValueError(f"initial_noise has shape {initial_noise.shape}, expected {want}")
        noises = [self.entering_noise(table, st, key, initial_noise) for st in range(table.num_stages)]
        if record_stages:  # chunks that have not entered yet show their initial noise
            for st, noise in enumerate(noises):
                for r in np.flatnonzero(table.enter[st] >= 0):
                    video[:, table.enter[st][r]] = noise[r]
        t0, t_callbacks = time.perf_counter(), 0.0
        for s in tqdm(range(table.num_stages), desc=f"{self.policy.name} stages", disable=not progress,
                      leave=False):
            noise = noises[s]
            for r in np.flatnonzero(table.enter[s] >= 0):  # not-yet-finished chunks show their current latent
                video[:, table.enter[s][r]] = noise[r]
            state, rec = compiled(params, cond, state, table.stage(s), noise)
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
        computed, probing = int(state.computed), self.features != "input"
        t_denoise = time.perf_counter() - t0 - t_callbacks  # decoding in on_chunk is the caller's to time
        rec = {k: np.concatenate([np.asarray(r[k]) for r in recs])[table.step_valid.reshape(-1)]
               for k in recs[0]}
        return RunResult(video=video, decisions=rec["decisions"], chunk=rec["chunk"], rel=rec["rel"],
                         update_l1=rec["update_l1"], acc_before=rec["acc_before"], acc=rec["acc"],
                         reason=rec["reason"], diff_l1=rec["diff_l1"], prev_l1=rec["prev_l1"],
                         velocity_l1=rec["velocity_l1"], computed=computed, probes=int(state.probed),
                         probe_cost=float(getattr(self.denoiser, "probe_cost", 0.0)) if probing else 0.0,
                         chunk_forwards_vanilla=table.chunk_forwards,
                         wall={"compile": t_compile, "denoise": t_denoise}, traces=self.traces,
                         stage_latents=np.stack(stage_latents) if record_stages else None,
                         stage_reports=reports if record_stages else None)
