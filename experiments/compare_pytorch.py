r"""Our SkyReels-V2 DiT against diffusers' SkyReelsV2Transformer3DModel: same random weights, outputs and speed.

  python experiments/compare_pytorch.py --model=skyreels_v2 [--num_layers=2 --frames=5 --latent_height=32
      --latent_width=32 --repeats=5] [--attention=fused|tiled] [--output_json=F]

Both run at the real 1.3B width (12 heads x 128, FFN 8960, 512 text tokens), full attention, float32, in one
process; times are medians over ``repeats`` forwards after warm-up. torch and diffusers are optional (not in
requirements.txt): ``pip install torch diffusers``.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from absl import flags  # noqa: E402

from experiments import common  # noqa: E402

_MODEL = flags.DEFINE_enum("model", "skyreels_v2", ["skyreels_v2"], "Which port to compare.")
_LAYERS = flags.DEFINE_integer("num_layers", 2, "Transformer blocks (the real model has 30).")
_FRAMES = flags.DEFINE_integer("frames", 5, "Latent frames.")
_H = flags.DEFINE_integer("latent_height", 32, "Latent height (tokens: /2).")
_W = flags.DEFINE_integer("latent_width", 32, "Latent width (tokens: /2).")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed forwards per side.")
_ATTN = flags.DEFINE_enum("attention", "fused", ["fused", "xla", "cudnn", "tiled"], "Our attention implementation.")
_OUT = flags.DEFINE_string("output_json", None, "Where to write the figures.")


def main(argv: list[str]) -> None:
    del argv
    try:
        import torch
        from diffusers import SkyReelsV2Transformer3DModel
    except ImportError as e:
        raise common.ConfigError(f"compare_pytorch.py needs torch and diffusers (pip install torch diffusers), which "
                                 f"are not in requirements.txt ({e})") from e
    import jax
    import jax.numpy as jnp
    import numpy as np

    from converters.keymaps.skyreels_v2 import convert_skyreels_diffusers
    from flowcache_jax import io
    from models.skyreels_flops import forward_flops
    from models.skyreels_v2 import SKYREELS_DF_1P3B, SkyReelsConfig, forward

    if min(_LAYERS.value, _FRAMES.value, _REPEATS.value) < 1 or _H.value % 2 or _W.value % 2:
        raise common.ConfigError("num_layers, frames and repeats must be >= 1; latent sizes must be even")
    torch.manual_seed(0)
    dm = SkyReelsV2Transformer3DModel(
        num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=_LAYERS.value, in_channels=16,
        out_channels=16, text_dim=4096, freq_dim=256, patch_size=(1, 2, 2), qk_norm="rms_norm_across_heads",
        cross_attn_norm=True, eps=1e-6, inject_sample_info=True, num_frame_per_block=1).eval()
    with torch.no_grad():  # every parameter random and non-zero, as in the fixtures
        for name, p in dm.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name else 0.02 * torch.randn_like(p))
    sd = {k: v.detach().numpy() for k, v in dm.state_dict().items()}
    cfg = SkyReelsConfig.from_upstream(dict(SKYREELS_DF_1P3B, num_layers=_LAYERS.value))
    cfg = dataclasses.replace(cfg, attention_impl=_ATTN.value)
    params = jax.tree.map(jnp.asarray, convert_skyreels_diffusers(sd, cfg))

    f, h, w = _FRAMES.value, _H.value, _W.value
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 16, f, h, w)).astype(np.float32)
    t = rng.integers(0, 1000, (1, f))
    ctx = rng.standard_normal((1, 512, 4096)).astype(np.float32)
    ours = jax.jit(lambda p, x, t, c: forward(cfg, p, x, t, c, 1)[0])
    args = (params, jnp.asarray(x[0]), jnp.asarray(t[0]), jnp.asarray(ctx[0]))
    tx, tt, tc = torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx)

    def torch_fwd():
        with torch.no_grad():
            return dm(hidden_states=tx, timestep=tt, encoder_hidden_states=tc, enable_diffusion_forcing=True,
                      fps=torch.tensor([1]), return_dict=False)[0]

    ref = torch_fwd().numpy()[0]
    got = np.asarray(ours(*args).block_until_ready())
    err = float(np.abs(got - ref).max() / np.abs(ref).max())
    times = {"jax": [], "pytorch": []}
    for _ in range(2):  # warm-up
        ours(*args).block_until_ready()
        torch_fwd()
    for _ in range(_REPEATS.value):  # alternate the two sides
        t0 = time.perf_counter()
        ours(*args).block_until_ready()
        times["jax"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        torch_fwd()
        times["pytorch"].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    fl = forward_flops(cfg.dim, cfg.ffn_dim, cfg.num_layers, 512, (h // 2) * (w // 2), f, 1, "full")["total"]
    report = {"model": _MODEL.value, "device": str(jax.devices()[0]), "num_layers": _LAYERS.value, "frames": f,
              "latent": [h, w], "attention": _ATTN.value, "max_rel_diff": err, "median_s": med,
              "speedup_vs_pytorch": med["pytorch"] / med["jax"],
              "gflops_per_s": {k: fl / v / 1e9 for k, v in med.items()}, "torch_threads": torch.get_num_threads()}
    if _OUT.value:
        io.write_json(_OUT.value, report)
    row = {"max_rel_diff": err, "jax_s": med["jax"], "pytorch_s": med["pytorch"],
           "speedup_vs_pytorch": report["speedup_vs_pytorch"], "jax_GFLOP/s": report["gflops_per_s"]["jax"],
           "pytorch_GFLOP/s": report["gflops_per_s"]["pytorch"]}
    print(common.format_table([row], list(row)))
    if err > 1e-4:
        raise common.ConfigError(f"outputs disagree: max relative difference {err:.2e}")


if __name__ == "__main__":
    common.run_app(main, default=None)
