"""Shared base of the synthetic presets: an analytic flow field on a MAGI-style staggered window."""

import ml_collections


def get_base(name: str, policy: str, threshold: float = 0.0) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = name
    c.model = "synthetic"
    c.seed = 0
    c.batch = 2  # videos per run; they share decisions (one rel-L1 over the batch, like CFG copies)
    c.synthetic = ml_collections.ConfigDict(dict(
        frames=2, height=8, width=8, channels=4, mixture=3, data_scale=1.0, component_std=0.3,
        noise_scale=1.0, rho=0.5, hidden=256, work=8, feat_dim=8, seed=0))
    c.schedule = ml_collections.ConfigDict(dict(
        kind="magi",  # "magi" (staggered window) or "df" (diffusion-forcing step matrix)
        n_chunks=8, window=4, steps_per_chunk=32, ar_step=8, power=2.0, shift=3.0))
    c.policy = ml_collections.ConfigDict(dict(
        name=policy, threshold=threshold, warmup=5, coeffs=(),
        reuse="displacement",  # "displacement" (MAGI: replay the latent step) or "residual" (SkyReels)
        metric_dtype="float32",  # "bfloat16" reproduces the MAGI reference's metric rounding
        ratios=(), max_skips=4,  # MagCache: calibrated ratios per step (empty: calibrate), skip cap
        min_charge=0.0,  # FlowCache guard: least accumulator charge per step, caps a reuse run (0: reference rule)
        metric="input", semantics="intended"))
    return c
