r"""Convert an upstream PyTorch checkpoint (safetensors) into a Flax parameter tree saved with orbax.

  python -m converters.convert --model=magi1 --src=PATH --dst=DIR [--model_config=JSON] [--dtype=keep|bf16|fp32]
  python -m converters.convert --model=skyreels_v2 [--format=original|diffusers] --src=PATH --dst=DIR [...]

PATH is one ``.safetensors`` file or a folder with ``*.safetensors.index.json`` shards (the released
``4.5B_distill/inference_weight.distill`` layout). JSON is an upstream config file (MAGI-1: a fixture's
``config.json`` or the released ``4.5B_distill_config.json``; SkyReels-V2: the WanModel ``config.json``);
without it the released model's config is used. ``--format=diffusers`` reads the diffusers layout's
``SkyReelsV2Transformer3DModel`` names. DIR receives ``params/`` (orbax) and ``model_config.json``.
Pickle-based ``.pt/.bin`` files are only read with ``--allow_pickle_weights_only`` (``weights_only=True``).
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

from absl import app, flags, logging

from converters.model_config import read_model_config

_MODEL = flags.DEFINE_enum("model", "magi1", ["magi1", "skyreels_v2"], "Which model family the checkpoint holds.")
_FORMAT = flags.DEFINE_enum("format", "original", ["original", "diffusers"],
                            "Key names of the source: the upstream repository's or diffusers' (SkyReels-V2).")
_SRC = flags.DEFINE_string("src", None, "Upstream .safetensors file or folder with an index json.")
_DST = flags.DEFINE_string("dst", None, "Output folder.")
_CONFIG = flags.DEFINE_string("model_config", None, "Upstream config JSON (default: released 4.5B-distill).")
_DTYPE = flags.DEFINE_enum("dtype", "keep", ["keep", "bf16", "fp32"],
                           "keep: on-disk dtypes; bf16: transformer layers in bf16, embedders/head fp32; fp32: all.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing non-empty --dst.")
_PICKLE = flags.DEFINE_bool("allow_pickle_weights_only", False,
                            "Allow a .pt/.bin source, read with torch.load(weights_only=True).")


def fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def digests(src: Path) -> dict[str, str]:
    files = [src] if src.is_file() else sorted(src.glob("*.safetensors*"))
    out = {}
    for f in files:
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                h.update(block)
        out[f.name] = h.hexdigest()
    return out


def _convert(model: str, fmt: str, reader, model_config: dict) -> dict:
    """The model family's declarative key map applied to a reader."""
    if model == "magi1":
        from converters.keymaps.magi1 import convert_magi1
        from models.magi1 import Magi1Config

        if fmt != "original":
            raise ValueError("MAGI-1 checkpoints have one layout: use --format=original")
        return convert_magi1(reader, Magi1Config.from_upstream(model_config))
    from converters.keymaps.skyreels_v2 import convert_skyreels, convert_skyreels_diffusers
    from models.skyreels_v2 import SkyReelsConfig

    cfg = SkyReelsConfig.from_upstream(model_config)
    return (convert_skyreels_diffusers if fmt == "diffusers" else convert_skyreels)(reader, cfg)


def convert_to_dir(model: str, src: str | Path, dst: str | Path, model_config: dict, dtype: str = "keep",
                   overwrite: bool = False, allow_pickle: bool = False, fmt: str = "original") -> Path:
    """The whole conversion; raises CheckpointError / ValueError / FileExistsError with readable messages."""
    import numpy as np

    from converters.safetensors_io import SafetensorsReader, load_pytorch_weights_only
    from flowcache_jax import checkpoint

    src = Path(src)
    if src.suffix in (".pt", ".pth", ".bin") and allow_pickle:
        reader = load_pytorch_weights_only(src)
    else:
        reader = SafetensorsReader(src)
    params = _convert(model, fmt, reader, model_config)
    if dtype != "keep":
        import ml_dtypes

        f32 = lambda t: {k: (f32(v) if isinstance(v, dict) else np.asarray(v, np.float32)) for k, v in t.items()}
        params = f32(params)
        if dtype == "bf16":
            bf = lambda t: {k: (bf(v) if isinstance(v, dict) else v.astype(ml_dtypes.bfloat16)) for k, v in t.items()}
            params["layers"] = bf(params["layers"])
    meta = {"model": model, "format": fmt, "model_config": model_config, "dtype": dtype,
            "source": {"path": str(src.resolve()), "sha256": digests(src)}}
    return checkpoint.save(dst, params, meta, overwrite=overwrite)


def main(argv: list[str]) -> None:
    del argv
    from safetensors import SafetensorError

    from converters.safetensors_io import CheckpointError

    if not _SRC.value or not _DST.value:
        fail("--src and --dst are required")
    if Path(_DST.value).exists() and not Path(_DST.value).is_dir():
        fail(f"--dst {_DST.value} is a file; give a folder")
    try:
        out = convert_to_dir(_MODEL.value, _SRC.value, _DST.value, read_model_config(_CONFIG.value, _MODEL.value),
                             _DTYPE.value, _OVERWRITE.value, _PICKLE.value, _FORMAT.value)
    except (CheckpointError, ValueError, FileExistsError) as e:
        hint = ""
        if _FORMAT.value == "original" and any("unexpected key condition_embedder" in p
                                                for p in getattr(e, "problems", [])):
            hint = "\n(these are diffusers names: add --format=diffusers)"
        fail(str(e) + hint)
    except (SafetensorError, OSError) as e:
        fail(f"cannot read {_SRC.value} as safetensors: {e}")
    print(f"wrote {out} ({_MODEL.value}, dtype {_DTYPE.value})")


if __name__ == "__main__":
    logging.set_verbosity(logging.WARNING)
    app.run(main)
