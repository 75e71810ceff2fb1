"""Whole MAGI-1 generations vs the upstream loop and the FlowCache fork (e2e_*.npz of the fixture folder).

Every size, threshold, warm-up, flag and run name comes from the fixture's files.
"""

import dataclasses
import functools
import json
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from converters.keymaps.magi1 import convert_magi1
from converters.safetensors_io import SafetensorsReader
from flowcache_jax.denoiser import SlotInfo
from flowcache_jax.policies import FlowCache, TeaCache, Vanilla
from flowcache_jax.sampler import Sampler
from flowcache_jax.schedules import magi_schedule, magi_time_grid
from flowcache_jax.solvers import euler_step
from models.magi1 import Magi1Config
from models.magi1_denoiser import from_upstream_config, reference_calls
from tests.test_magi1_parity import FIXTURE

VANILLA = dict(np.load(FIXTURE / "e2e_vanilla.npz"))
FLOW = dict(np.load(FIXTURE / "e2e_flowcache.npz"))
TEA = dict(np.load(FIXTURE / "e2e_teacache.npz"))
FLOW_RUNS = sorted(k[: -len("_decision")] for k in FLOW if k.endswith("_decision"))
TEA_RUNS = sorted(k[: -len("_mode")] for k in TEA if k.endswith("_mode"))
LATENT_TOL = dict(atol=1e-3, rtol=1e-3)  # README, with the fixture's frequency table


@functools.cache
def setup():
    config = json.loads((FIXTURE / "config.json").read_text())
    cfg = Magi1Config.from_upstream(config["model_config"])
    params = convert_magi1(SafetensorsReader(FIXTURE / "weights.safetensors"), cfg)
    params["t_freqs"] = np.load(FIXTURE / "case_A.npz")["timestep_freqs_f32"]
    params = jax.tree.map(jnp.asarray, params)
    _, c, t, h, w = VANILLA["noise"].shape
    cw = config["runtime_config"]["chunk_width"]
    n = t // cw
    den = from_upstream_config(cfg, config, n, h, w)
    table = magi_schedule(n, config["runtime_config"]["window_size"], den.num_steps, VANILLA["t_schedule"])
    y, m = VANILLA["y"], VANILLA["emb_masks"]
    cond = {"y": jnp.asarray(y[0]), "mask": jnp.asarray(m[0]), "null_y": jnp.asarray(y[1]),
            "null_mask": jnp.asarray(m[1])}
    noise = VANILLA["noise"].reshape(1, c, n, cw, h, w).transpose(0, 2, 1, 3, 4, 5)
    return params, den, table, cond, noise


def to_ncthw(v: np.ndarray) -> np.ndarray:
    """[1, n_chunks, C, cw, H, W] -> [C, T, H, W]."""
    c = v.shape[2]
    return v[0].transpose(1, 0, 2, 3, 4).reshape(c, -1, *v.shape[-2:])


@functools.cache
def run(policy, reencode: bool, discard: bool):
    params, den, table, cond, noise = setup()
    den = dataclasses.replace(den, discard_duplicate=discard)
    sampler = Sampler(den, policy, table.window, 1, reencode_clean=reencode)
    return sampler.run(params, cond, table, jax.random.PRNGKey(0), progress=False, initial_noise=noise,
                       record_stages=True)


def per_chunk(res, name: str, n: int, fill) -> np.ndarray:
    """[steps, window positions] records -> [steps, chunk ids] as the fixture stores them."""
    vals = getattr(res, name)
    out = np.full((vals.shape[0], n), fill, dtype=np.result_type(vals.dtype, type(fill)))
    g, j = np.nonzero(res.chunk >= 0)
    out[g, res.chunk[g, j]] = vals[g, j]
    return out


def test_time_grid_is_the_reference_grid():
    _, den, _, _, _ = setup()
    np.testing.assert_array_equal(magi_time_grid(den.num_steps), VANILLA["t_schedule"])


@pytest.mark.parametrize("name,data,reencode", [("vanilla", VANILLA, True), ("flowcache", FLOW, False),
                                                ("teacache", TEA, False)])
def test_call_metadata_exact(name, data, reencode):
    _, den, table, _, _ = setup()
    ours = reference_calls(table, den, reencode, data["call_window_chunk_ids"].shape[1])
    assert len(ours["call_slice_point"]) == int(data["num_calls"])
    for key, value in ours.items():
        np.testing.assert_array_equal(value, data[key], err_msg=key)


def test_vanilla_trajectory():
    res = run(Vanilla(), True, False)
    for s, ref in enumerate(VANILLA["latent_after_stage"]):
        np.testing.assert_allclose(to_ncthw(res.stage_latents[s]), ref, **LATENT_TOL, err_msg=f"stage {s}")
    np.testing.assert_allclose(to_ncthw(res.video), VANILLA["latent_final"], **LATENT_TOL)
    assert res.computed == res.chunk_forwards_vanilla


