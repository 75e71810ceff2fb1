"""FlowCache's SkyReels executor with KV compression vs the fork (e2e_flowcache_kv_{sync,async,long}.npz)."""


import jax.numpy as jnp
import numpy as np
import pytest

from models.skyreels_flowcache import GroupCache, run_window
from tests.test_skyreels_df import REPORT
from tests.test_skyreels_flowcache import fork_windows
from tests.test_skyreels_parity import FIXTURE, model  # noqa: F401  (module-scoped fixture)

FILES = sorted(FIXTURE.glob("e2e_flowcache_kv_*.npz"))
CASES = [(f, k[: -len("_status")]) for f in FILES for k in np.load(f).files if k.endswith("_status")]


def threshold(path, run: str) -> float:
    """The run's threshold, as recorded by the same run without compression."""
    plain = np.load(FIXTURE / path.name.replace("_kv_", "_"))
    names = [str(r) for r in plain["runs"]]
    return float(plain["thresholds"][names.index(run)])


@pytest.mark.parametrize("path,run", CASES, ids=lambda v: v.stem if hasattr(v, "stem") else str(v))
def test_flowcache_with_compression(model, path, run):  # noqa: F811
    cfg, params = model
    f = np.load(path)
    van = np.load(FIXTURE / path.name.replace("e2e_flowcache_kv_", "e2e_vanilla_"))
    thr = threshold(path, run)
    cache = GroupCache(None if np.isnan(thr) else thr)
    recs = []

    def step(w, x, plan, overlap, addnoise, eps):
        ctx_c, ctx_u = jnp.asarray(van["context_cond"][0]), jnp.asarray(van["context_uncond"][0])
        lat, rec = run_window(cfg, params, x, ctx_c, ctx_u, int(van["fps_index"][0]), plan, van["sched_sigmas"],
                              van["sched_timesteps"], float(REPORT["guidance"]), int(REPORT["V"]["block"]), cache,
                              overlap, addnoise, eps, budget_block=int(f["budget_block"]))
        ref = f[f"{run}_w{w}_final_latents"]
        assert np.abs(lat[-1] - ref).max() / np.abs(ref).max() < 1e-5, f"window {w}"
        offset = sum(len(r["status"]) for r in recs)
        for e in rec["events"]:
            e["call"] += offset
            e["window"] = w
        rec["attn"][:, 0] += offset
        recs.append(rec)
        return lat[-1]

    fork_windows(f, van, run, cache, step)
    for key in ("status", "group_update", "group_cnt_before"):
        np.testing.assert_array_equal(np.concatenate([r[key] for r in recs]), f[f"{run}_{key}"], err_msg=key)
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
