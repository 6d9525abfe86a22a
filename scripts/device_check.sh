#!/usr/bin/env bash
# GPU device check: in-graph fetch GB/s, copy/compute overlap, decode tok/s per path (docs/runtime.md).
#   bash scripts/device_check.sh [OUT.json] [extra device-check args]
# Run from anywhere on a machine with an NVIDIA GPU; ~5 minutes on an H100/H200.
# If the Python there already has a CUDA jax (an image with jax + jax-cuda1x-plugin), nothing is
# installed and the repo runs from its checkout (PYTHONPATH): that machine needs no network.
# Otherwise jax[$JAX_CUDA] (default cuda12; cuda13 needs a driver >= 580) is installed with the
# package, at the jax version already installed when there is one.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-device_check.json}"
shift || true
py="${PYTHON:-python3}"
if ! "$py" -c 'import jax, sys; sys.exit(jax.default_backend() != "gpu")' 2>/dev/null; then
  pin="$("$py" -c 'import jax; print("==" + jax.__version__)' 2>/dev/null || true)"
  "$py" -m pip install -q -e . "jax[${JAX_CUDA:-cuda12}]${pin}"
fi
XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" \
  "$py" -m emoe_jax.bench device-check --out "$out" "$@"
echo "wrote $out"
