"""Fine-tuning: ``ft.finetune(model, dataset, ...)`` and ``falcontune finetune``.

``FinetuneConfig`` (falcontune.settings, a frozen dataclass) is the one description of a run's
settings: finetune's signature and docstring (built here from its fields), the command's flags,
their validation, the printed "Parameters" block and the settings stored in checkpoints.

Semantics (parity with falcontune, i.e. HF Trainer, where not stated otherwise):

* AdamW (torch defaults, weight decay 0), max grad norm 1.0, linear warmup then linear decay to
  0 (HF ``get_linear_schedule_with_warmup``: optimizer step ``s`` (0-based) uses
  ``lr * lambda(s)``, so the very first step has lr 0 when warmup_steps > 0).
* gradient accumulation = batch_size / mbatch_size micro-batches per optimizer step; each
  micro-batch loss (mean over its label tokens) is scaled so the step gradient is the mean over
  the step's micro-batches. An epoch has ceil(micro-batches / accumulation) steps; its last step
  may average fewer micro-batches.
* micro-batches are grouped by length (``data.length_grouped_batches``), seeded by (seed, epoch).
* val split: ``data.train_val_split(n, val_set_size, seed)``; eval every ``eval_steps`` optimizer
  steps, falcontune's rule ``max(logging_steps, n_records // (10 * mbatch_size))`` by default,
  plus once at the end; eval loss is the mean over all validation label tokens.
* logging every ``logging_steps``: HF-style dicts (loss averaged over the window) plus grad_norm
  and tokens_per_second, printed (rounded) and appended to ``lora_out_dir/log.jsonl`` (full
  precision); the final record's rates (train_steps_per_second, ...) are those of this run alone
  (a resumed run counts its own steps and time). ``training_curves.png`` (falcontune.plot) is
  drawn next to the log when matplotlib is installed.
* a ``cutoff_len`` at which no example keeps a single answer token is an error.
* ``checkpoint-N`` every ``save_steps`` (see ``falcontune.checkpoint``), ``save_total_limit``
  rotation, exact resume (on CPU the final adapter equals an uninterrupted run's bit for bit).
* fp16 engines (CUDA on T4) use dynamic loss scaling: 2**16, halved on a non-finite gradient
  norm (the step is redone, not counted), doubled after 2000 good steps.
* several processes (``mpiexec -n N``, falcontune.dist): batch_size stays the global batch. Each
  step's micro-batches (the same seeded grouping) are dealt to the ranks round-robin, each rank
  scales its micro-batch gradients exactly as one process would, and the sums over the ranks
  (gradients, per-micro-batch losses, token counts) give every rank the single-process step.
  Micro-batch i of a step draws its dropout mask from counter base + i whichever rank runs it,
  so N processes train the adapter of one process (to float rounding of the gradient sum).
  Only rank 0 prints and writes files.
"""
from __future__ import annotations

import difflib
import hashlib
import inspect
import json
import math
import os
import secrets
import signal
import threading
import time
import warnings
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np

from . import checkpoint as ckpt
from . import dist
from .errors import NAME_ONLY, ParameterError, escape_braces
from .settings import FinetuneConfig
from .data import (DatasetWarning, TokenizedDataset, collate, length_grouped_batches, load_records,
                   tokenize_records, train_val_split)

PathLike = Union[str, "os.PathLike[str]"]
DIVERGENCE_LOSS = 1e4
DIVERGENCE_STREAK = 10
SCALE_INIT, SCALE_GROWTH_INTERVAL = 2.0 ** 16, 2000
MAX_GRAD_NORM = 1.0


class TrainingDivergedError(ValueError):
    """The loss became non-finite or exploded: usually a learning rate that is too high."""


@dataclass
class FinetuneResult:
    """What ``finetune`` returns. ``history`` holds the logged records (training logs with
    ``loss``, evaluations with ``eval_loss``, and a final summary with ``train_loss``)."""

    adapter_dir: Optional[Path]
    history: list[dict[str, Any]] = field(default_factory=list)
    global_step: int = 0
    total_steps: int = 0
    interrupted: bool = False
    checkpoint_dir: Optional[Path] = None
    merged_dir: Optional[Path] = None
    train_loss: Optional[float] = None
    eval_loss: Optional[float] = None
    n_train: int = 0
    n_val: int = 0
    model: Any = field(default=None, repr=False)


