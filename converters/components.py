"""Every convertible component in one table: how its upstream config is found, its key map, its bf16 rule.

The single-model CLI (``converters.convert``) and the whole-release CLI (``converters.release``) both go
through ``convert_component``, so a DiT, a text encoder and a VAE are converted, validated and stored alike:
an orbax ``params/`` folder plus ``model_config.json`` holding ``{model, format, model_config, dtype, source}``.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from converters.model_config import read_json
from converters.safetensors_io import CheckpointError, open_reader


@dataclasses.dataclass(frozen=True)
class Component:
    name: str
    role: str  # "dit" | "text_encoder" | "vae"
    formats: tuple[str, ...]
    # (config path or None, reader, format) -> the upstream config dict stored with the checkpoint
    read_config: Callable[[str | None, Any, str, Path], dict]
    # (reader, config dict, format, dtype rule, sink) -> parameter tree (what was not handed to the sink)
    convert: Callable[..., dict]
    # destination path -> keep in float32 under --dtype=bf16 (norms, embedders, heads: upstream keeps them f32)
    keep_f32: Callable[[str], bool]
    detect_format: Callable[[list[str]], str | None] | None = None
    # (source path, allow pickles, ema) -> reader; default ``open_reader`` (a flat state dict, names as stored)
    open: Callable[[Path, bool, bool], Any] | None = None


def _beside(src: Path, name: str = "config.json") -> Path | None:
    """``config.json`` in the checkpoint's folder (HF / diffusers layouts keep it next to the weights)."""
    folder = src if src.is_dir() else src.parent
    return folder / name if (folder / name).is_file() else None


WEIGHT_GLOBS = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json", "*.pt", "*.pth")


def digests(src: Path) -> dict[str, str]:
    """sha256 of every weight file of a checkpoint (one file or a folder of shards)."""
    src = Path(src)
    files = [src] if src.is_file() else sorted({f for g in WEIGHT_GLOBS for f in src.glob(g)})
    out = {}
    for f in files:
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                h.update(block)
        out[f.name] = h.hexdigest()
    return out


# ----- DiTs --------------------------------------------------------------------------------------------------
def _dit_config(model: str):
    def read(path, reader, fmt, src):
        from converters.model_config import read_model_config

        return read_model_config(path, model)
    return read


def _convert_magi1(reader, config, fmt, dtype, sink=None):
    from converters.keymaps.magi1 import convert_magi1
    from models.magi1 import Magi1Config

    if fmt != "original":
        raise CheckpointError("MAGI-1 checkpoints have one layout: use --format=original")
    return convert_magi1(reader, Magi1Config.from_upstream(config), dtype, sink)


def _convert_skyreels(reader, config, fmt, dtype, sink=None):
    from converters.keymaps.skyreels_v2 import convert_skyreels, convert_skyreels_diffusers
    from models.skyreels_v2 import SkyReelsConfig

    cfg = SkyReelsConfig.from_upstream(config)
    return (convert_skyreels_diffusers if fmt == "diffusers" else convert_skyreels)(reader, cfg, dtype, sink)


def _detect_skyreels(keys: list[str]) -> str | None:
    if any(k.startswith("condition_embedder.") for k in keys):
        return "diffusers"
    if any(k.startswith("text_embedding.") for k in keys):
        return "original"
    return None


# Self-Forcing / CausVid store the generator inside a training checkpoint, wrapped by WanDiffusionWrapper
# (``model.``) and, in some derived checkpoints, by FSDP as well.
SELF_FORCING_PREFIXES = ("model._fsdp_wrapped_module.", "model.")


def _open_self_forcing(src: Path, allow_pickle_weights_only: bool, ema: bool) -> Any:
    """The generator's state dict with the bare CausalWanModel names: ``generator_ema`` (or ``generator``;
    ``--ema=false``: ``generator`` only) of a training ``.pt``, or a flat file, its wrapper prefix stripped."""
    from converters.safetensors_io import strip_prefix

    entries = ("generator_ema", "generator", None) if ema else ("generator", None)
    try:
        reader = open_reader(src, allow_pickle_weights_only, entries)
    except CheckpointError as e:
        if "state dict (top-level keys" not in str(e):
            raise
        raise CheckpointError(f"{e}; --ema=true reads generator_ema (else generator), --ema=false generator") from e
    return strip_prefix(reader, SELF_FORCING_PREFIXES)


