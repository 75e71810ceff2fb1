"""Prompt -> tokens -> text encoder (cached on disk) and latent chunk -> VAE -> uint8 frames, for a release folder.

A release folder (``python -m converters.release``) holds the DiT and, beside it, ``text_encoder/``,
``tokenizer/``, ``vae/`` and (MAGI-1) ``special_tokens.npz``. Every part is optional: a run without a text
encoder uses the null caption / zero contexts, a run without a VAE writes latents and a latent preview, and
``Release.missing`` says what was left out and how to add it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from experiments import loaded
from experiments.errors import ConfigError

FAMILY = {"magi1": {"text_encoder": "t5", "vae": "magi1_vae", "clean": "magi"},
          "skyreels_v2": {"text_encoder": "umt5", "vae": "wan_vae", "clean": "wan"},
          "self_forcing": {"text_encoder": "umt5", "vae": "wan_vae", "clean": "wan"}}


def release_hint(model: str) -> str:
    te = ("--text_encoder=<t5-v1_1-xxl folder> --tokenizer=<t5-v1_1-xxl folder> --vae=<ckpt/vae> "
          "--special_tokens=<example/assets/special_tokens.npz> --allow_pickle_weights_only" if model == "magi1" else
          "--text_encoder=<models_t5_umt5-xxl-enc-bf16.pth> --text_encoder_format=original "
          "--tokenizer=<google/umt5-xxl> --vae=<Wan2.1_VAE.pth> --allow_pickle_weights_only")
    return f"python -m converters.release --model={model} --dst=<DIR> --dit=<DiT weights> {te}"


@dataclasses.dataclass(frozen=True)
class Release:
    """What a converted checkpoint folder holds beside the DiT."""

    root: Path
    model: str

    def _part(self, name: str) -> Path | None:
        p = self.root / name
        return p if (p / "model_config.json").is_file() and (p / "params").is_dir() else None

    @property
    def text_encoder(self) -> Path | None:
        return self._part("text_encoder")

    @property
    def vae(self) -> Path | None:
        return self._part("vae")

    @property
    def tokenizer(self) -> Path | None:
        p = self.root / "tokenizer"
        return p if (p / "spiece.model").is_file() or (p / "tokenizer.json").is_file() else None

    @property
    def special_tokens(self) -> Path | None:
        p = self.root / "special_tokens.npz"
        return p if p.is_file() else None

    def require_text(self) -> None:
        missing = [n for n, p in (("text_encoder/", self.text_encoder), ("tokenizer/", self.tokenizer)) if p is None]
        if missing:
            raise ConfigError(f"config.prompt needs a text encoder, but {self.root} has no {' and no '.join(missing)}"
                              f": convert the release with {release_hint(self.model)}")

    def notes(self) -> dict:
        out = {}
        if self.vae is None:
            out["vae"] = f"no vae/ in the checkpoint: latents and a latent preview only ({release_hint(self.model)})"
        if self.model == "magi1" and self.text_encoder is not None and self.special_tokens is None:
            out["special_tokens"] = "no special_tokens.npz: captions without MAGI-1's HQ / duration tokens"
        return out


def open_release(path: str | Path, model: str) -> Release:
    return Release(Path(path), model)


def _digest(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()


_DTYPES = {"": "", "bf16": "bfloat16", "bfloat16": "bfloat16", "fp32": "float32", "f32": "float32",
           "float32": "float32"}


def _dtype_name(value: str | None, what: str) -> str:
    """A run config's ``compute.dtype`` / ``compute.param_dtype`` as a model config value ("" = the checkpoint's)."""
    key = str(value or "").strip().lower()
    if key not in _DTYPES:
        raise ConfigError(f"compute.{what}={value!r}: use float32 / bfloat16 (or fp32 / bf16), or '' for the "
                          "checkpoint's dtype")
    return _DTYPES[key]


def requested_precision(compute: Any = None) -> tuple[str, str]:
    """(dtype, param_dtype) asked for by a run config's ``compute`` section (None or "": the checkpoint's)."""
    get = compute.get if compute is not None else (lambda k, d=None: d)
    return _dtype_name(get("dtype", ""), "dtype"), _dtype_name(get("param_dtype", ""), "param_dtype")


def part_precision(params: Any, meta: dict, compute: Any = None) -> dict[str, str]:
    """``dtype`` / ``param_dtype`` of a text encoder or VAE config: the run config's ``compute`` where set; else
    the checkpoint's: bfloat16 compute for a bf16 conversion or bf16-stored matrices, the weights kept as stored."""
    dtype, param_dtype = requested_precision(compute)
    if not dtype:
        stored = {str(x.dtype) for x in jax.tree.leaves(params) if getattr(x, "ndim", 0) >= 2}
        dtype = "bfloat16" if meta.get("dtype") == "bf16" or "bfloat16" in stored else "float32"
    return {"dtype": dtype, "param_dtype": param_dtype}


def default_cache_dir() -> Path:
    return Path(os.environ.get("FLOWCACHE_CACHE_DIR", Path.home() / ".cache" / "flowcache_jax")) / "prompts"


