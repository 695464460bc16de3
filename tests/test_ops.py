"""Op-level tests: each op of the backend op table (csrc/backend.h ``ft_backend_ops``) run alone
through ``falcontune._C.OpRunner``, so a numeric mismatch names the op (as ggml's test-backend-ops
and llm.c's dev/cuda do).

* On the CPU, every case is compared with a float64 numpy reference written from the op's contract
  in backend.h (runs everywhere).
* Under ``@pytest.mark.cuda``, every case runs on the CUDA backend in bfloat16 and float16 and is
  compared with the CPU op on the same inputs rounded to that dtype, with the numerics contract's
  tolerance (2e-2 relative; integer and copy ops exactly); the ops a decode step captures also run
  captured in a CUDA graph; and no run leaves memory behind.
* ``test_every_op_has_a_case`` fails when an op is added to the table (``_C.OPS``) without a case.

A case gives every array the op touches, outputs too, filled with random values: an op that must
overwrite ("=") cannot pass by leaving them, one that accumulates ("+=") is checked to add to them.
"""
from __future__ import annotations

import math
import os
import pickle
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pytest

from falcontune import _C, testing
from falcontune.weights import float32_to_bf16_bits

Values = dict[str, Any]
Ref = dict[str, np.ndarray]


@dataclass
class Case:
    op: str
    id: str
    values: Values
    reference: Callable[[Values], Ref]  # float64 expected value of each output, from the inputs given
    lowp: tuple[str, ...] = ()          # arrays the backend holds in its activation / weight dtype
    tol: float = 1e-5                   # CPU vs the float64 reference: relative error (norm)
    exact_on_cuda: bool = False         # copies and integer results: CUDA equals CPU bit for bit
    graph: bool = False                 # a decode step captures this op (and shape): run it as a CUDA graph too
    outputs: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        self.outputs = tuple(self.reference(self.values))


def f32(rng: np.random.Generator, *shape: int, scale: float = 1.0, mean: float = 0.0) -> np.ndarray:
    return (mean + scale * rng.standard_normal(shape)).astype(np.float32)


def d(a: Any) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


_erf = np.vectorize(math.erf, otypes=[np.float64])


def gelu_grad(x: np.ndarray) -> np.ndarray:
    """d/dx of x * Phi(x) = Phi(x) + x * phi(x)"""
    return 0.5 * (1 + _erf(x / math.sqrt(2))) + x * np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


# ---------------------------------------------------------------------------------------------
# the dropout mask of csrc/rng.h, in numpy (uint64 arithmetic wraps as C's does)

def _mix64(x: np.ndarray) -> np.ndarray:
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def dropout_scale(seed: int, n: int, p: float) -> np.ndarray:
    """The factor each element of a dropped-out array gets: 0 or 1/(1-p) (float32, as the ops).
    Elements 2j and 2j + 1 take bits 40..63 and 16..39 of mix64(seed + j * gamma)."""
    if p <= 0:
        return np.ones(n)
    i = np.arange(n, dtype=np.uint64)
    with np.errstate(over="ignore"):
        h = _mix64(np.uint64(seed) + (i >> np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15))
    u = np.where(i & np.uint64(1), (h >> np.uint64(16)) & np.uint64(0xFFFFFF), h >> np.uint64(40)).astype(np.float32)
    keep = u >= np.float32(p) * np.float32(16777216.0)
    return np.where(keep, float(np.float32(1.0) / (np.float32(1.0) - np.float32(p))), 0.0)


# ---------------------------------------------------------------------------------------------
# cases, one builder per op (argument names are backend.h's)

def zero_cases(rng):
    for n in (1, 37, 1000):
        yield Case("zero", f"n{n}", {"n": n, "x": f32(rng, n)}, lambda v: {"x": np.zeros(v["n"])},
                   lowp=("x",), exact_on_cuda=True)


def _as_host_dtype(x: np.ndarray, src_dtype: int) -> np.ndarray:
    if src_dtype == 1:
        return d(x.astype(np.float16))
    if src_dtype == 2:
        return d((float32_to_bf16_bits(x).astype(np.uint32) << 16).view(np.float32))
    return d(x)


def dense_create_cases(rng):
    for src_dtype, name in ((0, "f32"), (1, "f16"), (2, "bf16")):
        n = 45
        yield Case("dense_create", name, {"n": n, "src_dtype": src_dtype, "src": f32(rng, n, scale=3.0),
                                          "dst": f32(rng, n)},
                   lambda v: {"dst": _as_host_dtype(v["src"], v["src_dtype"])}, tol=0.0)


def embed_cases(rng):
    for N, D, V in ((1, 3, 5), (13, 72, 50)):
        yield Case("embed", f"N{N}_D{D}", {"N": N, "D": D, "V": V, "ids": rng.integers(0, V, N),
                                           "table": f32(rng, V, D), "out": f32(rng, N, D)},
                   lambda v: {"out": d(v["table"])[v["ids"]]}, lowp=("table", "out"), tol=0.0,
                   exact_on_cuda=True, graph=True)


