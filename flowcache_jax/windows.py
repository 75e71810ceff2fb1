"""Long diffusion-forcing videos as windows: a thin host loop over the one sampler (SkyReels-V2's long video).

A video of ``latent_frames`` is cut into windows of at most ``base`` latent frames; every window after the
first starts with the previous window's last ``overlap`` frames as a clean prefix (diffusers' rule: no decode
and re-encode). Each window is one ``Sampler.run`` over a one-stage table whose positions are the window's
causal blocks (``schedules.df_window_table``); windows of one size share one sampler and so one compiled
function (iterations are padded to the longest window), and a host policy's state (TeaCache's reference
counter) is carried from window to window.

A batch (the samplers' ``batch`` B) runs every window for all B videos at once: each video has its own initial
noise, addnoise eps and prefix (the end of its own previous window); the windows and the decisions are shared.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from flowcache_jax.sampler import RunResult, Sampler
from flowcache_jax.schedules import ScheduleTable, df_frame_masks, df_window_table


@dataclasses.dataclass(frozen=True)
class DFPlan:
    """The run's static plan: window lengths and prefixes in latent frames (what run.py reports)."""

    windows: tuple[tuple[int, int], ...]  # (frames, prefix) per window
    latent_frames: int
    num_steps: int
    block: int

    @property
    def n_chunks(self) -> int:  # causal blocks of the whole video
        return -(-self.latent_frames // self.block)


def plan_windows(total: int, base: int, overlap: int, block: int) -> list[tuple[int, int]]:
    """(frames, prefix) per window: the first window has no prefix; each later one adds base - overlap frames."""
    if total <= base:
        return [(total - total % block or total, 0)]
    out, done = [(base, 0)], base
    while done < total:
        frames = min(total - done + overlap, base)
        frames -= frames % block
        if frames <= overlap:
            break
        out.append((frames, overlap))
        done += frames - overlap
    return out


@dataclasses.dataclass(frozen=True)
class DFSchedule:
    """What every window's table is built from: the step count, the AR offset, the grid, the prefix rules."""

    steps: int
    ar_step: int
    block: int
    timesteps: np.ndarray  # integer model timesteps [steps]
    sigmas: np.ndarray  # [steps + 1], last 0
    addnoise_condition: int = 0
    prefix_refresh: str = "every"  # "first": FlowCache's long-video rule (the prefix runs on the first call only)
    stage_len: int = 0  # iterations per compiled stage call: 0 = the whole window (1: latents after every one)


class WindowedSampler:
    """Runs the windows of a ``DFPlan`` with one policy; one ``Sampler`` (one compilation) per window size."""

    def __init__(self, make_sampler: Callable[[int], Sampler], schedule: DFSchedule, policy: Any):
        """``make_sampler(groups)`` binds ``policy`` to a denoiser of a window of that many blocks."""
        self.make_sampler, self.schedule, self.policy = make_sampler, schedule, policy
        self.samplers: dict[int, Sampler] = {}

    def sampler(self, groups: int) -> Sampler:
        if groups not in self.samplers:
            self.samplers[groups] = self.make_sampler(groups)
        return self.samplers[groups]

    @property
    def traces(self) -> int:
        return sum(s.traces for s in self.samplers.values())

    def tables(self, plan: DFPlan) -> list[ScheduleTable]:
        sc = self.schedule
        masks = [df_frame_masks(f, sc.block, sc.steps, sc.ar_step, p) for f, p in plan.windows]
        pad = max(len(m[1]) for m in masks)
        return [df_window_table(idx, upd, sc.block, sc.timesteps, sc.sigmas, p, sc.addnoise_condition,
                                sc.prefix_refresh, pad, first=w == 0, last=w == len(plan.windows) - 1,
                                stage_len=sc.stage_len)
                for w, ((idx, upd), (_, p)) in enumerate(zip(masks, plan.windows, strict=True))]

    def run(self, params: Any, cond: Any, plan: DFPlan, key: jax.Array, progress: bool = True,
            on_chunk: Callable | None = None, policy: Any = None, noise: list | None = None,
            eps: list | None = None, plan_state: Any = None, record_stages: bool = False) -> RunResult:
        """All windows for the samplers' batch of B videos; the result's ``video`` is [B, 1, C, frames, h, w].

        ``on_chunk(start, latents [C, n, h, w])`` gets the first video's latent frames as soon as no later window
        rewrites them (the decoded preview is the first video's, as for a batched MAGI-1 run). ``noise`` / ``eps``
        (per window: [B, C, F, h, w] and [B, I, C, prefix, h, w], or without the batch axis for B = 1) replace the
        seeded initial and prefix noise (parity with a reference run). Seeded, each window draws both for the
        whole batch at once (each video its own; B = 1 draws what a batch-free draw gives)."""
        sc, tables = self.schedule, self.tables(plan)
        slots = max(p for _, p in plan.windows) // sc.block
        results, video, done, emitted, t_callbacks = [], None, 0, 0, 0.0
        t0 = time.perf_counter()
        for wi, ((frames, prefix), table) in enumerate(tqdm(list(zip(plan.windows, tables, strict=True)),
                                                            desc="windows", disable=not progress, leave=False)):
            groups = frames // sc.block
            sampler = self.sampler(groups)
            b, (c, _, h, w) = sampler.batch, sampler.denoiser.chunk_shape
            if video is None:
                video = np.zeros((b, c, plan.latent_frames, h, w), np.float32)
            kw, ke = jax.random.split(jax.random.fold_in(key, wi))
            x = (_batched(noise[wi], (b, c, frames, h, w), "noise", wi) if noise is not None
                 else np.array(jax.random.normal(kw, (b, c, frames, h, w), jnp.float32)))
            if prefix:  # each video's prefix is the end of its own previous window
                x[:, :, :prefix] = video[:, :, done - prefix:done]
            iters = int(table.step_valid.sum())
            e = None
            if prefix:
                shape = (b, iters, c, prefix, h, w)
                e = (_batched(eps[wi], shape, "eps", wi) if eps is not None
                     else np.asarray(jax.random.normal(ke, shape, jnp.float32)))
                # -> [I, prefix blocks, B, C, block, h, w]
                e = e.reshape(b, iters, c, prefix // sc.block, sc.block, h, w).transpose(1, 3, 0, 2, 4, 5, 6)
            steps = table.num_stages * table.steps_per_stage
            cond_w = sampler.denoiser.window_cond(cond, prefix // sc.block, e, steps, slots, (b, c, sc.block, h, w))
            init = x.reshape(b, c, groups, sc.block, h, w).transpose(0, 2, 1, 3, 4, 5)
            res = sampler.run(params, cond_w, table, key, progress=False, initial_noise=init, policy=policy,
                              plan_state=plan_state, record_stages=record_stages)
            plan_state = res.plan_state
            results.append(res)
            final = res.video.transpose(0, 2, 1, 3, 4, 5).reshape(b, c, frames, h, w)
            video[:, :, done - prefix:done - prefix + frames] = final
            done += frames - prefix
            if on_chunk is not None:
                final_end = done - (plan.windows[wi + 1][1] if wi + 1 < len(plan.windows) else 0)
                if final_end > emitted:
                    t_cb = time.perf_counter()
                    on_chunk(emitted, video[0, :, emitted:final_end].copy())
                    t_callbacks += time.perf_counter() - t_cb
                    emitted = final_end
        out = merge(results, video[:, None])
        out.wall["denoise"] = time.perf_counter() - t0 - t_callbacks - out.wall["compile"] - out.wall.get("plan", 0)
        out.traces = self.traces
        return out


def _batched(a: Any, shape: tuple[int, ...], name: str, window: int) -> np.ndarray:
    """A given per-window noise as [B, ...] (a batch-free array is one video's)."""
    a = np.array(a, np.float32)
    if a.shape == shape[1:] and shape[0] == 1:
        a = a[None]
    if a.shape != shape:
        raise ValueError(f"{name} of window {window} has shape {a.shape}, expected {shape}")
    return a


def _pad(arrays: list[np.ndarray], fill) -> np.ndarray:
    if arrays[0].ndim < 2:
        return np.concatenate(arrays)
    w = max(a.shape[-1] for a in arrays)
    return np.concatenate([np.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, w - a.shape[-1])], constant_values=fill)
                           for a in arrays])


def merge(results: list[RunResult], video: np.ndarray) -> RunResult:
    """One result for a run of windows: per-call records stacked (blocks padded with -1 / nan), counts summed."""
    r0 = results[0]
    fields = {}
    for name in ("decisions", "chunk", "reason"):
        fields[name] = _pad([getattr(r, name) for r in results], -1)
    for name in ("rel", "update_l1", "acc_before", "acc", "diff_l1", "prev_l1", "velocity_l1", "cache_rel"):
        fields[name] = _pad([getattr(r, name) for r in results], np.nan)
    records = None
    if r0.plan_records is not None:
        records = {k: _pad([r.plan_records[k] for r in results],
                           np.nan if np.asarray(r0.plan_records[k]).dtype.kind == "f" else 0)
                   for k in r0.plan_records}
    wall = {k: sum(r.wall.get(k, 0.0) for r in results) for k in r0.wall}
    return RunResult(video=video, **fields, computed=sum(r.computed for r in results),
                     chunk_forwards_vanilla=sum(r.chunk_forwards_vanilla for r in results), wall=wall,
                     traces=0, branches=r0.branches, structure_skipped=sum(r.structure_skipped for r in results),
                     plan_records=records, plan_state=results[-1].plan_state, windows=results)