@pytest.mark.parametrize("prefix", FLOW_RUNS)
def test_flowcache_reference_runs(prefix):
    """Reference semantics: no clean re-encode; decisions, rel-L1 and accumulators call by call."""
    thr, warm = float(FLOW[prefix + "_thresh"]), int(FLOW[prefix + "_warmup"])
    res = run(FlowCache(threshold=thr, warmup=warm), False, bool(FLOW[prefix + "_discard_nearly_clean_chunk"]))
    n = FLOW[prefix + "_decision"].shape[1]
    reason = per_chunk(res, "reason", n, -1)
    np.testing.assert_array_equal(reason, FLOW[prefix + "_decision"])
    for ours, key in (("rel", "_rel_l1"), ("acc_before", "_acc_before")):
        ref = FLOW[prefix + key]
        got = per_chunk(res, ours, n, np.nan)
        ok = ~np.isnan(ref)
        np.testing.assert_allclose(got[ok], ref[ok], rtol=1e-4, atol=1e-9, err_msg=key)
    ref = FLOW[prefix + "_acc_after"]
    ok = ~np.isnan(ref)
    np.testing.assert_allclose(per_chunk(res, "acc", n, np.nan)[ok], ref[ok], rtol=1e-4, atol=1e-9)
    for s, ref in enumerate(FLOW[prefix + "_latent_after_stage"]):
        np.testing.assert_allclose(to_ncthw(res.stage_latents[s]), ref, **LATENT_TOL, err_msg=f"stage {s}")
    np.testing.assert_allclose(to_ncthw(res.video), FLOW[prefix + "_latent_final"], **LATENT_TOL)


def test_flowcache_threshold0_with_clean_reencode_is_vanilla():
    """The non-reference option keeps MAGI's clean re-encode and duplicate: threshold 0 is vanilla exactly."""
    res, van = run(FlowCache(threshold=0.0, warmup=5), True, False), run(Vanilla(), True, False)
    np.testing.assert_array_equal(res.decisions, van.decisions)
    np.testing.assert_array_equal(res.video, van.video)


def modes(res) -> np.ndarray:
    """Per call: 0 every window chunk forwarded, 1 none (full reuse), 2 some (partial), as the fixture."""
    active = (res.decisions >= 0).sum(1)
    computed = (res.decisions == 1).sum(1)
    return np.where(computed == active, 0, np.where(computed == 0, 1, 2))


def first(flags: np.ndarray, default: int) -> int:
    hits = np.flatnonzero(flags)
    return int(hits[0]) if len(hits) else default


def tea_record(prefix: str) -> dict:
    """A recorded reference TeaCache run, per recorded call (its crash call included), with the events after which
    a trajectory of our sampler no longer follows it (README notes 3-5):

    - ``held``: a partial call with older chunks: the fork does not advance them (it overwrites them with the latent
      saved at the previous stage's last call) and forwards the newest chunk alone;
    - ``unwritten``: the call reads K/V rows the fork never wrote;
    - ``slide``: the window moved by one chunk: the fork compares and replays by window position;
    - ``crash``: the call whose update raised.
    """
    mode = TEA[prefix + "_mode"]
    calls = len(mode)
    win = [tuple(int(c) for c in r if c >= 0) for r in TEA["call_window_chunk_ids"][:calls]]
    n = np.array([len(w) for w in win])
    n_prev = np.concatenate([[0], n[:-1]])
    rows = TEA[prefix + "_call_unwritten_kv_rows_read"][:calls]
    unwritten = np.zeros(calls, bool)
    unwritten[: len(rows)] = rows > 0
    crash = np.zeros(calls, bool)
    if prefix + "_crash_call" in TEA:
        crash[int(TEA[prefix + "_crash_call"])] = True
    slide = np.array([g > 0 and n[g] == n_prev[g] and win[g] != win[g - 1] for g in range(calls)], bool)
    return dict(mode=mode, calls=calls, win=win, grew=n > n_prev, slide=slide, held=(mode == 2) & (n_prev > 0),
                unwritten=unwritten, unwritten_rows=rows, crash=crash)


def window_rel(res) -> np.ndarray:
    """Our window rel-L1 per call, over the chunks present in both calls (NaN where none is)."""
    num, den = np.nansum(res.diff_l1, 1), np.nansum(res.prev_l1, 1)
    none = np.isnan(res.diff_l1).all(1)
    return np.where(none, np.nan, num / np.where(none, 1.0, den))


def intended_rule(res, thr: float, warm: int) -> tuple[np.ndarray, np.ndarray]:
    """Intended TeaCache on every call of our run: its decisions follow from our own recorded metric and the rule
    (forced: first / last / warm-up calls and calls with no chunk of the previous one; else reuse every present chunk
    iff acc + rel < thr; entering chunks always computed). Returns the accumulator before / after each call."""
    rel, present = window_rel(res).astype(np.float32), ~np.isnan(res.diff_l1)
    active = res.decisions >= 0
    steps = len(rel)
    acc, before, after = np.float32(0.0), np.zeros(steps), np.zeros(steps)
    for g in range(steps):
        before[g] = acc
        forced = g == 0 or g == steps - 1 or g < warm or not present[g].any()
        a = np.float32(np.inf) if forced else np.float32(acc + rel[g])
        reuse = bool(a < thr)
        if not forced and abs(float(a) - thr) <= 1e-6 * thr:  # too close to call in float32: follow the run
            reuse = bool((res.decisions[g][present[g]] == 0).all())
        expect = active[g] & ~(reuse & present[g])
        np.testing.assert_array_equal(res.decisions[g] == 1, expect, err_msg=f"call {g}")
        acc = a if reuse else np.float32(0.0)
        after[g] = acc
    return before, after


