"""Command-line plumbing of the experiment CLIs: short config names, override checks, one-line errors.

ml_collections' config_flags reports an unknown override (``--config.policy.threshhold=0.1``) as a traceback
from deep inside absl's flag parsing, and a badly typed one as a two-line FATAL with exit code 1. ``run_app``
checks every ``--config.*`` override against the chosen config first, so a user sees one ``error:`` line
(exit code 2) that names the closest valid fields, before anything runs or is written.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import ml_collections

from experiments.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEFAULT_CONFIG = "tiny_fast"  # the embedded default: the tiny MAGI-1 trained here, shipped in the repo
_OVERRIDE = re.compile(r"^--?(no)?config\.([^=]+)(?:=(.*))?$", re.DOTALL)


def config_names() -> list[str]:
    names = (p.stem for p in CONFIG_DIR.glob("*.py"))
    return sorted(n for n in names if not n.startswith("_") and not n.endswith("_base"))


def expand_flagfiles(argv: list[str]) -> list[str]:
    """Inline ``--flagfile=F`` (one flag per line, ``#`` comments), as absl would, but before the config name is
    resolved and the overrides are checked: a file written by ``calibrate.py`` may hold ``--config=NAME`` and any
    ``--config.*`` override, and a bad one in it gets the same one-line error as on the command line."""
    out = []
    for a in argv:
        if not a.startswith("--flagfile="):
            out.append(a)
            continue
        path = Path(a.split("=", 1)[1])
        if not path.is_file():
            fail(f"--flagfile {path} does not exist (write it with experiments/calibrate.py --output_flags=...)")
        lines = [ln.strip() for ln in path.read_text().splitlines()]
        out += expand_flagfiles([ln for ln in lines if ln and not ln.startswith("#")])
    return out


def resolve_config_argv(argv: list[str], default: str = DEFAULT_CONFIG) -> list[str]:
    """Turn ``--config=NAME`` (or no --config) into the preset's file path for ml_collections; ``--flagfile=F``
    is inlined first."""
    argv = expand_flagfiles(argv)
    out, seen = [], False
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            seen = True
            name = a.split("=", 1)[1]
            if not name.endswith(".py"):
                if name not in config_names():
                    fail(f"unknown config {name!r}; available: {', '.join(config_names())}")
                name = str(CONFIG_DIR / f"{name}.py")
            elif not Path(name).is_file():
                fail(f"config file {name} does not exist")
            a = f"--config={name}"
        elif a == "--config" and i + 1 < len(argv):
            fail("write --config=NAME (with '=')")
        out.append(a)
    if not seen:
        out.insert(1, f"--config={CONFIG_DIR / f'{default}.py'}")
    return out


def fail(msg: str, code: int = 2) -> NoReturn:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(code)


def load_config(spec: str) -> ml_collections.ConfigDict:
    """``path.py`` or ``path.py:arg`` -> ``get_config(*args)``, as config_flags loads a config file."""
    path, *args = spec.split(":", 1)
    mod_spec = importlib.util.spec_from_file_location("_cli_checked_config", path)
    if mod_spec is None or mod_spec.loader is None:
        raise ImportError(f"config file {path} cannot be imported")
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module.get_config(*args)


def field_names(cfg: Any, prefix: str = "") -> list[str]:
    """Every dotted field of a config, sections included (``policy``, ``policy.threshold``, ...)."""
    out = []
    for k, v in cfg.items():
        name = f"{prefix}{k}"
        out.append(name)
        if isinstance(v, ml_collections.ConfigDict):
            out += field_names(v, f"{name}.")
    return out


def closest_fields(name: str, fields: list[str], n: int = 3) -> list[str]:
    """The valid fields nearest to a misspelt one; always some, so the error can point somewhere."""
    return difflib.get_close_matches(name, fields, n, cutoff=0.6) or difflib.get_close_matches(name, fields, n, 0.0)


def _overrides(argv: list[str]) -> list[tuple[str, str | None, bool, str | None]]:
    """(field path, value after '=' or None, negated ``--noconfig.x``, the next argument) of each override."""
    out = []
    for i, a in enumerate(argv):
        if m := _OVERRIDE.match(a):
            out.append((m.group(2), m.group(3), bool(m.group(1)), argv[i + 1] if i + 1 < len(argv) else None))
    return out


def _check_value(field: str, kind: Any, value: str | None, negated: bool, following: str | None) -> None:
    """Parse ``value`` as config_flags would for a field of type ``kind``; raise ConfigError where it fails."""
    import dataclasses
    import enum

    from absl import flags
    from ml_collections.config_flags import tuple_parser

    is_dict = isinstance(kind, type) and issubclass(kind, ml_collections.ConfigDict)
    parsers: dict[Any, Callable[[str], Any]] = {
        float: flags.FloatParser().parse, int: flags.IntegerParser().parse, bool: flags.BooleanParser().parse,
        tuple: tuple_parser.TupleParser().parse, str: str}
    if not (kind in parsers or is_dict or dataclasses.is_dataclass(kind)
            or (isinstance(kind, type) and issubclass(kind, enum.Enum))):
        what = "None" if kind is type(None) else f"a {getattr(kind, '__name__', kind)}"
        raise ConfigError(f"config field {field!r} is {what} in this config and cannot be set from the command line")
    if kind is bool and value is None:
        return  # --config.x / --noconfig.x
    if negated:
        raise ConfigError(f"--noconfig.{field} only works for a bool field; write --config.{field}=VALUE")
    if value is None:
        value = following  # absl's "--flag VALUE" form
    if value is None:
        raise ConfigError(f"--config.{field} needs a value: write --config.{field}=VALUE")
    try:
        if kind in parsers:
            parsers[kind](value)
        elif is_dict and not isinstance(ast.literal_eval(value), dict):
            raise ValueError("not a dict")
    except (ValueError, SyntaxError, TypeError):
        name = "dict" if is_dict else getattr(kind, "__name__", str(kind))
        article = "an" if name[:1] in "aeiou" else "a"
        raise ConfigError(f"config field {field!r} takes {article} {name}, got {value!r}") from None


def check_overrides(argv: list[str]) -> None:
    """Raise ConfigError (one line) for a ``--config.*`` override that names no field of the chosen config
    or whose value config_flags cannot parse. ``argv`` must hold ``--config=FILE`` (resolve_config_argv)."""
    from ml_collections.config_flags import config_path

    spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    overrides = _overrides(argv)
    if spec is None or not overrides:
        return
    try:
        cfg = load_config(spec)
    except Exception:  # noqa: BLE001 (a broken config file: config_flags reports it as it always has)
        return
    fields = field_names(cfg)
    for field, value, negated, following in overrides:
        try:
            kind = config_path.get_type(field, cfg)
        except (AttributeError, KeyError, IndexError, TypeError, ValueError):
            raise ConfigError(f"unknown config field {field!r}; closest: "
                              f"{', '.join(closest_fields(field, fields))}") from None
        _check_value(field, kind, value, negated, following)


def run_app(main: Callable[[list[str]], Any], default: str | None = DEFAULT_CONFIG) -> None:
    """absl ``app.run`` with short config names (``default=None``: no --config) and one-line errors."""
    from absl import app, logging

    logging.set_verbosity(logging.WARNING)
    if default is not None:
        sys.argv = resolve_config_argv(sys.argv, default)
        try:
            check_overrides(sys.argv)
        except ConfigError as e:
            fail(str(e))

    def wrapped(argv: list[str]) -> Any:
        try:
            return main(argv)
        except ConfigError as e:
            fail(str(e))

    app.run(wrapped)
