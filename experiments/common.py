"""What every experiment CLI shares: config names, validation, building a run, one-line errors."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ml_collections

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEFAULT_CONFIG = "tiny_fast"  # the embedded default: the tiny MAGI-1 trained here, shipped in the repo


class ConfigError(ValueError):
    """A bad config value; reported as one line, never a traceback."""


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


def write_video_outputs(run, video, out: Path, name: str = "video") -> list[Path]:
    """``name``.mp4 and ``name``_frames.png (a strip of every frame) of the first video."""
    from flowcache_jax import io

    frames = run.rgb_frames(video)
    if isinstance(run.cond, dict) and "prefix" in run.cond:  # a continuation: show the given frames first
        import numpy as np

        frames = np.concatenate([run.rgb_frames(np.asarray(run.cond["prefix"])[None]), frames])
    fps = int(run.cfg.get("output", {}).get("fps", 8))
    paths = [out / f"{name}.mp4", out / f"{name}_frames.png"]
    io.write_mp4(paths[0], frames, fps)
    io.write_png(paths[1], io.frame_strip(frames, per_row=run.cfg.get("output", {}).get("per_row", 8)))
    return paths


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
