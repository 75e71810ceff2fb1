"""SkyReels-V2 with batch > 1: each video of a batch is the batch-1 run of its own noise.

A tiny random DiT, a long video of two DF windows (overlap history, addnoise on the prefix) under FlowCache's
timestep rule (a host table, so the decisions are the same for every video), on both executors, with both CFG
branches in one batched forward and (groups executor) one forward per branch, as texts of other lengths run.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import numpy as np
import pytest

from experiments.errors import ConfigError
from flowcache_jax import sharding
from flowcache_jax.policies.group_flowcache import GroupFlowCache
from flowcache_jax.sampler import Sampler
from flowcache_jax.schedules import skyreels_sigmas
from flowcache_jax.solvers import FlowUniPC
from flowcache_jax.windows import DFPlan, DFSchedule, WindowedSampler, plan_windows
from models.skyreels_denoiser import SkyReelsDenoiser
from models.skyreels_v2 import SkyReelsConfig, init_params

BLOCK, LATENT, STEPS, AR_STEP, ADDNOISE = 2, 8, 6, 1, 20
TOL = dict(rtol=1e-5, atol=1e-6)


@functools.cache
def model():
    cfg = SkyReelsConfig(dim=32, ffn_dim=64, num_heads=2, num_layers=2, freq_dim=16, text_dim=16, in_dim=4, out_dim=4)
    return cfg, init_params(cfg, jax.random.PRNGKey(0))


def windowed(executor: str, batch: int, batched_cfg: bool = True, layout: Any = None) -> WindowedSampler:
    """One windowed sampler per executor, batch size, conditions' structure (both CFG branches in one tree or
    one per branch) and mesh: its compiled stage is shared by the cases."""
    return _windowed(executor, batch, batched_cfg, layout)


@functools.cache
def _windowed(executor: str, batch: int, batched_cfg: bool, layout: Any) -> WindowedSampler:
    cfg, _ = model()
    sig, ts = skyreels_sigmas(STEPS, 8.0)
    policy = GroupFlowCache(threshold=0.05, warmup=1)

    def make(groups: int) -> Sampler:
        den = SkyReelsDenoiser(cfg, groups, BLOCK, LATENT, LATENT, executor=executor, constrain=layout)
        return Sampler(den, policy, groups, batch, reuse="residual", solver=FlowUniPC(sig),
                       joint=executor == "window", features="none", identity_ring=True, layout=layout)

    # FlowCache's long-video rule (the prefix runs on the first call only), as skyreels_run builds it
    return WindowedSampler(make, DFSchedule(STEPS, AR_STEP, BLOCK, ts, sig, ADDNOISE, "first"), policy)


def inputs(ws: WindowedSampler, plan: DFPlan, batch: int) -> tuple[list, list]:
    """Per window, the batch's initial noise [B, C, F, h, w] and addnoise eps [B, I, C, prefix, h, w]."""
    rng = np.random.default_rng(7)
    c = model()[0].in_dim
    noise, eps = [], []
    for (frames, prefix), table in zip(plan.windows, ws.tables(plan), strict=True):
        noise.append(rng.standard_normal((batch, c, frames, LATENT, LATENT), np.float32))
        iters = int(table.step_valid.sum())
        eps.append(rng.standard_normal((batch, iters, c, prefix, LATENT, LATENT), np.float32) if prefix else None)
    return noise, eps


def per_branch(cond: dict) -> dict:
    """The same conditions as one tree per CFG branch: the sampler then runs one forward per branch."""
    out = {k: v for k, v in cond.items() if k != "ctx_both"}
    return {**out, "ctx": tuple(SkyReelsDenoiser.branch_ctx(cond, b) for b in range(2))}


@pytest.mark.parametrize("executor", ["groups", "window"])
def test_batch_videos_equal_their_batch_one_runs(executor):
    cfg, params = model()
    plan = DFPlan(tuple(plan_windows(10, 6, 2, BLOCK)), 10, STEPS, BLOCK)  # two windows, 2 frames of overlap
    assert len(plan.windows) == 2 and plan.windows[1][1] > 0
    ctx = jax.random.normal(jax.random.PRNGKey(3), (8, cfg.text_dim))
    neg = jax.random.normal(jax.random.PRNGKey(4), (8, cfg.text_dim))
    two, one = windowed(executor, 2), windowed(executor, 1)
    cond = two.sampler(3).denoiser.prepare_cond(params, ctx, neg, 1, 5.0, ADDNOISE)
    assert two.sampler(3).denoiser.batches_branches(cond)  # both CFG branches in one batched forward
    noise, eps = inputs(two, plan, 2)
    key = jax.random.PRNGKey(1)
    res = two.run(params, cond, plan, key, progress=False, noise=noise, eps=eps)
    assert res.video.shape == (2, 1, cfg.in_dim, 10, LATENT, LATENT)
    assert np.abs(res.video[0] - res.video[1]).max() > 0.1  # two different videos
    assert (res.decisions == 0).any() and (res.decisions == 1).any()  # the rule reused some calls
    for b in range(2):
        ref = one.run(params, cond, plan, key, progress=False, noise=[n[b] for n in noise],
                      eps=[None if e is None else e[b] for e in eps])
        np.testing.assert_allclose(res.video[b], ref.video[0], **TOL, err_msg=f"video {b}")
        np.testing.assert_array_equal(res.decisions, ref.decisions)
        assert res.computed == ref.computed and res.structure_skipped == ref.structure_skipped
    assert two.traces == 1 and one.traces == 1  # one window size: one compilation per batch size
    if executor == "groups":  # one forward per branch (texts of other lengths) over the batched K/V buffers
        split = windowed(executor, 2, False).run(params, per_branch(cond), plan, key, progress=False, noise=noise,
                                                 eps=eps)
        np.testing.assert_allclose(split.video, res.video, **TOL)
        np.testing.assert_array_equal(split.decisions, res.decisions)


