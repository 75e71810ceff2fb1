r"""How well the embedded default continues a video: PSNR of each generated frame against the true continuation.

  python experiments/continuation.py [--config=tiny_vanilla] [--seeds=0,1,2] [--output_dir=outputs/continuation]

The tiny presets continue a procedural clip whose first chunk is given clean (``prefix.source=procedural``); the
world is deterministic, so the clip's own later frames are the true continuation (``--config.prefix.world=...``
names another world of the generator's knobs, as ``train_tiny.py --world`` trained it). Beside the model's PSNR per
frame, the baseline repeats the last given frame: a model that only copies its context scores that. Writes
``continuation.json`` (``mean_psnr``, ``min_psnr``, ``baseline_mean_psnr``, per-frame and per-seed figures),
``continuation.png`` (true / generated / error rows of the first seed), the same as a video side by side
(``continuation.mp4``) and ``psnr_per_frame.png``. The error is also split between the shapes and the background
(``regions``: PSNR over the pixels of each, pooled over frames and seeds, for the model and the baseline; the
model's share of squared error that lies in the shapes): whether a model fails at moving the objects or at keeping
the scene.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from experiments import common, magi_run, scoring  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Preset name (a tiny_* preset) or .py file.")
_SEEDS = flags.DEFINE_list("seeds", None, "Seeds to continue (default: the config's seed).")
_OUT = flags.DEFINE_string("output_dir", "outputs/continuation", "Output folder.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar.")


def frame_psnrs(frames: np.ndarray, truth: np.ndarray) -> np.ndarray:
    from flowcache_jax import metrics

    return np.array([metrics.psnr(a, b, (-1.0, 1.0)) for a, b in zip(frames, truth, strict=True)])


def plot(per_frame: np.ndarray, baseline: np.ndarray, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from flowcache_jax import io

    fig, ax = plt.subplots(figsize=(5.5, 3))
    x = np.arange(1, per_frame.shape[1] + 1)
    ax.plot(x, per_frame.mean(0), "o-", label="model (mean over seeds)")
    if per_frame.shape[0] > 1:
        ax.fill_between(x, per_frame.min(0), per_frame.max(0), alpha=0.2, label="min-max over seeds")
    ax.plot(x, baseline.mean(0), "s--", label="repeat the last given frame")
    ax.set_xlabel("generated frame")
    ax.set_ylabel("PSNR vs true continuation (dB)")
    ax.legend()
    ax.grid(alpha=0.3)
    io.save_figure(fig, path)
    plt.close(fig)


def main(argv: list[str]) -> None:
    del argv
    from tqdm.auto import tqdm

    from flowcache_jax import io

    cfg = _CONFIG.value
    if cfg.get("prefix", {}).get("source") != "procedural" or cfg.prefix.chunks < 1:
        raise common.ConfigError(f"{cfg.name} does not continue a procedural clip: use a tiny_* preset "
                                 "(prefix.source=procedural, prefix.chunks >= 1)")
    try:
        seeds = [int(s) for s in (_SEEDS.value or [cfg.seed])]
    except ValueError:
        raise common.ConfigError(f"--seeds must be integers, got {_SEEDS.value}") from None
    run = common.build(cfg)
    given = cfg.prefix.chunks * cfg.video.chunk_width
    out = Path(_OUT.value)
    model, base, strips = [], [], None
    pooled = []  # (generated, repeat-last, truth, shape mask) of every seed, for the error's split by region
    for seed in tqdm(seeds, desc="continuations", disable=not _PROGRESS.value):
        res, _ = run.sample(progress=False, seed=seed, decode=False)
        gen = run.frames(res.video)
        gen = gen.reshape(-1, *gen.shape[-3:])
        clip = magi_run.procedural_truth(cfg, seed)
        truth = clip[given:given + len(gen)]
        model.append(frame_psnrs(gen, truth))
        repeat = np.repeat(clip[given - 1:given], len(truth), 0)
        base.append(frame_psnrs(repeat, truth))
        shapes = magi_run.procedural_truth(cfg, seed, shapes=True)[given:given + len(gen)]
        pooled.append((gen, repeat, truth, shapes))
        if strips is None:
            strips = (clip[:given], truth, gen)
    model, base = np.stack(model), np.stack(base)
    split = scoring.regions(*(np.concatenate(a) for a in zip(*pooled, strict=True)))
    result = {"config": cfg.name, "policy": cfg.policy.name, "seeds": seeds, "given_frames": given,
              "generated_frames": int(model.shape[1]), "mean_psnr": float(model.mean()),
              "min_psnr": float(model.min()), "baseline_mean_psnr": float(base.mean()),
              "baseline_min_psnr": float(base.min()), "regions": split,
              "per_frame_psnr": model.mean(0).tolist(), "per_frame_baseline_psnr": base.mean(0).tolist(),
              "per_seed": [{"seed": s, "mean_psnr": float(m.mean()), "min_psnr": float(m.min()),
                            "baseline_mean_psnr": float(b.mean())} for s, m, b in zip(seeds, model, base, strict=True)]}
    io.write_json(out / "continuation.json", result)
    plot(model, base, out / "psnr_per_frame.png")
    ctx, truth, gen = strips
    err = np.clip(np.abs(gen - truth) - 1.0, -1.0, 1.0)  # |error| on the same scale: black = none
    rows = [np.concatenate([ctx, truth]), np.concatenate([ctx, gen]), np.concatenate([np.full_like(ctx, -1.0), err])]
    scale = int(cfg.get("output", {}).get("scale", 4))
    u8 = [np.clip((r + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8).repeat(scale, 1).repeat(scale, 2) for r in rows]
    io.write_png(out / "continuation.png", np.concatenate([io.frame_strip(r, per_row=len(r)) for r in u8], 0))
    gap = np.full((*u8[0].shape[:2], 2 * scale, 3), 255, np.uint8)  # true | generated | error, frame by frame
    io.write_mp4(out / "continuation.mp4", np.concatenate([u8[0], gap, u8[1], gap, u8[2]], 2),
                 fps=int(cfg.get("output", {}).get("fps", 8)))
    table = [{"frame": i + 1, "psnr": float(model[:, i].mean()), "min_over_seeds": float(model[:, i].min()),
              "repeat_last": float(base[:, i].mean())} for i in range(model.shape[1])]
    print(common.format_table(table, list(table[0])))
    print(f"mean PSNR {result['mean_psnr']:.2f} dB (min {result['min_psnr']:.2f}) over {len(seeds)} seed(s); repeating "
          f"the last given frame: {result['baseline_mean_psnr']:.2f} dB")
    sh, bg = result["regions"]["shapes"], result["regions"]["background"]
    print(f"shapes ({sh['area']:.0%} of the pixels, {sh['error_share']:.0%} of the model's squared error): "
          f"{sh['psnr']:.2f} dB (repeat-last {sh['baseline_psnr']:.2f}); background {bg['psnr']:.2f} dB "
          f"(repeat-last {bg['baseline_psnr']:.2f})")
    print(f"wrote {out / 'continuation.json'}, {out / 'continuation.png'}, {out / 'continuation.mp4'}, "
          f"{out / 'psnr_per_frame.png'}")


if __name__ == "__main__":
    common.run_app(main, default="tiny_vanilla")
