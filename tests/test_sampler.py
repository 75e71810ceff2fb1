"""The sampler on the synthetic flow: parity with vanilla, forced computes, real skips, one compile."""

import functools

import jax
import numpy as np
import pytest

from experiments import common
from experiments.configs.synthetic_base import get_base
from flowcache_jax.policies import FlowCache
from flowcache_jax.sampler import Sampler
from flowcache_jax.schedules import magi_schedule
from flowcache_jax.synthetic import SyntheticFlow


def config(policy="vanilla", threshold=0.0, reuse="displacement", n=4, window=4, steps=16, kind="magi", ar=4,
           batch=2, **syn):
    c = get_base("test", policy, threshold)
    c.batch = batch
    c.policy.reuse = reuse
    c.schedule.update(dict(kind=kind, n_chunks=n, window=window, steps_per_chunk=steps, ar_step=ar))
    c.synthetic.update({**dict(frames=1, height=4, width=4, channels=3, hidden=8, work=0), **syn})
    return c


@functools.cache
def result(policy="vanilla", threshold=0.0, reuse="displacement", kind="magi"):
    run = common.build(config(policy, threshold, reuse, kind=kind))
    return run, run.sampler.run(run.params, run.cond, run.table, run.key, progress=False)


@pytest.mark.parametrize("policy,reuse", [("flowcache", "displacement"), ("flowcache", "residual"),
                                          ("teacache", "displacement"), ("teacache", "residual")])
def test_zero_threshold_is_vanilla(policy, reuse):
    _, van = result()
    _, res = result(policy, 0.0, reuse)
    np.testing.assert_array_equal(res.decisions, van.decisions)
    np.testing.assert_array_equal(res.video, van.video)
    assert res.computed == van.computed == van.chunk_forwards_vanilla


def flat(table, name):
    a = getattr(table, name)
    valid = table.step_valid.reshape(-1)
    return a.reshape(-1, *a.shape[2:])[valid]


@pytest.mark.parametrize("reuse", ["displacement", "residual"])
def test_huge_threshold_flowcache_only_forced(reuse):
    run, res = result("flowcache", 1e9, reuse)
    t, warm = run.table, run.cfg.policy.warmup
    forced = (flat(t, "global_first")[:, None] | flat(t, "global_last")[:, None] | flat(t, "first")
              | (flat(t, "k") < warm))
    expect = np.where(flat(t, "active"), forced.astype(np.int8), -1)
    np.testing.assert_array_equal(res.decisions, expect)
    assert res.computed == int((expect == 1).sum()) < res.chunk_forwards_vanilla
    assert np.isfinite(res.video).all()


def test_huge_threshold_teacache_only_forced():
    run, res = result("teacache", 1e9)
    t, warm = run.table, run.cfg.policy.warmup
    step = np.arange(t.num_steps)[:, None]
    forced = (flat(t, "global_first")[:, None] | flat(t, "global_last")[:, None] | (step < warm)
              | flat(t, "first"))
    expect = np.where(flat(t, "active"), forced.astype(np.int8), -1)
    np.testing.assert_array_equal(res.decisions, expect)


def test_cached_run_differs_but_stays_close():
    _, van = result()
    _, res = result("flowcache", 0.05)
    assert van.computed > res.computed > 0
    assert not np.array_equal(res.video, van.video)
    err = np.abs(res.video - van.video).mean() / np.abs(van.video).mean()
    assert err < 0.2


def test_exact_sampler_reproduces_data_moments():
    """Window 1: each chunk sees its finished predecessor; the ODE with the optimal velocity samples the data."""
    syn = dict(frames=1, height=4, width=4, channels=2, mixture=3, rho=0.6)
    c = config(n=2, window=1, steps=256, batch=256, **syn)
    c.schedule.update(dict(power=1.0, shift=1.0))  # a uniform grid: Euler's bias is small at 256 steps
    run = common.build(c)
    res = run.sampler.run(run.params, run.cond, run.table, run.key, progress=False)
    mean, var = run.denoiser.moments(run.params)
    v = res.video.reshape(256, 2, -1, 2)
    for z in (v[:, 0], v[:, 1] - 0.6 * v[:, 0]):  # chunk 0, and chunk 1's innovation
        z = z.reshape(-1, 2)
        se = np.sqrt(var / len(z))
        assert (np.abs(z.mean(0) - mean) < 5 * se + 0.02).all(), (z.mean(0), mean)
        np.testing.assert_allclose(z.var(0), var, rtol=0.08)
    # and the moments are not trivially those of the noise
    assert not np.allclose(var, 1.0, rtol=0.5)


