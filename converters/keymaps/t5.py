"""T5 v1.1 / umT5 encoder checkpoints (transformers layout, original Wan layout) -> ``models.t5`` parameter paths.

HF ``T5EncoderModel`` / ``UMT5EncoderModel`` state dicts hold the embedding twice (``shared.weight`` and the tied
``encoder.embed_tokens.weight``); ``save_pretrained`` often keeps only one. ``_EmbeddingReader`` presents either
form as one ``shared.weight`` (checking that two copies agree) so the rule table stays declarative. Full
encoder-decoder checkpoints (``T5ForConditionalGeneration``) are accepted: their ``decoder.*`` / ``lm_head.*``
tensors are ignored, as ``T5EncoderModel.from_pretrained`` does.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from converters.engine import Rule
from converters.keymaps.transforms import copy, linear
from converters.safetensors_io import CheckpointError

TRANSFORMS = {"copy": copy, "linear": linear}

HF_EMBED, HF_EMBED_TIED = "shared.weight", "encoder.embed_tokens.weight"
HF_IGNORED_PREFIXES = ("decoder.", "lm_head.")
HB = "encoder.block.{i}.layer."
WB = "blocks.{i}."


def _kernels(pairs: Iterable[tuple[str, str]]) -> tuple[Rule, ...]:
    return tuple(Rule(src, (f"layers/{dst}/kernel",), "linear", True) for src, dst in pairs)


HF_RULES: tuple[Rule, ...] = (
    Rule(HF_EMBED, ("embed",)),
    Rule(HB + "0.layer_norm.weight", ("layers/norm1/scale",), per_layer=True),
    *_kernels((f"{HB}0.SelfAttention.{x}.weight", f"attn/{x}") for x in "qkvo"),
    Rule(HB + "1.layer_norm.weight", ("layers/norm2/scale",), per_layer=True),
    *_kernels((f"{HB}1.DenseReluDense.{x}.weight", f"ffn/{x}") for x in ("wi_0", "wi_1", "wo")),
    Rule("encoder.final_layer_norm.weight", ("final_norm/scale",)),
)
HF_SHARED_POS = Rule("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", ("pos_bias",))
HF_LAYER_POS = Rule(HB + "0.SelfAttention.relative_attention_bias.weight", ("layers/pos_bias",), per_layer=True)

# Wan's ffn: fc2(fc1(x) * gelu(gate(x))) -> gate = wi_0 (GELU branch), fc1 = wi_1 (linear branch), fc2 = wo.
WAN_RULES: tuple[Rule, ...] = (
    Rule("token_embedding.weight", ("embed",)),
    Rule(WB + "norm1.weight", ("layers/norm1/scale",), per_layer=True),
    *_kernels((f"{WB}attn.{x}.weight", f"attn/{x}") for x in "qkvo"),
    Rule(WB + "norm2.weight", ("layers/norm2/scale",), per_layer=True),
    *_kernels(((WB + "ffn.gate.0.weight", "ffn/wi_0"), (WB + "ffn.fc1.weight", "ffn/wi_1"),
               (WB + "ffn.fc2.weight", "ffn/wo"))),
    Rule("norm.weight", ("final_norm/scale",)),
)
WAN_SHARED_POS = Rule("pos_embedding.embedding.weight", ("pos_bias",))
WAN_LAYER_POS = Rule(WB + "pos_embedding.embedding.weight", ("layers/pos_bias",), per_layer=True)

FORMATS = {"hf": "hf", "wan": "wan", "original": "wan"}


def rules(cfg: Any, fmt: str) -> tuple[Rule, ...]:
    """The rule table of one layout for this config (the bias table in block 0 only, or in every block)."""
    if fmt == "hf":
        return HF_RULES + ((HF_SHARED_POS,) if cfg.shared_pos else (HF_LAYER_POS,))
    return WAN_RULES + ((WAN_SHARED_POS,) if cfg.shared_pos else (WAN_LAYER_POS,))


def detect_format(keys: Iterable[str]) -> str | None:
    """'hf' (transformers names), 'wan' (original Wan/SkyReels umT5 names) or None (neither)."""
    keys = list(keys)
    if any(k in (HF_EMBED, HF_EMBED_TIED, "encoder.final_layer_norm.weight") or k.startswith("encoder.block.")
           for k in keys):
        return "hf"
    if any(k == "token_embedding.weight" or k.startswith("blocks.") for k in keys):
        return "wan"
    return None


class _EmbeddingReader:
    """A reader view with one ``shared.weight`` for either embedding name, and decoder tensors hidden."""

    def __init__(self, reader: Any):
        self._reader = reader
        keys = [k for k in reader.keys() if not k.startswith(HF_IGNORED_PREFIXES)]
        self._both = HF_EMBED in keys and HF_EMBED_TIED in keys
        self._alias = HF_EMBED_TIED if HF_EMBED_TIED in keys and HF_EMBED not in keys else None
        self._keys = sorted({HF_EMBED if k == HF_EMBED_TIED else k for k in keys})

    def keys(self) -> list[str]:
        return self._keys

    def read(self, key: str, dtype) -> np.ndarray:
        """``__getitem__`` cast while reading, when the underlying reader can (a 4 GB fp32 embedding -> 2 GB)."""
        if not hasattr(self._reader, "read"):
            return np.asarray(self[key], dtype=dtype)
        if key != HF_EMBED:
            return self._reader.read(key, dtype)
        if self._alias is not None:
            return self._reader.read(self._alias, dtype)
        self._check_tied()
        return self._reader.read(HF_EMBED, dtype)

    def _check_tied(self) -> None:
        """Both embedding names present: they must hold the same tensor (compared block of rows by block)."""
        if not self._both:
            return
        r, (a, b) = self._reader, (HF_EMBED, HF_EMBED_TIED)
        shape_a = tuple(r.shape(a)) if hasattr(r, "shape") else np.shape(r[a])
        shape_b = tuple(r.shape(b)) if hasattr(r, "shape") else np.shape(r[b])
        same = shape_a == shape_b
        if same and hasattr(r, "rows"):
            same = all(np.array_equal(r.rows(a, i, i + 4096), r.rows(b, i, i + 4096))
                       for i in range(0, shape_a[0], 4096))
        elif same:
            same = _equal_by_rows(np.asarray(r[a]), np.asarray(r[b]))
        if not same:
            raise CheckpointError(f"{HF_EMBED} and {HF_EMBED_TIED} differ; an encoder checkpoint holds one "
                                  "embedding under both names (tied), so this file is inconsistent")

    def __getitem__(self, key: str) -> np.ndarray:
        if key != HF_EMBED:
            return self._reader[key]
        if self._alias is not None:
            return self._reader[self._alias]
        a = self._reader[HF_EMBED]
        if self._both:
            b = self._reader[HF_EMBED_TIED]
            if np.shape(a) != np.shape(b) or not _equal_by_rows(np.asarray(a), np.asarray(b)):
                raise CheckpointError(f"{HF_EMBED} and {HF_EMBED_TIED} differ; an encoder checkpoint holds one "
                                      "embedding under both names (tied), so this file is inconsistent")
        return a


def _equal_by_rows(a: np.ndarray, b: np.ndarray, rows: int = 4096) -> bool:
    """Exact equality in row blocks (bit patterns, so bf16 works and NaNs compare), without a full-size temp."""
    if a.dtype != b.dtype:
        return bool(np.array_equal(a.astype(np.float32), b.astype(np.float32)))
    view = np.dtype(f"u{a.dtype.itemsize}")
    return all(np.array_equal(a[i:i + rows].view(view), b[i:i + rows].view(view)) for i in range(0, len(a), rows))


def convert_t5(reader: Any, cfg: Any, fmt: str = "hf", dtype: Any = None, sink: Any = None) -> dict:
    """A T5 v1.1 / umT5 encoder state dict -> the parameter dict of ``models.t5``.

    ``fmt``: 'hf' (transformers) or 'wan' (alias 'original'); 'auto' picks from the key names. ``dtype``: one
    dtype, or a function of the destination path (``converters.engine.convert``), or None to keep the source's.
    On a mismatch the CheckpointError lists every problem; its ``detected_format`` attribute (also named in the
    message) says which layout the keys actually are, so a caller can retry with the other ``fmt``.
    """
    from converters.engine import convert
    from models.t5 import param_shapes

    found = detect_format(reader.keys())
    if fmt == "auto":
        fmt = found or "hf"
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be 'hf', 'wan' (or 'original') or 'auto', not {fmt!r}")
    fmt = FORMATS[fmt]
    src = _EmbeddingReader(reader) if fmt == "hf" else reader
    try:
        return convert(src, rules(cfg, fmt), TRANSFORMS, cfg, param_shapes(cfg), cfg.num_layers, dtype, sink)
    except CheckpointError as e:
        if found is None or found == fmt:
            e.detected_format = found
            raise
        names = {"wan": "Wan/original umT5 names (token_embedding, blocks.N.attn.q, ...): use fmt='wan'",
                 "hf": "HF transformers names (shared, encoder.block.N.layer.M...): use fmt='hf'"}[found]
        err = CheckpointError(f"{e}\n(these are {names})")
        err.problems = getattr(e, "problems", [])
        err.detected_format = found
        raise err from e