def _self_forcing_config(path, reader, fmt, src):
    from converters.model_config import read_model_config
    from models.self_forcing import config_from_upstream

    config = read_model_config(path, "self_forcing")
    try:
        config_from_upstream(config)
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"the model config does not describe a CausalWanModel: {e}") from e
    return config


def prefix_hint(keys: list[str], expected: set[str]) -> str:
    """A line naming the prefix that unmatched keys still carry (``generator.model.``, ``module.``, ...): the
    engine lists them all as unexpected, which hides that one rename would fix every one."""
    found: dict[str, str] = {}
    for k in keys:
        if k in expected:
            continue
        for j, ch in enumerate(k):
            if ch == "." and k[j + 1:] in expected:
                found.setdefault(k[:j + 1], k)
                break
    if not found:
        return ""
    p, example = max(found.items(), key=lambda kv: sum(k.startswith(kv[0]) for k in keys))
    return (f"\n(the keys carry the prefix {p!r}, e.g. {example}; only "
            f"{' / '.join(repr(x) for x in SELF_FORCING_PREFIXES)} are stripped: save the state dict without it)")


def _convert_self_forcing(reader, config, fmt, dtype, sink=None):
    from converters.keymaps.skyreels_v2 import RULES, convert_skyreels
    from models.self_forcing import config_from_upstream

    if fmt != "original":
        raise CheckpointError("Self-Forcing checkpoints have one layout: use --format=original")
    cfg = config_from_upstream(config)  # inject_sample_info=False: the Wan map without the fps rules
    try:
        return convert_skyreels(reader, cfg, dtype, sink)
    except CheckpointError as e:
        keys = reader.keys()
        expected = {r.src.format(i=i) for r in RULES for i in (range(cfg.num_layers) if r.per_layer else [0])}
        hint = prefix_hint(keys, expected)
        if any(k.startswith("fps_") for k in keys):
            hint += "\n(fps_embedding keys: a SkyReels-V2-DF checkpoint; use --model=skyreels_v2)"
        if not hint:
            raise
        err = CheckpointError(str(e) + hint)
        err.problems = getattr(e, "problems", [])
        raise err from e


def _dit_keep_f32(path: str) -> bool:
    from models.layers import dit_half_precision_leaf

    return not dit_half_precision_leaf(path)


# ----- text encoders -------------------------------------------------------------------------------------------
def _t5_config(kind: str):
    def read(path, reader, fmt, src):
        from models.t5 import T5Config, config_from_wan_shapes

        if path is not None:
            config = read_json(path, "--model_config")
        elif fmt == "original":
            config = config_from_wan_shapes({k: _shape(reader, k) for k in reader.keys()})
        elif _beside(src) is not None:
            config = read_json(_beside(src), "config.json")
        else:
            raise CheckpointError(f"no config.json beside {src}: pass the encoder's HF config with --model_config")
        try:
            T5Config.from_hf(config)
        except (KeyError, ValueError, TypeError) as e:
            raise CheckpointError(f"the text encoder config does not describe a T5 encoder: {e}") from e
        if (config.get("model_type") == "umt5") != (kind == "umt5"):
            raise CheckpointError(f"the config says model_type={config.get('model_type')!r}; use --model="
                                  f"{'umt5' if config.get('model_type') == 'umt5' else 't5'}")
        return config
    return read


def _convert_t5(reader, config, fmt, dtype, sink=None):
    from converters.keymaps.t5 import convert_t5
    from models.t5 import T5Config

    return convert_t5(reader, T5Config.from_hf(config), "wan" if fmt == "original" else "hf", dtype, sink)


def _detect_t5(keys: list[str]) -> str | None:
    from converters.keymaps.t5 import detect_format

    f = detect_format(keys)
    return {"wan": "original", "hf": "hf"}.get(f, f)


