"""What every experiment CLI shares: config names, validation, building a run, one-line errors."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ml_collections

from experiments.errors import ConfigError  # noqa: F401 (re-exported: the CLIs catch it)

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEFAULT_CONFIG = "tiny_fast"  # the embedded default: the tiny MAGI-1 trained here, shipped in the repo



def config_names() -> list[str]:
    names = (p.stem for p in CONFIG_DIR.glob("*.py"))
    return sorted(n for n in names if not n.startswith("_") and not n.endswith("_base"))


def resolve_config_argv(argv: list[str], default: str = DEFAULT_CONFIG) -> list[str]:
    """Turn ``--config=NAME`` (or no --config) into the preset's file path for ml_collections."""
    out, seen = [], False
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            seen = True
            name = a.split("=", 1)[1]
            if not name.endswith(".py"):
                if name not in config_names():
                    fail(f"unknown config {name!r}; available: {', '.join(config_names())}")
                name = str(CONFIG_DIR / f"{name}.py")
            elif not Path(name).is_file():
                fail(f"config file {name} does not exist")
            a = f"--config={name}"
        elif a == "--config" and i + 1 < len(argv):
            fail("write --config=NAME (with '=')")
        out.append(a)
    if not seen:
        out.insert(1, f"--config={CONFIG_DIR / f'{default}.py'}")
    return out


def fail(msg: str, code: int = 2) -> None:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(code)


def run_app(main: Callable[[list[str]], Any], default: str | None = DEFAULT_CONFIG) -> None:
    """absl ``app.run`` with short config names (``default=None``: no --config) and one-line errors."""
    from absl import app, logging

    logging.set_verbosity(logging.WARNING)
    if default is not None:
        sys.argv = resolve_config_argv(sys.argv, default)

    def wrapped(argv):
        try:
            return main(argv)
        except ConfigError as e:
            fail(str(e))

    app.run(wrapped)


def validate_policy(cfg: ml_collections.ConfigDict, steps_per_chunk: int) -> None:
    """Reject bad policy values with a message that says what to change."""
    from flowcache_jax.policies import POLICIES
    from flowcache_jax.sampler import METRIC_DTYPES, REUSE_MODES

    p = cfg.policy
    if p.name not in POLICIES:
        raise ConfigError(f"unknown policy {p.name!r}; set --config.policy.name to one of {', '.join(POLICIES)}")
    if p.threshold < 0:
        raise ConfigError(f"policy.threshold must be >= 0, got {p.threshold}")
    if not 0 <= p.warmup <= steps_per_chunk:
        raise ConfigError(f"policy.warmup={p.warmup} must be in [0, steps per chunk={steps_per_chunk}]")
    if p.reuse not in REUSE_MODES:
        raise ConfigError(f"policy.reuse must be one of {REUSE_MODES}, got {p.reuse!r}")
    if p.name == "magcache":
        ratios = tuple(p.get("ratios", ()))
        if ratios and len(ratios) != steps_per_chunk:
            raise ConfigError(f"policy.ratios has {len(ratios)} entries; MagCache needs one per step "
                              f"({steps_per_chunk}) or none (then an uncached calibration run computes them)")
        if p.get("max_skips", 4) < 1:
            raise ConfigError(f"policy.max_skips must be >= 1, got {p.max_skips}")
    if p.metric_dtype not in METRIC_DTYPES:
        raise ConfigError(f"policy.metric_dtype must be one of {tuple(METRIC_DTYPES)}, got {p.metric_dtype!r}")
    if cfg.batch < 1:
        raise ConfigError(f"batch must be >= 1, got {cfg.batch}")


def validate(cfg: ml_collections.ConfigDict) -> None:
    """Validate a synthetic config."""
    s = cfg.schedule
    validate_policy(cfg, s.steps_per_chunk)
    if s.kind not in ("magi", "df"):
        raise ConfigError(f"schedule.kind must be 'magi' or 'df', got {s.kind!r}")
    if s.n_chunks < 1 or s.window < 1 or s.steps_per_chunk < 1:
        raise ConfigError("schedule.n_chunks, schedule.window and schedule.steps_per_chunk must be >= 1")
    if s.kind == "magi" and s.steps_per_chunk % s.window:
        raise ConfigError(f"schedule.steps_per_chunk={s.steps_per_chunk} must be a multiple of "
                          f"schedule.window={s.window}")
    if s.kind == "df" and s.ar_step < 0:
        raise ConfigError(f"schedule.ar_step must be >= 0, got {s.ar_step}")
    if s.power <= 0 or s.shift <= 0:
        raise ConfigError(f"schedule.power and schedule.shift must be > 0, got {s.power}, {s.shift}")


