"""The benchmark tools that run off the GPU: the wheel slimmer (bench/slim_wheel.py), the
arithmetic of the T4 projection (bench/t4_projection.py), the profile's reports
(bench/train_profile.py), and the A/B harness's export and summary (bench/device_ab.sh,
bench/ab_summary.py)."""
from __future__ import annotations

import base64
import hashlib
import json
import math
import subprocess
import sys
import zipfile
from fractions import Fraction
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

import ab_summary  # noqa: E402
import slim_wheel  # noqa: E402
import t4_projection as t4  # noqa: E402
import train_profile  # noqa: E402


def _wheel(path: Path, files: dict[str, bytes]) -> Path:
    """A wheel with a correct RECORD, written by hand (not by the code under test)."""
    record = "demo_pkg-1.0.dist-info/RECORD"
    lines = []
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            lines.append(f"{name},sha256={digest},{len(data)}")
        z.writestr(record, "\n".join(lines + [f"{record},,"]) + "\n")
    return path


def test_slim_wheel_keeps_the_named_libraries_and_installs(tmp_path: Path) -> None:
    src = _wheel(tmp_path / "demo_pkg-1.0-py3-none-any.whl", {
        "demo_pkg/__init__.py": b"VALUE = 42\n",
        "demo_pkg/libdemo_cpu.so": b"\x7fELF cpu" * 100,
        "demo_pkg/libdemo_cuda118.so": b"\x7fELF 118" * 1000,
        "demo_pkg/libdemo_cuda130.so": b"\x7fELF 130" * 100,
        "demo_pkg/librocm_helper_rocm64.so": b"\x7fELF rocm" * 1000,
        "demo_pkg-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: demo_pkg\nVersion: 1.0\n",
        "demo_pkg-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    })
    out, dropped = slim_wheel.slim(src, tmp_path / "slim", {"cpu", "cuda130"})
    assert sorted(Path(d).name for d in dropped) == ["libdemo_cuda118.so", "librocm_helper_rocm64.so"]
    with zipfile.ZipFile(out) as z:
        names = set(z.namelist())
    assert "demo_pkg/libdemo_cpu.so" in names and "demo_pkg/libdemo_cuda130.so" in names
    assert "demo_pkg/libdemo_cuda118.so" not in names
    assert slim_wheel.check_record(out) == 6  # 5 kept files + RECORD
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--target", str(target), str(out)], check=True, capture_output=True)
    r = subprocess.run([sys.executable, "-c", "import demo_pkg; print(demo_pkg.VALUE)"], cwd=tmp_path,
                       env={"PYTHONPATH": str(target)}, capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "42"


def test_check_record_rejects_a_tampered_wheel(tmp_path: Path) -> None:
    src = _wheel(tmp_path / "demo_pkg-1.0-py3-none-any.whl", {"demo_pkg/__init__.py": b"A = 1\n"})
    bad = tmp_path / "bad" / src.name
    bad.parent.mkdir()
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(bad, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            zout.writestr(info, b"A = 2\n" if info.filename.endswith("__init__.py") else data)
    with pytest.raises(ValueError, match="does not match"):
        slim_wheel.check_record(bad)


def test_quadratic_fit_is_exact_and_refuses_non_polynomials() -> None:
    def counts(T: int) -> dict:
        pairs = T * (T + 1) // 2  # attention-like
        return {"attention_fwd": {"calls": 2, "flops": 7 * pairs + 3 * T, "act_elems": 5 * T + 1, "weight_elems": 0,
                                  "fixed_bytes": 4 * T, "dequant_elems": 0}}

    fit = t4.fit_quadratic({T: counts(T) for T in t4.FIT_T})
    for T in (1, 37, 200, 256):
        assert t4.evaluate(fit, T) == counts(T)
    fit["attention_fwd"]["flops"] = (Fraction(0), Fraction(1, 3), Fraction(0))
    with pytest.raises(ValueError, match="not an integer"):
        t4.evaluate(fit, 7)


def test_op_time_variants() -> None:
    card = t4.Card("test", tensor_flops=100e12, fp32_flops=10e12, bandwidth=200e9, tc_frac=0.5, fp32_frac=1.0,
                   bw_frac=0.5)
    # a compute-bound quantized linear: 2 N in out at N = 256, in = out = 4096
    n, d = 256, 4096
    c = {"calls": 1, "flops": 2 * n * d * d, "act_elems": 2 * n * d, "weight_elems": 0,
         "fixed_bytes": d * d // 2, "dequant_elems": d * d}
    fused = t4.op_seconds("qlinear_fwd", c, card, "fused")
    assert fused == pytest.approx(max(2 * n * d * d / 50e12, (4 * n * d + d * d / 2) / 100e9))
    scratch = t4.op_seconds("qlinear_fwd", c, card, "scratch")
    dequant = (d * d / 2 + 2 * d * d) / 100e9
    gemm = max(2 * n * d * d / 50e12, (4 * n * d + 2 * d * d) / 100e9)
    assert scratch == pytest.approx(dequant + gemm)
    # elementwise ops use the fp32 peak; host transfers are not timed
    g = {"calls": 1, "flops": 5 * n * d, "act_elems": 2 * n * d, "weight_elems": 0, "fixed_bytes": 0,
         "dequant_elems": 0}
    assert t4.op_seconds("gelu_fwd", g, card, "fused") == pytest.approx(max(5 * n * d / 10e12, 4 * n * d / 100e9))
    assert t4.op_seconds("upload", dict(g, fixed_bytes=10**9), card, "fused") == 0.0


def test_epoch_plan_follows_the_trainer() -> None:
    from falcontune import trainer

    d = {"records": 174, "train": [10] * 139, "val": [10] * 35}
    plan = t4.epoch_plan(d)
    assert plan["steps"] == math.ceil(139 / 2) == 70
    assert plan["eval_steps"] == max(5, 174 // 10) == 17
    assert plan["evals"] == 5  # at steps 17, 34, 51, 68 and once at the end (70)
    assert "n_records // (10 * s.mbatch_size)" in Path(trainer.__file__).read_text()  # the rule copied here


def test_profile_reports_count_gaps_and_host_calls() -> None:
    """Two steps of three kernels: gaps of 1 and 40 us inside each step, 900 us between them."""
    spans = []
    for t0 in (0.0, 1000.0):
        spans += [(t0, t0 + 10, "gemm"), (t0 + 11, t0 + 20, "gelu"), (t0 + 60, t0 + 100, "gemm")]
    lines = train_profile.gap_report(spans[::-1], steps=2)  # any order: sorted by start
    assert lines[0].startswith("idle between GPU events per step: 0.49 ms over 2 gaps")  # 982 us, 5 gaps
    by_size = {line.split("us:")[0].strip(): line for line in lines[1:7]}
    assert "1.0 a step" in by_size["gaps     0 - 2"] and "0.5 a step" in by_size["gaps   100 - 1000"]
    assert "1.0 a step" in by_size["gaps    20 - 100"]
    assert any(line.strip().startswith("0.450") and "gemm -> gemm" in line for line in lines)
    host = train_profile.host_report({"cudaMemcpyAsync": [10.0, 1500.0], "cudaLaunchKernel": [3.0] * 8}, steps=2)
    assert host[1].split() == ["0.755", "1.0", "1500.0", "cudaMemcpyAsync"]
    assert host[2].split() == ["0.012", "4.0", "3.0", "cudaLaunchKernel"]
    assert train_profile.gap_report([], 1) == [] and train_profile.host_report({}, 1) == []


def test_ab_summary_lines(tmp_path: Path) -> None:
    """One line per benchmark folder: the newest JSON's figures, errors named, no JSON said."""
    train = {"ours": {"16": {"tok_s": 19211.8, "peak_GiB": 14.127}, "1": {"tok_s": 9930.4, "peak_GiB": 4.846},
                      "4": {"error": "out of memory"}}}
    (tmp_path / "train_H200_2026-12-05.json").write_text(json.dumps(train))
    assert ab_summary.train_line(ab_summary.newest_json(tmp_path, "train")) == \
        "mb 1: 9930 tok/s 4.85 GiB; mb 4: out of memory; mb 16: 19212 tok/s 14.13 GiB"
    decode = {"ours": {"tok_s_b1": 326.33, "decode_only_tok_s_b1": 332.49, "prefill_tok_s_512": 29032.6}}
    (tmp_path / "decode_H200_2026-12-05.json").write_text(json.dumps(decode))
    out = subprocess.run([sys.executable, str(REPO / "bench" / "ab_summary.py"), "decode", str(tmp_path)],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "326.3 tok/s end to end, 332.5 decode-only, prefill 29033"
    empty = tmp_path / "empty"
    empty.mkdir()
    out = subprocess.run([sys.executable, str(REPO / "bench" / "ab_summary.py"), "train", str(empty)],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "no JSON written"


def test_device_ab_exports_versions(tmp_path: Path) -> None:
    """`device_ab.sh export REF:NAME` writes the ref's tracked files and its commit under one name per
    version; the same ref under two names (an A/B of a setting within one version) shares one tree."""
    if subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True).returncode != 0:
        pytest.skip("not a git checkout")
    env = {"AB_DIR": str(tmp_path / "ab"), "PATH": "/usr/bin:/bin"}
    res = subprocess.run(["bash", "bench/device_ab.sh", "export", "HEAD:fold", "HEAD:pairs"], cwd=REPO, env=env,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
    for name in ("fold", "pairs"):
        d = tmp_path / "ab" / name
        assert (d / "setup.py").is_file() and (d / "csrc" / "cuda" / "gemv_kernels.cuh").is_file()
        assert (d / ".ab_ref").read_text().split() == [head.strip(), "HEAD"]
    assert (tmp_path / "ab" / "pairs").is_symlink() and not (tmp_path / "ab" / "fold").is_symlink()  # one tree
    bad = subprocess.run(["bash", "bench/device_ab.sh", "run-all"], cwd=REPO, env=env, capture_output=True, text=True)
    assert bad.returncode == 2
