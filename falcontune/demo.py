"""The ``demo`` model: a small random GPTQ Falcon with a French BPE tokenizer.

``load_model("demo")`` and ``falcontune finetune --model=demo`` use it to run the whole
workflow (fine-tuning, generation, merging) in seconds on a CPU, without downloading
anything. It is built on first use from the French instruction sample shipped with
falcontune and cached under ``$FALCONTUNE_CACHE`` (default ``~/.cache/falcontune``) in
``demo-<version>-r<recipe>-<sample hash>``. The build happens in a temporary directory that is renamed
into place, so an interrupted build never leaves a broken cache behind.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

DEMO_RECIPE = 1  # bump when the demo model's recipe changes
DEMO_PRESET = "small"
DEMO_VOCAB = 4096
DEMO_BITS = 4
DEMO_GROUP_SIZE = 64
DEMO_SEED = 0
SAMPLE_NAME = "fr_instructions.json"


def cache_root() -> Path:
    """``$FALCONTUNE_CACHE``, else ``$XDG_CACHE_HOME/falcontune``, else ``~/.cache/falcontune``."""
    env = os.environ.get("FALCONTUNE_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "falcontune"


def sample_dataset_path() -> Path:
    """The French instruction sample (Alpaca JSON): inside the installed package
    (``falcontune/sample_data/``) or, in a source checkout, ``datasets/`` at the repository root."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "sample_data" / SAMPLE_NAME, here.parent / "datasets" / SAMPLE_NAME):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"the French sample dataset {SAMPLE_NAME} is not installed (looked in {here / 'sample_data'} "
        f"and {here.parent / 'datasets'}); reinstall falcontune")


def _training_texts(path: Path) -> list[str]:
    from .data import load_records, make_prompt

    records = load_records(path, "alpaca")
    return [make_prompt(r["instruction"], r["input"], r["output"], template=t)
            for r in records for t in ("alpaca", "fr")]


def build_demo_model(directory: Path) -> Path:
    """Write the demo checkpoint (config, quantize config, weights, tokenizer.json) into
    ``directory`` (which must not hold another model)."""
    from .testing import make_checkpoint
    from .tokenizer import train_demo_tokenizer

    directory.mkdir(parents=True, exist_ok=True)
    tok = train_demo_tokenizer(_training_texts(sample_dataset_path()), vocab_size=DEMO_VOCAB,
                               out_path=directory / "tokenizer.json")
    make_checkpoint(directory, preset=DEMO_PRESET, bits=DEMO_BITS, group_size=DEMO_GROUP_SIZE,
                    seed=DEMO_SEED, vocab_size=tok.vocab_size)
    (directory / "DEMO.json").write_text(json.dumps(
        {"what": "falcontune demo model: random weights, French BPE tokenizer", "recipe": DEMO_RECIPE,
         "preset": DEMO_PRESET, "vocab_size": tok.vocab_size}, indent=2) + "\n", encoding="utf-8")
    return directory


def demo_model_dir(cache: Optional[Path] = None) -> Path:
    """The cached demo model directory, built on first use."""
    from . import __version__

    root = Path(cache) if cache is not None else cache_root()
    sample = hashlib.sha256(sample_dataset_path().read_bytes()).hexdigest()[:8]
    final = root / f"demo-{__version__}-r{DEMO_RECIPE}-{sample}"
    if (final / "config.json").is_file():
        return final
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(f"cannot create the falcontune cache directory {root}: {e.strerror} "
                      "(set FALCONTUNE_CACHE to a writable directory)") from None
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=root))
    try:
        build_demo_model(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp made it private
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "config.json").is_file():  # not a concurrent build that won
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