# ----- VAEs ----------------------------------------------------------------------------------------------------
def _wan_vae_config(path, reader, fmt, src):
    from models.wan_vae import WAN21_VAE, WanVAEConfig

    if path is not None:
        full = read_json(path, "--model_config")
        # a fixture-style file holding both kwarg sets: take the one of this layout
        d = full.get("diffusers_AutoencoderKLWan_kwargs" if fmt == "diffusers" else "wan_WanVAE_kwargs", full)
        if fmt == "original" and "latents_mean" not in d:
            for a, b in (("tiny_latent_mean", "latents_mean"), ("tiny_latent_std", "latents_std")):
                if a in full:
                    d = dict(d, **{b: full[a]})
    elif fmt == "diffusers" and _beside(src) is not None:
        d = read_json(_beside(src), "config.json")
    else:
        d = dict(WAN21_VAE)
        if "encoder.conv1.weight" in reader.keys():
            d["dim"] = int(_shape(reader, "encoder.conv1.weight")[0])
    d = {k: v for k, v in d.items() if not k.startswith("_")}
    try:
        WanVAEConfig.from_kwargs(d)
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"the VAE config does not describe a Wan VAE: {e}") from e
    return d


def _shape(reader, key: str) -> tuple[int, ...]:
    return tuple(reader.shape(key)) if hasattr(reader, "shape") else tuple(np.shape(reader[key]))


def _convert_wan_vae(reader, config, fmt, dtype, sink=None):
    from converters.keymaps.wan_vae import convert_wan_vae
    from models.wan_vae import WanVAEConfig

    return convert_wan_vae(reader, WanVAEConfig.from_kwargs(config), fmt, dtype, sink)


def _detect_wan_vae(keys: list[str]) -> str | None:
    from converters.keymaps.wan_vae import detect_format

    return detect_format(keys)


def _magi1_vae_config(path, reader, fmt, src):
    from models.magi1_vae import MAGI1_VAE_DDCONFIG, Magi1VAEConfig

    if path is not None:
        d = read_json(path, "--model_config")
    elif _beside(src) is not None:
        d = read_json(_beside(src), "config.json")
    else:
        d = {"ddconfig": dict(MAGI1_VAE_DDCONFIG)}
    d = {"ddconfig": d.get("ddconfig", d), **{k: d[k] for k in ("scale_factor", "tiling") if k in d}}
    try:
        Magi1VAEConfig.from_config(d)
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"the VAE config does not describe a MAGI-1 ViT VAE: {e}") from e
    return d


def _convert_magi1_vae(reader, config, fmt, dtype, sink=None):
    from converters.keymaps.magi1_vae import convert_magi1_vae
    from models.magi1_vae import Magi1VAEConfig

    if fmt != "original":
        raise CheckpointError("the MAGI-1 VAE has one layout: use --format=original")
    return convert_magi1_vae(reader, Magi1VAEConfig.from_config(config), dtype, sink)


def _model_rule(module: str) -> Callable[[str], bool]:
    """Keep in float32 what the model keeps in float32 under its ``param_dtype``: everything but the leaves its
    ``half_precision_leaf`` names (T5: kernels and the embedding; VAEs: kernels), so a bf16 conversion stores
    exactly what ``cast_params(param_dtype="bfloat16")`` would hold (norm scales, biases, position tables f32)."""
    def keep(path: str) -> bool:
        import importlib

        return not importlib.import_module(module).half_precision_leaf(path)
    return keep


COMPONENTS: dict[str, Component] = {c.name: c for c in (
    Component("magi1", "dit", ("original",), _dit_config("magi1"), _convert_magi1, _dit_keep_f32),
    Component("skyreels_v2", "dit", ("original", "diffusers"), _dit_config("skyreels_v2"), _convert_skyreels,
              _dit_keep_f32, _detect_skyreels),
    Component("self_forcing", "dit", ("original",), _self_forcing_config, _convert_self_forcing, _dit_keep_f32,
              open=_open_self_forcing),
    Component("t5", "text_encoder", ("hf",), _t5_config("t5"), _convert_t5, _model_rule("models.t5"), _detect_t5),
    Component("umt5", "text_encoder", ("original", "hf"), _t5_config("umt5"), _convert_t5, _model_rule("models.t5"),
              _detect_t5),
    Component("wan_vae", "vae", ("original", "diffusers"), _wan_vae_config, _convert_wan_vae,
              _model_rule("models.wan_vae"), _detect_wan_vae),
    Component("magi1_vae", "vae", ("original",), _magi1_vae_config, _convert_magi1_vae,
              _model_rule("models.magi1_vae")),
)}


