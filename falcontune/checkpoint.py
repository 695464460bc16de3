"""Training checkpoints: ``<lora_out_dir>/checkpoint-<step>/``.

A checkpoint holds everything an exact resume needs:

    adapter_config.json, adapter_model.safetensors   the LoRA adapter (PEFT format: a checkpoint
                                                      is also a valid --lora_apply_dir)
    optimizer.safetensors                             AdamW moments, keys "exp_avg.<PEFT key>" and
                                                      "exp_avg_sq.<PEFT key>" (float32)
    optimizer.json                                    AdamW step count and hyper-parameters, the
                                                      fp16 loss-scaler state
    trainer_state.json                                global step, epoch, position in the epoch,
                                                      the engine's dropout RNG (seed, counter), the
                                                      data-order seed, the logging window, the
                                                      history and the run's settings

It is written into a hidden temporary directory that is renamed to ``checkpoint-<step>`` once
complete, so a killed run never leaves a half-written directory that looks like a checkpoint.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import numpy as np

from .weights import WeightStore, atomic_write, save_safetensors

PathLike = Union[str, "os.PathLike[str]"]
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"
OPTIM_FILE = "optimizer.json"
MOMENTS_FILE = "optimizer.safetensors"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be resumed from."""


@dataclass
class Checkpoint:
    """A checkpoint read back from disk (the adapter itself is loaded with model.load_lora)."""

    path: Path
    step: int
    state: dict[str, Any]
    optimizer: dict[str, Any]
    moments: dict[str, dict[str, np.ndarray]]


