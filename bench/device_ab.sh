#!/usr/bin/env bash
# A/B of several versions of the source in ONE device call: each version is built once, then the
# tests and benchmarks named run on every version in turn (benchmarks in alternating order over
# AB_ROUNDS rounds, so a card that drifts, warms or throttles during the call biases no version).
#
# Here (a git checkout), export the versions to compare into .scratch/ab/ (git-ignored):
#   bash bench/device_ab.sh export main attn-open-tiles gemv-lean   # any git refs
# then on the device, carrying .scratch (and .whl if a peer is wanted, .devdata for data tests):
#   bash bench/device_ab.sh run tests train decode
# Targets of `run`:
#   tests   pytest -m cuda $AB_TESTS (default: the GEMV, attention and engine GPU tests) per version
#   train   bench/train_bench.py --no-hf --mb $AB_MB (default "1 16") per version and round
#   decode  bench/decode_bench.py --skip-hf per version and round
# Env: AB_ARCH (FALCONTUNE_CUDA_ARCH of the builds, default the card's), AB_ENV_<name>="VAR=x ..."
# (extra environment for the version exported as <name>, e.g. AB_ENV_main="FT_CUDA_GEMV_FOLD=1" for
# an A/B of a setting within one version: export the same ref twice under two names, see below),
# AB_ROUNDS (default 2), AB_PYTEST_ARGS (default "-n 8 -q").
# Two names for one ref: `bash bench/device_ab.sh export main:fold main:pairs` (one tree, one build:
# the second name is a link to the first's tree).
# Results: $OUT/ab_summary.txt (tok/s per version and round, test counts), $OUT/ab_results.tar.gz
# (every JSON and log); at most a handful of files, as the device tool returns only 8.
set -o pipefail
cmd=${1:-}
shift || true
AB_DIR=${AB_DIR:-.scratch/ab}

