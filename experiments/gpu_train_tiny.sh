#!/usr/bin/env bash
# Issue 15, part 1, prepared for a lent GPU: retrain the embedded default within a short lease, then score its
# continuation (README line 1's seed, and seeds 0-7) against the true one, beside repeating the last frame.
#
#   bash experiments/gpu_train_tiny.sh [OUT_DIR]     (env: MINUTES=6 of training, BATCH=64, CONTEXT_SELF=0,
#                                                    CONTEXT_SELF_KIND=predict|denoise|rollout,
#                                                    MODEL=kv_channels=64,num_attention_heads=2,num_query_groups=1)
#
# On the project's GPU machine (its own JAX, no internet) install the wheels of experiments/gpu_wheels.txt first,
# as for experiments/gpu_check.py (README, "The prepared GPU check"), and pass OUT_DIR=$OUT. It never touches
# experiments/assets: copy OUT_DIR/train/model there by hand if its figures beat the shipped model's.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-outputs}/gpu_train}
minutes=${MINUTES:-6}
python experiments/train_tiny.py --output_dir="$out/train" --batch="${BATCH:-64}" --steps=1000000 \
  --fit_minutes="$minutes" --max_minutes="$((minutes + 1))" --save_every=2000 --context_self="${CONTEXT_SELF:-0}" \
  --context_self_kind="${CONTEXT_SELF_KIND:-predict}" --architecture="${MODEL:-}"
for seeds in 0 0,1,2,3,4,5,6,7; do  # the JSON is written before the figures (a device may lack matplotlib)
  python experiments/continuation.py --config.checkpoint="$out/train/model" --seeds="$seeds" \
    --output_dir="$out/continuation_${seeds//,/}" --noprogress || echo "continuation --seeds=$seeds: see above"
done
python - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
meta = json.loads((out / "train" / "model" / "model_config.json").read_text())["training"]
print(f"trained {meta['steps']} steps (batch {meta['batch']}) in {meta['wall_minutes_this_run']:.1f} min, "
      f"loss {meta['final_loss_mean100']:.4f}")
print(f"{'seeds':<8} {'mean':>6} {'min':>6} {'repeat':>7}   goal: mean >= 25 dB, min >= 22 dB")
for name, seeds in (("0", "0"), ("01234567", "0-7")):
    f = out / f"continuation_{name}" / "continuation.json"
    if f.is_file():
        r = json.loads(f.read_text())
        print(f"{seeds:<8} {r['mean_psnr']:6.2f} {r['min_psnr']:6.2f} {r['baseline_mean_psnr']:7.2f}")
PY
