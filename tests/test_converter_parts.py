"""Converting text encoders and VAEs: sharded safetensors, the explicit pickle path (tensor by tensor, bf16 kept),
dtype on read, and the converter CLI for every component. Sizes come from the fixtures."""

import json
import os
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from converters.components import convert_component
from converters.safetensors_io import PickleReader, SafetensorsReader
from flowcache_jax import checkpoint
from tests.conftest import ROOT
from tests.test_prompt_to_mp4 import T5, UMT5, WVAE


def convert(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "converters.convert", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)


def same_tree(a, b):
    la, lb = jax.tree.leaves_with_path(a), jax.tree.leaves_with_path(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (path, x), (_, y) in zip(la, lb, strict=True):
        assert np.asarray(x).dtype == np.asarray(y).dtype, path
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))


def shard(src, folder, index_name, pieces=2, suffix=".safetensors", writer=save_file):
    """Split a checkpoint into ``pieces`` files plus an HF-style index json."""
    sd = load_file(src)
    keys = sorted(sd)
    folder.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for i in range(pieces):
        name = f"model-{i + 1:05d}-of-{pieces:05d}{suffix}"
        part = keys[i::pieces]
        writer({k: sd[k] for k in part}, folder / name)
        weight_map.update(dict.fromkeys(part, name))
    (folder / index_name).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def test_text_encoder_sharded_safetensors_with_index(tmp_path):
    one, _ = convert_component("t5", T5 / "weights.safetensors", "hf", str(T5 / "config.json"))
    folder = shard(T5 / "weights.safetensors", tmp_path / "t5", "model.safetensors.index.json")
    (folder / "config.json").write_text((T5 / "config.json").read_text())  # HF folders keep it beside the shards
    many, meta = convert_component("t5", folder, "hf")
    same_tree(one, many)
    assert meta["model_config"]["d_model"] == json.loads((T5 / "config.json").read_text())["d_model"]
    assert len(meta["source"]["sha256"]) == 3  # both shards and the index


def test_vae_and_text_encoder_cli_with_bf16(tmp_path):
    p = convert("--model=wan_vae", "--format=diffusers", f"--src={WVAE / 'weights_diffusers.safetensors'}",
                f"--model_config={WVAE / 'config.json'}", f"--dst={tmp_path / 'vae'}", "--dtype=bf16")
    assert p.returncode == 0, p.stderr
    params, meta = checkpoint.load(tmp_path / "vae")
    dtypes = {str(np.asarray(x).dtype) for x in jax.tree.leaves(params)}
    assert dtypes == {"bfloat16", "float32"} and meta["dtype"] == "bf16" and meta["role"] == "vae"
    # the other layout: every problem listed, and the flag that fixes it
    p = convert("--model=wan_vae", f"--src={WVAE / 'weights_diffusers.safetensors'}",
                f"--model_config={WVAE / 'config.json'}", f"--dst={tmp_path / 'vae2'}")
    assert p.returncode == 2 and "missing key" in p.stderr and "--format=diffusers" in p.stderr
    assert p.stderr.count("(these are") == 1 and not (tmp_path / "vae2").exists()
    p = convert("--model=umt5", "--format=original", f"--src={UMT5 / 'weights_hf.safetensors'}",
                f"--dst={tmp_path / 'te'}")
    assert p.returncode == 2 and "--format=hf" in p.stderr and "Traceback" not in p.stderr


