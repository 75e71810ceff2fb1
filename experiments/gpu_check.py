r"""One prepared GPU check: model forward speed and MFU, JAX against PyTorch, FlowCache's wall speedup; one table.

On the device (one H100 / H200, random full-size weights, under 8 minutes with compiles; the wheels in .whl/ are
the packages it lacks, listed with their download lines in experiments/gpu_wheels.txt; carry .whl):

  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl && export PYTHONPATH=/tmp/site || exit; python experiments/gpu_check.py --output_json=$OUT/gpu_check.json

(one line without the backslash; experiments/gpu_wheels.txt has it so)

Here (CPU, a minute): python experiments/gpu_check.py --size=small [--output_json=F]

Rows (each fails alone: its one-line error goes in the table and the others still run; a row not started within
``--time_budget_s`` is skipped so the whole check ends in time):

- ``magi1_forward``: one 720p MAGI-1 4.5B-distill chunk forward (12150 tokens) over a 5-chunk KV buffer, bf16;
- ``skyreels_forward``: one SkyReels-V2 DF-1.3B 540p window (97 frames = 25 latent frames), block-causal by 5;
- ``skyreels_forward_pytorch``: the same forward in diffusers' SkyReelsV2Transformer3DModel (bf16, SDPA, its
  block-causal mask), timed alternately with ours on the same weights (the torch weights through our converter);
- ``flowcache_vs_vanilla``: the shared sampler on MAGI-1 for a few stages (2 chunks, the 12-step grid, window 4),
  threshold 0 (every chunk computed) against a threshold that reuses about half, one compiled stage function;
  wall speedup beside the FLOP-ideal one (vanilla FLOPs / FLOPs of the chunks computed, ``models/magi1_flops.py``);
- ``skyreels_full_forward`` / ``_pytorch``: the pair again with full attention (SDPA's flash kernel applies);
- ``peak_device_memory``: the process's device peak (``memory_stats``), or XLA's largest program estimate on CPU.

Weights are random and made on the device inside a jitted init (no host copies). Times are medians of
``--repeats`` calls after one warm-up, compiles apart. TFLOP/s and MFU use the analytic counts
(``models/magi1_flops.py``, ``models/skyreels_flops.py``: the work the model needs, masked-out keys not counted);
``xla_tflop`` (``--xla_flops``, default on at --size=small only) is XLA's cost analysis, the layer loop
extrapolated from a 1-layer program; attention custom calls and tile loops are counted once or not at all, so it
is a cross-check only. MFU is against the chip's dense bf16 peak (H100 SXM / H200: 989.4 TFLOP/s).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from absl import flags  # noqa: E402

from experiments import common  # noqa: E402

ROWS = ("magi1_forward", "skyreels_forward", "skyreels_forward_pytorch", "flowcache_vs_vanilla",
        "skyreels_full_forward", "skyreels_full_forward_pytorch")  # most wanted first: the budget cuts the tail
ATTENTION = ("fused", "xla", "cudnn", "tiled")  # models.attention.IMPLEMENTATIONS (not imported before absl flags)

_SIZE = flags.DEFINE_enum("size", "full", ["full", "small"], "full: the released shapes; small: a CPU-sized run.")
_ATTN = flags.DEFINE_enum("attention", "fused", list(ATTENTION), "Attention implementation passed to the models "
                          "(their configs' attention_impl; fused = jax.nn.dot_product_attention, cuDNN on a GPU).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls (or sampler runs) per measurement, after one warm-up.")
_BUDGET = flags.DEFINE_float("time_budget_s", 390.0, "Rows not started this many seconds after the start are "
                             "skipped (the device check must end within 8 minutes).")
_ROWS = flags.DEFINE_list("rows", list(ROWS), "Which rows to run.")
_XLA = flags.DEFINE_bool("xla_flops", None, "Also compile 1-layer programs for XLA's FLOP count (a cross-check of "
                         "the analytic one; default: on at --size=small, off at full size, where it costs a compile "
                         "per model and misses cuDNN attention)." )
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the random weights and inputs.")
_OUT = flags.DEFINE_string("output_json", None, "Where to write the figures (atomically).")

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity), by a substring of ``device_kind``, most specific first.
PEAK_TFLOPS = ((("h200",), 989.4), (("h100", "pcie"), 756.0), (("h100",), 989.4), (("a100",), 312.0))
MFU_GOAL, TORCH_GOAL, FLOWCACHE_GOAL = 0.40, 1.3, 0.9


@dataclasses.dataclass(frozen=True)
class Sizes:
    """The shapes of one check: the released ones, or a CPU-sized copy with the same structure."""

    magi: dict  # upstream model_config
    magi_latent: tuple[int, int, int]  # latent frames per chunk, height, width
    buffer_chunks: int  # KV buffer in chunks; the timed chunk is its newest and sees all the others
    key_tile: int
    sky: dict  # WanModel kwargs
    sky_latent: tuple[int, int, int]  # latent frames, height, width
    sky_block: int  # causal block (latent frames)
    text_tokens: int
    fc_chunks: int
    fc_steps: int
    fc_window: int
    fc_warmup: int


def sizes(name: str) -> Sizes:
    from models.magi1 import MAGI1_4P5B_DISTILL
    from models.skyreels_v2 import SKYREELS_DF_1P3B

    if name == "full":
        return Sizes(MAGI1_4P5B_DISTILL, (6, 90, 90), 5, 2048, SKYREELS_DF_1P3B, (25, 68, 120), 5, 512, 2, 12, 4, 2)
    magi = dict(MAGI1_4P5B_DISTILL, num_layers=2, hidden_size=256, ffn_hidden_size=512, num_attention_heads=4,
                num_query_groups=2, kv_channels=64, caption_channels=128, caption_max_length=32)
    sky = dict(SKYREELS_DF_1P3B, dim=256, ffn_dim=512, num_heads=2, num_layers=2, text_dim=128)
    return Sizes(magi, (2, 16, 16), 3, 128, sky, (10, 16, 16), 5, 32, 2, 12, 4, 2)


# ----- measuring -------------------------------------------------------------------------------------
def peak_tflops(device: Any) -> float | None:
    """The chip's dense bf16 peak, or None (CPU, or a GPU kind not in the table)."""
    if device.platform == "cpu":
        return None
    kind = device.device_kind.lower()
    return next((v for keys, v in PEAK_TFLOPS if all(k in kind for k in keys)), None)