def lr_lambda(step: int, warmup_steps: int, total_steps: int) -> float:
    """HF get_linear_schedule_with_warmup's multiplier after ``step`` scheduler steps."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


# ---------------------------------------------------------------------------------------------
# output


class _Console:
    """Prints through tqdm when a progress bar is active (so the bar is not broken); a quiet
    console (the ranks other than 0 of an MPI job) prints nothing."""

    def __init__(self, quiet: bool = False) -> None:
        self.bar: Any = None
        self.quiet = quiet

    def say(self, msg: str) -> None:
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)


_DIGITS = {"loss": 4, "grad_norm": 4, "eval_loss": 4, "train_loss": 4, "epoch": 2, "tokens_per_second": 1,
           "eval_runtime": 4, "eval_samples_per_second": 3, "eval_steps_per_second": 3, "train_runtime": 4,
           "train_samples_per_second": 3, "train_steps_per_second": 3}
_SIGNIFICANT = {"learning_rate": 4}  # 2.9999999999999997e-04 prints as 0.0003


def _rounded(rec: dict[str, Any]) -> dict[str, Any]:
    """The record as printed (log.jsonl keeps full precision)."""
    def one(k: str, v: Any) -> Any:
        if not isinstance(v, float) or not math.isfinite(v):
            return v
        if k in _DIGITS:
            return round(v, _DIGITS[k])
        if k in _SIGNIFICANT:
            return float(f"{v:.{_SIGNIFICANT[k]}g}")
        return v
    return {k: one(k, v) for k, v in rec.items() if k != "step"}


class _StopRequest:
    """First Ctrl-C: finish the current step, then save and stop. Second Ctrl-C: abort now."""

    def __init__(self, console: _Console) -> None:
        self.requested = False
        self._console = console
        self._old: Any = None

    def _handler(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self._console.say("Interruption demandée / interrupt requested: finishing the current step, then saving "
                          "a checkpoint (Ctrl-C again aborts without saving).")

    def __enter__(self) -> "_StopRequest":
        if threading.current_thread() is threading.main_thread():
            try:
                self._old = signal.signal(signal.SIGINT, self._handler)
            except (ValueError, OSError):
                self._old = None
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


class _NoBar:
    """Stands in for tqdm when progress=False (tqdm is not even imported)."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **kw: Any) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int, initial: int, enabled: bool) -> Any:
    """tqdm's notebook bar needs ipywidgets; without it tqdm.auto warns (TqdmWarning), so the text
    bar is used directly."""
    if not enabled:
        return _NoBar()
    import importlib.util

    if importlib.util.find_spec("ipywidgets") is not None:
        from tqdm.auto import tqdm
    else:
        from tqdm import tqdm
    return tqdm(total=total, initial=initial, unit="step", desc="finetune", dynamic_ncols=True)


# ---------------------------------------------------------------------------------------------
# data


@dataclass
class _Data:
    train: Any  # TokenizedDataset, or packing.PackedDataset with --packing
    val: Optional[Any]
    n_records: int
    fingerprint: str


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _usable(ds: TokenizedDataset) -> np.ndarray:
    """Indices of examples with at least one predicted label (labels are shifted inside)."""
    return np.fromiter((int((y[1:] != -100).any()) for y in ds.labels), dtype=bool, count=len(ds)).nonzero()[0]


def _check_cutoff(ds: TokenizedDataset, cutoff_len: int, say: Callable[[str], None]) -> None:
    """An example whose prompt alone fills cutoff_len teaches nothing about answering: an error when
    it is every example, a note otherwise."""
    no_answer = ds.prompt_lengths >= cutoff_len
    if no_answer.all():
        shortest = int(ds.prompt_lengths.min())
        raise ParameterError(
            f"{{cutoff_len}} is too small for this dataset: the shortest prompt has {shortest} tokens, so no "
            f"example keeps a single answer token; use more than {shortest} (check-dataset with --tokenizer "
            "shows the lengths of the examples)", cutoff_len=cutoff_len)
    if no_answer.any():
        say(f"  warning: {int(no_answer.sum())} example(s) have prompts of cutoff_len={cutoff_len} tokens or more: "
            "none of their answer is learned (raise cutoff_len; check-dataset shows the token lengths)")


def prepare_data(dataset: PathLike, records: list[dict[str, str]], tokenizer: Any, cfg: FinetuneConfig,
                 say: Callable[[str], None]) -> _Data:
    ds = tokenize_records(records, tokenizer, data_type=cfg.data_type, cutoff_len=cfg.cutoff_len,
                          template=cfg.prompt_template, train_on_inputs=cfg.train_on_inputs,
                          add_eos=cfg.use_eos_token, chat_template=cfg.chat_template)
    _check_cutoff(ds, cfg.cutoff_len, say)
    train_idx, val_idx = train_val_split(len(ds), cfg.val_set_size, cfg.seed)
    train, val = ds.subset(train_idx.tolist()), ds.subset(val_idx.tolist()) if len(val_idx) else None
    keep = _usable(train).tolist()
    dropped = len(train) - len(keep)
    train = train.subset(keep)
    if val is not None:
        vkeep = _usable(val).tolist()
        dropped += len(val) - len(vkeep)
        val = val.subset(vkeep) if len(vkeep) else None
    if len(train) == 0:
        raise ParameterError(f"{escape_braces(str(dataset))}: no training example has a token to learn ({{cutoff_len}} may be "
                             "shorter than the prompts; raise it or use {train_on_inputs})",
                             cutoff_len=cfg.cutoff_len, train_on_inputs=True)
    lens = ds.lengths
    how = f", template {cfg.prompt_template}" if cfg.data_type == "alpaca" else ""
    if cfg.data_type == "chat":
        from .chat import resolve_template
        how = f", chat template {resolve_template(cfg.chat_template, tokenizer).name}"
    say(f"Dataset {dataset}: {len(records)} records ({cfg.data_type}{how}), "
        f"{len(train)} train / {0 if val is None else len(val)} validation; tokens per example: "
        f"mean {lens.mean():.0f}, max {lens.max()}")
    if ds.n_truncated:
        say(f"  {ds.n_truncated} example(s) longer than cutoff_len={cfg.cutoff_len} were cut (their end-of-text "
            "token is not learned); see falcontune check-dataset")
    if dropped:
        say(f"  {dropped} example(s) have nothing to learn after truncation and were left out")
    if cfg.data_type == "text":
        say(f"  documents cut into {len(ds)} windows of at most cutoff_len={cfg.cutoff_len} tokens")
    if cfg.packing:
        train, val = _pack(train, val, cfg.cutoff_len, say)
    return _Data(train=train, val=val, n_records=len(records), fingerprint=_file_sha256(Path(dataset)))


