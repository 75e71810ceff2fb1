r"""Speed/quality of every method of a config family against its uncached run: the paper's Table 1 in miniature.

  python experiments/quality.py [--config=tiny] --output_dir=D [--seeds=0,1] [--repeats=3] [--lpips_weights=F]

Runs ``<family>_vanilla`` and every other ``<family>_*`` preset on the same seeds; wall times are measured
side by side in this process (all samplers compiled first, runs interleaved, medians). Then a threshold
sweep per policy (FlowCache, TeaCache, FirstBlockCache, MagCache) gives the Pareto curves. Writes
``D/quality.json``, ``D/pareto.png``, ``D/side_by_side/<method>.mp4`` (uncached | method) and prints tables.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

from experiments import common  # noqa: E402

_FAMILY = flags.DEFINE_string("config", "tiny", "Config family: runs <family>_vanilla and every <family>_* preset.")
_OUT = flags.DEFINE_string("output_dir", None, "Output folder (default outputs/quality_<family>).")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1"], "Seeds (initial noise) every method runs on.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per method for speedup_wall (median).")
_OVERRIDE = flags.DEFINE_multi_string("override", [], "field=value set in every config, e.g. checkpoint=D/model.")
_LPIPS = flags.DEFINE_string("lpips_weights", None, "LPIPS (AlexNet) weights as .safetensors; adds an lpips column.")
_SWEEP = flags.DEFINE_bool("sweep", True, "Also run the threshold sweep and draw the Pareto plot.")
_POINTS = flags.DEFINE_integer("sweep_points", 6, "Thresholds per policy in the sweep (evenly taken from SWEEPS).")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show progress bars.")
SWEEPS = {  # thresholds per policy for the Pareto curves (runtime knobs: one compilation per policy, not per point)
    "flowcache": [0.01, 0.02, 0.05, 0.1, 0.2, 0.4],
    "teacache": [0.005, 0.01, 0.02, 0.05, 0.1, 0.2],
    "first_block": [0.02, 0.05, 0.1, 0.2, 0.3, 0.5],
    "magcache": [0.01, 0.03, 0.06, 0.1, 0.2, 0.4],
}


def load_config(name: str, overrides: list[str]) -> ml_collections.ConfigDict:
    """A preset by name with ``field=value`` overrides (Python literals, or strings for string fields)."""
    import ast
    import importlib

    cfg = importlib.import_module(f"experiments.configs.{name}").get_config()
    for o in overrides:
        key, sep, val = o.partition("=")
        parent, leaf = cfg, key.split(".")[-1]
        try:
            for part in key.split(".")[:-1]:
                parent = parent[part]
            cur = parent[leaf]
            parent[leaf] = val if isinstance(cur, str) or cur is None else type(cur)(ast.literal_eval(val))
        except (KeyError, AttributeError, TypeError, ValueError, SyntaxError) as e:
            raise common.ConfigError(f"--override {o!r}: needs field=value with an existing field ({e})") from e
        if not sep:
            raise common.ConfigError(f"--override must be field=value, got {o!r}")
    return cfg


KNOBS = ("threshold", "warmup", "coeffs", "ratios", "max_skips", "min_charge")  # runtime: one rule shares them


class RunPool:
    """One built run per rule and model setup: the methods and sweep points of a policy differ only in knobs,
    so they share its sampler, i.e. one compiled stage function, and the checkpoint is loaded once."""

    def __init__(self):
        self.runs: dict[str, common.Run] = {}

    @staticmethod
    def key(cfg: ml_collections.ConfigDict) -> str:
        import json

        d = cfg.to_dict()
        pol = d.get("policy", {})
        shapes = {k: len(pol.get(k) or ()) for k in ("coeffs", "ratios")}  # coefficient counts fix the structure
        d["policy"] = {**{k: v for k, v in pol.items() if k not in KNOBS}, **shapes}
        d.pop("seed", None)
        d.pop("name", None)
        return json.dumps(d, sort_keys=True, default=str)

    def get(self, cfg: ml_collections.ConfigDict) -> common.Run:
        k = self.key(cfg)
        if k not in self.runs:
            self.runs[k] = common.build(cfg)
        return self.runs[k].with_knobs(cfg)

    @property
    def compiles(self) -> int:
        """Stage-function compilations of every run built here (the whole process's, as everything runs here)."""
        return sum(r.compiles for r in self.runs.values())


class Evaluator:
    """Runs configs on the family's seeds and scores them against the uncached run of the same seed."""

    def __init__(self, vanilla_cfg: ml_collections.ConfigDict, seeds: list[int], pool: RunPool, lpips=None):
        self.seeds, self.lpips, self.pool = seeds, lpips, pool
        self.ref_run = pool.get(vanilla_cfg)
        self.refs = {s: self.run(self.ref_run, s) for s in seeds}

    @staticmethod
    def run(run: common.Run, seed: int, decode: bool = True):
        """(result, decoded uint8 frames or None) of one seed."""
        return run.sample(progress=False, seed=seed, decode=decode)

    def score(self, run: common.Run) -> tuple[dict, dict]:
        """Seed-mean speedup_ideal, computed_fraction, psnr, ssim (and lpips); plus the results per seed.

        With a VAE the scores are on the decoded frames (what the paper reports) and the latent PSNR is kept as
        ``latent_psnr``; without one they are on the latents (RGB frames for the tiny model)."""
        rows, results = [], {}
        for s in self.seeds:
            res, frames = results[s] = self.run(run, s)
            ref, ref_frames = self.refs[s]
            cmp = common.compare(run, res, frames, ref, ref_frames)
            row = {"speedup_ideal": res.speedup_ideal, "computed_fraction": res.computed_fraction,
                   "psnr": cmp["psnr"], "ssim": cmp["ssim"]}
            if "latent_psnr" in cmp:
                row["latent_psnr"] = cmp["latent_psnr"]
            if self.lpips is not None:
                a, b = (frames, ref_frames) if frames is not None else (run.rgb_frames(res.video),
                                                                         run.rgb_frames(ref.video))
                row["lpips"] = self.lpips(a, b)
            rows.append(row)
        return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}, results