@dataclasses.dataclass
class PromptEmbedding:
    hidden: np.ndarray  # float32 [L, D]: the encoder output at every position (pads hold real values)
    mask: np.ndarray  # int32 [L]: 1 for real tokens (incl. EOS)
    ids: np.ndarray  # int32 [L]
    cleaned: str
    truncated: bool
    cached: bool  # read from the on-disk cache (no encoder run)
    seconds: float  # tokenise + encode (or cache read) time

    @property
    def tokens(self) -> int:
        return int(self.mask.sum())


class PromptEncoder:
    """Clean, tokenise and encode prompts with a release's text encoder, caching each result on disk.

    The cache key is the prompt, the cleaning rule, the length and the digests of the encoder's metadata (which
    holds its source weights' sha256 and dtype) and of the tokenizer files, so a rerun or a sweep never runs the
    encoder again, and a different checkpoint never reads another's embeddings. The encoder is loaded only on a
    cache miss. ``compute`` (a run config's ``compute`` section: ``dtype`` / ``param_dtype``, "" = the
    checkpoint's) sets the encoder's precision; a non-default one is part of the cache key.
    """

    def __init__(self, release: Release, max_length: int, cache_dir: str | Path | None = None, compute: Any = None):
        release.require_text()
        self.release, self.max_length = release, int(max_length)
        self.clean = FAMILY[release.model]["clean"]
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.compute = compute
        tok_files = sorted(p for p in release.tokenizer.iterdir() if p.is_file())
        self._key_base = {"te": _digest([release.text_encoder / "model_config.json"]), "tok": _digest(tok_files),
                          "clean": self.clean, "max_length": self.max_length}
        for name, value in zip(("dtype", "param_dtype"), requested_precision(compute), strict=True):
            if value:  # "" (the checkpoint's) keeps the keys of existing cache entries
                self._key_base[name] = value
        self._tokenizer = None
        self._encode = None

    def _load(self):
        from models.t5 import T5Config, cast_params, encode
        from models.tokenizer import Tokenizer

        self._tokenizer = Tokenizer.from_path(self.release.tokenizer)
        params, meta = loaded.load(self.release.text_encoder)
        cfg = T5Config.from_hf(meta["model_config"], **part_precision(params, meta, self.compute))
        params = cast_params(cfg, params)  # once: the weights in their storage dtype
        fn = jax.jit(lambda p, ids, mask: encode(cfg, p, ids, mask))
        self._encode = lambda ids, mask: fn(params, ids, mask)

    def clean_text(self, prompt: str) -> str:
        from models.tokenizer import clean_magi, clean_wan

        return clean_magi(prompt) if self.clean == "magi" else clean_wan(prompt)

    def __call__(self, prompt: str) -> PromptEmbedding:
        from flowcache_jax import io

        t0 = time.perf_counter()
        key = hashlib.sha256(json.dumps(dict(self._key_base, prompt=prompt), sort_keys=True).encode()).hexdigest()
        path = self.cache_dir / f"{key[:32]}.npz"
        if path.is_file():
            try:
                with np.load(path, allow_pickle=False) as z:
                    return PromptEmbedding(z["hidden"], z["mask"], z["ids"], str(z["cleaned"]), bool(z["truncated"]),
                                           True, time.perf_counter() - t0)
            except (OSError, KeyError, ValueError):
                pass  # a damaged cache entry is recomputed
        if self._encode is None:
            self._load()
        cleaned = self.clean_text(prompt)
        tok = self._tokenizer([cleaned], self.max_length)
        ids, mask = np.asarray(tok.ids, np.int32), np.asarray(tok.mask, np.int32)
        hidden = np.asarray(self._encode(jnp.asarray(ids), jnp.asarray(mask)), np.float32)[0]
        emb = PromptEmbedding(hidden, mask[0], ids[0], cleaned, bool(np.asarray(tok.truncated)[0]), False, 0.0)
        io.write_npz(path, hidden=emb.hidden, mask=emb.mask, ids=emb.ids, cleaned=np.asarray(cleaned),
                     truncated=np.asarray(emb.truncated))
        emb.seconds = time.perf_counter() - t0
        return emb


def prompt_note(text: dict) -> str:
    """One line on what the prompt encoding did, for the run's notes."""
    trunc = f", TRUNCATED to {text['max_length']} tokens" if text["truncated"] else ""
    return f"prompt {text['prompt']!r} ({text['tokens']} tokens{trunc}{', cached' if text['cached'] else ''})"