def dtype_rule(comp: Component, dtype: str) -> Callable[[str], Any] | None:
    """keep: the source dtypes; fp32: all float32; bf16: bfloat16 except what stays float32 (``keep_f32``: DiTs
    everything outside ``layers/`` (embedders, head, final norm: MAGI-1 runs them in float32); text encoders and
    VAEs their norm scales, biases and position tables, as the models' ``cast_params`` keep them)."""
    if dtype == "keep":
        return None
    if dtype == "fp32":
        return lambda path: np.float32
    import ml_dtypes

    return lambda path: np.float32 if comp.keep_f32(path) else ml_dtypes.bfloat16


def format_hint(comp: Component, fmt: str, keys: list[str], flag: str = "--format") -> str:
    """A line pointing at the right ``--format`` when the keys belong to the other layout."""
    if comp.detect_format is None:
        return ""
    found = comp.detect_format(keys)
    if found is not None and found != fmt and found in comp.formats:
        return f"\n(these are {found} names: add {flag}={found})"
    return ""


def convert_component(name: str, src: str | Path, fmt: str | None = None, config_path: str | None = None,
                      dtype: str = "keep", allow_pickle_weights_only: bool = False, format_flag: str = "--format",
                      sink: Callable[[str, np.ndarray], None] | None = None, ema: bool = True) -> tuple[dict, dict]:
    """(params, meta) of one component; raises CheckpointError with every problem and a --format hint.

    With ``sink`` every converted tensor is handed over as it is made; ``params`` then holds only what the key
    map added after the tensors (hand it over too, e.g. ``LeafWriter.put_tree``). ``ema``: a training
    checkpoint's EMA generator rather than the raw one (Self-Forcing); the source records which was read."""
    if name not in COMPONENTS:
        raise CheckpointError(f"unknown model {name!r}; one of {', '.join(COMPONENTS)}")
    comp = COMPONENTS[name]
    fmt = fmt or comp.formats[0]
    if fmt not in comp.formats:
        raise CheckpointError(f"{format_flag}={fmt} does not exist for {name}; use one of {', '.join(comp.formats)}")
    src = Path(src)
    opener = comp.open or (lambda path, allow, _ema: open_reader(path, allow))
    reader = opener(src, allow_pickle_weights_only, ema)
    keys = reader.keys()
    try:
        config = comp.read_config(config_path, reader, fmt, src)
        params = comp.convert(reader, config, fmt, dtype_rule(comp, dtype), sink)
    except CheckpointError as e:
        hint = format_hint(comp, fmt, keys, format_flag)
        if hint:
            # a key map's own "(these are ...)" line names its function's argument; the CLI flag replaces it
            msg = "\n".join(ln for ln in str(e).splitlines() if not ln.startswith("(these are"))
            err = CheckpointError(msg + hint)
            err.problems = getattr(e, "problems", [])
            raise err from e
        raise
    except ValueError as e:
        raise CheckpointError(f"{name}: {e}{format_hint(comp, fmt, keys, format_flag)}") from e
    meta = {"model": name, "role": comp.role, "format": fmt, "model_config": config, "dtype": dtype,
            "source": {"path": str(src.resolve()), "sha256": digests(src)}}
    for what in ("entry", "prefix"):  # which nested state dict was read, which wrapper prefix was stripped
        if getattr(reader, what, None):
            meta["source"][what] = getattr(reader, what)
    return params, meta


def convert_into(folder: str | Path, name: str, src: str | Path, fmt: str | None = None,
                 config_path: str | None = None, dtype: str = "keep", allow_pickle_weights_only: bool = False,
                 format_flag: str = "--format", ema: bool = True) -> dict:
    """Convert one component straight into ``folder`` (``params/`` + ``model_config.json``), tensor by tensor
    through ``checkpoint.LeafWriter``: the host never holds the model. Returns the metadata."""
    from flowcache_jax.checkpoint import LeafWriter

    writer = LeafWriter(folder)
    params, meta = convert_component(name, src, fmt, config_path, dtype, allow_pickle_weights_only, format_flag,
                                     writer.put, ema)
    writer.put_tree(params)
    writer.close(meta)
    return meta
