"""The device mesh (``flowcache_jax.sharding``) on 8 host devices: every mesh shape gives the one-device decisions
(exactly) and outputs (within float tolerance), the compiled stage really is partitioned, and every device holds
the same decision state.

Runs under ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (tests/conftest.py sets it unless XLA_FLAGS is
already set); skipped with a reason when fewer devices exist.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

from experiments.errors import ConfigError
from flowcache_jax import sharding
from flowcache_jax.policies import FlowCache
from flowcache_jax.policies.group_flowcache import GroupFlowCache
from flowcache_jax.sampler import Sampler
from flowcache_jax.schedules import skyreels_sigmas
from flowcache_jax.solvers import FlowUniPC
from flowcache_jax.windows import DFPlan, DFSchedule, WindowedSampler
from tests.mesh_worker import device_copies, magi_model, run_magi

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8, reason=f"the mesh tests need 8 devices, found {jax.device_count()}: run them with "
    "XLA_FLAGS=--xla_force_host_platform_device_count=8 (tests/conftest.py sets it unless XLA_FLAGS is set)")

# A sharded matmul or reduction sums in another order than one device: latents (|x| <= ~4) agree to ~1e-6.
TOL = dict(rtol=1e-5, atol=1e-5)
COLLECTIVES = ("all-gather", "all-reduce", "collective-permute", "all-to-all", "reduce-scatter")


def mesh_id(mesh: tuple[int, int, int]) -> str:
    return "data{}-fsdp{}-seq{}".format(*mesh)


# ----- checks shared by the models ---------------------------------------------------------------------------
def stage_executable(sampler: Sampler):
    (exe,) = sampler._compiled.values()
    return exe


def assert_partitioned(sampler: Sampler, mesh: tuple[int, int, int], kv_key, q_key) -> None:
    """The compiled stage's shardings: FSDP parameters, K/V rows over seq, branches over data, replicated decisions;
    its optimized HLO holds the per-device K/V shard and collectives."""
    data, fsdp, seq = mesh
    exe = stage_executable(sampler)
    (params, _, state, _, _, _), _ = exe.input_shardings
    out_state, records = exe.output_shardings
    leaves = jax.tree.leaves(params)
    assert all(isinstance(s, NamedSharding) and s.mesh.devices.size == 8 for s in leaves)
    q = q_key(params)
    if fsdp > 1:
        assert "fsdp" in q.spec and not q.is_fully_replicated, q
        assert sum(not s.is_fully_replicated for s in leaves) >= 10
    else:
        assert all(s.is_fully_replicated for s in leaves)
    k = kv_key(state.kv)
    if seq > 1:
        assert "seq" in k.spec and not k.is_fully_replicated, k
    if data > 1:
        assert k.spec[0] == "data", k
    # the state keeps its placement from stage to stage; what the host and the policy read is replicated
    assert jax.tree.leaves(out_state) == jax.tree.leaves(state)
    for s in (state.latents, state.acc, state.has_cache, state.prev_feat, state.chunk, *jax.tree.leaves(records)):
        assert s.is_fully_replicated
    text = exe.as_text()
    assert any(c in text for c in COLLECTIVES)
    shape = kv_key(sampler.denoiser.init_kv(1, sampler.window)).shape
    per_device = k.shard_shape(shape)
    if seq > 1 or data > 1:
        assert per_device != shape
    assert "f32[" + ",".join(map(str, per_device)) + "]" in text  # the stage's K/V parameter is the shard


def assert_same_as_one_device(res, ref) -> None:
    np.testing.assert_array_equal(res.decisions, ref.decisions)
    np.testing.assert_array_equal(res.reason, ref.reason)
    assert res.computed == ref.computed
    np.testing.assert_allclose(res.video, ref.video, **TOL)
    np.testing.assert_allclose(res.acc, ref.acc, rtol=1e-4, atol=1e-6)


def assert_devices_agree(copies: list[np.ndarray]) -> None:
    """Every device's own copy of the decision state (accumulators, cache flags) after every stage is the same."""
    for c in copies:
        assert c.shape[0] == 8
        np.testing.assert_array_equal(c, np.broadcast_to(c[:1], c.shape))