def _pack(train: TokenizedDataset, val: Optional[TokenizedDataset], cutoff_len: int,
          say: Callable[[str], None]) -> tuple[Any, Optional[Any]]:
    """--packing: examples packed into cutoff_len rows (falcontune.packing), evaluation too."""
    from .packing import pack_dataset

    packed_train = pack_dataset(train, cutoff_len)
    packed_val = pack_dataset(val, cutoff_len) if val is not None else None
    fill = packed_train.lengths.sum() / (len(packed_train) * cutoff_len)
    say(f"  packing: {len(train)} training examples in {len(packed_train)} rows of {cutoff_len} tokens "
        f"({100 * fill:.0f}% filled)" + (f", {len(val)} validation examples in {len(packed_val)} rows"
                                           if val is not None and packed_val is not None else ""))
    return packed_train, packed_val


def evaluate(model: Any, ds: Any, batch_size: int, pad_id: int,
             world: Optional[dist.World] = None) -> tuple[float, float, int]:
    """(mean eval loss over label tokens, runtime in s, number of batches). In a job of several
    processes each rank evaluates every size-th batch; the per-batch sums are then added in batch
    order, as one process adds them."""
    world = world or dist.World()
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    batches = length_grouped_batches(ds.lengths, batch_size, shuffle=False)
    sums = np.zeros((2, len(batches)))  # loss sum, label tokens of each batch
    try:
        for j in range(world.rank, len(batches), world.size):
            b = collate(ds, batches[j], pad_id)
            mean, n = model.loss(b["input_ids"], b["labels"], b["attention_mask"])
            sums[:, j] = mean * n, n
    finally:
        model.train(was_training)
    world.sum_(sums)  # one contributor per entry: exact
    total, count = 0.0, 0
    for part, n in zip(sums[0].tolist(), sums[1].tolist()):
        total, count = total + part, count + int(n)
    return (total / count if count else float("nan")), time.perf_counter() - t0, len(batches)


# ---------------------------------------------------------------------------------------------
# the loop


#: finetune's keyword arguments that are not settings of the run
_RUNTIME_PARAMETERS = (
    ("callback", None, "Optional[Callable[[dict[str, Any]], Any]]",
     "called after every optimizer step with a dict (step, total_steps, loss, epoch, grad_norm, learning_rate, "
     "eval_loss: None unless evaluated at this step); returning True stops training as Ctrl-C does (a checkpoint "
     "and the adapter are saved); in an MPI job it runs on rank 0, and its stop stops every rank"),
    ("progress", True, "bool", "show a progress bar"),
)


