"""MAGI-1 with a KV quantization method (``Magi1Denoiser.kv_method``): finished chunks' rows of the dense buffer are
replaced, once, by what the method's store would return (fake quantization), on the shipped tiny model."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import common
from experiments.configs import tiny_vanilla
from experiments.configs.tiny_base import TINY_MODEL
from experiments.errors import ConfigError
from experiments.magi_run import validate_magi

CHUNKS = 3  # generated; the tiny preset adds one given prefix chunk (model chunk 0)


def config(method: str, batch: int = 1):
    c = tiny_vanilla.get_config()
    c.video.num_chunks, c.sampler.num_steps, c.batch = CHUNKS, 16, batch
    c.kv.method = "ours" if method == "ours_aged" else method
    c.kv.tiers, c.kv.aged_tiers = ((8, 0.25), (4, 0.5)), -1  # a quarter of each frame in the summary, no ageing
    if method == "ours_aged":  # the default tiers; frames past the 2 newest collapse to one token per head
        c.kv.tiers, c.kv.aged_tiers, c.kv.recent_frames = ((8, 0.25), (4, 0.75)), 0, 2
    return c


@functools.cache
def noise() -> np.ndarray:
    v = config("dense").video
    shape = (TINY_MODEL["in_channels"], v.chunk_width, v.latent_height, v.latent_width)
    return np.random.default_rng(0).standard_normal((2, CHUNKS, *shape)).astype(np.float32)


@functools.cache
def result(method: str, batch: int = 1):
    """(run, result, per-stage numpy copies of the K/V state) of a run on the first video (batch 1) or both."""
    run = common.build(config(method, batch))
    stages = []
    x = noise()[:batch]
    res = run.sampler.run(run.params, run.cond, run.table, run.key, progress=False, initial_noise=x,
                          record_stages=True, on_stage=lambda s, st: stages.append(jax.tree.map(np.array, st.kv)))
    return run, res, stages


def rows(run, kv: dict, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """A model chunk's K, V [layers, frames, frame tokens, G, d] (batch 1)."""
    den = run.denoiser
    lay, fsl = den.layout, den.frame_tokens
    start = int(lay.slot_start(jnp.int32(chunk)))
    return tuple(np.asarray(a)[:, start:start + lay.tokens_per_chunk].reshape(a.shape[0], -1, fsl, *a.shape[2:])
                 for a in (kv["buf"].k, kv["buf"].v))


