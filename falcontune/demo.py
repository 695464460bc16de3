"""The ``demo`` model: a small random GPTQ Falcon with a French BPE tokenizer.

``load_model("demo")`` and ``falcontune finetune --model=demo`` use it to run the whole
workflow (fine-tuning, generation, merging) in seconds on a CPU, without downloading
anything. It is built on first use from the French instruction sample shipped with
falcontune and cached under ``$FALCONTUNE_CACHE`` (default ``~/.cache/falcontune``) in
``demo-<version>-r<recipe>-<key>``, where the key hashes the recipe (every constant below and
the source of the code that builds it) and the sample: a changed recipe never reuses a stale
cache. The build happens in a temporary directory that is renamed into place, so an interrupted
build never leaves a broken cache behind.

The recipe is chosen so that a short CPU run shows learning (README, notebook):

* 2 layers of hidden size 256 (the "small" preset, halved in depth) and a 2,048-token vocabulary:
  one epoch over the sample (174 examples) is a few seconds of compute per thousand tokens.
* The final layer norm's gain is scaled by 0.3. With the random tied embeddings (std 0.25 over 256
  dimensions) the logits would otherwise have a standard deviation near 4, and the untrained loss
  would be ~ln(V) + 4**2/2 (about 16, far above the ln(2048) = 7.6 of a uniform guess); at 0.3 they
  have one near 1.2 and the untrained loss is about 8.2, while a trained residual can still push a
  token's logit well above the others.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

DEMO_RECIPE = 2  # bump when the demo model's recipe changes (the cache key also hashes it)
DEMO_PRESET = "small"
DEMO_CONFIG = {"num_hidden_layers": 2}  # overrides of the preset
DEMO_VOCAB = 2048
DEMO_BITS = 4
DEMO_GROUP_SIZE = 64
DEMO_SEED = 0
DEMO_FINAL_NORM_SCALE = 0.3
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


def _scale_final_norm(directory: Path, factor: float) -> None:
    """Multiply ln_f's weight and bias by ``factor`` (smaller initial logits, see the module doc)."""
    import numpy as np

    from .weights import WeightStore, save_safetensors

    (path,) = directory.glob("*.safetensors")
    with WeightStore.open(path) as store:
        tensors = {k: np.array(store.tensor(k)) for k in store.names()}
    for name in ("transformer.ln_f.weight", "transformer.ln_f.bias"):
        tensors[name] = (tensors[name].astype(np.float32) * factor).astype(tensors[name].dtype)
    save_safetensors(path, tensors, metadata={"format": "pt"})


def build_demo_model(directory: Path) -> Path:
    """Write the demo checkpoint (config, quantize config, weights, tokenizer.json) into
    ``directory`` (which must not hold another model)."""
    from .testing import make_checkpoint
    from .tokenizer import train_demo_tokenizer

    directory.mkdir(parents=True, exist_ok=True)
    tok = train_demo_tokenizer(_training_texts(sample_dataset_path()), vocab_size=DEMO_VOCAB,
                               out_path=directory / "tokenizer.json")
    make_checkpoint(directory, preset=DEMO_PRESET, bits=DEMO_BITS, group_size=DEMO_GROUP_SIZE,
                    seed=DEMO_SEED, vocab_size=tok.vocab_size, **DEMO_CONFIG)
    _scale_final_norm(directory, DEMO_FINAL_NORM_SCALE)
    (directory / "DEMO.json").write_text(json.dumps(
        {"what": "falcontune demo model: random weights, French BPE tokenizer", "recipe": DEMO_RECIPE,
         "preset": DEMO_PRESET, **DEMO_CONFIG, "vocab_size": tok.vocab_size,
         "final_norm_scale": DEMO_FINAL_NORM_SCALE}, indent=2) + "\n", encoding="utf-8")
    return directory


def _cache_key() -> str:
    """Hash of the recipe (constants and the code that builds the model) and of the sample."""
    from .testing import make_checkpoint
    from .tokenizer import train_demo_tokenizer

    h = hashlib.sha256()
    recipe = [DEMO_RECIPE, DEMO_PRESET, DEMO_CONFIG, DEMO_VOCAB, DEMO_BITS, DEMO_GROUP_SIZE, DEMO_SEED,
              DEMO_FINAL_NORM_SCALE]
    h.update(json.dumps(recipe, sort_keys=True).encode())
    for fn in (build_demo_model, _scale_final_norm, _training_texts, make_checkpoint, train_demo_tokenizer):
        h.update(inspect.getsource(fn).encode())
    h.update(sample_dataset_path().read_bytes())
    return h.hexdigest()[:10]


def demo_model_dir(cache: Optional[Path] = None) -> Path:
    """The cached demo model directory, built on first use."""
    from . import __version__

    root = Path(cache) if cache is not None else cache_root()
    final = root / f"demo-{__version__}-r{DEMO_RECIPE}-{_cache_key()}"
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
