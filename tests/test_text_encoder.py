"""T5 v1.1 (MAGI-1) and umT5 (Wan2.1 / SkyReels-V2) text encoders vs the upstream golden fixtures.

Prompt cleaning, tokenisation (sentencepiece and tokenizers), relative-position buckets, every intermediate
of the encoder in float32, both umT5 checkpoint layouts, converter validation and a bf16 run. Every size comes
from the fixture files, so other fixtures of the same format (env vars below) run unchanged.
"""

import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from converters.keymaps.t5 import HF_EMBED, HF_EMBED_TIED, convert_t5, detect_format, rules
from converters.safetensors_io import CheckpointError, SafetensorsReader
from models.t5 import (
    T5_V1_1_XXL,
    UMT5_XXL,
    T5Config,
    T5Encoder,
    config_from_wan_shapes,
    encode,
    layer_position_biases,
    magi_caption,
    num_params,
    param_shapes,
    relative_position_buckets,
    wan_context,
)
from models.tokenizer import Tokenizer, clean_magi, clean_wan
from tests.conftest import ROOT

T5_DIR = Path(os.environ.get("FLOWCACHE_T5_FIXTURE", ROOT.parent / "shared" / "fixtures" / "t5_tiny"))
UMT5_DIR = Path(os.environ.get("FLOWCACHE_UMT5_FIXTURE", ROOT.parent / "shared" / "fixtures" / "umt5_tiny"))
# README tolerances: the residual stream (hidden_states / block_outputs) and the normalised outputs.
STREAM = dict(atol=2e-5, rtol=1e-5)
OUTPUT = dict(atol=1e-5, rtol=1e-5)
BF16_REL = 3e-2  # relative L2 error of a bf16 run vs float32 (bf16 has an 8-bit mantissa: ~4e-3 per rounding)

_encode = jax.jit(encode, static_argnums=(0, 4))


def _config(folder: Path) -> dict:
    return {k: v for k, v in json.loads((folder / "config.json").read_text()).items() if not k.startswith("_")}


def _load(folder: Path, weights: str, fmt: str) -> dict:
    cases = dict(np.load(folder / "cases.npz"))
    cfg = T5Config.from_hf(_config(folder))
    params = jax.tree.map(jnp.asarray, convert_t5(SafetensorsReader(folder / weights), cfg, fmt))
    out, inter = _encode(cfg, params, cases["input_ids"].astype(np.int32), cases["attention_mask"].astype(np.int32),
                         True)
    return dict(dir=folder, cases=cases, cfg=cfg, params=params, out=np.asarray(out),
                inter=jax.tree.map(np.asarray, inter), length=cases["input_ids"].shape[1])


@pytest.fixture(scope="module")
def t5():
    return _load(T5_DIR, "weights.safetensors", "hf")


@pytest.fixture(scope="module")
def umt5():
    return _load(UMT5_DIR, "weights_hf.safetensors", "hf")


@pytest.fixture(scope="module")
def umt5_wan(umt5):
    return _load(UMT5_DIR, "weights_wan.safetensors", "wan")


def _fixture(request, name):
    return request.getfixturevalue(name)


# ----- cleaning ----------------------------------------------------------------------------------------------------
def test_text_encoder_clean_magi_matches_fixture():
    c = np.load(T5_DIR / "cases.npz")
    for raw, want in zip(c["prompts"], c["cleaned_prompts"], strict=True):
        assert clean_magi(str(raw)) == str(want), repr(raw)


def test_text_encoder_clean_wan_matches_fixture():
    c = np.load(UMT5_DIR / "cases.npz")
    for raw, want in zip(c["prompts"], c["cleaned_prompts"], strict=True):
        assert clean_wan(str(raw)) == str(want), repr(raw)


