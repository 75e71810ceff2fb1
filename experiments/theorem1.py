r"""Theorem 1 study: is the per-step relative update L1_rel monotone along denoising, on exact flows?

  python experiments/theorem1.py [--output_dir=outputs/theorem1] [--quick] [--min_charge=M]

Theorem 1 of FlowCache claims ``L1_rel(t) = ||v dt||_1 / ||X_t||_1`` is non-increasing in t with t = T the
noise end, i.e. in this project's convention (t = 0 noise) it should *rise* as denoising progresses. The
proof follows the conditional velocity ``x1 - eps`` along straight lines (not the marginal optimal
velocity a sampler integrates) and assumes ``||data||_1 > ||noise||_1``. The closed-form synthetic flow
lets us test each piece separately: sweep one factor at a time around a base regime, run the exact
(vanilla) sampler with window 1 and two chunks, and measure per step (a) L1_rel with the schedule's dt,
(b) its rate form ``||v|| / ||X_t||``, (c) FlowCache's feature metric and (d) the conditional-velocity
version in numpy. A second part measures what thresholding costs along exact AR windows (two time grids): final
error and ideal speedup vs the threshold for TeaCache, FlowCache and FlowCache with its reuse-run guard
(``policy.min_charge``, ``--min_charge``; see ``theorem1_thresholds``).
Outputs: ``theorem1.json``, Fig-2-style ``fig2_<factor>.png``, ``metric_ar.png``, ``error_vs_threshold.png``.
This file is the CLI; the numbers are computed in ``theorem1_stats`` / ``theorem1_thresholds``, the figures drawn
in ``theorem1_figures``.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from absl import flags, logging  # noqa: E402

from experiments import common  # noqa: E402
from experiments import theorem1_figures as figures  # noqa: E402
from experiments import theorem1_stats as stats  # noqa: E402
from experiments import theorem1_thresholds as thresholds  # noqa: E402


def print_tables(regimes: list[dict[str, Any]], errors: list[dict[str, Any]]) -> None:
    rows = []
    for r in regimes:
        row = {"factor": r["factor"], "value": r["value"], "data>noise": r["assumption_data_gt_noise"]}
        for q in ("l1_rel", "l1_rate", "metric", "l1_conditional"):
            row[q] = r["quantities"][q]["verdict"]
            row[f"{q}%"] = f"{100 * r['quantities'][q]['nondecreasing_fraction']:.0f}"
        rows.append(row)
    print(common.format_table(rows, list(rows[0])))
    print()
    print(common.format_table(errors, ["regime", "policy", "threshold", "min_charge", "computed_fraction",
                                       "speedup_ideal", "rel_l2", "psnr", "longest_reuse"]))


def define_flags() -> None:
    """Defined only when run as a script, so tests can import the helpers beside other CLIs' flags."""
    flags.DEFINE_string("output_dir", "outputs/theorem1", "Output folder.")
    flags.DEFINE_bool("quick", False, "Reduced sweep (2 values per factor, 3 thresholds), for tests.")
    flags.DEFINE_integer("batch", 8, "Videos per sampler run.")
    flags.DEFINE_integer("cond_batch", 256, "Samples for the conditional (straight-line) estimate.")
    flags.DEFINE_float("min_charge", None, "FlowCache guard (policy.min_charge) of the threshold study's "
                       "flowcache+guard rows; unset: GUARD_FRACTION x the median per-step metric of each exact run.")
    flags.DEFINE_bool("fast_compile", True, "XLA backend optimisation level 0: ~3x faster compiles; these "
                      "programs are tiny, so compile time dominates (results change at ulp level).")


def fast_compile() -> None:
    """Must run before JAX's backend starts (nothing here touches JAX before main); keeps a user's own setting."""
    current = os.environ.get("XLA_FLAGS", "")
    if "xla_backend_optimization_level" not in current:
        os.environ["XLA_FLAGS"] = f"{current} --xla_backend_optimization_level=0".strip()


def main(argv: list[str]) -> None:
    del argv
    fl = flags.FLAGS
    if fl.batch < 1 or fl.cond_batch < 1:
        raise common.ConfigError(f"--batch and --cond_batch must be >= 1, got {fl.batch}, {fl.cond_batch}")
    if fl.min_charge is not None and not fl.min_charge > 0:
        raise common.ConfigError(f"--min_charge must be > 0 (unset: derived from the data), got {fl.min_charge}")
    out_dir = Path(fl.output_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise common.ConfigError(f"--output_dir {out_dir} exists and is not a folder")
    if fl.fast_compile:
        fast_compile()
    from flowcache_jax import io

    logging.set_verbosity(logging.WARNING)
    t0 = time.perf_counter()
    out, quick = Path(fl.output_dir), fl.quick
    runner = stats.Runner()
    regimes = stats.sweep(runner, stats.QUICK_SWEEP if quick else stats.SWEEP, fl.batch, fl.cond_batch)
    n_sweep = runner.compiled
    errors, traj = thresholds.error_vs_threshold(
        runner, thresholds.QUICK_THRESHOLDS if quick else thresholds.THRESHOLDS, fl.batch, fl.min_charge)
    summary = {**stats.summarize(regimes), **thresholds.summarize(errors)}
    for factor in dict.fromkeys(r["factor"] for r in regimes):
        figures.fig2(regimes, factor, out / f"fig2_{factor}.png")
    figures.fig_metric_ar(traj, out / "metric_ar.png")
    figures.fig_errors(errors, out / "error_vs_threshold.png")
    result = {"quick": quick, "base": stats.BASE, "rtol": stats.RTOL, "regimes": regimes, "error_vs_threshold": errors,
              "ar_regimes": thresholds.AR_REGIMES, "guard_fraction": thresholds.GUARD_FRACTION,
              "min_charge_flag": fl.min_charge, "threshold_study_samplers": runner.compiled - n_sweep,
              "metric_ar": traj, "summary": summary, "compiled_samplers": runner.compiled,
              "xla_flags": os.environ.get("XLA_FLAGS", ""),
              "wall_s": time.perf_counter() - t0}
    io.write_json(out / "theorem1.json", result)
    print_tables(regimes, errors)
    print()
    for k, v in summary.items():
        print(f"{k}: {v}")
    print(f"\nwrote {out}/theorem1.json and figures ({runner.compiled} samplers compiled, "
          f"{time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    define_flags()
    common.run_app(main, default=None)
