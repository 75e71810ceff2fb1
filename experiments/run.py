r"""Generate one video with a named config; print a table; write results.json, latents and a preview.

  python experiments/run.py [--config=NAME] [--config.policy.threshold=0.05 ...] [--output_dir=D]
  python experiments/run.py --config=NAME --config.mesh.fsdp=8 --config.mesh.seq=2 --num_processes=2 \
      --process_id=I --coordinator_address=host0:1234      # one process per host, one mesh over all of them

With no --config the embedded default runs (no download needed). ``--checkpoint_every=N`` saves a resume point
every N stages; the same command started again after a crash continues from it and writes the same latents.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from experiments import common  # noqa: E402

sys.argv = common.expand_flagfiles(sys.argv)  # before config_flags reads them (one-line errors)
_CONFIG = config_flags.DEFINE_config_file("config", None, "Preset name (e.g. synthetic_fast) or .py file.")
_OUT = flags.DEFINE_string("output_dir", None, "Output folder (default outputs/<config name>).")
_COMPARE = flags.DEFINE_bool("compare_to_vanilla", True, "Also run the uncached config for PSNR/SSIM.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show progress bars.")
_COORD = flags.DEFINE_string("coordinator_address", None, "Multi-host: host:port of process 0 (jax.distributed).")
_NPROC = flags.DEFINE_integer("num_processes", 1, "Multi-host: processes (one per host) that form one mesh.")
_PID = flags.DEFINE_integer("process_id", 0, "Multi-host: this process's index.")
_EVERY = flags.DEFINE_integer("checkpoint_every", 0, "Save a resume point in <output_dir>/resume every N stages "
                              "(0: none). A killed run started again with the same command continues from it.")
_RESUME = flags.DEFINE_bool("resume", True, "Continue from <output_dir>/resume when it holds a point of this run.")


def init_distributed() -> bool:
    """One process per host joins the global mesh (``--config.mesh.*`` counts every host's devices); returns whether
    this process writes the outputs (process 0: every process holds the same replicated latents and records)."""
    import jax

    if _NPROC.value <= 1:
        return True
    if not _COORD.value or not 0 <= _PID.value < _NPROC.value:
        raise common.ConfigError("multi-host runs need --coordinator_address=HOST:PORT and 0 <= --process_id < "
                                 "--num_processes")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU hosts; GPUs use NCCL whatever this says
    jax.distributed.initialize(coordinator_address=_COORD.value, num_processes=_NPROC.value, process_id=_PID.value)
    return jax.process_index() == 0


def resumable(run, out: Path, writer: bool) -> dict:
    """The sampler's resume arguments for ``--checkpoint_every`` / ``--resume`` (a point in ``out/resume``)."""
    from flowcache_jax import resume
    from flowcache_jax.schedules import ScheduleTable

    folder = out / "resume"
    if _EVERY.value < 0:
        raise common.ConfigError(f"--checkpoint_every must be >= 0, got {_EVERY.value}")
    if not isinstance(run.table, ScheduleTable):
        if _EVERY.value or (_RESUME.value and folder.exists()):
            raise common.ConfigError(f"resumable runs exist for one-schedule models (MAGI-1, Self-Forcing, synthetic)"
                                     f", not {run.cfg.model}'s windows: leave --checkpoint_every at 0")
        return {}
    print_ = resume.fingerprint(run.cfg.to_dict(), run.table)
    kw = {}
    if _EVERY.value and writer:
        kw = {"checkpoint_every": _EVERY.value, "on_checkpoint": lambda point: resume.save(folder, point, print_)}
    if _RESUME.value and folder.exists():
        try:
            point = resume.load(folder, run.sampler.init_state(run.params, run.conditions(run.cfg.seed)), print_)
        except ValueError as e:
            raise common.ConfigError(f"{e} (or pass --noresume to start over)") from e
        if point is not None:
            print(f"resumed at stage {point.stage} of {run.table.num_stages}")
            kw["resume"] = point
    return kw


def main(argv: list[str]) -> None:
    del argv

    from flowcache_jax import io, metrics

    writer = init_distributed()
    cfg = _CONFIG.value
    out = Path(_OUT.value or f"outputs/{cfg.name}")
    if out.exists() and not out.is_dir():
        raise common.ConfigError(f"--output_dir {out} exists and is not a folder")
    timer = metrics.WallTimer()
    with timer("load"):
        run = common.build(cfg)
    res, frames = run.sample(progress=_PROGRESS.value, **resumable(run, out, writer))
    run_fl = common.run_flops(run, res)
    results = {
        "config_name": cfg.name, "policy": cfg.policy.name, "threshold": cfg.policy.threshold,
        "num_chunks": run.table.n_chunks, "num_steps": run.table.num_steps,
        "chunk_forwards_vanilla": res.chunk_forwards_vanilla, "chunk_forwards_computed": res.computed,
        "computed_fraction": res.computed_fraction, "speedup_ideal": res.speedup_ideal,
        "wall_s": {"load": timer.seconds["load"], **res.wall, **common.pipeline_times(run)},
        "compiles": res.traces, "structure_skipped": res.structure_skipped, "cache_skipped": res.cache_skipped,
        "text": run.text, "decoded": frames is not None,
        "flops": run_fl, "notes": run.notes,
        "decisions": res.decisions, "decision_chunks": res.chunk, "config": cfg.to_dict(),
    }
    if _COMPARE.value and cfg.policy.name != "vanilla":
        ref_run = common.build(common.with_policy(cfg, "vanilla"))
        ref, ref_frames = ref_run.sample(progress=_PROGRESS.value)
        results["vs_vanilla"] = common.compare(run, res, frames, ref, ref_frames)
    if not writer:
        return
    io.write_json(out / "results.json", results)
    io.write_npz(out / "latents.npz", latents=res.video, decisions=res.decisions)
    media = common.write_video_outputs(run, res.video, out, frames=frames)
    row = {k: results[k] for k in ("config_name", "policy", "num_chunks", "chunk_forwards_vanilla",
                                    "chunk_forwards_computed", "computed_fraction", "speedup_ideal")}
    row.update({f"{k}_s": v for k, v in results["wall_s"].items()})
    row.update(results.get("vs_vanilla", {}))
    print(common.format_table([row], list(row)))
    for k, v in run.notes.items():
        print(f"{k}: {v}")
    if run.text and run.text["truncated"]:
        print(f"warning: the prompt was truncated to {run.text['max_length']} tokens (the encoder's maximum)")
    print(f"wrote {out / 'results.json'}, {out / 'latents.npz'}, {', '.join(map(str, media))}")
    if (out / "resume").exists():  # the run is complete: its resume point has served
        shutil.rmtree(out / "resume")


if __name__ == "__main__":
    common.run_app(main)
