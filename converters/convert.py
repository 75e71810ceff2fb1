r"""Convert one upstream PyTorch checkpoint (a DiT, a text encoder or a VAE) into a Flax tree saved with orbax.

  python -m converters.convert --model=magi1 --src=PATH --dst=DIR [--model_config=JSON] [--dtype=keep|bf16|fp32]
  python -m converters.convert --model=skyreels_v2 [--format=original|diffusers] --src=PATH --dst=DIR [...]
  python -m converters.convert --model=t5|umt5 [--format=hf|original] --src=PATH --dst=DIR [...]
  python -m converters.convert --model=wan_vae [--format=original|diffusers] --src=PATH --dst=DIR [...]
  python -m converters.convert --model=magi1_vae --src=PATH --dst=DIR [...]

PATH is one ``.safetensors`` file or a folder with ``*.safetensors.index.json`` shards (the released
``4.5B_distill/inference_weight.distill`` layout, HF/diffusers ``text_encoder/`` folders). JSON is an upstream
config file (MAGI-1: a fixture's ``config.json`` or the released ``4.5B_distill_config.json``; SkyReels-V2: the
WanModel ``config.json``; T5: the HF ``config.json``, found beside the weights when omitted; the original umT5
layout's sizes are read from its tensor shapes); without it the released model's config is used. DIR receives
``params/`` (orbax) and ``model_config.json``. Pickle-based ``.pt/.pth/.bin`` files (umT5's
``models_t5_umt5-xxl-enc-bf16.pth``, ``Wan2.1_VAE.pth``, DeepFloyd's ``pytorch_model-*.bin``) are only read with
``--allow_pickle_weights_only`` (``torch.load(weights_only=True, mmap=True)``, tensor by tensor). A whole release
(DiT + text encoder + tokenizer + VAE) is converted at once by ``python -m converters.release``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from absl import app, flags, logging

_MODEL = flags.DEFINE_enum("model", "magi1", ["magi1", "skyreels_v2", "t5", "umt5", "wan_vae", "magi1_vae"],
                           "Which component the checkpoint holds (a DiT, a text encoder or a VAE).")
_FORMAT = flags.DEFINE_enum("format", None, ["original", "diffusers", "hf"],
                            "Key names of the source: the upstream repository's (original), diffusers' or "
                            "transformers' (hf). Default: the component's first layout.")
_SRC = flags.DEFINE_string("src", None, "Upstream .safetensors file or folder with an index json.")
_DST = flags.DEFINE_string("dst", None, "Output folder.")
_CONFIG = flags.DEFINE_string("model_config", None, "Upstream config JSON (default: released 4.5B-distill).")
_DTYPE = flags.DEFINE_enum("dtype", "keep", ["keep", "bf16", "fp32"],
                           "keep: on-disk dtypes; bf16: the matrices bfloat16, float32 kept where upstream computes "
                           "in fp32 (text encoder / VAE norm scales, biases, position tables; DiT embedders/head); "
                           "fp32: all.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing non-empty --dst.")
_PICKLE = flags.DEFINE_bool("allow_pickle_weights_only", False,
                            "Allow a .pt/.pth/.bin source, read with torch.load(weights_only=True).")


def fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def convert_to_dir(model: str, src: str | Path, dst: str | Path, config_path: str | None = None,
                   dtype: str = "keep", overwrite: bool = False, allow_pickle_weights_only: bool = False,
                   fmt: str | None = None) -> Path:
    """The whole conversion; raises CheckpointError / FileExistsError with readable messages."""
    from converters.components import convert_into
    from flowcache_jax import checkpoint

    with checkpoint.staged_dir(dst, overwrite) as tmp:  # tensor by tensor into a temporary folder, then renamed
        convert_into(tmp, model, src, fmt, config_path, dtype, allow_pickle_weights_only)
    return Path(dst).resolve()


def main(argv: list[str]) -> None:
    del argv
    from safetensors import SafetensorError

    from converters.safetensors_io import CheckpointError

    if not _SRC.value or not _DST.value:
        fail("--src and --dst are required")
    if Path(_DST.value).exists() and not Path(_DST.value).is_dir():
        fail(f"--dst {_DST.value} is a file; give a folder")
    try:
        out = convert_to_dir(_MODEL.value, _SRC.value, _DST.value, _CONFIG.value, _DTYPE.value, _OVERWRITE.value,
                             _PICKLE.value, _FORMAT.value)
    except (CheckpointError, ValueError, FileExistsError) as e:
        fail(str(e))
    except (SafetensorError, OSError) as e:
        fail(f"cannot read {_SRC.value} as safetensors: {e}")
    print(f"wrote {out} ({_MODEL.value}, dtype {_DTYPE.value})")


if __name__ == "__main__":
    logging.set_verbosity(logging.WARNING)
    app.run(main)
