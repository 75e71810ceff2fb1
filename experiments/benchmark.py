r"""Side-by-side speed of a cached config against its uncached twin, in one process.

  python experiments/benchmark.py --config=synthetic_fast [--repeats=5] --output_dir=D

Both samplers are compiled first; then runs alternate (vanilla, cached, vanilla, ...) and the median
denoise times give ``speedup_wall``; ``speedup_ideal`` is vanilla / computed chunk forwards. It also
counts compilations per run at two video lengths (they must be equal: shapes never depend on length).
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from experiments import common  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Preset name (e.g. synthetic_fast) or .py file.")
_OUT = flags.DEFINE_string("output_dir", None, "Output folder (default outputs/benchmark_<config name>).")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed runs per method (median reported).")
_LENGTHS = flags.DEFINE_bool("length_check", True, "Also count compilations at two video lengths (3 more builds).")


def compiles_at_lengths(cfg, lengths: list[int]) -> dict:
    """Compilations of the stage function per run, fresh sampler per length, and one sampler for all (a DF video
    shorter than a window is one smaller window: another shape, so another compilation)."""
    per_run = []
    for n in lengths:
        run = common.build(cfg, n_chunks=n)
        run.sampler.run(run.params, run.cond, run.table, run.key, progress=False)
        per_run.append(run.sampler.traces)
    shared = common.build(cfg, n_chunks=max(lengths))  # a model KV buffer must fit the longest video
    for n in lengths:
        table = common.build(cfg, n_chunks=n).table
        shared.sampler.run(shared.params, shared.cond, table, shared.key, progress=False)
    return {"num_chunks": lengths, "per_run": per_run, "one_sampler_all_lengths": shared.sampler.traces}


def main(argv: list[str]) -> None:
    del argv
    from tqdm.auto import tqdm

    from flowcache_jax import io

    cfg = _CONFIG.value
    if _REPEATS.value < 1:
        raise common.ConfigError(f"--repeats must be >= 1, got {_REPEATS.value}")
    out = Path(_OUT.value or f"outputs/benchmark_{cfg.name}")
    cfg = common.calibrate(cfg)  # MagCache: one calibration run, not one per build below
    runs = {"vanilla": common.build(common.with_policy(cfg, "vanilla")), cfg.name: common.build(cfg)}
    times = {k: [] for k in runs}
    results = {}
    frames = {}
    for name, r in runs.items():  # warm: compile + one untimed run (decoded, for the pixel metrics)
        results[name], frames[name] = r.sample(progress=False)
    for _ in tqdm(range(_REPEATS.value), desc="benchmark repeats"):
        for name, r in runs.items():
            res, _ = r.sample(progress=False, decode=False)
            times[name].append(res.wall["denoise"])
    med = {k: statistics.median(v) for k, v in times.items()}
    van, cac = results["vanilla"], results[cfg.name]
    r = runs[cfg.name]
    n = r.table.n_chunks
    fl = common.run_flops(r, cac)
    report = {
        "config_name": cfg.name, "policy": cfg.policy.name, "num_chunks": n, "repeats": _REPEATS.value,
        "denoise_s_median": med, "denoise_s_all": times,
        "speedup_wall": med["vanilla"] / med[cfg.name],
        "speedup_ideal": cac.speedup_ideal,
        "chunk_forwards": {"vanilla": van.computed, cfg.name: cac.computed},
        "flops": fl,
        "vs_vanilla": common.compare(r, cac, frames[cfg.name], van, frames["vanilla"]),
        "compiles": {**(compiles_at_lengths(cfg, [n, 2 * n]) if _LENGTHS.value else {}),
                     "timed_runs": {k: r.compiles for k, r in runs.items()}},  # the side-by-side runs' own
        "forwards": {"vanilla": van.chunk_forwards_vanilla, "structure_skipped": cac.structure_skipped,
                     "cache_skipped": cac.cache_skipped, "computed": cac.computed},
    }
    report["wall_over_ideal"] = report["speedup_wall"] / report["speedup_ideal"]
    report["psnr_vs_vanilla"], report["ssim_vs_vanilla"] = report["vs_vanilla"]["psnr"], report["vs_vanilla"]["ssim"]
    if frames[cfg.name] is not None:
        report["decode_s"] = r.decoder.seconds
    io.write_json(out / "benchmark.json", report)
    row = {k: report[k] for k in ("config_name", "speedup_ideal", "speedup_wall", "wall_over_ideal",
                                    "psnr_vs_vanilla")}
    row["vanilla_s"], row["cached_s"] = med["vanilla"], med[cfg.name]
    row["compiles"] = "/".join(map(str, report["compiles"].get("per_run", report["compiles"]["timed_runs"].values())))
    print(common.format_table([row], list(row)))
    print(f"wrote {out / 'benchmark.json'}")


if __name__ == "__main__":
    common.run_app(main)
