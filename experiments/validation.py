"""Config checks that end in one line saying what to change (``ConfigError``), shared by the builders."""

from __future__ import annotations

import ml_collections

from experiments.errors import ConfigError


def validate_policy(cfg: ml_collections.ConfigDict, steps_per_chunk: int | None) -> None:
    """Reject bad policy values with a message that says what to change (``steps_per_chunk`` None: a warm-up longer
    than the steps is allowed, e.g. SkyReels' ret-steps)."""
    from flowcache_jax.policies import METRICS, POLICIES
    from flowcache_jax.sampler import METRIC_DTYPES, REUSE_MODES

    p = cfg.policy
    if p.name not in POLICIES:
        raise ConfigError(f"unknown policy {p.name!r}; set --config.policy.name to one of {', '.join(POLICIES)}")
    if p.threshold < 0:
        raise ConfigError(f"policy.threshold must be >= 0, got {p.threshold}")
    if p.warmup < 0 or (steps_per_chunk is not None and p.warmup > steps_per_chunk):
        raise ConfigError(f"policy.warmup={p.warmup} must be in [0, steps per chunk={steps_per_chunk}]")
    if p.reuse not in REUSE_MODES:
        raise ConfigError(f"policy.reuse must be one of {REUSE_MODES}, got {p.reuse!r}")
    if p.name == "magcache":
        ratios = tuple(p.get("ratios", ()))
        if ratios and len(ratios) != steps_per_chunk:
            raise ConfigError(f"policy.ratios has {len(ratios)} entries; MagCache needs one per step "
                              f"({steps_per_chunk}) or none (then an uncached calibration run computes them)")
        if p.get("max_skips", 4) < 1:
            raise ConfigError(f"policy.max_skips must be >= 1, got {p.max_skips}")
    if p.get("metric", "input") not in METRICS:
        raise ConfigError(f"policy.metric must be one of {METRICS}, got {p.metric!r}")
    if p.get("semantics", "intended") not in ("intended", "reference"):
        raise ConfigError(f"policy.semantics must be 'intended' or 'reference', got {p.semantics!r}")
    if p.get("counter", "intended") not in ("intended", "reference"):
        raise ConfigError(f"policy.counter must be 'intended' or 'reference', got {p.counter!r}")
    if p.metric_dtype not in METRIC_DTYPES:
        raise ConfigError(f"policy.metric_dtype must be one of {tuple(METRIC_DTYPES)}, got {p.metric_dtype!r}")
    if cfg.batch < 1:
        raise ConfigError(f"batch must be >= 1, got {cfg.batch}")


def validate(cfg: ml_collections.ConfigDict) -> None:
    """Validate a synthetic config."""
    s = cfg.schedule
    validate_policy(cfg, s.steps_per_chunk)
    if s.kind not in ("magi", "df"):
        raise ConfigError(f"schedule.kind must be 'magi' or 'df', got {s.kind!r}")
    if s.n_chunks < 1 or s.window < 1 or s.steps_per_chunk < 1:
        raise ConfigError("schedule.n_chunks, schedule.window and schedule.steps_per_chunk must be >= 1")
    if s.kind == "magi" and s.steps_per_chunk % s.window:
        raise ConfigError(f"schedule.steps_per_chunk={s.steps_per_chunk} must be a multiple of "
                          f"schedule.window={s.window}")
    if s.kind == "df" and s.ar_step < 0:
        raise ConfigError(f"schedule.ar_step must be >= 0, got {s.ar_step}")
    if s.power <= 0 or s.shift <= 0:
        raise ConfigError(f"schedule.power and schedule.shift must be > 0, got {s.power}, {s.shift}")
