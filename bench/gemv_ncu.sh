#!/usr/bin/env bash
# Nsight Compute on the decode GEMV (csrc/cuda/gemv.cu): the four quantized linears of one
# Falcon-7B-shaped layer (GPTQ 4-bit g64, bf16) at batch 1, profiled once per ';'-separated set of
# environment variables in GEMV_ENVS (default: one run with the defaults), e.g.
#   GEMV_ENVS="FT_CUDA_GEMV=1;FT_CUDA_GEMV=1,FT_SOMETHING=2" OUT=... bash bench/gemv_ncu.sh
# Prints per kernel: duration, DRAM bytes and rate, issue rate, active and eligible warps per
# scheduler, and the stall reasons per issued instruction (the figures in docs/PERF.md's decode
# section); keeps the full reports as $OUT/gemv_ncu_<i>.txt and the GEMV's SASS as $OUT/gemv.sass
# when cuobjdump is there. Needs ncu (the GPU machine has it) and a built extension.
set -o pipefail
OUT=${OUT:-./device_out}
mkdir -p "$OUT"
probe=$(mktemp /tmp/gemv_probe_XXXX.py)
cat > "$probe" <<'PY'
import sys
import numpy as np
import falcontune as ft
from falcontune import testing
d = testing.make_checkpoint("/tmp/gemv_ncu_7b1", preset="falcon-7b", bits=4, group_size=64, num_hidden_layers=1,
                            vocab_size=1024)
m = ft.load_model(d, device="cuda")
ids = np.random.default_rng(0).integers(0, 1024, size=(1, 8))
m.generate_ids(ids, max_new_tokens=6, eos_token_id=-1)
PY
so=$(python3 -c "import falcontune._C as c; print(c.__file__)")
if command -v cuobjdump >/dev/null; then
  cuobjdump -sass "$so" | awk '/Function : .*qgemv/,/EXIT/' > "$OUT/gemv.sass" || true
fi
metrics='regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio,dram__bytes_read.sum,dram__bytes_read.sum.per_second'
i=0
IFS=';' read -r -a sets <<< "${GEMV_ENVS:-}"
[ ${#sets[@]} -eq 0 ] && sets=("")
for set in "${sets[@]}"; do
  echo "== env: ${set:-(defaults)}"
  # graphs off: one kernel per launch; decode steps 3.. are past the warm-up (4 GEMVs a step)
  env FT_CUDA_GRAPHS=0 $(echo "$set" | tr ',' ' ') timeout ${NCU_TIMEOUT:-200} ncu --kernel-name regex:qgemv \
    --launch-skip 12 --launch-count 4 --cache-control none --clock-control none \
    --section SpeedOfLight --section Occupancy --section WarpStateStats --section LaunchStats \
    --section SchedulerStats --metrics "$metrics" python3 "$probe" > "$OUT/gemv_ncu_$i.txt" 2>&1
  grep -E "^  [a-z].*qgemv|Duration|dram__bytes|Issued Warp Per|Active Warps Per Sch|Eligible Warps|Registers Per|stalled_(long_scoreboard|wait|math_pipe|membar|barrier|short_scoreboard|not_selected)" \
    "$OUT/gemv_ncu_$i.txt" | sed 's/(T1 \*[^)]*)//'
  i=$((i + 1))
done
rm -f "$probe"