def test_seeded_batch_draws_a_noise_per_video():
    """Without given noise each window draws the batch's initial noise and addnoise eps at once (each video its
    own); video b of the seeded batch is the batch-1 run of its slice of those draws."""
    cfg, params = model()
    plan = DFPlan(tuple(plan_windows(10, 6, 2, BLOCK)), 10, STEPS, BLOCK)
    ctx = jax.random.normal(jax.random.PRNGKey(3), (8, cfg.text_dim))
    two, one = windowed("groups", 2), windowed("groups", 1)
    cond = two.sampler(3).denoiser.prepare_cond(params, ctx, ctx, 1, 5.0, ADDNOISE)
    key = jax.random.PRNGKey(5)
    res = two.run(params, cond, plan, key, progress=False)
    assert np.abs(res.video[0] - res.video[1]).max() > 0.1
    noise, eps = [], []
    for w, ((frames, prefix), table) in enumerate(zip(plan.windows, two.tables(plan), strict=True)):
        kw, ke = jax.random.split(jax.random.fold_in(key, w))
        noise.append(np.asarray(jax.random.normal(kw, (2, cfg.in_dim, frames, LATENT, LATENT))))
        iters = int(table.step_valid.sum())
        eps.append(np.asarray(jax.random.normal(ke, (2, iters, cfg.in_dim, prefix, LATENT, LATENT)))
                   if prefix else None)
    for b in range(2):
        ref = one.run(params, cond, plan, key, progress=False, noise=[n[b] for n in noise],
                      eps=[None if e is None else e[b] for e in eps])
        np.testing.assert_allclose(res.video[b], ref.video[0], **TOL, err_msg=f"video {b}")


def test_mesh_batch_on_the_data_axis():
    """data=4 x seq=2 with a batch of 4: data does not divide the two CFG branches, so it splits the videos (each
    device pair holds one video's K/V and residuals, block tokens over seq); each video is its batch-1 run."""
    if jax.device_count() < 8:
        pytest.skip(f"needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8), found "
                    f"{jax.device_count()}")
    cfg, params = model()
    layout = sharding.Layout(sharding.make_mesh(sharding.MeshConfig(4, 1, 2)))
    plan = DFPlan(tuple(plan_windows(10, 6, 2, BLOCK)), 10, STEPS, BLOCK)
    ctx = jax.random.normal(jax.random.PRNGKey(3), (8, cfg.text_dim))
    four, one = windowed("groups", 4, layout=layout), windowed("groups", 1)
    cond = one.sampler(3).denoiser.prepare_cond(params, ctx, ctx, 1, 5.0, ADDNOISE)
    noise, eps = inputs(four, plan, 4)
    key = jax.random.PRNGKey(1)
    res = four.run(sharding.shard_params(params, layout, "skyreels_v2"), cond, plan, key, progress=False,
                   noise=noise, eps=eps)
    (_, _, state, _, _, _), _ = next(iter(four.sampler(3)._compiled.values())).input_shardings
    P = jax.sharding.PartitionSpec
    assert state.kv[0].spec == P(None, "data", None, "seq") and state.cache.spec == P(None, None, "data", "seq")
    for b in range(4):
        ref = one.run(params, cond, plan, key, progress=False, noise=[n[b] for n in noise],
                      eps=[None if e is None else e[b] for e in eps])
        np.testing.assert_allclose(res.video[b], ref.video[0], **TOL, err_msg=f"video {b}")
        np.testing.assert_array_equal(res.decisions, ref.decisions)


@pytest.mark.parametrize("batch", [0, -2])
def test_bad_batch_is_one_config_error(batch):
    from experiments.configs.skyreels_fast import get_config
    from experiments.skyreels_run import validate_skyreels

    c = get_config()
    c.batch = batch
    with pytest.raises(ConfigError, match=r"batch must be >= 1") as e:
        validate_skyreels(c)
    assert "\n" not in str(e.value)


def test_mesh_data_must_divide_the_branches_or_the_batch():
    import ml_collections

    from experiments.skyreels_run import mesh_check

    den = SkyReelsDenoiser(model()[0], 1, BLOCK, LATENT, LATENT)
    mesh = ml_collections.ConfigDict({"data": 4, "fsdp": 1, "seq": 2})
    mesh_check(mesh, den, 4)  # the videos go on data
    with pytest.raises(ConfigError, match=r"must divide SkyReels-V2's 2 CFG branches or config.batch=2") as e:
        mesh_check(mesh, den, 2)
    assert "\n" not in str(e.value)
