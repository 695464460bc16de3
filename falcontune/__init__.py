"""falcontune: fine-tune GPTQ-quantized Falcon models with LoRA, on a C/CUDA engine (no PyTorch).

    import falcontune as ft
    model = ft.load_model("falcon-7b-instruct-4bit", weights="gptq_model-4bit-64g.safetensors")
    model.add_lora(r=8, alpha=16, dropout=0.05, target_modules=["query_key_value"])
"""
from __future__ import annotations

import os
from typing import Any

# The CPU engine uses OpenMP; spinning worker threads steal the cores of a busy machine (a notebook
# kernel, a CI runner) and make small steps far slower. Passive waiting is set before the engine
# loads, unless the user chose otherwise.
os.environ.setdefault("OMP_WAIT_POLICY", "passive")

# Several processes on one machine (mpiexec -n N, falcontune.dist): each CPU engine gets its share of
# the cores rather than all of them, unless OMP_NUM_THREADS says otherwise. Read from the launcher's
# environment (mpi4py is not imported here).
from .dist import cpu_threads_per_process  # noqa: E402

if cpu_threads_per_process() is not None:
    os.environ["OMP_NUM_THREADS"] = str(cpu_threads_per_process())

from .errors import ParameterError
from .model import FalconModel, ModelLoadError, cuda_available, cuda_compiled, load_model, resolve_device
from .optim import AdamW
from .settings import FinetuneConfig
from .trainer import FinetuneResult, finetune

__version__ = "0.1.0"

__all__ = ["FalconModel", "ModelLoadError", "ParameterError", "AdamW", "load_model", "cuda_available",
           "cuda_compiled", "resolve_device", "finetune", "FinetuneConfig", "FinetuneResult", "check_dataset",
           "__version__"]


def check_dataset(path: Any, data_type: str = "alpaca", tokenizer: Any = None, cutoff_len: int = 256,
                  template: str = "alpaca", chat_template: Any = None, strict: bool = False) -> Any:
    """Validate a dataset file; returns a report (counts, token lengths, every error by record,
    unknown fields with the known field they probably mean; ``strict=True`` makes those errors).
    ``tokenizer`` may be a tokenizer or the path of a tokenizer.json; ``chat_template`` overrides
    the chat template of chat data (a name or a file)."""
    from .data import check_dataset as _check
    from .tokenizer import Tokenizer
    if isinstance(tokenizer, (str, bytes)) or hasattr(tokenizer, "__fspath__"):
        tokenizer = Tokenizer.from_file(tokenizer)
    return _check(path, data_type=data_type, tokenizer=tokenizer, cutoff_len=cutoff_len, template=template,
                  chat_template=chat_template, strict=strict)
