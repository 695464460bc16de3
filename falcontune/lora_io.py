"""PEFT adapter files: adapter_config.json + adapter_model.safetensors (or .bin).

Adapters written here load in HF peft; adapters written by peft load here.
A torch ``.bin`` adapter is read without torch by a restricted unpickler that
only rebuilds tensors (no arbitrary code runs).
"""
from __future__ import annotations

import io
import json
import math
import os
import pickle
import re
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Union

import numpy as np

from .layout import MODULE_NAMES, MODULES, lora_key
from .models import FalconConfig
from .weights import WeightStore, atomic_write, save_safetensors, to_float32

PathLike = Union[str, os.PathLike]
# a PEFT LoRA key, with or without the adapter name; groups: layer, module path, A or B
_KEY = re.compile(r"^(?:base_model\.model\.)?(?:model\.)?transformer\.h\.(\d+)\."
                  r"(" + "|".join(re.escape(m.path) for m in MODULES) + r")\.lora_([AB])(?:\.default)?\.weight$")
_NAME_OF_PATH = {m.path: m.name for m in MODULES}


class AdapterError(ValueError):
    """An adapter directory that cannot be used with this model."""


def lora_scale(r: int, alpha: float, use_rslora: bool = False) -> float:
    """What the adapter's B @ A is multiplied by (PEFT's rule): alpha / r, or alpha / sqrt(r)
    for rsLoRA. The one place this is computed (the engine, -c and export all use it)."""
    return float(alpha) / (math.sqrt(r) if use_rslora else r)


@dataclass
class Adapter:
    r: int
    alpha: float
    dropout: float
    target_modules: tuple[str, ...]
    use_rslora: bool
    tensors: dict[str, np.ndarray]
    weights_path: Path

    @property
    def scale(self) -> float:
        return lora_scale(self.r, self.alpha, self.use_rslora)

    @property
    def engine_alpha(self) -> float:
        """The engine scales by alpha / r: the alpha that gives this adapter's scale."""
        return self.scale * self.r


def normalise_keys(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """PEFT names with or without the adapter name ('.default') -> the saved form."""
    out: dict[str, np.ndarray] = {}
    origin: dict[str, str] = {}
    for k, v in state.items():
        m = _KEY.match(k)
        if not m:
            name = k
        else:
            layer, path, which = m.groups()
            name = lora_key(int(layer), _NAME_OF_PATH[path], which)
        if name in out:
            raise AdapterError(f"LoRA keys '{origin[name]}' and '{k}' name the same matrix {name}")
        out[name] = v
        origin[name] = k
    return out


def write_adapter(path: PathLike, state: Mapping[str, np.ndarray], cfg: Mapping[str, Any], base_model: str) -> Path:
    """Weights first, then the config: a directory with a config always has its weights."""
    out = Path(os.fspath(path))
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(f"cannot create adapter directory {out}: {e.strerror}") from None
    save_safetensors(out / "adapter_model.safetensors", {k: np.ascontiguousarray(v, dtype=np.float32)
                                                          for k, v in state.items()},
                     metadata={"format": "pt"})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": int(cfg["r"]), "lora_alpha": cfg["lora_alpha"], "lora_dropout": cfg["lora_dropout"],
        "target_modules": list(cfg["target_modules"]), "bias": "none", "fan_in_fan_out": False,
        "inference_mode": True, "init_lora_weights": True, "modules_to_save": None,
        "layers_to_transform": None, "layers_pattern": None, "use_rslora": bool(cfg.get("use_rslora", False)),
        "use_dora": False, "revision": None,
    }
    # atomic_write creates files like open() does (0666 minus the umask: 0644), not mkstemp's 0600
    with atomic_write(out / "adapter_config.json") as f:
        f.write((json.dumps(config, indent=2) + "\n").encode("utf-8"))
    return out


# ---------------------------------------------------------------------------------------------
# torch .bin without torch


class _Storage:
    def __init__(self, dtype: np.dtype, key: str) -> None:
        self.dtype, self.key = dtype, key


_STORAGE_DTYPES = {"FloatStorage": np.float32, "HalfStorage": np.float16, "DoubleStorage": np.float64,
                   "BFloat16Storage": "bf16", "IntStorage": np.int32, "LongStorage": np.int64}


