#!/usr/bin/env bash
# Issue 18's GPU numbers in one run (under 8 minutes on one H100/H200), from the repo root:
#   bash bench/gpu_pretrain.sh --quick   # first: 1-2 minutes, every stage tiny, checks that all of it works
#   bash bench/gpu_pretrain.sh           # then the measurement; the table and one JSON line come last
# (a) ViT-B/16 bf16 end to end from shards of ~500 px JPEGs (generated), data.decode cpu vs gpu: images/s,
# MFU; (b) DeepSpeed/plain step ratio; (c) the loaders alone against the step alone. bench/bench_gpu_pretrain.py
# says more; docs/benchmarks.md how to read it. Wheels in .whl/ (bench/gpu_wheels.sh makes them: DeepSpeed and
# pydantic, which the lent machines' image lacks) are installed into /tmp/vitpipe-site first where those are missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null && ! "$PY" -c "import deepspeed, pydantic" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/vitpipe-site .whl/*.whl
  export PYTHONPATH=/tmp/vitpipe-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
exec "$PY" bench/bench_gpu_pretrain.py --out "${OUT:-/tmp/vitpipe-gpu-pretrain/out}" "$@"
