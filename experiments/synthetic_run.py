"""Build a synthetic-flow run (Theorem 1's Gaussian-mixture flows with closed-form velocity) from a config."""

from __future__ import annotations

import ml_collections

from experiments.errors import ConfigError
from experiments.run_spec import Run
from experiments.validation import validate


def build_synthetic(cfg: ml_collections.ConfigDict, n_chunks: int | None = None) -> Run:
    from flowcache_jax.policies import make_policy
    from flowcache_jax.sampler import Sampler
    from flowcache_jax.schedules import df_schedule, flow_time_grid, magi_schedule
    from flowcache_jax.synthetic import SyntheticFlow

    validate(cfg)
    s = cfg.schedule
    n = s.n_chunks if n_chunks is None else n_chunks
    try:
        denoiser = SyntheticFlow(**cfg.synthetic.to_dict())
        grid = flow_time_grid(s.steps_per_chunk, s.power, s.shift)
        table = (magi_schedule(n, s.window, s.steps_per_chunk, grid) if s.kind == "magi"
                 else df_schedule(n, s.steps_per_chunk, s.ar_step, grid))
        policy = make_policy(cfg.policy)
        sampler = Sampler(denoiser, policy, table.window, cfg.batch, cfg.policy.reuse, cfg.policy.metric_dtype)
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e)) from e
    return Run(cfg=cfg, denoiser=denoiser, params=denoiser.init_params(), cond=None, table=table, sampler=sampler)


def run_flops(run: Run, res) -> dict:
    """Compiled FLOPs of one chunk forward (XLA's cost analysis) times the forwards run, beside the uncached run's."""
    from flowcache_jax import flops

    per_fwd = flops.chunk_forward_flops(run.denoiser, run.params, run.cond, run.cfg.batch, run.table.window)
    return flops.flops_report(per_fwd, res.computed, res.chunk_forwards_vanilla,
                              run.denoiser.forward_flops(run.cfg.batch))
