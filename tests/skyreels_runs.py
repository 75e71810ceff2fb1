"""Shared by the SkyReels-V2 parity tests: a fixture's DF run through the one sampler (``WindowedSampler``)."""

from __future__ import annotations

import json

import jax
import numpy as np

from flowcache_jax.policies import structure
from flowcache_jax.sampler import Sampler
from flowcache_jax.solvers import FlowUniPC
from flowcache_jax.windows import DFPlan, DFSchedule, WindowedSampler
from models.skyreels_denoiser import SkyReelsDenoiser
from tests.test_skyreels_parity import FIXTURE

REPORT = json.loads((FIXTURE / "e2e_gen_report.json").read_text())
BLOCK = int(REPORT["V"]["block"])


def call_kwargs(f) -> tuple[int, int, int]:
    """(causal block, ar_step, addnoise_condition) of a fixture call (common values live in the report)."""
    kw = json.loads(str(f["call_kwargs_json"]))
    return int(kw.get("causal_block_size", BLOCK)), int(kw.get("ar_step", 0)), int(kw.get("addnoise_condition", 0))


def fixture_windows(van, f=None, run: str | None = None) -> tuple[DFPlan, list, list]:
    """The plan, per-window noise and addnoise eps of a recorded run (``f``/``run``: a cached run's own windows)."""
    src, pre_key = (van, "w{}_prefix_latents") if f is None else (f, f"{run}_w{{}}_prefix_latents")
    done_key = "w{}_noise" if f is None else f"{run}_w{{}}_final_latents"
    wins, noise, eps, w = [], [], [], 0
    while done_key.format(w) in src:
        x = van[f"w{w}_noise"]
        pre = src[pre_key.format(w)].shape[1] if pre_key.format(w) in src else 0
        wins.append((x.shape[1], pre))
        noise.append(x)
        eps.append(van[f"w{w}_addnoise_eps"] if pre else None)
        w += 1
    total = wins[0][0] + sum(fr - p for fr, p in wins[1:])
    block = call_kwargs(van)[0]
    return DFPlan(tuple(wins), total, len(van["sched_timesteps"]), block), noise, eps


_SAMPLERS: dict = {}  # one windowed sampler per fixture call and structure: the cases of a file share its compiles


def windowed(model, van, policy, executor: str, prefix_refresh: str = "every", stage_len: int = 0,
             block: int | None = None) -> tuple[WindowedSampler, dict]:
    """The sampler of a fixture's DF call (shared by every policy of the same structure: the policy is passed to
    ``run``) and its conditions."""
    key = (model[0], id(model[1]), str(van["call_kwargs_json"]), van["w0_noise"].shape, structure(policy), executor,
           prefix_refresh, stage_len, block)
    if key not in _SAMPLERS:
        _SAMPLERS[key] = _windowed(model, van, policy, executor, prefix_refresh, stage_len, block)
    return _SAMPLERS[key]


def _windowed(model, van, policy, executor, prefix_refresh, stage_len, block):
    cfg, params = model
    blk, ar, addnoise = call_kwargs(van)
    blk = block or blk
    ts, sig = van["sched_timesteps"], van["sched_sigmas"]
    c, _, h, w = van["w0_noise"].shape

    def make(groups: int) -> Sampler:
        den = SkyReelsDenoiser(cfg, groups, blk, h, w, executor=executor)
        return Sampler(den, policy, groups, 1, reuse="residual", solver=FlowUniPC(sig), joint=executor == "window",
                       features="none", identity_ring=True)

    ws = WindowedSampler(make, DFSchedule(len(ts), ar, blk, ts, sig, addnoise, prefix_refresh, stage_len), policy)
    cond = ws.sampler(van["w0_noise"].shape[1] // blk).denoiser.prepare_cond(
        params, van["context_cond"][0], van["context_uncond"][0], int(van["fps_index"][0]), float(REPORT["guidance"]),
        addnoise)
    return ws, cond


def run_fixture(model, van, policy, executor: str, f=None, run: str | None = None, **kw):
    """(result, per-window final latents [C, F, H, W]) of a recorded DF call through the one sampler."""
    plan, noise, eps = fixture_windows(van, f, run)
    record = kw.pop("record_stages", False)
    ws, cond = windowed(model, van, policy, executor, **kw)
    res = ws.run(model[1], cond, plan, jax.random.PRNGKey(0), progress=False, noise=noise,
                 eps=eps if any(e is not None for e in eps) else None, record_stages=record, policy=policy)
    finals = [latents_of(r.video) for r in res.windows]
    return res, finals


def latents_of(video: np.ndarray) -> np.ndarray:
    """[B, groups, C, block, H, W] sampler latents -> [C, F, H, W] of the window."""
    v = np.asarray(video)[0]
    return v.transpose(1, 0, 2, 3, 4).reshape(v.shape[1], -1, *v.shape[3:])
