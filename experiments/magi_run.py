"""Build a MAGI-1 run from a config: converted checkpoint, captions, schedule, denoiser, sampler."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from experiments import precision
from experiments.errors import ConfigError
from experiments.run_spec import Run
from experiments.validation import validate_policy
from flowcache_jax.kv import methods as kvm

CONVERT_HINT = ("convert the released weights first: python -m converters.convert --model=magi1 "
                "--src=<ckpt>/magi/4.5B_distill/inference_weight.distill --dst=<DIR>, then pass "
                "--config.checkpoint=<DIR> (python -m converters.release --model=magi1 ... converts the DiT, "
                "text encoder, tokenizer and VAE into one folder, for prompts and decoded video)")


def prefix_chunks(cfg: ml_collections.ConfigDict) -> int:
    return int(cfg.get("prefix", {}).get("chunks", 0))


def validate_magi(cfg: ml_collections.ConfigDict) -> None:
    s, v = cfg.sampler, cfg.video
    validate_policy(cfg, s.num_steps)
    if cfg.batch < 1:
        raise ConfigError(f"batch must be >= 1 (videos generated at once), got {cfg.batch}")
    if s.num_steps < 1 or s.window < 1 or s.num_steps % s.window:
        raise ConfigError(f"sampler.num_steps={s.num_steps} must be a positive multiple of sampler.window={s.window}")
    if s.semantics not in ("reference", "magi"):
        raise ConfigError(f"sampler.semantics must be 'reference' or 'magi', got {s.semantics!r}")
    if s.shortcut_mode not in ("8,16,16", "16,16,8"):
        raise ConfigError(f"sampler.shortcut_mode must be '8,16,16' or '16,16,8', got {s.shortcut_mode!r}")
    if s.num_steps == 12 and s.window != 4:
        raise ConfigError("the 12-step shortcut grid has 4 stages: use sampler.window=4")
    if s.key_tile < 1:
        raise ConfigError(f"sampler.key_tile must be >= 1, got {s.key_tile}")
    if not 0.0 < s.clean_t <= 1.0:
        raise ConfigError(f"sampler.clean_t must be in (0, 1], got {s.clean_t}")
    if s.discard_duplicate not in (None, True, False):
        raise ConfigError(f"sampler.discard_duplicate must be true, false or unset, got {s.discard_duplicate!r}")
    hs, ht = float(s.history_guidance), float(s.history_guidance_t_max)
    if hs <= 0 or not 0.0 < ht <= 1.0:
        raise ConfigError(f"sampler.history_guidance must be > 0 (1 = off) and sampler.history_guidance_t_max in "
                          f"(0, 1], got {hs} and {ht}")
    discard = discards_duplicate(s)
    if hs != 1.0 and not discard:
        raise ConfigError("sampler.history_guidance replaces the nearly-clean duplicate's 0.7/0.3 blend (both are "
                          "guidance on the history): set sampler.discard_duplicate=true or history_guidance=1")
    kv = cfg.kv
    method = kv.get("method", "dense")
    if method not in kvm.METHODS:
        raise ConfigError(f"kv.method must be one of {', '.join(kvm.METHODS)}, got {method!r}")
    if method != "dense" and kv.compress:
        raise ConfigError(f"kv.method={method} does not combine with kv.compress (fake quantization keeps every "
                          "chunk in the dense buffer): set one of them")
    if method != "dense" and s.semantics != "reference":
        raise ConfigError(f"kv.method={method} needs sampler.semantics=reference (the clean re-encode of "
                          "semantics=magi rewrites a finished chunk's K/V after it was quantized)")
    if method == "ours" and not kv.get("summary", True):  # a dense buffer cannot drop tokens: zero rows take mass
        raise ConfigError("kv.summary=false drops tokens, which MAGI-1's dense buffer cannot (zero keys still take "
                          "softmax mass): keep kv.summary=true on MAGI-1")
    if method == "ours" and not 0 <= kv.get("score_lambda", 1.0) <= 1:
        raise ConfigError(f"kv.score_lambda must be in [0, 1], got {kv.score_lambda}")
    if kv.compress:
        if kv.budget_chunks < s.window + 1:
            raise ConfigError(f"kv.budget_chunks={kv.budget_chunks} must be >= sampler.window + 1 = {s.window + 1} "
                              "(the window plus at least one chunk of compressed history)")
        if s.semantics != "reference" or s.kv_range != "full":
            raise ConfigError("kv.compress needs sampler.semantics=reference and sampler.kv_range=full (the "
                              "compressed history is shared by every chunk, as in the FlowCache fork)")
        if kv.query_granularity not in ("token", "frame", "chunk") or kv.kernel < 1 or not 0 <= kv.mix_lambda <= 1:
            raise ConfigError("kv.query_granularity must be token/frame/chunk, kv.kernel >= 1, kv.mix_lambda in [0, 1]")
    if s.kv_range not in ("full", "official"):
        raise ConfigError(f"sampler.kv_range must be 'full' or 'official', got {s.kv_range!r}")
    if prefix_chunks(cfg) < 0:
        raise ConfigError(f"prefix.chunks must be >= 0, got {prefix_chunks(cfg)}")
    if cfg.get("prompt") is not None and cfg.caption_file:
        raise ConfigError("set config.prompt or config.caption_file, not both")
    if v.num_chunks < 1 or v.latent_height < 1 or v.latent_width < 1 or v.chunk_width < 1:
        raise ConfigError("video.num_chunks, latent_height, latent_width and chunk_width must be >= 1")


def load_checkpoint(path: str, param_dtype: str = ""):
    """(model config, params): the compute dtype follows the stored (or ``param_dtype``-cast) layer weights."""
    from experiments.loaded import load_model
    from models.magi1 import Magi1Config

    params, meta = load_model(path, "magi1", CONVERT_HINT, param_dtype)
    layers_bf16 = str(np.asarray(params["layers"]["q"]["kernel"]).dtype) == "bfloat16"
    cfg = Magi1Config.from_upstream(meta["model_config"], "bfloat16" if layers_bf16 else "float32")
    return cfg, params


def prompt_captions(cfg: ml_collections.ConfigDict, release, mcfg, n_chunks: int) -> tuple[np.ndarray, np.ndarray,
                                                                                              dict]:
    """Per-chunk captions of ``config.prompt`` through the release's T5 (cached), with MAGI-1's special tokens."""
    from experiments.pipeline import PromptEncoder, magi_captions

    emb = PromptEncoder(release, mcfg.caption_max_length, cfg.text.cache_dir, cfg.get("compute"))(cfg.prompt)
    if emb.hidden.shape[-1] != mcfg.caption_channels:
        raise ConfigError(f"the text encoder gives {emb.hidden.shape[-1]}-wide embeddings, the DiT takes "
                          f"{mcfg.caption_channels}: the release's parts do not belong together")
    special = None
    if release.special_tokens is not None:
        with np.load(release.special_tokens, allow_pickle=False) as z:
            special = np.asarray(z["other_tokens"])
    y, mask = magi_captions(emb, n_chunks, special, cfg.text.pad_hq, cfg.text.pad_duration)
    info = {"prompt": cfg.prompt, "cleaned": emb.cleaned, "tokens": emb.tokens, "max_length": len(emb.mask),
            "truncated": emb.truncated, "cached": emb.cached, "seconds": emb.seconds,
            "special_tokens": special is not None}
    return y, mask, info


def load_captions(path: str, mcfg, n_chunks: int, params: dict) -> tuple[dict, str]:
    """Per-chunk prompt captions from a file, or the null caption."""
    from models.magi1_denoiser import null_captions

    null_y, null_m = null_captions(params, n_chunks)
    if not path:
        return {"y": null_y, "mask": null_m, "null_y": null_y, "null_mask": null_m}, \
            "null caption (set --config.caption_file for a prompt embedding)"
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"caption_file {p} does not exist")
    if p.suffix == ".npz":
        with np.load(p, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    elif p.suffix == ".safetensors":
        from safetensors.numpy import load_file

        arrays = load_file(p)
    else:
        raise ConfigError(f"caption_file must be .npz or .safetensors, got {p.name}")
    if "y" not in arrays:
        raise ConfigError(f"caption_file {p} has no array 'y' (the T5 output, [L, {mcfg.caption_channels}])")
    y = np.asarray(arrays["y"], np.float32)
    y = np.repeat(y[None], n_chunks, 0) if y.ndim == 2 else y
    if y.ndim != 3 or y.shape[0] != n_chunks or y.shape[2] != mcfg.caption_channels:
        raise ConfigError(f"caption 'y' must be [L, {mcfg.caption_channels}] or [{n_chunks}, L, "
                          f"{mcfg.caption_channels}], got {tuple(arrays['y'].shape)}")
    try:
        mask = np.broadcast_to(np.asarray(arrays.get("mask", np.ones(y.shape[:2])), np.float32), y.shape[:2]).copy()
    except ValueError as e:
        raise ConfigError(f"caption 'mask' of shape {np.shape(arrays['mask'])} does not fit 'y' {y.shape[:2]}") from e
    if not (mask > 0).any(-1).all():
        raise ConfigError(f"caption_file {p}: every chunk needs at least one valid token in 'mask'")
    return {"y": y, "mask": mask, "null_y": null_y, "null_mask": null_m}, f"caption from {p}"


def read_clip(path: str, height: int, width: int) -> np.ndarray:
    """uint8 frames [T, height, width, 3] of a video file, resized (antialiased bilinear) when its size differs."""
    from flowcache_jax import io

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"prefix.video {p} does not exist")
    try:
        frames, _ = io.read_mp4(p)
    except (OSError, RuntimeError, ValueError) as e:
        raise ConfigError(f"prefix.video {p} cannot be read as a video ({e})") from e
    if frames.shape[1:3] != (height, width):
        x = jax.image.resize(jnp.asarray(frames, jnp.float32), (frames.shape[0], height, width, 3), "linear")
        frames = np.asarray(jnp.clip(jnp.round(x), 0, 255)).astype(np.uint8)
    return frames


def encode_clip(cfg: ml_collections.ConfigDict, decoder) -> tuple[ml_collections.ConfigDict, np.ndarray]:
    """MAGI-1 v2v: the clip read once and its last ``prefix.chunks`` whole chunks (all of them when 0) encoded
    once with the VAE -> (cfg with the chunk count, DiT-scale latents [C, chunks * chunk_width, h, w])."""
    if decoder is None:
        raise ConfigError(f"prefix.video needs the checkpoint's VAE, and {cfg.checkpoint} has no vae/: convert "
                          "the release with python -m converters.release ... --vae=<ckpt/vae>")
    v = cfg.video
    stride, space = decoder.cfg.patch_length, decoder.cfg.patch_size  # the ViT VAE's 4x time, 8x space patches
    frames = read_clip(cfg.prefix.video, v.latent_height * space, v.latent_width * space)
    per_chunk = v.chunk_width * stride
    chunks = cfg.prefix.chunks or frames.shape[0] // per_chunk
    if chunks < 1 or frames.shape[0] < chunks * per_chunk:
        raise ConfigError(f"prefix.video {cfg.prefix.video} has {frames.shape[0]} frames; "
                          f"{max(chunks, 1)} chunk(s) of video.chunk_width={v.chunk_width} latent frames need "
                          f"{max(chunks, 1) * per_chunk}")
    if chunks != cfg.prefix.chunks:
        cfg = ml_collections.ConfigDict(cfg.to_dict())
        cfg.prefix.chunks = chunks
    return cfg, decoder.encode_video(frames[-chunks * per_chunk:])


def procedural_truth(cfg: ml_collections.ConfigDict, seed: int, shapes: bool = False) -> np.ndarray:
    """The whole procedural clip a ``prefix.source=procedural`` run continues, [T, H, W, 3] in [-1, 1]: the given
    chunks (what ``load_prefix`` encodes), then the true continuation, in the run's ``prefix.world``; with
    ``shapes``, where its shapes are instead ([T, H, W] bool, ``procedural_videos.shape_mask``)."""
    from experiments import procedural_videos

    v = cfg.video
    render = procedural_videos.shape_mask if shapes else procedural_videos.clip
    try:
        return np.asarray(render(seed, (prefix_chunks(cfg) + v.num_chunks) * v.chunk_width, v.latent_height,
                                 v.latent_width, cfg.prefix.get("world", "")))
    except ValueError as e:
        raise ConfigError(f"prefix.world: {e}") from None


def load_prefix(cfg: ml_collections.ConfigDict, mcfg, seed: int, clip: np.ndarray | None = None
                ) -> np.ndarray | None:
    """The clean chunks a video continues, [p, C, F, H, W]: a procedural clip of ``seed``, a latent file or a clip
    already encoded with the checkpoint's VAE (``clip``, from ``encode_clip``)."""
    p = prefix_chunks(cfg)
    if p == 0:
        return None
    v, src = cfg.video, cfg.prefix.source
    c, f, h, w = mcfg.in_channels, p * v.chunk_width, v.latent_height, v.latent_width
    if src == "procedural":
        from experiments.procedural_videos import to_latent

        if c != 3:
            raise ConfigError(f"prefix.source=procedural gives RGB frames; the model has in_channels={c}")
        lat = np.asarray(to_latent(procedural_truth(cfg, seed)[:f]))
    elif src == "video":
        lat = clip
    elif src == "file":
        path = Path(cfg.prefix.file)
        if not path.is_file() or path.suffix != ".npz":
            raise ConfigError(f"prefix.file {path} must be an existing .npz with 'latents' [{c}, T, {h}, {w}]")
        with np.load(path, allow_pickle=False) as z:
            lat = np.asarray(z["latents"], np.float32) if "latents" in z.files else None
        if lat is None or lat.ndim != 4 or lat.shape[0] != c or lat.shape[1] < f or lat.shape[2:] != (h, w):
            raise ConfigError(f"prefix.file {path}: 'latents' must be [{c}, >= {f}, {h}, {w}]")
        lat = lat[:, -f:]
    else:
        raise ConfigError(f"prefix.source must be 'procedural' or 'file' when prefix.chunks > 0, got {src!r}")
    return lat.reshape(c, p, v.chunk_width, h, w).transpose(1, 0, 2, 3, 4).astype(np.float32)


