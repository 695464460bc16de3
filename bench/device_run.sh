#!/usr/bin/env bash
# One device call: build the extension for the local GPU, then run what the arguments name:
#   test   -> pytest tests/test_cuda.py            ($OUT/test.log)
#   memcheck -> compute-sanitizer on tests/cuda_memcheck.py ($OUT/memcheck.log)
#   bench  -> bench/train_bench.py (ours + both peers, 7B, mb 1 4 16)   ($OUT/bench.log, $OUT/train_*.json)
#   bench40b -> bench/train_bench.py --preset falcon-40b (ours + peers that fit, mb 1 4)
#             ($OUT/bench40b.log, $OUT/train40b_*.json)
#   benchours -> bench/train_bench.py --no-hf
#   mmatests -> the GPU tests of the tensor-core flash attention (test_ops.py -k mma, test_cuda_attention.py)
#   benchmma -> benchours with FT_CUDA_ATTN=mma
#   cudatests -> every test marked cuda (needs .devdata/ = a copy of ../shared/data, carried)
#   decode -> bench/decode_bench.py (ours + HF bf16 and HF bnb NF4 generate)   ($OUT/decode.log, $OUT/decode_*.json)
#   profile -> bench/decode_profile.py (per-kernel time of a decode step)   ($OUT/decode_profile.txt)
#   gemvncu -> bench/gemv_ncu.sh (Nsight Compute stall reasons of the decode GEMV; GEMV_ENVS for A/B)
#   gemvtests -> the GPU tests of the decode GEMV's kernels and epilogue (test_cuda_gemv.py, test_ops.py
#             without the mma attention, test_cuda.py -k "decode or greedy or cache"), -n 8 ($OUT/gemvtests.log)
#   decodeab -> bench/decode_bench.py --skip-hf once per setting of DECODE_ENVS (default: the GEMV epilogue
#             off, then FT_CUDA_GEMV_FOLD=0, 1, 2), then decode_profile.py --env over the fold settings;
#             one line per setting in $OUT/decodeab.txt, the JSONs in $OUT/decodeab_json.tar.gz
#   ops    -> the op-level CUDA tests and the data-parallel GPU tests (tests/test_ops.py, tests/test_dist.py)
#   trainprofile -> bench/train_profile.py (CUPTI per-kernel time of a 7B step; PROFILE_MB="1 16",
#             PROFILE_ARGS=--host adds the host's CUDA runtime calls)
#   SMI_LOG=1 (any target) -> $OUT/smi.csv: SM clock, power, temperature, clock-limit reasons each 100 ms
#   ckpt40bbg, bench40bours -> write the 40B checkpoint in the background (CPU), later ours only on it
#   full   -> bench, decode, bench40b in that order, the 40B checkpoint written in the background
#             meanwhile (~6-8 min on an H200 after the build; each stage has its own timeout)
# The peers need bitsandbytes, which the GPU machine lacks: run bench/fetch_peer_wheels.sh here
# first and carry .whl (run(..., carry=[".whl"])); it is installed into /tmp/site below.
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
# SMI_LOG=1: the card's SM clock, power, temperature and clock-limit reasons every 100 ms of the call
# ($OUT/smi.csv), to tell a kernel that got slower from a card that slowed down
if [ "${SMI_LOG:-0}" = 1 ]; then
  q=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_event_reasons.active
  nvidia-smi --query-gpu=$q --format=csv,noheader -i 0 >/dev/null 2>&1 || q=${q%,*},clocks_throttle_reasons.active
  nvidia-smi --query-gpu=$q --format=csv -lms 100 -i 0 > "$OUT/smi.csv" 2>&1 &
  SMI_PID=$!
  trap 'kill $SMI_PID 2>/dev/null' EXIT