def xla_flops(compiled: Any) -> float:
    from flowcache_jax.flops import _flops

    return _flops(compiled.cost_analysis())


def layer_extrapolated(full: float, one_layer: float, layers: int) -> tuple[float, str]:
    """XLA's FLOPs of a program whose layers are one scanned loop, from its own count and a 1-layer program's.

    XLA counts a loop body once whatever its trip count (and inlines a loop of 1): then the program costs about
    ``layers`` x the 1-layer program (embedding and head counted per layer, a small overcount). A count that
    already grows with the depth is taken as it is."""
    if layers > 1 and full > 1.5 * one_layer:
        return full, "xla cost analysis of the program (loop trip counts included)"
    return layers * one_layer, f"{layers} x xla cost analysis of the 1-layer program (loop body counted once)"


def program_gb(compiled: Any) -> float | None:
    """XLA's memory estimate of a compiled program: temporaries + arguments + outputs - aliased."""
    mem = compiled.memory_analysis()
    if mem is None:
        return None
    b = mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
    return b / 1e9


def device_peak_gb() -> float | None:
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return stats["peak_bytes_in_use"] / 1e9 if "peak_bytes_in_use" in stats else None


def timed(call: Any, repeats: int, sync: Any = None) -> list[float]:
    """Seconds of ``repeats`` calls after a warm-up; ``sync(out)`` waits for the result."""
    import jax

    sync = sync or jax.block_until_ready
    sync(call())
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sync(call())
        out.append(time.perf_counter() - t0)
    return out


def rng_key(seed: int) -> Any:
    """A key of XLA's RngBitGenerator: random weights compile and run faster than with threefry (any stream does)."""
    import jax

    return jax.random.key(seed, impl="rbg")


