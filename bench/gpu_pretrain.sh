#!/usr/bin/env bash
# Issue 5's GPU numbers in one run (a few minutes on one H100/H200), from the repo root:
#   bash bench/gpu_pretrain.sh
# 1. vitpipe's DeepSpeed step vs the plain PyTorch loop, ViT-B/16 bf16, batch 128 (goal <= 1.10x);
# 2. images/s and MFU with torch.compile at batch 256 (goal >= 45% MFU);
# 3. where DeepSpeed's step overhead goes, config variant by variant.
# Each prints a JSON line last; docs/benchmarks.md says how to read them.
set -euo pipefail
python3 bench/bench_pretrain.py --preset b/16 --batch 128 --zero-stage 0 2 --rounds 3 --steps 8
python3 bench/bench_pretrain.py --preset b/16 --batch 256 --zero-stage 0 --rounds 3 --steps 8 --warmup 3 --compile
python3 bench/bench_ds_variants.py