def compare_stages(res_stages, prefix: str, upto: int) -> int:
    """Latents after every stage whose calls all precede call ``upto``; returns how many stages were compared."""
    p = setup()[2].steps_per_stage
    checked = 0
    for s, ref in enumerate(TEA[prefix + "_latent_after_stage"]):
        if (s + 1) * p - 1 < upto:
            np.testing.assert_allclose(to_ncthw(res_stages[s]), ref, **LATENT_TOL, err_msg=f"stage {s}")
            checked += 1
    return checked


def check_global_warmup(prefix: str):
    """The reference forces the global first and last calls and the first ``warmup`` calls, nothing else."""
    calls, total = len(TEA[prefix + "_forced"]), int(TEA["num_calls"])
    g = np.arange(calls)
    np.testing.assert_array_equal(TEA[prefix + "_forced"], (g == 0) | (g == total - 1) | (g < TEA[prefix + "_warmup"]))
    np.testing.assert_array_equal(np.isnan(TEA[prefix + "_rel_l1"]), TEA[prefix + "_forced"])


@pytest.mark.parametrize("prefix", TEA_RUNS)
def test_teacache_intended_algorithm(prefix):
    """Intended TeaCache: its own rule on every call, and what it shares with the reference while the reference's
    trajectory is one it follows (no coincidence of modes is assumed).

    Both rules force the same calls, accumulate the same window rel-L1 (the reference compares the chunks present in
    both calls whenever the window grows or shrinks, ours always) and keep or reset the accumulator alike. So until
    the first call whose update ours does not reproduce (a partial call with older chunks, a differing mode, a read
    of unwritten K/V, a slide or the crash), and at that call itself: equal rel-L1 and accumulators, equal modes on
    every call whose window did not grow (the reference is partial at every grown window whose accumulator is below
    the threshold, warm-up included; ours only when the rel-L1 says so), and equal latents before it."""
    thr, warm = float(TEA[prefix + "_thresh"]), int(TEA[prefix + "_warmup"])
    res = run(TeaCache(threshold=thr, warmup=warm), False, False)
    acc_before, acc_after = intended_rule(res, thr, warm)
    check_global_warmup(prefix)
    rec = tea_record(prefix)
    calls = rec["calls"]
    differ = modes(res)[:calls] != rec["mode"]
    stop = first(rec["held"] | rec["unwritten"] | rec["crash"] | rec["slide"] | differ, calls)
    same = (np.arange(calls) <= stop) & ~rec["slide"]  # the reference's inputs, and the same alignment
    np.testing.assert_array_equal(differ[same & ~rec["grew"]], False)
    ref_rel = TEA[prefix + "_rel_l1"]
    cmp = same & ~np.isnan(ref_rel)
    np.testing.assert_allclose(window_rel(res)[:calls][cmp], ref_rel[cmp], rtol=1e-4)
    for ours, key in ((acc_before, "_acc_before"), (acc_after, "_acc_after")):
        np.testing.assert_allclose(ours[:calls][same], TEA[prefix + key][same], rtol=1e-4, atol=1e-9, err_msg=key)
    assert compare_stages(res.stage_latents, prefix, stop) >= 1


@pytest.mark.parametrize("prefix", TEA_RUNS)
def test_teacache_reference_rule_in_the_sampler(prefix):
    """``TeaCache(semantics="reference")`` in our sampler: the reference's modes (partial at every grown window while
    its accumulator is below the threshold) and rel-L1 up to and including its first partial call with older chunks,
    read of unwritten K/V or crash (slides excluded: the sampler gives no position-aligned metric), and its latents
    before that call (after it the fork freezes the older chunks, which the sampler cannot)."""
    thr, warm = float(TEA[prefix + "_thresh"]), int(TEA[prefix + "_warmup"])
    res = run(TeaCache(threshold=thr, warmup=warm, semantics="reference"), False, False)
    rec = tea_record(prefix)
    calls = rec["calls"]
    stop = first(rec["held"] | rec["unwritten"] | rec["crash"] | rec["slide"], calls)
    same = (np.arange(calls) <= stop) & ~rec["slide"]
    np.testing.assert_array_equal(modes(res)[:calls][same], rec["mode"][same])
    ref_rel = TEA[prefix + "_rel_l1"]
    cmp = same & ~np.isnan(ref_rel)
    np.testing.assert_allclose(window_rel(res)[:calls][cmp], ref_rel[cmp], rtol=1e-4)
    assert compare_stages(res.stage_latents, prefix, stop) >= 1


class _LagInfo(NamedTuple):
    """StepInfo plus the position-aligned (chunk c against c-1) metric the reference uses at a slide."""

    active: Any
    present: Any
    k: Any
    diff_l1: Any
    prev_l1: Any
    global_first: Any
    global_last: Any
    step: Any
    lag_diff_l1: Any
    lag_prev_l1: Any
    lag_present: Any


def _pair_l1(cur: np.ndarray, prev: np.ndarray | None) -> tuple:
    if prev is None:
        return 0.0, 0.0, 0.0
    return np.abs(cur - prev).mean(), np.abs(prev).mean(), 1.0