def write_json(path: Path, obj: Any) -> None:
    """Atomically write pretty JSON."""
    with atomic_write(path) as f:
        f.write((json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


def _hidden_tmp(parent: Path, name: str, tag: str) -> Path:
    return parent / f".{name}.{tag}-{os.getpid()}-{secrets.token_hex(4)}"


def replace_dir(tmp: Path, final: Path) -> None:
    """Rename the finished directory ``tmp`` to ``final``, replacing an existing one (moved aside
    first, then deleted, so ``final`` is always either the old or the new complete directory)."""
    old: Optional[Path] = None
    if final.exists():
        old = _hidden_tmp(final.parent, final.name, "old")
        os.rename(final, old)
    os.rename(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_dir(path: Path) -> None:
    """Delete a directory; it stops looking like a checkpoint at once (renamed before removal)."""
    doomed = _hidden_tmp(path.parent, path.name, "del")
    os.rename(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


_LEFTOVER = re.compile(r"^\.(checkpoint-\d+)\.(tmp|del|old)-(\d+)-[0-9a-f]+$")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_leftovers(out_dir: Path) -> None:
    """Remove what a killed run left behind: half-written (tmp) and half-deleted (del) checkpoint
    directories. A moved-aside complete checkpoint (old) whose replacement never landed is put back."""
    if not out_dir.is_dir():
        return
    for entry in out_dir.iterdir():
        m = _LEFTOVER.match(entry.name)
        if not m or int(m.group(3)) == os.getpid() or _pid_alive(int(m.group(3))):
            continue
        final = out_dir / m.group(1)
        if m.group(2) == "old" and not final.exists():
            os.rename(entry, final)
        else:
            shutil.rmtree(entry, ignore_errors=True)


def save_checkpoint(out_dir: PathLike, step: int, model: Any, optimizer: Mapping[str, Any],
                    moments: Mapping[str, Mapping[str, np.ndarray]], state: Mapping[str, Any]) -> Path:
    """Write ``out_dir/checkpoint-<step>`` atomically and return its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clean_leftovers(out)
    final = out / f"checkpoint-{step}"
    tmp = _hidden_tmp(out, final.name, "tmp")
    tmp.mkdir()
    try:
        model.save_lora(tmp)
        flat = {f"{kind}.{key}": np.ascontiguousarray(arr, dtype=np.float32)
                for kind, group in moments.items() for key, arr in group.items()}
        save_safetensors(tmp / MOMENTS_FILE, flat, metadata={"format": "falcontune-adamw"})
        write_json(tmp / OPTIM_FILE, dict(optimizer))
        write_json(tmp / STATE_FILE, {"format_version": FORMAT_VERSION, **state})
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path.parent}: not a complete falcontune checkpoint (missing {path.name})")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return obj


def load_checkpoint(path: PathLike) -> Checkpoint:
    """Read a checkpoint's optimizer and trainer state (checks that every file is there)."""
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"checkpoint not found: {p}")
    state = _read_json(p / STATE_FILE)
    optim = _read_json(p / OPTIM_FILE)
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{p / STATE_FILE}: format_version {state.get('format_version')!r}, "
                              f"this falcontune reads {FORMAT_VERSION}")
    for name in ("adapter_config.json", "adapter_model.safetensors", MOMENTS_FILE):
        if not (p / name).is_file():
            raise CheckpointError(f"{p}: not a complete falcontune checkpoint (missing {name})")
    moments: dict[str, dict[str, np.ndarray]] = {"exp_avg": {}, "exp_avg_sq": {}}
    with WeightStore.open(p / MOMENTS_FILE) as store:
        for name in store.names():
            kind, _, key = name.partition(".")
            if kind not in moments or store.dtype(name) != "F32":
                raise CheckpointError(f"{p / MOMENTS_FILE}: unexpected tensor {name} ({store.dtype(name)})")
            moments[kind][key] = np.array(store.tensor(name), dtype=np.float32)
    step = state.get("global_step")
    if not isinstance(step, int) or step < 0:
        raise CheckpointError(f"{p / STATE_FILE}: bad global_step {step!r}")
    return Checkpoint(path=p, step=step, state=state, optimizer=optim, moments=moments)


def list_checkpoints(out_dir: PathLike) -> list[tuple[int, Path]]:
    """(step, path) of the complete-looking checkpoint directories, oldest first."""
    d = Path(out_dir)
    if not d.is_dir():
        return []
    found = []
    for child in d.iterdir():
        m = CHECKPOINT_RE.match(child.name)
        if m and child.is_dir():
            found.append((int(m.group(1)), child))
    return sorted(found)


def latest_checkpoint(out_dir: PathLike) -> Optional[Path]:
    found = list_checkpoints(out_dir)
    return found[-1][1] if found else None


def _run_id(path: Path) -> Optional[str]:
    try:
        return json.loads((path / STATE_FILE).read_text(encoding="utf-8")).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None


def rotate_checkpoints(out_dir: PathLike, limit: Optional[int], run_id: str) -> list[Path]:
    """Keep the newest ``limit`` checkpoints of this run (``limit`` None or <= 0: keep all).
    Checkpoints of other runs in the same directory are never deleted. Returns the deleted paths."""
    if limit is None or limit <= 0:
        return []
    mine = [p for _, p in list_checkpoints(out_dir) if _run_id(p) == run_id]
    doomed = mine[:-limit]
    for p in doomed:
        remove_dir(p)
    return doomed


_LATEST = ("true", "latest", "yes", "1", "last")


def resolve_resume(value: Union[str, PathLike, bool, None], out_dir: PathLike) -> Optional[Path]:
    """--resume_checkpoint: a checkpoint directory, or true / "latest" for the newest checkpoint in
    lora_out_dir; None / false / "" / "0" / "no": do not resume."""
    if value is None or value is False:
        return None
    text = str(value) if not isinstance(value, bool) else "true"
    if text.strip().lower() in ("", "false", "no", "0", "none"):
        return None
    if text.strip().lower() in _LATEST and not Path(text).exists():
        latest = latest_checkpoint(out_dir)
        if latest is None:
            raise FileNotFoundError(f"--resume_checkpoint={text}: no checkpoint-N directory in {out_dir}")
        return latest
    p = Path(text)
    if not p.exists():
        raise FileNotFoundError(f"--resume_checkpoint: checkpoint not found: {p}")
    if not p.is_dir():
        raise CheckpointError(f"--resume_checkpoint: {p} is not a directory (give a checkpoint-N directory)")
    if not (p / STATE_FILE).is_file():
        latest = latest_checkpoint(p)  # the output directory itself: take its newest checkpoint
        if latest is not None:
            return latest
        raise CheckpointError(f"--resume_checkpoint: {p} is not a falcontune checkpoint "
                              f"(no {STATE_FILE}; expected a checkpoint-N directory)")
    return p
