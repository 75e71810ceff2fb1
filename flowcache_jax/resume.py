"""Resumable runs: a ``sampler.ResumePoint`` on disk (orbax, through ``flowcache_jax.checkpoint``), atomically.

The point is written into a temporary folder beside its destination and renamed, so a run killed at any moment
leaves either the previous point or the new one, never half of one. The state is stored as its flat list of
leaves and rebuilt with the tree structure of a fresh state of the same sampler (the resuming process builds one
anyway); a fingerprint of what the run was (its config, its schedule's shape) guards against continuing a point
with another run.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import jax
import numpy as np

from flowcache_jax import checkpoint
from flowcache_jax.sampler import ResumePoint


def fingerprint(config: dict, table: Any) -> str:
    """What a resume point belongs to: the run's config and its schedule's stages, steps and window."""
    text = json.dumps({"config": config, "table": [table.num_stages, table.steps_per_stage, table.window,
                                                   table.n_chunks]}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def save(folder: str | Path, point: ResumePoint, print_: str) -> Path:
    """Write ``point`` to ``folder`` (replacing an older point there) atomically."""
    leaves = jax.tree.leaves(point.state)
    tree = {"state": {f"{i:05d}": np.asarray(a) for i, a in enumerate(leaves)}, "video": np.asarray(point.video)}
    if point.recs:
        tree["recs"] = {k: np.stack([np.asarray(r[k]) for r in point.recs]) for k in point.recs[0]}
    meta = {"kind": "resume point", "stage": point.stage, "t_denoise": point.t_denoise, "fingerprint": print_,
            "leaves": len(leaves)}
    return checkpoint.save(folder, tree, meta, overwrite=True)


def load(folder: str | Path, template: Any, print_: str) -> ResumePoint | None:
    """The point in ``folder`` (None if there is none), its state in the structure of ``template`` (a fresh state of
    the same sampler). A point of another run raises ValueError."""
    folder = Path(folder)
    try:
        meta = checkpoint.load_meta(folder)
    except checkpoint.CheckpointNotFound:
        return None
    if meta.get("kind") != "resume point":
        raise ValueError(f"{folder} is not a resume point")
    if meta.get("fingerprint") != print_:
        raise ValueError(f"the resume point in {folder} was made by another run (config or length differ): delete "
                         "it or choose another output folder")
    tree, _ = checkpoint.load(folder)
    treedef = jax.tree.structure(template)
    leaves = [tree["state"][f"{i:05d}"] for i in range(meta["leaves"])]
    if treedef.num_leaves != len(leaves):
        raise ValueError(f"the resume point in {folder} holds {len(leaves)} state arrays, this sampler has "
                         f"{treedef.num_leaves}")
    state = jax.tree.unflatten(treedef, leaves)
    recs = []
    if "recs" in tree:
        n = next(iter(tree["recs"].values())).shape[0]
        recs = [{k: v[i] for k, v in tree["recs"].items()} for i in range(n)]
    return ResumePoint(int(meta["stage"]), state, np.asarray(tree["video"]), recs, float(meta["t_denoise"]))
