"""Static AR schedules, built on the host (numpy) before anything is traced.

Time convention (the whole project): MAGI's. ``t`` in [0, 1], ``t = 0`` is pure noise and ``t = 1`` is
clean data; a chunk that has completed ``k`` updates sits at ``grid[k]`` and an Euler step moves it by
``dt = grid[k + 1] - grid[k] > 0``. Wan/SkyReels' ``sigma`` is ``1 - t``.

Every schedule becomes one :class:`ScheduleTable`: per AR *stage*, per step inside the stage, per window
*position* (0 = oldest chunk of the window) the chunk id, its time index, t, dt and flags. Chunk ``c``
lives in ring slot ``c % window`` of the sampler state for its whole life, so the device-side state has a
fixed size whatever the video length, and all stage-dependent information arrives as fixed-shape arrays.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np


def _linspace01_f32(n: int) -> np.ndarray:
    """torch.linspace(0, 1, n + 1) in float32: each point rounded once, the upper half counted from 1."""
    step = np.float32(1.0 / n)
    i = np.arange(n + 1, dtype=np.float64)
    lo = i * np.float64(step)
    hi = 1.0 - np.float64(step) * (n - i)
    return np.where(i < (n + 1) // 2, lo, hi).astype(np.float32)


def _shift_map(u: np.ndarray, power: float, shift: float) -> np.ndarray:
    """u -> u^power, then the SD3/Wan shift, in float32 in the reference's operation order."""
    f = np.float32
    u = (u * u if power == 2 else np.power(u, f(power))).astype(f)
    return ((u * f(1.0 / shift)) / (f(1.0) - u * f((shift - 1.0) / shift))).astype(f)


def flow_time_grid(num_steps: int, power: float = 2.0, shift: float = 3.0) -> np.ndarray:
    """``num_steps + 1`` times from 0 (noise) to 1 (clean): u = (k/N)^power, then the SD3/Wan shift.

    With t = 1 - sigma, Wan's ``sigma' = s*sigma / (1 + (s-1)*sigma)`` and MAGI's
    ``t' = u / (s - (s-1)*u)`` are the same map, so one ``shift`` serves both. MAGI-1: power 2, shift 3
    (bit-identical to the reference's fp32 grid, whose last point is 1.0000001).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if power <= 0 or shift <= 0:
        raise ValueError(f"power and shift must be > 0, got power={power}, shift={shift}")
    return _shift_map(_linspace01_f32(num_steps), power, shift)


def magi_time_grid(num_steps: int, shortcut_mode: str = "8,16,16") -> np.ndarray:
    """MAGI-1's grid: squared uniform grid with shift 3; 12 steps use the distilled shortcut grid.

    The shortcut grid splits each quarter of u into steps of 1/8, 1/16, 1/16 ("8,16,16") or 1/16, 1/16, 1/8
    ("16,16,8"), then applies the same square and shift.
    """
    if num_steps != 12:
        return flow_time_grid(num_steps, power=2.0, shift=3.0)
    offsets = [0.0, 1 / 16, 2 / 16] if shortcut_mode == "16,16,8" else [0.0, 2 / 16, 3 / 16]
    u = np.array([a + o for a in (0.0, 0.25, 0.5, 0.75, 1.0) for o in offsets][:13], np.float32)
    return _shift_map(u, 2.0, 3.0)


def skyreels_sigmas(steps: int, shift: float = 8.0, sigma_max: float = 0.999) -> tuple[np.ndarray, np.ndarray]:
    """SkyReels' grid: sigmas [steps + 1] (last 0) and integer model timesteps [steps] (spec skyreels_v2 §4.2)."""
    s = np.linspace(sigma_max, 0.0, steps + 1)[:-1]
    sig = shift * s / (1 + (shift - 1) * s)
    t = (sig * 1000).astype(np.int64)
    return np.append(sig, 0.0).astype(np.float32), t


