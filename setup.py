"""Build falcontune._C from csrc/.

The CPU engine (C11, OpenMP when the compiler has it) is always built. The
CUDA backend is added when nvcc is found (FALCONTUNE_CUDA=0 or 1 forces it
off or on). Architectures: FALCONTUNE_CUDA_ARCH="75;80;86;89;90" by default;
when a GPU is visible at build time only its architecture is compiled, so an
install on Colab is quick.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
DEFAULT_ARCHS = "75;80;86;89;90"


def _sources(pattern: str) -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in ROOT.glob(pattern))


def _find_nvcc() -> str | None:
    flag = os.environ.get("FALCONTUNE_CUDA", "").strip()
    if flag == "0":
        return None
    candidates = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(Path(os.environ[var]) / "bin" / "nvcc")
    which = shutil.which("nvcc")
    if which:
        candidates.append(Path(which))
    candidates.append(Path("/usr/local/cuda/bin/nvcc"))
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    if flag == "1":
        sys.exit("FALCONTUNE_CUDA=1 but nvcc was not found (set CUDA_HOME or put nvcc on PATH)")
    return None


def _cuda_archs() -> list[str]:
    env = os.environ.get("FALCONTUNE_CUDA_ARCH", "").strip()
    if env:
        return [a.strip().replace(".", "") for a in env.replace(",", ";").split(";") if a.strip()]
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=compute_cap", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20, check=True).stdout
            caps = sorted({line.strip().replace(".", "") for line in out.splitlines() if line.strip()})
            if caps:
                return caps
        except (OSError, subprocess.SubprocessError):
            pass
    return DEFAULT_ARCHS.split(";")


def _has_openmp(compiler) -> bool:
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "omp.c"
        src.write_text("#include <omp.h>\nint main(void){return omp_get_max_threads() > 0 ? 0 : 1;}\n")
        try:
            objs = compiler.compile([str(src)], output_dir=tmp, extra_postargs=["-fopenmp"])
            compiler.link_executable(objs, str(Path(tmp) / "omp"), extra_postargs=["-fopenmp"])
            return True
        except Exception:  # noqa: BLE001 - any compiler failure means "no OpenMP"
            return False


class BuildExt(build_ext):
    def build_extensions(self) -> None:
        ext = self.extensions[0]
        # Portable by default: the compiler's baseline ISA (x86-64: SSE2), so a wheel or a cached
        # build runs on any CPU of its architecture; the hot CPU kernels carry AVX2 and AVX-512
        # copies picked at run time (csrc/cpu/isa_kernels.h). FALCONTUNE_NATIVE=1 builds for this
        # machine only. Warnings are errors where asked (CI): FALCONTUNE_WERROR=1.
        cflags = ["-std=c11", "-O3", "-Wall", "-Wextra", "-fvisibility=hidden"]
        if os.environ.get("FALCONTUNE_WERROR", "").strip() == "1":
            cflags.append("-Werror")
        if os.environ.get("FALCONTUNE_NATIVE", "").strip() == "1":
            cflags += ["-march=native", "-DFT_CPU_NATIVE"]
        if os.environ.get("FALCONTUNE_SANITIZE"):
            # AddressSanitizer + UBSan build for the robustness job
            cflags += ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-O1", "-g"]
            ext.extra_link_args += ["-fsanitize=address,undefined"]
        if _has_openmp(self.compiler):
            cflags.append("-fopenmp")
            ext.extra_link_args.append("-fopenmp")
        ext.extra_compile_args = cflags
        nvcc = _find_nvcc()
        if nvcc and _sources("csrc/cuda/*.cu"):
            self._build_cuda(ext, nvcc)
        super().build_extensions()

    def _build_cuda(self, ext: Extension, nvcc: str) -> None:
        archs = _cuda_archs()
        gencode = []
        for a in archs:
            gencode += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
        gencode += ["-gencode", f"arch=compute_{archs[-1]},code=compute_{archs[-1]}"]
        build_dir = Path(self.build_temp) / "cuda"
        build_dir.mkdir(parents=True, exist_ok=True)
        jobs = []
        werror = os.environ.get("FALCONTUNE_WERROR", "").strip() == "1"  # as for the C sources
        for src in _sources("csrc/cuda/*.cu"):
            obj = build_dir / (Path(src).stem + ".o")
            cmd = [nvcc, "-c", src, "-o", str(obj), "-O3", "-std=c++17", "-DFT_WITH_CUDA",
                   "-Icsrc", "--expt-relaxed-constexpr",
                   "-Xcompiler", "-fPIC,-Wall,-Wextra" + (",-Werror" if werror else ""),
                   *(["-Werror", "all-warnings"] if werror else []), *gencode]
            jobs.append((cmd, str(obj)))
        # one nvcc per source file, in parallel: the build is dominated by device code generation
        workers = max(1, min(len(jobs), os.cpu_count() or 1))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for cmd, _ in jobs:
                print(" ".join(cmd), flush=True)
            results = list(pool.map(lambda job: subprocess.run(job[0], cwd=ROOT, capture_output=True, text=True), jobs))
        for (cmd, _), res in zip(jobs, results):
            if res.returncode != 0:
                sys.stderr.write(res.stdout + res.stderr)
                raise subprocess.CalledProcessError(res.returncode, cmd)
        objects = [obj for _, obj in jobs]
        cuda_root = Path(nvcc).resolve().parent.parent
        libdirs = [d for d in (cuda_root / "lib64", cuda_root / "lib", cuda_root / "targets" / "x86_64-linux" / "lib")
                   if d.is_dir()]
        ext.extra_objects += objects
        ext.define_macros.append(("FT_WITH_CUDA", "1"))
        ext.library_dirs += [str(d) for d in libdirs]
        ext.runtime_library_dirs += [str(d) for d in libdirs]
        ext.libraries += ["cublas", "cudart", "stdc++"]  # nvcc host code needs the C++ runtime


class BuildPy(build_py):
    """Ship the French sample dataset inside the package (the demo model trains its tokenizer on it)."""

    def run(self) -> None:
        super().run()
        target = Path(self.build_lib) / "falcontune" / "sample_data"
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / "datasets" / "fr_instructions.json", target / "fr_instructions.json")


ext = Extension(
    "falcontune._C",
    sources=_sources("csrc/*.c") + _sources("csrc/cpu/*.c"),
    include_dirs=[np.get_include(), "csrc"],
    depends=_sources("csrc/*.h") + _sources("csrc/cpu/*.h") + _sources("csrc/cuda/*.cuh"),
    extra_link_args=[],
)

setup(ext_modules=[ext], cmdclass={"build_ext": BuildExt, "build_py": BuildPy})