def test_text_encoder_dtype_is_applied_while_reading():
    """Casting block by block while reading gives exactly the tensor cast after a full read."""
    r = SafetensorsReader(UMT5 / "weights_wan.safetensors")
    key = max(r.keys(), key=lambda k: np.prod(r.shape(k)))
    full = r[key]
    small_blocks = r.read(key, ml_dtypes.bfloat16, block_bytes=full.nbytes // 7)
    np.testing.assert_array_equal(small_blocks, full.astype(ml_dtypes.bfloat16))
    assert small_blocks.dtype == ml_dtypes.bfloat16


def _torch():
    return pytest.importorskip("torch", reason="the explicit pickle path needs PyTorch (CI installs the CPU wheel)")


def test_text_encoder_pickle_pth_needs_the_flag_and_matches_safetensors(tmp_path):
    torch = _torch()
    sd = load_file(UMT5 / "weights_wan.safetensors")
    pth = tmp_path / "models_t5_umt5-enc.pth"
    torch.save({k: torch.from_numpy(v).to(torch.bfloat16) for k, v in sd.items()}, pth)
    p = convert("--model=umt5", "--format=original", f"--src={pth}", f"--dst={tmp_path / 'no'}")
    assert p.returncode == 2 and "--allow_pickle_weights_only" in p.stderr and not (tmp_path / "no").exists()
    # bf16 stays bf16 through the lazy reader (no float32 copy of the whole file)
    r = PickleReader(pth)
    assert sorted(r.keys()) == sorted(sd) and {str(r[k].dtype) for k in r.keys()} == {"bfloat16"}
    ref, _ = convert_component("umt5", UMT5 / "weights_wan.safetensors", "original")
    got, meta = convert_component("umt5", pth, "original", allow_pickle_weights_only=True)
    same_tree(jax.tree.map(lambda x: np.asarray(x).astype(ml_dtypes.bfloat16), ref), got)
    assert meta["source"]["sha256"] and pth.name in meta["source"]["sha256"]


def test_vae_pickle_pth_matches_safetensors(tmp_path):
    torch = _torch()
    sd = load_file(WVAE / "weights_wan.safetensors")
    pth = tmp_path / "Wan2.1_VAE.pth"
    torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, pth)
    cfg = str(WVAE / "config.json")
    ref, _ = convert_component("wan_vae", WVAE / "weights_wan.safetensors", "original", cfg)
    got, _ = convert_component("wan_vae", pth, "original", cfg, allow_pickle_weights_only=True)
    same_tree(ref, got)


def test_text_encoder_sharded_pickle_bins_with_index(tmp_path):
    """The DeepFloyd t5-v1_1-xxl layout: pytorch_model-0000k-of-0000n.bin shards and their index."""
    torch = _torch()

    def write(d, path):
        torch.save({k: torch.from_numpy(v) for k, v in d.items()}, path)

    folder = shard(T5 / "weights.safetensors", tmp_path / "t5bin", "pytorch_model.bin.index.json", suffix=".bin",
                   writer=write)
    ref, _ = convert_component("t5", T5 / "weights.safetensors", "hf", str(T5 / "config.json"))
    got, _ = convert_component("t5", folder, "hf", str(T5 / "config.json"), allow_pickle_weights_only=True)
    same_tree(ref, got)


def test_vae_leaf_writer_streams_groups_and_loads_back(tmp_path):
    """A converter's tensors go to disk in groups as they are made; load() reads them back, with or without a
    target tree, exactly; and the single-tree layout still loads."""
    from flowcache_jax.checkpoint import LeafWriter

    params, meta = convert_component("wan_vae", WVAE / "weights_wan.safetensors", "original", str(WVAE / "config.json"))
    w = LeafWriter(tmp_path / "ckpt", group_bytes=1 << 16)  # small groups: many items
    w.put_tree(params)
    w.close(meta)
    index = json.loads((tmp_path / "ckpt" / "params" / "leaves.json").read_text())
    assert index["groups"] > 3 and len(index["leaves"]) == len(jax.tree.leaves(params))
    got, meta2 = checkpoint.load(tmp_path / "ckpt")
    same_tree(params, jax.tree.map(np.asarray, got))
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    same_tree(params, jax.tree.map(np.asarray, checkpoint.load(tmp_path / "ckpt", target)[0]))
    assert meta2 == json.loads(json.dumps(meta))
    with pytest.raises(ValueError, match="twice"):
        w2 = LeafWriter(tmp_path / "other")
        w2.put("a/b", np.zeros(2))
        w2.put("a/b", np.zeros(2))
