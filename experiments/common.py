"""The experiments' shared surface, one import for the CLIs: each name lives in the module of its concern.

- ``experiments.cli``: config names, ``--config`` resolution and override checks, one-line errors (``run_app``);
- ``experiments.registry``: model builders by name (``build``), MagCache's calibration;
- ``experiments.run_spec``: the ``Run`` a builder makes; ``experiments.validation``: config checks;
- ``experiments.scoring``: figures against the uncached run; ``experiments.outputs``: videos, strips, tables.
"""

from __future__ import annotations

from experiments.cli import (
    CONFIG_DIR,
    DEFAULT_CONFIG,
    config_names,
    expand_flagfiles,
    fail,
    resolve_config_argv,
    run_app,
)
from experiments.errors import ConfigError
from experiments.outputs import format_table, output_fps, strip_frames, write_video_outputs
from experiments.registry import build, calibrate, magcache_ratios, run_flops
from experiments.run_spec import Run, with_policy
from experiments.scoring import compare, pipeline_times, to_unit
from experiments.validation import validate, validate_policy

__all__ = ["CONFIG_DIR", "DEFAULT_CONFIG", "ConfigError", "Run", "build", "calibrate", "compare", "config_names",
           "expand_flagfiles", "fail", "format_table", "magcache_ratios", "output_fps", "pipeline_times",
           "resolve_config_argv",
           "run_flops", "run_app", "strip_frames", "to_unit", "validate", "validate_policy", "with_policy",
           "write_video_outputs"]