@dataclasses.dataclass
class Run:
    """Everything a CLI needs for one configured video."""

    cfg: ml_collections.ConfigDict
    denoiser: Any
    params: Any
    cond: Any
    table: Any
    sampler: Any
    notes: dict = dataclasses.field(default_factory=dict)  # what the run used (e.g. which caption)
    cond_for: Callable[[int], Any] | None = None  # the conditions of another seed (e.g. its continuation prefix)
    decoder: Any = None  # the checkpoint's VAE (experiments.pipeline): decodes chunks as they finish; None: no VAE
    text: dict | None = None  # what the prompt encoding did (tokens, truncated, cached, seconds); None: no prompt

    def sample(self, progress: bool = True, seed: int | None = None, decode: bool = True) -> tuple[Any, Any]:
        """(result, uint8 frames [T, H, W, 3] or None): one video, decoded chunk by chunk as chunks finish when
        the checkpoint has a VAE (``decoder.seconds`` is the decode time, excluded from the denoise time)."""
        import jax

        cond = self.cond if seed is None else self.conditions(seed)
        key = self.key if seed is None else jax.random.PRNGKey(seed)
        dec = self.decoder if decode else None
        if dec is not None:
            dec.reset()
        hook = {} if dec is None else ({"on_frames": dec} if self.cfg.model == "skyreels_v2" else {"on_chunk": dec})
        res = self.sampler.run(self.params, cond, self.table, key, progress=progress, **hook)
        return res, (None if dec is None else dec.frames())

    def conditions(self, seed: int):
        return self.cond if self.cond_for is None else self.cond_for(seed)

    @property
    def key(self):
        import jax

        return jax.random.PRNGKey(self.cfg.seed)

    def frames(self, video):
        """[B, n_chunks, ...] latents -> [n_chunks, frames, H, W, C] of the first video, for previews."""
        import numpy as np

        v = np.asarray(video[0])
        return v if self.cfg.model == "synthetic" else v.transpose(0, 2, 3, 4, 1)

    def images(self, video):
        """[..., H, W, C] frames of every video, for PSNR/SSIM (MAGI latents are channel-first)."""
        import numpy as np

        v = np.asarray(video)
        return v if self.cfg.model == "synthetic" else np.moveaxis(v, 2, -1)

    @property
    def rgb(self) -> bool:
        """The latents are RGB frames in [-1, 1] (the tiny model), not a VAE latent."""
        return self.cfg.get("output", {}).get("decode", "latent") == "rgb"

    @property
    def data_range(self):
        """The value range PSNR/SSIM use as peak: fixed for RGB frames, else the reference's own range."""
        return (-1.0, 1.0) if self.rgb else None

    def rgb_frames(self, video, scale: int | None = None):
        """uint8 [T, H·s, W·s, 3] of the first video: RGB frames as they are, latents as a normalised preview."""
        import numpy as np

        f = self.frames(video)
        f = f.reshape(-1, *f.shape[-3:])
        if self.rgb:
            f = (f[..., :3] + 1.0) / 2.0
        else:
            f = f[..., :3] if f.shape[-1] >= 3 else np.repeat(f[..., :1], 3, -1)
            lo, hi = np.percentile(f, 1), np.percentile(f, 99)
            f = (f - lo) / max(hi - lo, 1e-9)
        s = scale or int(self.cfg.get("output", {}).get("scale", 1))
        f = np.clip(f * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return f.repeat(s, 1).repeat(s, 2)


def magcache_ratios(res: Any, table: Any) -> tuple[float, ...]:
    """MagCache's calibration from an uncached run: mean ||v_k|| / ||v_{k-1}|| per local step."""
    import numpy as np

    from flowcache_jax.policies.magcache import calibrate_ratios

    k = table.k.reshape(-1, table.window)[table.step_valid.reshape(-1)]
    n_steps = len(table.grid) - 1
    norms = np.full((table.n_chunks, n_steps), np.nan)
    ok = res.chunk >= 0
    norms[res.chunk[ok], k[ok]] = res.velocity_l1[ok]
    return tuple(float(r) for r in calibrate_ratios(norms))


def calibrate(cfg: ml_collections.ConfigDict, seed_offset: int = 1) -> ml_collections.ConfigDict:
    """A MagCache config without ratios gets them from an uncached run at ``seed + seed_offset``."""
    if cfg.policy.name != "magcache" or tuple(cfg.policy.get("ratios", ())):
        return cfg
    van = with_policy(cfg, "vanilla")
    van.seed = cfg.seed + seed_offset
    run = build(van)
    res = run.sampler.run(run.params, run.cond, run.table, run.key, progress=False)
    out = ml_collections.ConfigDict(cfg.to_dict())
    out.policy.ratios = magcache_ratios(res, run.table)
    return out


def build(cfg: ml_collections.ConfigDict, n_chunks: int | None = None) -> Run:
    """Validate, then make the denoiser, params, schedule table and sampler of a config."""
    cfg = calibrate(cfg)
    if cfg.model == "magi1":
        from experiments.magi_run import build_magi1

        return build_magi1(cfg, n_chunks)
    if cfg.model == "skyreels_v2":
        from experiments.skyreels_run import build_skyreels

        return build_skyreels(cfg, n_chunks)
    if cfg.model != "synthetic":
        raise ConfigError(f"unknown model {cfg.model!r}; use synthetic or magi1")
    from flowcache_jax.policies import make_policy
    from flowcache_jax.sampler import Sampler
    from flowcache_jax.schedules import df_schedule, flow_time_grid, magi_schedule
    from flowcache_jax.synthetic import SyntheticFlow

    validate(cfg)
    s = cfg.schedule
    n = s.n_chunks if n_chunks is None else n_chunks
    try:
        denoiser = SyntheticFlow(**cfg.synthetic.to_dict())
        grid = flow_time_grid(s.steps_per_chunk, s.power, s.shift)
        table = (magi_schedule(n, s.window, s.steps_per_chunk, grid) if s.kind == "magi"
                 else df_schedule(n, s.steps_per_chunk, s.ar_step, grid))
        policy = make_policy(cfg.policy)
        sampler = Sampler(denoiser, policy, table.window, cfg.batch, cfg.policy.reuse, cfg.policy.metric_dtype)
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e)) from e
    return Run(cfg=cfg, denoiser=denoiser, params=denoiser.init_params(), cond=None, table=table, sampler=sampler)