def _read_torch_bin(path: Path) -> dict[str, np.ndarray]:
    try:
        return _read_torch_bin_unchecked(path)
    except AdapterError:
        raise
    except (zipfile.BadZipFile, pickle.UnpicklingError, EOFError, RecursionError, ValueError, TypeError,
            KeyError, IndexError, AttributeError, OverflowError, MemoryError, zlib.error, NotImplementedError) as e:
        raise AdapterError(f"{path}: not a readable torch adapter archive ({type(e).__name__}: {e})") from None


def _read_torch_bin_unchecked(path: Path) -> dict[str, np.ndarray]:
    if not zipfile.is_zipfile(path):
        raise AdapterError(f"{path}: not a torch zip archive (legacy torch pickles are not supported; "
                           "re-save the adapter with safetensors)")
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        pkl = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pkl) != 1:
            raise AdapterError(f"{path}: no data.pkl in the archive")
        root = pkl[0][: -len("data.pkl")]
        blobs: dict[str, bytes] = {}

        def storage_bytes(key: str) -> bytes:
            if key not in blobs:
                try:
                    blobs[key] = zf.read(f"{root}data/{key}")
                except KeyError:
                    raise AdapterError(f"{path}: missing storage {key}") from None
            return blobs[key]

        def rebuild(storage: _Storage, offset: int, size: tuple, stride: tuple, *_: Any) -> np.ndarray:
            raw = storage_bytes(storage.key)
            if storage.dtype == "bf16":
                flat = to_float32(np.frombuffer(raw, dtype="<u2"), "BF16")
            else:
                flat = np.frombuffer(raw, dtype=np.dtype(storage.dtype).newbyteorder("<"))
            n = int(np.prod(size)) if size else 1
            expected = tuple(int(s) for s in np.cumprod((1,) + tuple(size[::-1]))[:-1][::-1]) if size else ()
            if tuple(stride) != expected or offset + n > flat.size:
                raise AdapterError(f"{path}: non-contiguous or truncated tensor in the archive")
            return np.array(flat[offset: offset + n].reshape(size), dtype=np.float32)

        class Unpickler(pickle.Unpickler):
            def find_class(self, module: str, name: str) -> Any:
                if module == "torch._utils" and name == "_rebuild_tensor_v2":
                    return rebuild
                if module == "torch" and name in _STORAGE_DTYPES:
                    return name
                if module == "collections" and name == "OrderedDict":
                    return dict
                raise AdapterError(f"{path}: refusing to load {module}.{name} from a pickle")

            def persistent_load(self, pid: Any) -> Any:
                if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
                    raise AdapterError(f"{path}: unexpected persistent id in pickle")
                kind = pid[1]
                kind = kind if isinstance(kind, str) else getattr(kind, "__name__", str(kind))
                if kind not in _STORAGE_DTYPES:
                    raise AdapterError(f"{path}: unsupported storage type {kind}")
                return _Storage(_STORAGE_DTYPES[kind], str(pid[2]))

        state = Unpickler(io.BytesIO(zf.read(pkl[0]))).load()
    if not isinstance(state, dict):
        raise AdapterError(f"{path}: expected a state dict")
    return state


# ---------------------------------------------------------------------------------------------


