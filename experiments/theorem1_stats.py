"""Theorem 1 study, the numbers: the sweep of exact synthetic flows and the monotonicity tests.

What ``experiments/theorem1.py`` (the CLI) runs and ``experiments/theorem1_figures`` plots; nothing here draws or
parses flags; the threshold study is ``experiments/theorem1_thresholds``. JAX is imported inside the functions,
so the CLI can set XLA_FLAGS before the backend starts.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from experiments import common

RTOL = 1e-6  # a step "does not decrease" if q[i+1] >= q[i] - RTOL * |q[i]|
QUANTITIES = ("l1_rel", "l1_rate", "metric", "l1_conditional", "l1_conditional_rate")
BASE = dict(power=2.0, shift=3.0, data_scale=1.0, noise_scale=1.0, channels=4, mixture=3, steps_per_chunk=32)
SWEEP: dict[str, list[float]] = dict(power=[1.0, 2.0, 3.0], shift=[1.0, 3.0, 8.0], data_scale=[0.25, 1.0, 4.0],
                                     channels=[1, 4, 16, 64], mixture=[1, 3, 10], steps_per_chunk=[16, 32, 64])
QUICK_SWEEP: dict[str, list[float]] = dict(power=[1.0, 3.0], shift=[1.0, 8.0], data_scale=[1.0, 4.0],
                                           channels=[4, 16], mixture=[3, 10], steps_per_chunk=[16, 32])


# ----- monotonicity analysis ------------------------------------------------------------------------
def verdict(fraction: float) -> str:
    """'holds' only if every consecutive step is non-decreasing; 'mostly' tolerates 10% exceptions."""
    if fraction >= 1.0:
        return "holds"
    return "mostly" if fraction >= 0.9 else "breaks"


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Rank correlation (average ranks for ties); nan when either side is constant."""
    from scipy.stats import rankdata

    rx, ry = rankdata(x), rankdata(y)
    if np.ptp(rx) == 0 or np.ptp(ry) == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def monotonicity(values: np.ndarray, t: np.ndarray, rtol: float = RTOL) -> dict[str, Any]:
    """Does ``values`` (ordered by denoising step) never decrease? Where does it decrease?

    ``breaks_at_t`` lists the times of the later step of each decreasing pair, so a reader can see if
    the theorem fails near noise, near data, or throughout.
    """
    v, t = np.asarray(values, np.float64), np.asarray(t, np.float64)
    if v.ndim != 1 or len(v) < 2 or len(t) != len(v):
        raise ValueError(f"need >= 2 values with matching times, got {v.shape} and {t.shape}")
    if not np.isfinite(v).all():
        raise ValueError("values must be finite")
    ok = v[1:] >= v[:-1] - rtol * np.abs(v[:-1])
    frac = float(ok.mean())
    breaks = t[1:][~ok]
    return {"values": v, "t": t, "nondecreasing_fraction": frac, "verdict": verdict(frac),
            "spearman": spearman(np.arange(len(v)), v), "breaks_at_t": breaks,
            "breaks_t_range": [float(breaks.min()), float(breaks.max())] if len(breaks) else None}


# ----- configs and runs -----------------------------------------------------------------------------
def regime_config(settings: dict[str, Any], policy: str = "vanilla", threshold: float = 0.0, window: int = 1,
                  n_chunks: int = 2, batch: int = 8) -> Any:
    """A small, work-free synthetic config; window 1 makes chunk 1's context the finished chunk 0."""
    from experiments.configs.synthetic_base import get_base

    cfg = get_base("theorem1", policy, threshold)
    cfg.batch = batch
    # hidden only sizes the unused mixing basis (work=0); small keeps init cheap. It does reseed the metric
    # embedding (drawn after the basis in init_params), so it is the same for every regime of one channel count.
    cfg.synthetic.update(dict(work=0, height=4, width=4, hidden=max(8, int(settings["channels"])),
                              channels=int(settings["channels"]),
                              mixture=int(settings["mixture"]), data_scale=float(settings["data_scale"]),
                              noise_scale=float(settings["noise_scale"])))
    cfg.schedule.update(dict(window=window, n_chunks=n_chunks, steps_per_chunk=int(settings["steps_per_chunk"]),
                             power=float(settings["power"]), shift=float(settings["shift"])))
    return cfg