# Outputs of the upstream MAGI-1 T5Embedder.text_preprocessing on prompts beyond the fixture's six.
MAGI_EXTRA = {
    "&lt;dances&gt; with wolves": "with wolves",  # decoded in pass 1, stripped as a tag in pass 2
    "Visit www.example.org/path or http://foo.bar/x?y=1 now!!": "visit or foo. bar x?y=1 now!!",
    "email @john_doe at 192.168.0.1 ok": "email at ok",
    "this-is-my-cute-cat": "this is my cute cat",
    "Free shipping worldwide! click here for details, page 12": "worldwide! click here for details",
    "jc6640 and 1920x1080 shots": "and shots",
    "«Tokyo 東京» ‘night’ — neon": "\"tokyo \" 'night' - neon",
    "a%20b+c": "a b c",
    "\"Quoted whole thing\"": "quoted whole thing",
    "one,two.three": "one, two. three",
}


@pytest.mark.parametrize("raw", sorted(MAGI_EXTRA))
def test_text_encoder_clean_magi_upstream_examples(raw):
    assert clean_magi(raw) == MAGI_EXTRA[raw]


def test_text_encoder_clean_wan_keeps_case_and_tags():
    assert clean_wan("  The cafÃ© &amp;amp; bar\n&lt;b&gt;Bold&lt;/b&gt;  ") == "The café & bar <b>Bold</b>"


# ----- tokenisation ------------------------------------------------------------------------------------------------
def _check_tokens(tok: Tokenizer, cases: dict) -> None:
    length = int(cases["max_length"] if "max_length" in cases else cases["text_len"])
    assert cases["input_ids"].shape[1] == length
    batch = tok([str(p) for p in cases["cleaned_prompts"]], length)
    # every prompt, also where a plain sentencepiece call would differ from HF (sp_direct_matches False: special-token
    # strings in the text, which the tokenizer splits out as HF does)
    np.testing.assert_array_equal(batch.ids, cases["input_ids"])
    np.testing.assert_array_equal(batch.mask, cases["attention_mask"])
    np.testing.assert_array_equal(batch.lengths, cases["seq_lens"])
    assert batch.ids.dtype == np.int32 and batch.mask.dtype == np.int32
    assert np.all(batch.ids[np.arange(len(batch.ids)), batch.lengths - 1] == tok.eos_id)
    assert not np.any(batch.truncated & (batch.lengths != length))


@pytest.mark.parametrize("fixture", ["t5", "umt5"])
@pytest.mark.parametrize("source", ["spiece.model", "tokenizer"])
def test_text_encoder_tokenizer_ids_exact(fixture, source):
    folder = T5_DIR if fixture == "t5" else UMT5_DIR
    _check_tokens(Tokenizer.from_path(folder / source), dict(np.load(folder / "cases.npz")))


@pytest.mark.parametrize("fixture", ["t5", "umt5"])
def test_text_encoder_tokenizer_json_path(fixture, tmp_path):
    """The tokenizers route: a tokenizer.json built from the same spiece.model gives the same ids."""
    tokenizers = pytest.importorskip("tokenizers")
    pb = pytest.importorskip("sentencepiece.sentencepiece_model_pb2")
    folder = T5_DIR if fixture == "t5" else UMT5_DIR
    sys.modules.setdefault("sentencepiece_model_pb2", pb)  # where tokenizers' from_spm imports it from
    built = tokenizers.SentencePieceUnigramTokenizer.from_spm(str(folder / "spiece.model"))
    built.save(str(tmp_path / "tokenizer.json"))
    for f in (folder / "tokenizer").glob("*.json"):
        shutil.copy(f, tmp_path)
    tok = Tokenizer.from_path(tmp_path)
    assert tok.source.endswith("tokenizer.json")
    _check_tokens(tok, dict(np.load(folder / "cases.npz")))
    sp = Tokenizer.from_path(folder / "tokenizer")
    for text in ["A dog, a cat.", "Café — ´accent´", "x\u00a0y  z", "①¼ ﬁne", "🐱 東京"]:
        assert tok.encode(text) == sp.encode(text), text


