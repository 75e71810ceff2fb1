"""Importing a Self-Forcing generator (causal Wan2.1) into the Wan parameter layout.

The fixture's ``weights.safetensors`` holds what the released ``self_forcing_dmd.pt`` keeps under
``generator_ema``: CausalWanModel keys behind the wrapper's ``model.`` prefix. The expected tree below is written
from the upstream module names, not from the converter's key map, so a wrong rule cannot check itself. Sizes
come from the fixture's config.json and tensors.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from converters.components import convert_component
from converters.convert import convert_to_dir
from converters.safetensors_io import CheckpointError
from flowcache_jax import checkpoint
from models.self_forcing import config_from_upstream
from models.skyreels_v2 import param_shapes

TESTS = Path(__file__).resolve().parent
FIXTURE = Path(os.environ.get("FLOWCACHE_SELF_FORCING_FIXTURE",
                              TESTS.parent.parent / "shared" / "fixtures" / "self_forcing_tiny"))


@pytest.fixture(scope="module")
def fixture():
    """(state dict with the ``model.`` prefix, CausalWanModel kwargs, config.json path)."""
    if not (FIXTURE / "weights.safetensors").is_file() or not (FIXTURE / "config.json").is_file():
        pytest.fail(f"Self-Forcing fixture not found at {FIXTURE} (weights.safetensors + config.json); set "
                    "FLOWCACHE_SELF_FORCING_FIXTURE to the self_forcing_tiny folder")
    cfg = json.loads((FIXTURE / "config.json").read_text())["model"]
    return load_file(FIXTURE / "weights.safetensors"), cfg, str(FIXTURE / "config.json")


def _bare(sd: dict) -> dict:
    assert all(k.startswith("model.") for k in sd)
    return {k[len("model."):]: v for k, v in sd.items()}


def _patch_kernel(w: np.ndarray) -> np.ndarray:
    """Conv3d [D, C, kt, kh, kw] with kernel = stride is a Dense over patches flattened (c, kt, kh, kw)."""
    _, c, kt, kh, kw = w.shape
    return np.stack([w[:, a, t, h, x] for a in range(c) for t in range(kt) for h in range(kh) for x in range(kw)])


def expected_tree(sd: dict, num_layers: int) -> dict[str, np.ndarray]:
    """Flat path -> array, from the CausalWanModel names (Linear [out, in] -> kernel [in, out], tables [1, n, D]
    -> [n, D], per-block tensors stacked on a leading layer axis)."""
    b = _bare(sd)
    out = {"patch/kernel": _patch_kernel(b["patch_embedding.weight"]), "patch/bias": b["patch_embedding.bias"],
           "head/modulation": b["head.modulation"][0]}
    for dst, src in {"text/fc1": "text_embedding.0", "text/fc2": "text_embedding.2", "time/fc1": "time_embedding.0",
                     "time/fc2": "time_embedding.2", "time_proj": "time_projection.1", "head": "head.head"}.items():
        out[f"{dst}/kernel"], out[f"{dst}/bias"] = b[f"{src}.weight"].T, b[f"{src}.bias"]
    per_block = {"modulation": lambda i: b[f"blocks.{i}.modulation"][0],
                 "norm3/scale": lambda i: b[f"blocks.{i}.norm3.weight"],
                 "norm3/bias": lambda i: b[f"blocks.{i}.norm3.bias"]}
    linears = {f"{a}/{x}": f"{a}.{x}" for a in ("self_attn", "cross_attn") for x in "qkvo"}
    linears.update({"ffn/fc1": "ffn.0", "ffn/fc2": "ffn.2"})
    for dst, src in linears.items():
        per_block[f"{dst}/kernel"] = lambda i, s=src: b[f"blocks.{i}.{s}.weight"].T
        per_block[f"{dst}/bias"] = lambda i, s=src: b[f"blocks.{i}.{s}.bias"]
    for a in ("self_attn", "cross_attn"):
        for n in ("q", "k"):
            per_block[f"{a}/norm_{n}/scale"] = lambda i, a=a, n=n: b[f"blocks.{i}.{a}.norm_{n}.weight"]
    for dst, get in per_block.items():
        out[f"layers/{dst}"] = np.stack([get(i) for i in range(num_layers)])
    return out


def flat(tree) -> dict[str, np.ndarray]:
    return {"/".join(str(k.key) for k in path): np.asarray(v) for path, v in jax.tree.leaves_with_path(tree)}


def assert_converted(params, sd: dict, num_layers: int) -> None:
    got, want = flat(params), expected_tree(sd, num_layers)
    assert sorted(got) == sorted(want)
    for path, w in want.items():
        np.testing.assert_array_equal(got[path], w, err_msg=path)


def test_self_forcing_safetensors_converts_to_the_wan_layout(fixture, tmp_path):
    sd, cfg, cfg_path = fixture
    out = convert_to_dir("self_forcing", FIXTURE / "weights.safetensors", tmp_path / "sf", cfg_path)
    params, meta = checkpoint.load(out)
    assert_converted(params, sd, cfg["num_layers"])
    # the representative layouts, spelled out once more
    flat_params = flat(params)
    w = sd["model.patch_embedding.weight"]  # [D, C, 1, 2, 2]
    assert flat_params["patch/kernel"].shape == (w[0].size, w.shape[0])
    np.testing.assert_array_equal(flat_params["patch/kernel"][w.shape[3] * w.shape[4] + 1], w[:, 1, 0, 0, 1])
    np.testing.assert_array_equal(flat_params["layers/self_attn/q/kernel"][1],
                                  sd["model.blocks.1.self_attn.q.weight"].T)
    np.testing.assert_array_equal(flat_params["layers/modulation"][0], sd["model.blocks.0.modulation"][0])
    np.testing.assert_array_equal(flat_params["head/kernel"], sd["model.head.head.weight"].T)
    # the patch kernel against upstream's own Conv3d output (case_forward call 1)
    case = np.load(FIXTURE / "case_forward.npz")
    x, want = case["x1"][0], case["call1_patch_embed_out"][0]  # x [F, C, H, W], want [D, F, H/2, W/2]
    f, c, h, wd = x.shape
    patches = x.reshape(f, c, h // 2, 2, wd // 2, 2).transpose(0, 2, 4, 1, 3, 5).reshape(f, h // 2, wd // 2, -1)
    got = patches @ flat_params["patch/kernel"] + flat_params["patch/bias"]
    np.testing.assert_allclose(got, want.transpose(1, 2, 3, 0), atol=2e-5, rtol=1e-5)
    # the tree is the shared Wan model's (no fps embedding), and the metadata rebuilds its config
    shapes = jax.tree.map(lambda s: tuple(s), param_shapes(config_from_upstream(cfg)),
                          is_leaf=lambda s: isinstance(s, tuple))
    assert jax.tree.map(np.shape, params) == shapes
    assert meta["model"] == "self_forcing" and meta["role"] == "dit" and meta["source"]["prefix"] == "model."
    assert config_from_upstream(meta["model_config"]) == config_from_upstream(cfg)
    assert not config_from_upstream(meta["model_config"]).inject_sample_info


def test_self_forcing_stripped_safetensors_and_prefix_hint(fixture, tmp_path):
    sd, cfg, cfg_path = fixture
    save_file(_bare(sd), tmp_path / "bare.safetensors")
    params, meta = convert_component("self_forcing", tmp_path / "bare.safetensors", config_path=cfg_path)
    assert_converted(params, sd, cfg["num_layers"])
    assert "prefix" not in meta["source"]
    # a prefix the converter does not know: every key is listed, and the line says what they carry
    save_file({"generator." + k: v for k, v in sd.items()}, tmp_path / "odd.safetensors")
    with pytest.raises(CheckpointError) as e:
        convert_component("self_forcing", tmp_path / "odd.safetensors", config_path=cfg_path)
    assert "missing key patch_embedding.weight" in e.value.problems
    assert "unexpected key generator.model.patch_embedding.weight" in e.value.problems
    assert "prefix 'generator.model.'" in str(e.value) and len(e.value.problems) > len(sd)
    # one stray key after the known prefix: listed, no prefix hint
    save_file({**sd, "model.extra.weight": np.zeros(2, np.float32)}, tmp_path / "extra.safetensors")
    with pytest.raises(CheckpointError, match="unexpected key extra.weight") as e:
        convert_component("self_forcing", tmp_path / "extra.safetensors", config_path=cfg_path)
    assert e.value.problems == ["unexpected key extra.weight"] and "prefix" not in str(e.value)
    # without --model_config the released 1.3B config is assumed; the tiny weights then say what to pass
    with pytest.raises(CheckpointError, match="--model_config"):
        convert_component("self_forcing", FIXTURE / "weights.safetensors")


def _torch_dict(torch, sd: dict, scale: float = 1.0, prefix: str = "model.") -> dict:
    return {prefix + k: torch.from_numpy(v * np.float32(scale)) for k, v in _bare(sd).items()}


def test_self_forcing_training_pt_picks_the_generator(fixture, tmp_path):
    torch = pytest.importorskip("torch", reason="the .pt path needs PyTorch (CI installs the CPU wheel)")
    sd, cfg, cfg_path = fixture
    critic = {"model.blocks.0.self_attn.q.weight": torch.ones(3, 3)}
    pt = tmp_path / "self_forcing_dmd.pt"
    torch.save({"generator_ema": _torch_dict(torch, sd), "generator": _torch_dict(torch, sd, 2.0),
                "critic": critic}, pt)
    with pytest.raises(CheckpointError, match="--allow_pickle_weights_only"):
        convert_component("self_forcing", pt, config_path=cfg_path)
    params, meta = convert_component("self_forcing", pt, config_path=cfg_path, allow_pickle_weights_only=True)
    assert_converted(params, sd, cfg["num_layers"])
    assert meta["source"]["entry"] == "generator_ema" and meta["source"]["prefix"] == "model."
    params, meta = convert_component("self_forcing", pt, config_path=cfg_path, allow_pickle_weights_only=True,
                                     ema=False)
    assert_converted(params, {k: v * np.float32(2.0) for k, v in sd.items()}, cfg["num_layers"])
    assert meta["source"]["entry"] == "generator"
    # an FSDP-wrapped generator only (no EMA): the fallback, the longer prefix stripped
    fsdp = tmp_path / "fsdp.pt"
    torch.save({"generator": _torch_dict(torch, sd, prefix="model._fsdp_wrapped_module."), "critic": critic}, fsdp)
    params, meta = convert_component("self_forcing", fsdp, config_path=cfg_path, allow_pickle_weights_only=True)
    assert_converted(params, sd, cfg["num_layers"])
    assert meta["source"] == {**meta["source"], "entry": "generator", "prefix": "model._fsdp_wrapped_module."}
    # a bare CausalWanModel state dict
    bare = tmp_path / "bare.pt"
    torch.save(_torch_dict(torch, sd, prefix=""), bare)
    params, meta = convert_component("self_forcing", bare, config_path=cfg_path, allow_pickle_weights_only=True)
    assert_converted(params, sd, cfg["num_layers"])
    assert "entry" not in meta["source"] and "prefix" not in meta["source"]
    # --ema=false on a file with only the EMA copy: the top-level keys are named
    ema_only = tmp_path / "ema_only.pt"
    torch.save({"generator_ema": _torch_dict(torch, sd)}, ema_only)
    with pytest.raises(CheckpointError, match="top-level keys: generator_ema"):
        convert_component("self_forcing", ema_only, config_path=cfg_path, allow_pickle_weights_only=True, ema=False)


def test_self_forcing_cli_errors_are_one_line(fixture, tmp_path):
    torch = pytest.importorskip("torch", reason="the .pt path needs PyTorch (CI installs the CPU wheel)")
    sd, _, cfg_path = fixture
    good, bad = tmp_path / "self_forcing_dmd.pt", tmp_path / "critic_only.pt"
    torch.save({"generator_ema": _torch_dict(torch, sd)}, good)
    torch.save({"critic": _torch_dict(torch, sd), "step": 7}, bad)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    runs = {name: subprocess.Popen([sys.executable, "-m", "converters.convert", "--model=self_forcing",
                                    f"--src={src}", f"--dst={tmp_path / name}", f"--model_config={cfg_path}", *extra],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                   cwd=TESTS.parent)
            for name, src, extra in (("no_flag", good, ()), ("no_generator", bad, ("--allow_pickle_weights_only",)))}
    errs = {}
    for name, p in runs.items():
        _, err = p.communicate(timeout=120)
        assert p.returncode == 2, err
        assert "Traceback" not in err and not (tmp_path / name).exists()
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), err
        errs[name] = lines[0]
    assert "--allow_pickle_weights_only" in errs["no_flag"]
    assert "'generator_ema' or 'generator'" in errs["no_generator"] and "critic, step" in errs["no_generator"]
