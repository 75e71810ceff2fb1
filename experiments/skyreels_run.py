"""Build a SkyReels-V2 diffusion-forcing run from a config: converted checkpoint, contexts, windows, policy.

Video fields are in pixel frames and pixels as upstream (the Wan VAE compresses 4x in time, 8x in space).
Long videos are cut into windows of ``base_num_frames`` whose first ``overlap_history`` frames are the previous
window's last latents (diffusers' rule: no decode and re-encode). Every policy runs on the one sampler
(``flowcache_jax.sampler`` through ``flowcache_jax.windows``): its positions are a window's causal blocks, its
solver SkyReels' FlowUniPC, CFG its two branches. ``sampler.executor`` picks how a call runs: ``groups`` (a
forward per block over a K/V buffer, FlowCache's executor: finished and not-yet-started blocks are skipped by
structure) or ``window`` (upstream's whole-window call, block-causal or full attention). ``batch`` videos run at
once (each its own noise, addnoise eps and prefixes; the timestep decisions are the same for all of them).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax.numpy as jnp
import ml_collections
import numpy as np

from experiments import precision
from experiments.errors import ConfigError
from experiments.run_spec import Run
from experiments.validation import validate_policy

CONVERT_HINT = ("convert the released weights first: python -m converters.convert --model=skyreels_v2 "
                "--src=<SkyReels-V2-DF-1.3B-540P folder> --dst=<DIR>, then pass --config.checkpoint=<DIR> "
                "(python -m converters.release --model=skyreels_v2 ... converts the DiT, text encoder, tokenizer and "
                "VAE into one folder, for prompts and decoded video)")


def latent_frames(frames: int) -> int:
    return (frames - 1) // 4 + 1


def executor_of(cfg: ml_collections.ConfigDict) -> str:
    """The configured executor; unset: FlowCache's groups for flowcache, upstream's whole-window call otherwise."""
    return cfg.sampler.get("executor", "") or ("groups" if cfg.policy.name == "flowcache" else "window")


def validate_skyreels(cfg: ml_collections.ConfigDict) -> None:
    from flowcache_jax.policies import TIMESTEP_POLICIES

    v, s, p = cfg.video, cfg.sampler, cfg.policy
    validate_policy(cfg, None)
    if p.get("metric", "input") == "timestep" and p.name not in TIMESTEP_POLICIES:
        raise ConfigError(f"policy.name={p.name!r} reads input features: with policy.metric=timestep use one of "
                          f"{', '.join(TIMESTEP_POLICIES)}, or set --config.policy.metric=input")
    if p.name == "magcache":
        raise ConfigError("MagCache's calibration needs a chunk schedule, not DF windows: pick another policy")
    if cfg.get("prompt") is not None and cfg.caption_file:
        raise ConfigError("set config.prompt or config.caption_file, not both")
    if cfg.batch < 1:
        raise ConfigError(f"batch must be >= 1 (videos generated at once), got {cfg.batch}")
    if s.attention not in ("block_causal", "full"):
        raise ConfigError(f"sampler.attention must be block_causal or full, got {s.attention!r}")
    if executor_of(cfg) not in ("groups", "window"):
        raise ConfigError(f"sampler.executor must be groups, window or empty (auto), got {s.executor!r}")
    if executor_of(cfg) == "groups" and s.attention == "full":
        raise ConfigError("the groups executor is block-causal by construction: set sampler.attention=block_causal "
                          "or sampler.executor=window")
    if p.reuse != "residual":
        raise ConfigError("SkyReels-V2's multistep solver replays transformer residuals: set policy.reuse=residual")
    if s.num_steps < 2 or s.causal_block_size < 1 or s.ar_step < 0 or s.guidance < 0 or s.shift <= 0:
        raise ConfigError("sampler.num_steps >= 2, causal_block_size >= 1, ar_step >= 0, guidance >= 0, shift > 0")
    for name in ("num_frames", "base_num_frames", "overlap_history"):
        if v[name] < 1 or (v[name] - 1) % 4:
            raise ConfigError(f"video.{name}={v[name]} must be 4k+1 pixel frames (the VAE's temporal stride)")
    base, ovl = latent_frames(v.base_num_frames), latent_frames(v.overlap_history)
    if base % s.causal_block_size or ovl % s.causal_block_size:
        raise ConfigError(f"latent base frames {base} and overlap frames {ovl} must be multiples of "
                          f"sampler.causal_block_size={s.causal_block_size}")
    if latent_frames(v.num_frames) > base and ovl >= base:
        raise ConfigError("video.overlap_history must be shorter than video.base_num_frames")
    if v.height % 16 or v.width % 16:
        raise ConfigError(f"video height/width {v.height}x{v.width} must be multiples of 16 (VAE 8 x patch 2)")


def load_contexts(path: str, mcfg) -> tuple[dict, str]:
    """T5 prompt embeddings from a file (no text encoder here), or zero contexts (an unconditional run)."""
    zeros = np.zeros((1, mcfg.text_dim), np.float32)
    if not path:
        return ({"context": jnp.asarray(zeros), "negative_context": jnp.asarray(zeros)},
                "zero text contexts (set --config.caption_file to an .npz with 'context' [L, text_dim])")
    p = Path(path)
    if not p.is_file() or p.suffix != ".npz":
        raise ConfigError(f"caption_file {p} must be an existing .npz with 'context' (and 'negative_context')")
    with np.load(p, allow_pickle=False) as f:
        ctx = np.asarray(f["context"], np.float32) if "context" in f.files else None
        neg = np.asarray(f["negative_context"], np.float32) if "negative_context" in f.files else zeros
    if ctx is None or ctx.ndim != 2 or ctx.shape[1] != mcfg.text_dim or neg.ndim != 2 or neg.shape[1] != mcfg.text_dim:
        raise ConfigError(f"caption_file {p}: 'context' (and 'negative_context') must be [L, {mcfg.text_dim}]")
    return {"context": jnp.asarray(ctx), "negative_context": jnp.asarray(neg)}, f"contexts from {p}"


def prompt_contexts(cfg: ml_collections.ConfigDict, release, mcfg, text_len: int) -> tuple[dict, dict]:
    """umT5 contexts [text_len, D] of the prompt and the negative prompt (pads zeroed, as Wan / SkyReels do)."""
    from experiments.pipeline import PromptEncoder
    from models.t5 import wan_context

    enc = PromptEncoder(release, text_len, cfg.text.cache_dir, cfg.get("compute"))
    pos, neg = enc(cfg.prompt), enc(cfg.negative_prompt)
    if pos.hidden.shape[-1] != mcfg.text_dim:
        raise ConfigError(f"the text encoder gives {pos.hidden.shape[-1]}-wide embeddings, the DiT takes "
                          f"{mcfg.text_dim}: the release's parts do not belong together")
    info = {"prompt": cfg.prompt, "negative_prompt": cfg.negative_prompt, "cleaned": pos.cleaned,
            "tokens": pos.tokens, "max_length": text_len, "truncated": pos.truncated or neg.truncated,
            "cached": pos.cached and neg.cached, "seconds": pos.seconds + neg.seconds}
    ctx = {k: jnp.asarray(wan_context(e.hidden, e.mask), jnp.float32) for k, e in (("context", pos),
                                                                                  ("negative_context", neg))}
    return ctx, info


def load_checkpoint(path: str, param_dtype: str = ""):
    """(model config, params, metadata): the compute dtype follows the stored (or ``param_dtype``-cast) blocks."""
    from experiments.loaded import load_model
    from models.skyreels_v2 import SkyReelsConfig

    params, meta = load_model(path, "skyreels_v2", CONVERT_HINT, param_dtype)
    bf16 = str(np.asarray(params["layers"]["ffn"]["fc1"]["kernel"]).dtype) == "bfloat16"
    try:
        return SkyReelsConfig.from_upstream(meta["model_config"], "bfloat16" if bf16 else "float32"), params, meta
    except ValueError as e:
        raise ConfigError(str(e)) from e


def build_skyreels(cfg: ml_collections.ConfigDict, n_chunks: int | None = None) -> Run:
    from experiments.pipeline import make_decoder, open_release, prompt_note
    from experiments.registry import mesh_layout
    from flowcache_jax.policies import make_policy
    from flowcache_jax.sampler import Sampler
    from flowcache_jax.schedules import skyreels_sigmas
    from flowcache_jax.sharding import MeshConfig, shard_params
    from flowcache_jax.solvers import FlowUniPC
    from flowcache_jax.windows import DFPlan, DFSchedule, WindowedSampler, plan_windows
    from models.skyreels_denoiser import SkyReelsDenoiser

    validate_skyreels(cfg)
    layout = mesh_layout(cfg)
    mcfg, params, meta = load_checkpoint(cfg.checkpoint, precision.param_dtype(cfg))
    mcfg, compute = precision.apply(cfg, mcfg)
    v, s = cfg.video, cfg.sampler
    total = latent_frames(v.num_frames)
    if n_chunks is not None:  # a video of n causal blocks (benchmark's length sweep)
        total = n_chunks * s.causal_block_size
    plan = DFPlan(tuple(plan_windows(total, latent_frames(v.base_num_frames), latent_frames(v.overlap_history),
                                     s.causal_block_size)), total, s.num_steps, s.causal_block_size)
    ctx, note = load_contexts(cfg.caption_file, mcfg)
    release = open_release(cfg.checkpoint, "skyreels_v2")
    text = None
    if cfg.get("prompt") is not None:
        ctx, text = prompt_contexts(cfg, release, mcfg, int(meta["model_config"].get("text_len", 512)))
        note = f"{prompt_note(text)}, negative prompt {cfg.negative_prompt!r}"
    executor = executor_of(cfg)
    sigmas, timesteps = skyreels_sigmas(s.num_steps, s.shift)
    try:
        policy = make_policy(cfg.policy)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    if hasattr(policy, "ar_step"):  # window TeaCache's reference counter reads upstream's per-window step count
        policy = dataclasses.replace(policy, ar_step=int(s.ar_step))
    h, w = v.height // 8, v.width // 8
    if layout is not None:
        mesh_check(cfg.mesh, SkyReelsDenoiser(mcfg, 1, s.causal_block_size, h, w, executor, s.attention),
                   int(cfg.batch))
        params = shard_params(params, layout, "skyreels_v2")

    def denoiser(groups: int) -> SkyReelsDenoiser:
        return SkyReelsDenoiser(mcfg, groups, s.causal_block_size, h, w, executor, s.attention, constrain=layout)

    def make(groups: int) -> Sampler:
        solver = FlowUniPC(sigmas, reference_aliasing=bool(s.get("reference_aliasing", True)))
        timestep = cfg.policy.get("metric", "input") == "timestep"  # no input features to compute then
        return Sampler(denoiser(groups), policy, groups, int(cfg.batch), reuse="residual",
                       metric_dtype=cfg.policy.metric_dtype,
                       solver=solver, joint=executor == "window", features="none" if timestep else None,
                       identity_ring=True, layout=layout)

    # the FlowCache fork runs a long-video prefix block on the first call only, and only when ar_step > 0
    # (its overlap flag; fixture README, defect 3); upstream reruns it at every call
    refresh = "first" if cfg.policy.name == "flowcache" and executor == "groups" and s.ar_step > 0 else "every"
    sampler = WindowedSampler(make, DFSchedule(s.num_steps, s.ar_step, s.causal_block_size, timesteps, sigmas,
                                               s.addnoise_condition, refresh), policy)
    fps = 0 if v.fps == 16 else 1  # the fps-embedding index (upstream: 16 fps -> 0, else 1)
    first = denoiser(plan.windows[0][0] // s.causal_block_size)
    cond = first.prepare_cond(params, ctx["context"], ctx["negative_context"], fps, s.guidance, s.addnoise_condition)
    decoder = make_decoder(release, cfg.get("compute"))
    attention = (s.attention if executor == "window" else
                 "block-causal by construction (a forward per block over a K/V buffer)")
    notes = {"contexts": note, "windows": [list(x) for x in plan.windows], **release.notes(), "executor": executor,
             "attention": attention, **compute,
             **({} if layout is None else {"mesh": str(MeshConfig.from_config(cfg.mesh))}),
             "video": "decoded by the Wan VAE as windows finish" if decoder else "latents (no VAE)"}
    return Run(cfg=cfg, denoiser=first, params=params, cond=cond, table=plan, sampler=sampler, decoder=decoder,
               text=text, notes=notes)


def mesh_check(mesh: ml_collections.ConfigDict, den, batch: int = 1) -> None:
    """A mesh that fits the run: data splits the two CFG branches (where it divides them; else the videos of a
    batch, K/V buffers and residuals along), seq the tokens of a causal block."""
    if den.branches % mesh.data and batch % mesh.data:
        raise ConfigError(f"config.mesh.data={mesh.data} must divide SkyReels-V2's {den.branches} CFG branches "
                          f"or config.batch={batch}")
    if den.tokens_per_group % mesh.seq:
        raise ConfigError(f"config.mesh.seq={mesh.seq} must divide the {den.tokens_per_group} tokens of a causal "
                          "block")


def run_flops(run: Run, res) -> dict:
    """Analytic FLOPs of the uncached run (spec §6, times the batch's videos) and the cached run's estimate (block
    forwards run), with the forwards the executor's structure skips and those the policy's reuse skips counted
    apart."""
    from models.skyreels_flops import forward_flops

    s, v, mcfg = run.cfg.sampler, run.cfg.video, run.denoiser.cfg
    tokens = (v.height // 8 // mcfg.patch_size[1]) * (v.width // 8 // mcfg.patch_size[2])
    text = int(run.denoiser.branch_ctx(run.cond, 0)[0].shape[1])  # (K, V) [layers, L, heads, hd] of the prompt
    total = 0.0
    for frames, prefix in run.table.windows:
        iters = s.num_steps + max(frames // s.causal_block_size - prefix // s.causal_block_size - 1, 0) * s.ar_step
        per = forward_flops(mcfg.dim, mcfg.ffn_dim, mcfg.num_layers, text, tokens, frames, s.causal_block_size,
                            s.attention)
        total += 2 * iters * per["total"] * int(run.cfg.batch)
    return {"vanilla_pflops": total / 1e15, "cached_pflops_estimate": total * res.computed_fraction / 1e15,
            "forwards": forward_split(res),
            "note": "the estimate scales the uncached FLOPs by the fraction of block forwards run"}


def forward_split(res) -> dict:
    """Block forwards of the uncached whole-window run, split into what the executor's structure skips exactly
    (finished and not-yet-started blocks, a prefix after its first call), what the policy's reuse skips, and what
    ran: ``speedup_structure`` x ``speedup_cache`` = ``speedup_ideal``."""
    van, struct, computed = res.chunk_forwards_vanilla, res.structure_skipped, res.computed
    after = max(van - struct, 1)
    return {"vanilla": van, "structure_skipped": struct, "cache_skipped": res.cache_skipped, "computed": computed,
            "speedup_structure": van / after, "speedup_cache": after / max(computed, 1e-12)}
