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


def test_self_forcing_independent_first_frame():
    """Upstream's [1, F, F, ...] blocks: a given prefix of 1 + F frames is pushed through as a 1-frame block, then
    an F-frame block that sees it (each at the clean timestep), exactly as two model calls over upstream's cache."""
    import jax.numpy as jnp

    from models.self_forcing import block_forward

    conf, cfg, params = sf.load()
    z = sf.npz("e2e.npz")
    block, fsl = conf["pipeline"]["num_frame_per_block"], conf["pipeline"]["frame_seq_length"]
    frames = np.moveaxis(z["final_latents"][:, :1 + block], 1, 2)  # [B, C, 1 + F, H, W]
    den = sf.denoiser(prefix_frames=1 + block, independent_first_frame=True)
    t, _ = sf.steps()
    cond = den.prepare_cond(params, z["context"], t, 0.0, prefix=frames)
    kv = den.prepare_kv(params, cond, den.init_kv(1, 1))
    assert list(np.asarray(kv["frame"])[:1 + block]) == list(range(1 + block))
    rows = (1 + block) * fsl
    k = jnp.zeros((cfg.num_layers, rows, cfg.num_heads, cfg.head_dim))
    buf = (k, k)
    cross = jax.tree.map(lambda a: a[0], cond["cross"])
    for start, n in ((0, 1), (1, block)):  # the reference: upstream's two context calls into one cache
        x = jnp.asarray(frames[0, :, start:start + n])
        mask = jnp.arange(rows) < (start + n) * fsl
        _, _, _, buf, _ = block_forward(cfg, params, x, jnp.zeros((n,)), cross, start, kv=buf,
                                        write_start=start * fsl, key_mask=mask)
    np.testing.assert_allclose(np.asarray(kv["k"][0][:, :rows]), np.asarray(buf[0]), atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(kv["v"][0][:, :rows]), np.asarray(buf[1]), atol=2e-5, rtol=1e-5)


def test_self_forcing_text_to_video_with_an_independent_first_frame(tmp_path):
    """Text-to-video with blocks [1, F, ...]: the first frame is generated as its own block, then continued."""
    from converters.convert import convert_to_dir
    from experiments import common
    from experiments.cli import CONFIG_DIR, load_config

    d = sf.fixture_dir()
    ckpt = convert_to_dir("self_forcing", d / "weights.safetensors", tmp_path / "ck", str(d / "config.json"))
    pl = sf.load()[0]["pipeline"]
    c = load_config(str(CONFIG_DIR / "self_forcing_vanilla.py"))
    c.checkpoint, c.sampler.independent_first_frame = str(ckpt), True
    c.video.height, c.video.width = 8 * pl["latent_height"], 8 * pl["latent_width"]
    c.video.num_frames = 4 * (1 + 2 * pl["num_frame_per_block"]) - 3  # 1 + 2 blocks of latent frames
    run = common.build(c)
    assert run.table.n_chunks == 2 and run.denoiser.prefix_frames == 1 and "first_frame" in run.notes
    res, _ = run.sample(progress=False)
    lead = np.asarray(run.cond["prefix"])
    assert lead.shape[2] == 1 and np.isfinite(lead).all() and np.isfinite(res.video).all()
    other = run.conditions(c.seed + 1)["prefix"]  # another seed has its own first frame
    assert not np.allclose(np.asarray(other), lead)
