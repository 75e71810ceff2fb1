"""The numbers of ``experiments/calibrate.py``: fits from uncached runs, the threshold search, the flag file.

No flags here, so tests import it beside other CLIs.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from experiments import common

SET_HERE = ("policy.threshold", "policy.coeffs", "policy.ratios")


# ----- fits from uncached runs ------------------------------------------------------------------------------
def fit_polynomial(vanilla: list[Any], degree: int) -> tuple[tuple[float, ...], dict]:
    """TeaCache's rescale: least squares of the chunk's cached-output change on its input metric, over every
    step of the uncached runs where both exist (highest power first, as ``policies.base.rescale`` reads it)."""
    x = np.concatenate([np.asarray(r.rel, np.float64).ravel() for r in vanilla])
    y = np.concatenate([np.asarray(r.cache_rel, np.float64).ravel() for r in vanilla])
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() <= degree + 1:
        raise common.ConfigError(f"the uncached runs give {int(ok.sum())} (input, output) change pairs, too few for a "
                                 f"degree-{degree} fit: use more --calib_seeds or --nofit")
    coeffs = np.polyfit(x[ok], y[ok], degree)
    pred = np.polyval(coeffs, x[ok])
    r2 = 1.0 - float(np.sum((y[ok] - pred) ** 2) / max(np.sum((y[ok] - y[ok].mean()) ** 2), 1e-30))
    return tuple(float(c) for c in coeffs), {"kind": "teacache polynomial", "points": int(ok.sum()), "r2": r2}


def fit_ratios(vanilla: list[Any], table: Any) -> tuple[tuple[float, ...], dict]:
    """MagCache's table: the mean over calibration seeds of each seed's per-step magnitude ratios."""
    per_seed = np.array([common.magcache_ratios(r, table) for r in vanilla], np.float64)
    spread = float(np.nanmax(np.nanstd(per_seed, 0))) if len(per_seed) > 1 else float("nan")
    return tuple(float(r) for r in np.nanmean(per_seed, 0)), {"kind": "magcache ratios", "steps": per_seed.shape[1],
                                                              "max_std_across_seeds": spread}


# ----- the search -------------------------------------------------------------------------------------------
class Objective:
    """Speedup and PSNR of one threshold over a set of seeds, against the uncached runs of those seeds."""

    def __init__(self, run: common.Run, refs: dict[int, Any]):
        self.run, self.refs, self.points = run, refs, []

    def __call__(self, cfg: Any, threshold: float, seeds: list[int], record: bool = True) -> dict:
        c = common.with_policy(cfg, cfg.policy.name, threshold)
        run = self.run.with_knobs(c)
        fw = vanilla = 0.0
        psnrs, wall = [], 0.0
        for s in seeds:
            res, _ = run.sample(progress=False, seed=s, decode=False)
            fw += res.computed + res.probes * res.probe_cost
            vanilla += res.chunk_forwards_vanilla
            psnrs.append(common.compare(run, res, None, self.refs[s], None)["psnr"])
            wall += res.wall["denoise"]
        point = {"threshold": float(threshold), "speedup": vanilla / max(fw, 1e-12),
                 "psnr": float(np.mean(psnrs)), "min_psnr": float(np.min(psnrs)), "denoise_s": wall}
        if record:
            self.points.append(point)
        return point


def search(f: Any, target: float, key: str, start: float, iters: int, bar: Any = None) -> dict:
    """The evaluated point nearest the target (speedup) or the largest threshold that keeps it (psnr).

    Bracket: double the threshold from ``start`` until the target is crossed; then bisect. Speedup grows and PSNR
    falls with the threshold (up to the noise of a discrete decision count), which is all bisection needs."""
    rising = key == "speedup"

    def ok(p: dict) -> bool:
        return p[key] >= target

    lo, lo_p = 0.0, f(0.0)
    if bar is not None:
        bar.update()
    if rising and ok(lo_p):
        return lo_p  # no reuse needed: the schedule's structure alone gets there
    if not rising and not ok(lo_p):
        raise common.ConfigError(f"even threshold 0 gives PSNR {lo_p['psnr']:.2f} dB < --target_psnr={target}")
    hi, hi_p = start, f(start)
    for _ in range(30):
        if bar is not None:
            bar.update()
        if ok(hi_p) if rising else not ok(hi_p):  # crossed: the speedup reached, or the PSNR lost
            break
        lo, lo_p = hi, hi_p
        hi *= 2.0
        hi_p = f(hi)
    else:
        raise common.ConfigError(f"the target {key} {target} is not reached up to threshold {hi:.3g} (it gives "
                                 f"{hi_p[key]:.3f}): warm-up and forced steps bound the reuse; lower the target")
    best = min((lo_p, hi_p), key=lambda p: abs(p[key] - target)) if rising else lo_p
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        p = f(mid)
        if bar is not None:
            bar.update()
        if rising:
            best = min((best, p), key=lambda q: abs(q[key] - target))
            if abs(p[key] - target) <= 0.01 * target:
                return p
            lo, hi = (mid, hi) if p[key] < target else (lo, mid)
        else:
            if ok(p):
                lo, best = mid, p
            else:
                hi = mid
    return best


def flag_lines(config_arg: str, argv: list[str], policy: Any, extra: dict[str, Any]) -> list[str]:
    """The flag file: the config, the user's other overrides, then the calibrated values."""
    own = [a for a in argv if a.startswith("--config.") and a.split("=", 1)[0][len("--config."):] not in SET_HERE]
    lines = [f"--config={config_arg}", *own, f"--config.policy.threshold={policy.threshold!r}"]
    lines += [f"--config.policy.{k}={tuple(v)!r}" for k, v in extra.items()]
    return lines
