"""Data parallel training: one process per GPU (or several CPU processes), launched by MPI.

``mpiexec -n N falcontune finetune ...`` (or ``srun``) starts N copies of the same command. Each
finds its place here: ``current()`` is the job's ``World`` (rank, size, local rank), made once per
process. Whether the process was started by an MPI launcher is read from the launcher's
environment variables first, so a plain run never imports mpi4py; under a launcher of more than
one process, mpi4py (``pip install 'falcontune[mpi]'``) gives the real world.

Collectives: the LoRA gradients are summed by ``GradientSum`` (NCCL on CUDA, loaded from the
``nvidia-nccl-cu12`` / ``-cu13`` wheel or the system; MPI_Allreduce on the CPU); the few host
numbers of a step (losses, token counts, the stop decision) go through MPI. A failing rank ends
the whole job with one message (``end_job``: MPI_Abort after printing).
"""
from __future__ import annotations

import ctypes.util
import importlib.util
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, NoReturn, Optional

import numpy as np

#: environment variables in which launchers give the number of processes they started: Open MPI,
#: MPICH / Intel MPI (hydra), MVAPICH, and Slurm's srun (SLURM_STEP_NUM_TASKS is set for a step
#: that srun launched, unlike SLURM_NTASKS, which a batch script sees too)
LAUNCHER_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE", "SLURM_STEP_NUM_TASKS")
#: a rank other than 0 that fails waits this long before printing: when rank 0 fails the same way
#: (most errors are the same on every rank), its message and MPI_Abort come first, and only one
#: message is printed
ERROR_GRACE_S = 10.0
#: seconds between printing the message that ends a job and MPI_Abort (see World.abort)
ABORT_DRAIN_S = 1.0
NCCL_ENV = "FALCONTUNE_NCCL"
DOC = "docs/MULTI_GPU.md"


class DistributedError(ValueError):
    """The job's processes cannot work together as launched (a user error: exit status 2)."""


def launcher_size(env: Optional[dict[str, str]] = None) -> tuple[int, Optional[str]]:
    """(processes the launcher started, the variable that says so); (1, None) outside a launcher."""
    env = os.environ if env is None else env
    for var in LAUNCHER_SIZE_VARS:
        value = env.get(var, "").strip()
        if value.isdigit() and int(value) > 1:
            return int(value), var
    return 1, None


#: processes on this machine, as the launchers say: MPICH (hydra), Open MPI, Slurm's srun
LAUNCHER_LOCAL_SIZE_VARS = ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "SLURM_STEP_TASKS_PER_NODE")


