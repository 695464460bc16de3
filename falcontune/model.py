"""FalconModel: a GPTQ Falcon checkpoint bound to the C engine, with LoRA.

Python finds and maps the files; every array goes to ``falcontune._C`` which
checks shapes and dtypes again and does all numeric work.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import numpy as np

from . import _C
from . import hub, lora_io
from .errors import ParameterError
from .layout import MODULE_NAMES, QKV_LAYOUTS, lora_key, module, target_mask
from .models import (FalconConfig, ModelSpec, QuantizeConfig, get_known_model, parse_config,
                     parse_quantize_config)
from .weights import TensorNotFoundError, WeightStore, to_float32

PathLike = Union[str, os.PathLike]

SLOT_WEIGHT, SLOT_GRAD, SLOT_ADAM_M, SLOT_ADAM_V = 0, 1, 2, 3


class ModelLoadError(ValueError):
    """A model directory, weights file or config that cannot be used."""


def cuda_compiled() -> bool:
    """True when this installation of falcontune was built with its CUDA engine (nvcc was used at
    install time), whether or not a GPU is visible now."""
    return bool(_C.have_cuda())


def cuda_available() -> bool:
    """True when the CUDA engine can be used now: it was compiled (``cuda_compiled()``) and at
    least one NVIDIA GPU is visible. ``device="auto"`` picks CUDA exactly when this is True."""
    return cuda_compiled() and _C.cuda_device_count() > 0


def parse_target_modules(target_modules: Union[str, Iterable[str]]) -> tuple[str, ...]:
    """Accept a list of names, or the JSON / Python list string of the tutorial
    (``'["query_key_value"]'``)."""
    if isinstance(target_modules, str):
        text = target_modules.strip()
        if text.startswith("["):
            try:
                names = json.loads(text.replace("'", '"'))
            except json.JSONDecodeError as e:
                raise ValueError(f"target_modules: cannot parse {target_modules!r} as a list: {e}") from None
        else:
            names = [n.strip() for n in text.split(",") if n.strip()]
    else:
        try:
            names = list(target_modules)
        except TypeError:
            raise TypeError(f"target_modules: expected a list of module names, got {target_modules!r}") from None
    out = []
    for n in names:
        if not isinstance(n, str) or n not in MODULE_NAMES:
            raise ValueError(f"target_modules: unknown module {n!r}; expected some of {', '.join(MODULE_NAMES)}")
        if n not in out:
            out.append(n)
    if not out:
        raise ValueError("target_modules: expected at least one module")
    return tuple(sorted(out, key=MODULE_NAMES.index))


# ---------------------------------------------------------------------------------------------
# locating files


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise ModelLoadError(f"{path}: not valid JSON (nested too deeply)") from None


def _local_or_hub(text: str, role: str) -> Path:
    """An existing local path as it is; else a Hub repo id (``ORG/NAME[@REV]``) -> its snapshot
    directory (see hub.snapshot for ``role``); else the path as given (callers report it missing)."""
    p = Path(text)
    if p.exists():
        return p
    ref = hub.parse_repo_ref(text)
    return _typed_snapshot(ref, role) if ref is not None else p


def _typed_snapshot(ref: hub.RepoRef, role: str) -> Path:
    """hub.snapshot of a repo id the user typed: a failure also says it is no local path."""
    try:
        return hub.snapshot(ref, role)
    except hub.HubError as e:
        raise hub.HubError(f"{e} ('{ref}' is not a local path either)") from None


def _locate_model(name: str, have_weights: bool) -> tuple[Optional[Path], Optional[ModelSpec], Optional[Path]]:
    """-> (directory holding config.json or None, known-model spec or None, default weights path)."""
    p = Path(name)
    if p.is_dir():
        return p, None, p
    ref = None if p.exists() else hub.parse_repo_ref(name)
    if ref is not None:  # only the JSON files when the weights come from elsewhere
        d = _typed_snapshot(ref, "config" if have_weights else "model")
        return d, None, d
    try:
        spec = get_known_model(name)
    except ValueError as e:
        raise ModelLoadError(f"{e} (or give a directory holding config.json, or a Hub repo id ORG/NAME)") from None
    if have_weights:
        return None, spec, None
    try:  # a known name without local weights: its Hub repo
        d = hub.snapshot(hub.parse_repo_ref(spec.repo_id), "weights")
    except hub.HubError as e:
        raise ModelLoadError(f"model {name!r}: {e}; or give --weights (the .safetensors file or its "
                             "directory)") from None
    # the repo's own config.json describes its files; the table's config is the fallback
    return (d if (d / "config.json").is_file() else None), spec, d


def _resolve(model: PathLike, weights: Optional[PathLike]) -> tuple[FalconConfig, Optional[QuantizeConfig], Path, list[Path]]:
    """-> (config, quantize config (None: not found), weights path, directories to search for a tokenizer)."""
    model_str = os.fspath(model)
    model_dir, spec, default_weights = _locate_model(model_str, weights is not None)
    search: list[Path] = []
    qcfg: Optional[QuantizeConfig] = None
    if model_dir is not None:
        if not (model_dir / "config.json").is_file():
            raise ModelLoadError(f"{model_dir}: no config.json in this directory")
        raw = _read_json(model_dir / "config.json")
        cfg = parse_config(raw, source=str(model_dir / "config.json"))
        search.append(model_dir)
        if (model_dir / "quantize_config.json").is_file():
            qcfg = parse_quantize_config(_read_json(model_dir / "quantize_config.json"),
                                         source=str(model_dir / "quantize_config.json"))
        elif isinstance(raw, dict) and "quantization_config" in raw:
            qcfg = parse_quantize_config(raw, source=str(model_dir / "config.json"))
    else:
        assert spec is not None
        cfg = spec.config
        qcfg = spec.quantize_config
    if weights is not None:
        wpath = _local_or_hub(os.fspath(weights), "weights")
        if not wpath.exists():
            raise FileNotFoundError(f"weights not found: {wpath}{download_hint(spec)}")
    else:
        assert default_weights is not None  # _locate_model gives one whenever no weights are given
        wpath = default_weights
    wdir = wpath if wpath.is_dir() else wpath.parent
    if wdir not in search:
        search.append(wdir)
        if (wdir / "quantize_config.json").is_file():
            qcfg = parse_quantize_config(_read_json(wdir / "quantize_config.json"),
                                         source=str(wdir / "quantize_config.json"))
    return cfg, qcfg, wpath, search


def download_hint(spec: Optional[ModelSpec]) -> str:
    """Where a known model's files come from ("" for a model directory)."""
    if spec is None:
        return ""
    files = (f"{spec.weights_name} (or model.safetensors), quantize_config.json" if spec.quantized
             else "the *.safetensors files")
    return (f"; without --weights falcontune downloads {spec.repo_id} from the Hugging Face Hub itself, or "
            f"download {files}, config.json and tokenizer.json from https://huggingface.co/{spec.repo_id} "
            "into one directory (e.g. huggingface-cli download "
            f"{spec.repo_id} --local-dir {spec.name}) and pass that directory or the weights file")


