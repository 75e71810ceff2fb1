r"""Train the tiny MAGI-1 on procedural videos (the embedded default's checkpoint), resumable.

  python experiments/train_tiny.py --output_dir=D [--steps=N] [--batch=8] [--max_minutes=45] [--world=n_shapes=3]

Flow matching in MAGI-1's convention (t = 0 noise, 1 clean, x_t = t·x1 + (1 - t)·x0, target x1 - x0) with
diffusion forcing: every chunk of a clip has its own noise level, older chunks are cleaner (as in the AR
window at inference), a random number of leading chunks are clean context, attention is block-causal by
chunk. Writes D/train_state (orbax, resumed on restart), D/loss.png, D/train_log.json and the exported
model D/model (a converted-checkpoint folder: ``--config.checkpoint=D/model``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from absl import app, flags  # noqa: E402

from experiments.configs.tiny_base import TINY_MODEL  # noqa: E402
from experiments.procedural_videos import VideoSpec, batch, to_latent, world  # noqa: E402
from flowcache_jax.schedules import flow_time_grid  # noqa: E402
from models.magi1 import Magi1Config, empty_buffer, forward_call, init_params  # noqa: E402

_OUT = flags.DEFINE_string("output_dir", None, "Folder for train_state/, model/, loss.png (required).")
_STEPS = flags.DEFINE_integer("steps", 3000, "Optimizer steps.")
_BATCH = flags.DEFINE_integer("batch", 8, "Clips per step.")
_CHUNKS = flags.DEFINE_integer("chunks", 5, "Chunks per training clip.")
_LR = flags.DEFINE_float("lr", 2e-3, "Peak learning rate (warm-up then cosine decay).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the initial weights and of the data stream.")
_MAX_MIN = flags.DEFINE_float("max_minutes", 70.0, "Stop (and export) after this much wall time.")
_FIT_MIN = flags.DEFINE_float("fit_minutes", 0.0, "If > 0: time the first steps, then set the step count (and the "
                              "cosine schedule's end) so the run takes about this long, e.g. a GPU's short lease.")
_SAVE_EVERY = flags.DEFINE_integer("save_every", 200, "Steps between resumable checkpoints.")
_NUM_STEPS = flags.DEFINE_integer("num_steps", 32, "Sampler steps the model is meant for (MAGI's step-size input).")
_WINDOW = flags.DEFINE_integer("window", 4, "Inference window: spacing of the noise levels of adjacent chunks.")
_CHUNK_FRAMES = flags.DEFINE_integer("chunk_frames", 2, "Frames per chunk.")
_SIZE = flags.DEFINE_integer("size", 32, "Frame height and width.")
_CTX_NOISE = flags.DEFINE_float("context_noise", 0.05, "Largest noise fraction mixed into clean context chunks.")
_CTX_BLUR = flags.DEFINE_float("context_blur", 1.0, "Largest blend of clean context chunks towards a blurred copy.")
_CTX_SELF = flags.DEFINE_float("context_self", 0.0, "Share of clips whose clean context is the model's own estimate.")
_CTX_KIND = flags.DEFINE_enum("context_self_kind", "predict", ["predict", "denoise", "rollout"],
                              "The estimate: 'predict' each context chunk after the first few from noise (the errors "
                              "a generation makes), 'denoise' the true chunks from a level near the data end, "
                              "'rollout' the last clean chunk generated from pure noise in --rollout_steps steps.")
_ROLL_STEPS = flags.DEFINE_integer("rollout_steps", 8, "Euler steps of a --context_self_kind=rollout generation.")
_WORLD = flags.DEFINE_string("world", "", "Overrides of the procedural world, e.g. 'n_shapes=2,radius=0.16:0.25' "
                             "(the default world otherwise); run the tiny presets with the same prefix.world.")
_ARCH = flags.DEFINE_string("architecture", "", "Overrides of the tiny model's upstream model_config, e.g. "
                            "'kv_channels=64,num_attention_heads=2,num_query_groups=1' (kept in model_config.json).")
_INIT = flags.DEFINE_string("init_from", None, "Start from this exported model folder (fine-tuning) instead of "
                            "random weights; ignored when resuming.")

FROZEN = ("t_freqs", "rope_bands")  # fixed tables stored with the params, never trained


def model_config(overrides: str = "") -> dict:
    """``TINY_MODEL`` with ``"key=value,..."`` applied (ints, floats and bools as the defaults' types): the
    architecture a run trains. Its head width also sets MAGI-1's RoPE: ``kv_channels // 8`` frequency bands per axis
    (10000^(-k/n)), so at 32 only four, and two patches' angles nearly repeat three patches apart."""
    out = dict(TINY_MODEL)
    for item in filter(None, (s.strip() for s in overrides.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key not in out or isinstance(out[key], str):
            names = [k for k, v in out.items() if not isinstance(v, str)]
            raise ValueError(f"model override {item!r}: use key=value with a key of {names}")
        kind = type(out[key])
        try:
            if kind is bool and value.lower() not in ("true", "false"):
                raise ValueError(value)
            out[key] = value.lower() == "true" if kind is bool else kind(value)
        except ValueError:
            raise ValueError(f"model override {item!r}: {key} takes a {kind.__name__}") from None
    return out


@dataclasses.dataclass(frozen=True)
class TrainSetup:
    cfg: Magi1Config
    spec: VideoSpec
    chunks: int
    chunk_frames: int
    num_steps: int
    window: int
    context_noise: float = 0.0  # largest noise mixed into clean context chunks (they keep t = 1)
    context_blur: float = 0.0  # largest blend towards a blurred copy of the clean context chunks
    context_self: float = 0.0  # share of clips whose clean context is replaced by the model's own estimate
    context_self_kind: str = "predict"  # "predict" (self_prediction), "denoise" (self_estimate), "rollout"
    rollout_steps: int = 8  # Euler steps of the "rollout" kind's generated chunk (self_rollout)


def sample_times(key: jax.Array, chunks: int, window: int) -> jax.Array:
    """Per-chunk times [chunks], non-decreasing noise with the chunk index, MAGI-shifted like the grid.

    Half the clips look like the AR window (adjacent chunks 1/window apart in u), half have independent
    sorted levels; a random number of leading chunks are clean context (t = 1). Half the clips map u to t
    with MAGI's shift (dense near noise, like the sampling grid), half use t = u: the last, large steps of
    the grid need an accurate velocity near the data end, which the shifted levels alone rarely train.
    """
    k1, k2, k3, k4, k5 = jax.random.split(key, 5)
    u0 = jax.random.uniform(k1)
    win = jnp.clip(u0 - jnp.arange(chunks) / window, 0.0, 1.0)
    ind = -jnp.sort(-jax.random.uniform(k2, (chunks,)))
    u = jnp.where(jax.random.bernoulli(k3), win, ind)
    n_clean = jax.random.randint(k4, (), 0, chunks)
    u = jnp.where(jnp.arange(chunks) < n_clean, 1.0, u)
    u2 = u * u
    t = (u2 / 3.0) / (1.0 - u2 * (2.0 / 3.0))  # MAGI-1's square + shift 3
    t = jnp.where(jax.random.bernoulli(k5), t, u)
    return jnp.where(jnp.arange(chunks) < n_clean, 1.0, t)


def per_frame(a: jax.Array, chunk_frames: int) -> jax.Array:
    """A per-chunk value [chunks] as [1, frames, 1, 1], to broadcast over a clip [C, frames, H, W]."""
    return jnp.repeat(a, chunk_frames)[None, :, None, None]


def blur(x: jax.Array) -> jax.Array:
    """[1, 2, 1] / 4 over the last two (spatial) axes, edges repeated: the softness of a generated frame."""
    for ax in (-2, -1):
        pad = [(0, 0)] * x.ndim
        pad[ax] = (1, 1)
        xp = jnp.pad(x, pad, mode="edge")
        n = x.shape[ax]
        x = (jax.lax.slice_in_dim(xp, 0, n, axis=ax) + 2 * jax.lax.slice_in_dim(xp, 1, n + 1, axis=ax)
             + jax.lax.slice_in_dim(xp, 2, n + 2, axis=ax)) / 4
    return x


def self_estimate(forward, params: dict, x1: jax.Array, chunks: int, key: jax.Array) -> jax.Array:
    """The model's own clean estimate of a clip from one noisy level (no gradient), x̂1 = x_t + (1 - t)·v̂.

    At inference a chunk's context is what the model generated, with the model's own artefacts (blur, colour
    noise per patch), not a rendered clip; one denoising step from a random level near the data end gives a
    context with those artefacts for one forward without backward per clip.
    """
    kt, kn = jax.random.split(jax.random.fold_in(key, 1))
    ts = jax.random.uniform(kt, (), minval=0.6, maxval=0.97)
    xt = ts * x1 + (1 - ts) * jax.random.normal(kn, x1.shape)
    p = jax.lax.stop_gradient(params)
    return jax.lax.stop_gradient(xt + (1 - ts) * forward(p, xt, jnp.full((chunks,), ts)))


def self_prediction(forward, params: dict, x1: jax.Array, ctx: jax.Array, t: jax.Array, chunk_frames: int,
                    key: jax.Array) -> jax.Array:
    """The context with its later clean chunks replaced by the model's one-step predictions (no gradient).

    A generated chunk's errors are not noise or blur: the model is nearly blind to those, but a continuation
    given its own chunk as context loses as much as one given its one-step prediction from pure noise. Here
    the first ``m`` clean chunks (at least one, like the given prefix) stay true and every later chunk is
    predicted in one forward from a level in [0, 0.5] (block-causal: from the true chunks and the noisy ones
    before it), so the clean chunks the loss's chunks see carry the model's own prediction errors.
    """
    chunks = t.shape[0]
    km, kt, kn = jax.random.split(jax.random.fold_in(key, 2), 3)
    n_clean = jnp.sum(t >= 1.0)
    m = jax.random.randint(km, (), 1, jnp.maximum(n_clean, 2))
    keep = jnp.arange(chunks) < m
    t1 = jnp.where(keep, 1.0, jax.random.uniform(kt, (), maxval=0.5))
    tf = per_frame(t1, chunk_frames)
    xt = tf * x1 + (1 - tf) * jax.random.normal(kn, x1.shape)
    pred = xt + (1 - tf) * forward(jax.lax.stop_gradient(params), xt, t1)
    return jax.lax.stop_gradient(jnp.where(per_frame(keep, chunk_frames), ctx, pred))


def self_rollout(forward, params: dict, ctx: jax.Array, t: jax.Array, chunk_frames: int, steps: int,
                 key: jax.Array) -> jax.Array:
    """The context with its last clean chunk replaced by the model's own ``steps``-step generation (no gradient).

    What a continuation amplifies is the error of a chunk the model generated itself, which a one-step
    prediction carries only in part: here the last clean chunk (when at least two are clean, so one true chunk
    stays, like the given prefix) is sampled from pure noise with Euler steps on the sampling grid, from the true
    chunks before it (block-causal: the noisy chunks after it do not reach it), as at inference.
    """
    chunks = t.shape[0]
    n_clean = jnp.sum(t >= 1.0)
    g = jnp.where(n_clean >= 2, n_clean - 1, chunks)  # the generated chunk; none (index past the end) if < 2 clean
    before = jnp.arange(chunks) < g
    keep = per_frame(before, chunk_frames)
    grid = jnp.asarray(flow_time_grid(steps))  # the sampling grid's levels: MAGI-1's square + shift 3
    p = jax.lax.stop_gradient(params)

    def euler(x: jax.Array, i: jax.Array) -> tuple[jax.Array, None]:
        tt = jnp.where(before, 1.0, grid[i])
        return jnp.where(keep, ctx, x + (grid[i + 1] - grid[i]) * forward(p, x, tt)), None

    x = jnp.where(keep, ctx, jax.random.normal(jax.random.fold_in(key, 3), ctx.shape))
    x, _ = jax.lax.scan(euler, x, jnp.arange(steps))
    return jax.lax.stop_gradient(jnp.where(per_frame(jnp.arange(chunks) == g, chunk_frames), x, ctx))


def loss_fn(params: dict, setup: TrainSetup, key: jax.Array, own: bool | None = None) -> jax.Array:
    """The flow-matching loss of one clip; ``own`` (static) says whether its clean context is the model's own
    (``context_self_kind``), by default for every clip when ``context_self`` > 0 (``make_step`` splits a batch)."""
    cfg, k_, f = setup.cfg, setup.chunks, setup.chunk_frames
    kd, kt, kn, ka = jax.random.split(key, 4)
    x1 = to_latent(batch(kd, 1, setup.spec))[0]  # [C, T, H, W]
    t = sample_times(kt, k_, setup.window)
    x0 = jax.random.normal(kn, x1.shape)
    # At inference the context is the model's own output, not a rendered clip: blurring the clean chunks a little
    # and mixing in a little noise (they stay labelled t = 1, the targets stay sharp) teaches the model to restore
    # its context's errors instead of copying them forward, chunk after chunk.
    kb, ka, ks = jax.random.split(ka, 3)
    hw = (x1.shape[2] // cfg.patch_size) * (x1.shape[3] // cfg.patch_size)
    ctn = f * hw // cfg.t_patch_size
    kv_range = jnp.stack([jnp.zeros(k_, jnp.int32), (jnp.arange(k_) + 1) * ctn], -1)  # block-causal
    y = jnp.broadcast_to(params["y_embed"]["null_caption"][None], (k_, *params["y_embed"]["null_caption"].shape))
    mask = jnp.ones(y.shape[:2], jnp.float32)
    forward = lambda p, x, tt: forward_call(cfg, p, x, tt, y, mask, kv_range, empty_buffer(cfg, 1), 0,
                                            setup.num_steps, 0)[0]
    clean = per_frame(t >= 1.0, f)
    ctx = x1 + setup.context_blur * jax.random.uniform(kb) * (blur(x1) - x1)
    if setup.context_self > 0 if own is None else own:  # scheduled sampling: the context has the model's errors
        if setup.context_self_kind == "predict":
            ctx = self_prediction(forward, params, x1, ctx, t, f, ks)
        elif setup.context_self_kind == "rollout":
            ctx = self_rollout(forward, params, ctx, t, f, setup.rollout_steps, ks)
        else:
            ctx = self_estimate(forward, params, x1, k_, ks)
    x1_ctx = jnp.where(clean, ctx, x1)
    t_in = jnp.where(t >= 1.0, 1.0 - setup.context_noise * jax.random.uniform(ka), t)
    tf = per_frame(t_in, f)
    xt = tf * x1_ctx + (1 - tf) * x0
    vel = forward(params, xt, t)
    err = jnp.square(vel - (x1 - x0)).reshape(x1.shape[0], k_, -1).mean((0, 2))
    noisy = (t < 1.0).astype(jnp.float32)
    return jnp.sum(err * noisy) / jnp.maximum(noisy.sum(), 1.0)


def make_optimizer(steps: int, lr: float) -> optax.GradientTransformation:
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, min(200, steps // 10 + 1), steps, lr * 0.05)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=1e-4))


def make_step(setup: TrainSetup, opt: optax.GradientTransformation, batch_size: int, ema_decay: float = 0.999):
    fixed = init_params(setup.cfg, jax.random.PRNGKey(0))  # only its (deterministic) frozen tables are used

    n_own = round(setup.context_self * batch_size)  # a static share of each batch: no both-branch cond under vmap

    def batch_loss(p: dict, keys: jax.Array) -> jax.Array:
        parts = [jax.vmap(lambda k, own=own: loss_fn(p, setup, k, own))(ks)
                 for own, ks in ((True, keys[:n_own]), (False, keys[n_own:])) if len(ks)]
        return jnp.concatenate(parts).mean()

    def step(state: dict, key: jax.Array) -> tuple[dict, jax.Array]:
        keys = jax.random.split(key, batch_size)
        loss, grads = jax.value_and_grad(batch_loss)(state["params"], keys)
        grads = {k: (jax.tree.map(jnp.zeros_like, v) if k in FROZEN else v) for k, v in grads.items()}
        updates, opt_state = opt.update(grads, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        params = {**params, **{k: fixed[k] for k in FROZEN}}  # weight decay must not touch the fixed tables
        decay = jnp.minimum(ema_decay, (1.0 + state["step"]) / (10.0 + state["step"]))  # no bias towards the init
        ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, state["ema"], params)
        ema = {**ema, **{k: fixed[k] for k in FROZEN}}
        return {"params": params, "ema": ema, "opt": opt_state, "step": state["step"] + 1}, loss

    return jax.jit(step, donate_argnums=0)


def init_state(setup: TrainSetup, opt: optax.GradientTransformation, seed: int) -> dict:
    params = init_params(setup.cfg, jax.random.PRNGKey(seed))
    params["final"] = jax.tree.map(jnp.zeros_like, params["final"])  # start from a zero velocity
    ema = jax.tree.map(jnp.copy, params)
    return {"params": params, "ema": ema, "opt": opt.init(params), "step": jnp.zeros((), jnp.int32)}


def warm_start(state: dict, folder: str, opt: optax.GradientTransformation) -> dict:
    """Fine-tuning: the weights (and their EMA) of an exported model, a fresh optimizer and step count."""
    from flowcache_jax import checkpoint

    params, _ = checkpoint.load(folder, target=state["params"])
    params = jax.tree.map(lambda a, b: jnp.asarray(a, b.dtype), params, state["params"])
    return {**state, "params": params, "ema": jax.tree.map(jnp.copy, params), "opt": opt.init(params)}


def fit_steps(done: int, elapsed_s: float, step_s: float, minutes: float) -> int:
    """The step count that ends a run started ``elapsed_s`` ago within ``minutes`` (10 % kept for the re-jit of
    the new schedule and the saves); at least one more step."""
    return max(done + 1, done + int(0.9 * (minutes * 60 - elapsed_s) / step_s))


def plot_loss(losses: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from flowcache_jax.io import save_figure

    fig, ax = plt.subplots(figsize=(5, 3))
    x = np.arange(1, len(losses) + 1)
    ax.plot(x, losses, lw=0.5, alpha=0.4, label="per step")
    w = max(1, len(losses) // 50)
    if len(losses) >= w:
        ax.plot(x[w - 1:], np.convolve(losses, np.ones(w) / w, "valid"), label=f"mean of {w}")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("flow-matching MSE")
    ax.legend()
    save_figure(fig, path)
    plt.close(fig)


def main(argv: list[str]) -> None:
    del argv
    import orbax.checkpoint as ocp
    from tqdm.auto import tqdm

    from flowcache_jax import checkpoint, io

    if not _OUT.value:
        raise app.UsageError("--output_dir is required")
    out = Path(_OUT.value).resolve()
    try:
        overrides = world(_WORLD.value)
    except ValueError as e:
        raise app.UsageError(f"--world: {e}") from None
    try:
        model = model_config(_ARCH.value)
    except ValueError as e:
        raise app.UsageError(f"--architecture: {e}") from None
    spec = VideoSpec(frames=_CHUNKS.value * _CHUNK_FRAMES.value, height=_SIZE.value, width=_SIZE.value, **overrides)
    cfg = Magi1Config.from_upstream(model, "float32")
    setup = TrainSetup(cfg, spec, _CHUNKS.value, _CHUNK_FRAMES.value, _NUM_STEPS.value, _WINDOW.value,
                       _CTX_NOISE.value, _CTX_BLUR.value, _CTX_SELF.value, _CTX_KIND.value,
                       _ROLL_STEPS.value)
    log_path = out / "train_log.json"
    log = json.loads(log_path.read_text()) if log_path.is_file() else {}
    losses: list[float] = log.get("losses", [])
    total = int(log.get("total_steps", _STEPS.value))  # a resumed --fit_minutes run keeps the count it chose
    fitted = "total_steps" in log or _FIT_MIN.value <= 0
    opt = make_optimizer(total, _LR.value)
    state = init_state(setup, opt, _SEED.value)
    if _INIT.value:
        state = warm_start(state, _INIT.value, opt)
    mngr = ocp.CheckpointManager(out / "train_state", options=ocp.CheckpointManagerOptions(max_to_keep=2))
    if mngr.latest_step() is not None:
        state = mngr.restore(mngr.latest_step(), args=ocp.args.StandardRestore(state))
        losses = losses[:int(state["step"])]
        print(f"resumed from step {int(state['step'])}")
    step_fn = make_step(setup, opt, _BATCH.value)
    data_key = jax.random.PRNGKey(_SEED.value + 1)
    t0, start = time.perf_counter(), int(state["step"])
    bar = tqdm(initial=start, total=total, desc="train")
    probe, t_probe = start + 5, 0.0  # steps before `probe` include the compile

    def save(step: int) -> None:
        mngr.save(step, args=ocp.args.StandardSave(state))
        mngr.wait_until_finished()
        io.write_json(log_path, {"losses": losses, **({"total_steps": total} if fitted and _FIT_MIN.value > 0 else {})})

    s = start
    while s < total:
        state, loss = step_fn(state, jax.random.fold_in(data_key, s))
        losses.append(float(loss))
        s += 1
        bar.update(1)
        if s % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
        if not fitted and s == probe:
            t_probe = time.perf_counter()
        elif not fitted and s == probe + 20:
            rate = (time.perf_counter() - t_probe) / 20  # seconds per step, compiled
            total, fitted = fit_steps(s, time.perf_counter() - t0, rate, _FIT_MIN.value), True
            opt = make_optimizer(total, _LR.value)  # same state structure: the schedule reads the step count
            step_fn = make_step(setup, opt, _BATCH.value)
            bar.total = total
            bar.refresh()
            print(f"--fit_minutes={_FIT_MIN.value}: {rate * 1e3:.1f} ms per step -> {total} steps")
        if s % _SAVE_EVERY.value == 0:
            save(s)
        if (time.perf_counter() - t0) / 60 > _MAX_MIN.value:
            print(f"stopping at step {s}: --max_minutes={_MAX_MIN.value} reached")
            break
    bar.close()
    done = int(state["step"])
    save(done)
    final = float(np.mean(losses[-100:])) if losses else math.nan
    meta = {"model": "magi1", "model_config": model,
            "training": {"steps": done, "batch": _BATCH.value, "chunks": _CHUNKS.value,
                         "chunk_frames": _CHUNK_FRAMES.value, "size": _SIZE.value, "lr": _LR.value,
                         "seed": _SEED.value, "num_steps": _NUM_STEPS.value, "window": _WINDOW.value,
                         "context_noise": _CTX_NOISE.value, "context_blur": _CTX_BLUR.value,
                         "context_self": _CTX_SELF.value, "context_self_kind": _CTX_KIND.value,
                         **({"rollout_steps": _ROLL_STEPS.value} if _CTX_KIND.value == "rollout" else {}),
                         "init_from": _INIT.value, "total_steps": total,
                         "world": dataclasses.asdict(spec),
                         "final_loss_mean100": final, "weights": "ema(0.999, warm-up (1+n)/(10+n))",
                         "wall_minutes_this_run": (time.perf_counter() - t0) / 60}}
    checkpoint.save(out / "model", state["ema"], meta, overwrite=True)
    plot_loss(losses, out / "loss.png")  # after the export: a machine without matplotlib still gets the model
    print(f"step {done}: mean loss of the last 100 steps {final:.4f}; wrote {out / 'model'}, {out / 'loss.png'}")


if __name__ == "__main__":
    app.run(main)