class CountingFlow(SyntheticFlow):
    """Counts chunk forwards that actually execute (a host callback inside the compute branch)."""

    def forward_chunk(self, params, cond, x, info, kv):
        jax.debug.callback(lambda: COUNT.__setitem__(0, COUNT[0] + 1))
        return super().forward_chunk(params, cond, x, info, kv)


COUNT = [0]


@pytest.mark.parametrize("threshold", [0.0, 0.05, 1e9])
def test_reused_chunks_run_no_forward(threshold):
    """The skip is real: the forward body executes exactly once per computed chunk, never for reused ones."""
    from flowcache_jax.policies import FlowCache

    flow = CountingFlow(frames=1, height=4, width=4, channels=3, hidden=8)
    table = magi_schedule(4, 4, 16)
    sampler = Sampler(flow, FlowCache(threshold=threshold, warmup=3), table.window, batch=2)
    COUNT[0] = 0
    res = sampler.run(flow.init_params(), None, table, jax.random.PRNGKey(0), progress=False)
    jax.effects_barrier()
    assert COUNT[0] == res.computed == int((res.decisions == 1).sum())
    if threshold > 0:
        assert COUNT[0] < table.chunk_forwards


def test_compiles_once_for_any_length():
    c = config("flowcache", 0.05)
    run = common.build(c)
    for n in (3, 4, 9):
        table = common.build(c, n_chunks=n).table
        res = run.sampler.run(run.params, run.cond, table, run.key, progress=False)
        assert res.video.shape[1] == n and (np.abs(res.video).mean(axis=(0, 2, 3, 4, 5)) > 0.1).all()
    assert run.sampler.traces == 1
    # the counter does count: a schedule with another stage length needs (and gets) a second compilation
    other = common.build(config("flowcache", 0.05, steps=24)).table
    run.sampler.run(run.params, run.cond, other, run.key, progress=False)
    assert run.sampler.traces == 2


def test_df_schedule_runs_every_block():
    run, res = result(kind="df")
    np.testing.assert_array_equal(res.decisions, np.where(flat(run.table, "active"), 1, -1))
    assert (np.abs(res.video).mean(axis=(0, 2, 3, 4, 5)) > 0.1).all()  # every block was emitted


def test_context_matters():
    """Chunk 1's result depends on chunk 0 (through the KV context), as in an AR video model."""
    run = common.build(config(n=2, window=1, steps=16, rho=0.9))
    a = run.sampler.run(run.params, run.cond, run.table, run.key, progress=False).video
    run2 = common.build(config(n=2, window=1, steps=16, rho=0.0))
    b = run2.sampler.run(run2.params, run2.cond, run2.table, run2.key, progress=False).video
    np.testing.assert_allclose(a[:, 0], b[:, 0], rtol=1e-5, atol=1e-6)  # same chunk 0
    assert np.abs(a[:, 1] - b[:, 1]).mean() > 0.1


def test_a_threshold_sweep_compiles_once():
    """Policy knobs are arguments of the compiled stage function: other thresholds and warm-ups reuse it."""
    flow = SyntheticFlow()
    table = magi_schedule(4, 2, 8)
    sampler = Sampler(flow, FlowCache(threshold=0.05, warmup=3), table.window)
    params = flow.init_params()
    computed = [sampler.run(params, None, table, jax.random.PRNGKey(0), progress=False,
                            policy=FlowCache(threshold=t, warmup=w)).computed
                for t, w in ((0.0, 3), (0.05, 3), (0.5, 1), (5.0, 0))]
    assert sampler.traces == 1
    assert computed[0] == table.chunk_forwards and computed[0] > computed[-1]
    with pytest.raises(ValueError, match="structure"):  # another coefficient count needs another sampler
        sampler.run(params, None, table, jax.random.PRNGKey(0), progress=False,
                    policy=FlowCache(0.1, coeffs=(1.0, 0.0)))
