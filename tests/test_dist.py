"""Data parallel training (falcontune.dist): ``mpiexec -n 2 falcontune finetune`` trains the adapter
of one process, prints and writes once, refuses a global batch it cannot share, ends the whole job
on one rank's error, stops cleanly on Ctrl-C and resumes with another number of processes; the
pieces underneath (launcher detection, GPU placement, the flat gradient of the engine, NCCL
loading); and, on a GPU, NCCL itself.

mpiexec comes from the mpich wheel of the [test] extra: CI (CI=true) fails without it, elsewhere
the tests that launch it are skipped.
"""
from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pytest

import falcontune as ft
from falcontune import _C, dist, testing
from falcontune.checkpoint import STATE_FILE
from falcontune.errors import ParameterError
from falcontune.trainer import check_world_size
from falcontune.weights import WeightStore

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "datasets" / "fr_instructions.json"
#: launcher variables removed from the environment of the commands the tests start
_LAUNCH_VARS = dist.LAUNCHER_SIZE_VARS + ("PMI_RANK", "PMI_FD", "OMPI_COMM_WORLD_RANK", "SLURM_PROCID")


def _mpiexec() -> str:
    """The mpiexec of the MPI library mpi4py loads (pip's mpich wheel puts it next to python)."""
    import importlib.util

    here = Path(sys.executable).parent / "mpiexec"
    found = str(here) if here.is_file() else shutil.which("mpiexec")
    if found and importlib.util.find_spec("mpi4py") is not None:
        return found
    msg = "mpiexec and mpi4py are needed (pip install mpi4py mpich: the [test] extra has them)"
    if os.environ.get("CI", "").strip().lower() in ("true", "1", "yes"):
        pytest.fail(msg + " (CI=true: required)", pytrace=False)
    pytest.skip(msg)


def _env() -> dict[str, str]:
    # without OMP_NUM_THREADS: the processes of one machine share its cores (falcontune/__init__.py);
    # the CPU engine's results do not depend on the thread count
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS + ("OMP_NUM_THREADS",)}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _finetune(args: list[str], n: Optional[int] = None, timeout: int = 300,
              python: Optional[list[str]] = None) -> subprocess.CompletedProcess:
    """`falcontune finetune ARGS` in one process, or under `mpiexec -n n`."""
    cmd = python or [sys.executable, "-m", "falcontune", "finetune"]
    if n is not None:
        cmd = [_mpiexec(), "-n", str(n), *cmd]
    return subprocess.run(cmd + args, capture_output=True, text=True, timeout=timeout, env=_env())


def _adapter(d: Path) -> dict[str, np.ndarray]:
    with WeightStore.open(d / "adapter_model.safetensors") as st:
        return {k: np.array(st.tensor(k), dtype=np.float64) for k in st.names()}