def time_grid(s: ml_collections.ConfigDict) -> np.ndarray:
    """MAGI-1's grid (power 2, shift 3; the distilled shortcut grid at 12 steps), or ``sampler.time_power`` /
    ``time_shift``'s: a model trained here may want its steps elsewhere (the tiny one: dense near the data)."""
    from flowcache_jax.schedules import flow_time_grid, magi_time_grid

    power, shift = float(s.get("time_power", 2.0)), float(s.get("time_shift", 3.0))
    if power <= 0 or shift <= 0:
        raise ConfigError(f"sampler.time_power and sampler.time_shift must be > 0, got {power} and {shift}")
    if (power, shift) == (2.0, 3.0):
        return magi_time_grid(s.num_steps, s.shortcut_mode)
    return flow_time_grid(s.num_steps, power, shift)


def discards_duplicate(s: ml_collections.ConfigDict) -> bool:
    """Whether the nearly-clean duplicate is dropped: ``sampler.discard_duplicate``, else by the semantics."""
    return s.semantics != "magi" if s.discard_duplicate is None else bool(s.discard_duplicate)


def make_denoiser(cfg: ml_collections.ConfigDict, mcfg, n_chunks: int):
    """The Magi1Denoiser of a config (shared by run, benchmark and flops)."""
    from flowcache_jax.kv.compress import CompressConfig
    from models.magi1_denoiser import Magi1Denoiser, distill_interval_table, nearly_clean_step

    s, v = cfg.sampler, cfg.video
    grid = time_grid(s)
    discard = discards_duplicate(s)
    den = Magi1Denoiser(
        cfg=mcfg, chunk_frames=v.chunk_width, latent_h=v.latent_height, latent_w=v.latent_width,
        n_chunks=n_chunks + prefix_chunks(cfg), prefix_chunks=prefix_chunks(cfg),
        num_steps=s.num_steps, steps_per_stage=s.num_steps // s.window, clean_t=s.clean_t,
        nearly_clean_k=nearly_clean_step(grid), discard_duplicate=discard,
        noise2clean_kvrange=(5, 4, 3, 2) if s.kv_range == "official" else (),
        distill_intervals=tuple(distill_interval_table(s.num_steps, s.shortcut_mode, s.window)), key_tile=s.key_tile,
        history_scale=float(s.history_guidance), history_t_max=float(s.history_guidance_t_max))
    if cfg.kv.compress:
        comp = CompressConfig(budget=1, mix_lambda=cfg.kv.mix_lambda, kernel=cfg.kv.kernel, min_shift=True)
        den = dataclasses.replace(den, cache_chunks=cfg.kv.budget_chunks, compression=comp,
                                  query_granularity=cfg.kv.query_granularity)
    kv = cfg.kv
    try:
        method = kvm.from_config(kv, den.frame_tokens)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    if method is not None:
        den = dataclasses.replace(den, kv_method=method)
    return den, grid