@functools.cache
def emulate_reference_teacache(prefix: str) -> dict:
    """The fork's TeaCache loop (teacache.py) on the host around our chunk forwards, its decisions made by
    ``TeaCache(semantics="reference")``:

    - full compute: every window chunk forwarded (block-causal, nearly-clean duplicate blended 0.7/0.3), Euler;
    - partial: the newest chunk (with the nearly-clean duplicate: the second-newest chunk's input) forwarded alone
      (slice_point 0: it attends only to itself) and the newest chunk moved with its own dt; the older chunks are
      overwritten by the window latent saved at the previous stage's last computed call (the fork raises when that
      is missing or of another size: the crash);
    - full reuse: the last computed call's displacement added by window position (tail-aligned);
    - K/V: the fork writes a full window's rows only when slice_point > 0 and reads rows [0, slice_point); the run
      stops after the first call that reads a row never written (those are zeros in the fixture, not emulated).
    """
    thr, warm = float(TEA[prefix + "_thresh"]), int(TEA[prefix + "_warmup"])
    policy = TeaCache(threshold=thr, warmup=warm, semantics="reference")
    params, den, table, cond, noise = setup()
    den = dataclasses.replace(den, discard_duplicate=False)
    w, p, ctn = table.window, table.steps_per_stage, den.tokens_per_chunk
    valid = table.step_valid.reshape(-1)
    rows = {k: getattr(table, k).reshape(-1, w)[valid] for k in ("chunk", "k", "t", "dt", "active")}
    total = len(rows["chunk"])
    knobs = policy.knobs()
    decide = jax.jit(lambda glob, info: policy.decide(jnp.zeros(w), glob, info, knobs))
    feature = jax.jit(lambda x: den.metric_features(params, x, jnp.float32(0.0)))
    fwd = jax.jit(lambda x, info, kv: den.forward_chunk(params, cond, x, info, kv))
    kv0 = den.init_kv(1, w)
    alone = jax.jit(lambda x, info: den._call(params, x, info.t, cond["y"][info.chunk], cond["mask"][info.chunk], kv0,
                                              info.chunk, None, False, info.k)[0])
    lat = {c: jnp.asarray(noise[:, c]) for c in range(noise.shape[1])}
    kv, glob, prev, saved, resid, written = kv0, policy.init_global(), {}, None, None, set()
    out = {k: [] for k in ("mode", "rel", "acc_before", "acc_after", "forced", "unwritten_rows", "chunk_l2")}
    out.update(crash=None, stages=[])
    for g in range(total):
        pos = np.flatnonzero(rows["active"][g])
        ids = [int(c) for c in rows["chunk"][g][pos]]
        n, sp = len(ids), ids[0]
        feats = {c: np.asarray(feature(lat[c]), np.float32) for c in ids}

        same, lag = np.zeros((3, w), np.float32), np.zeros((3, w), np.float32)
        for j, c in enumerate(ids):  # [mean|cur - prev|, mean|prev|, prev exists] vs chunk c and vs chunk c-1
            same[:, j], lag[:, j] = _pair_l1(feats[c], prev.get(c)), _pair_l1(feats[c], prev.get(c - 1))
        mask = np.zeros(w, bool)
        mask[:n] = True
        info = _LagInfo(active=mask, present=same[2] > 0, k=rows["k"][g], diff_l1=same[0], prev_l1=same[1],
                        global_first=np.bool_(g == 0), global_last=np.bool_(g == total - 1), step=np.int32(g),
                        lag_diff_l1=lag[0], lag_prev_l1=lag[1], lag_present=lag[2] > 0)
        dec = decide(glob, info)
        forced = g == 0 or g == total - 1 or g < warm
        slide = n == len(prev) and any(c not in prev for c in ids)
        use = (lag if slide else same)[:, :n]
        on = use[2] > 0
        out["rel"].append(np.nan if forced else float(use[0][on].sum() / use[1][on].sum()))
        out["acc_before"].append(float(glob["acc"]))
        glob = dec.glob
        out["acc_after"].append(float(glob["acc"]))
        out["forced"].append(forced)
        comp = np.asarray(dec.compute)[:n]
        mode = 0 if comp.all() else 1 if not comp.any() else 2
        out["mode"].append(mode)
        prev = feats
        out["unwritten_rows"].append(ctn * sum(c not in written for c in range(sp)) if mode != 1 else 0)
        xs = [lat[c] for c in ids]
        slot = [SlotInfo(chunk=jnp.int32(c), k=jnp.int32(rows["k"][g][j]), t=jnp.float32(rows["t"][g][j]),
                         dt=jnp.float32(rows["dt"][g][j]), position=jnp.int32(j), window_end=jnp.int32(ids[-1] + 1))
                for j, c in enumerate(ids)]
        if mode == 2:
            nearly = den.nearly_clean_k is not None and rows["k"][g][0] >= den.nearly_clean_k
            v = alone(xs[n - 2 if nearly else n - 1], slot[n - 2 if nearly else n - 1])
            if saved is None or len(saved) != n - 1:
                out["crash"] = g
                break
            new = list(saved) + [euler_step(xs[-1], v, slot[-1].dt)]
        elif mode == 0:
            new = []
            for j in range(n):
                o, kv = fwd(xs[j], slot[j], kv)
                new.append(euler_step(xs[j], o.velocity, slot[j].dt))
            if sp > 0:
                written |= set(ids)
        else:
            new = [x + r for x, r in zip(xs, resid[-n:], strict=True)]
        if mode != 1:
            resid = [a - b for a, b in zip(new, xs, strict=True)]
            if (g + 1) % p == 0:
                saved = new
        for c, x in zip(ids, new, strict=True):
            lat[c] = x
        if out["unwritten_rows"][-1]:  # the fork attended to zeros here: the latents part from now on
            break
        out["chunk_l2"].append([float(jnp.linalg.norm(lat[c][0])) for c in sorted(lat)])
        out["latent"] = np.stack([np.asarray(lat[c]) for c in sorted(lat)], 1)
        if (g + 1) % p == 0:
            out["stages"].append(np.stack([np.asarray(lat[c]) for c in sorted(lat)], 1))
    return out


