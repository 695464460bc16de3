#!/usr/bin/env bash
# Memory-safety checks of the C engine (docs/RELIABILITY.md):
#
#  1. builds falcontune._C with AddressSanitizer + UndefinedBehaviorSanitizer (FALCONTUNE_SANITIZE=1)
#     in a temporary copy of the tree (the normal build is left alone) and runs the C core's tests
#     plus the robustness and fuzz tests under it: zero reports allowed;
#  2. rebuilds it plainly (-g, the default portable build: valgrind decodes its baseline and AVX2
#     code and reports no AVX-512, so the kernel dispatch picks AVX2) and runs a short script that
#     creates / frees models, adds LoRA, trains, generates and triggers errors under
#     valgrind --leak-check=full: zero "definitely lost" blocks with falcontune._C in their stack
#     (Python's own allocations are not counted), zero memcheck errors in _C frames.
#
# usage: bash tools/sanitize.sh [--no-valgrind] [--no-asan]
# env:   FT_SANITIZE_OUT   where logs + summary.json go (default build/sanitize)
#        FT_SANITIZE_TESTS the pytest targets of step 1 (default below)
#        FT_REQUIRE_VALGRIND=1 fails when valgrind is not installed (default: step 2 is skipped)
# exit:  0 clean, 1 a sanitizer / valgrind finding or a failing test, 2 a setup problem.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${FT_SANITIZE_OUT:-$ROOT/build/sanitize}"
PY="${PYTHON:-python3}"
DO_ASAN=1
DO_VALGRIND=1
for arg in "$@"; do
    case "$arg" in
        --no-valgrind) DO_VALGRIND=0 ;;
        --no-asan) DO_ASAN=0 ;;
        *) echo "sanitize.sh: unknown argument $arg" >&2; exit 2 ;;
    esac
done
TESTS="${FT_SANITIZE_TESTS:-tests/test_engine.py tests/test_golden.py tests/test_quantize_load.py tests/test_robustness.py tests/test_fuzz.py tests/test_engine_safety.py tests/test_build.py}"