def distinct_per_group(x: np.ndarray, group: int = 16) -> np.ndarray:
    """Distinct values per (16-token group, head, channel) of x [..., frame tokens, G, d]."""
    g = x.reshape(*x.shape[:-3], x.shape[-3] // group, group, *x.shape[-2:])
    s = np.sort(g, axis=-3)
    return 1 + (np.diff(s, axis=-3) != 0).sum(-3)


def test_kv_quant_rtn_int8_is_close_to_dense_but_not_equal():
    _, dense, _ = result("dense")
    _, q8, _ = result("rtn_int8")
    a, b = np.asarray(dense.video, np.float64), np.asarray(q8.video, np.float64)
    assert np.abs(a - b).max() > 0  # the rows really changed
    psnr = 10 * np.log10((a.max() - a.min()) ** 2 / np.mean((a - b) ** 2))
    assert psnr > 40.0, psnr


def test_kv_quant_rtn_int4_rows_on_the_grid_and_unfinished_untouched():
    run, res, stages = result("rtn_int4")
    final = stages[-1]
    for chunk in range(CHUNKS + 1):  # every chunk is final at the end, the prefix included
        for x in rows(run, final, chunk):
            assert distinct_per_group(x).max() <= 15
    # stage 3: the prefix and generated chunk 0 are final, generated 1 and 2 are still being denoised
    kv = stages[3]
    assert list(kv["quant"]["frames"]) == [0, 1, 2, 3, -1, -1, -1, -1]
    for chunk in (2, 3):
        assert np.median(distinct_per_group(rows(run, kv, chunk)[0])) == 16
    before = jax.tree.map(jnp.asarray, kv)
    after = run.denoiser.end_stage(run.params, before, jnp.asarray([-1, 1, -1, -1], jnp.int32), jnp.int32(CHUNKS))
    for chunk in range(CHUNKS + 1):
        for x, y in zip(rows(run, kv, chunk), rows(run, after, chunk), strict=True):
            if chunk == 2:  # generated chunk 1 just finished
                assert distinct_per_group(y).max() <= 15 and np.abs(x - y).max() > 0
            else:
                np.testing.assert_array_equal(x, y)
    assert list(np.asarray(after["quant"]["frames"])) == [0, 1, 2, 3, 4, 5, -1, -1]


def test_kv_quant_ours_summarised_tokens_share_their_mean():
    run, res, stages = result("ours")
    m = run.denoiser.kv_method.store
    assert m.summarised > 1 and m.summary  # the default tiers leave some tokens of a 64-token frame to the summary
    for chunk in range(CHUNKS + 1):
        for x in rows(run, stages[-1], chunk):  # [L, frames, fsl, G, d]
            for idx in np.ndindex(x.shape[0], x.shape[1], x.shape[3]):
                r = x[idx[0], idx[1], :, idx[2]]  # [fsl, d]
                _, counts = np.unique(r, axis=0, return_counts=True)
                assert counts.max() == m.summarised  # the summarised tokens are one mean token, the rest differ


def test_kv_quant_study_folds_frames_once_per_video():
    """A batch of two videos (the vmapped path): each has its own plan and folds, inside the compiled stage."""
    run, res, stages = result("study_soft_prune_int4", batch=2)
    folded = np.stack([r["quant_folded"] for r in res.stage_reports])  # [stages, batch, frame slots]
    assert folded[-1].sum(-1).min() >= 1  # enough frames finished: some summarised, in both videos
    assert (folded[1:] >= folded[:-1]).all()  # folding is irreversible (the count never decreases)
    fsl = run.denoiser.frame_tokens
    for s, kv in enumerate(stages):
        for b in range(2):
            for slot in np.flatnonzero(folded[s, b]):
                for name in ("k", "v"):
                    x = getattr(kv["buf"], name)[b, :, slot * fsl:(slot + 1) * fsl]  # [L, fsl, G, d]
                    np.testing.assert_array_equal(x, np.broadcast_to(x[:, :1], x.shape))  # one mean token
                    later = getattr(stages[-1]["buf"], name)[b, :, slot * fsl:(slot + 1) * fsl]
                    np.testing.assert_array_equal(x, later)  # folded once, never touched again
    assert np.abs(res.video[1] - res.video[0]).max() > 0.1


@pytest.mark.parametrize("override,msg", [(dict(compress=True), "does not combine with kv.compress"),
                                          (dict(method="int3"), "kv.method must be one of")])
def test_kv_quant_config_errors(override, msg):
    c = config("rtn_int4")
    c.kv.update(override)
    with pytest.raises(ConfigError, match=msg):
        validate_magi(c)
    c = config("rtn_int4")
    c.sampler.semantics = "magi"
    with pytest.raises(ConfigError, match="semantics=reference"):
        validate_magi(c)


def test_kv_quant_ours_ages_old_frames_into_their_summary():
    """By age: every stored frame but the newest ``recent_frames`` becomes one mean token per head (aged_tiers 0),
    the recent ones keep their tiers; ageing happens once (an aged frame's rows never change again)."""
    run, res, stages = result("ours_aged")
    den = run.denoiser
    recent, fsl = den.kv_method.recent_frames, den.frame_tokens
    last = stages[-1]["quant"]
    frames, aged = np.asarray(last["frames"]), np.asarray(last["folded"])
    held = np.flatnonzero(frames >= 0)
    newest = set(np.sort(frames[held])[-recent:])
    assert len(held) > recent and {int(f) for f in frames[aged]} == {int(f) for f in frames[held]} - newest
    for slot in held:
        x = np.asarray(stages[-1]["buf"].k)[:, slot * fsl:(slot + 1) * fsl]  # [L, fsl, G, d]
        constant = bool((x == x[:, :1]).all())
        assert constant == bool(aged[slot])
        for kv in stages:  # once aged, the rows stay as they are
            if np.asarray(kv["quant"]["folded"])[slot]:
                np.testing.assert_array_equal(np.asarray(kv["buf"].k)[:, slot * fsl:(slot + 1) * fsl], x)