def cpu_threads_per_process(env: Optional[dict[str, str]] = None, cores: Optional[int] = None) -> Optional[int]:
    """OpenMP threads for each process of a launcher that put several on this machine (the cores
    shared out), or None: not launched so, or OMP_NUM_THREADS already chosen. Read before the
    engine loads (falcontune/__init__.py), since OpenMP reads its settings once."""
    env = os.environ if env is None else env
    if launcher_size(env)[0] == 1 or env.get("OMP_NUM_THREADS", "").strip():
        return None
    for var in LAUNCHER_LOCAL_SIZE_VARS:
        value = env.get(var, "").strip().split("(")[0].split(",")[0]  # Slurm: "4(x2),2"
        if value.isdigit() and int(value) > 1:
            return max(1, (cores or os.cpu_count() or 1) // int(value))
    return None


class World:
    """This process's place in the job, and the collectives over it. ``World()`` is a job of one
    process: every collective returns its input."""

    def __init__(self, comm: Any = None, node_comm: Any = None) -> None:
        self.comm, self.node_comm = comm, node_comm
        self.rank = comm.Get_rank() if comm is not None else 0
        self.size = comm.Get_size() if comm is not None else 1
        self.local_rank = node_comm.Get_rank() if node_comm is not None else 0
        self.local_size = node_comm.Get_size() if node_comm is not None else 1

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def __repr__(self) -> str:
        return f"World(rank={self.rank}, size={self.size}, local_rank={self.local_rank}, local_size={self.local_size})"

    # -- collectives (every rank must call them, in the same order) -----------------------------
    def sum_(self, values: np.ndarray) -> np.ndarray:
        """Sum a contiguous float32 / float64 array over the ranks, in place; returns it."""
        if self.comm is not None:
            from mpi4py import MPI

            self.comm.Allreduce(MPI.IN_PLACE, values, op=MPI.SUM)
        return values

    def any(self, flag: bool) -> bool:
        """True on every rank when flag is true on one."""
        if self.comm is None:
            return bool(flag)
        from mpi4py import MPI

        return bool(self.comm.allreduce(int(bool(flag)), op=MPI.MAX))

    def bcast(self, obj: Any) -> Any:
        """Rank 0's obj, on every rank."""
        return obj if self.comm is None else self.comm.bcast(obj, root=0)

    def node_allgather(self, obj: Any) -> list[Any]:
        """obj of every rank of this machine, by local rank."""
        return [obj] if self.node_comm is None else self.node_comm.allgather(obj)

    def barrier(self) -> None:
        if self.comm is not None:
            self.comm.Barrier()

    def abort(self, code: int) -> NoReturn:
        """End every process of the job now (MPI_Abort); a job of one process just exits."""
        sys.stdout.flush()
        sys.stderr.flush()
        if self.comm is not None:
            # the launcher forwards our output through pipes and stops reading them when told to
            # abort: give it a moment to pass on the message just printed
            time.sleep(ABORT_DRAIN_S)
            self.comm.Abort(code)
        raise SystemExit(code)


_current: Optional[World] = None


def current() -> World:
    """The job's World, made on the first call (mpi4py is imported only under a launcher of more
    than one process)."""
    global _current
    if _current is None:
        _current = _make_world()
    return _current


def active_world() -> Optional[World]:
    """For error paths: the job's World when this process is one of several (made now if an
    error came before anything else needed it), else None. Never raises."""
    if _current is None and launcher_size()[0] > 1:
        try:
            current()
        except DistributedError:
            return None  # no usable MPI: each process reports for itself
    return _current if _current is not None and _current.size > 1 else None


def _make_world() -> World:
    size, var = launcher_size()
    if size == 1:
        return World()
    if importlib.util.find_spec("mpi4py") is None:
        raise DistributedError(f"this process is one of {size} started by an MPI launcher ({var}={size}), but mpi4py "
                               "is not installed: pip install 'falcontune[mpi]' (mpi4py and an MPI library), "
                               f"see {DOC}")
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    if comm.Get_size() != size:
        raise DistributedError(
            f"the launcher started {size} processes ({var}={size}) but MPI sees a job of {comm.Get_size()}: the "
            "mpiexec / srun used does not belong to the MPI library mpi4py loaded (with pip's mpich wheel, use its "
            f"mpiexec; with srun, pass --mpi=pmi2 or pmix), see {DOC}")
    return World(comm, comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank()))


def end_job(world: World, text: str, code: int) -> NoReturn:
    """After an error on this rank of a job of several processes: print one message, then end
    every process (a rank blocked in a collective would otherwise wait forever)."""
    if not world.is_root:
        time.sleep(ERROR_GRACE_S)  # rank 0 failing the same way speaks for the job
    # another rank's progress bar may hold the terminal's line: start a new one
    who = "" if world.is_root else f" (rank {world.rank} of {world.size})"
    print(f"{'' if world.is_root else chr(10)}falcontune: error{who}: {text}", file=sys.stderr, flush=True)
    world.abort(code)


# ---------------------------------------------------------------------------------------------
# GPUs


