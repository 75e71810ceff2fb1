r"""KV-cache quantization side by side: bf16, RTN INT8 / INT4, the KV-quant study's soft-prune INT4 and ours.

  python experiments/kv_quant.py --output_dir=D [--models=self_forcing,tiny] [--self_forcing_checkpoint=DIR]
      [--methods=...] [--tiers=8:0.25,4:0.75] [--recent_frames=6] [--aged_tiers=0] [--lpips_weights=F]

Every method runs the same video (same noise) in this process; per method it reports the accounted K/V bytes of
the history and the compression against bf16, the real peak of the compiled stage function (XLA's memory analysis:
arguments + outputs - aliased + temporaries; on a GPU also the device's peak allocation), the denoise wall time,
and PSNR / SSIM (LPIPS with ``--lpips_weights``) against the bf16 run. Models:

- ``self_forcing``: a Self-Forcing-architecture model (the causal Wan of ``models.self_forcing``) with the real
  bit-packed store; the converted checkpoint of ``--self_forcing_checkpoint``, else a small one with upstream-style
  random initialisation (sizes below) -- its fidelity figures describe the storage, not a trained model;
- ``tiny``: the trained embedded MAGI-1 model, whose attention reads a dense buffer: each finished chunk is
  replaced by what the method would store (fake quantization), so its rows give fidelity, not memory.

Then the full-size figures (Self-Forcing 1.3B, 480x832, 42 latent frames: the study's setting) from shapes alone.
Writes ``D/kv_quant.json`` (``rows``: method, model, compression, kv_bytes, peak_bytes, wall_s, psnr, ssim, ...;
``fullsize``) and prints both tables.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

from experiments import common  # noqa: E402
from experiments.self_forcing_run import SMALL_MODEL, SMALL_VIDEO, random_checkpoint  # noqa: E402, F401

METHOD_ROWS = ("bf16", "rtn_int8", "rtn_int4", "study_soft_prune_int4", "ours")
_OUT = flags.DEFINE_string("output_dir", "outputs/kv_quant", "Output folder.")
_MODELS = flags.DEFINE_list("models", ["self_forcing", "tiny"], "Models to run: self_forcing, tiny.")
_METHODS = flags.DEFINE_list("methods", list(METHOD_ROWS), "Methods (bf16 is the reference and always runs).")
_CKPT = flags.DEFINE_string("self_forcing_checkpoint", "", "Converted Self-Forcing folder (default: a random one).")
_BLOCKS = flags.DEFINE_integer("blocks", 14, "Self-Forcing blocks generated (14 x 3 = 42 latent frames).")
_TIERS = flags.DEFINE_string("tiers", "", "Ours: bits:fraction per tier, most important first (default: the "
                             "configs' kv.tiers).")
_RECENT = flags.DEFINE_integer("recent_frames", None, "Ours: frames that keep every tier (default: the configs').")
_AGED = flags.DEFINE_integer("aged_tiers", None, "Ours: tiers an older frame keeps, -1 never ages (default: configs').")
_LPIPS = flags.DEFINE_string("lpips_weights", None, "LPIPS (AlexNet) weights as .safetensors (RGB frames only).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the noise every method shares.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show progress bars.")

def parse_tiers(text: str) -> tuple[tuple[int, float], ...]:
    try:
        return tuple((int(b), float(f)) for b, f in (p.split(":") for p in text.split(",") if p))
    except ValueError as e:
        raise common.ConfigError(f"--tiers must be bits:fraction pairs, e.g. 8:0.05,4:0.25, got {text!r}") from e


def config_for(model: str, method: str, ckpt: str) -> ml_collections.ConfigDict:
    """The run config of one model and storage method (same seed and video for every method)."""
    from experiments.cli import CONFIG_DIR, load_config

    if model == "self_forcing":
        cfg = load_config(str(CONFIG_DIR / "self_forcing_vanilla.py"))
        cfg.checkpoint = ckpt
        cfg.video.num_frames = 4 * (cfg.sampler.num_frame_per_block * _BLOCKS.value) - 3  # 4k+1 pixel frames
        if not _CKPT.value:  # the small random model: a small video
            cfg.video.height, cfg.video.width = SMALL_VIDEO["height"], SMALL_VIDEO["width"]
        # like for like: every method's attention folds one latent frame of keys at a time (the store's tile)
        cfg.compute.attention = "tiled"
        cfg.sampler.key_tile = (cfg.video.height // 16) * (cfg.video.width // 16)
    elif model == "tiny":
        cfg = load_config(str(CONFIG_DIR / "tiny_vanilla.py"))
    else:
        raise common.ConfigError(f"unknown model {model!r}: use self_forcing or tiny")
    cfg.seed = _SEED.value
    cfg.compute.dtype = "bfloat16"  # the study's setting: bf16 activations and K/V (the bf16 row)
    cfg.kv.method = "dense" if method == "bf16" else method
    if _TIERS.value:
        cfg.kv.tiers = parse_tiers(_TIERS.value)
    if _RECENT.value is not None:
        cfg.kv.recent_frames = _RECENT.value
    if _AGED.value is not None:
        cfg.kv.aged_tiers = _AGED.value
    return cfg


def compiled_memory(run) -> dict:
    """XLA's memory analysis of the run's one compiled stage function (bytes). ``peak`` = arguments + outputs not
    aliased to them + temporaries: what this backend holds at once (on a CPU nothing is donated, so the state is
    both an argument and an output; on a GPU the donated state is aliased and counted once)."""
    if len(run.sampler._compiled) != 1:
        raise RuntimeError(f"expected one compiled stage function, found {len(run.sampler._compiled)}")
    m = next(iter(run.sampler._compiled.values())).memory_analysis()
    if m is None:
        raise RuntimeError(f"the {jax.default_backend()} backend reports no memory analysis")
    fields = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in ("argument", "output", "alias", "temp")}
    fields["peak"] = fields["argument"] + fields["output"] - fields["alias"] + fields["temp"]
    return fields


def device_peak() -> int | None:
    """The device's peak allocation of this process so far (GPU/TPU memory stats; None where there are none). It
    is never reset, so only its growth from one method to the next says anything: the rows record it as it is."""
    if jax.default_backend() == "cpu":
        return None
    stats = jax.devices()[0].memory_stats() or {}
    return int(stats["peak_bytes_in_use"]) if "peak_bytes_in_use" in stats else None


def state_bytes(den) -> int:
    """Bytes the run's K/V state really allocates (every array of ``init_kv``, used or not)."""
    shapes = jax.eval_shape(lambda: den.init_kv(1, 1))
    return int(sum(np.prod(a.shape) * a.dtype.itemsize for a in jax.tree.leaves(shapes)))


