#!/usr/bin/env bash
# The GPU benchmark suite (issue 13): ResNet-101 bf16 MFU of the real update at batch 512, the
# learner's consumption in transitions/s, batched policy inference (benchmarks/gpu_suite.py).
#
#   bash benchmarks/gpu_suite.sh [--tiny] [--out DIR] [--pipeline-json FILE] [...]
#
# Runs from the repo tree with whatever `python3` has JAX (or $PYTHON). The GPU machine lacks
# Haiku, rlax and what they import: when they are not installed, the wheels in
# $SCALED_QL_WHEELS (default build/gpu_wheels, made here by `make gpu-wheels` from
# benchmarks/gpu_wheels.txt and carried to the device, ~8 MB) are unpacked into build/gpu_site,
# which goes first on PYTHONPATH. Unpacked, not zip-imported: dm-tree is a compiled module.
# benchmarks/gpu_rehearsal.sh runs this under Python 3.12 and the newest JAX on CPU first.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
WHEELS="${SCALED_QL_WHEELS:-build/gpu_wheels}"
SITE="$PWD/build/gpu_site"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# Installed, not imported: importing rlax (distrax -> TFP) imports TensorFlow where it is
# installed (17.6 CPU-s in the suite of 2026-12-07 16:00 UTC, a slow VM state), which
# gpu_suite.py itself blocks. (Haiku and rlax installed without a dependency of theirs no
# longer fall back to the wheels: gpu_suite.py then fails at its import.)
installed='import importlib.util as u, sys; sys.exit(not all(map(u.find_spec, ("haiku", "rlax"))))'
if ! "$PYTHON" -c "$installed"; then
  shopt -s nullglob
  wheels=("$WHEELS"/*.whl)
  if [ ${#wheels[@]} -eq 0 ]; then
    echo "gpu_suite.sh: haiku or rlax is not installed and $WHEELS holds no wheels" \
      "(make gpu-wheels, then carry $WHEELS)" >&2
    exit 2
  fi
  rm -rf "$SITE" && mkdir -p "$SITE"
  for w in "${wheels[@]}"; do "$PYTHON" -m zipfile -e "$w" "$SITE"; done
  export PYTHONPATH="$SITE:$PYTHONPATH"
  "$PYTHON" -c 'import haiku, rlax; print("haiku", haiku.__version__, "rlax", rlax.__version__,
        "from", haiku.__file__.rsplit("/haiku/", 1)[0])'
fi
echo "== $(date -u) $(uptime)"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,clocks.max.sm \
  --format=csv,noheader || true
exec "$PYTHON" benchmarks/gpu_suite.py "$@"
