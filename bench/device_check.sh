#!/usr/bin/env bash
# One device call: build, pick the fast paths that pass their tests (falling back to the older
# kernels when they do not), run every cuda-marked test with that choice, then the decode benchmark.
# Writes $OUT/env.txt with the chosen FT_CUDA_* settings for the training benchmark call.
set -o pipefail
OUT=${OUT:-./device_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 FALCONTUNE_SHARED_DATA=$PWD/.devdata FT_7B_CKPT=/tmp/ft7b
nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv,noheader | tee "$OUT/card.txt"
t0=$SECONDS
python3 -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
echo "build $((SECONDS - t0)) s"
python3 -c "import sys; sys.path.insert(0, 'bench'); from train_bench import make_7b_checkpoint; make_7b_checkpoint('/tmp/ft7b')"
: > "$OUT/env.txt"
timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/test_cuda_attention.py 2>&1 | tee "$OUT/attn.log" | tail -5
if ! tail -n1 "$OUT/attn.log" | grep -q "passed" || tail -n1 "$OUT/attn.log" | grep -qE "failed|error"; then
  echo "gemm attention failed its tests: falling back to flash"; echo "FT_CUDA_ATTN=flash" >> "$OUT/env.txt"; export FT_CUDA_ATTN=flash
fi
timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/test_cuda_gemv.py 2>&1 | tee "$OUT/gemv.log" | tail -5
if ! tail -n1 "$OUT/gemv.log" | grep -q "passed" || tail -n1 "$OUT/gemv.log" | grep -qE "failed|error"; then
  echo "GEMV failed its tests: falling back"; echo "FT_CUDA_GEMV=0" >> "$OUT/env.txt"; export FT_CUDA_GEMV=0
fi
echo "tests+choice $((SECONDS - t0)) s"
timeout 200 python3 -m pytest -q -p no:cacheprovider -m cuda tests/ --ignore=tests/test_cuda_attention.py --ignore=tests/test_cuda_gemv.py 2>&1 | tee "$OUT/cudatests.log" | tail -8
echo "all cuda tests $((SECONDS - t0)) s"
timeout 150 python3 bench/decode_bench.py --out "$OUT" --ckpt /tmp/ft7b 2>&1 | tee "$OUT/decode.log" | tail -4
echo "done $((SECONDS - t0)) s"