mkdir -p "$OUT"
rm -f "$OUT"/*.log "$OUT"/valgrind.xml "$OUT"/summary.json
WORK="$(mktemp -d "${TMPDIR:-/tmp}/ft-sanitize.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
T0=$(date +%s)

# -- a copy of the working tree (tracked + untracked files that git does not ignore) -------------
"$PY" - "$ROOT" "$WORK/src" <<'EOF'
import os, shutil, subprocess, sys
root, dst = sys.argv[1], sys.argv[2]
try:
    out = subprocess.run(["git", "-C", root, "ls-files", "-z", "-co", "--exclude-standard"],
                         check=True, capture_output=True).stdout.decode()
    files = [f for f in out.split("\0") if f]
except (OSError, subprocess.CalledProcessError):  # not a git checkout: everything but build output
    files = [os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root)
             for f in fs if "/build/" not in os.path.join(d, "") and not f.endswith((".so", ".o"))]
for f in files:
    src = os.path.join(root, f)
    if os.path.isfile(src) and not os.path.islink(src):
        os.makedirs(os.path.join(dst, os.path.dirname(f)), exist_ok=True)
        shutil.copy2(src, os.path.join(dst, f))
EOF
cd "$WORK/src"
# the copy's falcontune, not an editable install of $ROOT
export PYTHONPATH="$WORK/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONDONTWRITEBYTECODE=1 FALCONTUNE_CUDA=0 OMP_WAIT_POLICY=passive

ASAN_STATUS=skipped ASAN_REPORTS=0 UBSAN_REPORTS=0 ASAN_TESTS="" ASAN_SECONDS=0
if [ "$DO_ASAN" = 1 ]; then
    echo "== ASan + UBSan build"
    t=$(date +%s)
    if ! FALCONTUNE_SANITIZE=1 "$PY" setup.py build_ext --inplace --force >"$OUT/build-asan.log" 2>&1; then
        tail -30 "$OUT/build-asan.log"; echo "sanitize.sh: the ASan build failed" >&2; exit 2
    fi
    LIBASAN="$(gcc -print-file-name=libasan.so)"
    if [ ! -e "$LIBASAN" ]; then echo "sanitize.sh: gcc has no libasan.so" >&2; exit 2; fi
    # the module really is the instrumented one, imported from the copy
    LD_PRELOAD="$LIBASAN" ASAN_OPTIONS=detect_leaks=0 "$PY" -c "
import falcontune, falcontune._C as C, sys
assert falcontune.__file__.startswith('$WORK/src/'), falcontune.__file__
sys.exit(0 if b'__asan_init' in open(C.__file__, 'rb').read() else 'not an ASan build: ' + C.__file__)"
    echo "== tests under ASan + UBSan: $TESTS"
    set +e
    # Reports go to the C-level stderr, which --capture=sys leaves alone (pytest's default fd capture
    # would swallow them when the process aborts); log_path is not used: with gcc the ASan and UBSan
    # runtimes are separate libraries and ASan's reports ignore it.
    # matplotlib's C++ extension aborts when libasan is preloaded (ASan's __cxa_throw interceptor
    # finds no real symbol: "CHECK failed: asan_interceptors.cpp:320"), and training draws its
    # curves with it; a sitecustomize on PYTHONPATH (inherited by the CLI subprocesses) hides
    # matplotlib, so the plot is skipped as on a machine without it.
    mkdir -p "$WORK/no-matplotlib"
    printf 'import sys\nsys.modules["matplotlib"] = None  # see tools/sanitize.sh\n' >"$WORK/no-matplotlib/sitecustomize.py"
    # shellcheck disable=SC2086
    PYTHONPATH="$WORK/no-matplotlib${PYTHONPATH:+:$PYTHONPATH}" \
    LD_PRELOAD="$LIBASAN" \
    ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:strict_string_checks=1:detect_stack_use_after_return=1:check_initialization_order=1" \
    UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1" \
        "$PY" -m pytest -q -p no:cacheprovider --capture=sys $TESTS >"$OUT/pytest-asan.log" 2>&1
    rc=$?
    set -e
    ASAN_TESTS="$(grep -E "[0-9]+ (passed|failed)" "$OUT/pytest-asan.log" | tail -1 || true)"
    [ -n "$ASAN_TESTS" ] || ASAN_TESTS="pytest exited with status $rc before its summary"
    ASAN_REPORTS=$(grep -c "ERROR: AddressSanitizer" "$OUT/pytest-asan.log" || true)
    UBSAN_REPORTS=$(grep -c "runtime error:" "$OUT/pytest-asan.log" || true)
    ASAN_SECONDS=$(( $(date +%s) - t ))
    echo "   $ASAN_TESTS"
    echo "   AddressSanitizer reports: $ASAN_REPORTS, UBSan reports: $UBSAN_REPORTS (${ASAN_SECONDS}s)"
    if [ "$rc" = 0 ] && [ "$ASAN_REPORTS" = 0 ] && [ "$UBSAN_REPORTS" = 0 ]; then
        ASAN_STATUS=clean
    else
        ASAN_STATUS=failed
        grep -E -m 20 -A 12 "ERROR: AddressSanitizer|runtime error:" "$OUT/pytest-asan.log" || tail -40 "$OUT/pytest-asan.log"
    fi
fi

VG_STATUS=skipped VG_SECONDS=0
if [ "$DO_VALGRIND" = 1 ]; then
    if ! command -v valgrind >/dev/null; then
        echo "== valgrind not installed: leak check skipped"
        if [ "${FT_REQUIRE_VALGRIND:-0}" = 1 ]; then exit 2; fi
    else
        echo "== plain build for valgrind (-g; the default portable ISA, valgrind picks the AVX2 kernels)"
        t=$(date +%s)
        if ! CFLAGS="-g" "$PY" setup.py build_ext --inplace --force >"$OUT/build-valgrind.log" 2>&1; then
            tail -30 "$OUT/build-valgrind.log"; echo "sanitize.sh: the valgrind build failed" >&2; exit 2
        fi
        cat >"$WORK/leak_probe.py" <<'EOF'
"""Every engine entry point once or twice, the error paths included, then everything freed."""
import gc, json, shutil, sys, tempfile
from pathlib import Path
import numpy as np
import falcontune as ft
from falcontune import _C, testing
from falcontune.model import _bind_weights, _engine_config
from falcontune.models import QuantizeConfig, parse_config
from falcontune.weights import WeightStore

ALL = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
assert _C.__file__.startswith(sys.argv[1]), f"{_C.__file__} is not the build under test ({sys.argv[1]})"
tmp = Path(tempfile.mkdtemp())
n_errors = 0


def expect_error(fn):
    global n_errors
    try:
        fn()
    except (ValueError, TypeError, KeyError, RuntimeError, IndexError, NotImplementedError, OverflowError):
        n_errors += 1
        return
    raise AssertionError("no error")


for preset, bits, fmt in (("tiny", 4, "gptq"), ("tiny-rw", 3, "gptq_v2"), ("tiny-40b", 8, "gptq")):
    d = testing.make_checkpoint(tmp / preset, preset=preset, bits=bits, group_size=32, checkpoint_format=fmt,
                                desc_act=preset == "tiny-40b", lm_head=preset == "tiny-rw")
    V = 256
    rng = np.random.default_rng(0)
    ids = rng.integers(0, V, (2, 7))
    mask = np.ones_like(ids)
    mask[1, :2] = 0
    labels = np.where(mask == 1, ids, -100)
    for rep in range(2):
        m = ft.load_model(d, device="cpu")
        m.forward(ids, mask)
        m.add_lora(r=2, alpha=4, dropout=0.1, target_modules=ALL, seed=rep)
        m.train()
        m.set_gradient_checkpointing(0.5 * rep)
        opt = ft.AdamW(m, lr=1e-3, max_grad_norm=1.0)
        for _ in range(2):
            m.zero_grad()
            m.forward_backward(ids, labels, mask)
            opt.step()
        m.lora_grad_dict(); m.optimizer_state(); m.engine.grad_norm()
        m.engine.set_lora_grad_flat(m.engine.lora_grad_flat())  # data parallel's copy out and back
        m.eval()
        m.generate_ids(ids[:1], max_new_tokens=3)
        m.generate_ids(ids, attention_mask=mask, max_new_tokens=2, do_sample=True, top_k=5, top_p=0.9, temperature=0.8)
        m.generate_ids(ids[:1], max_new_tokens=2, num_beams=2)
        m.generate_ids(ids[:1], max_new_tokens=2, use_cache=False)
        out = m.save_lora(tmp / f"adapter-{preset}-{rep}")
        m.load_lora(out)
        # error paths
        expect_error(lambda: m.forward([[V]]))
        expect_error(lambda: m.forward(ids, mask - 2))  # negative: neither padding nor a segment id
        expect_error(lambda: m.engine.set_lora_grad_flat(np.zeros(3, np.float32)))
        expect_error(lambda: m.engine.dist_init("libnccl.so.2", bytes(128), 0, 1))  # a CPU model
        expect_error(lambda: _C.dist_unique_id("/nonexistent/libnccl.so.2"))  # dlopen fails
        expect_error(lambda: m.forward(ids.astype(np.float32)))
        expect_error(lambda: m.forward_backward(ids, labels + 1000))
        expect_error(lambda: m.forward_backward(ids, labels[:, :3]))
        expect_error(lambda: m.load_lora_state_dict({k: v[:1] for k, v in m.lora_state_dict().items()}))
        expect_error(lambda: m.engine.lora_write(0, 0, 0, np.zeros((2, 3), np.float32), np.zeros((2, 2), np.float32)))
        expect_error(lambda: m.engine.lora_read(0, 99, 0))
        expect_error(lambda: m.engine.cache_reorder(np.array([5, 0])))
        expect_error(lambda: m.engine.forward_cached(ids))
        m.engine.cache_init(2, 4)
        expect_error(lambda: m.engine.forward_cached(np.zeros((2, 9), np.int64)))
        expect_error(lambda: m.engine.cache_reorder(np.array([0, 7])))
        m.engine.cache_free()
        expect_error(lambda: m.engine.adamw_step(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                                                 max_grad_norm=0.0, grad_scale=1.0, step=0))
        expect_error(lambda: m.add_lora(r=2, dropout=2.0))
        m.remove_lora()
        expect_error(lambda: m.forward_backward(ids, labels))
        m.add_lora(r=3, target_modules=["dense"])
        if rep:
            m.close()
            expect_error(lambda: m.forward(ids))
        del m, opt
        gc.collect()
    # construction failures after some weights were bound (partially built models are freed)
    cfg = parse_config(json.loads((d / "config.json").read_text()))
    q = QuantizeConfig(bits=bits, group_size=32, checkpoint_format=fmt)
    with WeightStore.open(next(d.glob("*.safetensors"))) as st:
        w = {k: (np.array(v[0]), v[1]) if isinstance(v, tuple) else np.array(v)
             for k, v in _bind_weights(st, cfg, q, False).items()}
    ec = _engine_config(cfg, q)
    _C.Model(ec, w, "cpu").close()
    last = f"transformer.h.{cfg.num_hidden_layers - 1}.mlp.dense_4h_to_h"
    for key, bad in ((f"{last}.g_idx", lambda a: a + 100), (f"{last}.scales", lambda a: a * np.float16(np.inf)),
                     (f"{last}.qzeros", lambda a: a[:1]), ("transformer.ln_f.bias", lambda a: a[:3])):
        expect_error(lambda: _C.Model(ec, {**w, key: bad(w[key])}, "cpu"))
    w2 = dict(w)
    w2.pop(f"{last}.qweight")
    expect_error(lambda: _C.Model(ec, w2, "cpu"))
    expect_error(lambda: _C.Model({**ec, "bits": 5}, w, "cpu"))
    expect_error(lambda: _C.Model({**ec, "head_dim": 3}, w, "cpu"))
    expect_error(lambda: _C.Model(ec, w, "cuda:7"))
    expect_error(lambda: _C.Model(ec, w, "cpu", 1))

# the op runner (csrc/opdebug.c): every CPU case of tests/test_ops.py once, then its error paths,
# some after arrays were already uploaded (they must be freed on the error path too)
sys.path.insert(0, "tests")
import test_ops  # noqa: E402
runner = _C.OpRunner("cpu")
for case in test_ops.CASES:
    runner.run(case.op, **case.values)
ones = np.ones(4, np.float32)
expect_error(lambda: runner.run("gelu_fwd", n=4, x=ones))
expect_error(lambda: runner.run("gelu_fwd", n=4, x=ones, y=ones, z=ones))
expect_error(lambda: runner.run("embed", N=2, D=1, V=3, ids=np.array([0, 9]), table=ones[:3], out=ones[:2]))
bad_q = {k: v for k, v in next(c for c in test_ops.CASES if c.op == "qlinear_fwd").values.items()}
expect_error(lambda: runner.run("qlinear_fwd", **{**bad_q, "g_idx": bad_q["g_idx"] + 1000}))
expect_error(lambda: runner.run("gelu_fwd", n=4, x=ones, y=ones, graph=True))
del runner

w = np.random.default_rng(1).standard_normal((64, 64)).astype(np.float32)
_C.quantize_rtn(w, 4, 32)
expect_error(lambda: _C.quantize_rtn(w, 5, 32))
_C.sample_token(np.zeros(10, np.float32), np.array([1, 2]), 1.1, 0.7, 3, 0.9, 0.5)
expect_error(lambda: _C.sample_token(np.zeros(10, np.float32), np.array([1]), 1.0, 1.0, 0, 2.0, 0.5))
shutil.rmtree(tmp)
gc.collect()
print(f"leak_probe: done, {n_errors} error paths taken")
EOF
        echo "== valgrind --leak-check=full on the engine probe"
        REALPY="$("$PY" -c 'import sys; print(sys.executable)')"  # not a pyenv shim: valgrind must see python itself
        set +e
        OMP_NUM_THREADS=1 PYTHONMALLOC=malloc valgrind --tool=memcheck --leak-check=full \
            --show-leak-kinds=definite,indirect --errors-for-leak-kinds=definite --num-callers=40 \
            --xml=yes --xml-file="$OUT/valgrind.xml" --log-file="$OUT/valgrind.log" \
            "$REALPY" "$WORK/leak_probe.py" "$WORK/src/" >"$OUT/leak_probe.log" 2>&1
        vrc=$?
        set -e
        VG_SECONDS=$(( $(date +%s) - t ))
        if [ "$vrc" != 0 ] || ! grep -q "leak_probe: done" "$OUT/leak_probe.log"; then
            cat "$OUT/leak_probe.log" | tail -30
            VG_STATUS=failed
        else
            VG_STATUS=ran
        fi
    fi
fi

# -- summary ------------------------------------------------------------------------------------
"$PY" - "$OUT" "$ASAN_STATUS" "$ASAN_REPORTS" "$UBSAN_REPORTS" "$ASAN_TESTS" "$ASAN_SECONDS" "$VG_STATUS" "$VG_SECONDS" \
    "$(( $(date +%s) - T0 ))" "$TESTS" <<'EOF'
import json, os, sys
import xml.etree.ElementTree as ET
out, asan_status, asan_n, ubsan_n, asan_tests, asan_s, vg_status, vg_s, total_s, tests = sys.argv[1:]
summary = {"asan_ubsan": {"status": asan_status, "asan_reports": int(asan_n), "ubsan_reports": int(ubsan_n),
                          "pytest": asan_tests, "tests": tests.split(), "seconds": int(asan_s)},
           "valgrind": {"status": vg_status, "seconds": int(vg_s)}, "seconds": int(total_s), "cores": os.cpu_count()}
xml_path = os.path.join(out, "valgrind.xml")
if vg_status != "skipped" and os.path.exists(xml_path):
    kinds, engine, engine_leaks, examples = {}, {}, {"blocks": 0, "bytes": 0}, []
    for err in ET.parse(xml_path).getroot().iter("error"):
        kind = err.findtext("kind")
        kinds[kind] = kinds.get(kind, 0) + 1
        objs = [f.findtext("obj") or "" for f in err.iter("frame")]
        if not any("_C.cpython" in o for o in objs):
            continue
        engine[kind] = engine.get(kind, 0) + 1
        if kind == "Leak_DefinitelyLost":
            w = err.find("xwhat")
            engine_leaks["blocks"] += int(w.findtext("leakedblocks"))
            engine_leaks["bytes"] += int(w.findtext("leakedbytes"))
        if len(examples) < 5:
            fns = [f"{f.findtext('fn')} ({f.findtext('file') or f.findtext('obj')}:{f.findtext('line') or ''})"
                   for f in err.iter("frame")][:8]
            examples.append({"kind": kind, "stack": fns})
    summary["valgrind"].update({"all_errors_by_kind": kinds, "engine_errors_by_kind": engine,
                                "engine_definitely_lost": engine_leaks, "engine_examples": examples})
    probe_log = open(os.path.join(out, "leak_probe.log")).read()
    summary["valgrind"]["probe"] = probe_log.strip().splitlines()[-1] if probe_log.strip() else ""
    clean = vg_status == "ran" and not engine
    summary["valgrind"]["status"] = "clean" if clean else "failed"
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=2)
print(json.dumps(summary, indent=2))
bad = summary["asan_ubsan"]["status"] == "failed" or summary["valgrind"]["status"] == "failed"
sys.exit(1 if bad else 0)
EOF
