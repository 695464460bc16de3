"""safetensors reading and writing without the safetensors package.

Format: 8-byte little-endian header length N, N bytes of JSON header
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``,
then the data buffer; offsets are relative to the start of the buffer (byte 8 + N).

Reading maps the file read-only and hands out zero-copy numpy views (BF16 as uint16 bit
patterns; use ``to_float32``). Arrays keep the mapping alive after ``close()``. Each view is
checked against the file's length at the time it is taken (a file truncated after it was opened
raises SafetensorsError instead of faulting); the engine copies what it keeps on the CPU.
"""
from __future__ import annotations

import contextlib
import json
import math
import mmap
import os
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator, Mapping, Optional, Union

import numpy as np

__all__ = [
    "SafetensorsError",
    "TensorNotFoundError",
    "ST_DTYPES",
    "SafetensorsFile",
    "WeightStore",
    "to_float32",
    "float32_to_bf16_bits",
    "save_safetensors",
    "atomic_write",
]

PathLike = Union[str, "os.PathLike[str]"]

#: safetensors dtype -> numpy dtype of the returned view (BF16 -> uint16 bit patterns)
ST_DTYPES: dict[str, np.dtype] = {
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
    "I8": np.dtype("i1"),
    "I16": np.dtype("<i2"),
    "I32": np.dtype("<i4"),
    "I64": np.dtype("<i8"),
    "U8": np.dtype("u1"),
    "U16": np.dtype("<u2"),
    "U32": np.dtype("<u4"),
    "U64": np.dtype("<u8"),
    "BOOL": np.dtype("?"),
}
#: numpy dtype kind+itemsize -> safetensors dtype, for writing
_NP_TO_ST: dict[str, str] = {
    "f2": "F16", "f4": "F32", "f8": "F64", "i1": "I8", "i2": "I16", "i4": "I32", "i8": "I64",
    "u1": "U8", "u2": "U16", "u4": "U32", "u8": "U64", "b1": "BOOL",
}
MAX_HEADER_BYTES = 100 * 1024 * 1024
_META = "__metadata__"


class SafetensorsError(ValueError):
    """A safetensors file (or index) is missing pieces, malformed or inconsistent."""


