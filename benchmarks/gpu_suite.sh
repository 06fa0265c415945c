#!/usr/bin/env bash
# The GPU benchmark suite (issue 13): ResNet-101 bf16 MFU of the real update at batch 512, the
# learner's consumption in transitions/s, batched policy inference (benchmarks/gpu_suite.py).
#
#   bash benchmarks/gpu_suite.sh [--tiny] [--out DIR] [--pipeline-json FILE] [...]
#
# Runs from the repo tree with whatever `python3` has JAX (or $PYTHON). Haiku is not installed on
# the GPU machine: pure-Python wheels are put on PYTHONPATH from $SCALED_QL_WHEELS (default
# build/gpu_wheels), made here with
#   .venv/bin/pip download --no-deps dm-haiku==0.0.17 jmp==0.0.4 tabulate==0.10.0 -d build/gpu_wheels
# and carried to the device (about 0.5 MB). dm-haiku 0.0.17 requires jax>=0.11 (0.0.16, pinned
# for our JAX 0.4 venv, does not import there); wheels are used only when `import haiku` fails.
# Since issue 16 the C51 loss calls rlax (imported when the loss is traced), which imports distrax
# and tensorflow-probability (the device has chex and optax, not these): add
#   rlax==0.1.7 distrax==0.1.5 tensorflow-probability==0.23.0 dm-tree (a cp312 manylinux wheel)
# to the download. NOT verified on a GPU (none was lent); whether TFP 0.23's JAX substrate imports
# under JAX 0.11 is unknown.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
WHEELS="${SCALED_QL_WHEELS:-build/gpu_wheels}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PYTHON" -c 'import haiku' 2>/dev/null; then
  shopt -s nullglob
  wheels=("$WHEELS"/*.whl)
  if [ ${#wheels[@]} -eq 0 ]; then
    echo "gpu_suite.sh: haiku is not importable and no wheels in $WHEELS (see the header)" >&2
    exit 2
  fi
  for w in "${wheels[@]}"; do PYTHONPATH="$PYTHONPATH:$PWD/$w"; done
  "$PYTHON" -c 'import haiku; print("haiku", haiku.__version__, "from", haiku.__file__)'
fi
echo "== $(date -u) $(uptime)"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,clocks.max.sm \
  --format=csv,noheader || true
exec "$PYTHON" benchmarks/gpu_suite.py "$@"
