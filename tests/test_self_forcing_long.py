"""Self-Forcing beyond upstream's limits: several times the 21-frame buffer at constant memory and one
compilation (upstream fails at frame 21 with its default cache), and video extension from clean frames."""

from __future__ import annotations

import jax
import numpy as np

from tests import self_forcing_fixture as sf


def test_self_forcing_long_video_constant_memory_one_compile():
    from flowcache_jax.schedules import magi_schedule

    conf, _, params = sf.load()
    limit = conf["pipeline"]["kv_cache_frames_default"]  # upstream's buffer: it fails past this many frames
    block = conf["pipeline"]["num_frame_per_block"]
    sink = block
    den = sf.denoiser(kv_frames=limit, sink_frames=sink)
    n_blocks = -(-3 * limit // block)  # three times the limit
    t, sig = sf.steps()
    z = sf.npz("e2e.npz")
    cond = den.prepare_cond(params, z["context"], t)
    smp = sf.sampler(den)
    shapes, held = [], []

    def watch(stage, state):
        shapes.append(jax.tree.map(lambda a: (a.shape, a.dtype), state.kv))
        held.append(np.asarray(state.kv["frame"]))

    res = smp.run(params, cond, magi_schedule(n_blocks, 1, len(t), grid=1.0 - sig), jax.random.PRNGKey(3),
                  progress=False, on_stage=watch)
    assert res.traces == 1 and len(smp._compiled) == 1
    assert all(s == shapes[0] for s in shapes)  # the buffer never grows
    assert np.isfinite(res.video).all() and res.video.shape[1] == n_blocks
    # the history before the last block: the sink, then the most recent frames that fit
    last = held[-1]
    before = (n_blocks - 1) * block
    ring = den.history_frames - sink
    assert set(last[last >= 0]) == set(range(sink)) | set(range(before - ring, before))
    # before the first eviction the sink changes nothing: the same frames as a run with upstream's global buffer
    glob = sf.denoiser(kv_frames=limit)
    first = (limit - block) // block + 1  # blocks that fit without eviction
    ref = sf.sampler(glob).run(params, glob.prepare_cond(params, z["context"], t),
                               magi_schedule(first, 1, len(t), grid=1.0 - sig), jax.random.PRNGKey(3),
                               progress=False)
    np.testing.assert_allclose(res.video[:, :first], ref.video, atol=1e-5, rtol=0)
    assert not np.allclose(res.video[:, first:first + 1], 0)


def test_self_forcing_extends_clean_frames():
    """The last blocks of a generation, continued from its first block as ``initial_latent``, are the same blocks:
    encoding a clean prefix is the context pass upstream runs after that block."""
    from flowcache_jax.schedules import magi_schedule

    conf, _, params = sf.load()
    z = sf.npz("e2e.npz")
    block = conf["pipeline"]["num_frame_per_block"]
    t, sig = sf.steps()
    final = sf.blocks(z["final_latents"], block)  # [B, n, C, F, H, W]
    den = sf.denoiser(prefix_frames=block)
    cond = den.prepare_cond(params, z["context"], t, conf["pipeline"]["context_noise"], prefix=final[:, 0])
    noise = sf.blocks(z["noise"], block)[:, 1:]
    eps = z["renoise_eps"][None].transpose(0, 1, 2, 4, 3, 5, 6)[:, 1:]
    res = sf.sampler(den).run(params, cond, magi_schedule(noise.shape[1], 1, len(t), grid=1.0 - sig),
                              jax.random.PRNGKey(0), progress=False, initial_noise=noise, solver_noise=eps)
    np.testing.assert_allclose(res.video, final[:, 1:], atol=2e-4, rtol=0)
