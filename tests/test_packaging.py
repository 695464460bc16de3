"""setup.py's CUDA decision and progress lines, and the sdist (`python -m build --sdist`).

* No GPU visible and nothing asked: the CPU engine only, with one line saying so and how to get
  CUDA (a machine with nvcc but no GPU installs in seconds).
* A visible GPU (a fake nvidia-smi here), FALCONTUNE_CUDA=1 or FALCONTUNE_CUDA_ARCH: CUDA, for the
  visible GPU's architecture or the asked ones; asked without nvcc: a clear failure.
* One progress line per compiled CUDA file (a fake nvcc here; CI compiles the real kernels).
* The sdist holds everything a build needs (csrc/, the sample dataset, setup.py, ...).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# setup.py run as a module: setup() only answers --name, then the helper under test is called
_RUN = """
import json, runpy, sys
sys.argv = ["setup.py", "--name"]
g = runpy.run_path("setup.py")
if {no_nvcc}:
    g["_cuda_plan"].__globals__["_find_nvcc"] = lambda: None
try:
    plan = g["_cuda_plan"]()
    print("RESULT " + json.dumps({{"plan": plan, "archs": g["_cuda_archs"]() if plan else None}}))
except SystemExit as e:
    print("EXIT " + str(e.code))
"""


def _plan(tmp_path: Path, env_extra: dict[str, str], gpu: str | None = None, no_nvcc: bool = False) -> tuple[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    smi = bin_dir / "nvidia-smi"  # first on PATH: shadows a real one (the tests also run on GPU machines)
    smi.write_text(f"#!/bin/sh\necho {gpu}\n" if gpu is not None else "#!/bin/sh\necho 'No devices were found'\nexit 6\n")
    smi.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FALCONTUNE_CUDA")}
    env["PATH"] = os.pathsep.join([str(bin_dir), "/usr/bin", "/bin", str(Path(sys.executable).parent)])
    env.update(env_extra)
    r = subprocess.run([sys.executable, "-c", _RUN.format(no_nvcc=no_nvcc)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()[-1], r.stderr


def test_no_gpu_builds_the_cpu_engine_with_one_line(tmp_path: Path) -> None:
    out, err = _plan(tmp_path, {})
    assert json.loads(out.split(" ", 1)[1]) == {"plan": None, "archs": None}
    lines = [line for line in err.splitlines() if line.startswith("falcontune:")]
    assert len(lines) == 1 and "no NVIDIA GPU visible: building the CPU engine only" in lines[0]
    assert "FALCONTUNE_CUDA=1" in lines[0]


def test_visible_gpu_or_asked_builds_cuda(tmp_path: Path) -> None:
    nvcc = _plan(tmp_path, {"FALCONTUNE_CUDA": "1"})
    if nvcc[0].startswith("EXIT"):
        pytest.skip("no nvcc on this machine")
    out, _ = _plan(tmp_path, {}, gpu="8.6")
    assert json.loads(out.split(" ", 1)[1])["archs"] == ["86"]  # only the visible GPU's architecture
    out, _ = _plan(tmp_path, {"FALCONTUNE_CUDA_ARCH": "75;80"})
    assert json.loads(out.split(" ", 1)[1])["archs"] == ["75", "80"]
    out, _ = _plan(tmp_path, {"FALCONTUNE_CUDA": "1"})
    assert json.loads(out.split(" ", 1)[1])["archs"] == ["75", "80", "86", "89", "90"]  # CI: every kernel
    out, err = _plan(tmp_path, {"FALCONTUNE_CUDA": "0"}, gpu="7.5")
    assert json.loads(out.split(" ", 1)[1])["plan"] is None and "FALCONTUNE_CUDA=0" in err


def test_cuda_asked_without_nvcc_fails_clearly(tmp_path: Path) -> None:
    out, _ = _plan(tmp_path, {"FALCONTUNE_CUDA": "1"}, no_nvcc=True)
    assert out.startswith("EXIT ") and "nvcc was not found" in out
    out, err = _plan(tmp_path, {}, gpu="7.5", no_nvcc=True)  # a GPU but no toolkit: CPU, and why
    assert json.loads(out.split(" ", 1)[1])["plan"] is None and "nvcc was not found" in err


_COMPILE = """
import runpy, sys
from setuptools import Extension
from setuptools.dist import Distribution
sys.argv = ["setup.py", "--name"]
g = runpy.run_path("setup.py")
cmd = g["BuildExt"](Distribution())
cmd.build_temp = {tmp!r}
ext = Extension("x", sources=[])
cmd._build_cuda(ext, {nvcc!r})
print("OBJECTS", len(ext.extra_objects))
"""


def test_one_progress_line_per_cuda_file(tmp_path: Path) -> None:
    nvcc = tmp_path / "nvcc"
    # a stand-in nvcc: writes the object named after -o; fails on the file named in FAIL_ON
    nvcc.write_text('#!/bin/sh\nwhile [ $# -gt 0 ]; do case "$1" in -o) out="$2";; *"$FAIL_ON") exit 3;; esac; '
                    'shift; done\ntouch "$out"\n')
    nvcc.chmod(0o755)
    sources = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "csrc" / "cuda").glob("*.cu"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("FALCONTUNE_CUDA")}
    env.update(FALCONTUNE_CUDA_ARCH="75", FAIL_ON="never")
    script = _COMPILE.format(tmp=str(tmp_path / "build"), nvcc=str(nvcc))
    r = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"OBJECTS {len(sources)}" in r.stdout
    progress = [line for line in r.stderr.splitlines() if line.startswith("falcontune: [")]
    assert len(progress) == len(sources)
    assert [line.split("] ")[0] for line in progress] == [f"falcontune: [{i}/{len(sources)}" for i in
                                                          range(1, len(sources) + 1)]
    assert sorted(line.split("compiled ")[1].split(" (")[0] for line in progress) == sources
    assert "compiling the CUDA engine: " in r.stderr and "sm_75" in r.stderr
    env["FAIL_ON"] = "loss.cu"
    r = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "falcontune: nvcc failed on csrc/cuda/loss.cu" in r.stderr


def test_sdist_holds_everything_a_build_needs(sdist: Path) -> None:
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    tracked = subprocess.run(["git", "ls-files", "csrc", "falcontune", "datasets"], cwd=REPO, capture_output=True,
                             text=True, check=True).stdout.split()
    needed = set(tracked) | {"setup.py", "pyproject.toml", "README.md", "notebooks/falcontune_fr.ipynb",
                             "tests/conftest.py"}
    assert not sorted(needed - names), sorted(needed - names)
    assert not [n for n in names if n.endswith((".so", ".o", ".pyc"))]