def on_mesh(cfg: ml_collections.ConfigDict, den, params: dict, layout):
    """The denoiser with the mesh's sharding hook and the parameters sharded FSDP-style (``config.mesh``)."""
    from flowcache_jax.sharding import shard_params

    m = cfg.mesh
    if int(cfg.batch) % m.data:
        raise ConfigError(f"config.mesh.data={m.data} must divide config.batch={cfg.batch} (MAGI-1 has no CFG "
                          "branches: the data axis splits the videos of a batch); put the devices on mesh.fsdp and "
                          "mesh.seq")
    if den.tokens_per_chunk % m.seq:
        raise ConfigError(f"config.mesh.seq={m.seq} must divide the {den.tokens_per_chunk} tokens of a chunk")
    return dataclasses.replace(den, constrain=layout), shard_params(params, layout, "magi1")


def build_magi1(cfg: ml_collections.ConfigDict, n_chunks: int | None = None) -> Run:
    from experiments.pipeline import make_decoder, open_release, prompt_note
    from experiments.registry import mesh_layout
    from flowcache_jax.policies import make_policy
    from flowcache_jax.sampler import Sampler
    from flowcache_jax.schedules import magi_schedule
    from flowcache_jax.sharding import MeshConfig

    if cfg.prefix.get("video", ""):  # a clip to continue: encoded by the VAE (below, once)
        cfg = ml_collections.ConfigDict(cfg.to_dict())
        cfg.prefix.source = "video"
    validate_magi(cfg)
    layout = mesh_layout(cfg)
    s, v = cfg.sampler, cfg.video
    n = v.num_chunks if n_chunks is None else n_chunks
    mcfg, params = load_checkpoint(cfg.checkpoint, precision.param_dtype(cfg))
    mcfg, compute = precision.apply(cfg, mcfg)
    if v.latent_height % mcfg.patch_size or v.latent_width % mcfg.patch_size or v.chunk_width % mcfg.t_patch_size:
        raise ConfigError(f"video latent size {v.latent_height}x{v.latent_width} must be a multiple of the patch "
                          f"size {mcfg.patch_size} (chunk_width of {mcfg.t_patch_size})")
    release = open_release(cfg.checkpoint, "magi1")
    rgb = cfg.get("output", {}).get("decode", "") == "rgb"  # the tiny model: its latents are RGB frames
    decoder = None if rgb else make_decoder(release, cfg.get("compute"))
    clip = None
    if cfg.prefix.source == "video":
        cfg, clip = encode_clip(cfg, decoder)
    den, grid = make_denoiser(cfg, mcfg, n)
    magi = s.semantics == "magi"
    text = None
    cond, caption = load_captions(cfg.caption_file, mcfg, n, params)
    if cfg.get("prompt") is not None:
        cond["y"], cond["mask"], text = prompt_captions(cfg, release, mcfg, n)
        caption = prompt_note(text)

    def cond_for(seed: int) -> dict:
        c = dict(cond)
        if prefix_chunks(cfg):
            c["prefix"] = load_prefix(cfg, mcfg, seed, clip)
        return den.prepare_cond(params, jax.tree.map(jnp.asarray, c))

    if layout is not None:  # after the host reads of the parameters (the null caption)
        den, params = on_mesh(cfg, den, params, layout)
    try:
        table = magi_schedule(n, s.window, s.num_steps, grid)
        sampler = Sampler(den, make_policy(cfg.policy), table.window, int(cfg.batch), cfg.policy.reuse,
                          cfg.policy.metric_dtype, reencode_clean=magi, layout=layout)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    notes = {"prefix": f"{prefix_chunks(cfg)} given clean chunk(s), {cfg.prefix.source}"} if prefix_chunks(cfg) else {}
    return Run(cfg=cfg, denoiser=den, params=params, cond=cond_for(cfg.seed), table=table, sampler=sampler,
               cond_for=cond_for, decoder=decoder, text=text,
               notes={"caption": caption, **({} if rgb else release.notes()), "semantics": s.semantics,
                      **compute,
                      "kv_buffer": f"{den.layout.rows} rows ({'compressed, ' if cfg.kv.compress else ''}"
                                   f"{den.layout.history_chunks} history + {den.window} window chunks)"
                                   + ("" if den.kv_method is None else
                                      f", finished chunks fake-quantized by {den.kv_method.name}"),
                      "duplicate": "discarded" if den.discard_duplicate else "run and blended 0.7/0.3",
                      **({} if layout is None else {"mesh": str(MeshConfig.from_config(cfg.mesh))}), **notes})


def run_flops(run: Run, res) -> dict:
    """FLOPs of the run's computed chunk passes (``models.magi1_flops``) and of its uncached schedule."""
    from models.magi1_flops import run_flops as magi_flops

    out = magi_flops(run, res)
    out["vanilla_pflops"] = magi_flops(run)["total_pflops"]
    return out
