"""FirstBlockCache and MagCache: the error model, the anchor semantics, real probes and skips."""

import itertools

import jax
import numpy as np
import pytest

from experiments import common
from flowcache_jax.policies import FirstBlockCache, MagCache, make_policy
from flowcache_jax.policies.magcache import calibrate_ratios, error_table
from flowcache_jax.sampler import Sampler
from flowcache_jax.schedules import magi_schedule
from flowcache_jax.synthetic import SyntheticFlow
from tests.test_sampler import config

PROBES = [0]


class ProbingFlow(SyntheticFlow):
    """The synthetic flow with a 'first block' probe: its metric embedding, counted when it really runs."""

    probe_cost = 0.25

    def probe_features(self, params, cond, x, info, kv):
        jax.debug.callback(lambda: PROBES.__setitem__(0, PROBES[0] + 1))
        return self.metric_features(params, x, info.t)


def test_error_table_matches_the_running_sums():
    rng = np.random.default_rng(0)
    r = rng.uniform(0.8, 1.2, 9)
    e = error_table(r)
    for c, k in itertools.combinations(range(9), 2):
        ratio, err = 1.0, 0.0
        for i in range(c + 1, k + 1):
            ratio *= r[i]
            err += abs(1 - ratio)
        assert e[c, k] == pytest.approx(err)
    assert np.isinf(e[3, 3]) and np.isinf(e[5, 2])


def test_calibrate_ratios_is_the_mean_norm_ratio():
    norms = np.array([[1.0, 2.0, 1.0], [2.0, 2.0, 4.0]])
    np.testing.assert_allclose(calibrate_ratios(norms), [1.0, 1.5, 1.25])


def _run(policy, flow=None, reuse="displacement"):
    flow = flow or ProbingFlow(frames=1, height=4, width=4, channels=3, hidden=8)
    table = magi_schedule(4, 4, 16)
    sampler = Sampler(flow, policy, table.window, batch=2, reuse=reuse)
    return table, sampler.run(flow.init_params(), None, table, jax.random.PRNGKey(0), progress=False)


def test_first_block_probes_every_active_chunk_and_counts_them():
    PROBES[0] = 0
    table, res = _run(FirstBlockCache(threshold=0.3, warmup=2))
    jax.effects_barrier()
    active = int((res.decisions >= 0).sum())
    assert PROBES[0] == res.probes == active == table.chunk_forwards
    assert res.computed < table.chunk_forwards
    assert res.speedup_ideal == pytest.approx(table.chunk_forwards / (res.computed + 0.25 * res.probes))


def test_first_block_compares_with_the_last_computed_step():
    _, res = _run(FirstBlockCache(threshold=0.3, warmup=2))
    # For a chunk, the distance to the anchor grows while it is reused: within a reuse streak the recorded
    # rel-L1 never falls below the first reused step's (it is measured against the same anchor).
    assert (res.decisions == 0).any()
    rows = res.decisions.shape[1]
    for c in np.unique(res.chunk[res.chunk >= 0]):
        r = [(res.decisions[s, p], res.rel[s, p]) for s in range(len(res.chunk)) for p in range(rows)
             if res.chunk[s, p] == c]
        streak = []
        for d, rel in r:
            if d == 0:
                streak.append(rel)
            else:
                if len(streak) > 1:
                    assert streak[-1] >= streak[0] - 1e-6
                streak = []


def test_first_block_threshold_zero_is_vanilla():
    _, van = _run(make_policy(config().policy))
    _, res = _run(FirstBlockCache(threshold=0.0, warmup=2))
    np.testing.assert_array_equal(res.video, van.video)


def test_first_block_needs_a_probe():
    with pytest.raises(ValueError, match="probes the first block"):
        Sampler(SyntheticFlow(), FirstBlockCache(threshold=0.1), 4)


def test_magcache_skips_where_its_error_model_allows():
    ratios = tuple([1.0] * 8 + [1.02] * 8)  # flat early, drifting late
    table, res = _run(MagCache(threshold=0.05, ratios=ratios, warmup=2, max_skips=3), reuse="residual")
    reused = res.decisions == 0
    assert reused.any()
    k = table.k.reshape(-1, table.window)[table.step_valid.reshape(-1)]
    assert (k[reused] < 8).sum() > (k[reused] >= 8).sum()  # ratio 1 costs no modelled error
    for c in np.unique(res.chunk[res.chunk >= 0]):  # never more than max_skips reuses in a row
        run = 0
        for d in res.decisions[res.chunk == c]:
            run = run + 1 if d == 0 else 0
            assert run <= 3


def test_magcache_calibration_from_a_vanilla_run():
    c = config("magcache", 0.1, "residual")
    calibrated = common.calibrate(c)
    ratios = calibrated.policy.ratios
    assert len(ratios) == c.schedule.steps_per_chunk and ratios[0] == 1.0
    assert all(np.isfinite(ratios)) and not np.allclose(ratios, 1.0)
    run = common.build(calibrated)
    res = run.sampler.run(run.params, run.cond, run.table, run.key, progress=False)
    assert res.computed < res.chunk_forwards_vanilla


def test_magcache_without_ratios_is_an_error():
    with pytest.raises(ValueError, match="calibrated ratios"):
        MagCache(threshold=0.1, ratios=())
    c = config("magcache", 0.1)
    c.policy.ratios = (1.0, 1.0)
    with pytest.raises(common.ConfigError, match="one per step"):
        common.validate(c)