@pytest.mark.parametrize("prefix", TEA_RUNS)
def test_teacache_reference_loop(prefix):
    """What the fork's TeaCache computes, reproduced call by call with our model and the reference rule: modes,
    forced calls, rel-L1 and accumulators up to its crash or its first read of unwritten K/V (that call included),
    which calls read unwritten rows and how many, every chunk's L2 norm after every call and the stage latents
    before it. (E.g. right after a partial call only the newest chunk moved, so the window rel-L1 is the newest
    chunk's change over the whole window's norm: the older chunks are frozen.)"""
    emu = emulate_reference_teacache(prefix)
    calls = len(emu["mode"])
    rec = tea_record(prefix)
    assert calls == min(rec["calls"], first(rec["unwritten"], rec["calls"] - 1) + 1)
    if emu["crash"] is not None:
        assert emu["crash"] == calls - 1 and rec["crash"][emu["crash"]]
    np.testing.assert_array_equal(emu["mode"], rec["mode"][:calls])
    np.testing.assert_array_equal(emu["forced"], TEA[prefix + "_forced"][:calls])
    for key in ("rel_l1", "acc_before", "acc_after"):
        got = np.asarray(emu[{"rel_l1": "rel"}.get(key, key)])
        np.testing.assert_allclose(got, TEA[f"{prefix}_{key}"][:calls], rtol=1e-4, atol=1e-9, err_msg=key)
    m = min(calls, len(rec["unwritten_rows"]))
    np.testing.assert_array_equal(emu["unwritten_rows"][:m], rec["unwritten_rows"][:m])
    done = len(emu["chunk_l2"])
    np.testing.assert_allclose(emu["chunk_l2"], TEA[prefix + "_latent_after_call_chunk_l2"][:done], rtol=1e-4)
    for s, lat in enumerate(emu["stages"]):
        np.testing.assert_allclose(to_ncthw(lat), TEA[prefix + "_latent_after_stage"][s], **LATENT_TOL)
    if emu["crash"] is not None:
        np.testing.assert_allclose(to_ncthw(emu["latent"]), TEA[prefix + "_latent_before_crash"], **LATENT_TOL)


def test_official_key_ranges():
    """Official config: a chunk sees itself plus 4/3/2/1 earlier chunks in its 1st..4th stage; clean ones itself."""
    _, den, table, _, _ = setup()
    off = dataclasses.replace(den, noise2clean_kvrange=(5, 4, 3, 2), clean_chunk_kvrange=1)
    ctn, p = den.tokens_per_chunk, den.steps_per_stage
    for c in range(6):
        for stage, n in enumerate((5, 4, 3, 2)):
            assert int(off._kv_start(jnp.int32(c), jnp.int32(stage * p + 1))) == max(0, c + 1 - n) * ctn
        assert int(off._kv_start(jnp.int32(c), None)) == c * ctn
    assert int(den._kv_start(jnp.int32(5), jnp.int32(0))) == 0  # full history


KV = dict(np.load(FIXTURE / "e2e_flowcache_kv.npz"))
KV_RUNS = sorted(k[: -len("_decision")] for k in KV if k.endswith("_decision"))


@functools.cache
def run_kv(prefix: str, window: int | None = None, total: int | None = None, extra_chunks: int = 0,
           attention: str = "tiled"):
    """A FlowCache run of the fork with KV compression on: window and buffer size from the file, or (a constructed
    configuration without recorded arrays) given, with ``extra_chunks`` more chunks of seeded noise and the last
    chunk's caption."""
    from flowcache_jax.kv.compress import CompressConfig

    params, den, _, cond, noise = setup()
    window = int(KV["window_size"]) if window is None else window
    total = int(KV["total_cache_chunk_nums"]) if total is None else total
    if extra_chunks:
        n = den.n_chunks + extra_chunks
        more = np.random.default_rng(int(VANILLA["noise_seed"])).standard_normal(
            (noise.shape[0], extra_chunks, *noise.shape[2:])).astype(noise.dtype)
        noise = np.concatenate([noise, more], 1)
        rows = np.minimum(np.arange(n), den.n_chunks - 1)
        cond = {key: jnp.asarray(np.asarray(v)[rows]) for key, v in cond.items()}
        den = dataclasses.replace(den, n_chunks=n)
    comp = CompressConfig(budget=1, mix_lambda=float(KV["mix_lambda"]), kernel=int(KV["kernel_size"]),
                          strategy="token" if str(KV["compress_strategy"]) == "token" else "group", min_shift=True,
                          weighting=str(KV["score_weighting_method"]))
    den = dataclasses.replace(den, steps_per_stage=den.num_steps // window, cache_chunks=total, compression=comp,
                              query_granularity=str(KV["query_granularity"]),
                              discard_duplicate=bool(KV[prefix + "_discard_nearly_clean_chunk"]),
                              cfg=dataclasses.replace(den.cfg, attention_impl=attention))
    table = magi_schedule(den.n_chunks, window, den.num_steps, VANILLA["t_schedule"])
    policy = FlowCache(threshold=float(KV[prefix + "_thresh"]), warmup=int(KV[prefix + "_warmup"]))
    sampler = Sampler(den, policy, table.window, 1, reencode_clean=False)
    res = sampler.run(params, cond, table, jax.random.PRNGKey(0), progress=False, initial_noise=noise,
                      record_stages=True)
    return den, table, res