def test_text_encoder_tokenizer_len_errors_and_truncation(tmp_path):
    tok = Tokenizer.from_path(T5_DIR / "tokenizer")
    conf = json.loads((T5_DIR / "tokenizer" / "tokenizer_config.json").read_text())
    import sentencepiece

    pieces = sentencepiece.SentencePieceProcessor(model_file=str(T5_DIR / "spiece.model")).get_piece_size()
    assert len(tok) == pieces + int(conf.get("extra_ids", 0))
    batch = tok(["a cat " * 50, ""], 4)
    assert batch.truncated.tolist() == [True, False] and batch.lengths.tolist() == [4, 1]
    assert batch.ids[0, -1] == tok.eos_id and batch.ids[1].tolist() == [tok.eos_id] + [tok.pad_id] * 3
    with pytest.raises(FileNotFoundError, match="no tokenizer.json or spiece.model"):
        Tokenizer.from_path(tmp_path)
    with pytest.raises(FileNotFoundError):
        Tokenizer.from_path(tmp_path / "missing")
    with pytest.raises(TypeError):
        tok("one string", 8)


# ----- model -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fixture", ["t5", "umt5"])
def test_text_encoder_buckets_exact(request, fixture):
    fx = _fixture(request, fixture)
    want = fx["cases"]["relative_position_buckets"]
    got = relative_position_buckets(*want.shape, fx["cfg"].num_buckets, fx["cfg"].max_distance)
    np.testing.assert_array_equal(got, want)
    # the log-spaced boundaries that float rounding could move (distances 16, 32, 64; clipped from 128 on)
    far = relative_position_buckets(1, 200, 32, 128)[0]
    assert [far[d] for d in (7, 8, 15, 16, 31, 32, 63, 64, 127, 128, 199)] == [23, 24, 25, 26, 27, 28, 29, 30, 31,
                                                                                 31, 31]


def _check_hidden(fx: dict) -> None:
    c, it, n = fx["cases"], fx["inter"], fx["cfg"].num_layers
    hs = c["hidden_states"]
    assert hs.shape[1] == n + 1 and it["blocks"].shape == c["block_outputs"].shape
    np.testing.assert_allclose(it["embeddings"], hs[:, 0], **STREAM)
    np.testing.assert_allclose(it["blocks"][:, : n - 1], hs[:, 1:n], **STREAM)
    np.testing.assert_allclose(it["final"], hs[:, n], **OUTPUT)
    np.testing.assert_allclose(it["blocks"], c["block_outputs"], **STREAM)


def test_text_encoder_t5_parity(t5):
    c = t5["cases"]
    _check_hidden(t5)
    np.testing.assert_allclose(t5["out"], c["last_hidden_state"], **OUTPUT)
    embs, mask = magi_caption(t5["out"], c["attention_mask"])
    np.testing.assert_allclose(embs, c["magi_caption_embs"], **OUTPUT)
    np.testing.assert_array_equal(mask, c["magi_emb_masks"])


@pytest.mark.parametrize("layout", ["umt5", "umt5_wan"])
def test_text_encoder_umt5_parity(request, layout):
    fx = _fixture(request, layout)
    c, out = fx["cases"], fx["out"]
    _check_hidden(fx)
    np.testing.assert_allclose(out, c["last_hidden_state"], **OUTPUT)
    np.testing.assert_allclose(out, c["hf_last_hidden_state"], **OUTPUT)
    ctx = np.asarray(wan_context(out, c["attention_mask"]))
    np.testing.assert_allclose(ctx, c["context_padded"], **OUTPUT)
    pads = c["attention_mask"] == 0
    assert np.all(ctx[pads] == 0) and not np.any(np.signbit(ctx[pads]))
    flat = np.concatenate([ctx[i, :n] for i, n in enumerate(c["seq_lens"])])
    np.testing.assert_array_equal(np.cumsum(np.r_[0, c["seq_lens"]]), c["context_offsets"])
    np.testing.assert_allclose(flat, c["context_flat"], **OUTPUT)
    bias = layer_position_biases(fx["cfg"], fx["params"], fx["length"])
    np.testing.assert_allclose(bias, c["position_bias"], atol=1e-6, rtol=0)