fi
if ls .whl/*.whl >/dev/null 2>&1; then
  # the MPI wheels (mpi4py, mpich) go to a prefix of their own: --target drops the mpich wheel's
  # bin/ and lib/ (mpiexec, libmpi), and mpi4py then loads whatever other MPI the machine has
  others=$(ls .whl/*.whl | grep -v -e /mpi4py- -e /mpich-)
  if [ -n "$others" ]; then
    # shellcheck disable=SC2086
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $others \
      && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || { echo "installing .whl failed"; exit 1; }
  fi
  if ls .whl/mpi4py-*.whl .whl/mpich-*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --prefix /tmp/mpi .whl/mpi4py-*.whl \
      .whl/mpich-*.whl || { echo "installing the MPI wheels failed"; exit 1; }
    mpisite=$(dirname "$(find /tmp/mpi -name __init__.py -path "*mpi4py/__init__.py" | head -1)")/..
    export PYTHONPATH=$mpisite${PYTHONPATH:+:$PYTHONPATH} PATH=/tmp/mpi/bin:$PATH
    MPI4PY_LIBMPI=$(find /tmp/mpi -name libmpi.so.12 | head -1); export MPI4PY_LIBMPI
    echo "MPI: $(command -v mpiexec), libmpi $MPI4PY_LIBMPI" | tee "$OUT/mpi.txt"
  fi
  echo "wheels: $(ls .whl | tr '\n' ' ')"
fi
python3 -c "import sys; sys.path.insert(0, 'bench'); import hf_peers; print('peers:', hf_peers.versions())" | tee "$OUT/versions.txt"
# 7B: ours + peers; 40B likewise; decode with peers (each with its own timeout)
bench7b() { timeout ${BENCH_TIMEOUT:-420} python3 bench/train_bench.py --out "$OUT" --ckpt /tmp/ft7b ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" | grep -v "^\s*$" | tail -30; }
bench40b() { timeout ${BENCH40_TIMEOUT:-420} python3 bench/train_bench.py --preset falcon-40b --out "$OUT" --ckpt /tmp/ft40b ${BENCH40_ARGS:-} 2>&1 | tee "$OUT/bench40b.log" | grep -v "^\s*$" | tail -20; }
decode() { timeout ${DECODE_TIMEOUT:-300} python3 bench/decode_bench.py --out "$OUT" --ckpt /tmp/ft7b ${DECODE_ARGS:-} 2>&1 | tee "$OUT/decode.log" | tail -20; }
wait_ckpt40b() { [ -n "${CK40:-}" ] && { wait "$CK40"; tail -2 "$OUT/ckpt40b.log"; }; return 0; }
ckpt40b() { nice -n 10 python3 -c "import sys; sys.path.insert(0, 'bench'); from train_bench import make_bench_checkpoint; make_bench_checkpoint('/tmp/ft40b', 'falcon-40b')"; }
for what in "$@"; do
  case "$what" in
    test) timeout ${TEST_TIMEOUT:-300} python3 -m pytest -x -q tests/test_cuda.py ${PYTEST_ARGS:-} 2>&1 | tee "$OUT/test.log" | tail -40 ;;
    testall) timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q tests/test_cuda.py ${PYTEST_ARGS:-} 2>&1 | tee "$OUT/test.log" | tail -60 ;;
    memcheck) timeout ${MC_TIMEOUT:-240} compute-sanitizer --tool memcheck --error-exitcode 1 python3 tests/cuda_memcheck.py 2>&1 | tee "$OUT/memcheck.log" | tail -25; echo "memcheck rc=$?" ;;
    bench) bench7b ;;
    bench40b) bench40b ;;
    full)
      t0=$SECONDS
      ckpt40b > "$OUT/ckpt40b.log" 2>&1 & ck=$!  # CPU and disk only: overlaps the GPU stages
      BENCH_TIMEOUT=${BENCH_TIMEOUT:-210} bench7b; echo "7B bench done at $((SECONDS - t0)) s"
      DECODE_TIMEOUT=${DECODE_TIMEOUT:-150} decode; echo "decode done at $((SECONDS - t0)) s"
      wait $ck; tail -2 "$OUT/ckpt40b.log"; echo "40B checkpoint ready at $((SECONDS - t0)) s"
      BENCH40_TIMEOUT=${BENCH40_TIMEOUT:-200} bench40b; echo "full done at $((SECONDS - t0)) s" ;;
    cudatests) FALCONTUNE_SHARED_DATA=$PWD/.devdata FT_7B_CKPT=/tmp/ft7b timeout ${TEST_TIMEOUT:-400} python3 -m pytest -q -m cuda -p no:cacheprovider tests/ ${PYTEST_ARGS:-} 2>&1 | tee "$OUT/cudatests.log" | tail -40 ;;
    decode) decode ;;
    ops) timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q -m cuda -p no:cacheprovider tests/test_ops.py tests/test_dist.py ${PYTEST_ARGS:-} 2>&1 | tee "$OUT/ops.log" | tail -30 ;;
    trainprofile) timeout ${PROFILE_TIMEOUT:-200} python3 bench/train_profile.py --mb ${PROFILE_MB:-1 16} --ckpt /tmp/ft7b --out "$OUT" --top 40 ${PROFILE_ARGS:-} 2>&1 | tee "$OUT/train_profile.txt" | grep -E "^==|^ +[0-9]|^idle|gaps|^host" | head -${PROFILE_LINES:-60} ;;
    bench40bours) wait_ckpt40b; BENCH40_ARGS="--no-hf ${BENCH40_ARGS:-}" bench40b ;;
    ckpt40bbg) ckpt40b > "$OUT/ckpt40b.log" 2>&1 & CK40=$! ;;
    profile) timeout ${DECODE_TIMEOUT:-200} python3 bench/decode_profile.py --out "$OUT" --ckpt /tmp/ft7b 2>&1 | grep -vi warn | tail -40 ;;
    gemvncu) bash bench/gemv_ncu.sh ;;
    gemvtests) timeout ${TEST_TIMEOUT:-420} python3 -m pytest -q -m cuda -p no:cacheprovider -n ${PYTEST_WORKERS:-8} \
        tests/test_cuda_gemv.py tests/test_ops.py tests/test_cuda.py -k "not mma and (gemv or qlinear or gelu or add or decode or greedy or cache)" \
        ${PYTEST_ARGS:-} 2>&1 | tee "$OUT/gemvtests.log" | tail -30 ;;
    decodeab)
      rm -rf /tmp/decodeab && mkdir -p /tmp/decodeab
      for e in ${DECODE_ENVS:-FT_CUDA_GEMV_EPILOGUE=0 FT_CUDA_GEMV_FOLD=0 FT_CUDA_GEMV_FOLD=1 FT_CUDA_GEMV_FOLD=2}; do
        d=/tmp/decodeab/$(echo "$e" | tr -c 'A-Za-z0-9\n' _)
        env -u OUT "$e" timeout ${DECODE_TIMEOUT:-200} python3 bench/decode_bench.py --skip-hf --ckpt /tmp/ft7b --out "$d" \
          ${DECODE_ARGS:-} > "$d.log" 2>&1
        echo "$e: rc=$? $(python3 bench/ab_summary.py decode "$d")" | tee -a "$OUT/decodeab.txt"
      done
      timeout ${DECODE_TIMEOUT:-200} python3 bench/decode_profile.py --ckpt /tmp/ft7b --out /tmp/decodeab \
        --env "FT_CUDA_GEMV_FOLD=0;FT_CUDA_GEMV_FOLD=1;FT_CUDA_GEMV_FOLD=2" > /tmp/decodeab/profile.log 2>&1
      grep -i -E "qgemv|gemv|per token|busy" /tmp/decodeab/profile.log | head -40 | tee -a "$OUT/decodeab.txt"
      tar -czf "$OUT/decodeab_json.tar.gz" -C /tmp decodeab ;;
    mmatests) timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q -m cuda -p no:cacheprovider tests/test_ops.py -k "mma" tests/test_cuda_attention.py ${PYTEST_ARGS:-} 2>&1 | tee "$OUT/mmatests.log" | tail -30 ;;
    benchmma) FT_CUDA_ATTN=mma timeout ${BENCH_TIMEOUT:-300} python3 bench/train_bench.py --no-hf --out "$OUT" --ckpt /tmp/ft7b ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench_mma.log" | tail -30 ;;
    benchours) timeout ${BENCH_TIMEOUT:-300} python3 bench/train_bench.py --no-hf --out "$OUT" --ckpt /tmp/ft7b ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" | tail -30 ;;
  esac
done
