"""FlowCache's reuse-run guard (``min_charge``): off it is the reference rule, on it caps a run of reuses, and on an
exact flow its error falls with the threshold, all on one compiled sampler."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from experiments.theorem1_thresholds import longest_reuse_run, rel_l2
from flowcache_jax.policies import FlowCache, StepInfo, make_policy, structure
from flowcache_jax.policies.base import REUSED
from flowcache_jax.sampler import Sampler
from flowcache_jax.schedules import flow_time_grid, magi_schedule
from flowcache_jax.synthetic import SyntheticFlow

W = 3


def infos(n: int, seed: int = 0, rel_scale: float = 0.03) -> list[StepInfo]:
    """A random step sequence: chunks entering (not present), warm-up steps, inactive slots, first / last steps."""
    rng = np.random.default_rng(seed)
    out = []
    for s in range(n):
        out.append(StepInfo(
            active=jnp.asarray(rng.random(W) > 0.1), present=jnp.asarray(rng.random(W) > 0.1),
            k=jnp.asarray(rng.integers(0, 12, W), jnp.int32),
            diff_l1=jnp.asarray(rng.random(W) * rel_scale, jnp.float32), prev_l1=jnp.ones(W, jnp.float32),
            global_first=jnp.asarray(s == 0), global_last=jnp.asarray(s == n - 1), step=jnp.asarray(s, jnp.int32)))
    return out


def reference_rule(acc: np.ndarray, info: StepInfo, threshold: float, warmup: int, coeffs=()) -> tuple:
    """spec/flowcache.md §1.4 in numpy, written out independently of the policy."""
    rel = np.asarray(info.diff_l1, np.float32) / (np.asarray(info.prev_l1, np.float32) + np.float32(1e-8))
    if coeffs:
        rel = np.polyval(np.asarray(coeffs, np.float32), rel).astype(np.float32)
    compute, new_acc = np.zeros(W, bool), acc.copy()
    for j in range(W):
        if not info.active[j]:
            continue
        if bool(info.global_first) or bool(info.global_last) or not info.present[j]:
            compute[j] = True
        elif info.k[j] < warmup:
            compute[j], new_acc[j] = True, 0.0
        elif acc[j] + rel[j] < threshold:
            new_acc[j] = acc[j] + rel[j]
        else:
            compute[j], new_acc[j] = True, 0.0
    return compute, new_acc


@pytest.mark.parametrize("coeffs", [(), (1.0, -0.01)])  # the rescale can make rel negative: still the plain sum
def test_min_charge_zero_is_the_reference_rule(coeffs):
    pol = FlowCache(threshold=0.06, warmup=3, coeffs=coeffs, min_charge=0.0)
    plain = FlowCache(threshold=0.06, warmup=3, coeffs=coeffs)
    decide = jax.jit(pol.decide)
    acc = ref_acc = np.zeros(W, np.float32)
    for info in infos(40):
        d, e = decide(jnp.asarray(acc), 0.0, info, pol.knobs()), plain.decide(jnp.asarray(acc), 0.0, info)
        np.testing.assert_array_equal(d.compute, e.compute)
        np.testing.assert_array_equal(d.acc, e.acc)  # bit-identical to the rule without the knob
        want_c, ref_acc = reference_rule(ref_acc, info, 0.06, 3, coeffs)
        np.testing.assert_array_equal(np.asarray(d.compute), want_c)
        np.testing.assert_allclose(d.acc, ref_acc, rtol=1e-6, atol=1e-7)
        acc = np.asarray(d.acc)


@pytest.mark.parametrize("threshold,min_charge", [(0.1, 0.03), (0.05, 0.005), (0.02, 0.015), (0.3, 0.07),
                                                       (0.02, 0.02)])
def test_min_charge_caps_consecutive_reuses(threshold, min_charge):
    """rel tiny: the reference rule would reuse for ever; the guard reuses at most ceil(threshold / min_charge) steps
    in a row (fewer than threshold / min_charge up to float rounding); it reuses iff min_charge < threshold."""
    pol = FlowCache(threshold=1.0, warmup=0)
    decide = jax.jit(pol.decide)  # one compile for every (threshold, min_charge): they are runtime knobs
    kn = {**pol.knobs(), "threshold": np.float32(threshold), "min_charge": np.float32(min_charge)}
    info = infos(1)[0]._replace(active=jnp.ones(W, bool), present=jnp.ones(W, bool), k=jnp.full(W, 20, jnp.int32),
                                diff_l1=jnp.full(W, 1e-7, jnp.float32), global_first=jnp.asarray(False),
                                global_last=jnp.asarray(False))
    acc, run, longest = jnp.zeros(W, jnp.float32), np.zeros(W, int), 0
    for _ in range(60):
        d = decide(acc, 0.0, info, kn)
        reused = np.asarray(d.reason) == REUSED
        run = np.where(reused, run + 1, 0)
        longest = max(longest, int(run.max()))
        acc = d.acc
    assert longest <= math.ceil(threshold / min_charge) and (longest > 0) == (min_charge < threshold)
    unguarded = FlowCache(threshold=threshold, warmup=0).decide(jnp.full(W, 0.5 * threshold), 0.0, info)
    assert not bool(unguarded.compute.any())  # without the guard the same chunk would still be reused


def test_make_policy_reads_and_checks_min_charge():
    c = ml_collections.ConfigDict(dict(name="flowcache", threshold=0.1, warmup=5, coeffs=(), min_charge=0.02))
    assert make_policy(c).min_charge == 0.02
    assert structure(make_policy(c)) == structure(FlowCache(threshold=0.3, warmup=1))  # a knob, not structure
    c.min_charge = -0.01
    with pytest.raises(ValueError, match="min_charge"):
        make_policy(c)
    c.min_charge, c.name = 0.02, "teacache"
    with pytest.raises(ValueError, match="min_charge"):
        make_policy(c)  # a guard no other rule reads is an error, not ignored
    del c["min_charge"]
    assert make_policy(c).name == "teacache"


def test_guarded_error_falls_with_the_threshold_on_one_compile():
    """Exact flow, steep grid (power 3): a small threshold gives less error and fewer reuses than a larger one, and
    every run (reference, unguarded, guarded, any threshold) shares one compiled sampler."""
    flow = SyntheticFlow(frames=1, height=4, width=4, channels=4, hidden=8)
    table = magi_schedule(2, 2, 16, grid=flow_time_grid(16, power=3.0))
    sampler = Sampler(flow, FlowCache(threshold=0.0, warmup=3), table.window, batch=2)
    params, key = flow.init_params(), jax.random.PRNGKey(0)
    ref = sampler.run(params, None, table, key, progress=False)  # threshold 0: the exact (vanilla) run

    def run(threshold, min_charge):
        pol = FlowCache(threshold=threshold, warmup=3, min_charge=min_charge)
        assert structure(pol) == structure(sampler.policy)
        res = sampler.run(params, None, table, key, progress=False, policy=pol)
        return rel_l2(res.video, ref.video), res.cache_skipped, longest_reuse_run(res)

    m = 0.005
    guarded = [run(th, m) for th in (0.01, 0.02, 0.05)]
    errs, reuses, longest = zip(*guarded, strict=True)
    assert errs[0] < errs[1] < errs[2] and reuses[0] < reuses[1] < reuses[2]
    assert all(n <= math.ceil(th / m) for n, th in zip(longest, (0.01, 0.02, 0.05), strict=True))
    plain_err, _, plain_longest = run(0.02, 0.0)
    assert plain_longest > longest[1] and plain_err > errs[1]  # the unguarded rule holds a stale cache longer
    assert sampler.traces == 1