def read_adapter(path: PathLike, config: FalconConfig) -> Adapter:
    d = Path(os.fspath(path))
    cfg_path = d / "adapter_config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{d}: no adapter_config.json (expected a PEFT adapter directory)")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{cfg_path}: not valid JSON ({e})") from None
    except RecursionError:
        raise AdapterError(f"{cfg_path}: not valid JSON (nested too deeply)") from None
    if not isinstance(cfg, dict):
        raise AdapterError(f"{cfg_path}: expected a JSON object, got {type(cfg).__name__}")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{cfg_path}: expected a LORA adapter, got peft_type={cfg.get('peft_type')!r}")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in cfg:
            raise AdapterError(f"{cfg_path}: missing '{key}'")
    r = cfg["r"]
    if not isinstance(r, int) or isinstance(r, bool) or not 0 < r <= 4096:
        raise AdapterError(f"{cfg_path}: 'r' must be an integer in [1, 4096], got {r!r}")
    alpha, dropout = cfg["lora_alpha"], cfg.get("lora_dropout")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise AdapterError(f"{cfg_path}: 'lora_alpha' must be a finite number, got {alpha!r}")
    if dropout is not None and (isinstance(dropout, bool) or not isinstance(dropout, (int, float))
                                or not 0 <= dropout < 1):
        raise AdapterError(f"{cfg_path}: 'lora_dropout' must be a number in [0, 1) or null, got {dropout!r}")
    if cfg.get("bias", "none") != "none":
        raise AdapterError(f"{cfg_path}: bias={cfg['bias']!r} adapters are not supported (expected 'none')")
    if cfg.get("use_dora"):
        raise AdapterError(f"{cfg_path}: DoRA adapters are not supported")
    if cfg.get("layers_to_transform") is not None:
        raise AdapterError(f"{cfg_path}: adapters restricted to some layers (layers_to_transform) are not supported")
    if cfg.get("fan_in_fan_out"):
        raise AdapterError(f"{cfg_path}: fan_in_fan_out adapters are not supported")
    targets = cfg["target_modules"]
    if isinstance(targets, str):
        targets = [targets]
    if not isinstance(targets, list):
        raise AdapterError(f"{cfg_path}: 'target_modules' must be a list of module names, got {targets!r}")
    bad = [t for t in targets if not isinstance(t, str) or t not in MODULE_NAMES]
    if bad or not targets:
        raise AdapterError(f"{cfg_path}: target_modules {bad or targets} are not Falcon linears "
                           f"({', '.join(MODULE_NAMES)})")
    targets = tuple(sorted(set(targets), key=MODULE_NAMES.index))

    st_path, bin_path = d / "adapter_model.safetensors", d / "adapter_model.bin"
    if st_path.is_file():
        store = WeightStore.open(st_path)
        raw = {}
        try:
            for name in store.names():
                dt = store.dtype(name)
                if dt not in ("F16", "BF16", "F32", "F64"):
                    raise AdapterError(f"{st_path}: tensor {name} has dtype {dt}, expected F32, F16, BF16 or F64")
                raw[name] = to_float32(store.tensor(name), dt).copy()
        finally:
            store.close()
        wpath = st_path
    elif bin_path.is_file():
        raw = _read_torch_bin(bin_path)
        wpath = bin_path
    else:
        raise FileNotFoundError(f"{d}: no adapter_model.safetensors or adapter_model.bin")
    try:
        tensors = normalise_keys(raw)
    except AdapterError as e:
        raise AdapterError(f"{wpath}: {e}") from None
    # shapes: A [r, in], B [out, r]
    shapes = config.linear_shapes
    for k, v in tensors.items():
        m = _KEY.match(k)
        if not m:
            raise AdapterError(f"{wpath}: unexpected tensor {k}")
        layer, path, which = int(m.group(1)), m.group(2), m.group(3)
        module = _NAME_OF_PATH[path]
        if layer >= config.num_hidden_layers:
            raise AdapterError(f"{wpath}: {k} is for layer {layer} but the model has {config.num_hidden_layers}")
        if module not in targets:
            raise AdapterError(f"{wpath}: {k} is not among target_modules {list(targets)}")
        fin, fout = shapes[path]
        want = (r, fin) if which == "A" else (fout, r)
        if tuple(v.shape) != want:
            raise AdapterError(f"{wpath}: {k} has shape {list(v.shape)}, expected {list(want)} "
                               f"(r={r}, this model's {module} is {fin}->{fout})")
        if not np.isfinite(v).all():
            raise AdapterError(f"{wpath}: {k} holds NaN or infinite values")
    missing = [lora_key(layer, module, which)
               for layer in range(config.num_hidden_layers) for module in targets for which in "AB"]
    missing = [k for k in missing if k not in tensors]
    if missing:
        raise AdapterError(f"{wpath}: missing {len(missing)} LoRA tensors for target_modules {list(targets)} "
                           f"(e.g. {missing[0]})")
    return Adapter(r=r, alpha=float(alpha), dropout=float(dropout or 0.0),
                   target_modules=targets, use_rslora=bool(cfg.get("use_rslora", False)), tensors=tensors,
                   weights_path=wpath)
