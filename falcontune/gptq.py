"""The GPTQ storage format in numpy: bit packing and THE Python dequantizer.

merge.py (``-c``), export.py and the test helpers (testing.py) all dequantize through
``gptq_dequantize`` here; the C engine has its own dequantizer per backend (csrc/cpu, csrc/cuda),
tested against this one.

GPTQ storage (AutoGPTQ, "gptq" = v1 and "gptq_v2"):

* ``qweight`` int32 [in*bits/32, out]: the values of each column form a little-endian bit
  stream along ``in`` (value k of a 32-value block occupies stream bits k*bits .. k*bits+bits-1,
  word j of the block holding stream bits 32j..32j+31). For 2/4/8 bits that is "lowest bits
  first" within each word; for 3 bits 32 values fill 3 words and values 10 and 21 straddle
  word boundaries, exactly like AutoGPTQ's packer.
* ``qzeros`` int32 [groups, out*bits/32]: the same bit stream, along ``out``.
* ``scales`` float16 [groups, out]; ``g_idx`` int32 [in] (group of each input row).
* W[i, o] = scales[g, o] * (q[i, o] - z[g, o]), g = g_idx[i], with z = stored + 1 for v1 and
  z = stored for v2. The v1 "+1" is done after masking the stored field to ``bits`` and does
  NOT wrap (stored 2^bits-1 means z = 2^bits), as in AutoGPTQ's original kernels.

group_size: -1 means one group; the last group may be shorter (AutoGPTQ's ceil(in/group_size)).
in_features and out_features are multiples of 32 (packing).
"""
from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["GPTQError", "BITS", "FORMATS", "check_bits", "check_format", "pack_bits", "unpack_bits",
           "gptq_unpack", "gptq_dequantize"]

BITS = (2, 3, 4, 8)
FORMATS = ("gptq", "gptq_v2")


class GPTQError(ValueError):
    """Packed GPTQ tensors (or arguments) that do not fit the format."""


def check_bits(bits: Any, error: type[ValueError] = GPTQError) -> None:
    """``error``: the exception to raise (the test helpers raise their own)."""
    if bits not in BITS or isinstance(bits, bool):
        raise error(f"unsupported bits {bits!r} (supported: 2, 3, 4, 8)")


def check_format(fmt: Any, error: type[ValueError] = GPTQError) -> None:
    if fmt not in FORMATS:
        raise error(f"unsupported checkpoint_format {fmt!r} (expected 'gptq' or 'gptq_v2')")


# ---------------------------------------------------------------------------------------------
# bit packing (a little-endian bit stream of `bits`-bit values, 32 values per `bits` words)


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """uint32 [A, 32, B] values < 2**bits -> uint32 words [A, bits, B]."""
    a, _, b = values.shape
    words = np.zeros((a, bits, b), dtype=np.uint32)
    for k in range(32):  # loop over bit positions; each step is vectorized over A x B
        w, s = divmod(k * bits, 32)
        vk = values[:, k, :]
        words[:, w, :] |= vk << np.uint32(s)
        if s + bits > 32:
            words[:, w + 1, :] |= vk >> np.uint32(32 - s)
    return words


def unpack_bits(words: np.ndarray, bits: int) -> np.ndarray:
    """uint32 words [A, bits, B] -> uint8 values [A, 32, B]."""
    a, _, b = words.shape
    mask = np.uint32((1 << bits) - 1)
    out = np.empty((a, 32, b), dtype=np.uint8)
    for k in range(32):
        w, s = divmod(k * bits, 32)
        val = words[:, w, :] >> np.uint32(s)
        if s + bits > 32:
            val |= words[:, w + 1, :] << np.uint32(32 - s)
        out[:, k, :] = val & mask
    return out


def _as_u32(a: np.ndarray, what: str) -> np.ndarray:
    a = np.ascontiguousarray(a)
    if a.dtype not in (np.int32, np.uint32):
        raise GPTQError(f"{what} must be int32, got {a.dtype}")
    return a.view(np.uint32)


# ---------------------------------------------------------------------------------------------
# unpack / dequantize


def gptq_unpack(qweight: np.ndarray, qzeros: np.ndarray, bits: int, in_features: int,
                out_features: int) -> tuple[np.ndarray, np.ndarray]:
    """Unpack to (q uint8 [in, out], z uint8 [groups, out]); z is the stored field, before
    any v1 "+1"."""
    check_bits(bits)
    if in_features % 32 or out_features % 32:
        raise GPTQError(f"gptq_unpack: in/out features must be multiples of 32, got "
                        f"{in_features} x {out_features}")
    qw = _as_u32(qweight, "qweight")
    qz = _as_u32(qzeros, "qzeros")
    if qw.shape != (in_features * bits // 32, out_features):
        raise GPTQError(f"gptq_unpack: qweight shape {qw.shape}, expected "
                        f"{(in_features * bits // 32, out_features)} for {bits}-bit {in_features}x{out_features}")
    if qz.ndim != 2 or qz.shape[1] != out_features * bits // 32:
        raise GPTQError(f"gptq_unpack: qzeros shape {qz.shape}, expected "
                        f"(groups, {out_features * bits // 32})")
    groups = qz.shape[0]
    q = unpack_bits(qw.reshape(in_features // 32, bits, out_features), bits).reshape(in_features, out_features)
    z = unpack_bits(qz.reshape(groups * out_features // 32, bits, 1), bits).reshape(groups, out_features)
    return q, z


def gptq_dequantize(qweight: np.ndarray, qzeros: np.ndarray, scales: np.ndarray,
                    g_idx: np.ndarray, bits: int, checkpoint_format: str = "gptq",
                    dtype: Any = np.float64) -> np.ndarray:
    """W [in, out] of ``dtype`` (see the module docstring). float32 is exact for float16 scales:
    a float16 scale times an integer below 2**9 needs at most 20 significant bits."""
    check_bits(bits)
    check_format(checkpoint_format)
    qw = np.asarray(qweight)
    if qw.ndim != 2 or (qw.shape[0] * 32) % bits:
        raise GPTQError(f"gptq_dequantize: qweight shape {qw.shape} is not [in*bits/32, out]")
    in_f, out_f = qw.shape[0] * 32 // bits, qw.shape[1]
    q, z = gptq_unpack(qweight, qzeros, bits, in_f, out_f)
    sc = np.asarray(scales)
    gi = np.asarray(g_idx)
    if sc.shape != z.shape:
        raise GPTQError(f"gptq_dequantize: scales shape {sc.shape}, expected {z.shape}")
    if gi.shape != (in_f,) or gi.dtype.kind not in "iu":
        raise GPTQError(f"gptq_dequantize: g_idx must be integer [{in_f}], got {gi.dtype} {gi.shape}")
    if gi.size and (gi.min() < 0 or gi.max() >= z.shape[0]):
        raise GPTQError(f"gptq_dequantize: g_idx values must lie in [0, {z.shape[0]})")
    zf = z.astype(dtype)
    if checkpoint_format == "gptq":
        zf += 1
    w = q.astype(dtype)
    w -= zf[gi]
    w *= sc.astype(dtype)[gi]
    return w