def _worst_relative(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    assert sorted(a) == sorted(b)
    return max(float(np.abs(a[k] - b[k]).max() / np.abs(a[k]).max()) for k in a)


def _log(d: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (d / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """27 records: 21 train / 6 validation, so the last step of 4 micro-batches has only one (the
    second rank runs nothing there)."""
    path = tmp_path_factory.mktemp("dist") / "small.json"
    path.write_text(json.dumps(json.loads(SAMPLE.read_text(encoding="utf-8"))[:27], ensure_ascii=False),
                    encoding="utf-8")
    return path


def _flags(data: Path, out: Path, dropout: float = 0.0, **extra: Any) -> list[str]:
    flags = {"model": "demo", "dataset": data, "lora_out_dir": out, "epochs": 1, "batch_size": 4, "mbatch_size": 1,
             "cutoff_len": 64, "val_set_size": 6, "warmup_steps": 1, "logging_steps": 1, "save_steps": 3,
             "lora_dropout": dropout, "backend": "cpu", **extra}
    return [f"--{k}={v}" for k, v in flags.items()]


@pytest.fixture(scope="module")
def one_process(small_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[float, Path]:
    """The reference runs: one process, LoRA dropout 0 (the bar) and 0.1."""
    outs = {}
    for dropout in (0.0, 0.1):
        out = tmp_path_factory.mktemp(f"one_{dropout}")
        run = _finetune(_flags(small_data, out, dropout))
        assert run.returncode == 0, run.stderr[-3000:]
        outs[dropout] = out
    return outs


# ---------------------------------------------------------------------------------------------
# the bar: two processes train the adapter of one


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_two_processes_train_the_adapter_of_one(dropout: float, small_data: Path, one_process: dict[float, Path],
                                                tmp_path: Path) -> None:
    out = tmp_path / "two"
    run = _finetune(_flags(small_data, out, dropout), n=2)
    assert run.returncode == 0, run.stderr[-3000:]
    one = one_process[dropout]
    # the same adapter, to the rounding of summing the micro-batch gradients in another order;
    # with dropout too: micro-batch i of a step draws the same mask whichever rank runs it
    assert _worst_relative(_adapter(one), _adapter(out)) < 1e-4
    ref, got = _log(one), _log(out)
    # the same records, each written once (only rank 0 writes log.jsonl)
    assert [(r["step"], sorted(r)) for r in got] == [(r["step"], sorted(r)) for r in ref]
    n_steps = max(r["step"] for r in ref)
    assert [r["step"] for r in got if "loss" in r] == list(range(1, n_steps + 1))
    for a, b in zip(ref, got):
        for key in ("loss", "eval_loss", "grad_norm", "train_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5), (key, a["step"])
    # only rank 0 prints: each step's record once, the closing lines once
    assert run.stdout.count("{'loss': ") == n_steps
    assert run.stdout.count("LoRA adapter saved in") == 1 and run.stdout.count("Parameters:") == 1
    assert "processes=2" in run.stdout and "2 micro-batches per process x 2 processes, MPI" in run.stdout
    assert "falcontune: error" not in run.stderr
    # rank 0 wrote the same files as the single process, checkpoints included
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in one.iterdir())


_API_SCRIPT = """
import json, sys
import falcontune as ft
from falcontune import dist
stops = []
result = ft.finetune("demo", sys.argv[1], lora_out_dir=sys.argv[2], epochs=1, batch_size=4, mbatch_size=1,
                     cutoff_len=64, val_set_size=6, warmup_steps=1, logging_steps=1, save_steps=3, lora_dropout=0.0,
                     backend="cpu", progress=False, callback=lambda info: stops.append(info["step"]))
rank = dist.current().rank
with open(f"{sys.argv[3]}/rank{rank}.json", "w") as f:
    json.dump([result.global_step, str(result.adapter_dir), len(stops)], f)
"""


def test_the_python_api_in_an_mpi_job(small_data: Path, one_process: dict[float, Path], tmp_path: Path) -> None:
    out = tmp_path / "api"
    run = subprocess.run([_mpiexec(), "-n", "2", sys.executable, "-c", _API_SCRIPT, str(small_data), str(out),
                          str(tmp_path)], capture_output=True, text=True, env=_env(), timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    n_steps = max(r["step"] for r in _log(one_process[0.0]))
    # every rank returns once rank 0 has written the adapter; the callback runs on rank 0 only
    assert results == [[n_steps, str(out), n_steps], [n_steps, str(out), 0]]
    assert _worst_relative(_adapter(one_process[0.0]), _adapter(out)) < 1e-4


def test_mpiexec_with_one_process_is_the_plain_run(small_data: Path, one_process: dict[float, Path],
                                                   tmp_path: Path) -> None:
    # a job of one process never imports mpi4py and trains exactly the same adapter, bit for bit
    out = tmp_path / "one"
    run = _finetune(_flags(small_data, out, 0.1), n=1)
    assert run.returncode == 0, run.stderr[-3000:]
    a, b = _adapter(one_process[0.1]), _adapter(out)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert [r.get("loss") for r in _log(out)] == [r.get("loss") for r in _log(one_process[0.1])]
    probe = subprocess.run([_mpiexec(), "-n", "1", sys.executable, "-c",
                            "import sys, falcontune.dist as d; w = d.current(); "
                            "print(w.size, 'mpi4py' in sys.modules)"], capture_output=True, text=True, env=_env(),
                           timeout=120)
    assert probe.stdout.split() == ["1", "False"], probe.stderr


def test_resume_with_another_number_of_processes(small_data: Path, one_process: dict[float, Path],
                                                 tmp_path: Path) -> None:
    # checkpoint-3 of the one-process run, continued by two processes: the steps do not depend on
    # the number of processes, so the final adapter is the one-process run's
    out = tmp_path / "resumed"
    out.mkdir()
    shutil.copytree(one_process[0.1] / "checkpoint-3", out / "checkpoint-3")
    run = _finetune(_flags(small_data, out, 0.1, resume_checkpoint="true"), n=2)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "written by a run of 1 process(es), resumed with 2" in run.stdout
    assert _worst_relative(_adapter(one_process[0.1]), _adapter(out)) < 1e-4
    assert [r["step"] for r in _log(out)] == [r["step"] for r in _log(one_process[0.1])]


# ---------------------------------------------------------------------------------------------
# errors and interruptions end the job once


@pytest.mark.parametrize("flags, message", [
    ({"batch_size": 2, "mbatch_size": 2}, "--batch_size=2 is the global batch: with 2 processes it must be a "
                                          "multiple of --mbatch_size=2 x 2 processes = 4"),
    ({"epochs": 0}, "--epochs=0: expected an integer >= 1"),  # refused before the job's World is made
])
def test_a_bad_setting_is_reported_once(flags: dict[str, int], message: str, small_data: Path,
                                        tmp_path: Path) -> None:
    run = _finetune(_flags(small_data, tmp_path / "o", **flags), n=2, timeout=120)
    assert run.returncode == 2, run.stderr[-2000:]
    errors = [line for line in run.stderr.splitlines() if "falcontune: error" in line]
    assert len(errors) == 1 and errors[0].startswith(f"falcontune: error: {message}"), run.stderr[-2000:]
    assert not (tmp_path / "o").exists()


_FAIL_ON_RANK_1 = """
import os, sys
import falcontune.dist as dist, falcontune.trainer as trainer
from falcontune import cli
dist.ERROR_GRACE_S = 1.0
if os.environ.get("PMI_RANK") == "1":
    step = trainer.Trainer._step
    def failing(self, group):
        if self.global_step == 2:
            raise RuntimeError("injected failure on rank 1")
        return step(self, group)
    trainer.Trainer._step = failing
sys.exit(cli.main(["finetune", *sys.argv[1:]]))
"""


def test_a_failing_rank_ends_the_job_with_one_message(small_data: Path, tmp_path: Path) -> None:
    t0 = time.monotonic()
    run = _finetune(_flags(small_data, tmp_path / "o"), n=2, timeout=120,
                    python=[sys.executable, "-c", _FAIL_ON_RANK_1])
    assert run.returncode == 1, run.stderr[-2000:]
    errors = [line for line in run.stderr.splitlines() if "falcontune: error" in line]
    assert errors == ["falcontune: error (rank 1 of 2): injected failure on rank 1 "
                      "(run with --verbose for the traceback)"], run.stderr[-2000:]
    assert time.monotonic() - t0 < 100  # rank 0, waiting in a collective, was ended too
    # nothing half-written: checkpoints are complete directories (atomic), no step 3 record
    assert all(not p.name.startswith(".") for p in (tmp_path / "o").iterdir())
    assert max(r["step"] for r in _log(tmp_path / "o")) == 2


def test_ctrl_c_stops_every_rank_at_the_same_step(small_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    flags = _flags(small_data, out, 0.1, epochs=30, save_steps=1000)
    proc = subprocess.Popen([_mpiexec(), "-n", "2", sys.executable, "-m", "falcontune", "finetune", *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        deadline = time.monotonic() + 200
        while not ((out / "log.jsonl").is_file() and (out / "log.jsonl").read_text().count("\n") >= 2):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)  # mpiexec hands it to every rank, as a terminal's Ctrl-C
        stdout, stderr = proc.communicate(timeout=200)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr[-2000:]
    assert stdout.count("training stopped at step") == 1, stdout[-2000:]
    (ckpt,) = [p for p in out.iterdir() if p.name.startswith("checkpoint-")]
    step = int(ckpt.name.split("-")[1])
    assert 0 < step < 30 * 6
    state = json.loads((ckpt / STATE_FILE).read_text())
    assert state["world_size"] == 2 and state["global_step"] == step


# ---------------------------------------------------------------------------------------------
# the pieces, in one process


def test_launcher_detection_reads_the_environment_only() -> None:
    assert dist.launcher_size({}) == (1, None)
    assert dist.launcher_size({"PMI_SIZE": "1", "PMI_RANK": "0"}) == (1, None)  # mpiexec -n 1
    assert dist.launcher_size({"PMI_SIZE": "4"}) == (4, "PMI_SIZE")
    assert dist.launcher_size({"OMPI_COMM_WORLD_SIZE": "2"}) == (2, "OMPI_COMM_WORLD_SIZE")
    assert dist.launcher_size({"SLURM_STEP_NUM_TASKS": "8", "SLURM_PROCID": "3"}) == (8, "SLURM_STEP_NUM_TASKS")
    # a Slurm batch script (not srun) sees SLURM_NTASKS but is one process
    assert dist.launcher_size({"SLURM_NTASKS": "8", "SLURM_PROCID": "0"}) == (1, None)
    assert dist.current().size == 1  # this pytest process
    # the CPU engines of several processes on one machine share its cores
    assert dist.cpu_threads_per_process({"PMI_SIZE": "2", "MPI_LOCALNRANKS": "2"}, cores=16) == 8
    assert dist.cpu_threads_per_process({"SLURM_STEP_NUM_TASKS": "8", "SLURM_STEP_TASKS_PER_NODE": "4(x2)"},
                                        cores=16) == 4
    assert dist.cpu_threads_per_process({"PMI_SIZE": "2", "MPI_LOCALNRANKS": "2", "OMP_NUM_THREADS": "3"}) is None
    assert dist.cpu_threads_per_process({"PMI_SIZE": "4", "MPI_LOCALNRANKS": "1"}, cores=16) is None
    assert dist.cpu_threads_per_process({"MPI_LOCALNRANKS": "2"}, cores=16) is None


class _Node(dist.World):
    """A rank of a fake machine: what node_allgather returns is given."""

    def __init__(self, local_rank: int, local_size: int, seen: list[tuple[str, int]]) -> None:
        super().__init__()
        self.size, self.rank, self.local_rank, self.local_size, self.seen = local_size, local_rank, local_rank, \
            local_size, seen

    def node_allgather(self, obj: Any) -> list[Any]:
        return self.seen


def test_gpu_placement() -> None:
    four = [("", 4)] * 4
    assert [dist.gpu_index(_Node(r, 4, four), 4) for r in range(4)] == [0, 1, 2, 3]
    dist.check_gpu_placement(_Node(1, 4, four), 4)
    # srun --gpus-per-task: each rank sees one GPU, a different one
    own = [("0", 1), ("1", 1)]
    assert dist.gpu_index(_Node(1, 2, own), 1) == 0
    dist.check_gpu_placement(_Node(1, 2, own), 1)
    # two ranks on one GPU: refused, with what to do
    for shared in ([("", 1), ("", 1)], [("0", 1), ("0", 1)]):
        with pytest.raises(dist.DistributedError, match=r"2 processes run on .* 1 visible GPU\(s\): NCCL cannot share "
                                                        r"one GPU .*\(mpiexec -n 1\)"):
            dist.check_gpu_placement(_Node(0, 2, shared), 1)
    with pytest.raises(dist.DistributedError, match="local rank 2 has no GPU of its own"):
        dist.gpu_index(_Node(2, 3, [("", 2)] * 3), 2)


def test_torchrun_launch_points_to_mpiexec(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"multi-GPU training is launched with MPI.*WORLD_SIZE=2.*mpiexec -n N"):
        check_world_size(0)
    monkeypatch.delenv("WORLD_SIZE")
    check_world_size(0)
    with pytest.raises(ParameterError, match="local rank comes from MPI"):
        check_world_size(1, _Node(0, 2, []))


def _model_with_gradients(tmp_path: Path, device: str, targets: list[str]) -> Any:
    """A tiny model whose LoRA gradients hold one random batch's."""
    model = ft.load_model(testing.make_checkpoint(tmp_path / "m", preset="tiny", vocab_size=64), device=device)
    model.add_lora(r=3, alpha=6, target_modules=targets)
    ids = np.random.default_rng(0).integers(0, 64, size=(2, 9))
    model.train()
    model.zero_grad()
    model.forward_backward(ids, ids)
    return model


def test_flat_gradient_is_every_module_gradient(tmp_path: Path) -> None:
    model = _model_with_gradients(tmp_path, "cpu", ["query_key_value", "dense_4h_to_h"])
    rng = np.random.default_rng(1)
    eng = model.engine
    flat = eng.lora_grad_flat()
    pieces = []
    for layer in range(model.config.num_hidden_layers):
        for mod in (0, 3):  # query_key_value, dense_4h_to_h, in the module table's order
            A, B = eng.lora_read(1, layer, mod)
            pieces += [A.ravel(), B.ravel()]
    assert flat.dtype == np.float32 and np.array_equal(flat, np.concatenate(pieces)) and np.abs(flat).max() > 0
    # written back whole: the per-module view sees it, and AdamW steps from it
    new = rng.standard_normal(flat.size).astype(np.float32)
    eng.set_lora_grad_flat(new)
    A, B = eng.lora_read(1, 1, 3)
    n_a = A.size + B.size
    offset = sum(p.size for p in pieces[:6])  # layer 1's dense_4h_to_h: after 3 modules' A and B
    assert np.array_equal(np.concatenate([A.ravel(), B.ravel()]), new[offset:offset + n_a])
    assert eng.grad_norm() == pytest.approx(float(np.linalg.norm(new.astype(np.float64))), rel=1e-6)
    with pytest.raises(ValueError, match=rf"flat LoRA gradient: expected shape \({flat.size},\)"):
        eng.set_lora_grad_flat(new[:-1])
    with pytest.raises(TypeError, match="flat LoRA gradient: expected a float array"):
        eng.set_lora_grad_flat(np.zeros(flat.size, dtype=np.int32))
    with pytest.raises(NotImplementedError, match="NCCL runs on CUDA models; this model is on cpu"):
        eng.dist_init("libnccl.so.2", bytes(128), 0, 1)
    with pytest.raises(ValueError, match="unique_id: expected 128 bytes"):
        eng.dist_init("libnccl.so.2", b"x", 0, 1)
    with pytest.raises(RuntimeError, match="the model is in no NCCL group"):
        eng.dist_allreduce_grad()
    model.remove_lora()
    with pytest.raises(RuntimeError, match="no LoRA adapter"):
        eng.lora_grad_flat()


def test_nccl_loading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(NotImplementedError, match=r"cannot load NCCL from /nonexistent/libnccl.so.2: .*No such file"):
        _C.dist_unique_id("/nonexistent/libnccl.so.2")
    # a real library without NCCL's entry points
    libm = next((str(p) for p in (Path("/lib/x86_64-linux-gnu/libm.so.6"), Path("/usr/lib64/libm.so.6"))
                 if p.is_file()), None)
    if libm:
        with pytest.raises(NotImplementedError, match="has no ncclGetVersion: it is not a usable NCCL 2 library"):
            _C.dist_unique_id(libm)
    monkeypatch.setenv(dist.NCCL_ENV, str(tmp_path / "absent.so"))
    with pytest.raises(dist.DistributedError, match="FALCONTUNE_NCCL=.*absent.so: no such file"):
        dist.find_nccl()
    monkeypatch.delenv(dist.NCCL_ENV)
    # a wheel of the nvidia namespace that keeps it in another folder (CUDA 13 style) is found too
    with monkeypatch.context() as m:
        wheel_lib = tmp_path / "site" / "nvidia" / "cu13" / "lib"
        wheel_lib.mkdir(parents=True)
        (wheel_lib / "libnccl.so.2").write_bytes(b"")
        m.syspath_prepend(str(tmp_path / "site"))
        assert dist.find_nccl() == str(wheel_lib / "libnccl.so.2")
    try:
        lib = dist.find_nccl()
    except dist.DistributedError as e:  # the message says what to install
        assert "pip install nvidia-nccl-cu12" in str(e)
        return
    # a real NCCL (the nvidia-nccl-cu12 wheel): the id is made without a GPU
    uid, version = _C.dist_unique_id(lib)
    assert isinstance(uid, bytes) and len(uid) == 128 and version >= 20400  # 2.32.3 is 23203
    assert _C.dist_unique_id(lib)[0] != uid


_FAKE_NCCL = r"""
#include <string.h>
typedef struct { char internal[128]; } uid;
int ncclGetVersion(int *v) { *v = VERSION; return 0; }
int ncclGetUniqueId(uid *id) { if (FAIL) return 2; memset(id->internal, 7, sizeof id->internal); return 0; }
int ncclCommInitRank(void **c, int n, uid id, int r) { (void)n; (void)id; (void)r; *c = 0; return 0; }
int ncclAllReduce(const void *s, void *d, unsigned long n, int t, int o, void *c, void *st) { return 0; }
int ncclCommDestroy(void *c) { return 0; }
int ncclCommAbort(void *c) { return 0; }
int ncclCommGetAsyncError(void *c, int *e) { *e = 0; return 0; }
const char *ncclGetErrorString(int r) { return r == 2 ? "unhandled system error" : "?"; }
const char *ncclGetLastError(void *c) { return "no network interface found"; }
"""


def test_nccl_versions_and_errors_through_a_fake_library(tmp_path: Path) -> None:
    # a library with NCCL's entry points, built here: what dist.c makes of versions and failures
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    (tmp_path / "fake.c").write_text(_FAKE_NCCL)

    def fake(version: int, fail: int) -> str:
        lib = tmp_path / f"libfake_{version}_{fail}.so"
        subprocess.run([cc, "-shared", "-fPIC", f"-DVERSION={version}", f"-DFAIL={fail}", "-o", str(lib),
                        str(tmp_path / "fake.c")], check=True, capture_output=True)
        return str(lib)

    uid, version = _C.dist_unique_id(fake(23203, 0))
    assert uid == bytes([7]) * 128 and version == 23203
    assert _C.dist_unique_id(fake(2804, 0))[1] == 2804  # 2.8.4: the version code before 2.9 had X*1000
    with pytest.raises(NotImplementedError, match=r"is NCCL 2\.3\.8; falcontune needs NCCL 2\.4 or newer"):
        _C.dist_unique_id(fake(2308, 0))
    with pytest.raises(_C.DeviceError, match=r"^ncclGetUniqueId: NCCL 2\.32\.3 error 2 \(unhandled system error\): "
                                             r"no network interface found$"):
        _C.dist_unique_id(fake(23203, 1))


def test_a_rank_other_than_0_writes_and_prints_nothing(small_data: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    class Rank1(dist.World):
        """Rank 1 of 2 whose collectives see only itself (enough to watch what it writes)."""

        def __init__(self) -> None:
            super().__init__()
            self.rank, self.size, self.local_rank, self.local_size = 1, 2, 1, 2

    monkeypatch.setattr(dist, "current", Rank1)
    out = tmp_path / "o"
    result = ft.finetune("demo", small_data, lora_out_dir=out, epochs=1, batch_size=4, mbatch_size=1,
                         cutoff_len=64, val_set_size=6, save_steps=2, backend="cpu", progress=False)
    assert not out.exists()
    assert capsys.readouterr().out == ""
    assert result.global_step == 6 and result.checkpoint_dir == out / "checkpoint-6"


# ---------------------------------------------------------------------------------------------
# GPU (run by the coordinator on the GPU machine)


def _nccl_or_skip() -> str:
    try:
        return dist.find_nccl()
    except dist.DistributedError as e:
        pytest.skip(str(e))


@pytest.mark.cuda
def test_nccl_world_of_one_on_a_gpu(tmp_path: Path) -> None:
    lib = _nccl_or_skip()
    model = _model_with_gradients(tmp_path, "cuda:0", ["query_key_value"])
    rng = np.random.default_rng(1)
    eng = model.engine
    grad = eng.lora_grad_flat()
    assert np.abs(grad).max() > 0
    uid, version = _C.dist_unique_id(lib)
    eng.dist_init(lib, uid, 0, 1)
    getenv = ctypes.CDLL(None).getenv
    getenv.restype = ctypes.c_char_p
    assert getenv(b"NCCL_NVLS_ENABLE") == os.environ.get("NCCL_NVLS_ENABLE", "0").encode()
    eng.dist_allreduce_grad()  # the sum over one rank
    assert np.array_equal(eng.lora_grad_flat(), grad)
    new = rng.standard_normal(grad.size).astype(np.float32)
    eng.set_lora_grad_flat(new)
    for _ in range(3):
        eng.dist_allreduce_grad()
    assert np.array_equal(eng.lora_grad_flat(), new)
    with pytest.raises(RuntimeError, match="already belongs to a group"):
        eng.dist_init(lib, uid, 0, 1)
    eng.dist_close()
    with pytest.raises(RuntimeError, match="the model is in no NCCL group"):
        eng.dist_allreduce_grad()
    eng.dist_init(lib, _C.dist_unique_id(lib)[0], 0, 1)  # a new group; closing the model leaves it
    model.engine.close()


@pytest.mark.cuda
def test_two_processes_on_one_gpu_are_refused(small_data: Path, tmp_path: Path) -> None:
    if _C.cuda_device_count() != 1:
        pytest.skip("needs a machine with exactly one visible GPU")
    run = _finetune(_flags(small_data, tmp_path / "o", backend="cuda"), n=2, timeout=200)
    assert run.returncode == 2, run.stderr[-2000:]
    errors = [line for line in run.stderr.splitlines() if "falcontune: error" in line]
    assert len(errors) == 1 and "NCCL cannot share one GPU between processes" in errors[0], run.stderr[-2000:]


@pytest.mark.cuda
def test_two_gpus_train_the_adapter_of_one(small_data: Path, tmp_path: Path) -> None:
    if _C.cuda_device_count() < 2:
        pytest.skip("needs two GPUs")
    _nccl_or_skip()
    one, two = tmp_path / "one", tmp_path / "two"
    assert _finetune(_flags(small_data, one, backend="cuda")).returncode == 0
    run = _finetune(_flags(small_data, two, backend="cuda"), n=2)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "NCCL" in run.stdout
    # bf16 activations: the gradient sums differ by rounding, amplified by a few AdamW steps
    assert _worst_relative(_adapter(one), _adapter(two)) < 2e-2
    assert [r["step"] for r in _log(one)] == [r["step"] for r in _log(two)]


def test_scaling_benchmark_runs_and_agrees(tmp_path: Path) -> None:
    # bench/dist_bench.py as the GPU machine runs it, on the CPU with the tiny model: N = 1, then 2
    bench = [sys.executable, str(REPO / "bench" / "dist_bench.py"), "--tiny", "--device", "cpu", "--ckpt",
             str(tmp_path / "ckpt"), "--out", str(tmp_path / "out"), "--mb", "2", "--seq", "16", "--micro", "4",
             "--steps", "2", "--warmup", "1"]
    for n in (1, 2):
        run = subprocess.run([_mpiexec(), "-n", str(n), *bench], capture_output=True, text=True, env=_env(),
                             timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
    (res,) = [json.loads(p.read_text()) for p in (tmp_path / "out").glob("dist_cpu_*_n2.json")]
    assert res["processes"] == 2 and res["collective"] == "mpi" and res["tok_s"] > 0 and res["efficiency"] > 0
    assert res["weights_max_rel_diff_vs_n1"] < 1e-5