def _find_weights_file(path: Path, qcfg: Optional[QuantizeConfig]) -> Path:
    """A directory may hold TheBloke's renamed model.safetensors or AutoGPTQ's name."""
    if path.is_file():
        return path
    names = [qcfg.weights_file_name] if qcfg else []
    for name in names + ["model.safetensors", "model.safetensors.index.json"]:
        if (path / name).is_file():
            return path / name
    files = sorted(path.glob("*.safetensors"))
    if len(files) == 1:
        return files[0]
    if not files:
        raise FileNotFoundError(f"{path}: no .safetensors weights in this directory")
    return path  # several shards without an index: WeightStore opens them all


# ---------------------------------------------------------------------------------------------
# engine binding


def _engine_config(cfg: FalconConfig, q: QuantizeConfig) -> dict[str, Any]:
    return {
        "vocab_size": cfg.vocab_size, "hidden": cfg.hidden_size, "n_head": cfg.num_attention_heads,
        "n_kv_head": cfg.num_kv_heads, "n_layer": cfg.num_hidden_layers, "head_dim": cfg.head_dim,
        "ffn": cfg.ffn_hidden_size, "qkv_layout": QKV_LAYOUTS.index(cfg.qkv_layout),
        "parallel_attn": int(cfg.parallel_attn), "n_ln": int(cfg.num_ln_in_parallel_attn),
        "alibi": int(cfg.alibi), "bias": int(cfg.bias), "ln_eps": float(cfg.layer_norm_epsilon),
        "rope_theta": float(cfg.rope_theta), "bits": q.bits, "zero_offset": q.zero_offset,
    }