def release_torch_cache() -> None:
    """After a failed row, give PyTorch's cached device memory back (JAX's rows need it)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200] if text else ''}"


def finite(x: Any) -> bool:
    import jax.numpy as jnp

    return bool(jnp.isfinite(jnp.asarray(x, jnp.float32)).all())


@dataclasses.dataclass
class Check:
    """What the rows share: sizes, flags, and the weights and compiled programs one row leaves for the next."""

    sizes: Sizes
    attention: str
    repeats: int
    seed: int
    small: bool
    xla_flops: bool = True  # compile 1-layer programs for XLA's count
    deadline: float = float("inf")  # perf_counter time after which repeated measurements stop early
    store: dict = dataclasses.field(default_factory=dict)

    def tag(self, text: str) -> str:
        return f"[small] {text}" if self.small else text


# ----- MAGI-1 --------------------------------------------------------------------------------------------
def magi_config(ck: Check):
    from models.magi1 import Magi1Config

    return dataclasses.replace(Magi1Config.from_upstream(ck.sizes.magi, "bfloat16"), attention_impl=ck.attention)


def magi_params(ck: Check) -> dict:
    """Random bf16 MAGI-1 weights made on the device (shared by the forward and the FlowCache rows)."""
    import jax

    from models.layers import cast_params
    from models.magi1 import init_params

    if "magi_params" not in ck.store:
        cfg = magi_config(ck)
        ck.store["magi_params"] = jax.block_until_ready(
            jax.jit(lambda k: cast_params(init_params(cfg, k), "bfloat16"))(rng_key(ck.seed)))
    return ck.store["magi_params"]


def magi_forward(ck: Check) -> dict:
    """One chunk forward over the KV buffer, the buffer carried (and donated) from call to call as the sampler does."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from models.magi1 import forward_call, param_shapes
    from models.magi1_flops import pass_flops

    cfg, sz = magi_config(ck), ck.sizes
    f, h, w = sz.magi_latent
    ctn = (f // cfg.t_patch_size) * (h // cfg.patch_size) * (w // cfg.patch_size)
    nb, chunk = sz.buffer_chunks, sz.buffer_chunks - 1
    rows, g, hd = nb * ctn, cfg.num_query_groups, cfg.kv_channels

    def fwd(c, p, x, t, y, m, bk, bv, mask):
        kv_range = jnp.asarray([[chunk * ctn, (chunk + 1) * ctn]], jnp.int32)
        vel, (nk, nv), _ = forward_call(c, p, x, t, y, m, kv_range, (bk, bv), chunk, 64, 1, 1.0, sz.key_tile,
                                        buffer_mask=mask, write_start=jnp.int32(chunk * ctn))
        return vel, nk, nv

    params = magi_params(ck)

    @jax.jit
    def inputs(key):  # latent, caption, and a filled K/V buffer, made on the device in one program
        k = jax.random.split(key, 4)
        return (jax.random.normal(k[0], (cfg.in_channels, f, h, w), jnp.float32),
                jax.random.normal(k[1], (1, cfg.caption_max_length, cfg.caption_channels), jnp.float32),
                *(jax.random.normal(kk, (cfg.num_layers, rows, g, hd), jnp.bfloat16) for kk in k[2:]))

    x, y, *state = inputs(rng_key(ck.seed + 1))
    t = np.full((1,), 0.5, np.float32)
    m = np.ones((1, cfg.caption_max_length), np.float32)
    mask = np.arange(rows) < chunk * ctn  # the earlier chunks' rows; the chunk's own slot is rewritten
    donate = () if jax.default_backend() == "cpu" else (5, 6)
    t0 = time.perf_counter()
    compiled = jax.jit(functools.partial(fwd, cfg), donate_argnums=donate).lower(
        params, x, t, y, m, state[0], state[1], mask).compile()
    compile_s = time.perf_counter() - t0

    def call():
        vel, state[0], state[1] = compiled(params, x, t, y, m, state[0], state[1], mask)
        return vel

    times = timed(call, ck.repeats)
    ok = finite(call())
    xla, xla_method = None, None
    if ck.xla_flops:
        c1 = dataclasses.replace(cfg, num_layers=1)
        p1 = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(s, a.dtype), params, param_shapes(c1))
        b1 = jax.ShapeDtypeStruct((1, rows, g, hd), jnp.bfloat16)
        one = xla_flops(jax.jit(functools.partial(fwd, c1)).lower(p1, x, t, y, m, b1, b1, mask).compile())
        xla, xla_method = layer_extrapolated(xla_flops(compiled), one, cfg.num_layers)
        xla /= 1e12
    fl = pass_flops(cfg, ctn, nb * ctn, cfg.caption_max_length)["total"]
    state.clear()  # the buffers go; the weights stay for the FlowCache row
    return {"seconds": statistics.median(times), "times": times, "tflop": fl / 1e12, "xla_tflop": xla,
            "xla_method": xla_method, "flops_source": "analytic (models/magi1_flops.py)", "compile_s": compile_s,
            "xla_gb": program_gb(compiled),
            "finite": ok, "what": ck.tag(f"MAGI-1 4.5B-distill chunk forward, {ctn} tokens over a {nb}-chunk KV "
                                         f"buffer ({nb * ctn} keys), bf16")}