def test_text_encoder_layouts_give_identical_params(umt5, umt5_wan):
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, umt5["params"]),
                 jax.tree.map(np.asarray, umt5_wan["params"]))
    # the rule tables agree with the fixture's key map (destination path -> the two source names)
    cfg = umt5["cfg"]
    key_map = json.loads((UMT5_DIR / "key_map_wan_to_hf.json").read_text())
    hf = {r.dst: r for r in rules(cfg, "hf")}
    seen = set()
    for r in rules(cfg, "wan"):
        for i in range(cfg.num_layers) if r.per_layer else [None]:
            src, dst = r.src.format(i=i), hf[r.dst].src.format(i=i)
            want = {HF_EMBED, HF_EMBED_TIED} if dst == HF_EMBED else {dst}
            assert set(key_map[src]) == want, src
            seen.add(src)
    assert seen == set(key_map)


def test_text_encoder_embedding_names(umt5):
    cfg = umt5["cfg"]
    reader = SafetensorsReader(UMT5_DIR / "weights_hf.safetensors")
    full = {k: reader[k] for k in reader.keys()}
    assert HF_EMBED in full and HF_EMBED_TIED in full
    ref = jax.tree.map(np.asarray, umt5["params"])
    for drop in (HF_EMBED, HF_EMBED_TIED):  # either name alone is enough
        one = {k: v for k, v in full.items() if k != drop}
        np.testing.assert_array_equal(convert_t5(one, cfg, "hf")["embed"], ref["embed"])
    decoder = dict(full, **{"decoder.final_layer_norm.weight": full["encoder.final_layer_norm.weight"]})
    np.testing.assert_array_equal(convert_t5(decoder, cfg, "hf")["embed"], ref["embed"])  # decoder ignored
    bad = dict(full, **{HF_EMBED_TIED: full[HF_EMBED] + 1})
    with pytest.raises(CheckpointError, match="differ"):
        convert_t5(bad, cfg, "hf")


def test_text_encoder_wrong_layout_is_a_checkpoint_error(t5, umt5):
    cfg = umt5["cfg"]
    wan = SafetensorsReader(UMT5_DIR / "weights_wan.safetensors")
    hf = SafetensorsReader(UMT5_DIR / "weights_hf.safetensors")
    assert detect_format(wan.keys()) == "wan" and detect_format(hf.keys()) == "hf"
    with pytest.raises(CheckpointError, match="fmt='wan'") as e:
        convert_t5(wan, cfg, "hf")
    assert e.value.detected_format == "wan" and any("missing key" in p for p in e.value.problems)
    with pytest.raises(CheckpointError, match="fmt='hf'") as e:
        convert_t5(hf, cfg, "wan")
    assert e.value.detected_format == "hf"
    np.testing.assert_array_equal(convert_t5(wan, cfg, "auto")["embed"], np.asarray(umt5["params"]["embed"]))
    # a T5 v1.1 file (bias in block 0 only) is not a umT5 checkpoint, and vice versa
    if t5["cfg"].num_layers > 1:
        with pytest.raises(CheckpointError, match="relative_attention_bias"):
            convert_t5(SafetensorsReader(T5_DIR / "weights.safetensors"), dataclasses.replace(t5["cfg"],
                                                                                              shared_pos=False))
    if cfg.num_layers > 1:
        with pytest.raises(CheckpointError, match="unexpected key .*relative_attention_bias"):
            convert_t5(hf, dataclasses.replace(cfg, shared_pos=True), "hf")