def magi_captions(emb: PromptEmbedding, n_chunks: int, special: np.ndarray | None, pad_hq: bool = True,
                  pad_duration: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """MAGI-1's per-chunk prompt captions [n, L, C] and masks [n, L] (spec magi1 §5.8): the encoder output
    (pads kept, masked), with the duration token of "chunks remaining" and the HQ token prepended and the
    sequence cut back to L. ``special`` is ``other_tokens`` of special_tokens.npz, rounded through fp16 as
    upstream; None: no special tokens."""
    y = np.repeat(emb.hidden[None].astype(np.float32), n_chunks, 0)
    m = np.repeat(emb.mask[None].astype(np.float32), n_chunks, 0)
    if special is None:
        return y, m
    tok = np.asarray(special, np.float64).astype(np.float16).astype(np.float32)
    length = y.shape[1]
    out_y, out_m = [], []
    for i in range(n_chunks):
        front = ([tok[7 + min(n_chunks - 1 - i, 7)]] if pad_duration else []) + ([tok[1]] if pad_hq else [])
        out_y.append(np.concatenate([np.stack(front), y[i]])[:length] if front else y[i])
        out_m.append(np.concatenate([np.ones(len(front), np.float32), m[i]])[:length])
    return np.stack(out_y), np.stack(out_m)


# ----- VAEs ----------------------------------------------------------------------------------------------------
def _load_vae(release: Release):
    return loaded.load(release.vae)


class ChunkDecoder:
    """MAGI-1: each finished chunk [C, F, h, w] is decoded on its own (upstream's tiled decode) into uint8 frames.
    ``compute``: a run config's ``compute`` section (``dtype`` / ``param_dtype``, "" = the checkpoint's)."""

    def __init__(self, release: Release, compute: Any = None):
        from models.magi1_vae import Magi1VAEConfig, cast_params

        params, meta = _load_vae(release)
        self.cfg = Magi1VAEConfig.from_config(meta["model_config"], **part_precision(params, meta, compute))
        self.params = cast_params(self.cfg, params)
        self.reset()

    def reset(self) -> None:
        """Forget the frames of the last video (the weights stay loaded)."""
        self.chunks: dict[int, np.ndarray] = {}
        self.seconds = 0.0

    def decode(self, latent: np.ndarray) -> np.ndarray:
        """uint8 [T, H, W, 3] of one DiT latent chunk [C, F, h, w] (DiT scale)."""
        from models.magi1_vae import decode_chunk, to_uint8

        t0 = time.perf_counter()
        frames = np.asarray(to_uint8(decode_chunk(self.cfg, self.params, jnp.asarray(latent, jnp.float32))))
        self.seconds += time.perf_counter() - t0
        return frames

    def encode_video(self, frames_u8: np.ndarray) -> np.ndarray:
        """DiT-scale latents [C, T/4, H/8, W/8] of uint8 frames [T, H, W, 3] (upstream's tiled encode)."""
        from models.magi1_vae import encode_video

        t0 = time.perf_counter()
        video = jnp.asarray(np.asarray(frames_u8).transpose(3, 0, 1, 2))
        lat = np.asarray(encode_video(self.cfg, self.params, video), np.float32)
        self.seconds += time.perf_counter() - t0
        return lat

    def __call__(self, chunk: int, latent: np.ndarray) -> None:
        self.chunks[chunk] = self.decode(np.asarray(latent)[0])

    def frames(self) -> np.ndarray:
        return np.concatenate([self.chunks[c] for c in sorted(self.chunks)])


class FrameDecoder:
    """Wan / SkyReels: latent frames are decoded as they become final, through the VAE's causal streaming
    decoder (its per-conv caches carried between calls), so the result equals one decode of the whole video.
    ``compute`` as for ``ChunkDecoder``."""

    def __init__(self, release: Release, compute: Any = None):
        from models.wan_vae import WanVAEConfig, WanVAEDecoder

        params, meta = _load_vae(release)
        cfg = WanVAEConfig.from_kwargs(meta["model_config"], **part_precision(params, meta, compute))
        self.cfg, self.decoder = cfg, WanVAEDecoder(cfg, params)  # the decoder casts the weights once
        self.reset()

    def reset(self) -> None:
        """Forget the frames and the causal caches of the last video (the weights stay loaded)."""
        self.parts: list[np.ndarray] = []
        self.seconds = 0.0
        self.state = None

    def __call__(self, start: int, latents: np.ndarray) -> None:
        from models.wan_vae import denormalize

        t0 = time.perf_counter()
        z = denormalize(self.cfg, jnp.asarray(latents, jnp.float32))
        self.state, video = self.decoder.feed(self.state, z)
        self.parts.append(to_uint8_frames(np.asarray(video)))
        self.seconds += time.perf_counter() - t0

    def frames(self) -> np.ndarray:
        return np.concatenate(self.parts)


def to_uint8_frames(video: np.ndarray) -> np.ndarray:
    """[3, T, H, W] in [-1, 1] (clamped here) -> uint8 [T, H, W, 3] with the pipelines' truncating cast."""
    x = np.clip(np.asarray(video, np.float32), -1.0, 1.0) * 127.5 + 127.5
    return np.clip(x, 0, 255).astype(np.uint8).transpose(1, 2, 3, 0)


def make_decoder(release: Release, compute: Any = None):
    """The release's decoder (None without a VAE): per chunk for MAGI-1, streaming frames for Wan; ``compute`` is
    a run config's ``compute`` section (``dtype`` / ``param_dtype``, "" = the checkpoint's)."""
    if release.vae is None:
        return None
    return ChunkDecoder(release, compute) if release.model == "magi1" else FrameDecoder(release, compute)
