"""Model builders by name: ``config.model`` -> the function that makes its ``Run`` (one table, no ``if`` per CLI).

Builders are imported when first used (a synthetic run never imports the MAGI-1 code) and import nothing from
here at module level, so there is no cycle. MagCache's calibration (an uncached run that measures the velocity
ratios) is the one step every model shares before its build; the device mesh (``mesh_layout``) the one setting.
"""

from __future__ import annotations

import importlib
from typing import Any

import ml_collections

from experiments.errors import ConfigError
from experiments.run_spec import Run, with_policy

BUILDERS = {  # config.model -> "module:function"
    "synthetic": "experiments.synthetic_run:build_synthetic",
    "magi1": "experiments.magi_run:build_magi1",
    "skyreels_v2": "experiments.skyreels_run:build_skyreels",
    "self_forcing": "experiments.self_forcing_run:build_self_forcing",
}


def builder(model: str):
    if model not in BUILDERS:
        raise ConfigError(f"unknown model {model!r}; set config.model to one of {', '.join(BUILDERS)}")
    module, name = BUILDERS[model].split(":")
    return getattr(importlib.import_module(module), name)


def run_flops(run: Run, res: Any) -> dict:
    """The model's FLOPs record of a result (each builder module has its ``run_flops(run, res)``)."""
    module = BUILDERS[run.cfg.model].split(":")[0]
    return importlib.import_module(module).run_flops(run, res)


MESH_MODELS = ("magi1", "skyreels_v2")  # the models whose builders read config.mesh


def mesh_layout(cfg: ml_collections.ConfigDict) -> Any:
    """The ``flowcache_jax.sharding.Layout`` of ``config.mesh`` (data x fsdp x seq over every device of every
    process), or None for the one-device default (all sizes 1). A bad mesh is one ``ConfigError`` line."""
    import jax

    from flowcache_jax.sharding import Layout, MeshConfig, make_mesh

    block = cfg.get("mesh", None)
    try:
        mc = MeshConfig.from_config(block)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.mesh must hold integer sizes data, fsdp, seq: {e}") from e
    if block is not None and set(block.keys()) - {"data", "fsdp", "seq"}:
        raise ConfigError(f"config.mesh has unknown axes {sorted(set(block.keys()) - {'data', 'fsdp', 'seq'})}; "
                          "use data, fsdp and seq")
    if min(mc.shape) < 1:
        raise ConfigError(f"config.mesh sizes must be >= 1, got {mc}")
    if mc.size == 1:
        return None
    if cfg.model not in MESH_MODELS:
        raise ConfigError(f"config.model={cfg.model!r} runs on one device: leave config.mesh at 1 x 1 x 1")
    n = jax.device_count()
    if mc.size != n:
        raise ConfigError(f"config.mesh {mc} = {mc.size} devices, but {n} are available: make the product of "
                          f"--config.mesh.data, --config.mesh.fsdp and --config.mesh.seq equal {n}")
    return Layout(make_mesh(mc))


def build(cfg: ml_collections.ConfigDict, n_chunks: int | None = None) -> Run:
    """Validate, then make the denoiser, params, schedule table and sampler of a config."""
    mesh_layout(cfg)  # a bad mesh fails before any calibration run
    cfg = calibrate(cfg)
    return builder(cfg.model)(cfg, n_chunks)


def magcache_ratios(res: Any, table: Any) -> tuple[float, ...]:
    """MagCache's calibration from an uncached run: mean ||v_k|| / ||v_{k-1}|| per local step."""
    import numpy as np

    from flowcache_jax.policies.magcache import calibrate_ratios

    k = table.k.reshape(-1, table.window)[table.step_valid.reshape(-1)]
    n_steps = len(table.grid) - 1
    norms = np.full((table.n_chunks, n_steps), np.nan)
    ok = res.chunk >= 0
    norms[res.chunk[ok], k[ok]] = res.velocity_l1[ok]
    return tuple(float(r) for r in calibrate_ratios(norms))


def calibrate(cfg: ml_collections.ConfigDict, seed_offset: int = 1, make: Any = None) -> ml_collections.ConfigDict:
    """A MagCache config without ratios gets them from an uncached run at ``seed + seed_offset`` (``make``: how to
    get that run, e.g. from a pool that shares it with the caller's other runs)."""
    if cfg.policy.name != "magcache" or tuple(cfg.policy.get("ratios", ())):
        return cfg
    van = with_policy(cfg, "vanilla")
    van.seed = cfg.seed + seed_offset
    run = (make or build)(van)  # (a DF model rejects MagCache in its own validation)
    res, _ = run.sample(progress=False, seed=van.seed, decode=False)
    out = ml_collections.ConfigDict(cfg.to_dict())
    out.policy.ratios = magcache_ratios(res, run.table)
    return out
