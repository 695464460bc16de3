#!/usr/bin/env bash
# One device call: build the extension for the local GPU, then run what the arguments name:
#   test   -> pytest tests/test_cuda.py            ($OUT/test.log)
#   memcheck -> compute-sanitizer on tests/cuda_memcheck.py ($OUT/memcheck.log)
#   bench  -> bench/train_bench.py (ours + HF)     ($OUT/bench.log, $OUT/train_*.json)
#   benchours -> bench/train_bench.py --no-hf
#   cudatests -> every test marked cuda (needs .devdata/ = a copy of ../shared/data, carried)
#   decode -> bench/decode_bench.py (ours + HF bf16 generate)   ($OUT/decode.log, $OUT/decode_*.json)
#   profile -> bench/decode_profile.py (per-kernel time of a decode step)   ($OUT/decode_profile.txt)
# Logs land in $OUT (the device tool's output folder); default ./device_out.
set -o pipefail
OUT=${OUT:-./device_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv,noheader | tee "$OUT/card.txt"
if [ ! -f .built_ok ] || [ -n "$(find csrc setup.py -newer .built_ok)" ]; then
  python3 -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
  touch .built_ok
fi
echo "build ok"
for what in "$@"; do
  case "$what" in
    test) timeout ${TEST_TIMEOUT:-300} python3 -m pytest -x -q tests/test_cuda.py ${PYTEST_ARGS:-} 2>&1 | tee "$OUT/test.log" | tail -40 ;;
    testall) timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q tests/test_cuda.py ${PYTEST_ARGS:-} 2>&1 | tee "$OUT/test.log" | tail -60 ;;
    memcheck) timeout ${MC_TIMEOUT:-240} compute-sanitizer --tool memcheck --error-exitcode 1 python3 tests/cuda_memcheck.py 2>&1 | tee "$OUT/memcheck.log" | tail -25; echo "memcheck rc=$?" ;;
    bench) timeout ${BENCH_TIMEOUT:-420} python3 bench/train_bench.py --out "$OUT" --ckpt /tmp/ft7b ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" | grep -v "^\s*$" | tail -30 ;;
    cudatests) FALCONTUNE_SHARED_DATA=$PWD/.devdata FT_7B_CKPT=/tmp/ft7b timeout ${TEST_TIMEOUT:-400} python3 -m pytest -q -m cuda -p no:cacheprovider tests/ ${PYTEST_ARGS:-} 2>&1 | tee "$OUT/cudatests.log" | tail -40 ;;
    decode) timeout ${DECODE_TIMEOUT:-300} python3 bench/decode_bench.py --out "$OUT" --ckpt /tmp/ft7b ${DECODE_ARGS:-} 2>&1 | tee "$OUT/decode.log" | tail -20 ;;
    profile) timeout ${DECODE_TIMEOUT:-200} python3 bench/decode_profile.py --out "$OUT" --ckpt /tmp/ft7b 2>&1 | grep -vi warn | tail -40 ;;
    benchours) timeout ${BENCH_TIMEOUT:-300} python3 bench/train_bench.py --no-hf --out "$OUT" --ckpt /tmp/ft7b ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" | tail -30 ;;
  esac
done
