"""Theorem 1 study, the figures: Fig-2-style sweeps, the AR metric trajectory, error vs threshold (Agg backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from experiments.theorem1_stats import AR


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def fig2(regimes: list[dict[str, Any]], factor: str, path: Path) -> None:
    """Fig-2 style: per value, L1_rel (and its conditional twin), the rate forms, and FlowCache's metric."""
    from flowcache_jax.io import save_figure

    plt = _plt()
    rows = [r for r in regimes if r["factor"] == factor]
    fig, ax = plt.subplots(1, 3, figsize=(14, 3.8))
    for i, r in enumerate(rows):
        c, x, q = f"C{i}", r["progress"], r["quantities"]
        lab = f"{factor}={r['value']:g}"
        ax[0].plot(x, q["l1_rel"]["values"], color=c, label=f"{lab} [{q['l1_rel']['verdict']}]")
        ax[0].plot(x, q["l1_conditional"]["values"], color=c, ls="--")
        ax[1].plot(x, q["l1_rate"]["values"], color=c, label=f"{lab} [{q['l1_rate']['verdict']}]")
        ax[1].plot(x, q["l1_conditional_rate"]["values"], color=c, ls="--")
        ax[2].plot(x, q["metric"]["values"], color=c, label=f"{lab} [{q['metric']['verdict']}]")
    titles = ("L1_rel = |v dt|/|x|  (dashed: conditional x1-eps)", "rate |v|/|x|  (dashed: conditional)",
              "FlowCache metric (feature rel-L1)")
    for a, title in zip(ax, titles, strict=True):
        a.set_yscale("log")
        a.set_xlabel("denoising progress k/N (0 = noise)")
        a.set_title(title, fontsize=9)
        a.legend(fontsize=7)
        a.grid(alpha=0.3)
    fig.suptitle(f"Theorem 1 on exact flows, chunk 1, sweep over {factor}", fontsize=10)
    save_figure(fig, path)
    plt.close(fig)


def fig_metric_ar(traj: dict[str, dict[str, list]], path: Path) -> None:
    from flowcache_jax.io import save_figure

    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for c, d in traj.items():
        ax.plot(d["global_step"], d["rel"], label=f"chunk {c}")
    ax.set_yscale("log")
    ax.set_xlabel("global step")
    ax.set_ylabel("FlowCache metric (rel-L1 of features)")
    ax.set_title(f"exact AR run (window {AR['window']}, {AR['n_chunks']} chunks)", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save_figure(fig, path)
    plt.close(fig)


def fig_errors(errors: list[dict[str, Any]], path: Path) -> None:
    from flowcache_jax.io import save_figure

    plt = _plt()
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.8))
    for i, policy in enumerate(sorted({e["policy"] for e in errors})):
        rows = sorted((e for e in errors if e["policy"] == policy), key=lambda e: e["threshold"])
        x = np.array([e["speedup_ideal"] for e in rows])
        err = np.array([e["rel_l2"] for e in rows])
        ps = np.array([e["psnr"] for e in rows], np.float64)
        ax[0].plot(x, err, "o-", color=f"C{i}", label=policy)
        fin = np.isfinite(ps)
        ax[1].plot(x[fin], ps[fin], "o-", color=f"C{i}", label=policy)
        for e in rows:
            ax[0].annotate(f"{e['threshold']:g}", (e["speedup_ideal"], e["rel_l2"]), fontsize=6)
    ax[0].set_yscale("symlog", linthresh=1e-6)
    ax[0].set_ylabel("relative L2 error vs exact run")
    ax[1].set_ylabel("PSNR vs exact run (dB; threshold 0 is inf, omitted)")
    for a in ax:
        a.set_xlabel("ideal speedup (1 / computed fraction)")
        a.legend(fontsize=8)
        a.grid(alpha=0.3)
    save_figure(fig, path)
    plt.close(fig)