# ----- layout, rules, parameter table ----------------------------------------------------------------------------
def test_mesh_config_layout_and_rules():
    mc = sharding.MeshConfig.from_config({"data": 2, "seq": 4})
    assert mc == sharding.MeshConfig(2, 1, 4) and mc.size == 8 and str(mc) == "data=2 x fsdp=1 x seq=4"
    mesh = sharding.make_mesh(mc)
    assert mesh.axis_names == sharding.MESH_AXES and dict(mesh.shape) == {"data": 2, "fsdp": 1, "seq": 4}
    with pytest.raises(ValueError, match="make the product") as e:
        sharding.make_mesh(sharding.MeshConfig(fsdp=3))
    assert "\n" not in str(e.value)
    lay = sharding.Layout(mesh)
    assert hash(lay) == hash(sharding.Layout(mesh)) and lay == sharding.Layout(mesh)
    P = jax.sharding.PartitionSpec
    assert lay.spec(("tokens", "embed")) == P("seq")
    assert lay.spec(("kv_tokens", "kv_heads", "head_dim")) == P()
    assert lay.spec(("branch", "layers", "cache_tokens", "kv_heads", "head_dim")) == P("data", None, "seq")
    assert lay.spec(("tokens", "embed"), shape=(6, 4)) == P()  # 6 tokens do not split 4 ways: replicated
    x = jnp.ones((8, 4))
    assert sharding.constrain(None, x, ("tokens", "embed")) is x
    one = sharding.Layout(sharding.make_mesh(sharding.MeshConfig(), jax.devices()[:1]))
    assert one(x, ("tokens", "embed")) is x
    assert jax.jit(lambda a: lay(a, ("tokens", "embed")))(x).sharding.spec == P("seq")
    assert Sampler(magi_model()[2], FlowCache(0.1), 2, layout=one).layout is None  # one device: unsharded


@pytest.mark.parametrize("model", ["magi1", "skyreels_v2"])
def test_mesh_parameter_table_covers_the_released_layouts(model):
    """Every leaf of the released model's layout has table axes of its rank; FSDP over 8 devices shards every
    matrix (never the layers axis) and replicates vectors."""
    if model == "magi1":
        from models.magi1 import MAGI1_4P5B_DISTILL, Magi1Config, param_shapes

        shapes = param_shapes(Magi1Config.from_upstream(MAGI1_4P5B_DISTILL))
    else:
        from models.skyreels_v2 import SKYREELS_DF_1P3B, SkyReelsConfig, param_shapes

        shapes = param_shapes(SkyReelsConfig.from_upstream(SKYREELS_DF_1P3B))
    lay = sharding.Layout(sharding.make_mesh(sharding.MeshConfig(fsdp=8)))
    flat = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))[0]
    shards = jax.tree.leaves(sharding.param_shardings(shapes, model, lay))
    assert len(flat) == len(shards)
    big = 0
    for (path, shape), s in zip(flat, shards, strict=True):
        name = sharding._path(path)
        axes = sharding.param_axes(name, len(shape), model)
        assert any(a is not None for a in axes), f"{name} is not in the table"
        layered = name.startswith("layers/")
        assert (axes[0] == "layers") == layered, name
        spec = tuple(s.spec) + (None,) * (len(shape) - len(s.spec))
        if layered:
            assert spec[0] is None, name  # the scanned layer axis is never split
        if len(shape) - layered >= 2:
            assert "fsdp" in spec, name
            big += int(np.prod(shape))
        else:
            assert s.is_fully_replicated, name
    total = sum(int(np.prod(shape)) for _, shape in flat)
    assert big / total > 0.99  # nearly every weight byte is sharded


def test_mesh_config_errors_are_one_line():
    from experiments.configs.skyreels_base import get_base as skyreels_base
    from experiments.configs.tiny_fast import get_config
    from experiments.registry import mesh_layout

    c = get_config()
    assert mesh_layout(c) is None  # the default: one device, nothing sharded
    for sizes, needle in [((1, 2, 2), "equal 8"), ((0, 8, 1), ">= 1"), ((1, 3, 3), "equal 8")]:
        c.mesh.data, c.mesh.fsdp, c.mesh.seq = sizes
        with pytest.raises(ConfigError, match=needle) as e:
            mesh_layout(c)
        assert "\n" not in str(e.value)
    s = skyreels_base("x", "flowcache")
    s.mesh.data, s.mesh.seq = 2, 4
    assert dict(mesh_layout(s).mesh.shape) == {"data": 2, "fsdp": 1, "seq": 4}
    from experiments.registry import build

    c.mesh.data, c.mesh.fsdp, c.mesh.seq = 2, 4, 1
    with pytest.raises(ConfigError, match="must divide config.batch"):
        build(c)


