"""Self-Forcing's history in the bit-packed store: every method on the fixture's rolling run, tokens quantized
once, the study's planner folding frames, and a real peak-memory drop (the compiled stage function's)."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from flowcache_jax.kv import methods as kvm
from flowcache_jax.kv import quant_store as qs
from tests import self_forcing_fixture as sf


@pytest.fixture(scope="module")
def rolling():
    """The fixture's first rolling run, dense, with the frames its history held after every stage."""
    z = sf.npz("e2e_rolling.npz")
    run = sf.load()[0]["pipeline"]["rolling_runs"][0]
    pre = run["name"] + "_"
    den = sf.denoiser(kv_frames=int(z[pre + "local_attn_size"]), sink_frames=int(z[pre + "sink_size"]))
    held = []
    ref, smp = sf.run(den, z, pre, on_stage=lambda s, st: held.append(np.asarray(st.kv["frame"])))
    return {"z": z, "pre": pre, "den": den, "ref": ref, "smp": smp, "held": held, "runs": {}}


def _run(rolling, method):
    """One run per method and module (the peak-memory test reuses rtn_int4's compiled sampler)."""
    if method not in rolling["runs"]:
        kw = dict(recent_frames=1) if method == "ours_aged" else {}  # the sink + 1 recent frame, 2 aged slots
        m = kvm.make_method(method.replace("_aged", ""), rolling["den"].frame_tokens, **kw)
        den = dataclasses.replace(rolling["den"], kv_method=m)
        seen = []
        res, smp = sf.run(den, rolling["z"], rolling["pre"],
                          on_stage=lambda s, st: seen.append(jax.tree.map(np.asarray, st.kv)))
        rolling["runs"][method] = (den, res, smp, seen)
    return rolling["runs"][method]


@pytest.mark.parametrize("method,rel_max", [("rtn_int4", 2e-2), ("study_soft_prune_int4", 0.2), ("ours_aged", 0.2)])
def test_kv_quant_self_forcing_methods(rolling, method, rel_max):
    den, res, smp, seen = _run(rolling, method)
    ref = rolling["ref"]
    assert res.traces == 1 and np.isfinite(res.video).all()
    rel = np.linalg.norm(res.video - ref.video) / np.linalg.norm(ref.video)
    assert 0 < rel < rel_max, rel  # really quantized, and still the same video
    for kv, held in zip(seen, rolling["held"], strict=True):  # the rings hold the dense buffer's frames
        mine = den.held_frames(jax.tree.map(np.asarray, kv))
        assert sorted(np.asarray(mine)) == sorted(held)
    if method == "ours_aged":  # the aged ring: frames older than the recent one, each one summary token per head
        recent, aged = den.store_slots
        assert aged > 0
        last = seen[-1]
        old = last["aged"].frame[0]
        newest = max(last["store"].frame[0])
        assert (old >= 0).sum() == aged and (old < newest).all()
        np.testing.assert_allclose(last["aged"].sum_logn[0][:, old >= 0], np.log(den.frame_tokens), rtol=1e-6)
    pairs = list(zip(seen[:-1], seen[1:], strict=True))
    if method != "study_soft_prune_int4":  # quantized once: a frame's codes never change while it is held
        for a, b in pairs:
            for slot in np.flatnonzero((a["store"].frame[0] >= 0) & (a["store"].frame[0] == b["store"].frame[0])):
                for ca, cb in zip(a["store"].k_codes, b["store"].k_codes, strict=True):
                    np.testing.assert_array_equal(ca[0][:, slot], cb[0][:, slot])
    else:  # the planner folds frames into their summaries, and a folded frame stays folded
        def folded(kv):
            st = kv["store"]
            return {int(f) for f, on in zip(st.frame[0], st.tier_on[0][:, 0], strict=True) if f >= 0 and not on}
        assert any(folded(kv) for kv in seen)
        for a, b in pairs:
            still = {int(f) for f in b["store"].frame[0] if f >= 0}
            assert folded(a) & still <= folded(b)


def test_kv_quant_self_forcing_peak_memory_drops(rolling):
    """The quantized run's compiled peak is below the dense run's by at least the history bytes saved, minus one
    key tile (one frame of keys): the packed codes are read tile by tile, never rebuilt as a full-precision copy."""
    den0, smp = rolling["den"], rolling["smp"]
    cfg = den0.cfg

    def peak(smp):
        m = next(iter(smp._compiled.values())).memory_analysis()
        return m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes

    den, res, qsmp, seen = _run(rolling, "rtn_int4")
    store = qs.empty(den.kv_method.store, cfg.num_layers, den.history_frames, cfg.num_heads, cfg.head_dim, "float32")
    dense = den0.init_kv(1, 1)
    saved = dense["k"].nbytes + dense["v"].nbytes - qs.nbytes(store)
    tile = 2 * den.frame_tokens * cfg.num_heads * cfg.head_dim * 4
    assert saved > 0
    assert peak(smp) - peak(qsmp) >= saved - tile, (peak(smp), peak(qsmp), saved, tile)
