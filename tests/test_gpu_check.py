"""gpu_check.py at --size=small on the CPU: every row measured (the PyTorch ones only where torch and diffusers
import, else said absent), the table and the JSON agree. The script is known to work before it meets a GPU."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap

from tests.conftest import ROOT
from tests.test_cli import cli

ROWS = ["magi1_forward", "skyreels_forward", "skyreels_forward_pytorch", "flowcache_vs_vanilla",
        "skyreels_full_forward", "skyreels_full_forward_pytorch", "peak_device_memory"]


def test_small_check_measures_every_row(tmp_path):
    out = tmp_path / "gpu_check.json"
    p = cli("gpu_check.py", "--size=small", "--repeats=1", f"--output_json={out}")
    assert p.returncode == 0, p.stderr
    r = json.loads(out.read_text())
    rows = {row["row"]: row for row in r["rows"]}
    assert list(rows) == ROWS
    assert r["size"] == "small" and r["attention"] == "fused" and r["platform"] == "cpu" and r["total_s"] > 0
    assert r["peak_tflops_bf16"] is None  # CPU: no MFU
    for name in ("magi1_forward", "skyreels_forward", "skyreels_full_forward"):
        row = rows[name]
        assert row["status"] == "ok", row
        assert row["seconds"] > 0 and row["tflop"] > 0 and row["tflop_s"] > 0 and row["compile_s"] > 0
        assert row["flops_source"].startswith("analytic") and row["finite"] and row["xla_gb"] > 0
        assert row["mfu_note"] == "n/a (cpu)" and "mfu" not in row
        assert abs(row["tflop_s"] - row["tflop"] / row["seconds"]) < 1e-9
    for name in ("magi1_forward", "skyreels_forward"):  # XLA's compiled count agrees with the analytic one
        assert 0.5 < rows[name]["xla_tflop"] / rows[name]["tflop"] < 2.0
        assert rows[name]["goal"] == "MFU >= 40%: n/a (cpu)" and rows[name]["goal_met"] is None
    fc = rows["flowcache_vs_vanilla"]
    assert fc["status"] == "ok", fc
    assert fc["seconds"] > 0 and fc["vanilla_s"] > 0 and fc["tflop"] < fc["vanilla_tflop"]
    assert 0 < fc["computed_fraction"] < 1 and fc["speedup_ideal"] > 1 and fc["stages"] == 5
    assert abs(fc["ratio"] - fc["speedup_wall"] / fc["speedup_ideal"]) < 1e-9
    assert abs(fc["speedup_wall"] - fc["vanilla_s"] / fc["seconds"]) < 1e-9
    assert fc["goal"].startswith("wall ") and isinstance(fc["goal_met"], bool)
    have_torch = importlib.util.find_spec("torch") is not None
    have_diffusers = importlib.util.find_spec("diffusers") is not None
    for name in ("skyreels_forward_pytorch", "skyreels_full_forward_pytorch"):
        row = rows[name]
        if have_torch and have_diffusers:
            assert row["status"] == "ok", row
            assert row["seconds"] > 0 and row["jax_s"] > 0 and row["tflop"] > 0
            assert abs(row["ratio"] - row["seconds"] / row["jax_s"]) < 1e-9
            assert row["max_rel_diff"] < 0.05  # the same weights, so the same function (bf16 on both sides)
            assert row["goal"].startswith("JAX ") and isinstance(row["goal_met"], bool)
        else:  # never a made-up number
            want = "absent: pip install diffusers" if have_torch else "absent: pip install torch diffusers"
            assert row["status"] == want and "seconds" not in row and "goal" not in row
    mem = rows["peak_device_memory"]
    assert mem["peak_gb"] > 0 and "XLA's largest program estimate" in mem["what"]
    lines = p.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("row "))  # after the per-row progress lines
    head, sep, *body = lines[start:start + len(ROWS) + 2]
    assert all(f"] {name}: " in p.stdout for name in ROWS[:-1])
    assert head.split()[:3] == ["row", "status", "seconds"] and set(sep) <= {"-", " "}
    assert [line.split()[0] for line in body] == ROWS


def test_mfu_and_goals_on_a_named_chip():
    """The peak table and the goal lines, with a stand-in H200 (no GPU here)."""
    code = textwrap.dedent("""
        import types
        from experiments import gpu_check as g
        dev = lambda kind: types.SimpleNamespace(platform="gpu", device_kind=kind)
        assert g.peak_tflops(dev("NVIDIA H200")) == 989.4 and g.peak_tflops(dev("NVIDIA H100 80GB HBM3")) == 989.4
        assert g.peak_tflops(dev("NVIDIA H100 PCIe")) == 756.0 and g.peak_tflops(dev("Some GPU")) is None
        assert g.peak_tflops(types.SimpleNamespace(platform="cpu", device_kind="cpu")) is None
        row = g.finish_row({"row": "magi1_forward", "status": "ok", "seconds": 1.0, "tflop": 450.0}, 989.4, "gpu")
        assert row["goal"] == "MFU 45% >= 40%: met" and row["goal_met"] is True
        row = g.finish_row({"row": "skyreels_forward", "status": "ok", "seconds": 2.0, "tflop": 400.0}, None, "gpu")
        assert row["mfu_note"] == "n/a (unknown chip)" and row["goal_met"] is None
        row = g.finish_row({"row": "skyreels_forward_pytorch", "status": "ok", "seconds": 1.2, "tflop": 1.0,
                            "ratio": 1.2}, 989.4, "gpu")
        assert row["goal"] == "JAX 1.20x PyTorch >= 1.3x: MISSED" and row["goal_met"] is False
        row = g.finish_row({"row": "flowcache_vs_vanilla", "status": "ok", "seconds": 1.0, "tflop": 1.0,
                            "speedup_wall": 1.8, "speedup_ideal": 2.0, "ratio": 0.9}, 989.4, "gpu")
        assert row["goal_met"] is True and "tflop_s" not in row
        err = g.finish_row({"row": "magi1_forward", "status": "error: XlaRuntimeError: out of memory"}, 989.4, "gpu")
        assert "goal" not in err
        from models.magi1 import MAGI1_4P5B_DISTILL
        assert g.magi_config(types.SimpleNamespace(sizes=types.SimpleNamespace(magi=MAGI1_4P5B_DISTILL),
                                                   attention="xla")).attention_impl == "xla"
        assert g.layer_extrapolated(10.0, 10.0, 34)[0] == 340.0  # loop body counted once
        assert g.layer_extrapolated(340.0, 10.0, 34)[0] == 340.0  # trip count already included
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 0, p.stderr


def test_wheel_list_never_ships_the_device_stack():
    """Each line one pinned wheel by the one recipe; nothing that would shadow the device's JAX / PyTorch."""
    recipe = ("python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "
              "--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 "
              "-d .whl ")
    text = (ROOT / "experiments" / "gpu_wheels.txt").read_text()
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    names = []
    for line in lines:
        assert line.startswith(recipe), line
        name, version = line[len(recipe):].split("==")
        assert version and " " not in version
        names.append(name.lower().replace("_", "-"))
    assert len(names) == len(set(names)) and "diffusers" in names and "ml-collections" in names
    forbidden = {"jax", "jaxlib", "flax", "numpy", "torch", "orbax-checkpoint", "ml-dtypes"}
    assert not forbidden & set(names) and not any(n.startswith(("nvidia-", "jax-cuda")) for n in names)
    command = ("python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "
               "/tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit; python experiments/gpu_check.py "
               "--output_json=$OUT/gpu_check.json")
    assert command in text
