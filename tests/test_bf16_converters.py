"""``--dtype=bf16`` conversions: every part of a release (DiT, text encoder, VAE) is written in bf16 except what
stays float32, the values are the float32 source rounded once, and the converted text encoder and VAE run through
the pipeline (``PromptEncoder`` / ``make_decoder``) within the bf16 tolerance of the golden fixtures.

What stays float32 (``converters.components.dtype_rule``): DiTs everything outside ``layers/`` (embedders, head,
final norm, computed tables); text encoders and VAEs everything but their kernels (and T5's embedding table):
norm scales, biases, position tables, CLS tokens, as their ``cast_params`` hold them. Sizes come from the
fixtures (the FLOWCACHE_*_FIXTURE variables point at others).
"""

import json

import jax
import ml_dtypes
import numpy as np
import pytest

from converters.components import COMPONENTS, convert_component
from converters.release import convert_release
from experiments.errors import ConfigError
from experiments.pipeline import PromptEncoder, make_decoder, open_release
from flowcache_jax import checkpoint
from models import magi1_vae, t5, wan_vae
from tests.test_bf16_encoders import BF16_REL, rel
from tests.test_prompt_to_mp4 import MAGI, MVAE, SKY, T5, UMT5, WVAE

# (release model, part folder, component, source, format, config) -- as the release CLI is called
PARTS = {
    "magi1": [("", "magi1", MAGI / "weights.safetensors", None, MAGI / "config.json"),
              ("text_encoder", "t5", T5 / "weights.safetensors", "hf", T5 / "config.json"),
              ("vae", "magi1_vae", MVAE / "weights.safetensors", None, MVAE / "config.json")],
    "skyreels_v2": [("", "skyreels_v2", SKY / "weights.safetensors", None, SKY / "config.json"),
                    ("text_encoder", "umt5", UMT5 / "weights_wan.safetensors", "original", None),
                    ("vae", "wan_vae", WVAE / "weights_diffusers.safetensors", "diffusers", WVAE / "config.json")],
}
TOKENIZER = {"magi1": T5 / "tokenizer", "skyreels_v2": UMT5 / "tokenizer"}
HALF = {"t5": t5.half_precision_leaf, "umt5": t5.half_precision_leaf, "wan_vae": wan_vae.half_precision_leaf,
        "magi1_vae": magi1_vae.half_precision_leaf}


@pytest.fixture(scope="module", params=sorted(PARTS))
def release(request, tmp_path_factory):
    model = request.param
    dit, te, vae = PARTS[model]
    for part in PARTS[model]:
        if not part[2].is_file():
            pytest.skip(f"fixture file {part[2]} not found")
    dst = tmp_path_factory.mktemp(f"{model}_bf16") / "ckpt"
    convert_release(model, dst, str(dit[2]), dit_config=str(dit[4]), text_encoder=str(te[2]),
                    text_encoder_config=te[4] and str(te[4]), text_encoder_format=te[3],
                    tokenizer=str(TOKENIZER[model]), vae=str(vae[2]), vae_config=str(vae[4]), vae_format=vae[3],
                    dtype="bf16", log=lambda *_: None)  # the release CLI's --dtype=bf16
    return model, dst


def _flat(tree) -> dict:
    return {"/".join(str(k.key) for k in path): np.asarray(v) for path, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_bf16_converter_every_part_dtypes_and_values(release):
    model, dst = release
    assert json.loads((dst / "release.json").read_text())["dtype"] == "bf16"
    for folder, name, src, fmt, config in PARTS[model]:
        params, meta = checkpoint.load(dst / folder)
        assert meta["dtype"] == "bf16" and meta["model"] == name
        ref = _flat(convert_component(name, src, fmt, config and str(config), "fp32")[0])
        got = _flat(params)
        assert sorted(got) == sorted(ref), name
        keep = COMPONENTS[name].keep_f32
        half = [p for p in got if not keep(p)]
        assert half, f"{name}: nothing written in bf16"
        for path, arr in got.items():
            want = np.float32 if keep(path) else ml_dtypes.bfloat16
            assert arr.dtype == want, (name, path, arr.dtype)
            if name in HALF:  # text encoders / VAEs: the same rule as the models' cast_params
                assert HALF[name](path) == (want is ml_dtypes.bfloat16), (name, path)
            elif path.startswith("layers/"):  # DiTs: every per-layer tensor bf16 (MAGI-1 keeps them so)
                assert want is ml_dtypes.bfloat16, (name, path)
            np.testing.assert_array_equal(arr, ref[path].astype(want), err_msg=f"{name} {path}")  # rounded once


def test_bf16_converted_release_runs_in_the_pipeline(release, tmp_path):
    """The bf16 release through the pipeline: "" (the checkpoint's dtype) runs bf16, a run config's compute
    section overrides it (and keys the prompt cache apart), outputs within the bf16 budget of the goldens."""
    model, dst = release
    rel_ = open_release(dst, model)
    te_dir = T5 if model == "magi1" else UMT5
    cases = np.load(te_dir / "cases.npz")
    i = int(np.argmax(cases["seq_lens"] < cases["input_ids"].shape[1]))  # a prompt with padding
    length = cases["input_ids"].shape[1]
    enc = PromptEncoder(rel_, length, tmp_path / "cache")
    emb = enc(str(cases["prompts"][i]))
    assert not emb.cached and enc._encode is not None
    np.testing.assert_array_equal(emb.ids, cases["input_ids"][i])
    e_bf16 = rel(emb.hidden, cases["last_hidden_state"][i])
    f32 = PromptEncoder(rel_, length, tmp_path / "cache", {"dtype": "float32", "param_dtype": ""})
    emb32 = f32(str(cases["prompts"][i]))
    assert not emb32.cached and enc(str(cases["prompts"][i])).cached  # separate cache entries per precision
    e_f32 = rel(emb32.hidden, cases["last_hidden_state"][i])
    print(f"\n{model} release text encoder: bf16 {e_bf16:.2e}, f32 compute on bf16 weights {e_f32:.2e}")
    assert e_bf16 < BF16_REL and e_f32 < BF16_REL and e_f32 != e_bf16
    with pytest.raises(ConfigError, match="compute.dtype"):
        PromptEncoder(rel_, length, tmp_path / "cache", {"dtype": "half"})

    dec = make_decoder(rel_, {"dtype": "", "param_dtype": "bf16"})
    assert dec.cfg.dtype == "bfloat16" and dec.cfg.param_dtype == "bfloat16"  # "": the checkpoint's bf16
    assert make_decoder(rel_, {"dtype": "fp32"}).cfg.dtype == "float32"
    vc = {k: v[0] if v.ndim == 5 else v for k, v in np.load((MVAE if model == "magi1" else WVAE) / "cases.npz").items()}
    if model == "magi1":  # one DiT chunk through upstream's tiled decode (several tiles)
        frames = dec.decode(vc["tiled_dec_dit_latent"]).astype(np.int32)
        want = vc["tiled_dec_uint8"].transpose(0, 2, 3, 1).astype(np.int32)
    else:  # the streaming decoder on the first latent frame (DiT-normalised latents)
        dec(0, vc["dec_latent_tlat1"])
        frames = dec.frames().astype(np.int32)
        want = np.clip(vc["dec_tlat1"] * 127.5 + 127.5, 0, 255).astype(np.uint8).transpose(1, 2, 3, 0).astype(np.int32)
    assert frames.shape == want.shape
    d = np.abs(frames - want)
    print(f"{model} release VAE (bf16) uint8 frames vs golden: mean |d| {d.mean():.3f}, max {d.max()}")
    assert d.mean() < 1.0 and d.max() <= 16
