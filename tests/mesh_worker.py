"""The tiny runs of the mesh tests, and the worker process of the multi-host test (not a test module).

As a script it is one process of a ``jax.distributed`` job on localhost (JAX's gloo CPU collectives), as one
process per host of a GPU cluster would be: it joins the job, builds one global mesh over the devices of every
process, runs the tiny MAGI-1 generation on it for each mesh shape asked for and writes the decisions, the final
latents and its own devices' copies of the accumulators to ``<out>/process<i>.npz``.

    python tests/mesh_worker.py --coordinator=127.0.0.1:PORT --num_processes=2 --process_id=0 --out=DIR \
        --meshes=1,2,4 --meshes=1,1,8

The sizes are chosen so that every sharded dimension divides by 8: 32 tokens per chunk (a chunk of 2 x 8 x 8
latents in 2 x 2 patches), 96 K/V buffer rows, widths 16 .. 128.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from pathlib import Path

import numpy as np

MAGI_SIZES = dict(n_chunks=3, window=2, steps_per_stage=2, chunk_frames=2, latent=8)
MAGI_POLICY = dict(threshold=0.05, warmup=1)


@functools.cache
def magi_model():
    """(config, params, denoiser, cond, table) of a tiny random MAGI-1: the same on every process (fixed keys)."""
    import jax
    import jax.numpy as jnp

    from flowcache_jax.schedules import magi_schedule, magi_time_grid
    from models.magi1 import Magi1Config, init_params
    from models.magi1_denoiser import Magi1Denoiser, nearly_clean_step, null_captions

    cfg = Magi1Config(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2,
                      kv_channels=16, in_channels=4, out_channels=4, caption_channels=16, caption_max_length=8)
    z = MAGI_SIZES
    steps = z["window"] * z["steps_per_stage"]
    grid = magi_time_grid(steps)
    den = Magi1Denoiser(cfg, chunk_frames=z["chunk_frames"], latent_h=z["latent"], latent_w=z["latent"],
                        n_chunks=z["n_chunks"], num_steps=steps, steps_per_stage=z["steps_per_stage"],
                        nearly_clean_k=nearly_clean_step(grid))
    params = init_params(cfg, jax.random.PRNGKey(0))
    y, m = null_captions(params, z["n_chunks"])
    cond = {k: jnp.asarray(a) for k, a in dict(y=y, mask=m, null_y=y, null_mask=m).items()}
    return cfg, params, den, cond, magi_schedule(z["n_chunks"], z["window"], steps, grid)


def magi_sampler(den, layout):
    """The sampler of the tiny run: the denoiser with the model's sharding hook (``constrain``) on the mesh."""
    import dataclasses

    from flowcache_jax.policies import FlowCache
    from flowcache_jax.sampler import Sampler

    return Sampler(dataclasses.replace(den, constrain=layout), FlowCache(**MAGI_POLICY), MAGI_SIZES["window"], 1,
                   reuse="residual", layout=layout)


def run_magi(mesh: tuple[int, int, int] | None, on_stage=None):
    """(sampler, result, layout) of the tiny MAGI-1 run on a (data, fsdp, seq) mesh over every device (None: one)."""
    import jax

    from flowcache_jax import sharding

    _, params, den, cond, table = magi_model()
    layout = None if mesh is None else sharding.Layout(sharding.make_mesh(sharding.MeshConfig(*mesh)))
    sampler = magi_sampler(den, layout)
    res = sampler.run(sharding.shard_params(params, layout, "magi1"), cond, table, jax.random.PRNGKey(1),
                      progress=False, on_stage=on_stage)
    return sampler, res, layout


def local_share(sharding, shape: tuple[int, ...], axis: int) -> float:
    """The fraction of ``axis`` that this process's devices hold of an array of ``shape`` placed with ``sharding``."""
    held: set[int] = set()
    for index in sharding.addressable_devices_indices_map(shape).values():
        held.update(range(*index[axis].indices(shape[axis])))
    return len(held) / shape[axis]


def device_copies(a) -> np.ndarray:
    """This process's devices' copies of a replicated array, stacked [devices, ...]."""
    return np.stack([np.asarray(s.data) for s in sorted(a.addressable_shards, key=lambda s: s.device.id)])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--coordinator", required=True)
    ap.add_argument("--num_processes", type=int, required=True)
    ap.add_argument("--process_id", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--meshes", action="append", required=True, help="data,fsdp,seq (repeatable)")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # cross-process collectives on the CPU
    jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                               process_id=args.process_id, initialization_timeout=60)
    out: dict[str, np.ndarray] = {"process_count": np.int64(jax.process_count()),
                                  "device_count": np.int64(jax.device_count()),
                                  "local_device_count": np.int64(jax.local_device_count())}
    for spec in args.meshes:
        mesh = tuple(int(x) for x in spec.split(","))
        name = "x".join(map(str, mesh))
        accs: list[np.ndarray] = []
        sampler, res, _ = run_magi(mesh, on_stage=lambda s, st, accs=accs: accs.append(device_copies(st.acc)))
        exe = next(iter(sampler._compiled.values()))
        (params, _, state, *_), _ = exe.input_shardings
        kv_shape = sampler.denoiser.init_kv(1, sampler.window)["buf"].k.shape
        q_shape = magi_model()[1]["layers"]["q"]["kernel"].shape
        out.update({f"{name}_decisions": res.decisions, f"{name}_video": res.video,
                    f"{name}_computed": np.int64(res.computed), f"{name}_acc_copies": np.stack(accs),
                    f"{name}_wall": np.asarray([res.wall["compile"], res.wall["denoise"]]),
                    f"{name}_kv_rows_here": np.float64(local_share(state.kv["buf"].k, kv_shape, 1)),
                    f"{name}_q_embed_here": np.float64(local_share(params["layers"]["q"]["kernel"], q_shape, 1))})
    Path(args.out).mkdir(parents=True, exist_ok=True)
    np.savez(Path(args.out) / f"process{args.process_id}.npz", **out)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
