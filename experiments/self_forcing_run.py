"""Build a Self-Forcing run from a config: converted checkpoint, prompt context, blocks, policy, K/V storage.

The model is the causal Wan2.1-T2V generator; it runs on the one sampler with a window of one block (blocks are
generated one after the other), the re-noising few-step solver and the clean context pass as the sampler's
re-encode. Video fields are in pixel frames and pixels as upstream (the Wan VAE: 4x in time, 8x in space).
"""

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

CONVERT_HINT = ("convert the released generator first: python -m converters.convert --model=self_forcing "
                "--src=<self_forcing_dmd.pt> --allow_pickle_weights_only --dst=<DIR>, then pass "
                "--config.checkpoint=<DIR> (python -m converters.release --model=self_forcing ... adds the umT5 text "
                "encoder, its tokenizer and the Wan VAE, for prompts and decoded video)")
CONTEXT_PASSES = ("clean", "skip")
FIRST_FRAME_STREAM = 0x7F1F  # the noise stream of a text-to-video run's independent first frame (fold_in of the seed)


def latent_frames(frames: int) -> int:
    return (frames - 1) // 4 + 1


def validate_self_forcing(cfg: ml_collections.ConfigDict) -> None:
    v, s, p = cfg.video, cfg.sampler, cfg.policy
    steps = len(tuple(s.denoising_step_list))
    validate_policy(cfg, steps)
    if p.get("metric", "input") != "input":
        raise ConfigError("Self-Forcing's policies read the blocks' input features: set policy.metric=input")
    if p.name == "first_block":
        raise ConfigError("FirstBlockCache's probe is MAGI-1's: pick vanilla, teacache, flowcache or magcache")
    if p.reuse != "residual":
        raise ConfigError("the re-noising solver keeps a state per block: set policy.reuse=residual")
    if cfg.get("prompt") is not None and cfg.caption_file:
        raise ConfigError("set config.prompt or config.caption_file, not both")
    if steps < 1 or any(not 0 <= int(t) <= 1000 for t in s.denoising_step_list):
        raise ConfigError(f"sampler.denoising_step_list must be timesteps in [0, 1000], got {s.denoising_step_list}")
    if s.shift <= 0 or s.num_frame_per_block < 1 or s.sink_size < 0:
        raise ConfigError("sampler.shift > 0, num_frame_per_block >= 1 and sink_size >= 0")
    if s.context_pass not in CONTEXT_PASSES:
        raise ConfigError(f"sampler.context_pass must be one of {', '.join(CONTEXT_PASSES)}, got {s.context_pass!r}")
    if s.context_pass == "skip" and p.name != "vanilla":
        raise ConfigError("sampler.context_pass=skip writes a block's K/V from its last step, which a caching policy "
                          "may reuse instead of running: use policy.name=vanilla, or context_pass=clean")
    if not 0 <= cfg.kv.get("score_lambda", 1.0) <= 1:
        raise ConfigError(f"kv.score_lambda must be in [0, 1], got {cfg.kv.score_lambda}")
    if s.local_attn_size - s.sink_size < s.num_frame_per_block:
        raise ConfigError(f"sampler.local_attn_size ({s.local_attn_size}) - sink_size ({s.sink_size}) must hold at "
                          f"least one block ({s.num_frame_per_block} latent frames)")
    if v.num_frames < 1 or (v.num_frames - 1) % 4:
        raise ConfigError(f"video.num_frames={v.num_frames} must be 4k+1 pixel frames (the VAE's temporal stride)")
    first = 1 if s.independent_first_frame and not cfg.initial_latent else 0  # text-to-video: blocks [1, F, ...]
    if (latent_frames(v.num_frames) - first) % s.num_frame_per_block or latent_frames(v.num_frames) <= first:
        raise ConfigError(f"video.num_frames={v.num_frames} is {latent_frames(v.num_frames)} latent frames, not "
                          f"{'1 + ' if first else ''}a multiple of sampler.num_frame_per_block={s.num_frame_per_block}")
    if v.height % 16 or v.width % 16:
        raise ConfigError(f"video height/width {v.height}x{v.width} must be multiples of 16 (VAE 8 x patch 2)")
    from flowcache_jax.kv.methods import METHODS

    if cfg.kv.method not in METHODS:
        raise ConfigError(f"kv.method must be one of {', '.join(METHODS)}, got {cfg.kv.method!r}")


