"""Build falcontune._C from csrc/.

The CPU engine (C11, OpenMP when the compiler has it) is always built. The CUDA backend is
compiled only when it can be used or is asked for:

* FALCONTUNE_CUDA=1, or FALCONTUNE_CUDA_ARCH set: compile it (nvcc must be found: CUDA_HOME,
  CUDA_PATH, PATH or /usr/local/cuda; the build fails clearly otherwise);
* FALCONTUNE_CUDA=0: never;
* otherwise: when nvidia-smi lists a GPU at install time, for that GPU's architecture (a few
  minutes on Colab); with no GPU visible, the CPU engine only (one line says so and how to get
  CUDA), so an install on a machine with nvcc but no GPU takes seconds instead of ~8 minutes.

Architectures: FALCONTUNE_CUDA_ARCH="75;80" if set, else the visible GPUs', else
75;80;86;89;90. Each compiled CUDA file prints one progress line. pip shows a build's output
only with -v, so these lines (and the CPU-only line) also go to the terminal (/dev/tty) when
there is one; `pip install -v` shows them everywhere.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import numpy as np
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
DEFAULT_ARCHS = "75;80;86;89;90"


def _sources(pattern: str) -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in ROOT.glob(pattern))


def _say(msg: str) -> None:
    """A line the user sees even behind pip's spinner: stderr (pip -v, or setup.py run by hand)
    and, when stderr is captured, the terminal."""
    line = f"falcontune: {msg}"
    print(line, file=sys.stderr, flush=True)
    if sys.stderr.isatty():
        return
    try:
        with open("/dev/tty", "w", encoding="utf-8") as tty:
            tty.write(f"\n{line}\n")
    except OSError:
        pass  # no terminal (CI, notebooks): the stderr line is what there is


def _find_nvcc() -> str | None:
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
    return None


def _visible_gpus() -> list[str]:
    """Compute capabilities ("75", "90", ...) of the GPUs nvidia-smi lists (none without a driver)."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return []
    try:
        out = subprocess.run([smi, "--query-gpu=compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return sorted({line.strip().replace(".", "") for line in out.splitlines() if line.strip()})


def _cuda_plan() -> str | None:
    """nvcc's path when the CUDA engine is to be compiled, else None (after saying why)."""
    flag = os.environ.get("FALCONTUNE_CUDA", "").strip()
    if flag == "0":
        _say("FALCONTUNE_CUDA=0: building the CPU engine only")
        return None
    asked = flag == "1" or bool(os.environ.get("FALCONTUNE_CUDA_ARCH", "").strip())
    nvcc = _find_nvcc()
    if asked:
        if nvcc is None:
            sys.exit("falcontune: the CUDA engine was asked for (FALCONTUNE_CUDA=1 or FALCONTUNE_CUDA_ARCH) but "
                     "nvcc was not found: install the CUDA toolkit and set CUDA_HOME or put nvcc on PATH")
        return nvcc
    if not _visible_gpus():
        _say("no NVIDIA GPU visible: building the CPU engine only (seconds). For the CUDA engine, reinstall "
             "with FALCONTUNE_CUDA=1 (needs nvcc; FALCONTUNE_CUDA_ARCH=\"75;80\" picks the GPU architectures)")
        return None
    if nvcc is None:
        _say("an NVIDIA GPU is visible but nvcc was not found: building the CPU engine only. For the CUDA "
             "engine, install the CUDA toolkit and reinstall with FALCONTUNE_CUDA=1 CUDA_HOME=/usr/local/cuda")
        return None
    return nvcc


def _cuda_archs() -> list[str]:
    env = os.environ.get("FALCONTUNE_CUDA_ARCH", "").strip()
    if env:
        return [a.strip().replace(".", "") for a in env.replace(",", ";").split(";") if a.strip()]
    return _visible_gpus() or DEFAULT_ARCHS.split(";")


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
        nvcc = _cuda_plan() if _sources("csrc/cuda/*.cu") else None
        if nvcc:
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
        _say(f"compiling the CUDA engine: {len(jobs)} files for sm_{', sm_'.join(archs)} with {workers} parallel "
             "nvcc (about 1.5 minutes per architecture on 2 cores)")
        t0 = time.monotonic()

        def compile_one(job: tuple[list[str], str]) -> subprocess.CompletedProcess:
            print(" ".join(job[0]), flush=True)
            return subprocess.run(job[0], cwd=ROOT, capture_output=True, text=True)

        with ThreadPoolExecutor(max_workers=workers) as pool:
            futures = {pool.submit(compile_one, job): job for job in jobs}
            for done, future in enumerate(as_completed(futures), start=1):
                cmd, obj = futures[future]
                res, src = future.result(), f"csrc/cuda/{Path(obj).stem}.cu"
                if res.returncode != 0:
                    sys.stderr.write(res.stdout + res.stderr)
                    _say(f"nvcc failed on {src} (its messages are above)")
                    raise subprocess.CalledProcessError(res.returncode, cmd)
                _say(f"[{done}/{len(jobs)}] compiled {src} ({time.monotonic() - t0:.0f} s)")
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
    libraries=["dl"],  # dist.c loads NCCL at run time (dlopen: in libdl before glibc 2.34)
    extra_link_args=[],
)

setup(ext_modules=[ext], cmdclass={"build_ext": BuildExt, "build_py": BuildPy})
