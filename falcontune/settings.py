"""The settings of one fine-tuning run: ``FinetuneConfig``, a frozen dataclass.

It is the single description of every parameter of ``falcontune.finetune`` and flag of
``falcontune finetune``: finetune's signature and docstring (trainer.py), the command's parser
(cli.py), the validation (``ParameterError`` names the Python parameter; the command rephrases it
with flags), the printed "Parameters" block and the settings stored in checkpoints (to warn when
a resume changes them) are all derived from these fields. Adding a flag is adding a field.
"""
from __future__ import annotations

import math
import os
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

from .data import DATA_TYPES, TEMPLATES
from .errors import ParameterError, escape_braces

PathLike = Union[str, "os.PathLike[str]"]

# metadata: help (one line), kind (how the command parses the flag: str, int, float, bool,
# optional_int), check (validation), run (True: changing it makes a resumed run differ from an
# uninterrupted one), choices, aliases (extra flag spellings).

Check = Callable[[str, Any], None]


def _setting(default: Any, help: str, kind: str = "str", check: Optional[Check] = None, run: bool = False,
             choices: Optional[Sequence[str]] = None, aliases: tuple[str, ...] = ()) -> Any:
    meta = {"help": help, "kind": kind, "check": check, "run": run, "choices": choices, "aliases": aliases}
    return field(metadata=meta) if default is MISSING else field(default=default, metadata=meta)


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.number)) and not isinstance(v, bool) and math.isfinite(v)


def _int_at_least(minimum: Optional[int]) -> Check:
    """An integer (>= minimum unless it is None)."""
    def check(name: str, v: Any) -> None:
        if not _is_int(v) or (minimum is not None and v < minimum):
            bound = "" if minimum is None else f" >= {minimum}"
            raise ParameterError(f"{{{name}}}: expected an integer{bound}", **{name: v})
    return check