@pytest.mark.parametrize("prefix", KV_RUNS)
def test_flowcache_with_kv_compression(prefix):
    den, table, res = run_kv(prefix)
    n = KV[prefix + "_decision"].shape[1]
    np.testing.assert_array_equal(per_chunk(res, "reason", n, -1), KV[prefix + "_decision"])
    events = int(KV[prefix + "_num_events"])
    assert int(res.stage_reports[-1]["events"]) == events
    stage_of_event = []
    for s, rep in enumerate(res.stage_reports):
        if int(rep["events"]) > len(stage_of_event):
            stage_of_event.append(s)
    for e, s in enumerate(stage_of_event):
        pre = f"{prefix}_ev{e}_"
        assert (s + 1) * table.steps_per_stage - 1 == int(KV[pre + "call"])  # after the stage's last call
        idx = res.stage_reports[s]["last_idx"]  # [layers, G, B]
        for layer in KV[pre + "layers"]:
            ref = KV[pre + f"L{layer}_indices"]  # [B, G], topk order
            assert int(KV[pre + f"L{layer}_budget"]) == idx.shape[-1]
            np.testing.assert_array_equal(np.sort(idx[layer].T, 0), np.sort(ref, 0), err_msg=f"event {e} layer {layer}")
    final = to_ncthw(res.video)
    ref = KV[prefix + "_latent_final"]
    assert np.abs(final - ref).max() / np.abs(ref).max() < 1e-4
    # and compression really changed the result (vs the same run with compression off)
    off = KV[prefix + "_nokv_latent_final"]
    assert np.abs(final - off).max() / np.abs(off).max() > 10 * np.abs(final - ref).max() / np.abs(ref).max()


