r"""Convert a whole release (DiT + text encoder + tokenizer + VAE) into one checkpoint folder that run.py takes.

  python -m converters.release --model=magi1 --dst=ckpt/magi1_release \
      --dit=MAGI-1/ckpt/magi/4.5B_distill/inference_weight.distill \
      --text_encoder=t5-v1_1-xxl --tokenizer=t5-v1_1-xxl --allow_pickle_weights_only \
      --vae=MAGI-1/ckpt/vae --special_tokens=MAGI-1/example/assets/special_tokens.npz --dtype=bf16
  python -m converters.release --model=skyreels_v2 --dst=ckpt/skyreels_release \
      --dit=SkyReels-V2-DF-1.3B-540P --text_encoder=SkyReels-V2-DF-1.3B-540P/models_t5_umt5-xxl-enc-bf16.pth \
      --text_encoder_format=original --tokenizer=SkyReels-V2-DF-1.3B-540P/google/umt5-xxl \
      --vae=SkyReels-V2-DF-1.3B-540P/Wan2.1_VAE.pth --allow_pickle_weights_only --dtype=bf16
  python -m converters.release --model=self_forcing --dst=ckpt/self_forcing_release \
      --dit=Self-Forcing/checkpoints/self_forcing_dmd.pt [--ema=false] \
      --text_encoder=Wan2.1-T2V-1.3B/models_t5_umt5-xxl-enc-bf16.pth --text_encoder_format=original \
      --tokenizer=Wan2.1-T2V-1.3B/google/umt5-xxl --vae=Wan2.1-T2V-1.3B/Wan2.1_VAE.pth \
      --allow_pickle_weights_only --dtype=bf16

The folder holds the DiT where ``converters.convert`` puts it (``params/``, ``model_config.json``) and, beside
it, ``text_encoder/`` and ``vae/`` (each ``params/`` + ``model_config.json``), ``tokenizer/`` (the
checkpoint's own tokenizer files, copied) and, for MAGI-1, ``special_tokens.npz``; ``release.json`` lists what
is in it. Parts left out are left out (the run says so). Components are converted one after the other, each
written tensor by tensor as it is converted (``checkpoint.LeafWriter``): the host never holds a whole model.
Everything is built in a temporary folder beside ``--dst`` and renamed at the end: nothing partial remains.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from absl import app, flags, logging

FAMILIES = {"magi1": {"text_encoder": "t5", "vae": "magi1_vae"},
            "skyreels_v2": {"text_encoder": "umt5", "vae": "wan_vae"},
            "self_forcing": {"text_encoder": "umt5", "vae": "wan_vae"}}  # Wan2.1-T2V-1.3B's encoder and VAE
TOKENIZER_FILES = ("spiece.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json")

_MODEL = flags.DEFINE_enum("model", "magi1", list(FAMILIES), "The release's model family.")
_DST = flags.DEFINE_string("dst", None, "Output folder (the checkpoint run.py takes as --config.checkpoint).")
_DIT = flags.DEFINE_string("dit", None, "The DiT weights (.safetensors file or folder with an index).")
_DIT_CONFIG = flags.DEFINE_string("dit_config", None, "The DiT's upstream config JSON (default: the released one).")
_DIT_FORMAT = flags.DEFINE_enum("dit_format", None, ["original", "diffusers"], "Key names of the DiT.")
_TE = flags.DEFINE_string("text_encoder", None, "The text encoder weights (file or folder).")
_TE_CONFIG = flags.DEFINE_string("text_encoder_config", None, "Its HF config.json (default: beside the weights).")
_TE_FORMAT = flags.DEFINE_enum("text_encoder_format", None, ["hf", "original"],
                               "hf: transformers names; original: Wan's umT5 .pth names.")
_TOK = flags.DEFINE_string("tokenizer", None, "Tokenizer folder (spiece.model and/or tokenizer.json) or file.")
_VAE = flags.DEFINE_string("vae", None, "The VAE weights (file or folder).")
_VAE_CONFIG = flags.DEFINE_string("vae_config", None, "Its config JSON (default: beside the weights / released).")
_VAE_FORMAT = flags.DEFINE_enum("vae_format", None, ["original", "diffusers"], "Key names of the VAE.")
_SPECIAL = flags.DEFINE_string("special_tokens", None, "MAGI-1's special_tokens.npz ('other_tokens' [100, C]).")
_DTYPE = flags.DEFINE_enum("dtype", "keep", ["keep", "bf16", "fp32"], "As converters.convert --dtype.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing non-empty --dst.")
_PICKLE = flags.DEFINE_bool("allow_pickle_weights_only", False,
                            "Allow .pt/.pth/.bin sources, read with torch.load(weights_only=True).")
_EMA = flags.DEFINE_bool("ema", True, "self_forcing: the DiT from generator_ema (else generator); false: generator.")


def copy_tokenizer(src: str | Path, dst: Path) -> list[str]:
    """Copy the tokenizer files of a folder (or one ``spiece.model`` / ``tokenizer.json``) and check they load."""
    from converters.safetensors_io import CheckpointError

    src = Path(src)
    if src.is_file():
        files = [src] if src.name == "tokenizer.json" or src.suffix == ".model" else []
    elif src.is_dir():
        files = [src / f for f in TOKENIZER_FILES if (src / f).is_file()]
    else:
        raise CheckpointError(f"--tokenizer {src} does not exist")
    if not any(f.name == "tokenizer.json" or f.suffix == ".model" for f in files):
        raise CheckpointError(f"--tokenizer {src} has no spiece.model or tokenizer.json")
    dst.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copyfile(f, dst / ("spiece.model" if f.suffix == ".model" else f.name))
    from models.tokenizer import Tokenizer

    try:
        Tokenizer.from_path(dst)
    except (OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"--tokenizer {src} does not load: {e}") from e
    return sorted(p.name for p in dst.iterdir())


def check_special_tokens(path: str | Path, caption_channels: int) -> None:
    import numpy as np

    from converters.safetensors_io import CheckpointError

    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"--special_tokens {p} does not exist")
    try:
        with np.load(p, allow_pickle=False) as z:
            tok = z["other_tokens"] if "other_tokens" in z.files else None
    except (ValueError, OSError) as e:
        raise CheckpointError(f"--special_tokens {p} is not a plain .npz ({e})") from e
    if tok is None or tok.ndim != 2 or tok.shape[1] != caption_channels or tok.shape[0] < 15:
        raise CheckpointError(f"--special_tokens {p} needs 'other_tokens' [>= 15, {caption_channels}] "
                              f"(the DiT's caption width)")


def convert_release(model: str, dst: str | Path, dit: str, *, dit_config: str | None = None,
                    dit_format: str | None = None, text_encoder: str | None = None,
                    text_encoder_config: str | None = None, text_encoder_format: str | None = None,
                    tokenizer: str | None = None, vae: str | None = None, vae_config: str | None = None,
                    vae_format: str | None = None, special_tokens: str | None = None, dtype: str = "keep",
                    overwrite: bool = False, allow_pickle_weights_only: bool = False, ema: bool = True,
                    log: Callable[[str], Any] = print) -> Path:
    """Convert every given part into ``dst`` (built in a temporary folder, renamed at the end)."""
    from converters.components import convert_into
    from converters.safetensors_io import CheckpointError
    from flowcache_jax import checkpoint

    if (text_encoder is None) != (tokenizer is None):
        raise CheckpointError("give --text_encoder and --tokenizer together (the encoder needs its tokenizer)")
    fam = FAMILIES[model]
    parts: dict = {}
    with checkpoint.staged_dir(dst, overwrite) as tmp:
        meta = convert_into(tmp, model, dit, dit_format, dit_config, dtype, allow_pickle_weights_only, "--dit_format",
                            ema)
        caption_channels = meta["model_config"].get("caption_channels", meta["model_config"].get("text_dim", 4096))
        parts["dit"] = {"model": model, "source": meta["source"]}
        entry = meta["source"].get("entry")
        log(f"dit: {model} from {dit}{f' ({entry})' if entry else ''}")
        for role, src, cfg_path, fmt in (("text_encoder", text_encoder, text_encoder_config, text_encoder_format),
                                         ("vae", vae, vae_config, vae_format)):
            if src is None:
                continue
            meta = convert_into(tmp / role, fam[role], src, fmt, cfg_path, dtype, allow_pickle_weights_only,
                                f"--{role}_format")
            parts[role] = {"model": fam[role], "format": meta["format"], "source": meta["source"]}
            log(f"{role}: {fam[role]} ({meta['format']}) from {src}")
            if role == "text_encoder":
                width = meta["model_config"].get("d_model")
                if width != caption_channels:
                    raise CheckpointError(f"the text encoder's width {width} != the DiT's caption width "
                                          f"{caption_channels}: these parts do not belong together")
        if tokenizer is not None:
            parts["tokenizer"] = {"files": copy_tokenizer(tokenizer, tmp / "tokenizer"), "source": str(tokenizer)}
            log(f"tokenizer: {', '.join(parts['tokenizer']['files'])}")
        if special_tokens is not None:
            if model != "magi1":
                raise CheckpointError(f"--special_tokens is MAGI-1's (HQ / duration tokens); {model} has none")
            check_special_tokens(special_tokens, caption_channels)
            shutil.copyfile(special_tokens, tmp / "special_tokens.npz")
            parts["special_tokens"] = {"source": str(special_tokens)}
        (tmp / "release.json").write_text(json.dumps({"model": model, "dtype": dtype, "parts": parts}, indent=1)
                                          + "\n")
    return Path(dst).resolve()


def main(argv: list[str]) -> None:
    del argv
    from safetensors import SafetensorError

    from converters.safetensors_io import CheckpointError

    def fail(msg: str) -> None:
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)

    if not _DST.value or not _DIT.value:
        fail("--dst and --dit are required (add --text_encoder/--tokenizer/--vae for the prompt-to-video parts)")
    try:
        out = convert_release(
            _MODEL.value, _DST.value, _DIT.value, dit_config=_DIT_CONFIG.value, dit_format=_DIT_FORMAT.value,
            text_encoder=_TE.value, text_encoder_config=_TE_CONFIG.value, text_encoder_format=_TE_FORMAT.value,
            tokenizer=_TOK.value, vae=_VAE.value, vae_config=_VAE_CONFIG.value, vae_format=_VAE_FORMAT.value,
            special_tokens=_SPECIAL.value, dtype=_DTYPE.value, overwrite=_OVERWRITE.value,
            allow_pickle_weights_only=_PICKLE.value, ema=_EMA.value)
    except (CheckpointError, ValueError, FileExistsError) as e:
        fail(str(e))
    except (SafetensorError, OSError) as e:
        fail(f"cannot read a checkpoint file: {e}")
    print(f"wrote {out} ({_MODEL.value} release, dtype {_DTYPE.value})")


if __name__ == "__main__":
    logging.set_verbosity(logging.WARNING)
    app.run(main)