def _number_in(low: float, high: float, low_open: bool, high_open: bool, what: str) -> Check:
    def check(name: str, v: Any) -> None:
        ok = _is_number(v) and (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
        if not ok:
            raise ParameterError(f"{{{name}}}: expected {what}", **{name: v})
    return check


def _optional(check: Check) -> Check:
    def optional(name: str, v: Any) -> None:
        if v is not None:
            check(name, v)
    return optional


def _one_of(options: Sequence[str]) -> Check:
    def check(name: str, v: Any) -> None:
        if v not in options:
            raise ParameterError(f"{{{name}}}: expected one of {', '.join(options)}", **{name: v})
    return check


_POSITIVE, _NON_NEGATIVE = _int_at_least(1), _int_at_least(0)
_RATE = _number_in(0.0, math.inf, True, True, "a number > 0")


@dataclass(frozen=True)
class FinetuneConfig:
    """The settings of one fine-tuning run (the flags of ``falcontune finetune``), validated and
    normalized on construction: ``train_on_inputs=None`` becomes the data type's default,
    ``target_modules`` a tuple of module names, ``save_total_limit <= 0`` None."""

    model: Any = _setting(MISSING, "a directory holding config.json, a Hugging Face Hub repo id "
                                   "ORG/NAME[@REVISION] (downloaded into the HF cache; HF_HUB_OFFLINE=1 uses the "
                                   "cache only), a known model name (e.g. falcon-7b-instruct-4bit: its Hub repo "
                                   "unless weights are given), 'demo' (a small random model for trying things "
                                   "out), or a loaded FalconModel")
    dataset: Optional[PathLike] = _setting(
        None, "Path to local dataset file (JSON array or JSON Lines; .txt for data_type text); with model 'demo', "
              "default: the French sample")
    weights: Optional[PathLike] = _setting(
        None, "the .safetensors file, its directory or a Hub repo id (default: the model's directory or repo; "
              "for a known name, its Hub repo)")
    tokenizer: Optional[PathLike] = _setting(
        None, "tokenizer.json, its directory or a Hub repo id (default: the one next to the model or the weights)")
    data_type: str = _setting("alpaca", "Dataset format: alpaca (instruction, input, output), gpt4all (prompt, "
                                        "response), chat (OpenAI messages or ShareGPT conversations) or text "
                                        "(raw documents).", check=_one_of(DATA_TYPES), run=True, choices=DATA_TYPES)
    chat_template: Optional[str] = _setting(
        None, "chat data: the template, a name (falcon, chatml) or a .jinja / tokenizer_config.json file "
              "(default: the tokenizer's chat_template, else falcon)", run=True)
    packing: bool = _setting(False, "Pack several examples into each cutoff_len row (each example only sees itself; "
                                    "positions restart per example): less padding, fewer steps. Evaluation is "
                                    "packed too.", kind="bool", run=True)
    prompt_template: str = _setting("alpaca", "Prompt template for alpaca data.", check=_one_of(tuple(TEMPLATES)),
                                    run=True, choices=tuple(TEMPLATES))
    train_on_inputs: Optional[bool] = _setting(
        None, "Learn the prompt tokens too (default: true for alpaca, false for gpt4all and chat, where only the "
              "assistant turns are learned; text learns every token).", kind="bool", run=True)
    use_eos_token: bool = _setting(True, "Append the end-of-text token to examples.", kind="bool", run=True)
    cutoff_len: int = _setting(256, "Maximum tokens per example (longer ones are cut).", kind="int",
                               check=_POSITIVE, run=True)
    val_set_size: float = _setting(0.2, "Validation set size (fraction, or a count if > 1).", kind="float",
                                   check=_number_in(0.0, math.inf, False, True, "a fraction or a count >= 0"),
                                   run=True)
    lora_out_dir: PathLike = _setting("alpaca_lora", "Directory to place new LoRA.")
    lora_apply_dir: Optional[PathLike] = _setting(None, "Directory of a LoRA adapter to start from.")
    resume_checkpoint: Union[str, PathLike, bool, None] = _setting(
        None, "checkpoint-N directory to resume from, or 'true'/'latest' for the newest in lora_out_dir")
    mbatch_size: int = _setting(1, "Micro-batch size.", kind="int", check=_POSITIVE, run=True)
    batch_size: int = _setting(2, "Batch size.", kind="int", check=_POSITIVE, run=True)
    epochs: int = _setting(3, "Epochs.", kind="int", check=_POSITIVE, run=True)
    lr: float = _setting(2e-4, "Learning rate (0: an evaluation-only run, the adapter unchanged).", kind="float",
                         check=_number_in(0.0, math.inf, False, True, "a number >= 0"), run=True)
    warmup_steps: int = _setting(50, "Warmup steps.", kind="int", check=_NON_NEGATIVE, run=True)
    lora_r: int = _setting(8, "LoRA rank.", kind="int", check=_POSITIVE, run=True)
    lora_alpha: float = _setting(16, "LoRA alpha.", kind="float", check=_RATE, run=True)
    lora_dropout: float = _setting(0.05, "LoRA dropout.", kind="float",
                                   check=_number_in(0.0, 1.0, False, True, "a probability in [0, 1)"), run=True)
    target_modules: Any = _setting('["query_key_value"]', "Target modules for LoRA, a list such as "
                                   "'[\"query_key_value\", \"dense\"]'.", run=True)
    gradient_checkpointing: bool = _setting(False, "Use gradient checkpointing.", kind="bool")
    gradient_checkpointing_ratio: float = _setting(
        1.0, "Gradient checkpoint ratio.", kind="float",
        check=_number_in(0.0, 1.0, True, False, "a fraction in (0, 1]"))
    eval_steps: Optional[int] = _setting(None, "Evaluate every N steps (default: falcontune's rule).",
                                         kind="optional_int", check=_optional(_NON_NEGATIVE))
    logging_steps: int = _setting(10, "Log every N steps.", kind="int", check=_POSITIVE)
    save_steps: int = _setting(50, "Checkpoint every N steps.", kind="int", check=_POSITIVE)
    save_total_limit: Optional[int] = _setting(3, "Checkpoints to keep.", kind="optional_int",
                                               check=_optional(_int_at_least(None)))
    seed: int = _setting(42, "Seed of the split, LoRA init, data order and dropout.", kind="int",
                         check=_NON_NEGATIVE, run=True)
    backend: str = _setting("auto", "auto, cpu or cuda (falcontune's triton and torch mean cuda here).")
    device: Optional[str] = _setting(None, "alias of backend that also accepts cuda:N")
    local_rank: Optional[int] = _setting(0, "Local rank: several GPUs are used through MPI (mpiexec -n N falcontune "
                                            "finetune ...), which gives each process its rank; leave it at 0.",
                                         kind="optional_int")
    checkpoint: bool = _setting(False, "Also write the merged float16 model (transformers format).", kind="bool",
                                aliases=("-c",))
    merged_dir: Optional[PathLike] = _setting(None, "Where checkpoint (-c) writes the merged model "
                                                    "(default: LORA_OUT_DIR/merged).")
    skip: bool = _setting(False, "Don't train (e.g. to merge an existing adapter with -c).", kind="bool")
    verbose: bool = _setting(False, "Print more details (and the traceback of errors).", kind="bool")

    def __post_init__(self) -> None:
        from .model import parse_target_modules

        for f in fields(self):
            check = f.metadata["check"]
            if check is not None:
                check(f.name, getattr(self, f.name))
        if self.batch_size % self.mbatch_size:
            raise ParameterError("{batch_size} must be a multiple of {mbatch_size} "
                                 "(gradient accumulation = batch_size / mbatch_size)",
                                 batch_size=self.batch_size, mbatch_size=self.mbatch_size)
        try:
            targets = parse_target_modules(self.target_modules)
        except (ValueError, TypeError) as e:
            raise ParameterError(f"{{target_modules}}: {escape_braces(str(e).split(': ', 1)[-1])}",
                                 target_modules=self.target_modules) from None
        normal = {"target_modules": targets, "lr": float(self.lr), "lora_alpha": float(self.lora_alpha),
                  "lora_dropout": float(self.lora_dropout), "val_set_size": self.val_set_size,
                  "train_on_inputs": (self.data_type == "alpaca" if self.train_on_inputs is None
                                      else bool(self.train_on_inputs)),
                  "use_eos_token": bool(self.use_eos_token), "gradient_checkpointing": bool(self.gradient_checkpointing),
                  "save_total_limit": (None if self.save_total_limit is not None and self.save_total_limit <= 0
                                       else self.save_total_limit)}
        for k, v in normal.items():
            object.__setattr__(self, k, v)

    @property
    def out_dir(self) -> Path:
        return Path(self.lora_out_dir)

    @property
    def accumulation(self) -> int:
        return self.batch_size // self.mbatch_size

    @property
    def model_name(self) -> str:
        return str(getattr(self.model, "name", self.model))

    def run_settings(self) -> dict[str, Any]:
        """The settings that decide the run's numbers (stored in checkpoints), JSON-ready."""
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self) if f.metadata["run"]}

    def describe(self) -> dict[str, Any]:
        """Every setting, for the printed "Parameters" block."""
        out = {f.name: _plain(getattr(self, f.name)) for f in fields(self)}
        out["model"] = self.model_name
        out["gradient_accumulation_steps"] = self.accumulation
        return out


def _plain(v: Any) -> Any:
    if isinstance(v, tuple):
        return list(v)
    if isinstance(v, os.PathLike):
        return os.fspath(v)
    return v