# ----- MAGI-1 (tiny random model, in-graph FlowCache decisions) --------------------------------------------------
@functools.cache
def magi_reference():
    """(sampler, result, layout) of the one-device run."""
    return run_magi(None)


@pytest.mark.parametrize("mesh", [(1, 1, 8), (1, 2, 4)], ids=mesh_id)  # fsdp alone: the SkyReels cases below
def test_mesh_magi_matches_one_device(mesh):
    copies: list[np.ndarray] = []
    sampler, res, _ = run_magi(mesh, on_stage=lambda s, st: copies.append(
        np.concatenate([device_copies(st.acc), device_copies(st.has_cache)], 1)))
    ref = magi_reference()[1]
    assert (ref.decisions == 0).any() and (ref.decisions == 1).any()  # the run both computes and reuses
    assert_same_as_one_device(res, ref)
    assert_devices_agree(copies)
    assert_partitioned(sampler, mesh, lambda kv: kv["buf"].k, lambda p: p["layers"]["q"]["kernel"])


def test_mesh_magi_builder_matches_one_device():
    """The configured path (``--config.mesh.*``): the shipped tiny checkpoint, sharded params, the model's hook."""
    from experiments.configs.tiny_fast import get_config
    from experiments.registry import build

    out = []
    for sizes in [(1, 1, 1), (1, 2, 4)]:
        c = get_config()
        c.video.num_chunks, c.sampler.num_steps = 2, 8
        c.mesh.data, c.mesh.fsdp, c.mesh.seq = sizes
        run = build(c)
        out.append((run, run.sample(progress=False, decode=False)[0]))
    (run1, ref), (run8, res) = out
    assert run1.sampler.layout is None and "mesh" not in run1.notes
    assert run8.notes["mesh"] == "data=1 x fsdp=2 x seq=4" and run8.denoiser.constrain is run8.sampler.layout
    assert_same_as_one_device(res, ref)
    assert_partitioned(run8.sampler, (1, 2, 4), lambda kv: kv["buf"].k, lambda p: p["layers"]["q"]["kernel"])


# ----- SkyReels-V2 (tiny random model, two CFG branches, DF window) ----------------------------------------------
SKY = dict(block=2, groups=2, latent=8, steps=6, ar_step=1)


@functools.cache
def sky_model():
    from models.skyreels_v2 import SkyReelsConfig, init_params

    cfg = SkyReelsConfig(dim=32, ffn_dim=64, num_heads=2, num_layers=2, freq_dim=16, text_dim=16, in_dim=4,
                         out_dim=4)
    ctx = jax.random.normal(jax.random.PRNGKey(3), (8, 16))
    neg = jax.random.normal(jax.random.PRNGKey(4), (8, 16))
    return cfg, init_params(cfg, jax.random.PRNGKey(0)), ctx, neg


def sky_policy(kind: str):
    return FlowCache(threshold=0.03, warmup=1) if kind == "input" else GroupFlowCache(threshold=0.05, warmup=1)


