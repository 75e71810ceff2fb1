r"""Calibrate a cache to a target speedup or quality, as users of TeaCache / MagCache do by hand, in one command.

  python experiments/calibrate.py --config=tiny_fast --target_speedup=2.5
  python experiments/calibrate.py --config=tiny_teacache_fast --target_psnr=30 --output_flags=teacache30.flags
  python experiments/run.py --flagfile=outputs/calibrate_tiny_fast/calibrated.flags

On a few calibration seeds it runs the uncached config once per seed, fits what the rule reads from such runs
(TeaCache: the rescaling polynomial from the input metric to the relative change of the chunk's cached output;
MagCache: the per-step magnitude-ratio table), then searches the threshold: bracketing, then bisection. The
threshold is a runtime argument of the compiled stage function, so the whole search compiles the cached run once.
The chosen values are checked on held-out seeds and written as a flag file (``--config=NAME`` and the
``--config.*`` overrides, those given here included) that ``run.py --flagfile=F`` runs as is.

Speedup is the forward-count (FLOP-ideal) speedup: vanilla chunk forwards over forwards run, probes counted at
their cost; it is what a threshold controls and it does not depend on the machine's load. The wall-time ratio
of the held-out runs is printed beside it. PSNR is against the uncached run of the same seed, on the latents
(the RGB frames for the tiny model).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from experiments import common  # noqa: E402
from experiments.calibration import Objective, fit_polynomial, fit_ratios, flag_lines, search  # noqa: E402

sys.argv = common.expand_flagfiles(sys.argv)  # before config_flags reads them (one-line errors)
_CONFIG = config_flags.DEFINE_config_file("config", None, "Preset name (a cached policy) or .py file.")
_SPEEDUP = flags.DEFINE_float("target_speedup", None, "Target forward-count speedup over the uncached run.")
_PSNR = flags.DEFINE_float("target_psnr", None, "Target PSNR (dB) against the uncached run: the largest threshold "
                           "that keeps it.")
_CALIB = flags.DEFINE_integer("calib_seeds", 3, "Calibration seeds: config.seed + 1 ... + N.")
_HELD = flags.DEFINE_integer("heldout_seeds", 3, "Held-out seeds: config.seed + 1001 ... + N.")
_FIT = flags.DEFINE_bool("fit", True, "Fit TeaCache's polynomial / MagCache's ratios from the uncached runs (else "
                         "keep the config's).")
_DEGREE = flags.DEFINE_integer("poly_degree", 4, "Degree of TeaCache's rescaling polynomial.")
_ITERS = flags.DEFINE_integer("iterations", 14, "Bisection steps of the threshold search.")
_OUT = flags.DEFINE_string("output_dir", None, "Folder for calibrated.flags and calibration.json "
                           "(default outputs/calibrate_<config>).")
_FLAGS_OUT = flags.DEFINE_string("output_flags", None, "Flag file to write (default <output_dir>/calibrated.flags).")
_JSON_OUT = flags.DEFINE_string("output_json", None, "JSON to write (default <output_dir>/calibration.json).")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar.")

def main(argv: list[str]) -> None:
    del argv
    from tqdm.auto import tqdm

    from flowcache_jax import io

    cfg = _CONFIG.value
    if (_SPEEDUP.value is None) == (_PSNR.value is None):
        raise common.ConfigError("give exactly one of --target_speedup=X or --target_psnr=DB")
    if cfg.policy.name == "vanilla":
        raise common.ConfigError(f"{cfg.name} is uncached: calibrate a cached preset (e.g. tiny_fast)")
    if _SPEEDUP.value is not None and _SPEEDUP.value <= 1.0:
        raise common.ConfigError(f"--target_speedup must be > 1, got {_SPEEDUP.value}")
    if _CALIB.value < 1 or _HELD.value < 1:
        raise common.ConfigError("--calib_seeds and --heldout_seeds must be >= 1")
    calib = [cfg.seed + 1 + i for i in range(_CALIB.value)]
    held = [cfg.seed + 1001 + i for i in range(_HELD.value)]
    out = Path(_OUT.value or f"outputs/calibrate_{cfg.name}")
    flags_path = Path(_FLAGS_OUT.value) if _FLAGS_OUT.value else out / "calibrated.flags"
    json_path = Path(_JSON_OUT.value) if _JSON_OUT.value else out / "calibration.json"

    van_run = common.build(common.with_policy(cfg, "vanilla"))
    seeds = calib + held
    refs = {s: van_run.sample(progress=False, seed=s, decode=False)[0]
            for s in tqdm(seeds, desc="uncached runs", disable=not _PROGRESS.value)}
    cal = ml_collections.ConfigDict(cfg.to_dict())
    fit, extra = None, {}
    metric = cfg.policy.get("metric", "input")
    if _FIT.value and cfg.policy.name == "teacache" and metric == "input":
        coeffs, fit = fit_polynomial([refs[s] for s in calib], _DEGREE.value)
        cal.policy.coeffs, extra["coeffs"] = coeffs, coeffs
    elif _FIT.value and cfg.policy.name == "magcache":
        ratios, fit = fit_ratios([refs[s] for s in calib], van_run.table)
        cal.policy.ratios, extra["ratios"] = ratios, ratios
    run = common.build(cal)
    objective = Objective(run, refs)
    rel = np.concatenate([np.asarray(refs[s].rel).ravel() for s in calib])
    rel = rel[np.isfinite(rel)]
    start = float(np.median(rel)) if rel.size else 0.01  # one step's worth of the metric
    if cfg.policy.name == "teacache" and "coeffs" in extra:
        start = float(max(np.median(np.polyval(extra["coeffs"], rel)), 1e-4)) if rel.size else start
    key, target = ("speedup", _SPEEDUP.value) if _SPEEDUP.value is not None else ("psnr", _PSNR.value)
    bar = tqdm(desc=f"threshold search ({key} {target})", disable=not _PROGRESS.value)
    best = search(lambda t: objective(cal, t, calib), target, key, max(start, 1e-6), _ITERS.value, bar)
    bar.close()
    cal.policy.threshold = best["threshold"]
    heldout = objective(cal, best["threshold"], held, record=False)
    van_wall = sum(refs[s].wall["denoise"] for s in held)
    config_arg = cfg.name if cfg.name in common.config_names() else next(
        (a.split("=", 1)[1] for a in sys.argv if a.startswith("--config=")), cfg.name)
    lines = flag_lines(config_arg, sys.argv, cal.policy, extra)
    header = [f"# experiments/calibrate.py --config={config_arg} --{'target_' + key}={target}: calibration seeds "
              f"{calib}, held-out {held}",
              f"# held-out: speedup {heldout['speedup']:.3f} (forward count), PSNR {heldout['psnr']:.2f} dB vs "
              f"uncached; run: python experiments/run.py --flagfile={flags_path}"]
    result = {
        "config": config_arg, "policy": cfg.policy.name, "target_speedup": _SPEEDUP.value,
        "target_psnr": _PSNR.value, "threshold": best["threshold"], **extra, "fit": fit,
        "calib_seeds": calib, "heldout_seeds": held, "calib_speedup": best["speedup"], "calib_psnr": best["psnr"],
        "heldout_speedup": heldout["speedup"], "heldout_psnr": heldout["psnr"],
        "heldout_min_psnr": heldout["min_psnr"], "heldout_speedup_wall": van_wall / max(heldout["denoise_s"], 1e-12),
        "heldout_speedup_error": (heldout["speedup"] / _SPEEDUP.value - 1.0) if _SPEEDUP.value else None,
        "compiles": run.compiles, "evaluations": len(objective.points), "search": objective.points,
        "flag_file": str(flags_path),
    }
    io.write_text(flags_path, "\n".join(header + lines) + "\n")
    io.write_json(json_path, result)
    rows = [{"seeds": "calibration", "threshold": best["threshold"], "speedup": best["speedup"],
             "psnr": best["psnr"]},
            {"seeds": "held-out", "threshold": best["threshold"], "speedup": heldout["speedup"],
             "psnr": heldout["psnr"], "speedup_wall": result["heldout_speedup_wall"]}]
    print(common.format_table(rows, ["seeds", "threshold", "speedup", "psnr", "speedup_wall"]))
    if fit:
        print("fit: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fit.items()))
    print(f"{len(objective.points)} evaluations, {run.compiles} compile(s) of the cached run")
    print(f"wrote {flags_path} (python experiments/run.py --flagfile={flags_path}), {json_path}")


if __name__ == "__main__":
    common.run_app(main)
