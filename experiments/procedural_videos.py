"""Procedural videos for the tiny model: shapes that move, bounce and occlude each other over a slowly panning
background. Deterministic from a PRNG key; no dataset download.

The default world is predictable from its first two frames (constant velocities, elastic bounces, no lighting
change, flat-coloured shapes with soft edges), so a continuation can be scored against the true one: what a
model gets wrong is then the model's error, not the world's randomness. The knobs make it harder again
(textured shapes, flicker, more and faster shapes, sharper edges).

Frames are RGB in [-1, 1] and are used directly as the model's latents ([C, T, H, W] for MAGI-1). The
generator is pure JAX (jit + vmap), so a training step renders its own batch in a few milliseconds.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class VideoSpec:
    frames: int = 16
    height: int = 32
    width: int = 32
    n_shapes: int = 2
    max_speed: float = 0.03  # shape speed, fraction of the frame per frame
    max_pan: float = 0.005  # background pan, fraction of the frame per frame
    max_flicker: float = 0.0  # amplitude of the global lighting change (unpredictable from two frames)
    radius: tuple[float, float] = (0.16, 0.25)  # shape radius range, fraction of the frame
    shape_texture: float = 0.0  # 0: flat-coloured shapes; 1: full-contrast stripes inside them
    grating: float = 0.1  # contrast of the background's stripes
    edge: float = 1.0  # edge sharpness: the alpha ramp spans about 1 / edge pixels
    p_visible: float = 1.0  # chance that a shape is drawn at all


def _bounce(p: jax.Array, lo: jax.Array, hi: jax.Array) -> jax.Array:
    """Reflect a free trajectory into [lo, hi] (elastic bounces off the frame borders)."""
    span = jnp.maximum(hi - lo, 1e-6)
    u = jnp.mod(p - lo, 2 * span)
    return lo + span - jnp.abs(u - span)


def _stripes(x: jax.Array, y: jax.Array, freq: jax.Array, angle: jax.Array, phase: jax.Array) -> jax.Array:
    return 0.5 + 0.5 * jnp.sin(freq * (x * jnp.cos(angle) + y * jnp.sin(angle)) + phase)


def render(key: jax.Array, spec: VideoSpec) -> jax.Array:
    """One video [T, H, W, 3] in [-1, 1]."""
    ks = iter(jax.random.split(key, 24))
    u = lambda shape=(), lo=0.0, hi=1.0: jax.random.uniform(next(ks), shape, minval=lo, maxval=hi)
    t = jnp.arange(spec.frames, dtype=jnp.float32)[:, None, None]
    yy, xx = jnp.meshgrid((jnp.arange(spec.height) + 0.5) / spec.height, (jnp.arange(spec.width) + 0.5) / spec.width,
                          indexing="ij")
    x, y = xx[None], yy[None]

    # Background: a two-colour gradient times a grating, panned by the camera.
    pan = u((2,), -spec.max_pan, spec.max_pan)
    bx, by = x + pan[0] * t, y + pan[1] * t
    c0, c1 = u((3,), -0.9, 0.2), u((3,), -0.6, 0.5)
    grad = jnp.clip(0.5 + 0.5 * (bx - 0.5) * jnp.cos(u((), 0, 6.3)), 0, 1)[..., None]
    grating = _stripes(bx, by, u((), 6.0, 18.0), u((), 0.0, 3.14), u((), 0.0, 6.3))[..., None]
    img = (c0 * (1 - grad) + c1 * grad) * (1.0 - spec.grating + spec.grating * grating)

    # Shapes, drawn back to front: circle (p=2), square (p=inf) or diamond (p=1) by a soft p-norm distance.
    n = spec.n_shapes
    r = u((n,), spec.radius[0], spec.radius[1])
    p0, vel = u((n, 2)), u((n, 2), -spec.max_speed, spec.max_speed)
    kind = jax.random.randint(next(ks), (n,), 0, 3)
    col_a, col_b = u((n, 3), -0.2, 1.0), u((n, 3), -1.0, 0.6)
    tex = u((n, 3), jnp.array([4.0, 0.0, 0.0]), jnp.array([14.0, 3.14, 6.3]))
    visible = u((n,)) < spec.p_visible
    for i in range(n):
        cx = _bounce(p0[i, 0] + vel[i, 0] * t, r[i], 1 - r[i])
        cy = _bounce(p0[i, 1] + vel[i, 1] * t, r[i], 1 - r[i])
        dx, dy = jnp.abs(x - cx), jnp.abs(y - cy)
        d = jnp.select([kind[i] == 0, kind[i] == 1], [jnp.sqrt(dx**2 + dy**2), jnp.maximum(dx, dy)], dx + dy)
        alpha = jax.nn.sigmoid((r[i] - d) * spec.height * spec.edge) * visible[i]
        s = 1.0 - spec.shape_texture * (1.0 - _stripes(x - cx, y - cy, tex[i, 0], tex[i, 1], tex[i, 2])[..., None])
        img = img * (1 - alpha[..., None]) + (col_a[i] * s + col_b[i] * (1 - s)) * alpha[..., None]

    # Lighting: a slow global brightness oscillation.
    light = 1.0 + u((), 0.0, spec.max_flicker) * jnp.sin(u((), 0.1, 0.4) * t + u((), 0.0, 6.3))
    return jnp.clip(img * light[..., None], -1.0, 1.0)


def world(overrides: str = "") -> dict:
    """``VideoSpec`` fields from ``"key=value,..."`` (a range as ``lo:hi``, e.g. ``"n_shapes=2,radius=0.16:0.25"``):
    the same text names the world for training (``train_tiny.py --world``) and for the clips a continuation is
    given and scored against (``prefix.world``), so the two can be made to agree."""
    defaults = VideoSpec()
    names = [n for n in VideoSpec.__dataclass_fields__ if n not in ("frames", "height", "width")]  # sizes: the run's
    out = {}
    for item in filter(None, (s.strip() for s in overrides.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key not in names:
            raise ValueError(f"world override {item!r}: use key=value with a key of {names}")
        default = getattr(defaults, key)
        try:
            out[key] = (tuple(float(v) for v in value.split(":")) if isinstance(default, tuple)
                        else type(default)(value))
        except ValueError:
            raise ValueError(f"world override {item!r}: {key} takes a {type(default).__name__}"
                             + (" as lo:hi" if isinstance(default, tuple) else "")) from None
        if isinstance(default, tuple) and len(out[key]) != len(default):
            raise ValueError(f"world override {item!r}: {key} takes lo:hi")
    return out


def clip(seed: int, frames: int, height: int, width: int, overrides: str = "") -> jax.Array:
    """The clip of a seed in the default world (or the one ``overrides`` names, see ``world``), [T, H, W, 3]: what
    a continuation is given and what it is scored against (one place, so the two cannot disagree)."""
    spec = VideoSpec(frames=frames, height=height, width=width, **world(overrides))
    return _render_jit(jax.random.PRNGKey(seed), spec)


def shape_mask(seed: int, frames: int, height: int, width: int, overrides: str = "", tol: float = 0.02) -> jax.Array:
    """Where a clip's shapes are, [T, H, W] bool: the pixels (soft edges included) that differ by more than ``tol``
    from the same seed's background alone. Splits a continuation's error into the moving objects, which a model must
    track, and the slowly panning background, which copying the last frame nearly gets right."""
    full = clip(seed, frames, height, width, overrides)
    background = clip(seed, frames, height, width, ",".join(filter(None, [overrides, "p_visible=0"])))
    return jnp.abs(full - background).max(-1) > tol  # every draw is made whether a shape is shown: same background


_render_jit = jax.jit(render, static_argnums=1)  # one compile per world and size, not a few hundred eager ops


def batch(key: jax.Array, size: int, spec: VideoSpec) -> jax.Array:
    """``size`` videos [B, T, H, W, 3] from one key (video i uses ``fold_in(key, i)``)."""
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(size))
    return jax.vmap(lambda k: render(k, spec))(keys)


def to_latent(video: jax.Array) -> jax.Array:
    """[..., T, H, W, 3] -> [..., 3, T, H, W] (MAGI-1's channel-first latent layout)."""
    return jnp.moveaxis(video, -1, -4)


def from_latent(latent: jax.Array) -> jax.Array:
    """[..., 3, T, H, W] -> [..., T, H, W, 3]."""
    return jnp.moveaxis(latent, -4, -1)