export_refs() {
  [ $# -gt 0 ] || { echo "usage: $0 export REF[:NAME] ..."; exit 2; }
  mkdir -p "$AB_DIR"
  declare -A first # commit -> the first name exported for it: later names link to its tree
  for spec in "$@"; do
    ref=${spec%%:*}
    name=${spec#*:}
    [ "$name" = "$spec" ] && name=$ref
    name=$(echo "$name" | tr -c 'A-Za-z0-9_\n-' '_')
    commit=$(git rev-parse --short "$ref") || exit 1
    rm -rf "${AB_DIR:?}/$name"
    if [ -n "${first[$commit]:-}" ]; then # one tree and one build per commit
      ln -s "${first[$commit]}" "$AB_DIR/$name"
      echo "exported $ref as $AB_DIR/$name (the tree of ${first[$commit]})"
      continue
    fi
    first[$commit]=$name
    mkdir -p "$AB_DIR/$name"
    git archive "$ref" | tar -x -C "$AB_DIR/$name" || exit 1
    echo "$commit $ref" > "$AB_DIR/$name/.ab_ref"
    echo "exported $ref as $AB_DIR/$name ($commit)"
  done
}

versions() { for d in "$AB_DIR"/*/; do [ -f "$d/.ab_ref" ] && basename "$d"; done; }

# the extra environment of version $1 (AB_ENV_<name>), as "VAR=x ..." words for env
version_env() { local v="AB_ENV_$1"; echo "${!v:-}"; }

build_all() {
  local arch=${AB_ARCH:-$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)}
  local pids=() names=()
  for name in $(versions); do
    [ -L "$AB_DIR/$name" ] && continue # another name's tree, built under that name
    # built by an earlier call on this (still warm) machine, for this arch, and no source newer since
    if [ -f "$AB_DIR/$name/.ab_built_sm$arch" ] &&
       [ -z "$(cd "$AB_DIR/$name" && find csrc setup.py -newer ".ab_built_sm$arch" | head -1)" ]; then
      echo "built ${name} earlier (sm_$arch)"
      continue
    fi
    ( cd "$AB_DIR/$name" && FALCONTUNE_CUDA=1 FALCONTUNE_CUDA_ARCH=$arch python3 setup.py -q build_ext --inplace \
        > "$LOGS/build_$name.log" 2>&1 && touch ".ab_built_sm$arch" ) &
    pids+=($!) names+=("$name")
  done
  local ok=1
  for i in "${!pids[@]}"; do
    if wait "${pids[$i]}"; then echo "built ${names[$i]} (sm_$arch)"; else echo "BUILD FAILED: ${names[$i]}"; tail -30 "$LOGS/build_${names[$i]}.log"; ok=0; fi
  done
  [ $ok = 1 ]
}

# run "$@" in version $name's tree with its package first on the path and its extra environment;
# without OUT, which decode_bench.py would also copy its JSON into (the summary gathers them instead)
in_version() {
  local name=$1; shift
  # shellcheck disable=SC2046
  (cd "$AB_DIR/$name" && env -u OUT PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" $(version_env "$name") "$@")
}

run_targets() {
  OUT=${OUT:-./device_out}
  mkdir -p "$OUT"
  LOGS=/tmp/ab_logs
  rm -rf "$LOGS" && mkdir -p "$LOGS"
  export PYTHONUNBUFFERED=1
  local summary=$OUT/ab_summary.txt
  nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv,noheader | tee "$summary"
  for name in $(versions); do echo "version $name: $(cat "$AB_DIR/$name/.ab_ref") env: $(version_env "$name")"; done | tee -a "$summary"
  for name in $(versions); do # the data copy (.devdata) that the root carries, for every version's tests
    [ -d .devdata ] && [ ! -e "$AB_DIR/$name/.devdata" ] && ln -s "$PWD/.devdata" "$AB_DIR/$name/.devdata"
  done
  build_all 2>&1 | tee -a "$summary" || { tar -czf "$OUT/ab_results.tar.gz" -C /tmp ab_logs; exit 1; }
  local rounds=${AB_ROUNDS:-2} order
  order=$(versions)
  for what in "$@"; do
    case "$what" in
      tests)
        for name in $order; do
          # shellcheck disable=SC2086
          in_version "$name" timeout "${AB_TEST_TIMEOUT:-400}" python3 -m pytest -m cuda ${AB_PYTEST_ARGS:--n 8 -q} \
            ${AB_TESTS:-tests/test_cuda_gemv.py tests/test_cuda_attention.py tests/test_cuda.py} > "$LOGS/tests_$name.log" 2>&1
          echo "tests $name: rc=$? $(tail -1 "$LOGS/tests_$name.log")" | tee -a "$summary"
        done ;;
      train|decode)
        for round in $(seq 1 "$rounds"); do
          for name in $order; do
            local dir=/tmp/ab_json/$what/$name/r$round
            mkdir -p "$dir"
            if [ "$what" = train ]; then
              # shellcheck disable=SC2086
              in_version "$name" timeout "${AB_TRAIN_TIMEOUT:-300}" python3 bench/train_bench.py --no-hf --ckpt /tmp/ft7b \
                --mb ${AB_MB:-1 16} --out "$dir" > "$LOGS/${what}_${name}_r$round.log" 2>&1
            else
              in_version "$name" timeout "${AB_DECODE_TIMEOUT:-200}" python3 bench/decode_bench.py --skip-hf --ckpt /tmp/ft7b \
                --out "$dir" > "$LOGS/${what}_${name}_r$round.log" 2>&1
            fi
            echo "$what $name round $round: rc=$? $(python3 bench/ab_summary.py "$what" "$dir")" | tee -a "$summary"
          done
          order=$(echo "$order" | tac) # the next round in the reverse order
        done ;;
      *) echo "unknown target $what"; exit 2 ;;
    esac
  done
  cp -r /tmp/ab_json "$LOGS/json" 2>/dev/null
  tar -czf "$OUT/ab_results.tar.gz" -C /tmp ab_logs
}

case "$cmd" in
  export) export_refs "$@" ;;
  run) run_targets "$@" ;;
  *) echo "usage: $0 export REF[:NAME] ... | run tests|train|decode ..."; exit 2 ;;
esac
