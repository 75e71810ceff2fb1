"""Theorem 1 study, the threshold part: final error and ideal speedup against the threshold, per policy, on exact AR
windows, with and without FlowCache's reuse-run guard (``policy.min_charge``).

Why the guard: a reused chunk replays its last displacement, so its input moves by that replayed step and FlowCache's
metric keeps the size it had when the cache was filled. On a grid whose dt grows along denoising, a cache filled at
the end of the warm-up (near the noise end, tiny dt) then holds for the rest of the chunk while the true update grows
tens of times, and the error jumps from small to the all-reused value within one threshold step. ``min_charge``
charges every step at least that much, so a run of reuses is at most ``ceil(threshold / min_charge)`` steps.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from experiments.theorem1_stats import BASE, Runner, regime_config

THRESHOLDS = [0.0, 0.005, 0.01, 0.02, 0.03, 0.05, 0.08, 0.12, 0.2]
QUICK_THRESHOLDS = [0.0, 0.01, 0.03, 0.12]
AR = dict(window=4, n_chunks=4)  # the AR window config of the threshold study (steps_per_chunk from BASE)
# The default grid and a steeper one (dt grows faster, so a cache filled early is staler); the grid is a runtime
# table, so both share the compiled samplers.
AR_REGIMES: dict[str, dict[str, float]] = {"base": {}, "power=3": {"power": 3.0}}
GUARD_FRACTION = 0.5  # the study's guard: min_charge = this x the median per-step metric of the regime's exact run
POLICIES = ("teacache", "flowcache", "flowcache+guard")
GUARD = "flowcache+guard"


def rel_l2(x: np.ndarray, ref: np.ndarray) -> float:
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


def metric_trajectory(res: Any) -> dict[str, dict[str, list]]:
    """FlowCache's raw metric per chunk against the global step (nan-free)."""
    out = {}
    for c in sorted(set(res.chunk[res.chunk >= 0].tolist())):
        g, w = np.nonzero((res.chunk == c) & np.isfinite(res.rel))
        out[str(c)] = {"global_step": g.tolist(), "rel": res.rel[g, w].tolist()}
    return out


def longest_reuse_run(res: Any) -> int:
    """The most consecutive steps any chunk was reused (the quantity the guard caps)."""
    from flowcache_jax.policies.base import REUSED

    chunk = res.chunk.reshape(res.reason.shape[0], -1, res.chunk.shape[-1])[:, 0]  # first CFG branch's rows
    best = 0
    for c in set(chunk[chunk >= 0].tolist()):
        run = 0
        for r in res.reason[(chunk == c) & (res.reason >= 0)]:  # row-major: step order
            run = run + 1 if r == REUSED else 0
            best = max(best, run)
    return best


def guard_charge(ref: Any, min_charge: float | None) -> float:
    """``min_charge`` as given, else GUARD_FRACTION of the median per-step metric of the exact run."""
    if min_charge is not None:
        return float(min_charge)
    return GUARD_FRACTION * float(np.median(ref.rel[np.isfinite(ref.rel)]))


def error_vs_threshold(runner: Runner, thresholds: list[float], batch: int, min_charge: float | None = None,
                       regimes: dict[str, dict[str, float]] | None = None) -> tuple[list[dict], dict]:
    """Per regime, policy and threshold: computed fraction, speedup and error vs the exact run (same noise). Every
    threshold and the guard are runtime knobs: one compiled sampler per rule (FlowCache and its guard share one)."""
    from flowcache_jax import metrics
    from flowcache_jax.policies import make_policy

    rows, trajectories = [], {}
    for regime, over in (AR_REGIMES if regimes is None else regimes).items():
        settings = {**BASE, **over}
        ref_run = runner.build(regime_config(settings, batch=batch, **AR))
        ref = ref_run.sampler.run(ref_run.params, ref_run.cond, ref_run.table, ref_run.key, progress=False)
        trajectories[regime] = metric_trajectory(ref)
        charge = guard_charge(ref, min_charge)
        for policy in POLICIES:
            cfg = regime_config(settings, policy.split("+")[0], 0.0, batch=batch, **AR)
            run = runner.build(cfg)
            if policy == GUARD:
                cfg.policy.min_charge = charge
            for th in thresholds:
                cfg.policy.threshold = th
                res = run.sampler.run(run.params, run.cond, run.table, run.key, progress=False,
                                      policy=make_policy(cfg.policy))
                rows.append({"regime": regime, "policy": policy, "threshold": th,
                             "min_charge": float(cfg.policy.get("min_charge", 0.0)),
                             "computed_fraction": res.computed_fraction, "speedup_ideal": res.speedup_ideal,
                             "rel_l2": rel_l2(res.video, ref.video), "psnr": metrics.psnr(res.video, ref.video),
                             "longest_reuse": longest_reuse_run(res)})
    return rows, trajectories