def gpu_index(world: World, visible: int) -> int:
    """The CUDA device of this rank: its local rank, or 0 when each rank sees one GPU of its own
    (srun --gpus-per-task; check_gpu_placement verifies that the GPUs differ)."""
    if world.local_rank < visible:
        return world.local_rank
    if visible == 1:
        return 0
    raise DistributedError(f"local rank {world.local_rank} has no GPU of its own: {world.local_size} processes run "
                           f"on {socket.gethostname()}, which has {visible} visible GPU(s); launch one process per "
                           "GPU")


def check_gpu_placement(world: World, visible: int) -> None:
    """Every rank of a machine must have its own GPU (NCCL cannot run two ranks on one GPU).
    A collective over the machine's ranks: the same answer on each of them."""
    seen = world.node_allgather((os.environ.get("CUDA_VISIBLE_DEVICES", ""), visible))
    if world.local_size <= min(v for _, v in seen):
        return
    masks = [m.strip() for m, _ in seen]
    if all(v == 1 for _, v in seen) and all(masks) and len(set(masks)) == len(masks):
        return  # one GPU per rank, each a different one (the launcher set CUDA_VISIBLE_DEVICES per rank)
    gpus = min(v for _, v in seen)
    raise DistributedError(
        f"{world.local_size} processes run on {socket.gethostname()}, which has {gpus} visible GPU(s): NCCL cannot "
        f"share one GPU between processes; launch at most {gpus} process(es) per machine (mpiexec -n {gpus}), or "
        "train on the CPU with --backend=cpu")


def find_nccl() -> str:
    """The NCCL library to load: $FALCONTUNE_NCCL, else one of NVIDIA's wheels (nvidia-nccl-cu12:
    nvidia/nccl/lib/libnccl.so.2; the CUDA 13 wheels may use another folder under nvidia/), else
    the system's libnccl.so.2."""
    path = os.environ.get(NCCL_ENV, "").strip()
    if path:
        if not Path(path).is_file():
            raise DistributedError(f"{NCCL_ENV}={path}: no such file")
        return path
    try:
        spec = importlib.util.find_spec("nvidia")
    except (ImportError, ValueError):
        spec = None
    roots = [Path(r) for r in (spec.submodule_search_locations or [])] if spec is not None else []
    for root in roots:
        found = sorted(root.glob("nccl/lib/libnccl.so.2")) + sorted(root.glob("*/lib/libnccl.so.2"))
        if found:
            return str(found[0])
    if ctypes.util.find_library("nccl"):
        return "libnccl.so.2"
    raise DistributedError(f"NCCL was not found: training on several GPUs needs it. pip install nvidia-nccl-cu12 "
                           f"(CUDA 12; nvidia-nccl-cu13 for CUDA 13), or set {NCCL_ENV}=/path/to/libnccl.so.2")


class GradientSum:
    """Sums the model's LoRA gradients over the ranks, in place: NCCL on a CUDA model (the group is
    made here: rank 0's id is broadcast over MPI), MPI_Allreduce of the flat gradient on the CPU."""

    def __init__(self, world: World, engine: Any) -> None:
        self.world, self.engine = world, engine
        self.nccl = world.size > 1 and str(engine.device).startswith("cuda")
        if not self.nccl:
            return
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # never NVLink multicast (the engine sets it too)
        try:
            lib, problem = find_nccl(), ""
        except DistributedError as e:
            lib, problem = "", str(e)
        if world.any(bool(problem)):  # the same answer everywhere, before any rank waits in NCCL
            raise DistributedError(problem or "NCCL was not found on another rank (see its message)")
        from . import _C

        uid = world.bcast(_C.dist_unique_id(lib)[0] if world.is_root else None)
        engine.dist_init(lib, uid, world.rank, world.size)

    def __call__(self) -> None:
        if self.world.size == 1:
            return
        if self.nccl:
            self.engine.dist_allreduce_grad()
            return
        grad = self.engine.lora_grad_flat()
        self.engine.set_lora_grad_flat(self.world.sum_(grad))

    def close(self) -> None:
        if self.nccl:
            self.engine.dist_close()
