"""Parity of the causal Wan model, the few-step loop and the rolling sink buffer with upstream Self-Forcing
(``self_forcing_tiny``: one block forward over a partly filled cache, whole generations, rolling runs)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from tests import self_forcing_fixture as sf

FWD = dict(atol=2e-5, rtol=1e-5)  # the fixture README's single-forward tolerance
E2E = dict(atol=2e-4, rtol=0)  # and its end-to-end one


def test_self_forcing_steps_match_the_scheduler():
    z = sf.npz("e2e.npz")
    from flowcache_jax.schedules import flow_match_table

    sig, ts = flow_match_table(sf.load()[0]["pipeline"]["timestep_shift"])
    np.testing.assert_array_equal(sig, z["sched_sigmas"])
    np.testing.assert_array_equal(ts, z["sched_timesteps"])
    t, s = sf.steps()
    np.testing.assert_array_equal(t, z["denoising_step_list_warped"])
    np.testing.assert_array_equal(s[:-1], z["step_sigma"])
    np.testing.assert_array_equal(s[1:-1], z["renoise_sigma"])
    assert s[-1] == 0


def test_self_forcing_block_forward_over_a_partly_filled_cache():
    from models.self_forcing import block_forward
    from models.skyreels_v2 import cross_kv, text_embed

    conf, cfg, p = sf.load()
    z = sf.npz("case_forward.npz")
    fsl = conf["pipeline"]["frame_seq_length"]
    cross = cross_kv(cfg, p, text_embed(cfg, p, jnp.asarray(z["context"][0])))
    np.testing.assert_allclose(np.asarray(cross[0]), z["crossattn_k"][:, 0], **FWD)
    np.testing.assert_allclose(np.asarray(cross[1]), z["crossattn_v"][:, 0], **FWD)
    k, v = jnp.asarray(z["cache_before_k"][:, 0]), jnp.asarray(z["cache_before_v"][:, 0])
    start = int(z["current_start"])
    t_sched, s_sched = z["sched_timesteps"], z["sched_sigmas"]
    for call in (1, 2):
        x = np.moveaxis(z[f"x{call}"][0], 0, 1)  # [C, F, H, W]
        n = x.shape[1] * fsl
        mask = jnp.arange(k.shape[1]) < start + n
        flow, h_in, _, (k, v), inter = block_forward(cfg, p, jnp.asarray(x), jnp.asarray(z[f"t{call}"][0]), cross,
                                                     start // fsl, kv=(k, v), write_start=start, key_mask=mask,
                                                     with_intermediates=True)
        flow = np.moveaxis(np.asarray(flow), 0, 1)[None]
        np.testing.assert_allclose(flow, z[f"flow_pred{call}"], **FWD)
        sigma = s_sched[np.abs(t_sched[None] - z[f"t{call}"][0][:, None]).argmin(1)]  # per-frame sigma
        x0 = z[f"x{call}"] - sigma[None, :, None, None, None] * flow
        np.testing.assert_allclose(x0, z[f"x0_{call}"], **FWD)
        np.testing.assert_allclose(np.asarray(k), z[f"cache_after{call}_k"][:, 0], **FWD)
        np.testing.assert_allclose(np.asarray(v), z[f"cache_after{call}_v"][:, 0], **FWD)
        if call == 1:
            tok = z["call1_patch_embed_out"][0]
            np.testing.assert_allclose(np.asarray(h_in), tok.reshape(tok.shape[0], -1).T, **FWD)
            np.testing.assert_allclose(np.asarray(inter["time_embed"]), z["call1_time_embed_out"], **FWD)
            np.testing.assert_allclose(np.asarray(inter["time_proj"]), z["call1_time_proj_out"], **FWD)
            for b in range(cfg.num_layers):
                np.testing.assert_allclose(np.asarray(inter["blocks"][b]), z[f"call1_block{b}_out"][0], **FWD)
            head = z["call1_head_out"][0]
            np.testing.assert_allclose(np.asarray(inter["head"]), head.reshape(-1, head.shape[-1]), **FWD)


def test_self_forcing_whole_generation():
    conf, cfg, p = sf.load()
    z = sf.npz("e2e.npz")
    den = sf.denoiser()
    fsl = conf["pipeline"]["frame_seq_length"]
    assert den.frame_tokens == fsl
    np.testing.assert_array_equal(den.start_frame(np.arange(z["step_current_start"].shape[0])) * fsl,
                                  z["step_current_start"][:, 0])
    kvs = []
    res, smp = sf.run(den, z, on_stage=lambda s, state: kvs.append(state.kv))
    np.testing.assert_allclose(sf.frames(res.video), z["final_latents"], **E2E)
    assert res.traces == 1 and res.computed == res.chunk_forwards_vanilla
    cond = den.prepare_cond(p, z["context"], sf.steps()[0])
    np.testing.assert_allclose(np.asarray(cond["cross"][0][0]), z["crossattn_k"][:, 0], **FWD)
    # after stage s the history holds the clean K/V of blocks < s (block s - 1 re-encoded at the stage's start)
    for b in range(len(kvs) - 1):
        kv = kvs[b + 1]
        n = int(z["kv_block_global_end_index"][b])
        held = np.asarray(kv["frame"])
        assert sorted(held[held >= 0]) == list(range(n // fsl))
        np.testing.assert_allclose(np.asarray(kv["k"][0][:, :n]), z[f"kv_after_block{b}_k"][:, 0], **FWD)
        np.testing.assert_allclose(np.asarray(kv["v"][0][:, :n]), z[f"kv_after_block{b}_v"][:, 0], **FWD)


def test_self_forcing_rolling_sink_buffer():
    z = sf.npz("e2e_rolling.npz")
    conf = sf.load()[0]
    fsl = conf["pipeline"]["frame_seq_length"]
    for run in conf["pipeline"]["rolling_runs"]:
        pre = run["name"] + "_"
        den = sf.denoiser(kv_frames=int(z[pre + "local_attn_size"]), sink_frames=int(z[pre + "sink_size"]))
        kvs = []
        res, _ = sf.run(den, z, pre, on_stage=lambda s, state, kvs=kvs: kvs.append(state.kv))
        np.testing.assert_allclose(sf.frames(res.video), z[pre + "final_latents"], **E2E)
        assert res.traces == 1
        table = z[pre + "slot_frame_table"]
        for b in range(len(kvs) - 1):
            kv, ref = kvs[b + 1], z[pre + f"kv_after_block{b}_k"][:, 0]
            held = np.asarray(kv["frame"])
            # the frames block b + 1 attends to besides itself: upstream's slots after its eviction
            nxt = set(table[b + 1][table[b + 1] >= 0]) - set(range((b + 1) * den.block, (b + 2) * den.block))
            assert set(held[held >= 0]) == nxt, (pre, b)
            for slot, f in enumerate(held):  # every kept frame holds the clean K its own context pass wrote
                if f >= 0:
                    up = int(np.flatnonzero(table[b] == f)[0])
                    np.testing.assert_allclose(np.asarray(kv["k"][0][:, slot * fsl:(slot + 1) * fsl]),
                                               ref[:, up * fsl:(up + 1) * fsl], **FWD)


def test_self_forcing_fused_attention_buffer_path():
    """With a fused attention the block's rows sit at the buffer's tail (one masked call, then ``_commit``): the
    same generation as upstream's, at the end-to-end tolerance."""
    import dataclasses

    z = sf.npz("e2e.npz")
    den = sf.denoiser()
    den = dataclasses.replace(den, cfg=dataclasses.replace(den.cfg, attention_impl="xla"))
    assert not den.streamed
    res, _ = sf.run(den, z)
    np.testing.assert_allclose(sf.frames(res.video), z["final_latents"], **E2E)