# ----- summary ----------------------------------------------------------------------------------------
def _monotone(xs: list[float], increasing: bool) -> bool:
    d = np.diff(np.asarray(xs, np.float64))
    return bool((d >= 0).all() if increasing else (d <= 0).all())


def steepest_growth(rows: list[dict[str, Any]]) -> float:
    """The largest local log-log slope of rel_l2 in the threshold between neighbouring nonzero points (1: the error
    grows in proportion to the threshold; much more: a cliff); nan with fewer than two such points."""
    pts = [(r["threshold"], r["rel_l2"]) for r in rows if r["threshold"] > 0 and r["rel_l2"] > 0]
    slopes = [np.log(e1 / e0) / np.log(t1 / t0) for (t0, e0), (t1, e1) in zip(pts, pts[1:], strict=False)]
    return float(max(slopes)) if slopes else float("nan")


def matched_error_ratio(guard: list[dict[str, Any]], plain: list[dict[str, Any]]) -> list[float]:
    """Guard speedup over the unguarded speedup at the same rel_l2 (interpolated in log error on the unguarded
    curve; guard points outside its error range are left out). > 1: the guard is faster at equal error."""
    pts = sorted((r["rel_l2"], r["speedup_ideal"]) for r in plain if r["rel_l2"] > 0)
    if len(pts) < 2:
        return []
    err, speed = np.array(pts).T
    err, idx = np.unique(err, return_index=True)
    speed = speed[idx]
    lo, hi = err[0], err[-1]
    return [r["speedup_ideal"] / float(np.interp(np.log(r["rel_l2"]), np.log(err), speed))
            for r in guard if lo <= r["rel_l2"] <= hi]


def summarize(errors: list[dict[str, Any]]) -> dict[str, str]:
    """Per regime and policy: is the error monotone in the threshold, how steeply does it grow, the top threshold's
    numbers; then the guard's speed cost at matched threshold and at matched error (derived, not pre-written)."""
    out: dict[str, str] = {}
    for regime in dict.fromkeys(e.get("regime", "base") for e in errors):
        per = {p: sorted((e for e in errors if e.get("regime", "base") == regime and e["policy"] == p),
                         key=lambda e: e["threshold"]) for p in dict.fromkeys(e["policy"] for e in errors)}
        for policy, rows in per.items():
            if not rows:
                continue
            top = rows[-1]
            guard = f", min_charge {top['min_charge']:.3g}" if top.get("min_charge") else ""
            flat = next(e["threshold"] for e in rows if e["rel_l2"] == top["rel_l2"])
            flat = f" (the same from threshold {flat:g} on: saturated)" if flat < top["threshold"] else ""
            out[f"{regime}/{policy}_thresholds"] = (
                f"rel_l2 non-decreasing in threshold: {_monotone([e['rel_l2'] for e in rows], True)}; "
                f"computed fraction non-increasing: {_monotone([e['computed_fraction'] for e in rows], False)}; "
                f"steepest log-log growth of rel_l2 in threshold {steepest_growth(rows):.2f} (1 = proportional); "
                f"at threshold {top['threshold']}{guard}: computed {top['computed_fraction']:.3f} "
                f"(speedup {top['speedup_ideal']:.2f}x), rel_l2 {top['rel_l2']:.3g}{flat}, PSNR {top['psnr']:.1f} dB, "
                f"longest reuse run {top.get('longest_reuse', 'n/a')} steps")
        plain, guard_rows = per.get("flowcache", []), per.get(GUARD, [])
        if plain and guard_rows:
            by_th = {e["threshold"]: e["speedup_ideal"] for e in plain}
            at_th = [(g["threshold"], g["speedup_ideal"] / by_th[g["threshold"]]) for g in guard_rows
                     if g["threshold"] in by_th and g["threshold"] > 0]
            matched = matched_error_ratio(guard_rows, plain)
            th_part = ", ".join(f"{t:g}: {r:.2f}" for t, r in at_th)
            err_part = (f"median {np.median(matched):.2f} over {len(matched)} points (range {min(matched):.2f}.."
                        f"{max(matched):.2f})" if matched else "no guard point inside the unguarded error range")
            out[f"{regime}/guard_cost"] = (f"guard speedup / unguarded speedup at matched threshold: {th_part}; "
                                           f"at matched rel_l2 (interpolated, > 1 = guard faster): {err_part}")
    return out
