"""The attention knob: every mask kind of the fused path against the tiled reference, and what "fused" resolves to."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import attention as attn


def _qkv(s: int, length: int, hq: int = 4, g: int = 2, d: int = 8):
    k = jax.random.split(jax.random.PRNGKey(0), 3)
    return (jax.random.normal(k[0], (s, hq, d)), jax.random.normal(k[1], (length, g, d)),
            jax.random.normal(k[2], (length, g, d)))


@pytest.mark.parametrize("keys", [attn.Keys("full"), attn.Keys("prefix", length=jnp.int32(7)),
                                  attn.Keys("blocks", block=5),
                                  attn.Keys("ranges", ranges=jnp.tile(jnp.asarray([[0, 3], [9, 12]]), (12, 1, 1)),
                                            key_mask=jnp.arange(12) == 5)],
                         ids=lambda k: k.kind)
def test_fused_equals_tiled(keys):
    q, k, v = _qkv(12, 12)
    ref = attn.attend(q, k, v, keys, "tiled", key_tile=4)  # several tiles: the online softmax
    np.testing.assert_allclose(attn.attend(q, k, v, keys, "xla"), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("compact", [False, True], ids=["mask", "compacted"])
def test_masked_groups_see_their_own_keys(compact):
    """``masked``: query group r over its keys where ok[r] is set, as a tiled call per group; ``compacted`` is the
    cuDNN form (visible keys sorted to a prefix, cut by length) run through XLA."""
    q, k, v = _qkv(6, 10)
    ok = jnp.asarray([np.arange(10) < 4, (np.arange(10) % 3) == 0])
    out = attn.masked(q.reshape(2, 3, 4, 8), jnp.stack([k, k]), jnp.stack([v, v]), ok, "xla", compact=compact)
    for r in range(2):
        ref = attn.attend(q[3 * r:3 * r + 3], k, v, attn.Keys("ranges", ranges=jnp.zeros((3, 1, 2), jnp.int32),
                                                                key_mask=ok[r]), "tiled")
        np.testing.assert_allclose(out[r], ref, rtol=1e-5, atol=1e-6)


def test_resolution_and_errors():
    assert attn.resolve("fused", jnp.float32) == "xla"  # cuDNN only for half precision on a GPU
    if jax.default_backend() != "gpu":
        assert attn.resolve("fused", jnp.bfloat16) == "xla"
    with pytest.raises(ValueError, match="attention must be one of"):
        attn.check("flash")
    q, k, v = _qkv(4, 4)
    with pytest.raises(ValueError, match="cuDNN attention cannot express"):
        attn.attend(q, k, v, attn.Keys("ranges", ranges=jnp.zeros((4, 1, 2), jnp.int32)), "cudnn")
