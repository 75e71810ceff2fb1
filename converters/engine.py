"""Apply a declarative key map to a checkpoint, validating both ways with one error listing every problem."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from converters.safetensors_io import CheckpointError


@dataclasses.dataclass(frozen=True)
class Rule:
    """Upstream key (``{i}`` = layer index) -> destination path(s) in the parameter tree, via a transform."""

    src: str
    dst: tuple[str, ...]
    transform: str = "copy"
    per_layer: bool = False


Transform = Callable[[np.ndarray, Any], tuple[np.ndarray, ...]]


def _set(tree: dict, path: str, value: Any) -> None:
    *parents, leaf = path.split("/")
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[leaf] = value


def _get(tree: Mapping, path: str) -> Any:
    for p in path.split("/"):
        tree = tree[p]
    return tree


DtypeRule = Callable[[str], Any]


def convert(reader: Any, rules: tuple[Rule, ...], transforms: Mapping[str, Transform], cfg: Any,
            expected: Mapping, num_layers: int, dtype: np.dtype | DtypeRule | None = None,
            sink: Callable[[str, np.ndarray], None] | None = None) -> dict:
    """Build the nested parameter dict; ``expected`` holds the target shapes (per-layer ones lead with L).

    Streams tensor by tensor: each source tensor is read, transformed and cast to its target dtype (``dtype``:
    one dtype, or a function of the destination path; None keeps the source dtype) before the next is read, and
    per-layer tensors are written into one preallocated stacked array. With ``sink(path, array)`` every finished
    parameter is handed over (e.g. to ``checkpoint.LeafWriter``) instead of kept, so the host holds a few tensors,
    never the model (``experiments/convert_memory.py``); problems are still all collected, then raised.
    """
    problems: list[str] = []
    out: dict = {}
    used: set[str] = set()
    available = set(reader.keys())
    rule_fn = callable(dtype) and not isinstance(dtype, type | np.dtype)  # np.float32 is callable too
    cast = dtype if rule_fn else (lambda path: dtype)
    for rule in rules:
        layers = range(num_layers) if rule.per_layer else [None]
        absent = [i for i in layers if rule.src.format(i=i) not in available]
        if absent:
            which = "" if absent == [None] else f" for layers {_ranges(absent)}"
            problems.append(f"missing key {rule.src}{which}")
        stacked: list[np.ndarray | None] = [None] * len(rule.dst)
        filled = [0] * len(rule.dst)
        for n, i in enumerate(layers):
            key = rule.src.format(i=i)
            if key not in available:
                continue
            used.add(key)
            early = cast(rule.dst[0])  # cast while reading: every transform only moves elements
            arr = reader.read(key, early) if early is not None and hasattr(reader, "read") else np.asarray(reader[key])
            if arr.dtype.kind not in "fV" and str(arr.dtype) != "bfloat16":
                problems.append(f"{key}: dtype {arr.dtype} is not a float type")
                continue
            try:
                results = transforms[rule.transform](arr, cfg)
            except (ValueError, IndexError) as e:
                problems.append(f"{key}: shape {arr.shape} does not fit ({e})")
                continue
            for j, (path, res) in enumerate(zip(rule.dst, results, strict=True)):
                want = tuple(_get(expected, path))[1 if rule.per_layer else 0:]
                if res.shape != want:
                    problems.append(f"{key}: shape {arr.shape} converts to {res.shape}, expected {want} at {path}")
                    continue
                target = cast(path) or res.dtype
                if not rule.per_layer:
                    stacked[j] = np.ascontiguousarray(res, dtype=target)
                else:
                    if stacked[j] is None:
                        stacked[j] = np.empty((len(layers), *want), dtype=target)
                    stacked[j][n] = res
                filled[j] += 1
            del arr, results
        if problems or any(f != len(layers) for f in filled):
            continue
        for path, value in zip(rule.dst, stacked, strict=True):
            if sink is not None:
                sink(path, value)
            else:
                _set(out, path, value)
        del stacked
    extra = sorted(available - used)
    problems += [f"unexpected key {k}" for k in extra]
    if problems:
        shown = problems[:40] + ([f"... and {len(problems) - 40} more"] if len(problems) > 40 else [])
        partial = any("for layers" in p and "for layers 0-" not in p for p in problems)
        hint = ("\n(shapes or layer counts differ from the model config: pass the config the weights belong to "
                "with --model_config)" if partial or any(", expected " in p for p in problems) else "")
        err = CheckpointError(f"{len(problems)} problem(s) converting the checkpoint:\n  " + "\n  ".join(shown)
                              + hint)
        err.problems = problems
        raise err
    return out


def _ranges(idx: list[int]) -> str:
    """[2, 3, 4, 7] -> '2-4, 7'."""
    out, start = [], idx[0]
    for a, b in zip(idx, idx[1:] + [None], strict=True):
        if b != a + 1:
            out.append(f"{start}-{a}" if a != start else str(a))
            start = b
    return ", ".join(out)