def flow_match_table(shift: float, num_train: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """The FlowMatchScheduler training table of Self-Forcing / CausVid (sigma_min 0, extra_one_step): sigmas and
    timesteps [num_train] in float32, s = linspace(1, 0, num_train + 1)[:-1] as torch rounds it,
    sigma = shift·s / (1 + (shift - 1)·s), t = 1000·sigma."""
    f = np.float32
    step = np.float64(np.float32(-1.0) / np.float32(num_train))  # torch.linspace(1, 0, n + 1): an f32 step, each
    i = np.arange(num_train + 1, dtype=np.float64)  # point rounded once, the second half counted from the end
    s = np.where(i < (num_train + 1) // 2, 1.0 + step * i, -step * (num_train - i)).astype(f)[:-1]
    sig = ((f(shift) * s) / (f(1.0) + f(shift - 1.0) * s)).astype(f)
    return sig, (sig * f(num_train)).astype(f)


def self_forcing_steps(step_list: list[int] | np.ndarray, shift: float = 5.0, warp: bool = True,
                       num_train: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """(model timesteps [N] float32, sigmas [N + 1] ending at 0) of a few-step denoising list.

    ``warp`` (Self-Forcing's warp_denoising_step) replaces each raw t by the training table's timestep at
    1000 - t ([1000, 750, 500, 250] -> [1000, 937.5, 833.33, 625]); a timestep's sigma is that of the nearest
    table entry, as the scheduler looks it up.
    """
    raw = np.asarray(step_list, np.int64)
    if raw.ndim != 1 or len(raw) < 1 or (raw < 0).any() or (raw > num_train).any():
        raise ValueError(f"denoising_step_list must be timesteps in [0, {num_train}], got {list(raw)}")
    sig, ts = flow_match_table(shift, num_train)
    t = np.concatenate([ts, [np.float32(0)]])[num_train - raw].astype(np.float32) if warp else raw.astype(np.float32)
    nearest = np.abs(ts[None, :].astype(np.float64) - t[:, None]).argmin(1)
    return t, np.append(sig[nearest], np.float32(0)).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class ScheduleTable:
    """Per-stage tables, axes [stage, step, position]; position 0 is the oldest chunk in the window."""

    chunk: np.ndarray  # int32 [S, P, W]; -1 where the position is empty
    k: np.ndarray  # int32 [S, P, W]; completed updates of the chunk before this step
    t: np.ndarray  # float32 [S, P, W]
    dt: np.ndarray  # float32 [S, P, W]
    active: np.ndarray  # bool [S, P, W]; the chunk is updated at this step
    first: np.ndarray  # bool [S, P, W]; the chunk's first update (it just entered)
    last: np.ndarray  # bool [S, P, W]; the chunk's last update (it is clean after it)
    step_valid: np.ndarray  # bool [S, P]; False for padding steps at the end
    global_first: np.ndarray  # bool [S, P]; first step of the whole video
    global_last: np.ndarray  # bool [S, P]; last step of the whole video
    enter: np.ndarray  # int32 [S, W]; per ring slot, the chunk whose first update is in this stage, or -1
    finish: np.ndarray  # int32 [S, W]; per ring slot, the chunk whose last update is in this stage, or -1
    grid: np.ndarray  # float32 [N + 1]
    n_chunks: int
    steps_per_chunk: int
    refresh: np.ndarray | None = None  # bool [S, P, W]: run the chunk's forward for its K/V only (no update)

    @property
    def num_stages(self) -> int:
        return self.chunk.shape[0]

    @property
    def steps_per_stage(self) -> int:
        return self.chunk.shape[1]

    @property
    def window(self) -> int:
        return self.chunk.shape[2]

    @property
    def num_steps(self) -> int:
        return int(self.step_valid.sum())

    @property
    def chunk_forwards(self) -> int:
        """Chunk forwards of the uncached run per CFG branch (the ideal-speedup denominator): every chunk the window
        holds at every step (MAGI: the chunks being updated; a DF window: all its blocks)."""
        return int(((self.chunk >= 0) & self.step_valid[..., None]).sum())

    def stage(self, s: int) -> dict[str, np.ndarray]:
        """The arrays one jitted stage call receives (fixed shapes for every stage)."""
        names = ("chunk", "k", "t", "dt", "active", "first", "last", "step_valid", "global_first",
                 "global_last", "enter", "finish")
        out = {n: getattr(self, n)[s] for n in names}
        out["refresh"] = np.zeros_like(self.active[s]) if self.refresh is None else self.refresh[s]
        out["reencode"] = self.finish[s - 1] if s > 0 else np.full_like(self.finish[0], -1)
        out["n_chunks"] = np.int32(self.n_chunks)
        return out


def _table_from_updates(starts: np.ndarray, steps_per_chunk: int, total_steps: int, stage_len: int,
                        window: int, grid: np.ndarray) -> ScheduleTable:
    """Chunk c is updated at global steps starts[c] + i, i = 0..N-1, with time index i."""
    n_chunks = len(starts)
    n_stages = math.ceil(total_steps / stage_len)
    shape = (n_stages, stage_len, window)
    chunk = np.full(shape, -1, np.int32)
    k = np.zeros(shape, np.int32)
    count = np.zeros((n_stages, stage_len), np.int32)
    if any(s0 % stage_len for s0 in starts):
        raise ValueError(f"chunks must enter at stage starts (stage length {stage_len}), got starts {list(starts)}")
    for c, s0 in enumerate(starts):
        for i in range(steps_per_chunk):
            g = s0 + i
            st, p = divmod(g, stage_len)
            j = count[st, p]
            if j >= window:
                raise ValueError(f"more than window={window} chunks active at step {g}")
            chunk[st, p, j], k[st, p, j] = c, i
            count[st, p] += 1
    active = chunk >= 0
    # Positions must be oldest-first: ascending chunk id among the active ones.
    order = np.argsort(np.where(active, chunk, np.iinfo(np.int32).max), axis=-1, kind="stable")
    chunk = np.take_along_axis(chunk, order, -1)
    k = np.take_along_axis(k, order, -1)
    active = chunk >= 0
    k = np.where(active, k, 0)
    t = np.where(active, grid[k], 0.0).astype(np.float32)
    dt = np.where(active, grid[np.minimum(k + 1, steps_per_chunk)] - grid[k], 0.0).astype(np.float32)
    flat = np.arange(n_stages * stage_len).reshape(n_stages, stage_len)
    enter = np.full((n_stages, window), -1, np.int32)
    finish = np.full((n_stages, window), -1, np.int32)
    for c, s0 in enumerate(starts):
        for arr, g in ((enter, s0), (finish, s0 + steps_per_chunk - 1)):
            st = g // stage_len
            if arr[st, c % window] != -1:
                raise ValueError(f"ring slot {c % window} holds two chunks in stage {st}")
            arr[st, c % window] = c
    return ScheduleTable(
        chunk=chunk, k=k, t=t, dt=dt, active=active,
        first=active & (k == 0), last=active & (k == steps_per_chunk - 1),
        step_valid=flat < total_steps, global_first=flat == 0, global_last=flat == total_steps - 1,
        enter=enter, finish=finish, grid=grid.astype(np.float32), n_chunks=n_chunks,
        steps_per_chunk=steps_per_chunk)


def magi_schedule(n_chunks: int, window: int, steps_per_chunk: int,
                  grid: np.ndarray | None = None) -> ScheduleTable:
    """MAGI-1's staggered window: chunk c enters at stage c and is at index P*j + d in its j-th stage."""
    if n_chunks < 1 or window < 1:
        raise ValueError(f"n_chunks and window must be >= 1, got {n_chunks}, {window}")
    if steps_per_chunk % window:
        raise ValueError(f"steps_per_chunk={steps_per_chunk} must be a multiple of window={window}")
    grid = flow_time_grid(steps_per_chunk) if grid is None else np.asarray(grid, np.float32)
    if len(grid) != steps_per_chunk + 1:
        raise ValueError(f"time grid has {len(grid)} points, need steps_per_chunk + 1 = {steps_per_chunk + 1}")
    p = steps_per_chunk // window
    starts = np.arange(n_chunks) * p
    # The window keeps its size for short videos too (empty positions), so shapes never depend on length.
    return _table_from_updates(starts, steps_per_chunk, (n_chunks + window - 1) * p, p, window, grid)


def df_step_matrix(n_blocks: int, steps: int, ar_step: int, prefix_blocks: int = 0
                   ) -> tuple[np.ndarray, np.ndarray]:
    """SkyReels' diffusion-forcing recursion at block level: (index rows [R, nb], update masks [R, nb]).

    Index 0 = not started, N + 1 = done. Rows after the start row, until every block is >= N.
    """
    if ar_step < 0 or steps < 1 or not 0 <= prefix_blocks < n_blocks:
        raise ValueError(f"invalid DF schedule: n_blocks={n_blocks}, steps={steps}, ar_step={ar_step}, "
                         f"prefix_blocks={prefix_blocks}")
    n = steps
    prev = np.zeros(n_blocks, np.int64)
    prev[:prefix_blocks] = n + 1
    rows, masks = [], []
    while not (prev >= n).all():
        cur = np.empty_like(prev)
        for b in range(n_blocks):
            if b == 0 or prev[b - 1] >= n:
                cur[b] = prev[b] + 1
            else:
                cur[b] = cur[b - 1] - ar_step
        cur = np.clip(cur, 0, n + 1)
        rows.append(cur)
        masks.append((cur != prev) & (cur != n + 1))
        prev = cur
    return np.stack(rows).astype(np.int32), np.stack(masks)


def df_frame_masks(n_frames: int, causal_block_size: int, steps: int, ar_step: int,
                   prefix_frames: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame index rows and update masks (each block's value repeated over its frames)."""
    if n_frames % causal_block_size or prefix_frames % causal_block_size:
        raise ValueError(f"n_frames={n_frames} and prefix_frames={prefix_frames} must be multiples of "
                         f"causal_block_size={causal_block_size}")
    idx, upd = df_step_matrix(n_frames // causal_block_size, steps, ar_step,
                              prefix_frames // causal_block_size)
    return np.repeat(idx, causal_block_size, 1), np.repeat(upd, causal_block_size, 1)


def df_schedule(n_blocks: int, steps: int, ar_step: int, grid: np.ndarray | None = None) -> ScheduleTable:
    """Diffusion forcing (SkyReels-V2) as a table; a stage is the offset between block starts.

    The recursion starts a block right after its predecessor finishes when ``ar_step > steps``, so the
    offset is ``min(ar_step, steps)``; with ``ar_step = 0`` all blocks run together in one stage.
    """
    grid = flow_time_grid(steps, power=1.0, shift=8.0) if grid is None else np.asarray(grid, np.float32)
    if len(grid) != steps + 1:
        raise ValueError(f"time grid has {len(grid)} points, need steps + 1 = {steps + 1}")
    idx, upd = df_step_matrix(n_blocks, steps, ar_step)
    starts = np.array([int(np.argmax(upd[:, b])) for b in range(n_blocks)])
    for b in range(n_blocks):  # the recursion must give each block N consecutive updates 1..N
        assert upd[:, b].sum() == steps and (idx[starts[b]:starts[b] + steps, b] == np.arange(1, steps + 1)).all()
    offset = min(ar_step, steps)
    window = n_blocks if offset == 0 else math.ceil(steps / offset)
    stage_len = steps if offset == 0 else offset
    return _table_from_updates(starts, steps, len(idx), stage_len, window, grid)


def df_window_table(step_index: np.ndarray, update_mask: np.ndarray, block: int, timesteps: np.ndarray,
                    sigmas: np.ndarray, prefix_frames: int = 0, addnoise_condition: int = 0,
                    prefix_refresh: str = "every", pad_to: int = 0, first: bool = True, last: bool = True,
                    stage_len: int = 0) -> ScheduleTable:
    """One diffusion-forcing window (SkyReels-V2) as a table whose positions are the window's blocks.

    ``step_index`` / ``update_mask`` [I, F] are the per-frame DF rows (``df_frame_masks``). Every block is held
    at every iteration (a whole-window call sees them all); ``active`` = updated now, ``k`` its completed
    updates. ``t`` is the model's conditioning time in this project's convention, ``1 - model_t / 1000`` with
    the integer model timestep (999 not started, 0 finished, ``addnoise_condition`` for the prefix), so a
    denoiser recovers it exactly; ``dt`` = sigma_k - sigma_{k+1}. Prefix blocks are never updated: they are
    refreshed (their K/V rerun) at every iteration or, FlowCache's long-video rule, at the first only.
    Iterations are padded to ``pad_to`` so that windows of one size share one compiled function; the window is
    one stage, or stages of ``stage_len`` iterations (e.g. 1: the latents after every iteration).
    """
    iters, frames = update_mask.shape
    if frames % block or prefix_frames % block:
        raise ValueError(f"window frames {frames} and prefix {prefix_frames} must be multiples of the block {block}")
    if prefix_refresh not in ("every", "first"):
        raise ValueError(f"prefix_refresh must be 'every' or 'first', got {prefix_refresh!r}")
    g, n = frames // block, len(timesteps)
    p = max(iters, pad_to)
    length = stage_len or p
    p = -(-p // length) * length
    stages = p // length
    idx, upd = step_index[:, ::block], update_mask[:, ::block]
    template = np.concatenate([[999], np.asarray(timesteps), [0]]).astype(np.int64)
    model_t = template[idx]
    pre = np.arange(g) < prefix_frames // block
    model_t[:, pre] = addnoise_condition
    k = np.clip(idx - 1, 0, n - 1)

    def pad(a, fill):
        a = np.concatenate([a, np.full((p - iters, *a.shape[1:]), fill, a.dtype)])
        return a.reshape(stages, length, *a.shape[1:])

    sig = np.asarray(sigmas, np.float32)
    refresh = np.zeros((iters, g), bool)
    refresh[:, pre] = True
    if prefix_refresh == "first":
        refresh[1:] = False
    flat = np.arange(p).reshape(stages, length)
    enter = np.full((stages, g), -1, np.int32)
    enter[0] = np.arange(g)
    finish = np.full((stages, g), -1, np.int32)
    for b in np.flatnonzero(~pre):  # a block is final after its last update
        finish[int(np.flatnonzero(upd[:, b])[-1]) // length, b] = b
    return ScheduleTable(
        chunk=pad(np.broadcast_to(np.arange(g, dtype=np.int32), (iters, g)).copy(), -1),
        k=pad(np.where(upd, k, 0).astype(np.int32), 0),
        t=pad((1.0 - model_t / 1000.0).astype(np.float32), 0.0),
        dt=pad(np.where(upd, sig[k] - sig[np.minimum(k + 1, n)], 0.0).astype(np.float32), 0.0),
        active=pad(upd, False), first=pad(upd & (idx == 1), False), last=pad(upd & (idx == n), False),
        step_valid=flat < iters, global_first=(flat == 0) & first, global_last=(flat == iters - 1) & last,
        enter=enter, finish=finish, grid=(1.0 - sig).astype(np.float32), n_chunks=g, steps_per_chunk=n,
        refresh=pad(refresh, False))