def _engine_tensor(store: WeightStore, name: str) -> Any:
    arr = store.tensor(name)
    dt = store.dtype(name)
    if dt == "BF16":
        return (arr, "bfloat16")
    if dt in ("F16", "F32", "I32"):
        return arr
    if dt == "F64":
        return arr.astype(np.float32)
    if dt in ("I64", "I16", "I8", "U8") and name.endswith(".g_idx"):
        if arr.size and (arr.min() < 0 or arr.max() > np.iinfo(np.int32).max):
            raise ModelLoadError(f"{name}: g_idx values out of range")
        return arr.astype(np.int32)
    raise ModelLoadError(f"{store.file_of(name)}: tensor {name} has dtype {dt}, which falcontune does not use here")


def _check_quant_shapes(store: WeightStore, cfg: FalconConfig, q: QuantizeConfig, weights: dict[str, Any]) -> None:
    """Cross-check the file against quantize_config (the C engine checks raw shapes again)."""
    for layer in range(cfg.num_hidden_layers):
        for path, (fin, fout) in cfg.linear_shapes.items():
            base = f"transformer.h.{layer}.{path}"
            qw = f"{base}.qweight"
            if not store.has(qw):
                if store.has(f"{base}.weight"):
                    raise ModelLoadError(
                        f"{store.files[0]}: {base} is not GPTQ-quantized (found .weight, no .qweight); "
                        "this loader needs a GPTQ checkpoint")
                raise ModelLoadError(f"{store.files[0]}: missing tensor {qw}")
            shape = store.shape(qw)
            if len(shape) != 2 or shape[0] * 32 != fin * q.bits or shape[1] != fout:
                raise ModelLoadError(
                    f"{store.file_of(qw)}: {qw} has shape {list(shape)}, expected "
                    f"[{fin * q.bits // 32}, {fout}] for {q.bits}-bit weights of a {fin}x{fout} linear: "
                    f"the weights do not match the model config / quantize_config (bits={q.bits})")
            sc = f"{base}.scales"
            if store.has(sc):
                groups = store.shape(sc)[0]
                expected = 1 if q.group_size == -1 else -(-fin // q.group_size)
                if groups != expected:
                    raise ModelLoadError(
                        f"{store.file_of(sc)}: {sc} has {groups} groups, expected {expected} for "
                        f"group_size={q.group_size} (quantize_config): weights and config do not match")
            gi = f"{base}.g_idx"
            if not store.has(gi):  # old GPTQ exports: sequential groups
                gs = fin if q.group_size == -1 else q.group_size
                weights[gi] = (np.arange(fin, dtype=np.int32) // gs).astype(np.int32)


def _layer_index(name: str) -> Optional[int]:
    """N of transformer.h.N.*, else None."""
    parts = name.split(".", 3)
    if len(parts) >= 3 and parts[0] == "transformer" and parts[1] == "h" and parts[2].isdigit():
        return int(parts[2])
    return None


def _engine_float(store: WeightStore, name: str) -> np.ndarray:
    dt = store.dtype(name)
    if dt not in ("F16", "BF16", "F32", "F64"):
        raise ModelLoadError(f"{store.file_of(name)}: tensor {name} has dtype {dt}, expected a float dtype")
    return to_float32(store.tensor(name), dt)


def _is_gptq(store: WeightStore) -> bool:
    return any(n.endswith(".qweight") for n in store.names())


def _quantize_on_load(store: WeightStore, cfg: FalconConfig, q: QuantizeConfig, weights: dict[str, Any]) -> None:
    """Unquantized checkpoint: pack each linear in C (round to nearest, GPTQ v2 layout)."""
    for layer in range(cfg.num_hidden_layers):
        for path, (fin, fout) in cfg.linear_shapes.items():
            name = f"transformer.h.{layer}.{path}.weight"
            if not store.has(name):
                raise ModelLoadError(f"{store.files[0]}: missing tensor {name}")
            if tuple(store.shape(name)) != (fout, fin):
                raise ModelLoadError(f"{store.file_of(name)}: {name} has shape {list(store.shape(name))}, "
                                     f"expected [{fout}, {fin}] for this model config")
            qw, qz, sc, gi = _C.quantize_rtn(_engine_tensor(store, name), q.bits, q.group_size)
            base = name[: -len(".weight")]
            weights.update({f"{base}.qweight": qw, f"{base}.qzeros": qz, f"{base}.scales": sc, f"{base}.g_idx": gi})


def _bind_weights(store: WeightStore, cfg: FalconConfig, q: QuantizeConfig, quantize: bool) -> dict[str, Any]:
    weights: dict[str, Any] = {}
    if quantize:
        _quantize_on_load(store, cfg, q, weights)
    else:
        _check_quant_shapes(store, cfg, q, weights)
    for name in store.names():
        if name.startswith("transformer.") or name == "lm_head.weight":
            if name in weights:
                continue
            if name.endswith(".weight") and ".h." in name and name.split(".")[-2] in MODULE_NAMES:
                continue  # dense copy of a quantized linear: not used
            layer = _layer_index(name)
            if layer is not None and layer >= cfg.num_hidden_layers:
                raise ModelLoadError(
                    f"{store.file_of(name)}: tensor {name} is for layer {layer}, but the config has "
                    f"num_hidden_layers={cfg.num_hidden_layers}: weights and config do not match")
            if (not cfg.bias and layer is not None and name.endswith(".bias")
                    and name.split(".")[-2] in MODULE_NAMES):
                # GPTQ-for-LLaMa / some AutoGPTQ exports store all-zero biases for bias-free linears
                if np.any(_engine_float(store, name) != 0):
                    raise ModelLoadError(
                        f"{store.file_of(name)}: tensor {name} is a non-zero linear bias, but the config "
                        "says bias=false: weights and config do not match")
                continue
            weights[name] = _engine_tensor(store, name)
    if not cfg.tie_word_embeddings and "lm_head.weight" not in weights:
        raise ModelLoadError(f"{store.files[0]}: config says tie_word_embeddings=false but lm_head.weight is missing")
    return weights


_BACKENDS = ("auto", "cpu", "cuda", "triton", "torch")
_NO_CUDA_BUILD = ("this falcontune was installed without its CUDA engine (no GPU was visible and "
                  "FALCONTUNE_CUDA=1 was not set at install time); reinstall with FALCONTUNE_CUDA=1, "
                  "or use the CPU")


def resolve_device(backend: Optional[str] = None, device: Optional[str] = None,
                   say: Optional[Callable[[str], None]] = None) -> str:
    """The engine device ('cpu' or 'cuda:N') for a ``backend`` / ``device`` pair (the one place
    where it is decided). ``device`` wins over ``backend``; both accept auto, cpu, cuda, cuda:N,
    and falcontune's triton / torch backends, which mean our CUDA engine here (``say`` is told).
    'auto' is CUDA when ``cuda_available()``, else the CPU. Asking for CUDA without a CUDA build
    or without a visible GPU raises a ``ParameterError`` naming the parameter. In an MPI job of
    several processes (falcontune.dist), CUDA is the GPU of the process's local rank."""
    from . import dist

    name = "device" if device else "backend"
    value = device if device else (backend or "auto")
    choice = str(value).strip().lower()
    if choice in ("triton", "torch"):
        if say is not None:
            say(f"note: {name}={choice} selects falcontune's PyTorch kernels; this falcontune has its own "
                "engine, so it runs on CUDA (same as cuda)")
        choice = "cuda"
    if choice == "auto":
        if not cuda_available():
            return "cpu"
        choice = "cuda"
    if choice == "cpu":
        return "cpu"
    index = 0
    if choice.startswith("cuda:") and choice[5:].isdigit():
        index = int(choice[5:])
    elif choice != "cuda":
        raise ParameterError(f"{{{name}}}: expected one of {', '.join(_BACKENDS)}, or cuda:N", **{name: value})
    if not cuda_compiled():
        raise ParameterError(f"{{{name}}}: {_NO_CUDA_BUILD}", **{name: value})
    visible = int(_C.cuda_device_count())
    if visible == 0:
        raise ParameterError(f"{{{name}}}: no NVIDIA GPU is visible (nvidia-smi lists none); use the CPU",
                             **{name: value})
    world = dist.current()
    if world.size > 1:
        mine = dist.gpu_index(world, visible)
        if choice != "cuda" and index != mine:
            raise ParameterError(f"{{{name}}}: in an MPI job each process uses the GPU of its local rank (cuda:{mine} "
                                 "for this one); pass cuda or auto", **{name: value})
        index = mine
    if index >= visible:
        raise ParameterError(f"{{{name}}}: only {visible} GPU(s) visible (cuda:0 to cuda:{visible - 1})",
                             **{name: value})
    return f"cuda:{index}"


_DTYPES = {"auto": -1, "float32": 0, "fp32": 0, "float16": 1, "fp16": 1, "bfloat16": 2, "bf16": 2}


class FalconModel:
    """A quantized Falcon model on one device, with an optional LoRA adapter."""

    def __init__(self, engine: Any, config: FalconConfig, quantize_config: QuantizeConfig,
                 tokenizer: Any, store: WeightStore, name: str) -> None:
        self._engine = engine
        self.config = config
        self.quantize_config = quantize_config
        self.tokenizer = tokenizer
        self._store = store  # keeps the mmapped weights alive
        self.name = name
        self.lora_config: Optional[dict[str, Any]] = None
        self.training = False

    # -- properties -----------------------------------------------------------------------
    @property
    def device(self) -> str:
        return self._engine.device

    @property
    def dtype(self) -> str:
        return self._engine.act_dtype

    @property
    def engine(self) -> Any:
        return self._engine

    @property
    def store(self) -> WeightStore:
        """The base checkpoint's tensors as loaded (memory-mapped): GPTQ-packed or float."""
        return self._store

    def __repr__(self) -> str:
        c = self.config
        lora = f", lora r={self.lora_config['r']}" if self.lora_config else ""
        return (f"FalconModel({self.name!r}, layers={c.num_hidden_layers}, hidden={c.hidden_size}, "
                f"{self.quantize_config.bits}-bit, device={self.device!r}{lora})")

    # -- LoRA -----------------------------------------------------------------------------
    def add_lora(self, r: int = 8, alpha: float = 16, dropout: float = 0.05,
                 target_modules: Union[str, Iterable[str]] = ("query_key_value",), seed: int = 0) -> None:
        """A fresh adapter initialised as PEFT does: A ~ U(-1/sqrt(in), 1/sqrt(in)), B = 0."""
        modules = parse_target_modules(target_modules)
        if not isinstance(r, (int, np.integer)) or isinstance(r, bool) or not 0 < r <= 4096:
            raise ValueError(f"lora r must be an integer in [1, 4096], got {r!r}")
        if not np.isfinite(alpha):
            raise ValueError(f"lora alpha must be a finite number, got {alpha!r}")
        self._engine.lora_init(int(r), float(alpha), float(dropout), target_mask(modules))
        self.lora_config = {"r": int(r), "lora_alpha": float(alpha), "lora_dropout": float(dropout),
                            "target_modules": list(modules)}
        rng = np.random.default_rng(seed)
        for layer in range(self.config.num_hidden_layers):
            for m in modules:
                fin, fout = self.config.linear_shapes[module(m).path]
                bound = 1.0 / np.sqrt(fin)
                A = rng.uniform(-bound, bound, size=(r, fin)).astype(np.float32)
                B = np.zeros((fout, r), dtype=np.float32)
                self._engine.lora_write(SLOT_WEIGHT, layer, module(m).index, A, B)
        self._engine.set_training(self.training)

    def _require_lora(self) -> dict[str, Any]:
        if not self.lora_config:
            raise RuntimeError("the model has no LoRA adapter: call add_lora() or load_lora() first")
        return self.lora_config

    def _read_slot(self, slot: int) -> dict[str, np.ndarray]:
        cfg = self._require_lora()
        out: dict[str, np.ndarray] = {}
        for layer in range(self.config.num_hidden_layers):
            for m in cfg["target_modules"]:
                A, B = self._engine.lora_read(slot, layer, module(m).index)
                out[lora_key(layer, m, "A")] = A
                out[lora_key(layer, m, "B")] = B
        return out

    def _write_slot(self, slot: int, state: Mapping[str, np.ndarray], what: str) -> None:
        cfg = self._require_lora()
        expected = {lora_key(l, m, w) for l in range(self.config.num_hidden_layers)
                    for m in cfg["target_modules"] for w in "AB"}
        got = set(state)
        if got != expected:
            missing, extra = sorted(expected - got), sorted(got - expected)
            parts = []
            if missing:
                parts.append(f"missing {len(missing)} keys (e.g. {missing[0]})")
            if extra:
                parts.append(f"unexpected {len(extra)} keys (e.g. {extra[0]})")
            raise ValueError(f"{what}: " + "; ".join(parts))
        for layer in range(self.config.num_hidden_layers):
            for m in cfg["target_modules"]:
                self._engine.lora_write(slot, layer, module(m).index, state[lora_key(layer, m, "A")],
                                        state[lora_key(layer, m, "B")])

    def lora_state_dict(self) -> dict[str, np.ndarray]:
        """PEFT key names -> float32 copies of the LoRA matrices."""
        return self._read_slot(SLOT_WEIGHT)

    def load_lora_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        self._write_slot(SLOT_WEIGHT, lora_io.normalise_keys(state), "LoRA state dict")

    def lora_grad_dict(self) -> dict[str, np.ndarray]:
        """PEFT key names -> float32 copies of the accumulated gradients."""
        return self._read_slot(SLOT_GRAD)

    def optimizer_state(self) -> dict[str, dict[str, np.ndarray]]:
        return {"exp_avg": self._read_slot(SLOT_ADAM_M), "exp_avg_sq": self._read_slot(SLOT_ADAM_V)}

    def load_optimizer_state(self, state: Mapping[str, Mapping[str, np.ndarray]]) -> None:
        self._write_slot(SLOT_ADAM_M, state["exp_avg"], "optimizer exp_avg")
        self._write_slot(SLOT_ADAM_V, state["exp_avg_sq"], "optimizer exp_avg_sq")

    def zero_grad(self) -> None:
        self._engine.zero_grad()

    def load_lora(self, path: PathLike) -> None:
        """Load a PEFT adapter directory (adapter_config.json + adapter_model.safetensors or .bin)."""
        adapter = lora_io.read_adapter(path, self.config)
        self._engine.lora_init(adapter.r, adapter.engine_alpha, adapter.dropout,
                               target_mask(adapter.target_modules))
        self.lora_config = {"r": adapter.r, "lora_alpha": adapter.alpha, "lora_dropout": adapter.dropout,
                            "target_modules": list(adapter.target_modules), "use_rslora": adapter.use_rslora}
        try:
            self._write_slot(SLOT_WEIGHT, adapter.tensors, str(adapter.weights_path))
        except ValueError:
            self.remove_lora()
            raise
        self._engine.set_training(self.training)

    def save_lora(self, path: PathLike) -> Path:
        """Write a PEFT adapter (adapter_config.json + adapter_model.safetensors), atomically per file."""
        cfg = self._require_lora()
        return lora_io.write_adapter(path, self.lora_state_dict(), cfg, base_model=self.name)

    def remove_lora(self) -> None:
        self._engine.lora_remove()
        self.lora_config = None

    # -- modes ----------------------------------------------------------------------------
    def train(self, mode: bool = True) -> "FalconModel":
        self.training = bool(mode)
        self._engine.set_training(self.training)
        return self

    def eval(self) -> "FalconModel":
        return self.train(False)

    def set_gradient_checkpointing(self, ratio: float = 1.0) -> None:
        """Recompute activations of the first ``ratio`` of the layers during backward."""
        if not 0.0 <= float(ratio) <= 1.0:
            raise ValueError(f"gradient checkpointing ratio must be in [0, 1], got {ratio!r}")
        self._engine.set_checkpointing(float(ratio))

    # -- compute --------------------------------------------------------------------------
    def forward(self, input_ids: Any, attention_mask: Any = None) -> np.ndarray:
        """float32 logits [B, T, V]."""
        return self._engine.forward(_as_2d(input_ids, "input_ids"), _opt_2d(attention_mask))

    __call__ = forward

    def forward_backward(self, input_ids: Any, labels: Any, attention_mask: Any = None,
                         grad_scale: float = 1.0) -> float:
        """Mean loss over labels != -100 (shifted inside); adds grad_scale * gradient to the LoRA grads."""
        self._require_lora()
        loss, _ = self._engine.forward_backward(_as_2d(input_ids, "input_ids"), _as_2d(labels, "labels"),
                                                _opt_2d(attention_mask), float(grad_scale))
        return float(loss)

    def loss(self, input_ids: Any, labels: Any, attention_mask: Any = None) -> tuple[float, int]:
        """(mean loss over labels != -100, number of such tokens) without gradients or dropout:
        evaluation; the logits stay on the device."""
        loss, n = self._engine.forward_loss(_as_2d(input_ids, "input_ids"), _as_2d(labels, "labels"),
                                            _opt_2d(attention_mask))
        return float(loss), int(n)

    def forward_backward_count(self, input_ids: Any, labels: Any, attention_mask: Any = None,
                               grad_scale: float = 1.0) -> tuple[float, int]:
        """As forward_backward, also returning the number of predicted tokens."""
        self._require_lora()
        loss, n = self._engine.forward_backward(_as_2d(input_ids, "input_ids"), _as_2d(labels, "labels"),
                                                _opt_2d(attention_mask), float(grad_scale))
        return float(loss), int(n)

    # -- generation (falcontune.generate) ---------------------------------------------------
    def generate_ids(self, input_ids: Any, max_new_tokens: int = 32, do_sample: bool = False, **kw: Any) -> np.ndarray:
        from .generate import generate_ids
        return generate_ids(self, input_ids, max_new_tokens=max_new_tokens, do_sample=do_sample, **kw)

    def generate(self, prompt: Optional[str] = None, input_ids: Any = None, max_new_tokens: int = 128,
                 **kw: Any) -> Any:
        from .generate import generate_text
        return generate_text(self, prompt=prompt, input_ids=input_ids, max_new_tokens=max_new_tokens, **kw)

    def op_costs(self, reset: bool = False) -> dict[str, dict[str, int]]:
        """FLOPs and bytes of each engine op called since loading (or the last reset):
        ``{op: {"calls", "flops", "bytes", "act_elems", "weight_elems", "fixed_bytes",
        "dequant_elems"}}``, counted from the ops' shapes (csrc/cost.h says how). Needs
        ``FT_COUNT_COSTS=1`` in the environment when the model is loaded."""
        return self._engine.op_costs(reset=reset)

    def close(self) -> None:
        """Free the engine's memory now (the object is unusable afterwards)."""
        self._engine.close()


def _as_2d(a: Any, what: str) -> np.ndarray:
    arr = np.asarray(a)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise ValueError(f"{what}: expected shape [batch, tokens], got {arr.shape}")
    return arr


def _opt_2d(a: Any) -> Optional[np.ndarray]:
    return None if a is None else _as_2d(a, "attention_mask")


@dataclass
class Checkpoint:
    """A model's files, found and opened, with no engine: what load_model binds and what
    merge / export read."""

    name: str
    config: FalconConfig
    quantize_config: Optional[QuantizeConfig]  # None: float weights (load_model quantizes them)
    store: WeightStore
    tokenizer_file: Optional[Path]  # None: no tokenizer found

    def load_tokenizer(self) -> Any:
        from .tokenizer import Tokenizer
        return Tokenizer.from_file(self.tokenizer_file) if self.tokenizer_file is not None else None


def open_checkpoint(model: PathLike, weights: Optional[PathLike] = None,
                    tokenizer: Optional[PathLike] = None) -> Checkpoint:
    """Find and open a model's files: ``model`` is a directory holding config.json, a Hub repo id
    (``ORG/NAME`` or ``ORG/NAME@REV``), a known name (KNOWN_MODELS: its repo when ``weights`` is
    None) or ``"demo"``; ``weights`` and ``tokenizer`` may be local paths or repo ids too."""
    if os.fspath(model) == "demo":
        from .demo import demo_model_dir
        model = demo_model_dir()
    cfg, qcfg, wpath, search = _resolve(model, weights)
    store = WeightStore.open(_find_weights_file(wpath, qcfg))
    if not _is_gptq(store):
        qcfg = None
    elif qcfg is None:
        store.close()
        raise ModelLoadError(f"{os.fspath(model)}: GPTQ weights but no quantize_config.json (bits, group_size) "
                             "next to the model or the weights")
    tok_file: Optional[Path] = None
    if tokenizer is not None:
        tok_file = _local_or_hub(os.fspath(tokenizer), "tokenizer")
        if tok_file.is_dir():
            tok_file = tok_file / "tokenizer.json"  # Tokenizer.from_file explains when it is missing
    else:
        tok_file = next((d / "tokenizer.json" for d in search if (d / "tokenizer.json").is_file()), None)
    return Checkpoint(os.fspath(model), cfg, qcfg, store, tok_file)


def load_model(model: PathLike, weights: Optional[PathLike] = None, device: str = "auto", dtype: str = "auto",
               tokenizer: Optional[PathLike] = None, quantize_bits: int = 8,
               quantize_group_size: int = 128) -> FalconModel:
    """Load a Falcon model: a directory, a Hub repo id, a known name or ``"demo"`` (see
    open_checkpoint).

    GPTQ checkpoints are used as they are. Unquantized checkpoints (falcon-7b, falcon-rw-1b, ...)
    are quantized on load in C to ``quantize_bits`` (8 by default; 4 fits a 16 GB T4 for 40B-class
    memory budgets) with groups of ``quantize_group_size`` input features."""
    dev = resolve_device(device=device)  # before reading any file: a device error names no weights
    ckpt = open_checkpoint(model, weights, tokenizer)
    cfg, store = ckpt.config, ckpt.store
    quantize = ckpt.quantize_config is None
    if quantize:
        qcfg = QuantizeConfig(bits=quantize_bits, group_size=quantize_group_size, checkpoint_format="gptq_v2",
                              source="quantize on load")
    else:
        qcfg = ckpt.quantize_config
    weights_map = _bind_weights(store, cfg, qcfg, quantize)
    if dtype not in _DTYPES:
        raise ValueError(f"dtype: expected one of {', '.join(_DTYPES)}, got {dtype!r}")
    try:
        engine = _C.Model(_engine_config(cfg, qcfg), weights_map, dev, _DTYPES[dtype])
    except (ValueError, KeyError, TypeError, NotImplementedError) as e:
        # the engine names the tensor; add the file it came from
        where = store.files[0] if len(store.files) == 1 else store.source
        msg = f"{where}: {e.args[0] if e.args else e}"
        if isinstance(e, KeyError):
            raise TensorNotFoundError(msg) from None
        if isinstance(e, ValueError):
            raise ModelLoadError(msg) from None
        raise type(e)(msg) from None
    tok = ckpt.load_tokenizer()
    if tok is not None and tok.vocab_size > cfg.vocab_size:
        raise ModelLoadError(f"tokenizer has {tok.vocab_size} tokens but the model's vocab_size is {cfg.vocab_size}: "
                             "they do not belong together")
    return FalconModel(engine, cfg, qcfg, tok, store, ckpt.name)
