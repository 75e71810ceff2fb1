"""Each rule of spec/flowcache.md §1.4 (FlowCache) and §3.1 (TeaCache), on hand-built step infos."""

from typing import NamedTuple

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flowcache_jax.policies import FlowCache, StepInfo, TeaCache, Vanilla, make_policy


def info(rel, *, active=None, present=None, k=None, first=False, last=False, step=10):
    rel = np.asarray(rel, np.float32)
    w = len(rel)
    return StepInfo(
        active=jnp.asarray(np.ones(w, bool) if active is None else active),
        present=jnp.asarray(np.ones(w, bool) if present is None else present),
        k=jnp.asarray(np.full(w, 20) if k is None else k, jnp.int32),
        diff_l1=jnp.asarray(rel), prev_l1=jnp.ones(w, jnp.float32),
        global_first=jnp.asarray(first), global_last=jnp.asarray(last), step=jnp.asarray(step, jnp.int32))


FC = FlowCache(threshold=0.1, warmup=5, eps=0.0)
ACC = jnp.asarray([0.05, 0.05], jnp.float32)


def test_accumulate_and_reuse_below_threshold():
    d = FC.decide(ACC, FC.init_global(), info([0.01, 0.06]))
    assert d.compute.tolist() == [False, True]
    np.testing.assert_allclose(d.acc, [0.06, 0.0], rtol=1e-6)  # stored sum / reset, increment discarded


def test_strictly_below():
    d = FC.decide(jnp.asarray([0.0], jnp.float32), 0.0, info([0.1]))
    assert d.compute.tolist() == [True] and float(d.acc[0]) == 0.0


@pytest.mark.parametrize("flag", ["first", "last"])
def test_global_first_last_compute_and_leave_acc(flag):
    d = FC.decide(ACC, 0.0, info([0.0, 0.0], **{flag: True}, k=[1, 30]))
    assert d.compute.tolist() == [True, True]
    np.testing.assert_allclose(d.acc, ACC)  # untouched, even inside warm-up (rule 1 precedes rule 3)


def test_new_chunk_computes_acc_untouched():
    d = FC.decide(ACC, 0.0, info([0.0, 0.0], present=[True, False]))
    assert d.compute.tolist() == [False, True]
    np.testing.assert_allclose(d.acc, [0.05, 0.05])


def test_warmup_computes_and_resets():
    d = FC.decide(ACC, 0.0, info([0.0, 0.0], k=[4, 5]))
    assert d.compute.tolist() == [True, False]
    np.testing.assert_allclose(d.acc, [0.0, 0.05])


def test_inactive_positions_untouched():
    d = FC.decide(ACC, 0.0, info([0.0, 0.0], active=[True, False], present=[True, False]))
    assert d.compute.tolist() == [False, False]
    np.testing.assert_allclose(d.acc, ACC)


def test_eps_in_denominator():
    p = FlowCache(threshold=1.0, warmup=0, eps=1e-8)
    i = info([1e-9])._replace(prev_l1=jnp.zeros(1, jnp.float32))
    np.testing.assert_allclose(p.decide(jnp.zeros(1), 0.0, i).acc, [0.1], rtol=1e-5)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(0, 1, width=32), min_size=1, max_size=6), st.integers(0, 40))
def test_zero_threshold_never_reuses(rels, k):
    for pol in (FlowCache(threshold=0.0), TeaCache(threshold=0.0)):
        d = pol.decide(jnp.zeros(len(rels)), jnp.zeros(()), info(rels, k=[k] * len(rels), step=k))
        assert bool(d.compute.all())


def test_teacache_global_decision_and_new_chunk():
    tc = TeaCache(threshold=0.1, warmup=5)
    d = tc.decide(jnp.zeros(3), jnp.asarray(0.02), info([0.01, 0.03, 0.5], present=[True, True, False]))
    # window rel over present chunks = (0.01 + 0.03) / 2 = 0.02 -> acc 0.04 < 0.1: reuse all but the new one
    assert d.compute.tolist() == [False, False, True]
    np.testing.assert_allclose(d.glob, 0.04, rtol=1e-6)
    d = tc.decide(jnp.zeros(3), jnp.asarray(0.09), info([0.01, 0.03, 0.5], present=[True, True, False]))
    assert d.compute.tolist() == [True, True, True] and float(d.glob) == 0.0


def test_teacache_warmup_is_global_steps():
    tc = TeaCache(threshold=1.0, warmup=5)
    assert bool(tc.decide(jnp.zeros(1), jnp.asarray(0.0), info([0.0], step=4)).compute[0])
    assert not bool(tc.decide(jnp.zeros(1), jnp.asarray(0.0), info([0.0], step=5, k=[0])).compute[0])


def test_polynomial_rescale():
    tc = TeaCache(threshold=10.0, warmup=0, coeffs=(2.0, 1.0))  # p(x) = 2x + 1
    np.testing.assert_allclose(tc.decide(jnp.zeros(1), jnp.asarray(0.0), info([0.5])).glob, 2.0)


def test_vanilla_computes_every_active():
    d = Vanilla().decide(ACC, 0.0, info([0.0, 0.0], active=[True, False]))
    assert d.compute.tolist() == [True, False]


def test_make_policy_errors():
    c = ml_collections.ConfigDict(dict(name="flowcache", threshold=-0.1, warmup=5, coeffs=()))
    with pytest.raises(ValueError, match="threshold"):
        make_policy(c)
    c.name = "nope"
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy(c)


# ----- TeaCache, reference semantics (the FlowCache fork's MAGI rule, policies/teacache.py docstring) -----------

