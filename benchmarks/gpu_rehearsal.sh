#!/usr/bin/env bash
# Rehearses the GPU suite on CPU as the GPU machine will run it: Python 3.12, the device's JAX
# (REHEARSAL_JAX, 0.11.2 as /work/.library/device/KINDS.md lists it), chex/optax/flax/orbax and
# nothing of our stack (no Haiku, rlax, TensorFlow, Reverb, Ray), with the wheels of
# `make gpu-wheels` unpacked by gpu_suite.sh. A device session has minutes, not hours: run this
# first, after any change to the wheels, the learner or the networks.
#
#   bash benchmarks/gpu_rehearsal.sh            # PYTHON312=/path/to/python3.12 if not found
#   REHEARSAL_JAX=0.12.0.1 bash benchmarks/gpu_rehearsal.sh   # another JAX (reinstalled in place)
#
# Needs the network (pip). Makes build/gpu_rehearsal_venv once (~1 min; again when its JAX is not
# REHEARSAL_JAX), then runs the suite with --tiny and with --rehearsal (the ResNet-101 path at toy
# sizes); ~9 min on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
PY312=""
for candidate in ${PYTHON312:-} python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3.12; do
  if "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
    PY312="$candidate"
    break
  fi
done
if [ -z "$PY312" ]; then
  echo "gpu_rehearsal.sh: no working Python 3.12 found; set PYTHON312" >&2
  exit 2
fi
JAX_VERSION="${REHEARSAL_JAX:-0.11.2}"
VENV=build/gpu_rehearsal_venv
[ -x "$VENV/bin/python" ] || "$PY312" -m venv "$VENV"
if ! "$VENV/bin/python" -c "import jax, sys; sys.exit(jax.__version__ != '$JAX_VERSION')" \
    2>/dev/null; then
  "$VENV/bin/python" -m pip install -q "jax==$JAX_VERSION" "jaxlib==$JAX_VERSION" chex optax flax \
    orbax-checkpoint
fi
[ -d build/gpu_wheels ] || make gpu-wheels
"$VENV/bin/python" -c 'import jax, numpy; print("rehearsal: jax", jax.__version__, "numpy",
      numpy.__version__)'
for size in --tiny --rehearsal; do
  PYTHON="$VENV/bin/python" bash benchmarks/gpu_suite.sh $size --out "build/gpu_rehearsal$size"
done