def flowcache_vs_vanilla(ck: Check) -> dict:
    """The shared sampler on random MAGI-1 weights: threshold 0 against a middling threshold, one compiled function."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from experiments.configs.magi_fast import get_config
    from experiments.magi_run import load_captions, make_denoiser, run_flops
    from flowcache_jax.policies import make_policy
    from flowcache_jax.sampler import Sampler
    from flowcache_jax.schedules import magi_schedule

    sz, mcfg = ck.sizes, magi_config(ck)
    f, h, w = sz.magi_latent
    cfg = get_config()
    cfg.video.update(num_chunks=sz.fc_chunks, latent_height=h, latent_width=w, chunk_width=f)
    cfg.sampler.update(num_steps=sz.fc_steps, window=sz.fc_window, key_tile=sz.key_tile)
    cfg.policy.update(threshold=0.0, warmup=sz.fc_warmup)
    if "compute" in cfg:
        cfg.compute.attention = ck.attention
    params = magi_params(ck)
    den, grid = make_denoiser(cfg, mcfg, sz.fc_chunks)
    cond, _ = load_captions("", mcfg, sz.fc_chunks, params)
    cond = jax.tree.map(jnp.asarray, cond)
    if hasattr(den, "prepare_cond"):  # per-prompt work done once, as magi_run's builder does
        cond = den.prepare_cond(params, cond)
    table = magi_schedule(sz.fc_chunks, sz.fc_window, sz.fc_steps, grid)
    sampler = Sampler(den, make_policy(cfg.policy), table.window, 1, cfg.policy.reuse, cfg.policy.metric_dtype)
    run = common.Run(cfg=cfg, denoiser=den, params=params, cond=cond, table=table, sampler=sampler)
    vanilla, _ = run.sample(progress=False, decode=False)  # compiles, then the first (warm-up) run
    # A threshold that reuses about every other eligible step: 1.5 x the median rel-L1 step of the features
    k = table.k.reshape(-1, table.window)[table.step_valid.reshape(-1)]
    rel = vanilla.rel[np.isfinite(vanilla.rel) & (vanilla.rel > 0) & (k >= sz.fc_warmup)]
    if not rel.size:
        raise RuntimeError("no finite feature change to set a threshold from (random weights diverged?)")
    thr = 1.5 * float(np.median(rel))

    def cached(threshold):
        r = run.with_knobs(common.with_policy(cfg, "flowcache", threshold))
        return r, r.sample(progress=False, decode=False)[0]

    fc, res = cached(thr)
    if not 0.3 <= res.computed_fraction <= 0.8:  # one correction toward a middling reuse
        thr *= 2.0 if res.computed_fraction > 0.8 else 0.5
        fc, res = cached(thr)
    times = {"vanilla": [], "flowcache": []}
    for i in range(ck.repeats):  # alternate, as benchmark.py does
        if i and time.perf_counter() > ck.deadline:
            break
        times["vanilla"].append(run.sample(progress=False, decode=False)[0].wall["denoise"])
        times["flowcache"].append(fc.sample(progress=False, decode=False)[0].wall["denoise"])
    med = {n: statistics.median(v) for n, v in times.items()}
    fl = run_flops(fc, res)
    ideal = fl["vanilla_pflops"] / fl["total_pflops"]
    wall = med["vanilla"] / med["flowcache"]
    return {"seconds": med["flowcache"], "vanilla_s": med["vanilla"], "times": times,
            "tflop": fl["total_pflops"] * 1e3, "vanilla_tflop": fl["vanilla_pflops"] * 1e3,
            "flops_source": "analytic (models/magi1_flops.py)", "compile_s": vanilla.wall["compile"],
            "speedup_wall": wall, "speedup_ideal": ideal, "speedup_forwards": res.speedup_ideal,
            "ratio": wall / ideal, "threshold": thr, "warmup": sz.fc_warmup,
            "computed_fraction": res.computed_fraction, "stages": table.num_stages, "finite": finite(res.video),
            "what": ck.tag(f"FlowCache vs vanilla on MAGI-1 4.5B: {sz.fc_chunks} chunks of {f}x{h}x{w}, "
                           f"{sz.fc_steps} steps, window {sz.fc_window} ({table.num_stages} stages), threshold "
                           f"{thr:.3g}, {res.computed_fraction:.0%} of chunk forwards computed")}


# ----- SkyReels-V2 ---------------------------------------------------------------------------------------
class SkyBench:
    """The SkyReels-V2 window forward: random device weights, fixed inputs, one compiled program per attention mode
    and parameter layout (the PyTorch rows reuse it on the torch model's converted weights)."""

    def __init__(self, ck: Check):
        import jax
        import jax.numpy as jnp
        import numpy as np

        from models.layers import cast_params
        from models.skyreels_v2 import SkyReelsConfig, init_params

        self.ck, sz = ck, ck.sizes
        self.cfg = cfg = dataclasses.replace(SkyReelsConfig.from_upstream(sz.sky, "bfloat16"),
                                             attention_impl=ck.attention)
        self.params = jax.block_until_ready(jax.jit(lambda k: cast_params(init_params(cfg, k), "bfloat16"))(
            rng_key(ck.seed)))
        frames, h, w = sz.sky_latent
        rng = np.random.default_rng(ck.seed)
        self.x_np = rng.standard_normal((cfg.in_dim, frames, h, w)).astype(np.float32)
        self.t_np = np.repeat(rng.integers(0, 1000, frames // sz.sky_block), sz.sky_block)  # a time per block
        self.ctx_np = (0.1 * rng.standard_normal((sz.text_tokens, cfg.text_dim))).astype(np.float32)
        self.inputs = (jnp.asarray(self.x_np), jnp.asarray(self.t_np, jnp.int32), jnp.asarray(self.ctx_np))
        self.compiled: dict = {}
        self.compile_s: dict = {}

    def call(self, mode: str, params: dict) -> Any:
        import jax

        from models.skyreels_v2 import forward

        leaves, tree = jax.tree.flatten(params)
        key = (mode, tree, tuple((a.shape, str(a.dtype)) for a in leaves))
        if key not in self.compiled:
            block = self.ck.sizes.sky_block if mode == "block_causal" else 0
            fn = functools.partial(lambda c, p, x, t, ctx: forward(c, p, x, t, ctx, 1, block, self.ck.sizes.key_tile
                                                                   )[0], self.cfg)
            t0 = time.perf_counter()
            self.compiled[key] = jax.jit(fn).lower(params, *self.inputs).compile()
            self.compile_s[mode] = time.perf_counter() - t0
        return self.compiled[key](params, *self.inputs)

    def flops(self, mode: str) -> float:
        from models.skyreels_flops import forward_flops

        c, (frames, h, w) = self.cfg, self.ck.sizes.sky_latent
        tokens = (h // c.patch_size[1]) * (w // c.patch_size[2])
        return forward_flops(c.dim, c.ffn_dim, c.num_layers, self.ck.sizes.text_tokens, tokens, frames,
                             self.ck.sizes.sky_block, mode)["total"]

    def what(self, mode: str, side: str) -> str:
        frames, h, w = self.ck.sizes.sky_latent
        att = f"block-causal by {self.ck.sizes.sky_block}" if mode == "block_causal" else "full attention"
        return self.ck.tag(f"SkyReels-V2 DF-1.3B window forward, {frames}x{h}x{w} latent, {att}, bf16, {side}")


def sky_bench(ck: Check) -> SkyBench:
    if "sky" not in ck.store:
        ck.store["sky"] = SkyBench(ck)
    return ck.store["sky"]


def skyreels_forward(ck: Check, mode: str) -> dict:
    import jax

    b = sky_bench(ck)
    times = timed(lambda: b.call(mode, b.params), ck.repeats)
    compiled = next(v for k, v in b.compiled.items() if k[0] == mode)
    xla, xla_method = None, None
    if mode == "block_causal" and ck.xla_flops:  # a 1-layer program for XLA's count (once: the mask barely matters)
        from models.skyreels_v2 import forward, param_shapes

        c1 = dataclasses.replace(b.cfg, num_layers=1)
        p1 = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(s, a.dtype), b.params, param_shapes(c1))
        one = xla_flops(jax.jit(lambda p, x, t, c: forward(c1, p, x, t, c, 1, ck.sizes.sky_block, ck.sizes.key_tile
                                                           )[0]).lower(p1, *b.inputs).compile())
        xla, xla_method = layer_extrapolated(xla_flops(compiled), one, b.cfg.num_layers)
        xla /= 1e12
    return {"seconds": statistics.median(times), "times": times, "tflop": b.flops(mode) / 1e12, "xla_tflop": xla,
            "xla_method": xla_method, "flops_source": "analytic (models/skyreels_flops.py)",
            "compile_s": b.compile_s[mode], "xla_gb": program_gb(compiled), "finite": finite(b.call(mode, b.params)),
            "what": b.what(mode, "JAX")}


class TorchSide:
    """diffusers' SkyReelsV2Transformer3DModel at the bench's shapes, random bf16 weights on the device, and the
    same weights converted to our layout (converters.keymaps.skyreels_v2, as compare_pytorch.py does)."""

    def __init__(self, b: SkyBench):
        import jax
        import jax.numpy as jnp
        import torch
        from diffusers import SkyReelsV2Transformer3DModel

        from converters.keymaps.skyreels_v2 import convert_skyreels_diffusers

        self.torch, self.b, c = torch, b, b.cfg
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        torch.manual_seed(b.ck.seed)
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)  # made in bf16 on the device: no float32 copy anywhere
        try:
            with self.device:
                dm = SkyReelsV2Transformer3DModel(
                    num_attention_heads=c.num_heads, attention_head_dim=c.head_dim, ffn_dim=c.ffn_dim,
                    num_layers=c.num_layers, in_channels=c.in_dim, out_channels=c.out_dim, text_dim=c.text_dim,
                    freq_dim=c.freq_dim, patch_size=c.patch_size, qk_norm="rms_norm_across_heads",
                    cross_attn_norm=True, eps=c.eps, inject_sample_info=c.inject_sample_info,
                    num_frame_per_block=b.ck.sizes.sky_block)
        finally:
            torch.set_default_dtype(default)
        keep = set(getattr(dm, "_keep_in_fp32_modules", None) or ())
        for name, t in [*dm.named_parameters(), *dm.named_buffers()]:  # what diffusers' bf16 loading keeps fp32
            if keep & set(name.split(".")) and t.is_floating_point():
                t.data = t.data.float()
        self.model = dm.eval()
        with torch.no_grad():  # every parameter random and non-zero (compare_pytorch.py's scheme)
            for name, p in self.model.named_parameters():
                p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name else 0.02 * torch.randn_like(p))
        sd = self.model.state_dict()
        reader = _TensorReader(sd)
        self.params = jax.device_put(convert_skyreels_diffusers(reader, c, jnp.dtype(jnp.bfloat16)))
        self.x = torch.from_numpy(b.x_np)[None].to(self.device, torch.bfloat16)
        self.t = torch.from_numpy(b.t_np)[None].to(self.device, torch.long)
        self.ctx = torch.from_numpy(b.ctx_np)[None].to(self.device, torch.bfloat16)

    def sync(self, out: Any) -> Any:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()
        return out

    def forward(self, mode: str) -> Any:
        self.model.register_to_config(num_frame_per_block=self.b.ck.sizes.sky_block if mode == "block_causal" else 1)
        with self.torch.inference_mode():
            return self.model(hidden_states=self.x, timestep=self.t, encoder_hidden_states=self.ctx,
                              enable_diffusion_forcing=True, fps=[1], return_dict=False)[0]


class _TensorReader:
    """A state dict read tensor by tensor to host float32 (the converter casts each to bf16 as it goes)."""

    def __init__(self, sd: dict):
        self.sd = sd

    def keys(self):
        return self.sd.keys()

    def __getitem__(self, key: str):
        return self.sd[key].detach().float().cpu().numpy()


def skyreels_pytorch(ck: Check, mode: str) -> dict:
    """Ours and diffusers' forward, alternately, on the same weights and inputs."""
    import importlib.util

    import numpy as np

    if importlib.util.find_spec("torch") is None:
        return {"status": "absent: pip install torch diffusers"}
    if importlib.util.find_spec("diffusers") is None:
        return {"status": "absent: pip install diffusers"}
    import diffusers  # present but broken (a missing dependency): the row's error says why
    import torch
    b = sky_bench(ck)
    if "torch" not in ck.store:
        ck.store["torch"] = TorchSide(b)
    ts = ck.store["torch"]
    if ts.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    ref = ts.forward(mode).float().cpu().numpy()[0]
    got = np.asarray(b.call(mode, ts.params), np.float32)
    diff = float(np.abs(got - ref).max() / max(float(np.abs(ref).max()), 1e-30))
    import jax

    sides = {"jax": (lambda: b.call(mode, ts.params), jax.block_until_ready),
             "pytorch": (lambda: ts.forward(mode), ts.sync)}
    times = {k: [] for k in sides}
    for _ in range(ck.repeats):  # alternate the two sides (both warm: each ran above)
        for k, (fn, sync) in sides.items():
            t0 = time.perf_counter()
            sync(fn())
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    peak = torch.cuda.max_memory_allocated() / 1e9 if ts.device.type == "cuda" else None
    release_torch_cache()  # the model stays; its activations' cache goes back for the JAX rows
    return {"seconds": med["pytorch"], "jax_s": med["jax"], "times": times, "tflop": b.flops(mode) / 1e12,
            "flops_source": "analytic (models/skyreels_flops.py)", "ratio": med["pytorch"] / med["jax"],
            "max_rel_diff": diff, "finite": bool(np.isfinite(ref).all()), "torch_peak_gb": peak,
            "torch": torch.__version__, "diffusers": diffusers.__version__,
            "what": b.what(mode, f"PyTorch SDPA (diffusers, {ts.device.type}) vs JAX on the same weights")}


# ----- the table -------------------------------------------------------------------------------------------
RUNNERS = {
    "magi1_forward": magi_forward,
    "flowcache_vs_vanilla": flowcache_vs_vanilla,
    "skyreels_forward": lambda ck: skyreels_forward(ck, "block_causal"),
    "skyreels_forward_pytorch": lambda ck: skyreels_pytorch(ck, "block_causal"),
    "skyreels_full_forward": lambda ck: skyreels_forward(ck, "full"),
    "skyreels_full_forward_pytorch": lambda ck: skyreels_pytorch(ck, "full"),
}


def finish_row(row: dict, peak: float | None, platform: str) -> dict:
    """Rates, MFU and the goal each row measures."""
    if row.get("status", "ok") != "ok":
        return row
    if row.get("seconds") and row.get("tflop") and not row["row"].startswith("flowcache"):
        row["tflop_s"] = row["tflop"] / row["seconds"]
        if peak:
            row["mfu"] = row["tflop_s"] / peak
        else:
            row["mfu_note"] = "n/a (cpu)" if platform == "cpu" else "n/a (unknown chip)"
    name = row["row"]
    if name in ("magi1_forward", "skyreels_forward"):
        row["goal"] = (f"MFU {row['mfu']:.0%} >= {MFU_GOAL:.0%}: {'met' if row['mfu'] >= MFU_GOAL else 'MISSED'}"
                       if "mfu" in row else f"MFU >= {MFU_GOAL:.0%}: {row['mfu_note']}")
        row["goal_met"] = row["mfu"] >= MFU_GOAL if "mfu" in row else None
    elif name.endswith("_pytorch"):
        row["goal_met"] = row["ratio"] >= TORCH_GOAL
        row["goal"] = (f"JAX {row['ratio']:.2f}x PyTorch >= {TORCH_GOAL}x: {'met' if row['goal_met'] else 'MISSED'}")
    elif name == "flowcache_vs_vanilla":
        row["goal_met"] = row["ratio"] >= FLOWCACHE_GOAL
        row["goal"] = (f"wall {row['speedup_wall']:.2f}x = {row['ratio']:.2f} of ideal {row['speedup_ideal']:.2f}x "
                       f">= {FLOWCACHE_GOAL}: {'met' if row['goal_met'] else 'MISSED'}")
    if row.get("finite") is False:
        row["note"] = "non-finite output (random weights)"
    return row


def main(argv: list[str]) -> None:
    del argv
    # JAX and PyTorch share the device: JAX takes memory as it needs it (read when its backend starts, below)
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    t_start = time.perf_counter()
    unknown = sorted(set(_ROWS.value) - set(ROWS))
    if unknown or _REPEATS.value < 1:
        raise common.ConfigError(f"--rows takes {', '.join(ROWS)} (got {', '.join(unknown)}); --repeats >= 1"
                                 if unknown else f"--repeats must be >= 1, got {_REPEATS.value}")
    import jax
    from tqdm.auto import tqdm

    from flowcache_jax import io

    dev = jax.devices()[0]
    peak = peak_tflops(dev)
    small = _SIZE.value == "small"
    ck = Check(sizes(_SIZE.value), _ATTN.value, _REPEATS.value, _SEED.value, small,
               small if _XLA.value is None else _XLA.value, t_start + _BUDGET.value)
    rows = []
    names = [n for n in ROWS if n in _ROWS.value]
    bar = tqdm(names, desc="gpu_check", leave=False)
    for name in bar:
        bar.set_postfix_str(name)
        used = time.perf_counter() - t_start
        if used > _BUDGET.value:
            row = {"status": f"skipped: time budget ({used:.0f} s used of {_BUDGET.value:.0f})"}
        else:
            try:
                row = {"status": "ok", **RUNNERS[name](ck)}
            except Exception as e:  # noqa: BLE001 - a failing row (OOM, unsupported shape) must not stop the others
                row = {"status": f"error: {first_line(e)}"}
                release_torch_cache()
            row["row_s"] = time.perf_counter() - t_start - used
        if name == "flowcache_vs_vanilla":  # the last MAGI-1 row: its weights go
            ck.store.pop("magi_params", None)
        row = finish_row({"row": name, **row}, peak, dev.platform)
        if row["status"] == "ok":  # the device peak so far (one process: later rows include earlier ones)
            torch_row = name.endswith("_pytorch")
            row["peak_gb"] = row.get("torch_peak_gb") if torch_row else device_peak_gb()
            if row["peak_gb"] is not None:
                row["peak_source"] = ("torch.cuda.max_memory_allocated during the row" if torch_row else
                                      "JAX memory_stats peak_bytes_in_use, process so far")
        rows.append(row)
        done = f"{row['seconds']:.4g} s" if row.get("seconds") else row["status"]
        done += f" (row {row['row_s']:.0f} s)" if "row_s" in row else ""
        tqdm.write(f"[{time.perf_counter() - t_start:6.1f} s] {name}: {done}  {row.get('goal', '')}")
    mem = device_peak_gb()
    estimates = [r["xla_gb"] for r in rows if r.get("xla_gb")]
    rows.append({"row": "peak_device_memory", "status": "ok", "peak_gb": mem if mem is not None else
                 (max(estimates) if estimates else None),
                 "what": "device peak_bytes_in_use (memory_stats), the whole process" if mem is not None else
                 "no device memory stats here: XLA's largest program estimate (temp + args + outputs)"})
    report = {"device": str(dev), "device_kind": dev.device_kind, "platform": dev.platform,
              "jax": jax.__version__, "size": _SIZE.value, "attention": _ATTN.value,
              "attention_resolved": _resolved(_ATTN.value), "peak_tflops_bf16": peak, "repeats": _REPEATS.value,
              "rows": rows, "total_s": time.perf_counter() - t_start,
              "goals": {r["row"]: r.get("goal_met") for r in rows if "goal_met" in r}}
    if _OUT.value:
        io.write_json(_OUT.value, report)
    cols = ["row", "status", "seconds", "jax_s", "vanilla_s", "tflop", "tflop_s", "mfu_pct", "xla_tflop", "compile_s",
            "xla_gb", "peak_gb", "goal", "what"]
    cells = []
    for r in rows:
        c = {k: ("" if v is None else v) for k, v in r.items()}
        c["mfu_pct"] = 100 * r["mfu"] if r.get("mfu") is not None else r.get("mfu_note", "")
        cells.append(c)
    print(common.format_table(cells, cols))
    print(f"device {dev.device_kind} ({dev.platform}), JAX {jax.__version__}, bf16 peak "
          f"{peak if peak else 'unknown'} TFLOP/s; attention={_ATTN.value} ({_resolved(_ATTN.value)} for bf16); "
          f"total {report['total_s']:.0f} s")
    if _OUT.value:
        print(f"wrote {_OUT.value}")


def _resolved(attention: str) -> str:
    import jax.numpy as jnp

    from models.attention import resolve

    return resolve(attention, jnp.bfloat16)


if __name__ == "__main__":
    common.run_app(main, default=None)