REF = TeaCache(threshold=0.1, warmup=5, semantics="reference")


def ref_glob(acc=0.0, n_prev=2):
    return {"acc": jnp.asarray(acc, jnp.float32), "n_prev": jnp.asarray(n_prev, jnp.int32)}


def grown(rel=0.01, step=10):  # the window grew from 2 to 3 chunks: the newest one just entered
    return info([rel, rel, 0.0], present=[True, True, False], step=step)


@pytest.mark.parametrize("case,acc,rel,step,acc_after", [("forced by warm-up", 0.05, 0.01, 3, 0.0),
                                                          ("threshold exceeded", 0.05, 0.2, 10, 0.0),
                                                          ("below threshold", 0.05, 0.01, 10, 0.06)])
def test_teacache_reference_grown_window_is_partial(case, acc, rel, step, acc_after):
    """Every call whose window grew forwards only the entering chunk while the accumulator after the check is below
    the threshold, which a forced call and an exceeded threshold (both reset it to 0) always leave."""
    d = REF.decide(jnp.zeros(3), ref_glob(acc), grown(rel, step))
    assert d.compute.tolist() == [False, False, True], case
    np.testing.assert_allclose(d.glob["acc"], acc_after, rtol=1e-6)
    assert int(d.glob["n_prev"]) == 3


def test_teacache_reference_threshold_zero_never_partial():
    p = TeaCache(threshold=0.0, warmup=5, semantics="reference")
    for step in (3, 10):
        assert bool(p.decide(jnp.zeros(3), ref_glob(), grown(0.0, step)).compute.all())


def test_teacache_reference_same_window_rule():
    """A window that did not grow: forced calls compute, else reuse all iff acc + rel < thr (reset to 0 if not)."""
    same = info([0.01, 0.03], step=10)
    d = REF.decide(jnp.zeros(2), ref_glob(0.02), same)
    assert d.compute.tolist() == [False, False]
    np.testing.assert_allclose(d.glob["acc"], 0.04, rtol=1e-6)
    d = REF.decide(jnp.zeros(2), ref_glob(0.09), same)
    assert d.compute.tolist() == [True, True] and float(d.glob["acc"]) == 0.0
    for forced in (dict(step=4), dict(first=True), dict(last=True)):
        d = REF.decide(jnp.zeros(2), ref_glob(0.0), info([0.0, 0.0], **forced))
        assert d.compute.tolist() == [True, True] and float(d.glob["acc"]) == 0.0


def test_teacache_reference_first_call_and_shrink():
    d = REF.decide(jnp.zeros(2), REF.init_global(), info([0.0, 0.0], active=[True, False], present=[False, False],
                                                          first=True, step=0))
    assert d.compute.tolist() == [True, False] and int(d.glob["n_prev"]) == 1
    # shrunk window (3 -> 2): the chunks of both calls are compared, a full reuse is allowed
    d = REF.decide(jnp.zeros(3), ref_glob(0.0, 3), info([0.01, 0.03, 0.0], active=[True, True, False],
                                                        present=[True, True, False]))
    assert d.compute.tolist() == [False, False, False]
    np.testing.assert_allclose(d.glob["acc"], 0.02, rtol=1e-6)


class LagInfo(NamedTuple):  # StepInfo + the position-aligned metric of a slide
    active: jnp.ndarray
    present: jnp.ndarray
    k: jnp.ndarray
    diff_l1: jnp.ndarray
    prev_l1: jnp.ndarray
    global_first: jnp.ndarray
    global_last: jnp.ndarray
    step: jnp.ndarray
    lag_diff_l1: jnp.ndarray
    lag_prev_l1: jnp.ndarray
    lag_present: jnp.ndarray


def test_teacache_reference_slide_compares_by_position():
    """At a slide (same size, one chunk left, one entered) the reference compares chunk c with chunk c-1; with the
    ``lag_*`` fields the rule does too (and may then reuse the entering chunk), without them it compares chunks."""
    base = info([0.01, 0.01, 0.0], present=[True, True, False])
    lag = LagInfo(*base, lag_diff_l1=jnp.asarray([0.5, 0.5, 0.5]), lag_prev_l1=jnp.ones(3),
                  lag_present=jnp.asarray([True, True, True]))
    d = REF.decide(jnp.zeros(3), ref_glob(0.0, 3), lag)
    assert d.compute.tolist() == [True, True, True] and float(d.glob["acc"]) == 0.0  # rel 0.5 >= 0.1
    d = REF.decide(jnp.zeros(3), ref_glob(0.0, 3), lag._replace(lag_diff_l1=jnp.full(3, 0.02)))
    assert d.compute.tolist() == [False, False, False]  # full reuse, the entering chunk included
    np.testing.assert_allclose(d.glob["acc"], 0.02, rtol=1e-6)
    d = REF.decide(jnp.zeros(3), ref_glob(0.0, 3), base)  # no lag fields: chunk-aligned, 0.01
    np.testing.assert_allclose(d.glob["acc"], 0.01, rtol=1e-6)


def test_teacache_semantics_is_structure():
    from flowcache_jax.policies.base import structure

    assert structure(REF) != structure(TeaCache(threshold=0.1, warmup=5))
    assert structure(REF) == structure(TeaCache(threshold=0.3, warmup=2, semantics="reference"))
    assert TeaCache(threshold=0.1).init_global().shape == ()
    with pytest.raises(ValueError, match="semantics"):
        TeaCache(threshold=0.1, semantics="paper")
