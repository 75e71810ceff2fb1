"""Build a SkyReels-V2 diffusion-forcing run from a config: converted checkpoint, contexts, windows, policy.

Video fields are in pixel frames and pixels as upstream (the Wan VAE compresses 4x in time, 8x in space);
there is no VAE here, so the run produces latents. Long videos are cut into windows of ``base_num_frames``
whose first ``overlap_history`` frames are the previous window's last latents (diffusers' rule: no decode and
re-encode). Policies: vanilla (whole-window forwards), teacache (one decision per transformer call) and
flowcache (the per-group executor with its reuse rule, reference semantics, compiled:
``models.skyreels_flowcache_compiled``).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from experiments.common import ConfigError, Run

CONVERT_HINT = ("convert the released weights first: python -m converters.convert --model=skyreels_v2 "
                "--src=<SkyReels-V2-DF-1.3B-540P folder> --dst=<DIR>, then pass --config.checkpoint=<DIR> "
                "(python -m converters.release --model=skyreels_v2 ... converts the DiT, text encoder, tokenizer and "
                "VAE into one folder, for prompts and decoded video)")
POLICIES = ("vanilla", "teacache", "flowcache")


def latent_frames(frames: int) -> int:
    return (frames - 1) // 4 + 1


def validate_skyreels(cfg: ml_collections.ConfigDict) -> None:
    v, s, p = cfg.video, cfg.sampler, cfg.policy
    if p.name not in POLICIES:
        raise ConfigError(f"SkyReels-V2 runs support policy.name in {POLICIES}, got {p.name!r}")
    if cfg.get("prompt") is not None and cfg.caption_file:
        raise ConfigError("set config.prompt or config.caption_file, not both")
    if p.threshold < 0 or p.warmup < 0:
        raise ConfigError(f"policy.threshold and policy.warmup must be >= 0, got {p.threshold}, {p.warmup}")
    if cfg.batch != 1:
        raise ConfigError("SkyReels-V2 runs one video at a time: set batch=1")
    if s.attention not in ("block_causal", "full"):
        raise ConfigError(f"sampler.attention must be block_causal or full, got {s.attention!r}")
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


@dataclasses.dataclass(frozen=True)
class DFPlan:
    """The run's static plan: window lengths and prefixes in latent frames (what run.py reports)."""

    windows: tuple[tuple[int, int], ...]  # (frames, prefix) per window
    latent_frames: int
    num_steps: int
    block: int

    @property
    def n_chunks(self) -> int:  # causal blocks of the whole video
        return -(-self.latent_frames // self.block)


def plan_windows(total: int, base: int, overlap: int, block: int) -> list[tuple[int, int]]:
    """(frames, prefix) per window: the first window has no prefix; each later one adds base - overlap frames."""
    if total <= base:
        return [(total - total % block or total, 0)]
    out, done = [(base, 0)], base
    while done < total:
        frames = min(total - done + overlap, base)
        frames -= frames % block
        if frames <= overlap:
            break
        out.append((frames, overlap))
        done += frames - overlap
    return out


@dataclasses.dataclass
class DFResult:
    video: np.ndarray  # [1, 1, C, F, H, W]: the whole latent video as one "chunk"
    decisions: np.ndarray  # int8 [calls, groups]: 1 computed, 0 reused, -1 not run
    chunk: np.ndarray  # int32 [calls, groups]: group index, -1 where not run
    computed: int  # group forwards run
    chunk_forwards_vanilla: int  # group forwards of the uncached run (every call runs every group)
    wall: dict
    traces: int = 1

    @property
    def computed_fraction(self) -> float:
        return self.computed / max(self.chunk_forwards_vanilla, 1)

    @property
    def speedup_ideal(self) -> float:
        return self.chunk_forwards_vanilla / max(self.computed, 1e-12)


@dataclasses.dataclass
class DFSampler:
    """Runs the windows of a plan with one policy; the per-window functions compile once per window shape."""

    cfg: ml_collections.ConfigDict
    mcfg: object

    def run(self, params: dict, cond: dict, plan: DFPlan, key: jax.Array, progress: bool = True,
            on_frames=None) -> DFResult:
        """All windows of the plan; ``on_frames(start, latents [C, n, h, w])`` gets every latent frame as soon as
        no later window rewrites it (a window's last ``overlap`` frames are the next window's prefix)."""
        from tqdm.auto import tqdm

        from models.skyreels_df import DFWindow, WindowTeaCache, skyreels_sigmas, teacache_decisions
        from models.skyreels_df import run_window as run_vanilla
        from models.skyreels_flowcache import GroupCache
        from models.skyreels_flowcache_compiled import group_schedule
        from models.skyreels_flowcache_compiled import run_window as run_groups

        s, pol = self.cfg.sampler, self.cfg.policy
        sigmas, timesteps = skyreels_sigmas(s.num_steps, s.shift)
        block = s.causal_block_size
        c, h, w = self.mcfg.in_dim, self.cfg.video.height // 8, self.cfg.video.width // 8
        video = np.zeros((c, plan.latent_frames, h, w), np.float32)
        decisions, computed, vanilla, done, emitted = [], 0, 0, 0, 0
        t0, t_callbacks = time.perf_counter(), 0.0
        for wi, (frames, prefix) in enumerate(tqdm(plan.windows, desc=f"{pol.name} windows", disable=not progress,
                                                   leave=False)):
            kw, ke = jax.random.split(jax.random.fold_in(key, wi))
            x = np.array(jax.random.normal(kw, (c, frames, h, w), jnp.float32))
            if prefix:
                x[:, :prefix] = video[:, done - prefix:done]
            win = DFWindow.build(frames, block, s.num_steps, s.ar_step, prefix)
            iters, groups = len(win.update_mask), frames // block
            eps = (np.asarray(jax.random.normal(ke, (iters, c, prefix, h, w), jnp.float32)) if prefix else None)
            fps = 0 if self.cfg.video.fps == 16 else 1  # the fps-embedding index (upstream: 16 fps -> 0, else 1)
            common = (self.mcfg, params, x, cond["context"], cond["negative_context"], fps, win, sigmas,
                      timesteps, s.guidance)
            vanilla += 2 * iters * groups
            if pol.name == "flowcache":
                cache = GroupCache(pol.threshold, ret_steps=pol.warmup, **({"coeffs": tuple(pol.coeffs)}
                                                                            if tuple(pol.coeffs) else {}))
                overlap = bool(prefix) and s.ar_step > 0  # the fork's flag (fixture README, defect 3)
                st = group_schedule(self.mcfg, params, win, timesteps, fps, block, cache, overlap,
                                    s.addnoise_condition)
                lat = np.asarray(run_groups(*common, block, st, s.addnoise_condition, eps))
                st = st.reshape(-1, groups)
                dec = np.where(st == 2, 0, np.where(st == 0, -1, 1)).astype(np.int8)
            else:
                comp = None
                if pol.name == "teacache":
                    tc = WindowTeaCache(pol.threshold, use_ret_steps=True, **({"coeffs": tuple(pol.coeffs)}
                                                                               if tuple(pol.coeffs) else {}))
                    comp, _, _ = teacache_decisions(self.mcfg, params, win.model_t(timesteps, s.addnoise_condition),
                                                    fps, tc)
                causal = block if s.attention == "block_causal" else 0
                lat = np.asarray(run_vanilla(*common, causal, s.addnoise_condition,
                                             None if eps is None else jnp.asarray(eps), compute=comp))
                calls = np.ones((iters, 2), bool) if comp is None else comp
                dec = np.repeat(calls.reshape(-1, 1), groups, 1).astype(np.int8)
            computed += int((dec == 1).sum())
            decisions.append(dec)
            final = lat[-1]
            video[:, done - prefix:done - prefix + frames] = final
            done += frames - prefix
            if on_frames is not None:
                final_end = done - (plan.windows[wi + 1][1] if wi + 1 < len(plan.windows) else 0)
                if final_end > emitted:
                    t_cb = time.perf_counter()
                    on_frames(emitted, video[:, emitted:final_end].copy())
                    t_callbacks += time.perf_counter() - t_cb
                    emitted = final_end
        dec = np.concatenate([np.pad(d, ((0, 0), (0, max(x.shape[1] for x in decisions) - d.shape[1])),
                                     constant_values=-1) for d in decisions])
        chunk = np.where(dec >= 0, np.arange(dec.shape[1])[None], -1).astype(np.int32)
        return DFResult(video=video[None, None], decisions=dec, chunk=chunk, computed=computed,
                        chunk_forwards_vanilla=vanilla,
                        wall={"compile": 0.0, "denoise": time.perf_counter() - t0 - t_callbacks})


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

    enc = PromptEncoder(release, text_len, cfg.text.cache_dir)
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


def build_skyreels(cfg: ml_collections.ConfigDict, n_chunks: int | None = None) -> Run:
    from experiments.pipeline import make_decoder, open_release, prompt_note
    from flowcache_jax import checkpoint
    from models.skyreels_v2 import SkyReelsConfig

    validate_skyreels(cfg)
    if not cfg.checkpoint:
        raise ConfigError(f"config.checkpoint is empty: {CONVERT_HINT}")
    try:
        params, meta = checkpoint.load(cfg.checkpoint)
    except checkpoint.CheckpointNotFound as e:
        raise ConfigError(f"{e}: {CONVERT_HINT}") from e
    if meta.get("model") != "skyreels_v2":
        raise ConfigError(f"{cfg.checkpoint} holds a {meta.get('model')!r} checkpoint, not skyreels_v2: {CONVERT_HINT}")
    try:
        mcfg = SkyReelsConfig.from_upstream(meta["model_config"])
    except ValueError as e:
        raise ConfigError(str(e)) from e
    params = jax.tree.map(jnp.asarray, params)
    v, s = cfg.video, cfg.sampler
    total = latent_frames(v.num_frames)
    if n_chunks is not None:  # a video of n causal blocks (benchmark's length sweep)
        total = n_chunks * s.causal_block_size
    plan = DFPlan(tuple(plan_windows(total, latent_frames(v.base_num_frames), latent_frames(v.overlap_history),
                                     s.causal_block_size)), total, s.num_steps, s.causal_block_size)
    cond, note = load_contexts(cfg.caption_file, mcfg)
    release = open_release(cfg.checkpoint, "skyreels_v2")
    text = None
    if cfg.get("prompt") is not None:
        cond, text = prompt_contexts(cfg, release, mcfg, int(meta["model_config"].get("text_len", 512)))
        note = f"{prompt_note(text)}, negative prompt {cfg.negative_prompt!r}"
    decoder = make_decoder(release)
    return Run(cfg=cfg, denoiser=None, params=params, cond=cond, table=plan, sampler=DFSampler(cfg, mcfg),
               decoder=decoder, text=text,
               notes={"contexts": note, "windows": [list(w) for w in plan.windows], **release.notes(),
                      "attention": s.attention if cfg.policy.name != "flowcache" else
                      "per-group executor (block-causal by construction, the FlowCache reference)",
                      "video": "decoded by the Wan VAE as windows finish" if decoder else "latents (no VAE)"})


def run_flops(run: Run, res: DFResult) -> dict:
    """Analytic FLOPs of the uncached run (spec §6) and the cached run's estimate (group forwards run)."""
    from models.skyreels_flops import forward_flops

    s, v, mcfg = run.cfg.sampler, run.cfg.video, run.sampler.mcfg
    tokens = (v.height // 8 // mcfg.patch_size[1]) * (v.width // 8 // mcfg.patch_size[2])
    text = int(run.cond["context"].shape[0])
    total = 0.0
    for frames, prefix in run.table.windows:
        iters = s.num_steps + max(frames // s.causal_block_size - prefix // s.causal_block_size - 1, 0) * s.ar_step
        per = forward_flops(mcfg.dim, mcfg.ffn_dim, mcfg.num_layers, text, tokens, frames, s.causal_block_size,
                            s.attention)
        total += 2 * iters * per["total"]
    return {"vanilla_pflops": total / 1e15, "cached_pflops_estimate": total * res.computed_fraction / 1e15,
            "note": "the estimate scales the uncached FLOPs by the fraction of group forwards run"}
