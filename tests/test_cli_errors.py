"""Bad ``--config.*`` overrides end with one ``error:`` line (exit 2) naming the closest valid fields."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from experiments import cli, common
from experiments.errors import ConfigError
from tests.conftest import ROOT

# A tiny absl app on experiments.cli.run_app: it writes a file only if main runs.
MINI = textwrap.dedent("""
    from pathlib import Path
    from absl import flags
    from ml_collections import config_flags
    from experiments.cli import run_app
    CFG = config_flags.DEFINE_config_file("config", None, "preset")
    OUT = flags.DEFINE_string("out", None, "folder")
    def main(argv):
        Path(OUT.value, "ran.txt").write_text(str(CFG.value.policy.threshold))
    run_app(main, default="synthetic_fast")
""")


def mini(*args: str, out: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-c", MINI, *args, f"--out={out}"], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=120)


def argv(config: str, *overrides: str) -> list[str]:
    return cli.resolve_config_argv(["prog", f"--config={config}", *overrides])


@pytest.mark.parametrize("config,override,field,closest", [
    ("synthetic_fast", "--config.no_such_field=3", "no_such_field", None),
    ("synthetic_fast", "--config.policy.threshhold=0.1", "policy.threshhold", "policy.threshold"),
    ("magi_fast", "--config.sampler.nope=1", "sampler.nope", "sampler."),
    ("magi_fast", "--config.sampler.windw=2", "sampler.windw", "sampler.window"),
    ("synthetic_fast", "--config.policy.name.x=1", "policy.name.x", "policy.name"),
])
def test_unknown_field_names_the_closest(config, override, field, closest):
    with pytest.raises(ConfigError) as e:
        cli.check_overrides(argv(config, override))
    msg = str(e.value)
    assert msg.startswith(f"unknown config field {field!r}; closest: ") and "\n" not in msg
    named = msg.split("closest: ", 1)[1].split(", ")
    assert named and all(n in cli.field_names(cli.load_config(argv(config)[1].split("=", 1)[1])) for n in named)
    if closest:
        assert named[0].startswith(closest)


@pytest.mark.parametrize("override,needle", [
    ("--config.policy.threshold=abc", "'policy.threshold' takes a float, got 'abc'"),
    ("--config.policy.warmup=2.5", "'policy.warmup' takes an int"),
    ("--config.policy=3", "'policy' takes a dict"),
    ("--config.policy.coeffs=(1,2", "'policy.coeffs' takes a tuple"),
    ("--noconfig.policy.threshold", "only works for a bool field"),
])
def test_bad_values_are_one_line(override, needle):
    with pytest.raises(ConfigError) as e:
        cli.check_overrides(argv("synthetic_fast", override))
    assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("overrides", [
    (), ("--config.policy.threshold=0.3",), ("--config.policy.threshold", "-0.5"), ("--config.policy.warmup", "3"),
    ("--config.policy.coeffs=(1.0, 2.0)",), ("--config.schedule.kind=df",), ("--config.policy.name=teacache",),
])
def test_valid_overrides_pass(overrides):
    cli.check_overrides(argv("synthetic_fast", *overrides))


def test_bool_and_placeholder_fields():
    for o in ("--config.kv.compress", "--noconfig.kv.compress", "--config.kv.compress=false", "--config.prompt=a"):
        cli.check_overrides(argv("magi_fast", o))
    with pytest.raises(ConfigError, match="takes a bool"):
        cli.check_overrides(argv("magi_fast", "--config.kv.compress=maybe"))
    cli.check_overrides(argv("magi_fast", "--config.sampler.discard_duplicate=true"))  # a placeholder(bool)
    with pytest.raises(ConfigError, match="takes a bool"):
        cli.check_overrides(argv("magi_fast", "--config.sampler.discard_duplicate=maybe"))


@pytest.mark.parametrize("override,field,closest", [
    ("--config.no_such_field=3", "no_such_field", ""),
    ("--config.policy.threshhold=0.1", "policy.threshhold", "policy.threshold"),
    ("--config.sampler.nope=1", "sampler.nope", ""),
    ("--config.policy.threshold=abc", "policy.threshold", ""),
])
def test_run_app_exits_with_one_line(tmp_path, override, field, closest):
    p = mini(override, out=tmp_path)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr and "FATAL" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and repr(field) in lines[0]
    assert f"closest: {closest}" in lines[0] if closest else True
    assert not any(tmp_path.iterdir())  # nothing written


def test_run_app_runs_a_good_override(tmp_path):
    p = mini("--config.policy.threshold=0.3", out=tmp_path)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "ran.txt").read_text() == "0.3"


@pytest.mark.skipif(common.run_app is not cli.run_app, reason="experiments.common does not use cli.run_app yet")
def test_run_py_unknown_field(tmp_path):
    from tests.test_cli import cli as run_cli

    p = run_cli("run.py", "--config=synthetic_fast", "--config.policy.threshhold=0.1", f"--output_dir={tmp_path}")
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines() == [p.stderr.strip()]
    assert "unknown config field 'policy.threshhold'; closest: policy.threshold" in p.stderr
    assert not any(tmp_path.iterdir())