def simulate_tracker(den, table, res):
    """The fork's KV bookkeeping replayed call by call on our run (``ChunkKVRangeTracker`` in kvcompress/utils.py,
    ``check_compress_condition`` / ``identify_compressible_chunks`` in cache/utils.py, ``KVCacheCompressor``), with
    our run's forwards and kept indices. Returns per trigger the integer arrays the fixture records.

    - Registration: a chunk gets the next ``ctn`` rows of the buffer at its first forward (the step it enters: an
      entering chunk is always computed), in forward order; a registration past the buffer is the fork's overflow.
    - Trigger, checked after every call: buffer full, fewer chunks registered than the video has, and the last
      registered chunk has done exactly one stage of steps. Clean = registered chunks up to the window's oldest that
      have done all their steps (an earlier compressed block included); fewer than 2: nothing happens.
    - Compression: budget max(clean tokens - ctn, ctn); the clean chunks' new ranges tile [0, budget) in
      registration order with the kept counts of layer 0, KV head 0; the still-active registered chunks are re-packed
      after it in registration order (their rows move), and the next registration starts after them.
    """
    ctn, p, w = den.tokens_per_chunk, table.steps_per_stage, table.window
    total_len = den.cache_chunks * ctn
    valid = table.step_valid.reshape(-1)
    chunk, active, k = (getattr(table, a).reshape(-1, w)[valid] for a in ("chunk", "active", "k"))
    ours = [s for s, rep in enumerate(res.stage_reports)
            if int(rep["events"]) > (int(res.stage_reports[s - 1]["events"]) if s else 0)]
    ranges, order, next_free, count, events, last_fwd = {}, [], 0, {}, [], None
    for g in range(len(chunk)):
        ids = [int(c) for c in chunk[g][active[g]]]
        ran = res.decisions[g] == 1
        for c in sorted(int(c) for c in res.chunk[g][ran]):
            if c not in ranges:
                assert next_free + ctn <= total_len, f"call {g}: the fork's buffer overflows registering chunk {c}"
                ranges[c], next_free = (next_free, next_free + ctn), next_free + ctn
                order.append(c)
        if ran.any():  # the stored queries are those of the last chunk forward (the duplicate runs last)
            dup = (den.nearly_clean_k is not None and not den.discard_duplicate and bool(ran[0])
                   and int(k[g][0]) >= den.nearly_clean_k)
            last_fwd = [g, ids[-1] + 1 if dup else int(res.chunk[g][ran][-1])]
        for c in ids:
            count[c] = count.get(c, 0) + 1
        if not (order and next_free >= total_len and len(order) < table.n_chunks and count[order[-1]] == p):
            continue
        clean = [c for c in order if c <= ids[0] and count[c] == den.num_steps]
        if len(clean) < 2:
            continue
        active_ids = [c for c in order if c not in clean]
        e = len(events)
        assert e < len(ours) and (ours[e] + 1) * p - 1 == g, f"the fork compresses after call {g}, we at {ours}"
        rep = res.stage_reports[ours[e]]
        lengths = [ranges[c][1] - ranges[c][0] for c in clean]
        offsets = np.cumsum([0] + lengths)
        budget = max(int(offsets[-1]) - ctn, ctn)
        assert int(rep["last_idx"].shape[-1]) == budget
        ev = {"call": g, "chunk_start": ids[0], "order_before": list(order),
              "ranges_before": [ranges[c] for c in order], "next_free_before": next_free,
              "query_src_call_chunk": last_fwd, "denoise_count": [count[c] for c in sorted(count)],
              "layers": list(range(den.cfg.num_layers))}
        for layer in range(den.cfg.num_layers):
            head0 = np.asarray(rep["last_idx"][layer, 0])
            ev[f"L{layer}_clean"], ev[f"L{layer}_active"] = clean, active_ids
            ev[f"L{layer}_budget"], ev[f"L{layer}_clean_tokens"] = budget, int(offsets[-1])
            ev[f"L{layer}_lengths"] = [int(((head0 >= a) & (head0 < b)).sum())
                                       for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
        sizes = dict(zip(clean, ev["L0_lengths"], strict=True)) | {c: ranges[c][1] - ranges[c][0] for c in active_ids}
        start = 0
        for c in clean + active_ids:  # the compressed block, then the active chunks re-packed
            ranges[c], start = (start, start + sizes[c]), start + sizes[c]
        next_free = max(b for _, b in ranges.values())
        ev["ranges_after"], ev["next_free_after"] = [ranges[c] for c in order], next_free
        events.append(ev)
    assert len(events) == len(ours), f"the fork compresses {len(events)} times, we {len(ours)} times"
    return events


@pytest.mark.parametrize("prefix", KV_RUNS)
def test_kv_compression_bookkeeping(prefix):
    """Every integer array of every trigger: registrations, ranges, query source, kept counts per chunk."""
    den, table, res = run_kv(prefix)
    events = simulate_tracker(den, table, res)
    assert len(events) == int(KV[prefix + "_num_events"])
    for e, ev in enumerate(events):
        for key, ours in ev.items():
            ref = KV[f"{prefix}_ev{e}_{key}"]
            np.testing.assert_array_equal(np.asarray(ours).reshape(ref.shape), ref, err_msg=f"event {e} {key}")


def check_tracker_invariants(events: list, ctn: int):
    """What the fork's bookkeeping must satisfy at every trigger, whatever the window and buffer."""
    nxt = None
    for e, ev in enumerate(events):
        order, clean, act, budget = ev["order_before"], ev["L0_clean"], ev["L0_active"], ev["L0_budget"]
        assert clean + act == order and len(clean) >= 2, e  # the oldest registered chunks are the clean ones
        before, after = dict(zip(order, ev["ranges_before"], strict=True)), dict(zip(order, ev["ranges_after"],
                                                                                     strict=True))
        tiles = sorted(before.values())
        assert tiles[0][0] == 0 and all(a[1] == b[0] for a, b in zip(tiles[:-1], tiles[1:], strict=True)), e  # tiled
        assert tiles[-1][1] == ev["next_free_before"] == ev["L0_clean_tokens"] + ctn * len(act), e
        if nxt is not None:  # what the previous trigger left, then registrations from its next_free on
            prev_ranges, start = nxt
            assert all(before[c] == r for c, r in prev_ranges.items()), e
            new = [c for c in order if c not in prev_ranges]
            assert [before[c] for c in new] == [(start + i * ctn, start + (i + 1) * ctn) for i in range(len(new))], e
        assert budget == max(ev["L0_clean_tokens"] - ctn, ctn), e
        for layer in ev["layers"]:
            assert ev[f"L{layer}_clean"] == clean and ev[f"L{layer}_budget"] == budget, e
            assert sum(ev[f"L{layer}_lengths"]) == budget, e
        starts = np.cumsum([0] + ev["L0_lengths"])
        assert [after[c] for c in clean] == list(zip(starts[:-1].tolist(), starts[1:].tolist(), strict=True)), e
        assert [after[c] for c in act] == [(budget + i * ctn, budget + (i + 1) * ctn) for i in range(len(act))], e
        assert all(before[c][1] - before[c][0] == ctn for c in act), e
        assert ev["next_free_after"] == budget + ctn * len(act), e
        nxt = after, ev["next_free_after"]


@pytest.mark.parametrize("prefix", KV_RUNS)
def test_kv_tracker_invariants(prefix):
    den, table, res = run_kv(prefix)
    check_tracker_invariants(simulate_tracker(den, table, res), den.tokens_per_chunk)


@pytest.mark.parametrize("window", [2, None])
def test_kv_tracker_constructed_windows(window):
    """No recorded arrays: the fixture's weights with a wider window (2, and the config's), a buffer of window + 1
    chunks and window + 2 chunks, so that the fork's trigger finds a still-active chunk and re-packs it. The fork's
    bookkeeping replayed on our run agrees with our compression (same triggers, same budget, no overflow) and is
    self-consistent, and the active chunk keeps being denoised (all final latents finite)."""
    config = json.loads((FIXTURE / "config.json").read_text())
    window = int(config["runtime_config"]["window_size"]) if window is None else window
    if setup()[1].num_steps % window:
        pytest.skip(f"{setup()[1].num_steps} steps do not split into stages of window {window}")
    prefix = KV_RUNS[0]
    n = setup()[1].n_chunks
    den, table, res = run_kv(prefix, window, window + 1, max(0, window + 2 - n))
    events = simulate_tracker(den, table, res)
    assert events and all(ev["L0_active"] for ev in events)
    check_tracker_invariants(events, den.tokens_per_chunk)
    assert np.isfinite(res.video).all()


def test_fused_attention_vanilla_and_kv_compressed_trajectories():
    """jax.nn.dot_product_attention (one masked call per chunk over [buffer ; own rows], the captions projected
    once per prompt) gives the fixture's vanilla trajectory as the tiled reference does, and the same latents as
    the tiled path with the compressed (masked, fixed-size) buffer."""
    params, den, table, cond, noise = setup()
    fused = dataclasses.replace(den, cfg=dataclasses.replace(den.cfg, attention_impl="xla"))
    res = Sampler(fused, Vanilla(), table.window, 1, reencode_clean=True).run(
        params, fused.prepare_cond(params, cond), table, jax.random.PRNGKey(0), progress=False, initial_noise=noise)
    np.testing.assert_allclose(to_ncthw(res.video), VANILLA["latent_final"], **LATENT_TOL)
    prefix = KV_RUNS[0]
    _, _, res = run_kv(prefix, attention="xla")
    np.testing.assert_array_equal(per_chunk(res, "reason", KV[prefix + "_decision"].shape[1], -1),
                                  KV[prefix + "_decision"])
    ref = KV[prefix + "_latent_final"]
    assert np.abs(to_ncthw(res.video) - ref).max() / np.abs(ref).max() < 1e-4


def test_batch_of_two_videos_is_each_video_alone():
    """batch=2: each video has its own latents and K/V buffer (vmapped), the decisions are shared; with every
    chunk computed each video equals its own batch-1 run, and the first is the fixture's."""
    params, den, table, cond, noise = setup()
    other = np.random.default_rng(1).standard_normal(noise.shape).astype(noise.dtype)
    both = Sampler(den, Vanilla(), table.window, 2, reencode_clean=True).run(
        params, cond, table, jax.random.PRNGKey(0), progress=False, initial_noise=np.concatenate([noise, other]))
    alone = Sampler(den, Vanilla(), table.window, 1, reencode_clean=True).run(
        params, cond, table, jax.random.PRNGKey(0), progress=False, initial_noise=other)
    np.testing.assert_allclose(to_ncthw(both.video[:1]), VANILLA["latent_final"], **LATENT_TOL)
    np.testing.assert_allclose(both.video[1], alone.video[0], rtol=1e-5, atol=1e-5)
    assert np.abs(both.video[1] - both.video[0]).max() > 0.1


def test_history_guidance_blends_the_chunk_with_and_without_its_history():
    """v = v_alone + s·(v − v_alone): affine in the scale, 1 = the plain forward, off above history_t_max; the
    chunk-alone forward writes no K/V."""
    params, den, table, cond, noise = setup()
    den = dataclasses.replace(den, discard_duplicate=True)

    def info(c, t):
        return SlotInfo(chunk=jnp.int32(c), k=jnp.int32(0), t=jnp.float32(t), dt=jnp.float32(0.05),
                        position=jnp.int32(table.window - 1 - c), window_end=jnp.int32(table.window))

    _, kv = den.forward_chunk(params, cond, jnp.asarray(noise[:, 0]), info(0, 0.6), den.init_kv(1, table.window))
    x = jnp.asarray(noise[:, 1])

    def run(scale, t_max=1.0):
        d = dataclasses.replace(den, history_scale=scale, history_t_max=t_max)
        out, kv_after = d.forward_chunk(params, cond, x, info(1, 0.2), kv)
        return np.asarray(out.velocity, np.float64), kv_after

    (v1, kv1), (v2, kv2), (v3, _) = run(1.0), run(2.0), run(3.0)
    assert np.abs(v2 - v1).mean() > 1e-4 * np.abs(v1).mean()  # the history matters to chunk 1
    np.testing.assert_allclose(v3 - v2, v2 - v1, atol=1e-4 * np.abs(v1).max())
    for a, b in zip(jax.tree.leaves(kv1), jax.tree.leaves(kv2), strict=True):
        np.testing.assert_array_equal(a, b)  # the guided run wrote the same K/V as the plain one
    np.testing.assert_array_equal(run(2.0, t_max=0.1)[0], v1)  # t = 0.2 > t_max: one plain forward


def test_history_guidance_passes_are_counted():
    from models.magi1_flops import count_passes

    _, den, table, _, _ = setup()
    valid = table.step_valid.reshape(-1)
    rows = {k: getattr(table, k).reshape(-1, table.window)[valid] for k in ("chunk", "k", "t")}
    dec = np.where(rows["chunk"] >= 0, 1, -1)

    def kinds(d):
        out = {}
        for kind, _ in count_passes(table, d, dec, rows["chunk"], rows["k"], False, rows["t"]):
            out[kind] = out.get(kind, 0) + 1
        return out

    plain = kinds(dataclasses.replace(den, discard_duplicate=True))
    every = kinds(dataclasses.replace(den, discard_duplicate=True, history_scale=1.5))
    early = kinds(dataclasses.replace(den, discard_duplicate=True, history_scale=1.5, history_t_max=0.3))
    assert "history_alone" not in plain and every["history_alone"] == every["noisy"] == plain["noisy"]
    assert early["history_alone"] == int(((rows["chunk"] >= 0) & (rows["t"] <= 0.3)).sum()) < every["noisy"]
