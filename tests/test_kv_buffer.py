"""The fixed-shape KV buffer with compression on a tiny random MAGI-1: any window, budget and length."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flowcache_jax.kv import buffer as kvbuf
from flowcache_jax.kv.compress import CompressConfig
from flowcache_jax.policies import FlowCache
from flowcache_jax.sampler import Sampler
from flowcache_jax.schedules import magi_schedule, magi_time_grid
from models.magi1 import Magi1Config, init_params
from models.magi1_denoiser import Magi1Denoiser, nearly_clean_step, null_captions

TINY = Magi1Config(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, num_query_groups=2,
                   kv_channels=16, in_channels=4, out_channels=4, caption_channels=8, caption_max_length=4)


def run(window: int, total: int | None, n: int, per_stage: int = 2):
    steps = window * per_stage
    grid = magi_time_grid(steps)
    den = Magi1Denoiser(TINY, chunk_frames=2, latent_h=4, latent_w=4, n_chunks=n, num_steps=steps,
                        steps_per_stage=per_stage, nearly_clean_k=nearly_clean_step(grid),
                        cache_chunks=total, compression=CompressConfig(budget=1, min_shift=True) if total else None)
    params = init_params(TINY, jax.random.PRNGKey(0))
    y, m = null_captions(params, n)
    cond = {k: jnp.asarray(a) for k, a in dict(y=y, mask=m, null_y=y, null_mask=m).items()}
    sampler = Sampler(den, FlowCache(threshold=0.05, warmup=1), window, 1)
    res = sampler.run(params, cond, magi_schedule(n, window, steps, grid), jax.random.PRNGKey(1), progress=False,
                      record_stages=True)
    return den, res


@pytest.mark.parametrize("window,total,n", [(1, 2, 5), (2, 3, 6), (4, 5, 7), (2, 4, 3), (3, 4, 4), (4, 6, 9)])
def test_any_window_budget_and_length(window, total, n):
    """Never crashes (the reference aborts when a registration overflows), bounded buffer, n - total compressions."""
    den, res = run(window, total, n)
    assert np.isfinite(res.video).all() and res.video.shape[1] == n
    assert den.layout.rows == total * den.tokens_per_chunk  # independent of the video length
    assert int(res.stage_reports[-1]["events"]) == max(0, n - total)


def test_without_compression_the_buffer_holds_the_video():
    den, _ = run(2, None, 5)
    assert den.layout.rows == 5 * den.tokens_per_chunk
    assert [int(den.layout.slot_start(jnp.int32(c))) for c in range(5)] == [c * den.tokens_per_chunk for c in range(5)]


def test_compaction_keeps_positions_and_frees_the_slot():
    lay = kvbuf.Layout(tokens_per_chunk=4, frames_per_chunk=2, window=2, history_chunks=1)
    buf = kvbuf.empty(lay, layers=1, kv_heads=1, head_dim=3, dtype=jnp.float32)
    key = jax.random.PRNGKey(0)
    buf = buf.replace(k=jax.random.normal(key, buf.k.shape),
                      v=jax.random.normal(jax.random.fold_in(key, 1), buf.k.shape))
    for c in range(2):
        buf = kvbuf.mark_written(buf, lay, jnp.int32(c))
    assert np.asarray(buf.owner).tolist() == [0] * 4 + [1] * 4 + [-1] * 4
    assert np.asarray(kvbuf.read_mask(buf, jnp.int32(1), jnp.int32(0))).tolist() == [True] * 4 + [False] * 8
    q = jax.random.normal(jax.random.fold_in(key, 2), (1, 5, 2, 3))
    old_k, old_frame = np.asarray(buf.k), np.asarray(buf.frame)
    new, idx = kvbuf.compact(buf, lay, jnp.int32(1), q, CompressConfig(budget=1))
    assert np.asarray(new.owner).tolist() == [-2] * 4 + [-1] * 8
    kept = np.asarray(idx[0, 0])
    np.testing.assert_array_equal(np.asarray(new.k)[0, :4, 0], old_k[0, kept, 0])  # rows 0..7 are chunks 0, 1
    np.testing.assert_array_equal(np.asarray(new.frame)[0, 0, :4], old_frame[0, 0, kept])  # kept RoPE positions
    assert np.asarray(kvbuf.read_mask(new, jnp.int32(2), jnp.int32(0))).tolist() == [True] * 4 + [False] * 8
    assert not np.asarray(kvbuf.read_mask(new, jnp.int32(2), None)).any()


def test_compression_changes_the_video_only_after_it_triggers():
    """With a buffer as large as the video nothing is compressed and the result equals the uncompressed run."""
    _, full = run(2, None, 4)
    _, big = run(2, 6, 4)
    np.testing.assert_allclose(big.video, full.video, rtol=1e-5, atol=1e-5)
    _, small = run(2, 3, 4)
    assert np.abs(small.video - full.video).max() > 1e-3
    den = dataclasses.replace(Magi1Denoiser(TINY, 2, 4, 4, 4, 4, 2), cache_chunks=3)
    assert den.layout.history_chunks == 1


def continuation(prefix: np.ndarray | None, n: int = 3, window: int = 2, per_stage: int = 2):
    """MAGI-1 continuing ``prefix`` [p, C, F, H, W] (None: from scratch) with the same seed."""
    steps = window * per_stage
    grid = magi_time_grid(steps)
    p = 0 if prefix is None else len(prefix)
    den = Magi1Denoiser(TINY, chunk_frames=2, latent_h=4, latent_w=4, n_chunks=n + p, num_steps=steps,
                        steps_per_stage=per_stage, prefix_chunks=p)
    params = init_params(TINY, jax.random.PRNGKey(0))
    y, m = null_captions(params, n)
    cond = {k: jnp.asarray(a) for k, a in dict(y=y, mask=m, null_y=y, null_mask=m).items()}
    if p:
        cond["prefix"] = jnp.asarray(prefix)
    sampler = Sampler(den, FlowCache(threshold=0.05, warmup=1), window, 1)
    kv = den.prepare_kv(params, cond, den.init_kv(1, window))
    res = sampler.run(params, cond, magi_schedule(n, window, steps, grid), jax.random.PRNGKey(1), progress=False)
    return den, kv, res


def test_a_continuation_attends_to_its_prefix():
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((2, 4, 2, 4, 4)).astype(np.float32) for _ in range(2))
    den, kv, res_a = continuation(a)
    owner = np.asarray(kv["buf"].owner)
    ctn = den.tokens_per_chunk
    np.testing.assert_array_equal(owner[:2 * ctn], np.repeat([0, 1], ctn))  # the prefix fills chunks 0 and 1
    assert (owner[2 * ctn:] == kvbuf.EMPTY).all()
    frames = np.asarray(kv["buf"].frame)[0, 0, :2 * ctn]
    np.testing.assert_array_equal(frames, np.repeat([0, 1, 2, 3], ctn // 2))  # RoPE positions of the prefix
    _, _, res_b = continuation(b)
    _, _, res_none = continuation(None)
    assert res_a.video.shape == res_none.video.shape == (1, 3, 4, 2, 4, 4)
    assert np.abs(res_a.video - res_b.video).mean() > 1e-3  # the prefix conditions the generated chunks
    assert np.abs(res_a.video - res_none.video).mean() > 1e-3