class Trainer:
    """One training run over prepared data (resumable)."""

    def __init__(self, model: Any, data: _Data, s: FinetuneConfig, console: _Console, pad_id: int,
                 run_args: dict[str, Any], callback: Optional[Callable[[dict[str, Any]], Any]] = None,
                 progress: bool = True, world: Optional[dist.World] = None,
                 sum_gradients: Optional[Callable[[], None]] = None) -> None:
        from .optim import AdamW

        self.model, self.data, self.s, self.console, self.pad_id = model, data, s, console, pad_id
        self.run_args, self.callback, self.progress = run_args, callback, progress
        self.world = world or dist.World()
        self.sum_gradients = sum_gradients or (lambda: None)
        self.opt = AdamW(model, lr=s.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                         max_grad_norm=MAX_GRAD_NORM)
        n_micro = -(-len(data.train) // s.mbatch_size)
        self.n_micro = n_micro
        self.steps_per_epoch = -(-n_micro // s.accumulation)
        self.total_steps = self.steps_per_epoch * s.epochs
        n_val = 0 if data.val is None else len(data.val)
        if n_val == 0:
            self.eval_steps = 0
        elif s.eval_steps:
            self.eval_steps = s.eval_steps
        else:
            self.eval_steps = max(s.logging_steps, data.n_records // (10 * s.mbatch_size))
        self.fp16 = getattr(model, "dtype", "float32") == "float16"
        self.scale = SCALE_INIT if self.fp16 else 1.0
        self.good_steps = 0
        self.global_step = 0
        self.history: list[dict[str, Any]] = []
        self.window = {"loss_sum": 0.0, "steps": 0, "tokens": 0, "time": 0.0}
        self.loss_total, self.loss_steps = 0.0, 0
        self.bad_streak = 0
        self.run_id = secrets.token_hex(8)
        self.last_eval_step = -1
        self.last_eval_loss: Optional[float] = None
        self.last_ckpt: Optional[Path] = None
        self.last_norm = float("nan")
        self.in_step = False
        self.samples_run = 0  # examples seen since run() started (rates are per run)
        self.log_path = s.out_dir / "log.jsonl"

    # -- state ---------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        seed, counter = self.model.engine.get_rng()
        return {
            "run_id": self.run_id, "global_step": self.global_step, "total_steps": self.total_steps,
            "epoch": self.global_step // max(1, self.steps_per_epoch),
            "step_in_epoch": self.global_step % max(1, self.steps_per_epoch),
            "epoch_float": self._epoch_float(self.global_step), "steps_per_epoch": self.steps_per_epoch,
            "rng": {"seed": int(seed), "counter": int(counter)}, "data_seed": self.s.seed,
            "window": dict(self.window), "loss_total": self.loss_total, "loss_steps": self.loss_steps,
            "bad_streak": self.bad_streak, "last_eval_step": self.last_eval_step,
            "last_eval_loss": self.last_eval_loss, "history": self.history, "args": self.run_args,
            "world_size": self.world.size,
        }

    def restore(self, c: ckpt.Checkpoint) -> None:
        st, opt = c.state, c.optimizer
        self.opt.load_state_dict({"step": opt["step"], "skipped_steps": opt.get("skipped_steps", 0),
                                  "moments": c.moments})
        scaler = opt.get("loss_scaler") or {}
        if self.fp16:
            self.scale = float(scaler.get("scale", SCALE_INIT))
            self.good_steps = int(scaler.get("good_steps", 0))
        rng = st["rng"]
        self.model.engine.set_rng(int(rng["seed"]), int(rng["counter"]))
        self.run_id = str(st.get("run_id") or self.run_id)
        self.global_step = int(st["global_step"])
        self.history = list(st.get("history", []))
        self.window = {**self.window, **st.get("window", {})}
        self.loss_total, self.loss_steps = float(st.get("loss_total", 0.0)), int(st.get("loss_steps", 0))
        self.bad_streak = int(st.get("bad_streak", 0))
        self.last_eval_step = int(st.get("last_eval_step", -1))
        self.last_eval_loss = st.get("last_eval_loss")
        old_world = int(st.get("world_size", 1))
        if old_world != self.world.size:
            self.console.say(f"note: this checkpoint was written by a run of {old_world} process(es), resumed with "
                             f"{self.world.size}: the steps do not depend on it (global batch, dropout by "
                             "micro-batch), so the run continues as it would have (to float rounding of the "
                             "gradient sums)")
        old = st.get("args", {})
        changed = sorted(k for k in self.run_args if k in old and old[k] != self.run_args[k])
        if changed:
            self.console.say("warning: resuming with different settings (" + ", ".join(
                f"{k}: {old[k]!r} -> {self.run_args[k]!r}" for k in changed)
                + "): the run will not match an uninterrupted one")

    def save(self) -> Path:
        """checkpoint-N (rank 0 writes it; every rank holds the same state)."""
        if not self.world.is_root:
            self.last_ckpt = self.s.out_dir / f"checkpoint-{self.global_step}"
            return self.last_ckpt
        opt = self.opt.state_dict()
        moments = opt.pop("moments")
        opt["loss_scaler"] = {"enabled": self.fp16, "scale": self.scale, "good_steps": self.good_steps}
        path = ckpt.save_checkpoint(self.s.out_dir, self.global_step, self.model, opt, moments, self.state())
        ckpt.rotate_checkpoints(self.s.out_dir, self.s.save_total_limit, self.run_id)
        self.last_ckpt = path
        return path

    # -- records -------------------------------------------------------------------------
    def _epoch_float(self, step: int) -> float:
        if self.steps_per_epoch == 0:
            return 0.0
        epoch, j = divmod(step, self.steps_per_epoch)
        if j == 0 and step > 0:
            return float(epoch)
        return epoch + min(j * self.s.accumulation, self.n_micro) / self.n_micro

    def _record(self, rec: dict[str, Any]) -> None:
        rec["step"] = self.global_step
        self.history.append(rec)
        if not self.world.is_root:
            return
        self.console.say(str(_rounded(rec)))
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")

    def _rewrite_log(self) -> None:
        if not self.world.is_root:
            return
        self.s.out_dir.mkdir(parents=True, exist_ok=True)
        with ckpt.atomic_write(self.log_path) as f:
            f.write("".join(json.dumps(r) + "\n" for r in self.history).encode("utf-8"))

    def _eval(self) -> None:
        assert self.data.val is not None
        loss, runtime, n_batches = evaluate(self.model, self.data.val, self.s.mbatch_size, self.pad_id, self.world)
        self.last_eval_step, self.last_eval_loss = self.global_step, loss
        runtime = max(runtime, 1e-9)
        self._record({"eval_loss": loss, "eval_runtime": runtime,
                      "eval_samples_per_second": len(self.data.val) / runtime,
                      "eval_steps_per_second": n_batches / runtime, "epoch": self._epoch_float(self.global_step)})

    # -- one optimizer step --------------------------------------------------------------
    def _step(self, group: list[np.ndarray]) -> tuple[float, int]:
        """Forward/backward over the step's micro-batches and one AdamW update; (loss, tokens).
        Rank r of a job of several processes runs micro-batches r, r + size, ... of the group."""
        self.opt.lr = self.s.lr * lr_lambda(self.global_step, self.s.warmup_steps, self.total_steps)
        k = len(group)
        mine = range(self.world.rank, k, self.world.size)
        batches = {i: collate(self.data.train, group[i], self.pad_id) for i in mine}
        engine = self.model.engine
        seed, base = engine.get_rng()
        retries = 0
        while True:
            self.model.zero_grad()
            # the step's numbers, summed over the ranks: one contributor per entry, so exact
            sums = np.zeros(k + 2)  # loss of each micro-batch, tokens, samples
            for i, b in batches.items():
                engine.set_rng(seed, base + i)  # micro-batch i's dropout, whichever rank runs it
                sums[i] = self.model.forward_backward(b["input_ids"], b["labels"], b["attention_mask"],
                                                      grad_scale=self.scale / k)
                sums[k] += np.count_nonzero(b["attention_mask"])  # segment ids when packed
                sums[k + 1] += len(group[i])
            base += k
            engine.set_rng(seed, base)
            self.sum_gradients()
            self.world.sum_(sums)
            loss = float(np.mean(sums[:k]))
            norm = self.opt.step(grad_scale=self.scale)
            self.last_norm = norm
            if math.isfinite(norm):
                break
            if not self.fp16:
                break  # AdamW skipped the update; the step still counts
            retries += 1
            self.scale /= 2.0
            self.good_steps = 0
            if retries >= DIVERGENCE_STREAK or self.scale < 1.0:
                raise self._diverged(loss, f"the fp16 loss scale fell to {self.scale:g}")
        tokens = int(sums[k])
        self.samples_run += int(sums[k + 1])
        if self.fp16:
            self.good_steps += 1
            if self.good_steps >= SCALE_GROWTH_INTERVAL:
                self.scale, self.good_steps = self.scale * 2.0, 0
        finite = math.isfinite(loss) and math.isfinite(norm)
        self.bad_streak = 0 if finite else self.bad_streak + 1
        if self.bad_streak >= DIVERGENCE_STREAK:
            raise self._diverged(loss, f"{self.bad_streak} steps in a row had a non-finite loss or gradient")
        if math.isfinite(loss) and loss > DIVERGENCE_LOSS:
            raise self._diverged(loss, f"the loss exceeded {DIVERGENCE_LOSS:g}")
        return loss, tokens

    def _diverged(self, loss: float, why: str) -> TrainingDivergedError:
        last = f"; the last checkpoint is {self.last_ckpt}" if self.last_ckpt else ""
        return TrainingDivergedError(
            f"training diverged at step {self.global_step + 1} (loss {loss:.4g}): {why}. "
            f"Lower the learning rate (--lr={self.s.lr:g}, try --lr={self.s.lr / 10:g}){last}")

    # -- the run -------------------------------------------------------------------------
    def run(self, resumed: bool) -> bool:
        """Train to the end; returns True when stopped early (Ctrl-C or callback)."""
        if resumed:
            self._rewrite_log()
        elif self.world.is_root:
            self.s.out_dir.mkdir(parents=True, exist_ok=True)
            earlier = ckpt.list_checkpoints(self.s.out_dir)
            if earlier:
                self.console.say(f"note: {self.s.out_dir} already holds {len(earlier)} checkpoint(s) of an earlier "
                                 f"run (e.g. {earlier[-1][1].name}); they are left alone (checkpoints of the same "
                                 "step are replaced). To continue that run instead, pass --resume_checkpoint=true")
            self.log_path.write_text("", encoding="utf-8")
        if not resumed:
            self.model.engine.set_rng(self.s.seed, 0)
        self.model.train()
        t_start = time.perf_counter()
        first_step, self.samples_run = self.global_step, 0
        stopped = False
        show = self.progress and self.world.is_root
        bar = _progress_bar(self.total_steps, min(self.global_step, self.total_steps), show)
        self.console.bar = bar if show else None
        try:
            with _StopRequest(self.console) as stop:
                stopped = self._loop(bar, stop)
            if not stopped and self.eval_steps and self.last_eval_step != self.global_step:
                self._eval()
        finally:
            bar.close()
            self.console.bar = None
        # rates of THIS run (a resumed run counts only its own steps and time)
        runtime = max(time.perf_counter() - t_start, 1e-9)
        self._record({"train_runtime": runtime, "train_samples_per_second": self.samples_run / runtime,
                      "train_steps_per_second": (self.global_step - first_step) / runtime,
                      "train_loss": self.loss_total / max(self.loss_steps, 1),
                      "epoch": self._epoch_float(self.global_step)})
        return stopped

    def _loop(self, bar: Any, stop: _StopRequest) -> bool:
        A = self.s.accumulation
        while self.global_step < self.total_steps:
            epoch, j = divmod(self.global_step, self.steps_per_epoch)
            batches = length_grouped_batches(self.data.train.lengths, self.s.mbatch_size,
                                             seed=self.s.seed, epoch=epoch, shuffle=True)
            for j in range(j, self.steps_per_epoch):
                t0 = time.perf_counter()
                self.in_step = True
                loss, tokens = self._step(batches[j * A:(j + 1) * A])
                self.global_step += 1
                self.in_step = False
                w = self.window
                w["loss_sum"] += loss
                w["steps"] += 1
                w["tokens"] += tokens
                w["time"] += time.perf_counter() - t0
                self.loss_total += loss
                self.loss_steps += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
                if self._after_step(loss, stop):
                    return True
        return False

    def _after_step(self, loss: float, stop: _StopRequest) -> bool:
        g = self.global_step
        if g % self.s.logging_steps == 0:
            w = self.window
            self._record({"loss": w["loss_sum"] / max(1, w["steps"]), "grad_norm": self.last_norm,
                          "learning_rate": self.s.lr * lr_lambda(g, self.s.warmup_steps, self.total_steps),
                          "epoch": self._epoch_float(g),
                          "tokens_per_second": w["tokens"] / w["time"] if w["time"] > 0 else 0.0})
            self.window = {"loss_sum": 0.0, "steps": 0, "tokens": 0, "time": 0.0}
        if self.eval_steps and g % self.eval_steps == 0:
            self._eval()
        saved = False
        if g % self.s.save_steps == 0:
            self.save()
            saved = True
        want_stop = False
        if self.callback is not None and self.world.is_root:
            info = {"step": g, "total_steps": self.total_steps, "loss": loss, "epoch": self._epoch_float(g),
                    "grad_norm": self.last_norm,
                    "learning_rate": self.s.lr * lr_lambda(g, self.s.warmup_steps, self.total_steps),
                    "eval_loss": self.last_eval_loss if self.last_eval_step == g else None}
            want_stop = bool(self.callback(info))
        # every rank stops at the same step (Ctrl-C may reach them at different moments)
        if self.world.any(want_stop or stop.requested) and g < self.total_steps:
            if not saved:
                self.save()
            self.console.say(f"Entraînement interrompu / training stopped at step {g}/{self.total_steps}; "
                             f"checkpoint saved in {self.last_ckpt}. Resume with "
                             f"--resume_checkpoint={self.last_ckpt}")
            return True
        return False


# ---------------------------------------------------------------------------------------------
# ft.finetune


def check_world_size(local_rank: Optional[int], world: Optional[dist.World] = None) -> None:
    """Several processes are launched by MPI (falcontune.dist). A torchrun / torch.distributed
    launch (WORLD_SIZE, LOCAL_RANK, --local_rank) is refused with the command to use instead; in
    an MPI job the local rank comes from MPI and --local_rank must be left alone."""
    world = world or dist.World()
    flag = 0 if local_rank is None else int(local_rank)
    if world.size > 1:
        if flag not in (0, -1, world.local_rank):
            raise ParameterError(f"{{local_rank}}: in an MPI job the local rank comes from MPI ({world.local_rank} "
                                 "for this process); leave it out", local_rank=local_rank)
        return
    env = os.environ.get("WORLD_SIZE", "1").strip() or "1"
    try:
        size = int(env)
    except ValueError:
        raise ValueError(f"WORLD_SIZE={env!r}: expected an integer") from None
    rank = int(os.environ.get("LOCAL_RANK", flag))
    if size > 1 or rank not in (0, -1):
        raise ValueError(f"multi-GPU training is launched with MPI, not torchrun / torch.distributed.launch "
                         f"(WORLD_SIZE={size}, local_rank={rank}): run `mpiexec -n N falcontune finetune ...` with "
                         f"the same flags, one process per GPU ({dist.DOC})")


def _check_world_batch(cfg: FinetuneConfig, world: dist.World) -> None:
    if world.size > 1 and cfg.batch_size % (cfg.mbatch_size * world.size):
        raise ParameterError(
            f"{{batch_size}} is the global batch: with {world.size} processes it must be a multiple of {{mbatch_size}} "
            f"x {world.size} processes = {cfg.mbatch_size * world.size} (each process accumulates batch_size / "
            f"(mbatch_size x processes) micro-batches per step)",
            batch_size=cfg.batch_size, mbatch_size=cfg.mbatch_size)


def _setup_lora(m: Any, resume: Optional[Path], cfg: FinetuneConfig, say: Callable[[str], None]) -> None:
    source = resume or (Path(cfg.lora_apply_dir) if cfg.lora_apply_dir else None)
    if source is None:
        m.add_lora(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, target_modules=cfg.target_modules,
                   seed=cfg.seed)
    else:
        m.load_lora(source)
        lc = m.lora_config
        if not resume and (lc["r"] != cfg.lora_r or float(lc["lora_alpha"]) != cfg.lora_alpha
                           or tuple(lc["target_modules"]) != cfg.target_modules):
            say(f"note: the adapter in {source} has r={lc['r']}, lora_alpha={lc['lora_alpha']:g}, "
                f"target_modules={lc['target_modules']}: those win over the settings")
    m.engine.set_lora_dropout(cfg.lora_dropout)
    m.lora_config["lora_dropout"] = cfg.lora_dropout


def _parameters(values: dict[str, Any]) -> str:
    lines = ["", "Parameters:", f"{'config':-^20}"]
    lines += [f"{k}={v!r}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


def _dataset_path(cfg: FinetuneConfig, say: Callable[[str], None]) -> Optional[Path]:
    """The dataset to train on; the demo model defaults to the French sample."""
    if cfg.skip:
        return None
    if cfg.dataset is not None:
        return Path(cfg.dataset)
    if cfg.model_name == "demo":
        from .demo import sample_dataset_path
        path = sample_dataset_path()
        say(f"dataset: none given, the demo model trains on the French sample {path}")
        return path
    raise ParameterError("{dataset} is required to train (or pass {skip} to only save / merge the adapter)",
                         dataset=NAME_ONLY, skip=NAME_ONLY)


def _load_records(path: Path, data_type: str, say: Callable[[str], None]) -> list[dict[str, str]]:
    """load_records, with its dataset warnings (unknown fields) printed as notes."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DatasetWarning)
        records = load_records(path, data_type)
    for w in caught:
        if issubclass(w.category, DatasetWarning):
            say(f"warning: {w.message}")
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return records


def _write_plot(out_dir: Path, say: Callable[[str], None]) -> None:
    """training_curves.png next to log.jsonl when matplotlib is installed; never fails the run."""
    from .plot import PlotError, write_training_plot

    try:
        path = write_training_plot(out_dir)
    except PlotError:
        return  # matplotlib missing, or nothing logged yet
    except Exception as e:  # noqa: BLE001 - a plotting problem must not lose a finished run
        say(f"note: could not draw the training curves ({type(e).__name__}: {e})")
        return
    say(f"Courbes / training curves: {path}")


def finetune(model: Any, dataset: Optional[PathLike] = None, **settings: Any) -> FinetuneResult:
    callback = settings.pop("callback", None)
    progress = bool(settings.pop("progress", True))
    end_job_on_error = bool(settings.pop("_end_job_on_error", True))  # the command reports errors itself
    known = {f.name for f in fields(FinetuneConfig)}
    for name in settings:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise TypeError(f"finetune() got an unexpected keyword argument {name!r}{hint}")
    return run_finetune(FinetuneConfig(model=model, dataset=dataset, **settings), callback=callback,
                        progress=progress, end_job_on_error=end_job_on_error)


def _finetune_signature() -> inspect.Signature:
    params = []
    for f in fields(FinetuneConfig):
        kind = (inspect.Parameter.POSITIONAL_OR_KEYWORD if f.name in ("model", "dataset")
                else inspect.Parameter.KEYWORD_ONLY)
        default = inspect.Parameter.empty if f.default is MISSING else f.default
        params.append(inspect.Parameter(f.name, kind, default=default, annotation=f.type))
    params += [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
               for name, default, annotation, _ in _RUNTIME_PARAMETERS]
    return inspect.Signature(params, return_annotation="FinetuneResult")


def _finetune_doc() -> str:
    lines = ["Fine-tune a LoRA adapter. The parameters are the flags of ``falcontune finetune`` (same names,",
             "same defaults); each is described by ``FinetuneConfig``. Returns a ``FinetuneResult``.", "",
             "Parameters", "----------"]
    for f in fields(FinetuneConfig):
        default = "required" if f.default is MISSING else f"default {f.default!r}"
        lines += [f"{f.name} : {f.type}, {default}", f"    {f.metadata['help']}"]
    lines += [f"{name} : {annotation}, default {default!r}\n    {help_}"
              for name, default, annotation, help_ in _RUNTIME_PARAMETERS]
    return "\n".join(lines)


finetune.__signature__ = _finetune_signature()  # type: ignore[attr-defined]
finetune.__doc__ = _finetune_doc()


def _exit_status(exc: BaseException) -> int:
    """The exit status of a rank whose error ends an MPI job (the command's: cli.py)."""
    if isinstance(exc, KeyboardInterrupt):
        return 130
    return 2 if isinstance(exc, (OSError, ValueError, KeyError, MemoryError, NotImplementedError)) else 1


def run_finetune(cfg: FinetuneConfig, callback: Optional[Callable[[dict[str, Any]], Any]] = None,
                 progress: bool = True, *, end_job_on_error: bool = True) -> FinetuneResult:
    """``finetune`` for an already built ``FinetuneConfig``. In an MPI job of several processes
    an error on one rank ends the job (one message, then MPI_Abort: the other ranks would wait
    in a collective forever) unless ``end_job_on_error`` is False, which the command uses to
    phrase the message itself."""
    world = dist.current()
    if world.size == 1 or not end_job_on_error:
        return _run_finetune(cfg, callback, progress, world)
    try:
        return _run_finetune(cfg, callback, progress, world)
    except BaseException as exc:  # noqa: BLE001 - every failure must end the job
        if isinstance(exc, SystemExit):
            raise
        text = " ".join(str(exc).split()) or type(exc).__name__
        dist.end_job(world, f"{type(exc).__name__}: {text}", _exit_status(exc))


def _run_finetune(cfg: FinetuneConfig, callback: Optional[Callable[[dict[str, Any]], Any]], progress: bool,
                  world: dist.World) -> FinetuneResult:
    from .merge import merge_and_save
    from .model import FalconModel, load_model, resolve_device
    from .tokenizer import missing_tokenizer_error

    check_world_size(cfg.local_rank, world)
    _check_world_batch(cfg, world)
    console = _Console(quiet=not world.is_root)
    say = console.say
    dev = resolve_device(cfg.backend, cfg.device, say)
    if world.size > 1 and dev.startswith("cuda"):
        from . import _C

        dist.check_gpu_placement(world, int(_C.cuda_device_count()))
    out_dir = cfg.out_dir
    resume = ckpt.resolve_resume(cfg.resume_checkpoint, out_dir)
    dataset = _dataset_path(cfg, say)
    records = [] if dataset is None else _load_records(dataset, cfg.data_type, say)  # before loading a model
    m = cfg.model if isinstance(cfg.model, FalconModel) else load_model(cfg.model, cfg.weights, device=dev,
                                                                        tokenizer=cfg.tokenizer)
    if world.size > 1 and m.device != dev:
        raise ParameterError(f"{{model}}: in an MPI job this process (rank {world.rank}) trains on {dev}, but the "
                             f"model given is on {m.device}: load it with device='auto' (or the backend of the run)",
                             model=NAME_ONLY)
    processes = {"processes": world.size} if world.size > 1 else {}
    say(_parameters({**cfg.describe(), "dataset": None if dataset is None else str(dataset),
                     "resume_checkpoint": str(resume) if resume else None, "device": m.device, **processes}))
    if cfg.verbose:
        say(f"{m!r} on {m.device}, activations {m.dtype}")
    _setup_lora(m, resume, cfg, say)
    m.set_gradient_checkpointing(cfg.gradient_checkpointing_ratio if cfg.gradient_checkpointing else 0.0)
    lora_cfg: dict[str, Any] = m.lora_config or {}
    n_lora = sum(int(a.size) for a in m.lora_state_dict().values())
    say(f"trainable params: {n_lora:,} (LoRA r={lora_cfg['r']} on "
        f"{', '.join(lora_cfg['target_modules'])} x {m.config.num_hidden_layers} layers)")

    result = FinetuneResult(adapter_dir=None, model=m)
    if dataset is not None:
        if m.tokenizer is None:
            raise missing_tokenizer_error(cfg.model_name)
        data = prepare_data(dataset, records, m.tokenizer, cfg, say)
        run_args = {"dataset_sha256": data.fingerprint, **cfg.run_settings(), "lora_r": lora_cfg["r"],
                    "lora_alpha": float(lora_cfg["lora_alpha"]), "target_modules": list(lora_cfg["target_modules"]),
                    "n_train": len(data.train)}
        pad_id = m.tokenizer.pad_token_id if m.tokenizer.pad_token_id is not None else 0
        sum_gradients = dist.GradientSum(world, m.engine)
        trainer = Trainer(m, data, cfg, console, pad_id, run_args, callback=callback, progress=progress,
                          world=world, sum_gradients=sum_gradients)
        if resume is not None:
            trainer.restore(ckpt.load_checkpoint(resume))
            say(f"Resuming from {resume} (step {trainer.global_step}/{trainer.total_steps})")
        per_process = (f" ({cfg.accumulation // world.size} micro-batches per process x {world.size} processes"
                       f"{', NCCL' if sum_gradients.nccl else ', MPI'})") if world.size > 1 else ""
        say(f"{trainer.total_steps} optimizer steps ({trainer.steps_per_epoch} per epoch x {cfg.epochs}), "
            f"gradient accumulation {cfg.accumulation}{per_process}, "
            + (f"eval every {trainer.eval_steps} steps" if trainer.eval_steps else "no validation set"))
        try:
            result.interrupted = trainer.run(resumed=resume is not None)
        except KeyboardInterrupt:
            if trainer.in_step or world.size > 1:  # ranks cannot agree on a checkpoint from here
                raise
            trainer.save()
            result.interrupted = True
            say(f"training stopped at step {trainer.global_step}; checkpoint saved in {trainer.last_ckpt}")
        finally:
            sum_gradients.close()
        result.history, result.global_step = trainer.history, trainer.global_step
        result.total_steps, result.checkpoint_dir = trainer.total_steps, trainer.last_ckpt
        result.train_loss = trainer.loss_total / trainer.loss_steps if trainer.loss_steps else None
        result.eval_loss = trainer.last_eval_loss
        result.n_train = getattr(data.train, "n_examples", len(data.train))  # examples, also when packed
        result.n_val = 0 if data.val is None else getattr(data.val, "n_examples", len(data.val))
        if world.is_root:
            _write_plot(out_dir, say)
    if world.is_root:
        result.adapter_dir = m.save_lora(out_dir)
        say(f"Adapter LoRA enregistré / LoRA adapter saved in {result.adapter_dir}")
        if cfg.checkpoint:
            result.merged_dir = merge_and_save(m, Path(cfg.merged_dir) if cfg.merged_dir else out_dir / "merged")
            say(f"Merged float16 model (transformers format) saved in {result.merged_dir}")
    if world.size > 1:  # the other ranks return once rank 0's files are written
        paths = world.bcast((result.adapter_dir, result.merged_dir))
        result.adapter_dir, result.merged_dir = paths
    return result
