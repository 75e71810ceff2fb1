"""ODE solvers in the project's time convention (t = 0 noise, t = 1 clean)."""

from __future__ import annotations

import jax


def euler_step(x: jax.Array, velocity: jax.Array, dt: jax.Array) -> jax.Array:
    """MAGI-1's update: x <- x + v * dt (dt > 0 moves towards data)."""
    return x + velocity * dt.astype(x.dtype)
