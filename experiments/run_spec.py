"""What a built run is: a model's denoiser, parameters, conditions, schedule and sampler, and how to sample it.

Builders (``experiments/*_run.py``, found through ``experiments.registry``) make a ``Run``; the CLIs use it. This
module imports no builder, so builders can import it without a cycle.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import ml_collections


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
    policy: Any = None  # the policy to run with: same rule as the sampler's, maybe other knobs (None: the sampler's)

    def with_knobs(self, cfg: ml_collections.ConfigDict) -> Run:
        """This run with ``cfg``'s policy knobs (another threshold, warm-up, coefficients): it shares the sampler and
        so its compiled function; the rule itself must be the same (else build another run)."""
        from flowcache_jax.policies import make_policy
        from flowcache_jax.policies.base import structure

        policy = make_policy(cfg.policy)
        if structure(policy) != structure(self.sampler.policy):
            raise ValueError(f"{cfg.policy.name} is not the rule this run was built for: build another run")
        return dataclasses.replace(self, cfg=cfg, policy=policy)

    @property
    def compiles(self) -> int:
        """Stage-function compilations this run's sampler made so far."""
        return int(self.sampler.traces)

    def sample(self, progress: bool = True, seed: int | None = None, decode: bool = True, **resumable: Any
               ) -> tuple[Any, Any]:
        """(result, uint8 frames [T, H, W, 3] or None): one video, decoded chunk by chunk as chunks finish when
        the checkpoint has a VAE (``decoder.seconds`` is the decode time, excluded from the denoise time).
        ``resumable``: the sampler's ``resume`` / ``on_checkpoint`` / ``checkpoint_every`` (flowcache_jax.resume)."""
        import jax

        cond = self.conditions(self.cfg.seed if seed is None else seed)  # (a seed's own prefix, where it has one)
        key = self.key if seed is None else jax.random.PRNGKey(seed)
        dec = self.decoder if decode else None
        if dec is not None:
            dec.reset()
        res = self.sampler.run(self.params, cond, self.table, key, progress=progress, on_chunk=dec, policy=self.policy,
                               **resumable)
        return res, (None if dec is None else dec.frames())

    def conditions(self, seed: int):
        if self.cond_for is None or seed == self.cfg.seed:
            return self.cond if self.cond_for is None else self.cond_for(seed)
        return self.cond_for(seed)

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


def with_policy(cfg: ml_collections.ConfigDict, name: str, threshold: float | None = None
                ) -> ml_collections.ConfigDict:
    """A copy of ``cfg`` with another policy (e.g. the vanilla reference of a cached config)."""
    c = ml_collections.ConfigDict(cfg.to_dict())
    c.policy.name = name
    if threshold is not None:
        c.policy.threshold = threshold
    return c
