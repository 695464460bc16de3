"""Training curves as a PNG: ``falcontune plot LORA_OUT_DIR`` and the training_curves.png that
training leaves next to log.jsonl.

matplotlib is optional: without it ``write_training_plot`` raises ``PlotError`` saying how to
install it (training then simply skips the picture). Only ``matplotlib.figure.Figure`` is used,
never pyplot, so no GUI backend is touched (it works over SSH, in CI and in notebooks).
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any, Optional, Union

from .weights import atomic_write

PathLike = Union[str, "os.PathLike[str]"]
LOG_NAME = "log.jsonl"
PLOT_NAME = "training_curves.png"


class PlotError(ValueError):
    """No picture can be drawn: matplotlib is missing, or the log holds no training record."""


def read_log(path: PathLike) -> list[dict[str, Any]]:
    """The records of ``log.jsonl`` (``path`` is the file or the directory holding it)."""
    p = Path(path)
    log = p / LOG_NAME if p.is_dir() else p
    if not log.is_file():
        raise FileNotFoundError(f"{log}: no training log here (expected the --lora_out_dir of a finetune run)")
    records = []
    for number, line in enumerate(log.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{log}: line {number} is not valid JSON ({e.msg})") from None
    return records


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    rows = [(int(r["step"]), float(r[key])) for r in records if key in r and "step" in r]
    return [s for s, _ in rows], [v for _, v in rows]


def render_training_plot(records: list[dict[str, Any]], title: str = "") -> bytes:
    """PNG bytes: training and evaluation loss (left), learning rate (right), against the step."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotError("drawing the training curves needs matplotlib: pip install matplotlib") from None
    steps, loss = _series(records, "loss")
    eval_steps, eval_loss = _series(records, "eval_loss")
    lr_steps, lr = _series(records, "learning_rate")
    if not steps and not eval_steps:
        raise PlotError("the log holds no loss yet (nothing was logged: lower --logging_steps)")
    fig = Figure(figsize=(11, 3.8))
    ax_loss, ax_lr = fig.subplots(1, 2)
    if steps:
        ax_loss.plot(steps, loss, ".-", color="tab:blue", label="loss (train)")
    if eval_steps:
        ax_loss.plot(eval_steps, eval_loss, "o-", color="tab:orange", label="eval_loss (validation)")
    ax_loss.set_xlabel("step")
    ax_loss.set_title("loss")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    ax_lr.plot(lr_steps, lr, ".-", color="tab:green")
    ax_lr.set_xlabel("step")
    ax_lr.set_title("learning rate")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    ax_lr.grid(alpha=0.3)
    summary = []
    if loss:
        summary.append(f"loss {loss[0]:.4f} -> {loss[-1]:.4f} (step {steps[-1]})")
    if eval_loss:
        summary.append(f"eval_loss {eval_loss[-1]:.4f} (step {eval_steps[-1]})")
    fig.suptitle("  |  ".join([t for t in (title, *summary) if t]), family="monospace", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return buf.getvalue()


def write_training_plot(lora_out_dir: PathLike, output: Optional[PathLike] = None) -> Path:
    """Draw ``lora_out_dir/log.jsonl`` into ``output`` (default ``lora_out_dir/training_curves.png``)."""
    d = Path(lora_out_dir)
    records = read_log(d)
    out = Path(output) if output is not None else (d if d.is_dir() else d.parent) / PLOT_NAME
    png = render_training_plot(records, title=(d if d.is_dir() else d.parent).name)
    with atomic_write(out) as f:
        f.write(png)
    return out