def wall_times(runs: dict[str, common.Run], seed: int, repeats: int, progress: bool) -> dict[str, float]:
    """Median denoise seconds per run, runs interleaved (all are compiled by then)."""
    from tqdm.auto import tqdm

    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in tqdm(range(repeats), desc="timing", disable=not progress, leave=False):
        for k, r in runs.items():
            times[k].append(Evaluator.run(r, seed, decode=False)[0].wall["denoise"])
    return {k: statistics.median(v) for k, v in times.items()}


def pareto_plot(sweep: list[dict], methods: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from flowcache_jax.io import save_figure

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for pol in dict.fromkeys(p["policy"] for p in sweep):
        pts = sorted((p["speedup_ideal"], min(p["psnr"], 60.0)) for p in sweep if p["policy"] == pol)
        ax.plot(*zip(*pts, strict=True), "o-", ms=3, label=pol)
    for name, m in methods.items():
        if m["policy"] != "vanilla":
            ax.plot(m["speedup_ideal"], min(m["psnr"], 60.0), "k*", ms=7)
            ax.annotate(name, (m["speedup_ideal"], min(m["psnr"], 60.0)), fontsize=6, xytext=(3, 3),
                        textcoords="offset points")
    ax.set_xlabel("ideal speedup (vanilla forwards / forwards run)")
    ax.set_ylabel("PSNR vs uncached (dB, drawn capped at 60)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save_figure(fig, path)
    plt.close(fig)


def compare_curves(sweep: list[dict], a: str, b: str) -> dict:
    """PSNR of policy ``a`` minus ``b`` at equal ideal speedup, over the speedups both curves cover."""
    def curve(p):
        pts = sorted((q["speedup_ideal"], q["psnr"]) for q in sweep if q["policy"] == p and np.isfinite(q["psnr"]))
        return np.array([x for x, _ in pts]), np.array([y for _, y in pts])

    (xa, ya), (xb, yb) = curve(a), curve(b)
    if len(xa) < 2 or len(xb) < 2:
        return {"common_range": None}
    lo, hi = max(xa.min(), xb.min()), min(xa.max(), xb.max())
    if hi <= lo:
        return {"common_range": None}
    grid = np.linspace(lo, hi, 25)
    diff = np.interp(grid, xa, ya) - np.interp(grid, xb, yb)
    return {"common_range": [float(lo), float(hi)], "mean_psnr_gain_db": float(diff.mean()),
            "min_psnr_gain_db": float(diff.min()), "fraction_higher": float((diff > 0).mean())}


def main(argv: list[str]) -> None:
    del argv
    import jax
    from tqdm.auto import tqdm

    from experiments import loaded
    from flowcache_jax import io

    fam = _FAMILY.value
    names = [n for n in common.config_names() if n.startswith(f"{fam}_")]
    if f"{fam}_vanilla" not in names:
        raise common.ConfigError(f"--config={fam}: no preset {fam}_vanilla in experiments/configs "
                                 f"(families: {', '.join(sorted({n.split('_')[0] for n in common.config_names()}))})")
    try:
        seeds = [int(s) for s in _SEEDS.value]
    except ValueError as e:
        raise common.ConfigError(f"--seeds must be integers, got {_SEEDS.value}") from e
    if not seeds or _REPEATS.value < 1:
        raise common.ConfigError("--seeds needs at least one seed and --repeats must be >= 1")
    out = Path(_OUT.value or f"outputs/quality_{fam}")
    lpips = None
    if _LPIPS.value:
        from flowcache_jax.lpips import LPIPS

        try:
            lpips = LPIPS.load(_LPIPS.value)
        except (FileNotFoundError, ValueError) as e:
            raise common.ConfigError(str(e)) from e
    cfgs = {n: load_config(n, _OVERRIDE.value) for n in names}
    pool = RunPool()
    t_start = time.perf_counter()
    ev = Evaluator(cfgs[f"{fam}_vanilla"], seeds, pool, lpips)
    base = cfgs[f"{fam}_vanilla"]
    ratios = None
    calibrated = base.policy.get("metric", "input") != "timestep"  # MagCache needs a chunk schedule
    if calibrated and (any(c.policy.name == "magcache" for c in cfgs.values()) or _SWEEP.value):  # one for all
        ratios = common.calibrate(common.with_policy(base, "magcache"), seed_offset=1000, make=pool.get).policy.ratios
    for c in cfgs.values():
        if c.policy.name == "magcache" and not tuple(c.policy.ratios):
            c.policy.ratios = ratios

    runs = {n: (ev.ref_run if n == f"{fam}_vanilla" else pool.get(c)) for n, c in cfgs.items()}
    methods, results = {}, {}
    for n in tqdm(runs, desc="methods", disable=not _PROGRESS.value):
        m, results[n] = ev.score(runs[n])
        methods[n] = {"policy": cfgs[n].policy.name, "threshold": float(cfgs[n].policy.threshold), **m}
    med = wall_times(runs, seeds[0], _REPEATS.value, _PROGRESS.value)
    for n in methods:
        methods[n]["denoise_s"] = med[n]
        methods[n]["speedup_wall"] = med[f"{fam}_vanilla"] / med[n]
        methods[n]["wall_over_ideal"] = methods[n]["speedup_wall"] / methods[n]["speedup_ideal"]

    sweep, t_sweep = [], 0.0
    if _SWEEP.value:
        t0 = time.perf_counter()
        if _POINTS.value < 2:
            raise common.ConfigError(f"--sweep_points must be >= 2 (a curve), got {_POINTS.value}")
        pick = lambda ts: [ts[i] for i in sorted(set(np.linspace(0, len(ts) - 1, _POINTS.value).round().astype(int)))]
        from flowcache_jax.policies import TIMESTEP_POLICIES

        # rules on the timestep metric (SkyReels) exist for FlowCache and TeaCache only
        rules = [p for p in SWEEPS if base.policy.get("metric", "input") != "timestep" or p in TIMESTEP_POLICIES]
        points = [(p, t) for p in rules for t in pick(SWEEPS[p])]
        unsupported = {}
        for pol, thr in tqdm(points, desc="sweep", disable=not _PROGRESS.value):
            if pol in unsupported:
                continue
            c = common.with_policy(base, pol, thr)
            if pol == "magcache":
                c.policy.ratios = ratios
            try:
                run = pool.get(c)
            except common.ConfigError as e:  # a rule this model does not have (e.g. FirstBlockCache's probe)
                unsupported[pol] = str(e)
                continue
            m, _ = ev.score(run)
            sweep.append({"policy": pol, "threshold": thr, **m})
        for pol, why in unsupported.items():
            print(f"sweep: {pol} skipped: {why}")
        t_sweep = time.perf_counter() - t0
        pareto_plot(sweep, methods, out / "pareto.png")

    ref_run, s0 = ev.ref_run, seeds[0]
    for n in methods:  # uncached | method, first seed
        if n == f"{fam}_vanilla":
            continue
        (ref, ref_frames), (res, frames) = ev.refs[s0], results[n][s0]
        if frames is not None and ref_frames is not None:  # decoded by the VAE
            a, b = ref_frames, frames
        else:
            a, b = ref_run.rgb_frames(ref.video), runs[n].rgb_frames(res.video)
        if frames is None and isinstance(ref_run.cond, dict) and "prefix" in ref_run.cond:  # given frames first
            pre = ref_run.rgb_frames(np.asarray(ref_run.conditions(s0)["prefix"])[None])
            a, b = np.concatenate([pre, a]), np.concatenate([pre, b])
        gap = np.full((a.shape[0], a.shape[1], 4, 3), 255, np.uint8)
        both = np.concatenate([a, gap, b], axis=2)
        io.write_mp4(out / "side_by_side" / f"{n}.mp4", both, common.output_fps(base))
        io.write_png(out / "side_by_side" / f"{n}_frames.png", io.frame_strip(common.strip_frames(both), per_row=4))
    report = {"family": fam, "seeds": seeds, "repeats": _REPEATS.value, "methods": methods, "sweep": sweep,
              "magcache_ratios": list(ratios) if ratios else None,
              "flowcache_vs_teacache": compare_curves(sweep, "flowcache", "teacache") if sweep else None,
              "space": "pixels (decoded by the VAE)" if ev.refs[s0][1] is not None else "latents",
              "device": str(jax.devices()[0]).strip(),
              "compiles": pool.compiles, "thresholds": len(sweep), "builds": len(pool.runs),
              "checkpoint_loads": loaded.loads(), "sweep_s": t_sweep, "total_s": time.perf_counter() - t_start}
    io.write_json(out / "quality.json", report)

    cols = ["method", "policy", "threshold", "speedup_ideal", "speedup_wall", "psnr", "ssim"]
    cols += ["lpips"] if lpips is not None else []
    cols += ["latent_psnr"] if any("latent_psnr" in m for m in methods.values()) else []
    print(common.format_table([{"method": n, **m} for n, m in methods.items()], cols))
    if sweep:
        print()
        print(common.format_table(sweep, ["policy", "threshold", "speedup_ideal", "psnr", "ssim"]))
        cmp = report["flowcache_vs_teacache"]
        if cmp.get("common_range"):
            print(f"\nFlowCache vs TeaCache at equal ideal speedup ({cmp['common_range'][0]:.2f}-"
                  f"{cmp['common_range'][1]:.2f}x): PSNR gain mean {cmp['mean_psnr_gain_db']:+.2f} dB, "
                  f"min {cmp['min_psnr_gain_db']:+.2f} dB, higher on {100 * cmp['fraction_higher']:.0f}% of the range")
    print(f"{report['compiles']} stage-function compilations for {len(pool.runs)} rules x setups; "
          f"{len(sweep)} sweep points in {t_sweep:.1f} s; {report['checkpoint_loads']} checkpoint folders read")
    print(f"wrote {out / 'quality.json'}" + (f", {out / 'pareto.png'}" if sweep else "")
          + f", {out / 'side_by_side'}/")


if __name__ == "__main__":
    common.run_app(main, default=None)
