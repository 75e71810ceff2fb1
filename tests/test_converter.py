"""The MAGI-1 converter: CLI round trip to the fixture's outputs, sharded input, strict validation."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from converters.keymaps.magi1 import proj_columns
from flowcache_jax import checkpoint
from models.magi1 import Magi1Config, empty_buffer, forward_call
from tests.conftest import ROOT
from tests.test_magi1_parity import FIXTURE, TIGHT, close

CONFIG = FIXTURE / "config.json"
WEIGHTS = FIXTURE / "weights.safetensors"


def convert(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "converters.convert", "--model=magi1", *args], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=300)


def case_a_velocity(params):
    cfg = Magi1Config.from_upstream(json.loads(CONFIG.read_text())["model_config"])
    a = np.load(FIXTURE / "case_A.npz")
    p = jax.tree.map(jnp.asarray, dict(params, t_freqs=a["timestep_freqs_f32"]))
    vel, _, _ = forward_call(cfg, p, a["fwd0_x"][0], a["fwd0_t"][0], a["fwd0_y"][:, 0], a["fwd0_xattn_mask"][:, 0],
                             a["fwd0_kv_range"], empty_buffer(cfg, 1), int(a["fwd0_kw_slice_point"]),
                             int(a["fwd0_kw_num_steps"]), 0, a["fwd0_kw_distill_interval"])
    return vel, a["fwd0_out"][0]


def test_cli_round_trip_reproduces_case_a(tmp_path):
    dst = tmp_path / "magi"
    p = convert(f"--src={WEIGHTS}", f"--dst={dst}", f"--model_config={CONFIG}")
    assert p.returncode == 0, p.stderr
    params, meta = checkpoint.load(dst)
    assert meta["model"] == "magi1" and meta["model_config"]["num_layers"] == params["layers"]["q"]["kernel"].shape[0]
    assert WEIGHTS.name in meta["source"]["sha256"]
    vel, ref = case_a_velocity(params)
    close(vel, ref, **TIGHT)
    # an existing destination is not overwritten silently
    p = convert(f"--src={WEIGHTS}", f"--dst={dst}", f"--model_config={CONFIG}")
    assert p.returncode == 2 and "--overwrite" in p.stderr


def test_sharded_folder_with_index(tmp_path):
    sd = load_file(WEIGHTS)
    keys = sorted(sd)
    half = len(keys) // 2
    shards = {"model-00001-of-00002.safetensors": keys[:half], "model-00002-of-00002.safetensors": keys[half:]}
    for name, ks in shards.items():
        save_file({k: sd[k] for k in ks}, tmp_path / name)
    index = {"metadata": {}, "weight_map": {k: n for n, ks in shards.items() for k in ks}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    p = convert(f"--src={tmp_path}", f"--dst={tmp_path / 'out'}", f"--model_config={CONFIG}", "--dtype=bf16")
    assert p.returncode == 0, p.stderr
    params, meta = checkpoint.load(tmp_path / "out")
    assert str(params["layers"]["q"]["kernel"].dtype) == "bfloat16"
    assert params["x_embed"]["kernel"].dtype == np.float32 and params["rope_bands"].dtype == np.float32
    vel, ref = case_a_velocity(jax.tree.map(lambda x: np.asarray(x, np.float32), params))
    close(vel, ref, rtol=5e-2, atol=5e-2)  # bf16 weights: a loose budget, but the same function


def test_strict_validation_lists_every_problem(tmp_path):
    sd = load_file(WEIGHTS)
    del sd["rope.bands"]
    sd["extra.weight"] = np.zeros(3, np.float32)
    k = "videodit_blocks.layers.0.mlp.linear_fc1.weight"
    sd[k] = sd[k][:-1]
    bad = tmp_path / "bad.safetensors"
    save_file(sd, bad)
    p = convert(f"--src={bad}", f"--dst={tmp_path / 'out'}", f"--model_config={CONFIG}")
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "missing key rope.bands" in p.stderr and "unexpected key extra.weight" in p.stderr
    assert "linear_fc1" in p.stderr and "3 problem(s)" in p.stderr
    assert not (tmp_path / "out").exists()


def test_pickles_need_the_explicit_flag(tmp_path):
    pt = tmp_path / "model.pt"
    pt.write_bytes(b"not really a pickle")
    p = convert(f"--src={pt}", f"--dst={tmp_path / 'out'}", f"--model_config={CONFIG}")
    assert p.returncode == 2 and "pickle" in p.stderr


def test_missing_source_is_one_line(tmp_path):
    p = convert(f"--src={tmp_path / 'nope'}", f"--dst={tmp_path / 'out'}")
    assert p.returncode == 2 and p.stderr.strip().startswith("error:") and len(p.stderr.strip().splitlines()) == 1


def test_proj_permutation_matches_spec():
    cols = proj_columns(3072)
    s = np.arange(3072)
    np.testing.assert_array_equal(cols[:3072], 768 * (s // 384) + s % 384)
    np.testing.assert_array_equal(cols[3072:], 768 * (s // 384) + 384 + s % 384)
    assert sorted(cols) == list(range(6144))


def test_released_config_shapes():
    """The released 4.5B-distill config builds (abstract shapes only): 4,459,898,128 parameters (spec §4.1)."""
    from models.magi1 import MAGI1_4P5B_DISTILL, param_shapes

    cfg = Magi1Config.from_upstream(MAGI1_4P5B_DISTILL)
    shapes = jax.tree.leaves(param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))
    n = sum(int(np.prod(s)) for s in shapes) - 128  # minus our timestep-frequency table
    assert n == 4_459_898_128
    swiglu = Magi1Config.from_upstream(dict(MAGI1_4P5B_DISTILL, gated_linear_unit=True))  # the 24B's MLP
    assert param_shapes(swiglu)["layers"]["fc1"]["kernel"][-1] == 2 * swiglu.ffn_hidden_size
    with pytest.raises(ValueError, match="half_channel_vae"):
        Magi1Config.from_upstream(dict(MAGI1_4P5B_DISTILL, half_channel_vae=True))
