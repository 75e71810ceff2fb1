r"""Peak host memory of a conversion: a synthetic umT5-XXL (HF layout, fp32) converted to bf16, measured.

  python experiments/convert_memory.py --work_dir=/tmp/convmem [--layers=24] [--keep]

Writes a safetensors file with the real umT5-XXL tensor names and shapes (22.7 GB in fp32 at 24 layers; the
values are random normals) without ever holding it in memory, then runs
``python -m converters.convert --model=umt5 --format=hf --dtype=bf16`` on it as a child process, sampling its
resident memory every 50 ms. Prints the file size, the size of the bf16 tree it converts to, the child's peak
anonymous RSS (the memory it really holds) and its peak RSS (``ru_maxrss``: all resident pages, including pages
of the memory-mapped source that the kernel may drop at any time), as a table and ``D/convert_memory.json``.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from absl import app, flags  # noqa: E402

_WORK = flags.DEFINE_string("work_dir", None, "Scratch folder (needs ~35 GB free at 24 layers).")
_LAYERS = flags.DEFINE_integer("layers", 24, "Encoder layers of the synthetic file (24 = full umT5-XXL).")
_KEEP = flags.DEFINE_bool("keep", False, "Keep the synthetic file and the converted output.")


def umt5_tensors(cfg) -> dict[str, tuple[int, ...]]:
    """HF ``UMT5EncoderModel`` names and shapes (one embedding copy, as the 22.7 GB figure counts)."""
    d, inner, f, h = cfg.d_model, cfg.num_heads * cfg.d_kv, cfg.d_ff, cfg.num_heads
    out = {"shared.weight": (cfg.vocab_size, d), "encoder.final_layer_norm.weight": (d,)}
    for i in range(cfg.num_layers):
        b = f"encoder.block.{i}.layer."
        out.update({b + "0.layer_norm.weight": (d,), b + "1.layer_norm.weight": (d,),
                    b + "0.SelfAttention.relative_attention_bias.weight": (cfg.num_buckets, h),
                    **{f"{b}0.SelfAttention.{x}.weight": ((inner, d) if x != "o" else (d, inner)) for x in "qkv"},
                    f"{b}0.SelfAttention.o.weight": (d, inner),
                    b + "1.DenseReluDense.wi_0.weight": (f, d), b + "1.DenseReluDense.wi_1.weight": (f, d),
                    b + "1.DenseReluDense.wo.weight": (d, f)})
    return out


def write_safetensors_streamed(path: Path, tensors: dict[str, tuple[int, ...]], block: int = 1 << 24) -> int:
    """A valid fp32 safetensors file written block by block (the library's writer needs every tensor in memory)."""
    import numpy as np

    header, offset = {}, 0
    for name, shape in tensors.items():
        n = int(np.prod(shape)) * 4
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * ((-len(raw)) % 8)
    rng = np.random.default_rng(0)  # random values: the output's size is then not flattered by compression
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        left = offset
        while left:
            n = min(left, block * 4)
            f.write(rng.standard_normal(n // 4, dtype=np.float32).tobytes())
            left -= n
    return 8 + len(raw) + offset


def rss_fields(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            k, _, v = line.partition(":")
            if k in ("VmRSS", "RssAnon", "RssFile"):
                out[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return out


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv: list[str]) -> None:
    del argv
    import dataclasses
    import shutil

    import numpy as np

    from experiments.common import fail, format_table
    from models.t5 import UMT5_XXL, T5Config

    if not _WORK.value:
        fail("--work_dir is required (a scratch folder with room for the synthetic file and its conversion)")
    if not 1 <= _LAYERS.value <= 24:
        fail(f"--layers must be in [1, 24], got {_LAYERS.value}")
    work = Path(_WORK.value)
    work.mkdir(parents=True, exist_ok=True)
    cfg = dataclasses.replace(T5Config.from_hf(UMT5_XXL), num_layers=_LAYERS.value)
    src, dst = work / "umt5_xxl_synthetic.safetensors", work / "umt5_xxl_bf16"
    config = dict(UMT5_XXL, num_layers=_LAYERS.value)
    (work / "config.json").write_text(json.dumps(config))
    t0 = time.perf_counter()
    size = write_safetensors_streamed(src, umt5_tensors(cfg))
    t_write = time.perf_counter() - t0
    if dst.exists():
        shutil.rmtree(dst)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "converters.convert", "--model=umt5", "--format=hf", f"--src={src}",
           f"--dst={dst}", f"--model_config={work / 'config.json'}", "--dtype=bf16"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parents[1], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    peak = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}

    def sample():
        while proc.poll() is None:
            for k, v in rss_fields(proc.pid).items():
                peak[k] = max(peak[k], v)
            time.sleep(0.05)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, err = proc.communicate()
    th.join()
    t_conv = time.perf_counter() - t0
    if proc.returncode != 0:
        fail(f"the conversion failed: {err.strip().splitlines()[-1] if err.strip() else proc.returncode}")
    maxrss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    out_bytes = du(dst / "params")
    # the converted tree: bf16 matrices, float32 norms (converters.components' bf16 rule)
    tree_bytes = sum(int(np.prod(s)) * (4 if len(s) == 1 else 2) for s in umt5_tensors(cfg).values())
    gb = 1e9
    row = {"layers": _LAYERS.value, "source_GB": size / gb, "bf16_tree_GB": tree_bytes / gb,
           "on_disk_GB": out_bytes / gb, "peak_anon_GB": peak["RssAnon"] / gb, "peak_rss_GB": maxrss / gb,
           "peak_file_GB": peak["RssFile"] / gb, "anon_over_tree": peak["RssAnon"] / tree_bytes,
           "write_s": t_write, "convert_s": t_conv}
    print(format_table([row], list(row)))
    print("peak_anon: what the converter holds itself (tensors in flight, orbax's write buffers, the runtime); "
          "peak_rss adds pages of the memory-mapped source, which the kernel reclaims under pressure; on_disk is "
          "orbax's compressed output")
    (work / "convert_memory.json").write_text(json.dumps(row, indent=1) + "\n")
    if not _KEEP.value:
        src.unlink()
        shutil.rmtree(dst)


if __name__ == "__main__":
    app.run(main)
