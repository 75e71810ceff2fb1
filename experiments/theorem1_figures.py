"""Theorem 1 study, the figures: Fig-2-style sweeps, the AR metric trajectories, error and speed vs threshold (Agg)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from experiments.theorem1_thresholds import AR


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


def fig_metric_ar(traj: dict[str, dict[str, dict[str, list]]], path: Path) -> None:
    """FlowCache's metric along each exact AR run, one panel per regime of the threshold study."""
    from flowcache_jax.io import save_figure

    plt = _plt()
    fig, axes = plt.subplots(1, len(traj), figsize=(7 * len(traj), 3.8), squeeze=False)
    for ax, (regime, chunks) in zip(axes[0], traj.items(), strict=True):
        for c, d in chunks.items():
            ax.plot(d["global_step"], d["rel"], label=f"chunk {c}")
        ax.set_yscale("log")
        ax.set_xlabel("global step")
        ax.set_ylabel("FlowCache metric (rel-L1 of features)")
        ax.set_title(f"exact AR run, {regime} (window {AR['window']}, {AR['n_chunks']} chunks)", fontsize=9)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    save_figure(fig, path)
    plt.close(fig)


def fig_errors(errors: list[dict[str, Any]], path: Path) -> None:
    """Per regime (rows): final error vs threshold, ideal speedup vs threshold (the guard's cost at matched threshold)
    and error vs speedup (its cost at matched error), one line per policy."""
    from flowcache_jax.io import save_figure

    plt = _plt()
    regimes = list(dict.fromkeys(e.get("regime", "base") for e in errors))
    policies = list(dict.fromkeys(e["policy"] for e in errors))
    fig, axes = plt.subplots(len(regimes), 3, figsize=(15, 3.8 * len(regimes)), squeeze=False)
    for ax, regime in zip(axes, regimes, strict=True):
        for i, policy in enumerate(policies):
            rows = sorted((e for e in errors if e.get("regime", "base") == regime and e["policy"] == policy),
                          key=lambda e: e["threshold"])
            if not rows:
                continue
            th = np.array([e["threshold"] for e in rows])
            sp = np.array([e["speedup_ideal"] for e in rows])
            err = np.array([e["rel_l2"] for e in rows])
            m = rows[-1].get("min_charge", 0.0)
            lab = f"{policy} (min_charge {m:.2g})" if m else policy
            ax[0].plot(th, err, "o-", color=f"C{i}", label=lab)
            ax[1].plot(th, sp, "o-", color=f"C{i}", label=lab)
            ax[2].plot(sp, err, "o-", color=f"C{i}", label=lab)
            for e in rows:
                ax[2].annotate(f"{e['threshold']:g}", (e["speedup_ideal"], e["rel_l2"]), fontsize=6)
        ax[0].set_xlabel("threshold")
        ax[0].set_ylabel("rel L2 error vs exact run")
        ax[0].set_title(f"{regime}: final error vs threshold", fontsize=9)
        ax[1].set_xlabel("threshold")
        ax[1].set_ylabel("ideal speedup (1 / computed fraction)")
        ax[1].set_title(f"{regime}: speed vs threshold", fontsize=9)
        ax[2].set_xlabel("ideal speedup")
        ax[2].set_ylabel("rel L2 error vs exact run")
        ax[2].set_title(f"{regime}: error vs speedup (threshold annotated)", fontsize=9)
        for a in (ax[0], ax[2]):
            a.set_yscale("symlog", linthresh=1e-3)
        for a in ax:
            a.legend(fontsize=7)
            a.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
