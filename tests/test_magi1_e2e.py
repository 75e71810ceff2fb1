"""Whole MAGI-1 generations vs the upstream loop and the FlowCache fork (e2e_*.npz of the fixture folder).

Every size, threshold, warm-up, flag and run name comes from the fixture's files.
"""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from converters.keymaps.magi1 import convert_magi1
from converters.safetensors_io import SafetensorsReader
from flowcache_jax.policies import FlowCache, TeaCache, Vanilla
from flowcache_jax.sampler import Sampler
from flowcache_jax.schedules import magi_schedule, magi_time_grid
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


@pytest.mark.parametrize("prefix", TEA_RUNS)
def test_teacache_intended_algorithm(prefix):
    """Intended TeaCache: the recorded decisions (up to a reference crash) and the latents up to the first call
    that reads never-written K/V in the reference (its defect, README notes 3-5)."""
    thr, warm = float(TEA[prefix + "_thresh"]), int(TEA[prefix + "_warmup"])
    res = run(TeaCache(threshold=thr, warmup=warm), False, False)
    ref_modes = TEA[prefix + "_mode"]
    np.testing.assert_array_equal(modes(res)[: len(ref_modes)], ref_modes)
    ref_rel = TEA[prefix + "_rel_l1"]
    clean_calls = np.cumsum(TEA[prefix + "_call_unwritten_kv_rows_read"]) == 0
    clean_calls = np.pad(clean_calls, (0, max(0, len(ref_rel) - len(clean_calls))))  # unrecorded: not compared
    prev = np.nan_to_num(res.prev_l1)
    window_rel = np.nansum(res.diff_l1, 1) / np.maximum(prev.sum(1), 1e-30)  # over chunks present in both calls
    ids = [set(r[r >= 0]) for r in res.chunk]
    # the reference mis-aligns windows after a slide and reads unwritten K/V later: compare before either
    aligned = [g for g in range(1, len(ref_rel)) if ids[g - 1] <= ids[g] and not np.isnan(ref_rel[g])
               and clean_calls[g]]
    assert aligned
    np.testing.assert_allclose(window_rel[aligned], ref_rel[aligned], rtol=1e-4)
    steps_per_stage = setup()[2].steps_per_stage
    stages = TEA[prefix + "_latent_after_stage"]
    checked = 0
    for s, ref in enumerate(stages):
        last_call = min((s + 1) * steps_per_stage, len(clean_calls)) - 1
        if clean_calls[last_call]:
            np.testing.assert_allclose(to_ncthw(res.stage_latents[s]), ref, **LATENT_TOL, err_msg=f"stage {s}")
            checked += 1
    assert checked >= 1


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
def run_kv(prefix: str):
    """A FlowCache run of the fork with KV compression on: window and buffer size from the file."""
    from flowcache_jax.kv.compress import CompressConfig

    params, den, _, cond, noise = setup()
    window, total = int(KV["window_size"]), int(KV["total_cache_chunk_nums"])
    comp = CompressConfig(budget=1, mix_lambda=float(KV["mix_lambda"]), kernel=int(KV["kernel_size"]),
                          strategy="token" if str(KV["compress_strategy"]) == "token" else "group", min_shift=True,
                          weighting=str(KV["score_weighting_method"]))
    den = dataclasses.replace(den, steps_per_stage=den.num_steps // window, cache_chunks=total, compression=comp,
                              query_granularity=str(KV["query_granularity"]),
                              discard_duplicate=bool(KV[prefix + "_discard_nearly_clean_chunk"]))
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
    """The fork's chunk -> row-range bookkeeping, replayed from our run (its registrations, our kept indices).

    Yields per event the integer arrays the fixture records, computed from our schedule and compressions.
    """
    ctn = den.tokens_per_chunk
    flat_chunk = table.chunk.reshape(-1, table.window)[table.step_valid.reshape(-1)]
    flat_active = table.active.reshape(-1, table.window)[table.step_valid.reshape(-1)]
    ranges, next_free, events = {}, 0, []
    n_events = 0
    for s, rep in enumerate(res.stage_reports):
        for c in table.enter[s][table.enter[s] >= 0]:
            ranges[int(c)], next_free = (next_free, next_free + ctn), next_free + ctn
        if int(rep["events"]) == n_events:
            continue
        n_events += 1
        call = (s + 1) * table.steps_per_stage - 1
        order = list(ranges)
        done = {c: int((flat_active[: call + 1] & (flat_chunk[: call + 1] == c)).sum()) for c in order}
        finished = max(c for c in order if done[c] == den.num_steps)
        clean = [c for c in order if c <= finished]
        active = [c for c in order if c > finished]
        computed = np.argwhere(res.decisions[: call + 1] == 1)
        g, j = computed[-1]  # the last chunk forward before the trigger: its queries were scored
        ev = {"call": call, "chunk_start": int(flat_chunk[call][flat_active[call]].min()), "order_before": order,
              "ranges_before": [ranges[c] for c in order], "next_free_before": next_free,
              "query_src_call_chunk": [int(g), int(res.chunk[g, j])], "denoise_count": [done[c] for c in order],
              "layers": list(range(den.cfg.num_layers))}
        offsets = np.cumsum([0] + [ranges[c][1] - ranges[c][0] for c in clean])
        budget = int(rep["last_idx"].shape[-1])
        for layer in range(den.cfg.num_layers):
            head0 = np.asarray(rep["last_idx"][layer, 0])
            ev[f"L{layer}_clean"], ev[f"L{layer}_active"] = clean, active
            ev[f"L{layer}_budget"], ev[f"L{layer}_clean_tokens"] = budget, int(offsets[-1])
            ev[f"L{layer}_lengths"] = [int(((head0 >= a) & (head0 < b)).sum())
                                       for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
        lengths0 = np.cumsum([0] + ev["L0_lengths"])
        ranges = {c: (int(lengths0[i]), int(lengths0[i + 1])) for i, c in enumerate(clean)}
        next_free = budget
        for c in active:
            ranges[c], next_free = (next_free, next_free + ctn), next_free + ctn
        ev["ranges_after"], ev["next_free_after"] = [ranges[c] for c in order], next_free
        events.append(ev)
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
