"""The procedural videos and the tiny model's training objective (diffusion forcing, MAGI convention)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments.configs.tiny_base import TINY_MODEL
from experiments.procedural_videos import VideoSpec, batch, clip, from_latent, render, to_latent, world
from experiments.train_tiny import (
    TrainSetup,
    fit_steps,
    init_state,
    loss_fn,
    make_optimizer,
    make_step,
    model_config,
    sample_times,
    self_estimate,
    self_prediction,
    self_rollout,
    warm_start,
)
from models.magi1 import Magi1Config

SPEC = VideoSpec(frames=6, height=16, width=16)


def small_setup(chunks: int) -> TrainSetup:
    """A 1-layer, 32-wide model on 16x16 clips of ``chunks`` chunks of 2 frames: the objective, not its quality."""
    cfg = dataclasses.replace(Magi1Config.from_upstream(TINY_MODEL, "float32"), num_layers=1, hidden_size=32,
                              ffn_hidden_size=64, num_attention_heads=2, num_query_groups=1, kv_channels=16)
    return TrainSetup(cfg, VideoSpec(frames=2 * chunks, height=16, width=16), chunks=chunks, chunk_frames=2,
                      num_steps=8, window=2)


def test_videos_are_deterministic_and_move():
    render_ = jax.jit(render, static_argnums=1)  # one compile, not op-by-op dispatch of three renders
    a, b = render_(jax.random.PRNGKey(3), SPEC), render_(jax.random.PRNGKey(3), SPEC)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (6, 16, 16, 3) and float(a.min()) >= -1 and float(a.max()) <= 1
    c = render_(jax.random.PRNGKey(4), SPEC)
    assert float(jnp.abs(a - c).mean()) > 0.05  # another seed, another video
    step = jnp.abs(a[1:] - a[:-1]).mean(axis=(1, 2, 3))
    assert float(step.min()) > 1e-4 and float(step.max()) < 0.5  # it moves, continuously
    v = batch(jax.random.PRNGKey(0), 3, SPEC)
    np.testing.assert_array_equal(from_latent(to_latent(v)), v)
    assert to_latent(v).shape == (3, 3, 6, 16, 16)


def test_world_overrides_name_a_world():
    assert world("") == {}
    assert world("n_shapes=2, radius=0.16:0.25,max_speed=0.05") == {"n_shapes": 2, "radius": (0.16, 0.25),
                                                                    "max_speed": 0.05}
    a, b = clip(3, 2, 16, 16), clip(3, 2, 16, 16, "n_shapes=0")  # same seed, no shapes: only the background
    assert float(jnp.abs(a - b).max()) > 0.1
    want = jax.jit(render, static_argnums=1)(jax.random.PRNGKey(3), VideoSpec(frames=2, height=16, width=16,
                                                                             n_shapes=0))
    np.testing.assert_array_equal(b, want)
    for bad, said in [("nshapes=2", "use key=value"), ("n_shapes", "use key=value"), ("frames=4", "use key=value"),
                      ("n_shapes=two", "takes a int"), ("radius=0.2", "lo:hi"), ("radius=a:b", "lo:hi")]:
        with pytest.raises(ValueError, match=said):
            world(bad)


def test_times_are_ordered_like_the_ar_window():
    for i in range(200):
        t = np.asarray(sample_times(jax.random.PRNGKey(i), 5, 4))
        assert ((t >= 0) & (t <= 1)).all()
        assert (np.diff(t) <= 1e-7).all()  # older chunks are never noisier than newer ones
        assert t[-1] < 1.0  # at least one chunk is noisy (it carries the loss)


def test_training_reduces_the_loss():
    setup = small_setup(2)
    opt = make_optimizer(60, 3e-3)
    state = init_state(setup, opt, 0)
    keys = jnp.stack([jax.random.PRNGKey(100 + i) for i in range(8)])
    evaluate = jax.jit(lambda p: jnp.mean(jax.vmap(lambda k: loss_fn(p, setup, k))(keys)))  # one graph, not 8
    before = float(evaluate(state["params"]))
    step = make_step(setup, opt, 4)
    for s in range(60):
        state, _ = step(state, jax.random.fold_in(jax.random.PRNGKey(1), s))
    after = float(evaluate(state["params"]))
    assert after < 0.8 * before, (before, after)
    frozen = init_state(setup, optax.sgd(0.0), 0)["params"]
    np.testing.assert_array_equal(state["params"]["rope_bands"], frozen["rope_bands"])  # tables stay fixed


def test_warm_start_loads_an_exported_model(tmp_path):
    from flowcache_jax import checkpoint

    plain = small_setup(3)
    opt = make_optimizer(10, 1e-3)
    state = init_state(plain, opt, 0)
    # Fine-tuning starts from an exported model's weights, with a fresh optimizer.
    checkpoint.save(tmp_path / "m", state["params"], {"model": "magi1"})
    fresh = init_state(plain, opt, 1)
    warm = warm_start(fresh, str(tmp_path / "m"), opt)
    for x, y in zip(jax.tree.leaves(warm["params"]), jax.tree.leaves(state["params"]), strict=True):
        np.testing.assert_array_equal(x, y)
    for x, y in zip(jax.tree.leaves(warm["ema"]), jax.tree.leaves(state["params"]), strict=True):
        np.testing.assert_array_equal(x, y)


def test_fit_steps():
    assert fit_steps(25, 30.0, 0.1, 1.0) == 25 + 270  # 30 s left at 0.1 s per step, 10 % kept
    assert fit_steps(25, 90.0, 0.1, 1.0) == 26  # over time already: one more step, then export



def test_self_prediction_keeps_the_first_chunks_and_predicts_the_rest_without_gradient():
    x1 = jax.random.normal(jax.random.PRNGKey(0), (3, 8, 8, 8))  # 4 chunks of 2 frames
    ctx = x1 + 1.0  # the augmented context, told apart from the clip
    t = jnp.array([1.0, 1.0, 1.0, 0.2])  # three clean chunks: 1 or 2 stay true
    fake = lambda p, x, tt: p["w"] * jnp.ones_like(x) + 0 * tt[0]  # noqa: E731
    pred = jax.jit(lambda p, k: self_prediction(fake, p, x1, ctx, t, 2, k))
    kept = set()
    for i in range(12):
        out = np.asarray(pred({"w": jnp.float32(2.0)}, jax.random.PRNGKey(i)))
        same = [np.array_equal(out[:, 2 * c:2 * c + 2], np.asarray(ctx[:, 2 * c:2 * c + 2])) for c in range(4)]
        m = same.index(False)
        assert m in (1, 2) and not any(same[m:]), same  # a true prefix, then predictions only
        kept.add(m)
        # x̂1 = x_τ + (1 - τ)·2 with x_τ = τ·x1 + (1 - τ)·ε, τ in [0, 0.5]: far from the clip, not the clip itself
        err = np.abs(out[:, 2 * m:] - np.asarray(x1[:, 2 * m:])).mean()
        assert 0.3 < err < 4.0, err
    assert kept == {1, 2}
    grad = jax.grad(lambda w: jnp.sum(pred({"w": w}, jax.random.PRNGKey(0))))(jnp.float32(2.0))
    assert float(grad) == 0.0
    one = np.asarray(self_prediction(fake, {"w": jnp.float32(2.0)}, x1, ctx, jnp.array([1.0, 0.5, 0.2, 0.1]), 2,
                                     jax.random.PRNGKey(0)))
    np.testing.assert_array_equal(one[:, :2], ctx[:, :2])  # one clean chunk: it stays, the given prefix


def test_self_rollout_generates_the_last_clean_chunk_from_noise_without_gradient():
    ctx = jax.random.normal(jax.random.PRNGKey(0), (3, 8, 8, 8))  # 4 chunks of 2 frames
    fake = lambda p, x, tt: p["w"] * jnp.ones_like(x) + 0 * tt[0]  # noqa: E731
    roll = jax.jit(lambda p, t: self_rollout(fake, p, ctx, t, 2, 5, jax.random.PRNGKey(1)))
    out = np.asarray(roll({"w": jnp.float32(2.0)}, jnp.array([1.0, 1.0, 1.0, 0.3])))
    np.testing.assert_array_equal(out[:, :4], ctx[:, :4])  # the chunks before it stay true
    np.testing.assert_array_equal(out[:, 6:], ctx[:, 6:])  # the noisy chunk after it is the loss's business
    # Euler from pure noise over the whole grid (0 -> 1) with v = 2 ends at ε + 2: a sample, not the context.
    gen = out[:, 4:6]
    assert abs(float(gen.mean()) - 2.0) < 0.2 and 0.8 < float(gen.std()) < 1.2
    assert float(np.abs(gen - np.asarray(ctx[:, 4:6])).mean()) > 1.0
    for t in ([1.0, 0.5, 0.2, 0.1], [0.9, 0.5, 0.2, 0.1]):  # fewer than two clean chunks: nothing to replace
        np.testing.assert_array_equal(roll({"w": jnp.float32(2.0)}, jnp.array(t)), ctx)
    grad = jax.grad(lambda w: jnp.sum(roll({"w": w}, jnp.array([1.0, 1.0, 0.5, 0.3]))))(jnp.float32(2.0))
    assert float(grad) == 0.0


def test_self_context_is_the_models_one_step_estimate_without_gradient():
    x1 = jax.random.normal(jax.random.PRNGKey(0), (3, 6, 8, 8))
    fake = lambda p, x, t: p["w"] * jnp.ones_like(x) + 0 * t[0]  # a velocity of p["w"] everywhere  # noqa: E731
    est = jax.jit(lambda p: self_estimate(fake, p, x1, 3, jax.random.PRNGKey(5)))
    out = est({"w": jnp.float32(2.0)})
    # x̂1 = x_t + (1 - t)·v with x_t = t·x1 + (1 - t)·ε: with v = 2, x̂1 - x1 = (1 - t)(ε + 2 - x1), t in [0.6, 0.97]
    err = np.asarray(out - x1)
    assert 0.0 < np.abs(err).mean() < 0.4 * (np.abs(np.asarray(x1)).mean() + 2.0)
    grad = jax.grad(lambda w: jnp.sum(est({"w": w})))(jnp.float32(2.0))
    assert float(grad) == 0.0  # the context is data: no gradient through the model's own estimate
    # In the loss, a clip with clean context chunks sees that estimate instead of the rendered clip.
    setup = small_setup(3)
    params = init_state(setup, make_optimizer(10, 1e-3), 0)["params"]
    params["final"] = jax.tree.map(lambda a: a + 0.05, params["final"])  # a non-zero velocity
    key = next(k for k in (jax.random.PRNGKey(i) for i in range(50))
               if float(sample_times(jax.random.split(k, 4)[1], 3, 2)[0]) >= 1.0)  # chunk 0 is clean context
    own = dataclasses.replace(setup, context_self=1.0, context_self_kind="denoise")
    assert abs(float(loss_fn(params, own, key)) - float(loss_fn(params, setup, key))) > 1e-6
    two = next(k for k in (jax.random.PRNGKey(i) for i in range(200))
               if float(sample_times(jax.random.split(k, 4)[1], 3, 2)[1]) >= 1.0)  # chunks 0 and 1 clean
    pred = dataclasses.replace(setup, context_self=1.0, context_self_kind="predict")  # chunk 1 becomes a prediction
    assert abs(float(loss_fn(params, pred, two)) - float(loss_fn(params, setup, two))) > 1e-6
    roll = dataclasses.replace(pred, context_self_kind="rollout", rollout_steps=2)  # chunk 1 becomes a generation
    assert abs(float(loss_fn(params, roll, two)) - float(loss_fn(params, setup, two))) > 1e-6
    assert float(loss_fn(params, roll, two, False)) == pytest.approx(float(loss_fn(params, setup, two)))


def test_model_overrides_name_an_architecture():
    assert model_config("") == TINY_MODEL
    m = model_config("kv_channels=64, num_attention_heads=2,num_query_groups=1,gated_linear_unit=true")
    assert m == {**TINY_MODEL, "kv_channels": 64, "num_attention_heads": 2, "num_query_groups": 1,
                 "gated_linear_unit": True}
    assert Magi1Config.from_upstream(m, "float32").n_bands == 8  # RoPE bands per axis follow the head width
    for bad in ("kv_channels", "heads=2", "kv_channels=6.5", "gated_linear_unit=yes", "model_name=x"):
        with pytest.raises(ValueError, match="model override"):
            model_config(bad)