class TensorNotFoundError(SafetensorsError, KeyError):
    """A tensor name that the file / store does not hold."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class _Entry:
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


def _parse_header(path: Path, raw: bytes, data_start: int, file_size: int
                  ) -> tuple[dict[str, _Entry], dict[str, str]]:
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SafetensorsError(f"{path}: header is not valid UTF-8 JSON ({e}); "
                               "not a safetensors file or corrupted") from None
    except RecursionError:
        raise SafetensorsError(f"{path}: header JSON is nested too deeply; "
                               "not a safetensors file or corrupted") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: header must be a JSON object, got {type(header).__name__}")
    meta = header.pop(_META, None) or {}
    if not isinstance(meta, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise SafetensorsError(f"{path}: '__metadata__' must map strings to strings")
    buf_len = file_size - data_start
    entries: dict[str, _Entry] = {}
    for name, info in header.items():
        where = f"{path}: tensor '{name}'"
        if not isinstance(info, dict):
            raise SafetensorsError(f"{where}: entry must be an object with dtype/shape/data_offsets")
        dt, shape, offs = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dt not in ST_DTYPES:
            raise SafetensorsError(
                f"{where}: unknown dtype {dt!r} (known: {', '.join(ST_DTYPES)})")
        if not isinstance(shape, list) or not all(
                isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
            raise SafetensorsError(f"{where}: shape must be a list of non-negative integers, got {shape!r}")
        if (not isinstance(offs, list) or len(offs) != 2 or not all(
                isinstance(o, int) and not isinstance(o, bool) for o in offs)):
            raise SafetensorsError(f"{where}: data_offsets must be [begin, end] integers, got {offs!r}")
        begin, end = offs
        if not 0 <= begin <= end:
            raise SafetensorsError(f"{where}: bad data_offsets {offs} (need 0 <= begin <= end)")
        if end > buf_len:
            raise SafetensorsError(
                f"{where}: data_offsets {offs} run past the end of the data "
                f"({buf_len} bytes); file truncated?")
        expected = math.prod(shape) * ST_DTYPES[dt].itemsize
        if end - begin != expected:
            raise SafetensorsError(
                f"{where}: data_offsets {offs} span {end - begin} bytes but shape {shape} x "
                f"{dt} needs {expected}")
        entries[name] = _Entry(dt, tuple(shape), data_start + begin, end - begin)
    spans = sorted((e.start, e.start + e.nbytes, n) for n, e in entries.items() if e.nbytes)
    for (_, end0, n0), (start1, _, n1) in zip(spans, spans[1:]):
        if start1 < end0:
            raise SafetensorsError(f"{path}: tensors '{n0}' and '{n1}' overlap in the data buffer")
    return entries, dict(meta)


class SafetensorsFile:
    """One .safetensors file, memory-mapped read-only and validated on open."""

    def __init__(self, path: PathLike) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"{self.path}: no such safetensors file")
        if self.path.is_dir():
            raise SafetensorsError(f"{self.path}: is a directory, expected a .safetensors file")
        size = self.path.stat().st_size
        if size < 8:
            raise SafetensorsError(
                f"{self.path}: file is {size} bytes, too short for a safetensors file "
                "(needs an 8-byte header length)")
        with open(self.path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise SafetensorsError(
                    f"{self.path}: header length {n} is larger than the file ({size} bytes) or the "
                    f"{MAX_HEADER_BYTES} byte limit; not a safetensors file or truncated")
            raw = f.read(n)
            self._entries, self.metadata = _parse_header(self.path, raw, 8 + n, size)
            self._mm: Optional[mmap.mmap] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)

    # -- accessors -----------------------------------------------------------------------------
    def names(self) -> list[str]:
        return sorted(self._entries)

    def has(self, name: str) -> bool:
        return name in self._entries

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def _entry(self, name: str) -> _Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise TensorNotFoundError(f"{self.path}: no tensor named '{name}'") from None

    def dtype(self, name: str) -> str:
        return self._entry(name).dtype

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name).shape

    def tensor(self, name: str) -> np.ndarray:
        """Zero-copy read-only view of the tensor (BF16 as np.uint16 bit patterns)."""
        e = self._entry(name)
        if self._mm is None:
            raise SafetensorsError(f"{self.path}: file is closed (reading tensor '{name}')")
        # The file may have shrunk since it was opened (rewritten in place, a copy still running):
        # reading a mapped page past its end raises SIGBUS, which no exception handler catches.
        size = self._mm.size()  # fstat of the mapped file: its length now
        if e.start + e.nbytes > size:
            raise SafetensorsError(
                f"{self.path}: tensor '{name}' ends at byte {e.start + e.nbytes} but the file is now "
                f"{size} bytes long: it was truncated after it was opened")
        dt = ST_DTYPES[e.dtype]
        arr = np.frombuffer(self._mm, dtype=dt, count=e.nbytes // dt.itemsize, offset=e.start)
        return arr.reshape(e.shape)

    # -- lifetime ------------------------------------------------------------------------------
    def close(self) -> None:
        """Drop the mapping; arrays already handed out keep it alive until they are freed."""
        mm, self._mm = self._mm, None
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                pass  # views still exported: the mapping closes when the last one goes away

    @property
    def closed(self) -> bool:
        return self._mm is None

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SafetensorsFile({str(self.path)!r}, {len(self._entries)} tensors)"


# ---------------------------------------------------------------------------------------------
# several files behind one name space


def _normalise(name: str) -> str:
    return name[len("model."):] if name.startswith("model.") else name


class WeightStore:
    """Tensors of one checkpoint, possibly sharded, under normalised names (a leading "model."
    is stripped, so names look like ``transformer.h.0.self_attention.query_key_value.qweight``)."""

    def __init__(self, files: list[SafetensorsFile], source: PathLike) -> None:
        self.source = Path(source)
        self._files = list(files)
        self._where: dict[str, tuple[SafetensorsFile, str]] = {}
        for f in self._files:
            for raw in f.names():
                name = _normalise(raw)
                if name in self._where:
                    other, other_raw = self._where[name]
                    raise SafetensorsError(
                        f"{self.source}: tensor '{name}' is stored twice: as '{other_raw}' in "
                        f"{other.path} and as '{raw}' in {f.path}")
                self._where[name] = (f, raw)

    @classmethod
    def open(cls, path: PathLike) -> "WeightStore":
        """Open a .safetensors file, a ``*.safetensors.index.json`` (sharded) or a directory
        (its model.safetensors.index.json if present, else all its *.safetensors files)."""
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"{p}: no such weights file or directory")
        if p.is_dir():
            index = p / "model.safetensors.index.json"
            if not index.is_file():
                indexes = sorted(p.glob("*.safetensors.index.json"))
                index = indexes[0] if len(indexes) == 1 else index
            if index.is_file():
                return cls._open_index(index)
            files = sorted(q for q in p.glob("*.safetensors") if q.is_file())
            if not files:
                raise FileNotFoundError(
                    f"{p}: directory holds no *.safetensors file and no model.safetensors.index.json")
            return cls._open_files(files, p)
        if p.name.endswith(".json"):
            return cls._open_index(p)
        return cls._open_files([p], p)

    @classmethod
    def _open_files(cls, paths: Iterable[Path], source: Path) -> "WeightStore":
        opened: list[SafetensorsFile] = []
        try:
            for q in paths:
                opened.append(SafetensorsFile(q))
            return cls(opened, source)
        except BaseException:
            for f in opened:
                f.close()
            raise

    @classmethod
    def _open_index(cls, index: Path) -> "WeightStore":
        try:
            doc = json.loads(index.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise SafetensorsError(f"{index}: not a valid JSON index ({type(e).__name__}: {e})") from None
        wmap = doc.get("weight_map") if isinstance(doc, dict) else None
        if not isinstance(wmap, dict) or not wmap or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in wmap.items()):
            raise SafetensorsError(f"{index}: expected a non-empty 'weight_map' of tensor name -> file name")
        shard_names = sorted(set(wmap.values()))
        for s in shard_names:
            if not (index.parent / s).is_file():
                raise FileNotFoundError(f"{index}: shard '{s}' listed in weight_map is missing "
                                        f"(looked for {index.parent / s})")
        store = cls._open_files([index.parent / s for s in shard_names], index)
        by_shard = dict(zip(shard_names, store._files))
        for name, shard in wmap.items():
            if not by_shard[shard].has(name):
                store.close()
                raise SafetensorsError(
                    f"{index}: weight_map puts tensor '{name}' in '{shard}', but that file has no such tensor")
        return store

    # -- accessors -----------------------------------------------------------------------------
    @property
    def files(self) -> list[Path]:
        return [f.path for f in self._files]

    def names(self) -> list[str]:
        return sorted(self._where)

    def has(self, name: str) -> bool:
        return name in self._where

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def _lookup(self, name: str) -> tuple[SafetensorsFile, str]:
        try:
            return self._where[name]
        except KeyError:
            raise TensorNotFoundError(f"{self.source}: no tensor named '{name}'") from None

    def file_of(self, name: str) -> Path:
        return self._lookup(name)[0].path

    def dtype(self, name: str) -> str:
        f, raw = self._lookup(name)
        return f.dtype(raw)

    def shape(self, name: str) -> tuple[int, ...]:
        f, raw = self._lookup(name)
        return f.shape(raw)

    def tensor(self, name: str) -> np.ndarray:
        f, raw = self._lookup(name)
        return f.tensor(raw)

    def close(self) -> None:
        for f in self._files:
            f.close()

    def __enter__(self) -> "WeightStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"WeightStore({str(self.source)!r}, {len(self._where)} tensors, {len(self._files)} files)"


# ---------------------------------------------------------------------------------------------
# dtype conversion


def to_float32(arr: np.ndarray, st_dtype: str) -> np.ndarray:
    """F16/BF16/F32/F64 data (BF16 given as its uint16 bit patterns) -> float32.
    F32 input comes back as is (no copy)."""
    a = np.asarray(arr)
    if st_dtype == "BF16":
        if a.dtype.kind not in "ui" or a.dtype.itemsize != 2:
            raise SafetensorsError(f"to_float32: BF16 data must be a 16-bit integer view, got {a.dtype}")
        return (a.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    want = {"F16": np.float16, "F32": np.float32, "F64": np.float64}.get(st_dtype)
    if want is None:
        raise SafetensorsError(f"to_float32: cannot convert dtype {st_dtype!r} "
                               "(expected F16, BF16, F32 or F64)")
    if a.dtype != want:
        raise SafetensorsError(f"to_float32: data of dtype {a.dtype} does not match {st_dtype}")
    return a if a.dtype == np.float32 else a.astype(np.float32)


def float32_to_bf16_bits(arr: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest even; NaN stays NaN."""
    a = np.ascontiguousarray(arr, dtype=np.float32)
    u = a.view(np.uint32)
    rounded = ((u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    nan = np.isnan(a)
    if nan.any():
        rounded[nan] = ((u[nan] >> 16) | np.uint32(0x0040)).astype(np.uint16)  # quiet NaN, sign kept
    return rounded


# ---------------------------------------------------------------------------------------------
# writing


def _st_dtype(path: Path, name: str, a: np.ndarray, override: Optional[str]) -> str:
    where = f"save_safetensors({path}): tensor '{name}'"
    natural = _NP_TO_ST.get(f"{a.dtype.kind}{a.dtype.itemsize}")
    if override is None:
        if natural is None:
            raise SafetensorsError(f"{where} has unsupported dtype {a.dtype}")
        return natural
    if override == "BF16":
        if a.dtype.kind != "u" or a.dtype.itemsize != 2:
            raise SafetensorsError(
                f"{where} written as BF16 must be a uint16 bit-pattern array "
                f"(see float32_to_bf16_bits), got {a.dtype}")
        return "BF16"
    if override != natural:
        raise SafetensorsError(f"{where} is {a.dtype} but dtypes asks for {override!r}")
    return override


def _little_endian(a: np.ndarray) -> np.ndarray:
    if not a.flags.c_contiguous:
        a = a.copy(order="C")  # (np.ascontiguousarray would turn 0-d arrays into 1-d)
    if a.dtype.byteorder == ">" or (a.dtype.byteorder == "=" and sys.byteorder == "big"):
        a = a.astype(a.dtype.newbyteorder("<"))
    return a


def save_safetensors(path: PathLike, tensors: Mapping[str, np.ndarray],
                     metadata: Optional[Mapping[str, str]] = None,
                     dtypes: Optional[Mapping[str, str]] = None) -> Path:
    """Write ``tensors`` as a safetensors file, atomically (temp file in the same directory,
    fsync, rename). Header keys are sorted by name; the data is laid out by decreasing item size
    then name, so every tensor is aligned to its item size and the buffer has no holes (as the
    official writer does). ``dtypes`` may mark uint16 arrays as "BF16"."""
    path = Path(path)
    dtypes = dict(dtypes or {})
    unknown = set(dtypes) - set(tensors)
    if unknown:
        raise SafetensorsError(f"save_safetensors({path}): dtypes names unknown tensors {sorted(unknown)}")
    if metadata is not None and not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise SafetensorsError(f"save_safetensors({path}): metadata must map strings to strings")
    arrays: dict[str, np.ndarray] = {}
    kinds: dict[str, str] = {}
    for name, arr in tensors.items():
        if not isinstance(name, str) or not name or name == _META:
            raise SafetensorsError(f"save_safetensors({path}): invalid tensor name {name!r}")
        a = _little_endian(np.asarray(arr))
        kinds[name] = _st_dtype(path, name, a, dtypes.get(name))
        arrays[name] = a
    order = sorted(arrays, key=lambda n: (-arrays[n].dtype.itemsize, n))
    offsets: dict[str, list[int]] = {}
    pos = 0
    for name in order:
        offsets[name] = [pos, pos + arrays[name].nbytes]
        pos += arrays[name].nbytes
    header: dict[str, Any] = {}
    if metadata:
        header[_META] = dict(metadata)
    for name in sorted(arrays):
        header[name] = {"dtype": kinds[name], "shape": list(arrays[name].shape),
                        "data_offsets": offsets[name]}
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)

    with atomic_write(path) as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name in order:
            a = arrays[name]
            if a.size:
                f.write(memoryview(a.reshape(-1).view(np.uint8)))
    return path


@contextlib.contextmanager
def atomic_write(path: PathLike) -> Iterator[BinaryIO]:
    """Open ``path`` for binary writing through a temp file in the same directory; on success
    the data is fsynced and renamed over ``path``, on error the temp file is removed and
    ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)


def _fsync_dir(d: Path) -> None:
    if os.name != "posix":
        return
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
