r"""Convert one upstream PyTorch checkpoint (a DiT, a text encoder or a VAE) into a Flax tree saved with orbax.

  python -m converters.convert --model=magi1 --src=PATH --dst=DIR [--model_config=JSON] [--dtype=keep|bf16|fp32]
  python -m converters.convert --model=skyreels_v2 [--format=original|diffusers] --src=PATH --dst=DIR [...]
  python -m converters.convert --model=self_forcing --src=self_forcing_dmd.pt --allow_pickle_weights_only \
      [--ema=true|false] --dst=DIR [--model_config=JSON] [...]
  python -m converters.convert --model=t5|umt5 [--format=hf|original] --src=PATH --dst=DIR [...]
  python -m converters.convert --model=wan_vae [--format=original|diffusers] --src=PATH --dst=DIR [...]
  python -m converters.convert --model=magi1_vae --src=PATH --dst=DIR [...]

PATH is one ``.safetensors`` file or a folder with ``*.safetensors.index.json`` shards (the released
``4.5B_distill/inference_weight.distill`` layout, HF/diffusers ``text_encoder/`` folders). JSON is an upstream
config file (MAGI-1: a fixture's ``config.json`` or the released ``4.5B_distill_config.json``; SkyReels-V2: the
WanModel ``config.json``; Self-Forcing: the CausalWanModel kwargs, or a fixture's ``config.json``; T5: the HF
``config.json``, found beside the weights when omitted; the original umT5 layout's sizes are read from its tensor
shapes); without it the released model's config is used. DIR receives ``params/`` (orbax) and
``model_config.json``. Pickle-based ``.pt/.pth/.bin`` files (umT5's
``models_t5_umt5-xxl-enc-bf16.pth``, ``Wan2.1_VAE.pth``, DeepFloyd's ``pytorch_model-*.bin``) are only read with
``--allow_pickle_weights_only`` (``torch.load(weights_only=True, mmap=True)``, tensor by tensor). A whole release
(DiT + text encoder + tokenizer + VAE) is converted at once by ``python -m converters.release``.

Self-Forcing (and CausVid-style) checkpoints are training dicts: the generator is read from ``generator_ema``
(``--ema=false``: ``generator``), its ``model.`` / ``model._fsdp_wrapped_module.`` prefix stripped; a flat state
dict (bare CausalWanModel names, or a ``.safetensors`` of the generator) converts as it is.
"""

from __future__ import annotations

import sys
from pathlib import Path

from absl import app, flags, logging


def define_flags() -> None:
    """The CLI's flags, defined when it runs (importing ``convert_to_dir`` defines none, so it combines with
    ``converters.release`` in one process)."""
    flags.DEFINE_enum("model", "magi1", ["magi1", "skyreels_v2", "self_forcing", "t5", "umt5", "wan_vae", "magi1_vae"],
                      "Which component the checkpoint holds (a DiT, a text encoder or a VAE).")
    flags.DEFINE_enum("format", None, ["original", "diffusers", "hf"],
                      "Key names of the source: the upstream repository's (original), diffusers' or transformers' "
                      "(hf). Default: the component's first layout.")
    flags.DEFINE_string("src", None, "Upstream .safetensors file or folder with an index json.")
    flags.DEFINE_string("dst", None, "Output folder.")
    flags.DEFINE_string("model_config", None, "Upstream config JSON (default: the released model's).")
    flags.DEFINE_enum("dtype", "keep", ["keep", "bf16", "fp32"],
                      "keep: on-disk dtypes; bf16: the matrices bfloat16, float32 kept where upstream computes in "
                      "fp32 (text encoder / VAE norm scales, biases, position tables; DiT embedders/head); fp32: all.")
    flags.DEFINE_bool("overwrite", False, "Replace an existing non-empty --dst.")
    flags.DEFINE_bool("allow_pickle_weights_only", False,
                      "Allow a .pt/.pth/.bin source, read with torch.load(weights_only=True).")
    flags.DEFINE_bool("ema", True, "self_forcing: read a training checkpoint's generator_ema (falling back to "
                      "generator); false: its generator.")


def fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def convert_to_dir(model: str, src: str | Path, dst: str | Path, config_path: str | None = None,
                   dtype: str = "keep", overwrite: bool = False, allow_pickle_weights_only: bool = False,
                   fmt: str | None = None, ema: bool = True) -> Path:
    """The whole conversion; raises CheckpointError / FileExistsError with readable messages."""
    from converters.components import convert_into
    from flowcache_jax import checkpoint

    with checkpoint.staged_dir(dst, overwrite) as tmp:  # tensor by tensor into a temporary folder, then renamed
        convert_into(tmp, model, src, fmt, config_path, dtype, allow_pickle_weights_only, ema=ema)
    return Path(dst).resolve()


def main(argv: list[str]) -> None:
    del argv
    from safetensors import SafetensorError

    F = flags.FLAGS  # noqa: N806

    from converters.safetensors_io import CheckpointError

    if not F.src or not F.dst:
        fail("--src and --dst are required")
    if Path(F.dst).exists() and not Path(F.dst).is_dir():
        fail(f"--dst {F.dst} is a file; give a folder")
    try:
        out = convert_to_dir(F.model, F.src, F.dst, F.model_config, F.dtype, F.overwrite,
                             F.allow_pickle_weights_only, F.format, F.ema)
    except (CheckpointError, ValueError, FileExistsError) as e:
        fail(str(e))
    except (SafetensorError, OSError) as e:
        fail(f"cannot read {F.src} as safetensors: {e}")
    from flowcache_jax.checkpoint import load_meta

    entry = load_meta(out).get("source", {}).get("entry")  # a training checkpoint: say which generator was read
    print(f"wrote {out} ({F.model}, dtype {F.dtype}{f', from {entry}' if entry else ''})")


if __name__ == "__main__":
    define_flags()
    logging.set_verbosity(logging.WARNING)
    app.run(main)