def history_bytes(run, res) -> dict:
    """Accounted bytes of the history the run ended with, and what bf16 would take for the same frames."""
    from flowcache_jax.kv import quant_store as qs
    from flowcache_jax.kv import study

    den = run.denoiser
    if run.cfg.model == "self_forcing":
        c, fsl = den.cfg, den.frame_tokens
        report = res.stage_reports[-1]
        held = int((np.asarray(report["frame"]) >= 0).sum())
        bf16 = held * c.num_layers * 2 * fsl * c.num_heads * c.head_dim * 2
        if den.kv_method is None:
            item = jnp.dtype(c.dtype).itemsize
            return {"frames": held, "kv_bytes": bf16 // 2 * item, "bf16_bytes": bf16}
        cfg = den.kv_method.store
        st = qs.frame_stats(cfg, c.num_heads, c.head_dim)
        tier_on = np.asarray(report["tier_on"])[np.asarray(report["frame"]) >= 0]
        if den.kv_method.study is not None:  # what the store holds: INT4 frames and one token per folded frame;
            summary = 2 * c.num_heads * c.head_dim * 2  # the study's own accounting (its plan's tiers) beside it
            int4 = st["codes_bytes"] + st["scale_bytes"]
            tiers = np.asarray(report["plan_tiers"])[:held]
            stored = np.where(tier_on[:, 0], int4, summary)
            planned = np.where(tiers == study.SUMMARISED, summary, int4)
            return {"frames": held, "kv_bytes": int(stored.sum()) * c.num_layers, "bf16_bytes": bf16,
                    "study_plan_bytes": int(planned.sum()) * c.num_layers,
                    "summarised_stored": int((~tier_on[:, 0]).sum()),
                    "summarised_planned": int((tiers == study.SUMMARISED).sum())}
        aged = int((np.asarray(report.get("aged_frame", [])) >= 0).sum())
        if aged:
            aged_st = qs.frame_stats(den.kv_method.aged_store, c.num_heads, c.head_dim)
            held += aged
            bf16 = held * c.num_layers * 2 * fsl * c.num_heads * c.head_dim * 2
            kv_bytes = (held - aged) * c.num_layers * st["bytes"] + aged * c.num_layers * aged_st["bytes"]
            return {"frames": held, "kv_bytes": kv_bytes, "bf16_bytes": bf16, "aged": aged}
        return {"frames": held, "kv_bytes": held * c.num_layers * st["bytes"], "bf16_bytes": bf16}
    # MAGI-1 (fake quantization): the finished frames of the run, at the method's accounting
    c, fsl = den.cfg, den.frame_tokens
    report = res.stage_reports[-1]
    frames = np.asarray(report.get("quant_frames", []))
    # a dense buffer keeps every chunk of the run (given and generated); a quantized one records what it stored
    held = int((frames >= 0).sum()) if frames.size else int(run.table.n_chunks + den.prefix_chunks) * \
        den.layout.frames_per_chunk
    g, hd, layers = c.num_query_groups, c.kv_channels, c.num_layers
    bf16 = held * layers * 2 * fsl * g * hd * 2
    if den.kv_method is None:
        return {"frames": held, "kv_bytes": bf16 // 2 * jnp.dtype(c.jdtype).itemsize, "bf16_bytes": bf16}
    st = qs.frame_stats(den.kv_method.store, g, hd)
    if den.kv_method.study is not None:
        folded = int(np.asarray(report["quant_folded"])[frames >= 0].sum())
        per = (held - folded) * (st["codes_bytes"] + st["scale_bytes"]) + folded * 2 * g * hd * 2
        return {"frames": held, "kv_bytes": per * layers, "bf16_bytes": bf16, "summarised_stored": folded}
    folded = int(np.asarray(report["quant_folded"])[frames >= 0].sum()) if den.kv_method.ages else 0
    aged = qs.frame_stats(den.kv_method.aged_store, g, hd)["bytes"] if folded else 0
    return {"frames": held, "kv_bytes": ((held - folded) * st["bytes"] + folded * aged) * layers, "bf16_bytes": bf16,
            "aged": folded}


def run_method(model: str, method: str, ckpt: str) -> dict:
    cfg = config_for(model, method, ckpt)
    run = common.build(cfg)
    res = run.sampler.run(run.params, run.cond, run.table, run.key, progress=_PROGRESS.value, record_stages=True)
    t0 = time.perf_counter()  # timed again, compiled: the denoise time of a warm run
    timed = run.sampler.run(run.params, run.cond, run.table, run.key, progress=False)
    wall = time.perf_counter() - t0
    mem = compiled_memory(run)
    acc = history_bytes(run, res)
    acc["allocated_bytes"] = state_bytes(run.denoiser)
    return {"run": run, "res": res, "wall_s": float(timed.wall["denoise"]), "wall_total_s": wall, "memory": mem,
            "accounting": acc, "device_peak_bytes_process": device_peak()}


def fidelity(run, res, ref_run, ref_res, lpips) -> dict:
    from flowcache_jax import metrics

    a, b = run.images(res.video), ref_run.images(ref_res.video)
    out = {"space": "rgb frames" if run.rgb else "latents", "psnr": metrics.psnr(a, b, run.data_range),
           "ssim": metrics.ssim(a, b, run.data_range), "rel_l2": float(np.linalg.norm(res.video - ref_res.video)
                                                                        / max(np.linalg.norm(ref_res.video), 1e-12))}
    if lpips is not None and run.rgb:
        out["lpips"] = lpips(run.rgb_frames(res.video, 1), ref_run.rgb_frames(ref_res.video, 1))
    return out


def fullsize_rows(kv) -> list[dict]:
    """Self-Forcing 1.3B at 480x832: the study's 42-frame buffer (65520 tokens per layer) and our 21-frame window
    (18 history frames + the block), per method, from shapes: accounted bytes and what the store allocates."""
    from flowcache_jax.kv import methods as kvm
    from flowcache_jax.kv import quant_store as qs

    layers, heads, hd, fsl = 30, 12, 128, 1560
    bf16_frame = layers * 2 * fsl * heads * hd * 2
    rows = []
    for method in METHOD_ROWS:
        m = kvm.from_config({**kv, "method": "dense" if method == "bf16" else method}, fsl)
        for frames, what in ((42, "study buffer: 42 frames stored"), (18, "our ring: 18 history frames")):
            if m is None:
                per = alloc = frames * bf16_frame
            else:
                st = qs.frame_stats(m.store, heads, hd)
                per = alloc = frames * layers * st["bytes"]
                if m.study is not None:  # the plan's INT4 frames and one token per summarised frame (its accounting)
                    int4 = layers * (st["codes_bytes"] + st["scale_bytes"])
                    share = _study_share(frames)
                    per = frames * (share * int4 + (1 - share) * layers * 2 * heads * hd * 2)
                    alloc = frames * int4  # a fixed-shape store keeps INT4 room for every frame
                elif m.ages:
                    recent = min(m.recent_frames, frames)
                    aged = layers * qs.frame_stats(m.aged_store, heads, hd)["bytes"]
                    per = alloc = recent * layers * st["bytes"] + (frames - recent) * aged
            rows.append({"method": method, "setting": what, "frames": frames, "kv_gib": per / 2**30,
                         "allocated_gib": alloc / 2**30, "compression": frames * bf16_frame / per})
    return rows


def _study_share(frames: int) -> float:
    """Fraction of ``frames`` chunks the study's planner keeps at INT4 (budget 1)."""
    from flowcache_jax.kv import study

    r, i, k = study.tier_counts(study.SoftPruneParams(), 1.0, frames)
    return (r + i + k) / frames


def main(argv: list[str]) -> None:
    del argv
    from flowcache_jax import io

    out = Path(_OUT.value)
    lpips = None
    if _LPIPS.value:
        from flowcache_jax.lpips import LPIPS

        lpips = LPIPS.load(_LPIPS.value)
    methods = [m for m in METHOD_ROWS if m in set(_METHODS.value) | {"bf16"}]
    unknown = set(_METHODS.value) - set(METHOD_ROWS)
    if unknown:
        raise common.ConfigError(f"unknown --methods {sorted(unknown)}; choose from {', '.join(METHOD_ROWS)}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = _CKPT.value or str(random_checkpoint(Path(tmp) / "self_forcing_random"))
        for model in _MODELS.value:
            ref = None
            for method in methods:
                r = run_method(model, method, ckpt)
                ref = ref or r
                fid = fidelity(r["run"], r["res"], ref["run"], ref["res"], lpips)
                acc, mem = r["accounting"], r["memory"]
                kv = acc.get("kv_bytes")
                rows.append({"model": model, "method": method, "compression": acc["bf16_bytes"] / kv,
                             "kv_bytes": kv, "bf16_kv_bytes": acc["bf16_bytes"], "frames_held": acc["frames"],
                             "allocated_bytes": acc["allocated_bytes"], "peak_bytes": mem["peak"], "memory": mem,
                             "device_peak_bytes_process": r["device_peak_bytes_process"], "wall_s": r["wall_s"],
                             **{k: acc[k] for k in ("study_plan_bytes", "summarised_stored", "summarised_planned",
                                                    "aged") if k in acc},
                             **fid, "storage": "packed store" if model == "self_forcing" else "fake quantization"})
    base = {r["model"]: r for r in rows if r["method"] == "bf16"}
    for r in rows:
        b = base[r["model"]]
        r["peak_saving_bytes"] = b["peak_bytes"] - r["peak_bytes"]
        r["kv_saving_bytes"] = b["kv_bytes"] - r["kv_bytes"]
        r["allocated_saving_bytes"] = b["allocated_bytes"] - r["allocated_bytes"]
    full = fullsize_rows(config_for("self_forcing", "ours", "").kv.to_dict())
    record = {"rows": rows, "fullsize": full, "dtype": "bfloat16", "blocks": _BLOCKS.value,
              "ours": config_for("self_forcing", "ours", "").kv.to_dict(),
              "backend": jax.default_backend(),
              "notes": {"peak_bytes": "compiled stage function: arguments + outputs - aliased + temporaries (on a "
                                      "CPU nothing is donated: the state counts as argument and as output)",
                        "kv_bytes": "what the history holds at the end (codes, fp16 scales, summary tokens); "
                                    "allocated_bytes: every array of the K/V state; study_plan_bytes: the study's "
                                    "own accounting by its plan's tiers",
                        "tiny": "MAGI-1 reads a dense buffer: fake quantization (fidelity only, memory unchanged)",
                        "self_forcing": "checkpoint " + (_CKPT.value or "random upstream-style init (not trained)")}}
    io.write_json(out / "kv_quant.json", record)
    cols = ["model", "method", "compression", "kv_bytes", "peak_bytes", "peak_saving_bytes", "wall_s", "psnr",
            "ssim"] + (["lpips"] if lpips else [])
    print(common.format_table(rows, cols))
    print()
    print(common.format_table(full, ["method", "setting", "kv_gib", "allocated_gib", "compression"]))
    print(f"wrote {out / 'kv_quant.json'}")


if __name__ == "__main__":
    common.run_app(main, default=None)
