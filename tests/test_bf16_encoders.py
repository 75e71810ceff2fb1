"""bf16 T5 v1.1 (MAGI-1) and umT5 (Wan2.1 / SkyReels-V2) encoders vs float32 runs and the golden fixtures.

The precision rules under test (``models/t5.py``): ``dtype`` = the operands of every matmul; RMSNorms, the
position bias + mask + softmax, the GELU gate and the residual stream in float32; ``param_dtype`` = storage of the
kernels and the embedding table (norm scales and bias tables stay float32).

Tolerance: relative L2 error <= 2e-2 over all positions. bf16 keeps 8 significant bits, so one rounding errs by
at most 2^-8 ~ 3.9e-3 (rms ~2.3e-3); a two-layer encoder rounds ~20 times along a path (operands of 7 matmuls
per layer, the embedding, the attention probabilities), and independent errors add in quadrature to ~1e-2
(measured 0.7e-2 to 1.0e-2, see the README), so 2e-2 leaves 2x headroom for other fixtures.
Every size comes from the fixture files (FLOWCACHE_T5_FIXTURE / FLOWCACHE_UMT5_FIXTURE point at others).
"""

import collections
import dataclasses
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jcore

from converters.keymaps.t5 import convert_t5
from converters.safetensors_io import SafetensorsReader
from models import t5
from tests.conftest import ROOT

FIXTURES = {"t5": (Path(os.environ.get("FLOWCACHE_T5_FIXTURE", ROOT.parent / "shared" / "fixtures" / "t5_tiny")),
                   "weights.safetensors"),
            "umt5": (Path(os.environ.get("FLOWCACHE_UMT5_FIXTURE", ROOT.parent / "shared" / "fixtures" / "umt5_tiny")),
                     "weights_hf.safetensors")}
BF16_REL = 2e-2  # relative L2, bf16 vs float32 (derivation in the module docstring)
F32_REL = 1e-5  # our float32 run vs the golden (upstream float32) output
BF16 = dict(dtype="bfloat16", param_dtype="bfloat16")

# one jitted function for every test (and for test_bf16_converters): configs are static, so each compiles once
encode_fn = jax.jit(t5.encode, static_argnums=(0, 4))


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def hf_config(folder: Path) -> dict:
    return {k: v for k, v in json.loads((folder / "config.json").read_text()).items() if not k.startswith("_")}


def load_fixture(kind: str) -> dict:
    folder, weights = FIXTURES[kind]
    cases = dict(np.load(folder / "cases.npz"))
    cfg = t5.T5Config.from_hf(hf_config(folder))
    params = jax.tree.map(jnp.asarray, convert_t5(SafetensorsReader(folder / weights), cfg, "hf"))
    ids, mask = cases["input_ids"].astype(np.int32), cases["attention_mask"].astype(np.int32)
    return dict(cases=cases, cfg=cfg, params=params, ids=ids, mask=mask,
                f32=np.asarray(encode_fn(cfg, params, ids, mask, False)))


@pytest.fixture(scope="module", params=sorted(FIXTURES))
def fx(request):
    if not FIXTURES[request.param][0].is_dir():
        pytest.skip(f"fixture {FIXTURES[request.param][0]} not found")
    return dict(load_fixture(request.param), kind=request.param)


def walk(jaxpr, seen: dict) -> dict:
    """primitive name -> set of input dtype tuples, through every sub-jaxpr (scan bodies, custom_jvp, pjit)."""
    for e in jaxpr.eqns:
        seen[e.primitive.name].add(tuple(str(v.aval.dtype) for v in e.invars if hasattr(v.aval, "dtype")))
        for p in e.params.values():
            for sub in p if isinstance(p, tuple | list) else [p]:
                if isinstance(sub, jcore.ClosedJaxpr):
                    walk(sub.jaxpr, seen)
                elif isinstance(sub, jcore.Jaxpr):
                    walk(sub, seen)
    return seen


