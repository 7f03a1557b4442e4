#!/usr/bin/env bash
# The Python packages vitpipe pretrain needs that the lent GPU machines' image lacks (it has torch, torchvision,
# timm, numpy, Pillow, PyYAML, fsspec, tqdm, but not DeepSpeed or pydantic), as wheels for CPython 3.12 x86-64
# in .whl/ (ignored by git), pinned to the versions installed here. Run where PyPI is reachable, from the
# repo root, then carry .whl to the GPU run (bench/gpu_pretrain.sh installs them). About 5 MB:
#   PYTHON=.venv/bin/python bash bench/gpu_wheels.sh
# DALI (nvidia-dali-cuda130, ~200 MB) is too large to carry there; bench_gpu_pretrain.py times it where installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
version() { "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }
mkdir -p .whl
pins=""
for name in pydantic pydantic_core annotated-types typing-inspection typing_extensions hjson; do
  pins="$pins $name==$(version $name)"
done
# shellcheck disable=SC2086
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl $pins
# DeepSpeed publishes a source distribution only; its ops are built just in time, so the wheel is pure Python
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl "deepspeed==$(version deepspeed)"
ls -l .whl
