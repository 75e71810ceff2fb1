"""FlowCache's SkyReels executor with KV compression (the host oracle ``tests/skyreels_oracle.py``, executing the
one rule's decisions) vs the fork (e2e_flowcache_kv_{sync,async,long}.npz): every event, kept set and final."""

import jax.numpy as jnp
import numpy as np
import pytest

from flowcache_jax.policies.group_flowcache import COMPUTED, PREFIX
from flowcache_jax.policies.host import valid_rows
from flowcache_jax.schedules import df_frame_masks
from tests import skyreels_oracle
from tests.skyreels_runs import REPORT, call_kwargs, fixture_windows, windowed
from tests.test_skyreels_flowcache import policy_of, prefix_refresh
from tests.test_skyreels_parity import FIXTURE, model  # noqa: F401  (module-scoped fixture)

FILES = sorted(FIXTURE.glob("e2e_flowcache_kv_*.npz"))
CASES = [(f, k[: -len("_status")]) for f in FILES for k in np.load(f).files if k.endswith("_status")]


def threshold(path, run: str) -> float:
    """The run's threshold, as recorded by the same run without compression."""
    plain = np.load(FIXTURE / path.name.replace("_kv_", "_"))
    names = [str(r) for r in plain["runs"]]
    return float(plain["thresholds"][names.index(run)])


def window_statuses(model, van, thr, refresh, plan) -> list[np.ndarray]:  # noqa: F811
    """Per window, the per-call group statuses of the rule (or, without a threshold, of the executor alone)."""
    policy = policy_of(thr)
    ws, cond = windowed(model, van, policy, "groups", refresh)
    out = []
    for table in ws.tables(plan):
        if np.isnan(thr):
            rows = valid_rows(table)
            st = np.where(rows["active"], COMPUTED, np.where(rows["refresh"], PREFIX, 0)).astype(np.int8)
            out.append(np.repeat(st, 2, 0))
        else:
            den = ws.sampler(table.window).denoiser
            out.append(policy.plan(table, den.timestep_features(model[1], cond, table), 2)[1]["status"])
    return out


@pytest.mark.parametrize("path,run", CASES, ids=lambda v: v.stem if hasattr(v, "stem") else str(v))
def test_flowcache_with_compression(model, path, run):  # noqa: F811
    cfg, params = model
    f = np.load(path)
    van = np.load(FIXTURE / path.name.replace("e2e_flowcache_kv_", "e2e_vanilla_"))
    thr = threshold(path, run)
    refresh = prefix_refresh(f, thr)
    plan, noise, eps = fixture_windows(van, f, run)
    block, ar, addnoise = call_kwargs(van)
    ts = van["sched_timesteps"]
    status = window_statuses(model, van, thr, refresh, plan)
    recs, prev = [], None
    for w, (frames, pre) in enumerate(plan.windows):
        x = np.array(noise[w])
        if pre:
            x[:, :pre] = prev[:, -pre:]
        idx, upd = df_frame_masks(frames, block, len(ts), ar, pre)
        lat, rec = skyreels_oracle.run_window(
            cfg, params, x, jnp.asarray(van["context_cond"][0]), jnp.asarray(van["context_uncond"][0]),
            int(van["fps_index"][0]), idx, upd, pre, van["sched_sigmas"], ts, float(REPORT["guidance"]), block,
            status[w], refresh == "first" and pre > 0, addnoise, eps[w], budget_block=int(f["budget_block"]))
        ref = f[f"{run}_w{w}_final_latents"]
        assert np.abs(lat[-1] - ref).max() / np.abs(ref).max() < 1e-5, f"window {w}"
        offset = sum(len(s) for s in status[:w])
        for e in rec["events"]:
            e["call"] += offset
            e["window"] = w
        rec["attn"][:, 0] += offset
        recs.append(rec)
        prev = lat[-1]
    np.testing.assert_array_equal(np.concatenate(status), f[f"{run}_status"])
    np.testing.assert_array_equal(np.concatenate([r["attn"] for r in recs]),
                                  f[f"{run}_attn_call_layer_group_nkeys_compressed"])
    events = [e for r in recs for e in r["events"]]
    assert len(events) == len(f[f"{run}_ev_call"])
    pad = lambda v, n: list(v) + [-1] * (n - len(v))  # noqa: E731
    for i, e in enumerate(events):
        for key in ("call", "window", "iter", "cond", "layer", "group", "budget", "clean_tokens", "keep_group",
                    "n_keys"):
            assert e[key] == f[f"{run}_ev_{key}"][i], (i, key)
        width = f[f"{run}_ev_clean_before"].shape[1]
        assert pad(e["clean_before"], width) == f[f"{run}_ev_clean_before"][i].tolist()
        assert pad(e["clean_after"], width) == f[f"{run}_ev_clean_after"][i].tolist()
        # kept sets per head (the order inside the set has exact ties upstream: README)
        np.testing.assert_array_equal(np.sort(e["indices"], 0), np.sort(f[f"{run}_ev_indices"][i], 0))