F32_PRIMS = ("exp", "log", "rsqrt", "sqrt", "tanh", "erf", "logistic")  # norms, softmax, activations


def check_precision(jaxpr, dtype: str) -> dict:
    """Every matmul / conv operand in ``dtype``; every transcendental (norms, softmax, activations) in float32."""
    seen = walk(jaxpr.jaxpr, collections.defaultdict(set))
    mm = seen.get("dot_general", set()) | seen.get("conv_general_dilated", set())
    assert mm and mm == {(dtype, dtype)}, mm
    for prim in F32_PRIMS:
        assert seen.get(prim, set()) <= {("float32",)}, (prim, seen[prim])
    return seen


def test_bf16_encoder_close_to_f32_and_golden(fx):
    """bf16 compute + bf16 weights vs our float32 run and vs upstream's float32 output, all positions."""
    c, ref = fx["cases"], fx["cases"]["last_hidden_state"]
    assert rel(fx["f32"], ref) < F32_REL
    cfg = dataclasses.replace(fx["cfg"], **BF16)
    out = np.asarray(encode_fn(cfg, fx["params"], fx["ids"], fx["mask"], False))
    assert out.dtype == np.float32 and out.shape == ref.shape and np.all(np.isfinite(out))
    e_f32, e_gold = rel(out, fx["f32"]), rel(out, ref)
    print(f"\n{fx['kind']} bf16: rel L2 vs f32 {e_f32:.2e}, vs golden {e_gold:.2e}, "
          f"max|d| {np.abs(out - fx['f32']).max():.3f} (max|x| {np.abs(ref).max():.2f})")
    assert e_f32 < BF16_REL and e_gold < BF16_REL
    # the pipelines' views stay float32 / exact zeros on pads
    ctx = np.asarray(t5.wan_context(out, c["attention_mask"]))
    assert ctx.dtype == np.float32 and np.all(ctx[c["attention_mask"] == 0] == 0)


def test_bf16_encoder_param_dtype_rule(fx):
    """cast_params: kernels and the embedding in param_dtype, norm scales and bias tables float32; "" = as is."""
    cfg = dataclasses.replace(fx["cfg"], **BF16)
    cast = t5.cast_params(cfg, fx["params"])
    for path, leaf in jax.tree_util.tree_leaves_with_path(cast):
        name = "/".join(str(k.key) for k in path)
        want = "bfloat16" if name.rsplit("/", 1)[-1] in ("kernel", "embed") else "float32"
        assert str(leaf.dtype) == want and t5.half_precision_leaf(name) == (want == "bfloat16"), name
    assert t5.cast_params(fx["cfg"], fx["params"]) is fx["params"]  # param_dtype "" keeps the given arrays
    mod = t5.T5Encoder(cfg, fx["params"])  # the module holds the cast weights
    assert jax.tree.map(lambda a: a.dtype, mod.param_dict()) == jax.tree.map(lambda a: a.dtype, cast)
    assert t5.T5Config.from_hf(hf_config(FIXTURES[fx["kind"]][0]), **BF16) == cfg
    for bad in (dict(dtype="float16"), dict(param_dtype="bf16")):
        with pytest.raises(ValueError, match="dtype"):
            dataclasses.replace(fx["cfg"], **bad)


def test_bf16_encoder_matmuls_bf16_norms_softmax_f32(fx):
    """The traced program: every matmul operand is bf16, every exp / rsqrt / tanh (softmax, RMSNorm, GELU) float32."""
    cfg = dataclasses.replace(fx["cfg"], **BF16)
    spec = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), fx["params"])
    ids = jax.ShapeDtypeStruct(fx["ids"].shape, jnp.int32)
    seen = check_precision(jax.make_jaxpr(lambda p, i, m: t5.encode(cfg, p, i, m))(spec, ids, ids), "bfloat16")
    assert {"exp", "rsqrt", "tanh"} <= set(seen)
    check_precision(jax.make_jaxpr(lambda p, i, m: t5.encode(fx["cfg"], p, i, m))(spec, ids, ids), "float32")
