#!/usr/bin/env bash
# The end-to-end GPU smoke run: real digits -> shards -> `vitpipe pretrain` on one GPU in bf16, then the
# DeepSpeed-vs-plain step benchmark. Run from the repo root on a machine with a GPU:
#   bash bench/gpu_smoke.sh [OUTDIR]
# MLflow tracking is off so that it runs where only torch, torchvision and deepspeed are installed.
set -euo pipefail
OUT=${1:-/tmp/vitpipe-gpu-smoke}
mkdir -p "$OUT"
python3 - "$OUT" <<'PY'
import sys
from pipeline.packaged_data import write_digits
from pipeline.shard import ShardConfig, shard
out = sys.argv[1]
write_digits(f"{out}/digits", size=32)
shard(ShardConfig(src=f"{out}/digits", out=f"{out}/shards", max_samples_per_shard=400))
PY
python3 -m vitpipe.cli pretrain --model.preset "${PRESET:-s/4}" --data.shards "$OUT/shards" --data.image-size 32 \
  --data.batch-size "${BATCH:-256}" --data.num-workers 4 --data.augment.hflip 0 --deepspeed.precision bf16 \
  --train.steps "${STEPS:-120}" --train.eval-every 60 --checkpoint.every-steps 60 --no-tracking.enabled \
  --out "$OUT/run"
[ -n "${SKIP_BENCH:-}" ] || python3 bench/bench_pretrain.py --preset b/16 --batch 128 --zero-stage 0 2 --rounds 3 --steps 8