class Runner:
    """Builds runs and shares one compiled Sampler among configs that differ only in the time grid.

    The grid (power, shift) reaches the sampler as runtime table arrays, so recompiling for it would
    only waste time; everything else that could change the traced function is in the cache key.
    """

    def __init__(self):
        self._samplers: dict[str, Any] = {}

    def build(self, cfg: Any) -> common.Run:
        run = common.build(cfg)
        s = cfg.schedule
        key = json.dumps([cfg.synthetic.to_dict(), cfg.policy.to_dict(), cfg.batch, s.kind, s.window,
                          s.steps_per_chunk], sort_keys=True, default=str)
        run.sampler = self._samplers.setdefault(key, run.sampler)
        return run

    @staticmethod
    def draw(run: common.Run, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact data [n, 2 chunks, ...] and noise [n, ...]. Eager on purpose: op-by-op executables are cached
        per shape and reused across regimes, while a jitted draw would recompile (~2 s) per denoiser."""
        import jax

        key = jax.random.fold_in(run.key, 1)
        x1 = run.denoiser.sample_data(run.params, jax.random.fold_in(key, 1), n, 2)
        eps = run.denoiser.sample_noise(jax.random.fold_in(key, 2), n)
        return np.asarray(x1, np.float64), np.asarray(eps, np.float64)

    @property
    def compiled(self) -> int:
        return len(self._samplers)


def per_step(table: Any, name: str) -> np.ndarray:
    """A table field as [valid global steps, W], the layout of RunResult records."""
    a = getattr(table, name)
    return a.reshape(-1, a.shape[-1])[table.step_valid.reshape(-1)]


def conditional_l1(grid: np.ndarray, x1: np.ndarray, eps: np.ndarray, ks: np.ndarray) -> dict[str, np.ndarray | float]:
    """The proof's quantity: straight-line velocity ``x1 - eps`` at ``x_t = t x1 + (1 - t) eps``."""
    grid = np.asarray(grid, np.float64)
    t, dt = grid[ks], grid[ks + 1] - grid[ks]
    speed = np.mean(np.abs(x1 - eps))
    norm = np.array([np.mean(np.abs(ti * x1 + (1 - ti) * eps)) for ti in t])
    return {"l1": speed * dt / norm, "rate": speed / norm, "data_l1": float(np.mean(np.abs(x1))),
            "noise_l1": float(np.mean(np.abs(eps)))}


def chunk_quantities(run: common.Run, res: Any, chunk: int, data: np.ndarray, eps: np.ndarray) -> dict[str, Any]:
    """Per-step quantities of one chunk (first step excluded: the metric has no previous step there)."""
    ch, k = per_step(run.table, "chunk")[:, 0], per_step(run.table, "k")[:, 0]
    t, dt = per_step(run.table, "t")[:, 0], per_step(run.table, "dt")[:, 0]
    rel, upd = res.rel[:, 0], res.update_l1[:, 0]
    m = (ch == chunk) & np.isfinite(rel)
    order = np.argsort(k[m])
    ks = k[m][order]
    cond = conditional_l1(run.table.grid, data[:, chunk], eps, ks)
    vals = {"l1_rel": upd[m][order], "l1_rate": upd[m][order] / dt[m][order], "metric": rel[m][order],
            "l1_conditional": cond["l1"], "l1_conditional_rate": cond["rate"]}
    tt = t[m][order]
    out = {q: monotonicity(vals[q], tt) for q in QUANTITIES}
    out["_step"] = ks
    out["_assumption"] = {"data_l1": cond["data_l1"], "noise_l1": cond["noise_l1"]}
    return out


def run_regime(runner: Runner, settings: dict[str, Any], batch: int, cond_batch: int) -> dict[str, Any]:
    """Exact sampling with window 1, two chunks; chunk 1 (clean context) is the headline, chunk 0 kept."""
    run = runner.build(regime_config(settings, batch=batch))
    res = run.sampler.run(run.params, run.cond, run.table, run.key, progress=False)
    data, eps = runner.draw(run, cond_batch)
    per_chunk = [chunk_quantities(run, res, c, data, eps) for c in (0, 1)]
    main, other = per_chunk[1], per_chunk[0]
    quantities = {q: {**main[q], "chunk0": other[q]} for q in QUANTITIES}
    a = main["_assumption"]
    dts = np.diff(run.table.grid.astype(np.float64))
    return {"settings": {**settings, "window": 1, "n_chunks": 2, "batch": batch},
            "dt_nondecreasing": monotonicity(dts, run.table.grid[1:])["verdict"] == "holds",
            "assumption_data_gt_noise": bool(a["data_l1"] > a["noise_l1"]),
            "assumption_data_gt_noise_chunk0": bool(other["_assumption"]["data_l1"] > a["noise_l1"]),
            "data_l1": a["data_l1"], "noise_l1": a["noise_l1"], "data_over_noise": a["data_l1"] / a["noise_l1"],
            "step": main["_step"], "progress": main["_step"] / settings["steps_per_chunk"], "quantities": quantities}


def sweep(runner: Runner, values: dict[str, list[float]], batch: int, cond_batch: int) -> list[dict[str, Any]]:
    """One factor at a time around BASE; identical settings are run once and shared."""
    from tqdm.auto import tqdm

    jobs = [(f, v) for f, vs in values.items() for v in vs]
    done: dict[str, dict[str, Any]] = {}
    out = []
    for f, v in tqdm(jobs, desc="theorem-1 sweep", leave=False):
        settings = {**BASE, f: v}
        key = json.dumps(settings, sort_keys=True)
        if key not in done:
            done[key] = run_regime(runner, settings, batch, cond_batch)
        out.append({"factor": f, "value": v, **done[key]})
    return out


# ----- summary ----------------------------------------------------------------------------------------
def _counts(verdicts: list[str]) -> str:
    if not verdicts:
        return "no regimes"
    return ", ".join(f"{v} {verdicts.count(v)}/{len(verdicts)}" for v in ("holds", "mostly", "breaks"))


def summarize(regimes: list[dict[str, Any]]) -> dict[str, Any]:
    """Short conclusions of the sweep derived from the numbers (nothing here is a pre-written result); the threshold
    study's are ``theorem1_thresholds.summarize``."""
    unique = {json.dumps(r["settings"], sort_keys=True): r for r in regimes}.values()
    n = len(unique)
    out: dict[str, Any] = {"regimes": n}
    for q in QUANTITIES:
        verdicts = [r["quantities"][q]["verdict"] for r in unique]
        rho = np.array([r["quantities"][q]["spearman"] for r in unique], np.float64)
        broken = [f"{r['factor']}={r['value']}" for r in regimes if r["quantities"][q]["verdict"] == "breaks"]
        agree = sum(r["quantities"][q]["verdict"] == r["quantities"][q]["chunk0"]["verdict"] for r in unique)
        out[q] = (f"holds {verdicts.count('holds')}/{n}, mostly {verdicts.count('mostly')}/{n}, "
                  f"breaks {verdicts.count('breaks')}/{n}; median Spearman with step {np.nanmedian(rho):+.2f} "
                  f"(>0: rises as denoising progresses, the theorem's direction here); chunk 0 gives the same "
                  f"verdict in {agree}/{n}; breaking: {', '.join(sorted(set(broken))) or 'none'}")
    n_bad = sum(not r["assumption_data_gt_noise"] for r in unique)
    good = sorted({f"{r['factor']}={r['value']}" for r in regimes if r["assumption_data_gt_noise"]})
    ratio = np.array([r["data_over_noise"] for r in unique])
    out["assumption"] = (f"mean|data| > mean|noise| (chunk 1) fails in {n_bad}/{n} distinct regimes; it holds only "
                         f"in: {', '.join(good) or 'none'}; data/noise L1 ratio {ratio.min():.3g}..{ratio.max():.3g}, "
                         f"within 5% of 1 (borderline) in {int((np.abs(ratio - 1) < 0.05).sum())}/{n}")
    for flag, name in ((True, "assumption_holds"), (False, "assumption_fails")):
        sub = [r for r in unique if r["assumption_data_gt_noise"] == flag]
        for q in ("l1_rel", "l1_conditional"):
            out[f"{q}_when_{name}"] = _counts([r["quantities"][q]["verdict"] for r in sub])
    for q in ("l1_rate", "l1_conditional_rate"):
        parts = []
        for flag, name in ((True, "holds"), (False, "fails")):
            rho = [r["quantities"][q]["spearman"] for r in unique if r["assumption_data_gt_noise"] == flag]
            if rho:
                parts.append(f"assumption {name}: median {np.nanmedian(rho):+.2f} over {len(rho)}")
        out[f"{q}_spearman_by_assumption"] = "; ".join(parts)
    dt_up = [r for r in unique if r["dt_nondecreasing"]]
    out["schedule"] = (f"dt non-decreasing in {len(dt_up)}/{n} regimes; there l1_rel holds in "
                       f"{sum(r['quantities']['l1_rel']['verdict'] == 'holds' for r in dt_up)}/{len(dt_up)} but its "
                       f"rate form only in {sum(r['quantities']['l1_rate']['verdict'] == 'holds' for r in dt_up)}"
                       f"/{len(dt_up)}")
    return out
