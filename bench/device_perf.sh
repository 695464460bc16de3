#!/usr/bin/env bash
# One device call (plan: <= 9 minutes on an H200) for the training kernels of issue 11 and the
# kernel choice of issue 14:
#
#   bash bench/device_perf.sh       H200 mode: FALCONTUNE_CUDA_ARCH=90 build; the cuda tests of the
#                                   kernel files; bench/train_bench.py ours-only at mb 1, 4, 16 for
#                                   FT_CUDA_QGEMM = scratch, scratch_t, fused, auto; FT_CUDA_PROFILE=1
#                                   runs at mb 1 and 16 (per-op times and the kernel-choice table);
#                                   a compact table last.
#   bash bench/device_perf.sh t4    The T4 code path: FALCONTUNE_CUDA_ARCH=75 build (sm_75 PTX, which
#                                   the driver JIT-compiles on a newer card: no sm_80 instruction
#                                   exists in it); the same cuda tests in float16 only; train_bench
#                                   --dtype float16 at mb 1 and 4 for auto and scratch.
#
# Writes six files under $OUT (default ./device_out): card.txt, build.log, tests.log, bench.log
# (every benchmark's output, profiles included), results.json (every train_bench result by
# variant) and the summary table (markdown). The 7B checkpoint is generated once into /tmp/ft7b.
# Budget (H200, measured before: load ~1 s, a worker ~10 s): build ~1.5 min, tests <= 3.5 min
# (pytest-xdist, 8 workers; TEST_TIMEOUT), 12 benchmark workers + 2 profiled ones ~3 min.
set -o pipefail
MODE=${1:-h200}
OUT=${OUT:-./device_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
T0=$SECONDS
stamp() { echo "[$((SECONDS - T0)) s] $*" | tee -a "$OUT/bench.log"; }
nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv,noheader | tee "$OUT/card.txt"

KSEL=()
if [ "$MODE" = t4 ]; then ARCH=75; DTYPE=float16; MBS="1 4"; VARIANTS="auto scratch"; KSEL=(-k "float16 and not bfloat16")
else ARCH=90; DTYPE=bfloat16; MBS="1 4 16"; VARIANTS="scratch scratch_t fused auto"; fi

stamp "build FALCONTUNE_CUDA_ARCH=$ARCH"
FALCONTUNE_CUDA=1 FALCONTUNE_CUDA_ARCH=$ARCH python3 setup.py -q build_ext --inplace --force > "$OUT/build.log" 2>&1 \
  || { tail -40 "$OUT/build.log"; exit 1; }
python3 -c "import falcontune as ft; assert ft.cuda_available(), 'no CUDA backend'; print('cuda ok')" || exit 1

stamp "cuda tests ${KSEL[*]}"
timeout ${TEST_TIMEOUT:-210} python3 -m pytest -q -n 8 -p no:cacheprovider "${KSEL[@]}" \
  tests/test_cuda_qgemm.py tests/test_cuda.py tests/test_cuda_gemv.py tests/test_cuda_attention.py \
  > "$OUT/tests.log" 2>&1
echo "tests rc=$?" >> "$OUT/tests.log"
tail -5 "$OUT/tests.log"

stamp "7B checkpoint"
python3 -c "import sys; sys.path.insert(0, 'bench'); from train_bench import make_7b_checkpoint; make_7b_checkpoint('/tmp/ft7b')" \
  >> "$OUT/bench.log" 2>&1

for v in $VARIANTS; do
  stamp "train_bench FT_CUDA_QGEMM=$v mb $MBS"
  FT_CUDA_QGEMM=$v timeout 150 python3 bench/train_bench.py --no-hf --ckpt /tmp/ft7b --dtype $DTYPE --mb $MBS \
    --steps 6 --warmup 2 --out /tmp/ftperf_$v >> "$OUT/bench.log" 2>&1
done
if [ "$MODE" != t4 ]; then
  for mb in 1 16; do
    stamp "profile FT_CUDA_PROFILE=1 FT_CUDA_QGEMM=auto mb $mb"
    FT_CUDA_PROFILE=1 timeout 90 python3 bench/train_bench.py --no-hf --ckpt /tmp/ft7b --mb $mb --steps 3 --warmup 1 \
      --out /tmp/ftperf_profile_$mb >> "$OUT/bench.log" 2>&1
  done
fi
stamp "done"

python3 - "$OUT" $VARIANTS <<'EOF'
import glob, json, sys
out, variants = sys.argv[1], sys.argv[2:]
res = {}
for v in variants:
    files = sorted(glob.glob(f"/tmp/ftperf_{v}/train_*.json"))
    res[v] = json.load(open(files[-1])) if files else {"error": "no result"}
json.dump(res, open(f"{out}/results.json", "w"), indent=1)
mbs = sorted({int(k) for r in res.values() for k in r.get("ours", {})})
lines = ["| FT_CUDA_QGEMM | " + " | ".join(f"mb {m} tok/s (peak GiB)" for m in mbs) + " |",
         "|---|" + "---|" * len(mbs)]
for v, r in res.items():
    cells = []
    for m in mbs:
        o = r.get("ours", {}).get(str(m), {})
        cells.append(f"{o['tok_s']:,.0f} ({o['peak_GiB']:.2f})" if "tok_s" in o else str(o.get("error", "-"))[:40])
    lines.append(f"| {v} | " + " | ".join(cells) + " |")
open(f"{out}/summary.md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
grep -E "passed|failed|error" "$OUT/tests.log" | tail -3