def load_checkpoint(path: str, param_dtype: str = ""):
    """(model config, params, metadata); the compute dtype follows the stored (or ``param_dtype``-cast) blocks."""
    from experiments.loaded import load_model
    from models.self_forcing import config_from_upstream

    params, meta = load_model(path, "self_forcing", CONVERT_HINT, param_dtype)
    bf16 = str(np.asarray(params["layers"]["ffn"]["fc1"]["kernel"]).dtype) == "bfloat16"
    try:
        return config_from_upstream(meta["model_config"], "bfloat16" if bf16 else "float32"), params, meta
    except ValueError as e:
        raise ConfigError(str(e)) from e


def contexts(cfg: ml_collections.ConfigDict, mcfg, meta: dict, release) -> tuple[np.ndarray, str, dict | None]:
    """The prompt's umT5 context [L, text_dim] (a prompt, a caption file, or zeros) and a note."""
    from experiments.pipeline import prompt_note
    from experiments.skyreels_run import load_contexts, prompt_contexts

    if cfg.get("prompt") is not None:
        text_len = int(meta["model_config"].get("text_len", 512))
        cfg_neg = ml_collections.ConfigDict(cfg.to_dict())
        cfg_neg.negative_prompt = ""
        ctx, text = prompt_contexts(cfg_neg, release, mcfg, text_len)
        return np.asarray(ctx["context"]), prompt_note(text), text
    ctx, note = load_contexts(cfg.caption_file, mcfg)
    return np.asarray(ctx["context"]), note, None


def initial_latent(path: str, den_cfg, h: int, w: int) -> np.ndarray | None:
    """Clean latent frames [C, F, h, w] the video continues (image-to-video: one frame), or None."""
    if not path:
        return None
    p = Path(path)
    if not p.is_file() or p.suffix != ".npz":
        raise ConfigError(f"initial_latent {p} must be an existing .npz with 'latents' [C, F, H, W]")
    with np.load(p, allow_pickle=False) as f:
        lat = np.asarray(f["latents"], np.float32) if "latents" in f.files else None
    if lat is None or lat.ndim != 4 or lat.shape[0] != den_cfg.in_dim or lat.shape[2:] != (h, w):
        raise ConfigError(f"initial_latent {p}: 'latents' must be [{den_cfg.in_dim}, F, {h}, {w}] (the video's "
                          f"latent size), got {None if lat is None else lat.shape}")
    return lat


class BlockDecoder:
    """The Wan VAE's streaming decoder fed block by block as the sampler finishes them (``on_chunk``), after the
    frames the video continues (``prefix`` [C, F, H, W]: given, or the generated first frame of the seed)."""

    def __init__(self, frames_decoder, block: int, prefix: np.ndarray | None):
        self.inner, self.block, self.prefix = frames_decoder, block, prefix
        self.offset = 0 if prefix is None else prefix.shape[1]

    @property
    def seconds(self) -> float:
        return self.inner.seconds

    def reset(self) -> None:
        self.inner.reset()
        if self.prefix is not None:  # the continued frames are the video's start
            self.inner(0, self.prefix)

    def __call__(self, chunk: int, latent: np.ndarray) -> None:
        self.inner(self.offset + chunk * self.block, latent[0])

    def frames(self) -> np.ndarray:
        return self.inner.frames()