def _ln_stats(x: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    mu = d(x).mean(axis=1)
    return mu, 1.0 / np.sqrt(d(x).var(axis=1) + eps)


def layernorm_fwd_cases(rng):
    for N, D in ((1, 8), (7, 33), (5, 136)):
        def ref(v):
            mu, rs = _ln_stats(v["x"], v["eps"])
            return {"y": (d(v["x"]) - mu[:, None]) * rs[:, None] * d(v["g"]) + d(v["b"]), "mean": mu, "rstd": rs}
        yield Case("layernorm_fwd", f"N{N}_D{D}",
                   {"N": N, "D": D, "eps": 1e-5, "x": f32(rng, N, D, scale=2.0, mean=0.5), "g": f32(rng, D, mean=1.0),
                    "b": f32(rng, D, scale=0.1), "y": f32(rng, N, D), "mean": f32(rng, N), "rstd": f32(rng, N)},
                   ref, lowp=("x", "g", "b", "y"), graph=True)


def layernorm_bwd_cases(rng):
    # D % 8 == 0 takes the CUDA register-row kernel (1, 2 and 4 vectors per thread), 45 the strided one
    for N, D in ((1, 8), (6, 45), (3, 4544), (2, 12000), (2, 24000)):
        x = f32(rng, N, D, scale=2.0)
        mu, rs = _ln_stats(x, 1e-5)

        def ref(v):
            xh = (d(v["x"]) - d(v["mean"])[:, None]) * d(v["rstd"])[:, None]
            dxh = d(v["dy"]) * d(v["g"])
            return {"dx": d(v["dx"]) + d(v["rstd"])[:, None] * (dxh - dxh.mean(1, keepdims=True)
                                                                 - xh * (dxh * xh).mean(1, keepdims=True))}
        yield Case("layernorm_bwd", f"N{N}_D{D}",
                   {"N": N, "D": D, "x": x, "mean": mu.astype(np.float32), "rstd": rs.astype(np.float32),
                    "g": f32(rng, D, mean=1.0), "dy": f32(rng, N, D), "dx": f32(rng, N, D)},
                   ref, lowp=("x", "g", "dy", "dx"))


def gelu_cases(rng):
    for n in (1, 77, 4096 + 3):
        x = f32(rng, n, scale=3.0)
        yield Case("gelu_fwd", f"n{n}", {"n": n, "x": x, "y": f32(rng, n)},
                   lambda v: {"y": 0.5 * d(v["x"]) * (1 + _erf(d(v["x"]) / math.sqrt(2)))}, lowp=("x", "y"),
                   graph=True)
        yield Case("gelu_bwd", f"n{n}", {"n": n, "x": x, "dy": f32(rng, n), "dx": f32(rng, n)},
                   lambda v: {"dx": d(v["dy"]) * gelu_grad(d(v["x"]))}, lowp=("x", "dy", "dx"))


def add_cases(rng):
    n = 301
    a, b, c = f32(rng, n), f32(rng, n), f32(rng, n)
    yield Case("add", "two", {"n": n, "a": a, "b": b, "y": f32(rng, n)}, lambda v: {"y": d(v["a"]) + d(v["b"])},
               lowp=("a", "b", "y"), graph=True)
    yield Case("add", "three", {"n": n, "a": a, "b": b, "c": c, "y": f32(rng, n)},
               lambda v: {"y": d(v["a"]) + d(v["b"]) + d(v["c"])}, lowp=("a", "b", "c", "y"), graph=True)
    yield Case("add", "in_place", {"n": 1, "a": a[:1], "b": b[:1], "c": c[:1]},
               lambda v: {"a": d(v["a"]) + d(v["b"]) + d(v["c"])}, lowp=("a", "b", "c"))


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """int32 words [n*bits/32, m] of values [n, m] (< 2**bits): each column a little-endian bit
    stream along n, value i at stream bits i*bits.. (AutoGPTQ's layout, 3-bit values straddling words)."""
    n, m = values.shape
    stream = (values[:, None, :].astype(np.uint64) >> np.arange(bits, dtype=np.uint64)[None, :, None]) & np.uint64(1)
    stream = stream.reshape(n * bits // 32, 32, m)
    words = (stream << np.arange(32, dtype=np.uint64)[None, :, None]).sum(axis=1)
    return words.astype(np.uint32).view(np.int32)


def _gptq(rng, fin, fout, bits, group_size, desc_act, zero_offset, bias):
    """A random packed GPTQ linear and its float64 weight W [in, out] = scale * (q - zero)."""
    gs = fin if group_size == -1 else group_size
    G = -(-fin // gs)
    g_idx = rng.permutation(np.arange(fin) // gs) if desc_act else np.arange(fin) // gs
    q = rng.integers(0, 2 ** bits, size=(fin, fout))
    z = rng.integers(0, 2 ** bits - zero_offset, size=(G, fout))  # v1 stores zero - 1
    scales = rng.uniform(0.01, 0.1, size=(G, fout)).astype(np.float16)
    W = d(scales)[g_idx] * (q - (z[g_idx] + zero_offset))
    vals = {"in": fin, "out": fout, "bits": bits, "zero_offset": zero_offset, "qweight": pack_bits(q, bits),
            "qzeros": pack_bits(z.T, bits).T.copy(), "scales": scales.astype(np.float32), "g_idx": g_idx}
    if bias:
        vals["bias"] = f32(rng, fout, scale=0.1)
    return vals, W


# (N, in, out, bits, group size, desc_act, zero offset (1: GPTQ v1), bias): N <= 8 take the GEMV path
# on CUDA, larger N the GEMM; in need not be a multiple of the group size (the last group is shorter)
QLINEAR_SHAPES = [(1, 64, 96, 4, 32, False, 1, False), (8, 40, 24, 4, 16, True, 0, True),
                  (9, 96, 32, 3, -1, True, 1, False), (5, 96, 48, 2, 40, False, 0, False),
                  (3, 36, 20, 8, 12, True, 1, True), (33, 128, 64, 4, 64, False, 1, True),
                  (2, 4544 // 8, 136, 4, 64, False, 1, False)]


def qlinear_cases(rng):
    for N, fin, fout, bits, gs, act, zero_offset, bias in QLINEAR_SHAPES:
        q, W = _gptq(rng, fin, fout, bits, gs, act, zero_offset, bias)
        name = f"N{N}_{fin}x{fout}_{bits}bit_g{gs}{'_act' if act else ''}{'_bias' if bias else ''}"

        def fwd(v, W=W):
            return {"y": d(v["x"]) @ W + (d(v["bias"]) if "bias" in v else 0.0)}

        def bwd(v, W=W):
            return {"dx": d(v["dy"]) @ W.T + (d(v["dx"]) if v.get("accumulate") else 0.0)}
        yield Case("qlinear_fwd", name, {"N": N, **q, "x": f32(rng, N, fin), "y": f32(rng, N, fout)}, fwd,
                   lowp=("x", "y", "bias"), graph=N <= 8)
        if bits in (2, 4, 8):
            # the epilogues layer_forward fuses (decode, evaluation): GELU, and one or two residuals
            x, y = f32(rng, N, fin), f32(rng, N, fout)
            r1, r2 = f32(rng, N, fout), f32(rng, N, fout)

            def gelu_of(v, W=W):
                h = d(v["x"]) @ W + (d(v["bias"]) if "bias" in v else 0.0)
                return {"y": 0.5 * h * (1 + _erf(h / math.sqrt(2)))}

            def residual(v, W=W):
                h = d(v["x"]) @ W + (d(v["bias"]) if "bias" in v else 0.0)
                return {"y": d(v["add1"]) + (d(v["add2"]) if "add2" in v else 0.0) + h}
            yield Case("qlinear_fwd_epi", f"{name}_gelu", {"N": N, **q, "x": x, "y": y, "gelu": 1}, gelu_of,
                       lowp=("x", "y", "bias"), graph=N <= 8)
            yield Case("qlinear_fwd_epi", f"{name}_add2", {"N": N, **q, "x": x, "y": y, "add1": r1, "add2": r2},
                       residual, lowp=("x", "y", "bias", "add1", "add2"), graph=N <= 8)
            yield Case("qlinear_fwd_epi", f"{name}_add1", {"N": N, **q, "x": x, "y": y, "add1": r1}, residual,
                       lowp=("x", "y", "bias", "add1"))
            # with a LoRA (no dropout): added to the product before the GELU / the residuals
            r = 8
            lora = {"r": r, "scale": 2.0, "A": f32(rng, r, fin, scale=0.2), "B": f32(rng, fout, r, scale=0.2),
                    "xa": f32(rng, N, r)}

            def with_lora(v, W=W, gelu=False):
                xa = d(v["x"]) @ d(v["A"]).T
                h = d(v["x"]) @ W + (d(v["bias"]) if "bias" in v else 0.0) + v["scale"] * xa @ d(v["B"]).T
                if gelu:
                    h = 0.5 * h * (1 + _erf(h / math.sqrt(2)))
                add = (d(v["add1"]) if "add1" in v else 0.0) + (d(v["add2"]) if "add2" in v else 0.0)
                return {"y": add + h, "xa": xa}
            yield Case("qlinear_fwd_epi", f"{name}_lora", {"N": N, **q, **lora, "x": x, "y": y}, with_lora,
                       lowp=("x", "y", "bias"), graph=N <= 8)
            yield Case("qlinear_fwd_epi", f"{name}_lora_gelu", {"N": N, **q, **lora, "x": x, "y": y, "gelu": 1},
                       lambda v, f=with_lora: f(v, gelu=True), lowp=("x", "y", "bias"))
            yield Case("qlinear_fwd_epi", f"{name}_lora_add2",
                       {"N": N, **q, **lora, "x": x, "y": y, "add1": r1, "add2": r2}, with_lora,
                       lowp=("x", "y", "bias", "add1", "add2"), graph=N <= 8)
        for acc in (0, 1):
            dq = {k: v for k, v in q.items() if k != "bias"}
            yield Case("qlinear_bwd", f"{name}_acc{acc}", {"N": N, **dq, "accumulate": acc, "dy": f32(rng, N, fout),
                                                            "dx": f32(rng, N, fin)}, bwd, lowp=("dy", "dx"))


def lora_cases(rng):
    # widths that are multiples of 8 take the CUDA kernels' 16-byte paths, 20 x 36 the one-element ones;
    # 4500 rows the 4- and 8-row blocks (r 12: two rank passes, the second partial); a dropout base
    # (set_dropout_base) is XORed into the seed
    for N, fin, fout, r, p, seed, base in ((1, 24, 40, 1, 0.0, 0, 0), (11, 72, 56, 8, 0.25, 12345, 0),
                                           (4, 128, 384, 16, 0.5, 7, 0x5DEECE66D), (9, 20, 36, 6, 0.3, 5, 3),
                                           (4500, 64, 96, 12, 0.1, 99, (1 << 53) - 1)):
        scale = 2.0
        x, A, B = f32(rng, N, fin), f32(rng, r, fin, scale=0.2), f32(rng, fout, r, scale=0.2)
        mask = dropout_scale(seed ^ base, N * fin, p).reshape(N, fin)
        xa = (d(x) * mask) @ d(A).T
        common = {"N": N, "in": fin, "out": fout, "r": r, "scale": scale, "p": p, "seed": seed, "base": base,
                  "A": A, "B": B}
        name = f"N{N}_{fin}x{fout}_r{r}_p{p}"

        def fwd(v, mask=mask):
            xa = (d(v["x"]) * mask) @ d(v["A"]).T
            return {"xa": xa, "y": d(v["y"]) + v["scale"] * xa @ d(v["B"]).T}

        def bwd(v, mask=mask):
            dxa = v["scale"] * d(v["dy"]) @ d(v["B"])
            out = {"dB": d(v["dB"]) + v["scale"] * d(v["dy"]).T @ d(v["xa"]),
                   "dA": d(v["dA"]) + dxa.T @ (d(v["x"]) * mask)}
            if "dx" in v:
                out["dx"] = d(v["dx"]) + (dxa @ d(v["A"])) * mask
            return out
        yield Case("lora_fwd", name, {**common, "x": x, "xa": f32(rng, N, r), "y": f32(rng, N, fout)}, fwd,
                   lowp=("x", "y"), graph=True)
        for with_dx in (True, False):
            vals = {**common, "x": x, "xa": xa.astype(np.float32), "dy": f32(rng, N, fout),
                    "dA": f32(rng, r, fin), "dB": f32(rng, fout, r)}
            if with_dx:
                vals["dx"] = f32(rng, N, fin)
            yield Case("lora_bwd", name + ("" if with_dx else "_no_dx"), vals, bwd,
                       lowp=("x", "dy", "dx"), tol=2e-5)


# ---- qkv split + rotary

def qkv_cols(layout: str, H: int, KV: int, hd: int) -> np.ndarray:
    """First column of each q head, k head, v head in the fused qkv row (DESIGN.md's layouts)."""
    h, g = np.arange(H), np.arange(KV)
    if layout == "multi_query":
        return np.concatenate([h * hd, [H * hd], [(H + 1) * hd]])
    if layout == "interleaved":
        return np.concatenate([h * 3 * hd, g * 3 * hd + hd, g * 3 * hd + 2 * hd])
    gs = H // KV
    return np.concatenate([(h // gs) * (gs + 2) * hd + (h % gs) * hd, g * (gs + 2) * hd + gs * hd,
                           g * (gs + 2) * hd + (gs + 1) * hd])


def rope(x: np.ndarray, pos: np.ndarray, theta: float, inverse: bool = False) -> np.ndarray:
    """NeoX rotate-half on the last axis of x [..., T, hd] at positions pos [T] (the reference's
    float32 inverse frequencies and float32 angle, as HF computes them)."""
    hd = x.shape[-1]
    half = hd // 2
    inv = (1.0 / theta ** (np.arange(half) * 2.0 / hd)).astype(np.float32)
    ang = d(pos.astype(np.float32)[:, None] * inv[None, :])
    cs, sn = np.cos(ang), np.sin(ang) * (-1.0 if inverse else 1.0)
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cs - x2 * sn, x2 * cs + x1 * sn], axis=-1)


QKV_SHAPES = [  # B, T, H, KV, hd, layout, rope, cap, past
    (1, 1, 4, 1, 16, "multi_query", 1, 1, 0),
    (2, 5, 6, 2, 64, "grouped", 1, 5, 0),
    (2, 3, 3, 3, 128, "interleaved", 0, 3, 0),
    (3, 7, 8, 2, 16, "grouped", 1, 12, 4),     # a KV cache: k/v rows past .. past+T of cap
    (2, 1, 4, 1, 64, "multi_query", 1, 9, 6),  # one decode step
    (3, 5, 2, 1, 8, "multi_query", 1, 5, 0),   # hd % 16 != 0: the CUDA kernel's one-element items
    (3, 200, 3, 1, 64, "grouped", 1, 200, 0),  # 600 rows: one block of every slot per 8 rows
]


def qkv_split_cases(rng):
    for B, T, H, KV, hd, layout, use_rope, cap, past in QKV_SHAPES:
        width = (H + 2 * KV) * hd
        cols = qkv_cols(layout, H, KV, hd)
        pos = rng.integers(0, 300, size=(B, T))
        common = {"B": B, "T": T, "H": H, "KV": KV, "hd": hd, "qkv_width": width, "cap": cap, "past": past,
                  "rope": use_rope, "theta": 10000.0, "cols": cols, "pos": pos}
        name = f"{layout}_B{B}_T{T}_hd{hd}{'_rope' if use_rope else ''}_past{past}"

        def rot(x, b, inverse=False, use_rope=use_rope, pos=pos):
            return rope(x, pos[b], 10000.0, inverse) if use_rope else x

        def fwd(v, cols=cols, B=B, T=T, H=H, KV=KV, hd=hd, past=past, rot=rot):
            rows = d(v["qkv"]).reshape(B, T, -1)
            q, k, vv = np.zeros((B, H, T, hd)), d(v["k"]).reshape(B, KV, -1, hd), d(v["v"]).reshape(B, KV, -1, hd)
            for b in range(B):
                for h in range(H):
                    q[b, h] = rot(rows[b, :, cols[h]:cols[h] + hd], b)
                for g in range(KV):
                    k[b, g, past:past + T] = rot(rows[b, :, cols[H + g]:cols[H + g] + hd], b)
                    vv[b, g, past:past + T] = rows[b, :, cols[H + KV + g]:cols[H + KV + g] + hd]
            return {"q": q, "k": k, "v": vv}
        vals = {**common, "qkv": f32(rng, B, T, width), "q": f32(rng, B, H, T, hd), "k": f32(rng, B, KV, cap, hd),
                "v": f32(rng, B, KV, cap, hd)}
        yield Case("qkv_split_fwd", name, vals, fwd, lowp=("qkv", "q", "k", "v"), graph=T == 1)
        if T == 1:  # decode: past read on the device (what a captured graph replays)
            yield Case("qkv_split_fwd", name + "_past_dev", {**vals, "past_dev": np.array([past])}, fwd,
                       lowp=("qkv", "q", "k", "v"), graph=True)
        if cap != T:
            continue  # backward is training only: cap == T, past == 0

        def bwd(v, cols=cols, B=B, T=T, H=H, KV=KV, hd=hd, rot=rot):
            out = np.zeros((B, T, cols.size * hd))
            dq, dk, dv = (d(v[n]).reshape(B, -1, T, hd) for n in ("dq", "dk", "dv"))
            for b in range(B):
                for h in range(H):
                    out[b, :, cols[h]:cols[h] + hd] = rot(dq[b, h], b, inverse=True)
                for g in range(KV):
                    out[b, :, cols[H + g]:cols[H + g] + hd] = rot(dk[b, g], b, inverse=True)
                    out[b, :, cols[H + KV + g]:cols[H + KV + g] + hd] = dv[b, g]
            return {"dqkv": out}
        yield Case("qkv_split_bwd", name, {**common, "dqkv": f32(rng, B, T, width), "dq": f32(rng, B, H, T, hd),
                                           "dk": f32(rng, B, KV, T, hd), "dv": f32(rng, B, KV, T, hd)}, bwd,
                   lowp=("dqkv", "dq", "dk", "dv"))


# ---- attention

def alibi_slopes(H: int) -> np.ndarray:
    p2 = 2 ** int(math.floor(math.log2(H)))
    base = 2.0 ** (-(2.0 ** -(math.log2(p2) - 3)))
    s = [base ** (i + 1) for i in range(p2)]
    extra = 2.0 ** (-(2.0 ** -(math.log2(2 * p2) - 3)))
    s += [extra ** (2 * i + 1) for i in range(min(H - p2, p2))]
    return np.array(s, np.float32)


def attention_reference(v: Values) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(out [B, T, H*hd], lse [B, H, T], P [B, H, T, Tk]): causal softmax of (q.k + alibi) * scale
    over the unmasked keys; query t sits at key position Tk - T + t."""
    B, H, KV, T, Tk, hd = (v[k] for k in ("B", "H", "KV", "T", "Tk", "hd"))
    ks = v.get("kstride", Tk)
    q = d(v["q"]).reshape(B, H, T, hd)
    k = d(v["k"]).reshape(B, KV, -1, hd)[:, :, :Tk]
    vv = d(v["v"]).reshape(B, KV, -1, hd)[:, :, :Tk]
    kmask = np.asarray(v["kmask"]).reshape(B, ks)[:, :Tk] != 0
    kpos = d(np.asarray(v["kpos"]).reshape(B, ks)[:, :Tk])
    g = np.arange(H) // (H // KV)
    s = np.einsum("bhtd,bhjd->bhtj", q, k[:, g])
    if "slopes" in v:
        s = s + d(v["slopes"])[None, :, None, None] * kpos[:, None, None, :]
    s = s * v["scale"]
    visible = (np.arange(Tk)[None, :] <= (Tk - T + np.arange(T))[:, None])[None, None] & kmask[:, None, None, :]
    s = np.where(visible, s, -np.inf)
    mx = s.max(-1, keepdims=True)
    has = np.isfinite(mx)
    p = np.where(visible, np.exp(s - np.where(has, mx, 0.0)), 0.0)
    tot = p.sum(-1, keepdims=True)
    p = np.where(has, p / np.where(has, tot, 1.0), 0.0)
    lse = np.where(has[..., 0], (mx + np.log(np.where(has, tot, 1.0)))[..., 0], -np.inf)
    out = np.einsum("bhtj,bhjd->bthd", p, vv[:, g]).reshape(B, T, H * hd)
    return out, lse, p


ATTN_SHAPES = [  # B, H, KV, T, Tk, cap, hd, alibi, pad: left-padding rows (1 makes a query with no visible key)
    (1, 2, 1, 1, 1, 1, 16, False, 0),
    (2, 4, 1, 17, 17, 17, 64, False, 3),
    (2, 4, 2, 9, 9, 9, 128, True, 2),
    (1, 6, 3, 33, 33, 33, 16, True, 0),
    (2, 4, 4, 3, 11, 16, 64, False, 2),   # a prompt appended to a cache
    (3, 8, 2, 1, 14, 20, 64, True, 1),    # one decode step
    # hd 64 shapes for the tensor-core kernels (FT_CUDA_ATTN=mma): rows of several heads in one block,
    # more than one key tile, Falcon-7B's 71 query heads per kv head, a prompt after a cache
    (2, 5, 1, 70, 70, 70, 64, True, 9),
    (1, 71, 1, 130, 130, 130, 64, False, 0),
    (2, 8, 2, 100, 100, 100, 64, False, 30),
    (1, 4, 2, 20, 90, 96, 64, True, 0),
    (1, 71, 1, 45, 45, 45, 64, False, 2),  # an odd number of query rows (B H T): the tutorial's shape
]


def _attn_values(rng, B, H, KV, T, Tk, cap, hd, alibi, pad, kstride):
    kmask = np.ones((B, kstride), np.int32)
    kmask[-1, :pad] = 0  # last row left-padded
    kmask[:, Tk:] = rng.integers(0, 2, size=(B, kstride - Tk))  # beyond Tk: must not matter
    kpos = np.maximum(np.cumsum(kmask, axis=1) - 1, 0) * kmask
    vals = {"B": B, "H": H, "KV": KV, "T": T, "Tk": Tk, "cap": cap, "hd": hd, "scale": 1.0 / math.sqrt(hd),
            "kstride": kstride, "kmask": kmask, "kpos": kpos, "q": f32(rng, B, H, T, hd),
            "k": f32(rng, B, KV, cap, hd), "v": f32(rng, B, KV, cap, hd)}
    if alibi:
        vals["slopes"] = alibi_slopes(H)
    return vals


def attention_cases(rng):
    for B, H, KV, T, Tk, cap, hd, alibi, pad in ATTN_SHAPES:
        name = f"B{B}_H{H}_KV{KV}_T{T}_Tk{Tk}_hd{hd}{'_alibi' if alibi else ''}_pad{pad}"
        vals = _attn_values(rng, B, H, KV, T, Tk, cap, hd, alibi, pad, kstride=cap + 3)

        def fwd(v):
            out, lse, _ = attention_reference(v)
            return {"out": out, "lse": lse}
        io = {"out": f32(rng, B, T, H * hd), "lse": f32(rng, B, H, T)}
        yield Case("attention_fwd", name, {**vals, **io}, fwd, lowp=("q", "k", "v", "out"), graph=T == 1)
        if T == 1:  # Tk on the device (a captured decode step), keys bounded by cap
            yield Case("attention_fwd", name + "_tk_dev", {**vals, **io, "tk_dev": np.array([Tk])}, fwd,
                       lowp=("q", "k", "v", "out"), graph=True)
        if not (T == Tk == cap):
            continue
        train = _attn_values(rng, B, H, KV, T, T, T, hd, alibi, pad, kstride=T)
        out, lse, _ = attention_reference(train)

        def bwd(v):
            _, _, p = attention_reference(v)
            Bq, Hq, KVq, Tq, hdq = (v[k] for k in ("B", "H", "KV", "T", "hd"))
            g = np.arange(Hq) // (Hq // KVq)
            q = d(v["q"]).reshape(Bq, Hq, Tq, hdq)
            k, vv = (d(v[n]).reshape(Bq, KVq, Tq, hdq)[:, g] for n in ("k", "v"))
            do = d(v["dout"]).reshape(Bq, Tq, Hq, hdq).transpose(0, 2, 1, 3)
            o = d(v["out"]).reshape(Bq, Tq, Hq, hdq).transpose(0, 2, 1, 3)
            ds = p * (np.einsum("bhtd,bhjd->bhtj", do, vv) - (do * o).sum(-1, keepdims=True)) * v["scale"]
            dk_h, dv_h = np.einsum("bhtj,bhtd->bhjd", ds, q), np.einsum("bhtj,bhtd->bhjd", p, do)
            fold = np.zeros((KVq, Hq))
            fold[g, np.arange(Hq)] = 1.0  # sums the query heads of each kv head
            return {"dq": np.einsum("bhtj,bhjd->bhtd", ds, k),
                    "dk": np.einsum("gh,bhjd->bgjd", fold, dk_h), "dv": np.einsum("gh,bhjd->bgjd", fold, dv_h)}
        yield Case("attention_bwd", name,
                   {**train, "out": out.astype(np.float32), "lse": lse.astype(np.float32),
                    "dout": f32(rng, B, T, H * hd), "dq": f32(rng, B, H, T, hd), "dk": f32(rng, B, KV, T, hd),
                    "dv": f32(rng, B, KV, T, hd)},
                   bwd, lowp=("q", "k", "v", "out", "dout", "dq", "dk", "dv"), tol=2e-5)


# ---- head, loss, optimizer

def head_cases(rng):
    for n, V, D in ((1, 37, 24), (6, 250, 72)):
        W = f32(rng, V, D, scale=0.3)
        yield Case("lm_logits", f"n{n}_V{V}_D{D}",
                   {"n": n, "V": V, "D": D, "h": f32(rng, n, D), "W": W, "logits": f32(rng, n, V)},
                   lambda v: {"logits": d(v["h"]) @ d(v["W"]).T}, lowp=("h", "W"), graph=True)
        yield Case("lm_bwd", f"n{n}_V{V}_D{D}",
                   {"n": n, "V": V, "D": D, "dlogits": f32(rng, n, V), "W": W, "dh": f32(rng, n, D)},
                   lambda v: {"dh": d(v["dlogits"]) @ d(v["W"])}, lowp=("W", "dh"))


def cross_entropy_cases(rng):
    for n, V, gs in ((1, 7, 0.0), (5, 300, 0.5), (9, 33, 1.0)):
        target = rng.integers(0, V, n)
        target[n // 2] = -100 if n > 1 else target[0]

        def ref(v):
            z, t = d(v["logits"]).reshape(v["n"], v["V"]), np.asarray(v["target"])
            lse = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)
            on = t >= 0
            loss = np.where(on, lse - z[np.arange(len(t)), np.where(on, t, 0)], 0.0)
            out = {"row_loss": loss}
            if v["grad_scale"] != 0:
                g = np.exp(z - lse[:, None])
                g[np.arange(len(t))[on], t[on]] -= 1.0
                out["logits"] = np.where(on[:, None], v["grad_scale"] * g, 0.0)
            else:
                out["logits"] = z  # untouched
            return out
        yield Case("cross_entropy", f"n{n}_V{V}_scale{gs}",
                   {"n": n, "V": V, "grad_scale": gs, "logits": f32(rng, n, V, scale=3.0), "target": target,
                    "row_loss": f32(rng, n)}, ref)


def argmax_rows_cases(rng):
    for n, V in ((1, 5), (6, 1000)):
        z = f32(rng, n, V)
        if n > 1:
            z[1, [3, 7]] = z[1].max() + 1.0  # a tie: the lowest index wins
            z[2, 9] = np.nan                  # a NaN counts as the largest, as numpy.argmax
            z[3, :] = -np.inf
        yield Case("argmax_rows", f"n{n}_V{V}", {"n": n, "V": V, "logits": z, "out": rng.integers(-5, 5, n)},
                   lambda v: {"out": d(np.argmax(v["logits"].reshape(v["n"], v["V"]), axis=1))}, tol=0.0,
                   exact_on_cuda=True, graph=True)


def sumsq_cases(rng):
    for n in (1, 1000, 70001):
        yield Case("sumsq", f"n{n}", {"n": n, "x": f32(rng, n)}, lambda v: {"result": np.array((d(v["x"]) ** 2).sum())})


def adamw_cases(rng):
    for n, step, wd, gmul in ((1, 1, 0.0, 1.0), (1001, 7, 0.01, 0.5)):
        b1, b2, lr, eps = 0.9, 0.999, 3e-4, 1e-8

        def ref(v):
            p, g, m, vv = (d(v[k]) for k in "pgmv")
            g = g * v["gmul"]
            p = p * (1 - v["lr"] * v["wd"])
            m = v["beta1"] * m + (1 - v["beta1"]) * g
            vv = v["beta2"] * vv + (1 - v["beta2"]) * g * g
            p = p - v["lr"] / v["bias_corr1"] * m / (np.sqrt(vv) / math.sqrt(v["bias_corr2"]) + v["eps"])
            return {"p": p, "m": m, "v": vv}
        yield Case("adamw", f"n{n}_step{step}",
                   {"n": n, "p": f32(rng, n), "g": f32(rng, n), "m": f32(rng, n, scale=0.1),
                    "v": np.abs(f32(rng, n, scale=0.01)), "lr": lr, "beta1": b1, "beta2": b2, "eps": eps, "wd": wd,
                    "gmul": gmul, "bias_corr1": 1 - b1 ** step, "bias_corr2": 1 - b2 ** step}, ref)


def gather_rows_cases(rng):
    for n, rows, row in ((1, 1, 3), (5, 4, 130)):
        yield Case("gather_rows", f"n{n}_row{row}",
                   {"n": n, "rows": rows, "row": row, "src": f32(rng, rows, row), "dst": f32(rng, n, row),
                    "idx": rng.integers(0, rows, n)},
                   lambda v: {"dst": d(v["src"]).reshape(v["rows"], v["row"])[v["idx"]]}, lowp=("src", "dst"),
                   tol=0.0, exact_on_cuda=True)


BUILDERS = [zero_cases, dense_create_cases, embed_cases, layernorm_fwd_cases, layernorm_bwd_cases, gelu_cases,
            add_cases, qlinear_cases, lora_cases, qkv_split_cases, attention_cases, head_cases, cross_entropy_cases,
            argmax_rows_cases, sumsq_cases, adamw_cases, gather_rows_cases]
CASES = [case for i, build in enumerate(BUILDERS) for case in build(np.random.default_rng(1000 + i))]

# The entries of the op table that OpRunner.run does not run by name, and where each is exercised.
NOT_RUN = {
    "destroy": "lifetime",       # OpRunner's dealloc
    "alloc": "memory", "free": "memory", "upload": "memory", "download": "memory",
    "sync": "memory",            # every run
    "qlinear_create": "weights", "qlinear_destroy": "weights",  # every qlinear_fwd / qlinear_bwd run
    "replay": "graph",  # the graph=True runs of test_cuda_graph_matches_cpu
    "set_dropout_base": "state",  # the 'base' of the lora cases (the runners set it first)
    "memory_stats": "accounting",   # OpRunner.memory_stats, test_cuda_runs_leave_no_memory
}


def test_every_op_has_a_case():
    """An op added to ft_backend_ops (which opdebug.c must list to build) fails here until it has
    a case, or an entry in NOT_RUN saying where it is exercised."""
    table = dict(_C.OPS)
    assert len(table) == len(_C.OPS)
    run = {name for name, how in table.items() if how == "run"}
    assert {name: how for name, how in table.items() if how != "run"} == NOT_RUN
    assert {c.op for c in CASES} == run
    assert len({(c.op, c.id) for c in CASES}) == len(CASES)


# ---------------------------------------------------------------------------------------------
# running and comparing

def rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    got, ref = d(got).ravel(), d(ref).ravel()
    fin = np.isfinite(ref)
    assert np.array_equal(np.isfinite(got), fin) and np.array_equal(got[~fin], ref[~fin]), "non-finite entries differ"
    num = np.linalg.norm(got[fin] - ref[fin])
    den = np.linalg.norm(ref[fin])
    return float(num / den) if den > 0 else float(num)


@pytest.fixture(scope="module")
def cpu() -> Any:
    return _C.OpRunner("cpu")


def _copy(values: Values) -> Values:
    return {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in values.items()}


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.op}-{c.id}")
def test_cpu_matches_float64_reference(cpu, case):
    values = _copy(case.values)
    got = cpu.run(case.op, **values)
    for name, ref in case.reference(case.values).items():
        err = rel_err(got[name], ref)
        assert err <= case.tol, f"{case.op} {name}: relative error {err:.3g} > {case.tol:g}"
    for name, v in case.values.items():  # inputs come back unchanged, and the caller's arrays are untouched
        if isinstance(v, np.ndarray):
            assert np.array_equal(values[name], v, equal_nan=True)
            if name not in case.outputs:
                assert np.array_equal(got[name].reshape(v.shape), v, equal_nan=True), f"{case.op} wrote {name}"


def test_runner_checks_its_arguments(cpu):
    x = np.ones(4, np.float32)
    for kwargs, words in [({"n": 4, "x": x}, "missing array 'y'"),
                          ({"n": 5, "x": x, "y": x}, "has 4 elements, expected 5"),
                          ({"n": 4, "x": x, "y": x, "z": x}, "takes no argument 'z'"),
                          ({"n": 0, "x": x, "y": x}, "'n' must be an integer"),
                          ({"n": 4.0, "x": x, "y": x}, "'n' must be an integer"),
                          ({"n": 4, "x": np.ones(4, np.int32), "y": x}, "'x' must be a float array")]:
        with pytest.raises(ValueError, match=words):
            cpu.run("gelu_fwd", **kwargs)
    with pytest.raises(ValueError, match="ids\\[1\\] = 9 is out of range"):
        cpu.run("embed", N=2, D=1, V=3, ids=np.array([0, 9]), table=np.ones(3, np.float32), out=np.ones(2, np.float32))
    with pytest.raises(ValueError, match="not an op the runner runs"):
        cpu.run("alloc")
    with pytest.raises(NotImplementedError, match="graphs"):
        cpu.run("gelu_fwd", n=4, x=x, y=x, graph=True)
    with pytest.raises(NotImplementedError, match="float32"):
        _C.OpRunner("cpu", "bfloat16")
    assert cpu.backend.startswith("cpu") and cpu.act_dtype == "float32" and cpu.memory_stats() == (0, 0)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_bits_is_autogptqs_layout(bits):
    """The packer of the qlinear cases against testing.py's (AutoGPTQ's) on shapes both take."""
    rng = np.random.default_rng(bits)
    q = testing.gptq_quantize(rng.standard_normal((64, 32)), bits, 32, checkpoint_format="gptq_v2")
    values, zeros = testing.gptq_unpack(q["qweight"], q["qzeros"], bits, 64, 32)
    assert np.array_equal(pack_bits(values, bits), q["qweight"])
    assert np.array_equal(pack_bits(zeros.T, bits).T, q["qzeros"])


def test_dropout_mask_reference_matches_the_engine(cpu):
    """The numpy mask above is rng.h's: LoRA with A = I, B = I, scale 1 returns x * mask."""
    n, p, seed = 64, 0.3, 99
    x = np.arange(1, n + 1, dtype=np.float32)[None]
    eye = np.eye(n, dtype=np.float32)
    got = cpu.run("lora_fwd", N=1, **{"in": n}, out=n, r=n, scale=1.0, p=p, seed=seed, x=x, A=eye, B=eye,
                  xa=np.zeros((1, n), np.float32), y=np.zeros((1, n), np.float32))
    expect = x[0] * dropout_scale(seed, n, p)
    np.testing.assert_allclose(got["y"][0], expect, rtol=1e-6)
    assert 0 < (expect == 0).sum() < n
    # the base set before the op is XORed into the seed: another mask, the same one as seed ^ base
    based = cpu.run("lora_fwd", N=1, **{"in": n}, out=n, r=n, scale=1.0, p=p, seed=seed, base=12, x=x, A=eye,
                    B=eye, xa=np.zeros((1, n), np.float32), y=np.zeros((1, n), np.float32))
    np.testing.assert_allclose(based["y"][0], x[0] * dropout_scale(seed ^ 12, n, p), rtol=1e-6)
    assert not np.array_equal(based["y"][0], got["y"][0])


def test_dropout_masks_are_uniform_and_independent():
    """The pair scheme of rng.h (one 64-bit mix per two elements): the kept fraction is 1 - p for
    even and odd elements alike, neighbours and nearby seeds are uncorrelated."""
    n, p = 1 << 18, 0.3
    keep = dropout_scale(1234567, n, p) > 0
    for part in (keep[0::2], keep[1::2]):
        assert abs(part.mean() - (1 - p)) < 4 * np.sqrt(p * (1 - p) / len(part))
    pairs = np.corrcoef(keep[0::2].astype(float), keep[1::2].astype(float))[0, 1]
    assert abs(pairs) < 0.01
    other = dropout_scale(1234567 ^ 1, n, p) > 0
    assert abs(np.corrcoef(keep.astype(float), other.astype(float))[0, 1]) < 0.01


# ---------------------------------------------------------------------------------------------
# CUDA against the CPU op

CUDA_TOL = 2e-2  # the numerics contract: CUDA vs CPU, relative


def _round_to(x: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "float16":
        return x.astype(np.float16).astype(np.float32)
    return (float32_to_bf16_bits(x).astype(np.uint32) << 16).view(np.float32).reshape(x.shape)


def _lowp_values(case: Case, dtype: str) -> Values:
    return {k: (_round_to(v, dtype) if k in case.lowp else v.copy()) if isinstance(v, np.ndarray) else v
            for k, v in case.values.items()}


@pytest.fixture(scope="module", params=["bfloat16", "float16"])
def gpu(request) -> Any:
    try:
        return _C.OpRunner("cuda:0", request.param)
    except NotImplementedError as e:  # bfloat16 on a T4
        pytest.skip(str(e))


def _compare(case: Case, got: Values, want: Values, what: str) -> None:
    for name in case.outputs:
        if case.exact_on_cuda:
            assert np.array_equal(got[name], want[name], equal_nan=True), f"{case.op} {name} ({what})"
            continue
        err = rel_err(got[name], want[name])
        assert err <= CUDA_TOL, f"{case.op} {name} ({what}): relative error {err:.3g} vs the CPU op"


@pytest.mark.cuda
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.op}-{c.id}")
def test_cuda_matches_cpu(cpu, gpu, case):
    values = _lowp_values(case, gpu.act_dtype)
    want = cpu.run(case.op, **_copy(values))
    _compare(case, gpu.run(case.op, **_copy(values)), want, gpu.act_dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("case", [c for c in CASES if c.graph], ids=lambda c: f"{c.op}-{c.id}")
def test_cuda_graph_matches_cpu(cpu, gpu, case):
    """The ops a decode step captures give the same result replayed from a CUDA graph."""
    values = _lowp_values(case, gpu.act_dtype)
    want = cpu.run(case.op, **_copy(values))
    _compare(case, gpu.run(case.op, graph=True, **_copy(values)), want, gpu.act_dtype + ", graph")


ATTN_CASES = [c for c in CASES if c.op in ("attention_fwd", "attention_bwd") and c.values["hd"] == 64]


@pytest.fixture(scope="module", params=["bfloat16", "float16"])
def gpu_mma(request) -> Any:
    """A CUDA runner whose attention runs the tensor-core flash kernels (FT_CUDA_ATTN is read when the
    backend is created)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FT_CUDA_ATTN", "mma")
        try:
            return _C.OpRunner("cuda:0", request.param)
        except NotImplementedError as e:  # bfloat16 on a T4
            pytest.skip(str(e))


@pytest.mark.cuda
@pytest.mark.parametrize("case", ATTN_CASES, ids=lambda c: f"{c.op}-{c.id}")
def test_cuda_attention_mma_matches_cpu(cpu, gpu_mma, case):
    """attention_mma.cu against the CPU op, and bit-identical from one run to the next."""
    values = _lowp_values(case, gpu_mma.act_dtype)
    want = cpu.run(case.op, **_copy(values))
    got = gpu_mma.run(case.op, **_copy(values))
    _compare(case, got, want, gpu_mma.act_dtype + ", mma")
    again = gpu_mma.run(case.op, **_copy(values))
    for name in case.outputs:
        assert np.array_equal(got[name], again[name], equal_nan=True), f"{case.op} {name}: not deterministic"


@pytest.mark.cuda
@pytest.mark.parametrize("attn_env", [None, "mma"], ids=["default", "mma"])
def test_cuda_attention_mma_is_the_kernel_that_ran(attn_env):
    """An hd 64 call runs ATTN_MMA by default and with FT_CUDA_ATTN=mma (the profiler's choice table
    says so), not a silent fallback."""
    case = next(c for c in ATTN_CASES if c.op == "attention_bwd")
    script = (
        "import numpy as np, pickle, sys\n"
        "from falcontune import _C\n"
        "op, values = pickle.loads(sys.stdin.buffer.read())\n"
        "r = _C.OpRunner('cuda:0', 'float16')\n"
        "r.run('attention_fwd', **{k: v for k, v in values.items() if k not in ('dout', 'dq', 'dk', 'dv')})\n"
        "r.run(op, **values)\n"
        "del r\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "FT_CUDA_ATTN"}
    env["FT_CUDA_PROFILE"] = "1"
    if attn_env is not None:
        env["FT_CUDA_ATTN"] = attn_env
    res = subprocess.run([sys.executable, "-c", script], input=pickle.dumps((case.op, _copy(case.values))),
                         capture_output=True, env=env, timeout=300)
    err = res.stderr.decode()
    assert res.returncode == 0, err
    assert "attention fwd kernel: mma 1;" in err, err
    assert "attention bwd kernel: mma 1;" in err, err


@pytest.mark.cuda
def test_cuda_runs_leave_no_memory(gpu):
    """Every run frees what it allocated: after one pass over the cases (which creates the scratch
    buffers the backend keeps and reuses), a second pass ends where the first did."""
    def one_pass() -> int:
        for case in CASES:
            gpu.run(case.op, **_lowp_values(case, gpu.act_dtype))
            if case.graph:
                gpu.run(case.op, graph=True, **_lowp_values(case, gpu.act_dtype))
        return gpu.memory_stats()[0]
    assert one_pass() == one_pass()
