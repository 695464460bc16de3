#!/usr/bin/env bash
# Fetch the wheels the GPU machine lacks for the peer benchmarks (run HERE, where PyPI is
# reachable; the GPU machine reaches nothing). Today: bitsandbytes, for the QLoRA peer
# (HF transformers + bitsandbytes NF4 + PEFT) of bench/train_bench.py and bench/decode_bench.py.
#
#   bash bench/fetch_peer_wheels.sh [DEST]        (default DEST: <repo>/.whl)
#
# The GPU machine has Python 3.12, torch 2.11 (cu130), numpy, packaging, transformers 5.x and
# peft; bitsandbytes needs exactly torch, numpy and packaging (its METADATA's Requires-Dist
# without extras), so it is fetched alone (--no-deps). Its wheel carries one native library
# per CUDA/ROCm/XPU runtime (43 MB); bench/slim_wheel.py keeps the CPU and CUDA 13.0/13.2
# ones (~4 MB) so the upload stays small. The default DEST is git-ignored through the
# repository's info/exclude and carried to the device ('carry': [".whl"]), where
# bench/device_run.sh installs it:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
DEST=${1:-$REPO/.whl}
BNB_VERSION=${BNB_VERSION:-0.50.2}
KEEP_LIBS=(cpu cuda130 cuda132)

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_24_x86_64 -d "$tmp" "bitsandbytes==$BNB_VERSION"
src=$(ls "$tmp"/bitsandbytes-*.whl)
echo "requires (METADATA, extras left out):"
unzip -p "$src" '*.dist-info/METADATA' | grep '^Requires-Dist' | grep -v 'extra ==' | sed 's/^/  /'

mkdir -p "$DEST"
rm -f "$DEST"/bitsandbytes-*.whl  # one version only: two stop the install on the device
keep=()
for k in "${KEEP_LIBS[@]}"; do keep+=(--keep-lib "$k"); done
python3 "$REPO/bench/slim_wheel.py" "$src" "$DEST" "${keep[@]}"

if [ "$DEST" = "$REPO/.whl" ]; then
  exclude=$(git -C "$REPO" rev-parse --git-path info/exclude)
  case "$exclude" in /*) ;; *) exclude="$REPO/$exclude" ;; esac
  mkdir -p "$(dirname "$exclude")"
  grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
  echo "ignored through $exclude; carry it: run(..., carry=[\".whl\"])"
fi