def build_self_forcing(cfg: ml_collections.ConfigDict, n_chunks: int | None = None) -> Run:
    from experiments.pipeline import make_decoder, open_release
    from flowcache_jax.kv.methods import from_config
    from flowcache_jax.policies import make_policy
    from flowcache_jax.sampler import Sampler
    from flowcache_jax.schedules import magi_schedule, self_forcing_steps
    from flowcache_jax.solvers import ReNoise
    from models.self_forcing_denoiser import SelfForcingDenoiser

    validate_self_forcing(cfg)
    mcfg, params, meta = load_checkpoint(cfg.checkpoint, precision.param_dtype(cfg))
    mcfg, compute = precision.apply(cfg, mcfg)
    v, s = cfg.video, cfg.sampler
    h, w = v.height // 8, v.width // 8
    block = int(s.num_frame_per_block)
    release = open_release(cfg.checkpoint, "self_forcing")
    ctx, note, text = contexts(cfg, mcfg, meta, release)
    prefix = initial_latent(cfg.initial_latent, mcfg, h, w)
    first = prefix is None and bool(s.independent_first_frame)  # text-to-video: a 1-frame block first
    n_blocks = (latent_frames(v.num_frames) - first) // block if n_chunks is None else n_chunks
    try:
        _, ph, pw = mcfg.patch_size
        method = from_config(cfg.kv, (h // ph) * (w // pw))
        den = SelfForcingDenoiser(mcfg, block, h, w, kv_frames=int(s.local_attn_size), sink_frames=int(s.sink_size),
                                  key_tile=int(s.key_tile),
                                  prefix_frames=int(first) if prefix is None else prefix.shape[1],
                                  independent_first_frame=bool(s.independent_first_frame), kv_method=method,
                                  context_pass=s.context_pass)
        policy = make_policy(cfg.policy)
        timesteps, sigmas = self_forcing_steps(tuple(s.denoising_step_list), s.shift, s.warp_denoising_step)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    sampler = Sampler(den, policy, window=1, batch=cfg.batch, reuse="residual", metric_dtype=cfg.policy.metric_dtype,
                      reencode_clean=s.context_pass == "clean", solver=ReNoise(sigmas))
    table = magi_schedule(n_blocks, 1, len(timesteps), grid=1.0 - sigmas)
    batch_ctx = jnp.broadcast_to(jnp.asarray(ctx), (cfg.batch, *ctx.shape))
    frames_dec = make_decoder(release, cfg.get("compute"))
    decoder = None if frames_dec is None else BlockDecoder(frames_dec, block, prefix)
    given = None if prefix is None else jnp.broadcast_to(prefix, (cfg.batch, *prefix.shape))
    cond_for = None
    if first:  # upstream's [1, F, F, ...]: the first frame is a block of its own, then the video continues it
        one = dataclasses.replace(den, block=1, prefix_frames=0, independent_first_frame=False)
        first_sampler = Sampler(one, policy, window=1, batch=cfg.batch, reuse="residual",
                                metric_dtype=cfg.policy.metric_dtype, solver=ReNoise(sigmas))
        first_table = magi_schedule(1, 1, len(timesteps), grid=1.0 - sigmas)
        one_cond = one.prepare_cond(params, batch_ctx, timesteps, s.context_noise)
        made: dict = {}

        def cond_for(seed: int) -> dict:
            if seed not in made:  # its clean pass is the main run's prefix encode (prepare_kv), as upstream's
                key = jax.random.fold_in(jax.random.PRNGKey(seed), FIRST_FRAME_STREAM)
                lead = first_sampler.run(params, one_cond, first_table, key, progress=False).video[:, 0]
                made[seed] = den.prepare_cond(params, batch_ctx, timesteps, s.context_noise, prefix=jnp.asarray(lead))
            if decoder is not None:
                decoder.prefix, decoder.offset = np.asarray(made[seed]["prefix"][0]), 1
            return made[seed]

        cond = cond_for(cfg.seed)
    else:
        cond = den.prepare_cond(params, batch_ctx, timesteps, s.context_noise, prefix=given)
    notes = {"contexts": note, **release.notes(), **compute,
             "kv": f"{den.kv_frames} frames seen ({den.sink_frames} sink), history {den.history_frames} frame slots, "
                   f"{cfg.kv.method}" + ("" if method is None else f" ({_tiers_note(method)})"),
             "steps": [float(t) for t in timesteps], "context_pass": s.context_pass,
             "video": "decoded by the Wan VAE as blocks finish" if decoder else "latents (no VAE)"}
    if prefix is not None:
        notes["initial_latent"] = f"{prefix.shape[1]} clean frames from {cfg.initial_latent} (not in the latents)"
    if first:
        notes["first_frame"] = ("independent first frame: a 1-frame block generated first (its own compiled sampler; "
                                "its forwards and time are not in the run's records), then continued; not in the "
                                "latents, first in the decoded video")
    return Run(cfg=cfg, denoiser=den, params=params, cond=cond, table=table, sampler=sampler, decoder=decoder,
               text=text, notes=notes, cond_for=cond_for)


def _tiers_note(method) -> str:
    parts = [f"{t.tokens} tokens INT{t.bits}" for t in method.store.tiers]
    if method.store.summary and method.store.summarised:
        parts.append(f"{method.store.summarised} in one summary token")
    return ", ".join(parts) + " per frame and head"


def run_flops(run: Run, res) -> dict:
    """Analytic FLOPs: every block forward (denoising steps, and the clean passes when they run) of the causal DiT
    over its keys (the history it sees, then itself)."""
    from models.self_forcing import forward_flops

    den, mcfg = run.denoiser, run.denoiser.cfg
    text = int(run.cond["cross"][0].shape[2])  # (K, V) [B, layers, L, heads, hd]
    steps = run.table.steps_per_chunk
    clean = run.cfg.sampler.context_pass == "clean"
    vanilla = 0.0
    for b in range(run.table.n_chunks):
        seen = min(den.prefix_frames + b * den.block, den.history_frames) + den.block
        per = forward_flops(mcfg, den.frame_tokens, den.block, seen, text)
        vanilla += per * (steps + (clean and b < run.table.n_chunks - 1))
    vanilla *= run.cfg.batch
    share = res.computed_fraction  # the policy's skips are denoising steps; the clean passes always run
    passes = (run.table.n_chunks - 1) if clean else 0
    per_step = vanilla / max(res.chunk_forwards_vanilla + passes, 1)
    cached = per_step * (res.computed + passes)
    return {"vanilla_pflops": vanilla / 1e15, "cached_pflops_estimate": cached / 1e15, "computed_fraction": share,
            "note": "the estimate counts the forwards run at the run's mean forward cost"}


# The random Self-Forcing-architecture model: Wan's structure at a width that runs on a CPU.
SMALL_MODEL = dict(model_type="t2v", patch_size=[1, 2, 2], text_len=16, in_dim=16, dim=128, ffn_dim=512, freq_dim=64,
                   text_dim=32, out_dim=16, num_heads=4, num_layers=4, qk_norm=True, cross_attn_norm=True, eps=1e-6)
SMALL_VIDEO = dict(height=128, width=256)  # latent 16 x 32 -> 128 tokens per frame (a multiple of the 16-token group)


def random_checkpoint(folder: Path, seed: int = 1234, model: dict | None = None) -> Path:
    """A converted-checkpoint folder of ``model`` (default ``SMALL_MODEL``) initialised as the upstream fixtures
    are: N(0, 1/fan_in) weights, 1 + 0.1 N norm scales, 0.05 N biases, 0.1 N modulation tables."""
    import math

    from flowcache_jax import checkpoint
    from models.self_forcing import config_from_upstream
    from models.skyreels_v2 import param_shapes

    model = SMALL_MODEL if model is None else model
    cfg = config_from_upstream(model)
    shapes = param_shapes(cfg)
    rng = np.random.default_rng(seed)

    def init(path, shape):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        if name.endswith("modulation"):
            return 0.1 * rng.standard_normal(shape)
        if name.endswith("scale"):
            return 1.0 + 0.1 * rng.standard_normal(shape)
        if name.endswith("bias"):
            return 0.05 * rng.standard_normal(shape)
        fan_in = shape[-2] if len(shape) >= 2 else shape[-1]
        return rng.standard_normal(shape) / math.sqrt(fan_in)

    params = jax.tree_util.tree_map_with_path(lambda p, s: np.asarray(init(p, s), np.float32), shapes,
                                              is_leaf=lambda x: isinstance(x, tuple))
    checkpoint.write(folder, params, {"model": "self_forcing", "role": "dit", "model_config": model,
                                      "source": {"init": f"upstream-style random, seed {seed}"}})
    return folder