def test_text_encoder_configs():
    t5_cfg, um_cfg = T5Config.from_hf(_config(T5_DIR)), T5Config.from_hf(_config(UMT5_DIR))
    assert t5_cfg.shared_pos and not um_cfg.shared_pos
    wan = SafetensorsReader(UMT5_DIR / "weights_wan.safetensors")
    derived = config_from_wan_shapes({k: wan.shape(k) for k in wan.keys()})
    assert T5Config.from_hf(derived) == dataclasses.replace(um_cfg, max_distance=128, eps=1e-6)  # not in the file
    for bad in ("relu", "gated-silu"):
        with pytest.raises(ValueError, match="feed_forward_proj"):
            T5Config.from_hf(dict(_config(T5_DIR), feed_forward_proj=bad))
    with pytest.raises(ValueError, match="model_type"):
        T5Config.from_hf(dict(_config(T5_DIR), model_type="mt5"))
    # full-size structure: the spec's parameter counts (~4.76 B and ~5.68 B) from shapes alone
    big_t5, big_um = T5Config.from_hf(T5_V1_1_XXL), T5Config.from_hf(UMT5_XXL)
    assert abs(num_params(big_t5) / 4.76e9 - 1) < 5e-3 and abs(num_params(big_um) / 5.68e9 - 1) < 5e-3
    assert param_shapes(big_um)["layers"]["pos_bias"] == (24, 32, 64) and "pos_bias" in param_shapes(big_t5)
    abstract = jax.eval_shape(lambda p: encode(big_um, p, jnp.zeros((1, 512), jnp.int32), jnp.ones((1, 512))),
                              jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.bfloat16), param_shapes(big_um),
                                           is_leaf=lambda x: isinstance(x, tuple)))
    assert abstract.shape == (1, 512, 4096) and abstract.dtype == jnp.float32


@pytest.mark.parametrize("fixture", ["t5", "umt5"])
def test_text_encoder_bf16_close_to_f32(request, fixture):
    fx = _fixture(request, fixture)
    cfg = dataclasses.replace(fx["cfg"], dtype="bfloat16")
    params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), fx["params"])
    c = fx["cases"]
    out = np.asarray(_encode(cfg, params, c["input_ids"].astype(np.int32), c["attention_mask"].astype(np.int32),
                             False))
    assert out.dtype == np.float32 and np.all(np.isfinite(out))
    ref = c["last_hidden_state"]
    rel = np.linalg.norm(out - ref) / np.linalg.norm(ref)
    assert rel < BF16_REL, rel


def test_text_encoder_nnx_module(umt5):
    c = umt5["cases"]
    model = T5Encoder(umt5["cfg"], umt5["params"])
    out = model(c["input_ids"][:2].astype(np.int32), c["attention_mask"][:2].astype(np.int32))
    np.testing.assert_allclose(out, c["last_hidden_state"][:2], **OUTPUT)
    fresh = T5Encoder(umt5["cfg"], rngs=nnx.Rngs(0))
    shapes = jax.tree.map(np.shape, fresh.param_dict())
    assert shapes == jax.tree.map(np.shape, jax.tree.map(np.asarray, umt5["params"]))


@pytest.mark.parametrize("fixture", ["t5", "umt5"])
def test_text_encoder_special_token_strings_are_tokens(fixture):
    """'</s>', '<pad>', '<unk>', '<extra_id_N>' inside a prompt become those tokens, and the text between them is
    encoded piece by piece (HF's behaviour, checked against transformers on 300+ prompts when this was written)."""
    folder = (T5_DIR if fixture == "t5" else UMT5_DIR) / "tokenizer"
    tok = Tokenizer.from_path(folder)
    conf = folder / "tokenizer_config.json"
    extra = json.loads(conf.read_text()).get("extra_ids", 0) if conf.is_file() else 0
    ids = tok.encode("a cat </s> on<pad>a mat <extra_id_0>")
    a, b, c = tok.encode("a cat "), tok.encode(" on"), tok.encode("a mat ")
    pad = tok.pad_id
    sentinel = [len(tok) - 1] if extra else tok.encode("<extra_id_0>")
    assert ids == a + [tok.eos_id] + b + [pad] + c + sentinel
    assert tok.encode("</s></s>") == [tok.eos_id, tok.eos_id]
