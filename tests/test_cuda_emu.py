"""CUDA kernels run on the CPU under tests/cuda_emu/emu.h (fibers for threads, an emulated warp mma).

The tensor-core flash attention (csrc/cuda/attention_mma.cuh) is compiled with the host C++ compiler
against the CUDA headers and checked against a float64 reference over shapes that exercise its
blocking, masking and dK/dV splits (tests/cuda_emu/attention_mma_emu.cpp); the decode GEMV
(csrc/cuda/gemv_kernels.cuh) likewise over bit widths, group lookups and split-K ranges
(tests/cuda_emu/gemv_emu.cpp). This runs everywhere the
CUDA toolkit's headers are, GPU or not, so the kernels' logic is tested by CI; the GPU tests
(test_ops.py, test_cuda_attention.py) check the same kernels on the hardware.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
EMU = REPO / "tests" / "cuda_emu"


def _cuda_include() -> Path | None:
    roots = [os.environ.get(v) for v in ("CUDA_HOME", "CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        roots.append(str(Path(nvcc).resolve().parent.parent))
    roots.append("/usr/local/cuda")
    for root in roots:
        if root and (Path(root) / "include" / "cuda_fp16.h").is_file():
            return Path(root) / "include"
    return None


def _build_and_run(tmp_path: Path, source: str, *flags: str) -> None:
    """Compile tests/cuda_emu/<source> with the host compiler against the CUDA headers, run it, and
    expect its every case to pass."""
    inc, cxx = _cuda_include(), shutil.which("g++")
    if inc is None or cxx is None:
        pytest.skip("needs g++ and the CUDA toolkit's headers (cuda_fp16.h)")
    exe = tmp_path / Path(source).stem
    cmd = [cxx, "-std=c++20", "-O2", "-Wall", "-Wextra", "-Wno-unknown-pragmas", "-Werror", *flags,
           f"-I{REPO / 'csrc'}", f"-I{inc}", str(EMU / source), "-o", str(exe)]
    build = subprocess.run(cmd, capture_output=True, text=True)
    assert build.returncode == 0, build.stdout + build.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "passed: 0 case(s) failed" in run.stdout


@pytest.mark.parametrize("stages", [1, 2], ids=["one_stage_sm75", "two_stages_sm80"])
def test_attention_mma_kernels_match_float64_reference(tmp_path, stages):
    """Both tile pipelines: one synchronous stage (what sm_75 runs) and two with the cp.async copies
    of the next tile in flight (sm_80+; an emulated copy lands at its issue or at its wait, at random)."""
    _build_and_run(tmp_path, "attention_mma_emu.cpp", f"-DAM_STAGES={stages}")


def test_decode_gemv_kernel_matches_float64_reference(tmp_path):
    """The fused dequant-GEMV's two kernels (csrc/cuda/gemv_kernels.cuh: pairs, and fold where
    gv_fold_ok) with gemv.cu's split-K geometry: 2, 4 and 8 bits, f16 and bf16, 1-8 rows, partial last
    iterations, column tiles cut by `out`, groups by shift, by g_idx and act-order, bias, x of large
    mean (the fold's sum-x cancellation: its fp32 partials within 2e-5 of float64, also with the mma
    sums truncated as pessimistically as tensor cores do, emu.h's emu_mma_truncate; without the flush
    every 16 word rows that fails); the arrival counters back at zero after each call. The
    kernel reads its half2 operands through reinterpret_cast, as CUDA code does: the host build
    needs -fno-strict-aliasing for that to mean the same."""
    _build_and_run(tmp_path, "gemv_emu.cpp", "-fno-strict-aliasing")