def pipeline_times(run) -> dict:
    """Seconds of the prompt encoding and of the VAE decode of the last video, where the run had them."""
    out = {}
    if run.text:
        out["text_encode"] = float(run.text["seconds"])
    if run.decoder is not None:
        out["decode"] = float(run.decoder.seconds)
    return out


def compare(run, res, frames, ref, ref_frames) -> dict:
    """A video against the uncached one: PSNR / SSIM on the decoded uint8 frames (what the paper reports) when
    there is a VAE, on the latents otherwise; latent figures kept as secondary."""
    from flowcache_jax import metrics

    a, b = run.images(res.video), run.images(ref.video)
    out = {"space": "latent", "psnr": metrics.psnr(a, b, run.data_range), "ssim": metrics.ssim(a, b, run.data_range),
           "rel_l1": metrics.rel_l1(res.video, ref.video)}
    if frames is not None and ref_frames is not None:
        fa, fb = to_unit(frames), to_unit(ref_frames)
        out = {"space": "pixels", "psnr": metrics.psnr(fa, fb, (-1.0, 1.0)), "ssim": metrics.ssim(fa, fb, (-1.0, 1.0)),
               "latent_psnr": out["psnr"], "latent_ssim": out["ssim"], "rel_l1": out["rel_l1"]}
    return out


def to_unit(frames_u8):
    """uint8 frames -> float32 in [-1, 1] (the range PSNR/SSIM/LPIPS take)."""
    import numpy as np

    return np.asarray(frames_u8, np.float32)[None] / 127.5 - 1.0


def output_fps(cfg: ml_collections.ConfigDict) -> int:
    return int(cfg.get("output", {}).get("fps", 0) or cfg.get("video", {}).get("fps", 8))


def write_video_outputs(run, video, out: Path, name: str = "video", frames=None) -> list[Path]:
    """``name``.mp4 and ``name``_frames.png (a strip of every frame) of the first video; ``frames`` (uint8,
    decoded by the VAE) replace the latent preview."""
    import numpy as np

    from flowcache_jax import io

    given = isinstance(run.cond, dict) and "prefix" in run.cond  # a continuation: show the given frames first
    if frames is None:
        frames = run.rgb_frames(video)
        if given:
            frames = np.concatenate([run.rgb_frames(np.asarray(run.cond["prefix"])[None]), frames])
    elif given and hasattr(run.decoder, "decode"):
        frames = np.concatenate([*(run.decoder.decode(np.asarray(c)) for c in run.cond["prefix"]), frames])
    fps = output_fps(run.cfg)
    paths = [out / f"{name}.mp4", out / f"{name}_frames.png"]
    io.write_mp4(paths[0], frames, fps)
    io.write_png(paths[1], io.frame_strip(strip_frames(frames), per_row=run.cfg.get("output", {}).get("per_row", 8)))
    return paths


def strip_frames(frames, max_frames: int = 24, max_side: int = 256):
    """The frames a PNG strip shows: all of a short small video; else evenly spaced ones, box-downscaled so the
    longer side is at most ``max_side`` (a 720p, 240-frame video would make a 370 MB strip)."""
    import numpy as np

    t, h, w, _ = frames.shape
    if t > max_frames:
        frames = frames[np.linspace(0, t - 1, max_frames).round().astype(int)]
    f = -(-max(h, w) // max_side)
    if f > 1:
        hh, ww = h // f * f, w // f * f
        frames = frames[:, :hh, :ww].reshape(len(frames), hh // f, f, ww // f, f, 3).mean((2, 4)).astype(np.uint8)
    return frames


def with_policy(cfg: ml_collections.ConfigDict, name: str, threshold: float | None = None
                ) -> ml_collections.ConfigDict:
    """A copy of ``cfg`` with another policy (e.g. the vanilla reference of a cached config)."""
    c = ml_collections.ConfigDict(cfg.to_dict())
    c.policy.name = name
    if threshold is not None:
        c.policy.threshold = threshold
    return c


def format_table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    """A plain fixed-width table."""

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(cols)]
    line = "  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join([line, sep, *body])