@functools.cache
def run_sky(executor: str, kind: str, mesh: tuple[int, int, int] | None):
    """One DF window of 2 causal blocks (32 tokens each) with both CFG branches; ``kind`` "input": decisions in the
    graph from the blocks' patch embeddings, "timestep": FlowCache's e0 rule as a host table."""
    from models.skyreels_denoiser import SkyReelsDenoiser

    cfg, params, ctx, neg = sky_model()
    z = SKY
    layout = None if mesh is None else sharding.Layout(sharding.make_mesh(sharding.MeshConfig(*mesh)))
    params = sharding.shard_params(params, layout, "skyreels_v2")
    sig, ts = skyreels_sigmas(z["steps"], 8.0)
    policy = sky_policy(kind)

    def make(groups: int) -> Sampler:
        den = SkyReelsDenoiser(cfg, groups, z["block"], z["latent"], z["latent"], executor=executor, constrain=layout)
        return Sampler(den, policy, groups, 1, reuse="residual", solver=FlowUniPC(sig), joint=executor == "window",
                       features="none" if kind == "timestep" else None, identity_ring=True, layout=layout)

    ws = WindowedSampler(make, DFSchedule(z["steps"], z["ar_step"], z["block"], ts, sig), policy)
    cond = ws.sampler(z["groups"]).denoiser.prepare_cond(params, ctx, neg, 1, 5.0)
    frames = z["groups"] * z["block"]
    sampler, copies = ws.sampler(z["groups"]), []
    if layout is not None:  # every device's copy of the decision state after each stage (windows pass no hook)
        hook = lambda s, st: copies.append(np.concatenate([device_copies(st.acc), device_copies(st.has_cache)], 1))  # noqa: E731
        sampler.run = functools.partial(Sampler.run, sampler, on_stage=hook)
    res = ws.run(params, cond, DFPlan(((frames, 0),), frames, z["steps"], z["block"]), jax.random.PRNGKey(1),
                 progress=False)
    return sampler, res, copies


@pytest.mark.parametrize("executor,kind,mesh", [
    ("groups", "input", (2, 1, 4)), ("groups", "input", (1, 8, 1)), ("groups", "input", (2, 2, 2)),
    ("window", "timestep", (2, 1, 4))], ids=lambda v: mesh_id(v) if isinstance(v, tuple) else v)
def test_mesh_skyreels_matches_one_device(executor, kind, mesh):
    _, ref, _ = run_sky(executor, kind, None)
    sampler, res, copies = run_sky(executor, kind, mesh)
    assert (ref.decisions == 0).any() and (ref.decisions == 1).any()
    assert ref.branches == 2 and res.decisions.shape == ref.decisions.shape
    assert_same_as_one_device(res, ref)
    assert_devices_agree(copies) and len(copies) >= 1
    kv = (lambda kv: kv[0]) if executor == "groups" else (lambda kv: None)
    if executor == "groups":
        assert_partitioned(sampler, mesh, kv, lambda p: p["layers"]["self_attn"]["q"]["kernel"])
    else:  # no K/V buffer: the whole-window residual cache [W, branches, tokens, D] carries the token axis
        (_, _, state, _, _, _), _ = stage_executable(sampler).input_shardings
        assert state.cache.spec == jax.sharding.PartitionSpec(None, "data", "seq")
        assert any(c in stage_executable(sampler).as_text() for c in COLLECTIVES)


def test_mesh_layout_none_is_the_unsharded_sampler():
    """Without a layout nothing changes: no shardings requested, the stage compiled for one device."""
    sampler, _, layout = magi_reference()
    assert layout is None and sampler.layout is None
    (params, *_), _ = stage_executable(sampler).input_shardings
    assert all(s.num_devices == 1 for s in jax.tree.leaves(params))
    assert sampler.denoiser.constrain is None


def test_mesh_magi_batch_of_videos_on_the_data_axis():
    """batch=2 on data=2 x seq=4: each device pair holds one video's K/V buffer (batch axis over data, rows over
    seq); the shared decisions and both videos are the one-device batch's."""
    from experiments.configs.tiny_fast import get_config
    from experiments.registry import build

    out = []
    for sizes in [(1, 1, 1), (2, 1, 4)]:
        c = get_config()
        c.video.num_chunks, c.sampler.num_steps, c.batch = 2, 8, 2
        c.mesh.data, c.mesh.fsdp, c.mesh.seq = sizes
        run = build(c)
        out.append((run, run.sample(progress=False, decode=False)[0]))
    (_, ref), (run8, res) = out
    assert res.video.shape[0] == 2 and np.abs(res.video[0] - res.video[1]).max() > 0.1  # two different videos
    assert_same_as_one_device(res, ref)
    (_, _, state, _, _, _), _ = stage_executable(run8.sampler).input_shardings
    spec = state.kv["buf"].k.spec
    assert spec[0] == "data" and "seq" in spec, spec
