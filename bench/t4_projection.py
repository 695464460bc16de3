"""Project the tutorial's fine-tuning onto a Colab T4 from op costs counted by the engine.

    python3 bench/t4_projection.py [--data DIR] [--out bench/results] [--tc-frac 0.37] [--bw-frac 0.70]

The tutorial (README): Falcon-7B, GPTQ 4-bit group 64, --mbatch_size=1 --batch_size=2 (two
micro-batches a step), --cutoff_len=256, LoRA r 8 alpha 16 dropout 0.05 on query_key_value,
fp16 on a T4, validation 20% (eval every max(logging_steps, records // 10) steps and at the end).

How the costs are counted (honest and fast, on the CPU backend):

* The counting backend (csrc/cost.c, FT_COUNT_COSTS=1) runs the real ops and adds each one's
  FLOPs and elements moved, from its shapes, to per-op counters. The model is the benchmark's
  Falcon-7B-shaped random checkpoint with 1 and with 2 layers: model.c runs every layer past the
  first the same way (layer 0 needs no input gradient), so
  costs(32 layers) = costs(1) + 31 * (costs(2) - costs(1)) exactly (tests/test_costs.py checks
  this identity on a small model).
* Every count is a polynomial of degree <= 2 in the sequence length T (attention's causal pairs
  grow as T(T+1)/2, everything else linearly or not at all; the logits fit one chunk up to
  258 rows), so counts at T = 16, 48, 96 give each example's counts exactly; the counts at
  T = 256 are also measured and must equal the fit.
* A micro-batch is one forward_backward at the example's own length (mb 1: no padding); a step
  adds zero_grad and the AdamW update (grad norm + update); an evaluation is forward_loss over
  every validation example, at its own length.
* Bytes at fp16: activation and dense-weight elements x 2, plus f32 / i32 / packed GPTQ bytes.

Two variants of the quantized linears (qlinear_fwd, qlinear_bwd):

* scratch (today's CUDA path): a dequantization kernel reads the packed weights and writes the
  dense fp16 W, then cuBLAS reads W back: time = (packed + 2 B * in*out) / bw
  + max(flops / peak, (x + W + y) / bw), forward and backward alike;
* fused (weights read packed once per GEMM): time = max(flops / peak, (x + packed + y) / bw).

Every other op: time = max(flops / peak, bytes / bw), summed over its calls (all calls of one
op at one T have the same arithmetic intensity here). Host transfers (upload, download: ids,
labels, the loss) and bookkeeping (alloc, free, sync) are left out, as are kernel-launch
latencies and the scratch traffic of implementations beyond the qlinear dequantized copy
(attention_gemm.cu's score chunks, the LoRA fp32 copies): a projection of the op table, not of
every kernel.

T4 peaks: fp16 tensor cores 65 TFLOP/s, fp32 CUDA cores 8.1 TFLOP/s, GDDR6 320 GB/s. Fractions
achievable (flags): 0.37 of both compute peaks -- the T4 is capped at 70 W and sustained cuBLAS
fp16 GEMMs run at ~24 TFLOP/s (NVIDIA's developer forum, 4096^3 HGEMM), the clock falling from
its 1590 MHz boost; 0.70 of the bandwidth -- about what copy kernels sustain on GDDR6 boards
(~220 GB/s); to be replaced by measured figures when a T4 is at hand.

Writes <out>/t4_projection_<date>.json and prints the Markdown for docs/PERF.md.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Mapping

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

FIELDS = ("calls", "flops", "act_elems", "weight_elems", "fixed_bytes", "dequant_elems")
TENSOR_OPS = {"qlinear_fwd", "qlinear_bwd", "attention_fwd", "attention_bwd", "lm_logits", "lm_bwd"}
UNTIMED = {"alloc", "free", "sync", "upload", "download", "dense_create", "qlinear_create", "qlinear_destroy"}
FIT_T = (16, 48, 96)
CHECK_T = 256
LAYERS = 32
FP16 = 2

Counts = dict[str, dict[str, int]]  # op -> field -> value


@dataclass(frozen=True)
class Card:
    name: str
    tensor_flops: float  # fp16 tensor-core peak, FLOP/s
    fp32_flops: float    # CUDA-core peak, FLOP/s
    bandwidth: float     # bytes/s
    tc_frac: float
    fp32_frac: float
    bw_frac: float

    def peak(self, op: str) -> float:
        return self.tensor_flops * self.tc_frac if op in TENSOR_OPS else self.fp32_flops * self.fp32_frac

    @property
    def bw(self) -> float:
        return self.bandwidth * self.bw_frac


# ---------------------------------------------------------------------------------------------
# counting


def _plain(costs: Mapping[str, Mapping[str, int]]) -> Counts:
    """The timed ops' counts (bookkeeping like free is not a polynomial of T: nothing is freed
    before the first workspace exists)."""
    return {op: {f: int(c[f]) for f in FIELDS} for op, c in costs.items() if op not in UNTIMED}


def count_model(ckpt: Path, lengths: list[int]) -> dict:
    """Per-op counts of one micro-batch's forward_backward and forward_loss at each length, and of a
    step's zero_grad + AdamW update, on the CPU backend."""
    import falcontune as ft

    os.environ["FT_COUNT_COSTS"] = "1"
    model = ft.load_model(ckpt, device="cpu")
    model.add_lora(r=8, alpha=16, dropout=0.05, target_modules=["query_key_value"])
    model.train()
    opt = ft.AdamW(model, lr=3e-4)
    rng = np.random.default_rng(0)
    out: dict = {"fb": {}, "eval": {}}
    for T in lengths:
        ids = rng.integers(0, model.config.vocab_size, size=(1, T))
        model.op_costs(reset=True)
        model.forward_backward(ids, ids)
        out["fb"][T] = _plain(model.op_costs(reset=True))
        model.loss(ids, ids)
        out["eval"][T] = _plain(model.op_costs(reset=True))
    model.zero_grad()
    opt.step()
    out["step"] = _plain(model.op_costs(reset=True))
    model.close()
    return out


def extrapolate(one: Counts, two: Counts, layers: int) -> Counts:
    """costs(layers) = costs(1) + (layers - 1) * (costs(2) - costs(1)), per op and field."""
    out = {}
    for op in set(one) | set(two):
        a, b = one.get(op, {}), two.get(op, {})
        out[op] = {f: a.get(f, 0) + (layers - 1) * (b.get(f, 0) - a.get(f, 0)) for f in FIELDS}
    return out


def fit_quadratic(by_t: Mapping[int, Counts]) -> dict[str, dict[str, tuple[Fraction, Fraction, Fraction]]]:
    """Exact coefficients (c0, c1, c2) of each count as c0 + c1 T + c2 T^2 from three lengths."""
    ts = sorted(by_t)
    assert len(ts) == 3
    ops = set().union(*(by_t[t] for t in ts))
    vandermonde = [[Fraction(1), Fraction(t), Fraction(t * t)] for t in ts]
    return {op: {f: _solve3(vandermonde, [Fraction(by_t[t].get(op, {}).get(f, 0)) for t in ts]) for f in FIELDS}
            for op in ops}


def _solve3(A: list[list[Fraction]], y: list[Fraction]) -> tuple[Fraction, Fraction, Fraction]:
    """Gaussian elimination over fractions (3 x 3, Vandermonde: never singular)."""
    M = [row[:] + [v] for row, v in zip(A, y)]
    for i in range(3):
        p = next(r for r in range(i, 3) if M[r][i] != 0)
        M[i], M[p] = M[p], M[i]
        for r in range(3):
            if r != i and M[r][i] != 0:
                k = M[r][i] / M[i][i]
                M[r] = [a - k * b for a, b in zip(M[r], M[i])]
    return tuple(M[i][3] / M[i][i] for i in range(3))  # type: ignore[return-value]


def evaluate(fit: Mapping[str, Mapping[str, tuple[Fraction, Fraction, Fraction]]], T: int) -> Counts:
    out = {}
    for op, fields in fit.items():
        vals = {}
        for f, (c0, c1, c2) in fields.items():
            v = c0 + c1 * T + c2 * T * T
            if v.denominator != 1:
                raise ValueError(f"{op}.{f} is not an integer polynomial of T at T={T}: {v}")
            vals[f] = int(v)
        if vals["calls"]:
            out[op] = vals
    return out


# ---------------------------------------------------------------------------------------------
# projection


def op_seconds(op: str, c: Mapping[str, int], card: Card, variant: str) -> float:
    if op in UNTIMED or not c.get("calls"):
        return 0.0
    peak, bw = card.peak(op), card.bw
    io = FP16 * (c["act_elems"] + c["weight_elems"])
    if variant == "fused" or not c["dequant_elems"]:
        return max(c["flops"] / peak, (io + c["fixed_bytes"]) / bw)
    dense = FP16 * c["dequant_elems"]  # the dequantized copy: written once, read back once
    return (c["fixed_bytes"] + dense) / bw + max(c["flops"] / peak, (io + dense) / bw)


def seconds(counts: Counts, card: Card, variant: str) -> float:
    return sum(op_seconds(op, c, card, variant) for op, c in counts.items())


def add(*parts: Counts) -> Counts:
    out: Counts = {}
    for p in parts:
        for op, c in p.items():
            o = out.setdefault(op, {f: 0 for f in FIELDS})
            for f in FIELDS:
                o[f] += c[f]
    return out


def op_table(step: Counts, card: Card) -> list[dict]:
    rows = []
    for op in sorted(step, key=lambda o: -op_seconds(o, step[o], card, "scratch")):
        c = step[op]
        if op in UNTIMED:
            continue
        fused_b = FP16 * (c["act_elems"] + c["weight_elems"]) + c["fixed_bytes"]
        scratch_b = fused_b + 2 * FP16 * c["dequant_elems"]
        t_s, t_f = op_seconds(op, c, card, "scratch"), op_seconds(op, c, card, "fused")
        bound = "compute" if c["flops"] / card.peak(op) >= fused_b / card.bw else "memory"
        rows.append({"op": op, "calls": c["calls"], "gflop": c["flops"] / 1e9, "gb_fused": fused_b / 1e9,
                     "gb_scratch": scratch_b / 1e9, "ms_scratch": 1e3 * t_s, "ms_fused": 1e3 * t_f,
                     "fused_bound": bound})
    return rows


# ---------------------------------------------------------------------------------------------
# data: the trainer's own preparation


def dataset_lengths(path: Path, tokenizer_path: Path, cutoff: int = 256, val_set_size: float = 0.2,
                    seed: int = 42) -> dict:
    from falcontune.data import load_records
    from falcontune.tokenizer import Tokenizer
    from falcontune.trainer import prepare_data

    tok = Tokenizer.from_file(tokenizer_path)
    records = load_records(path, "alpaca")
    data = prepare_data(path, records, tok, "alpaca", cutoff, "alpaca", True, True, val_set_size, seed,
                        lambda s: None)
    train = [int(x) for x in data.train.lengths]
    val = [] if data.val is None else [int(x) for x in data.val.lengths]
    return {"path": str(path), "records": len(records), "train": train, "val": val,
            "mean_tokens": float(np.mean(train + val))}


def epoch_plan(d: dict, mbatch: int = 1, batch: int = 2, logging_steps: int = 5) -> dict:
    """Optimizer steps and evaluations of one epoch, by trainer.py's rules."""
    n_micro = math.ceil(len(d["train"]) / mbatch)
    steps = math.ceil(n_micro / (batch // mbatch))
    eval_steps = max(logging_steps, d["records"] // (10 * mbatch)) if d["val"] else 0
    evals = (steps // eval_steps + (1 if steps % eval_steps else 0)) if eval_steps else 0
    return {"steps": steps, "eval_steps": eval_steps, "evals": evals}


def epoch_seconds(d: dict, plan: dict, fb: Mapping[int, Counts], ev: Mapping[int, Counts], step: Counts,
                  card: Card, variant: str) -> dict:
    t_train = sum(seconds(fb[T], card, variant) for T in d["train"])
    t_opt = plan["steps"] * seconds(step, card, variant)
    t_eval = plan["evals"] * sum(seconds(ev[T], card, variant) for T in d["val"])
    return {"train_s": t_train, "optimizer_s": t_opt, "eval_s": t_eval, "total_s": t_train + t_opt + t_eval}


# ---------------------------------------------------------------------------------------------


def _load_counts(raw: Mapping) -> dict:
    return {int(L): {k: ({int(T): c for T, c in v.items()} if k != "step" else v) for k, v in per.items()}
            for L, per in raw.items()}


def _shared_data() -> Path:
    env = os.environ.get("FALCONTUNE_SHARED_DATA")
    for d in ([Path(env)] if env else []) + [REPO.parent / "shared" / "data", Path("/work/shared/data")]:
        if (d / "falcon" / "tokenizer.json").is_file():
            return d
    raise SystemExit("the shared data (falcon/tokenizer.json) was not found: pass --data or set FALCONTUNE_SHARED_DATA")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=None, help="shared data dir (falcon/tokenizer.json, fr/...)")
    ap.add_argument("--ckpt", type=Path, default=None, help="where the 2-layer 7B checkpoint is made (temp dir)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    ap.add_argument("--counts", type=Path, default=None, help="a t4_projection JSON: reuse its engine counts")
    ap.add_argument("--tc-frac", type=float, default=0.37)
    ap.add_argument("--fp32-frac", type=float, default=0.37)
    ap.add_argument("--bw-frac", type=float, default=0.70)
    a = ap.parse_args()
    data_dir = a.data or _shared_data()
    card = Card("Tesla T4 (projected)", 65e12, 8.1e12, 320e9, a.tc_frac, a.fp32_frac, a.bw_frac)
    t_start = time.time()

    from train_bench import make_bench_checkpoint

    lengths = [*FIT_T, CHECK_T]
    if a.counts:  # re-project earlier counts (other fractions, other datasets) without counting again
        per_layers = _load_counts(json.loads(a.counts.read_text())["counts"])
    else:
        ckpt = make_bench_checkpoint(a.ckpt or Path(tempfile.mkdtemp(prefix="t4proj_")), "falcon-7b", layers=2)
        per_layers = {1: count_model(ckpt / "one_layer", lengths), 2: count_model(ckpt, lengths)}
    full = {kind: {T: extrapolate(per_layers[1][kind][T], per_layers[2][kind][T], LAYERS) for T in lengths}
            for kind in ("fb", "eval")}
    step_const = extrapolate(per_layers[1]["step"], per_layers[2]["step"], LAYERS)
    fits = {kind: fit_quadratic({T: full[kind][T] for T in FIT_T}) for kind in ("fb", "eval")}
    for kind in ("fb", "eval"):  # the fit reproduces what was counted at the cutoff length
        if evaluate(fits[kind], CHECK_T) != {op: c for op, c in full[kind][CHECK_T].items() if c["calls"]}:
            raise SystemExit(f"{kind}: the quadratic fit does not reproduce the counts at T={CHECK_T}")

    # one tutorial step at the cutoff: two micro-batches of 256 tokens + zero_grad + AdamW
    one_step = add(full["fb"][CHECK_T], full["fb"][CHECK_T], step_const)
    rows = op_table(one_step, card)
    step_s = {v: seconds(one_step, card, v) for v in ("scratch", "fused")}

    datasets = {}
    for name, path in (("fr_instructions.json", REPO / "datasets" / "fr_instructions.json"),
                       ("oasst-fr-1k-alpaca.json", data_dir / "fr" / "oasst-fr-1k-alpaca.json")):
        d = dataset_lengths(path, data_dir / "falcon" / "tokenizer.json")
        plan = epoch_plan(d)
        Ts = set(d["train"]) | set(d["val"])
        fb = {T: evaluate(fits["fb"], T) for T in Ts}
        ev = {T: evaluate(fits["eval"], T) for T in Ts}
        datasets[name] = {"records": d["records"], "train": len(d["train"]), "val": len(d["val"]),
                          "mean_tokens": d["mean_tokens"], "max_tokens": max(d["train"] + d["val"]), **plan,
                          **{v: epoch_seconds(d, plan, fb, ev, step_const, card, v) for v in ("scratch", "fused")}}

    date = _dt.date.today().isoformat()
    res = {"date": date, "command": "python3 bench/t4_projection.py " + " ".join(sys.argv[1:]),
           "card": card.__dict__, "counted_on": "CPU backend, Falcon-7B shapes, 1 and 2 layers, extrapolated to 32",
           "step": {"tokens": 2 * CHECK_T, "scratch_s": step_s["scratch"], "fused_s": step_s["fused"],
                    "flops": sum(c["flops"] for c in one_step.values()), "ops": rows},
           "datasets": datasets, "elapsed_s": round(time.time() - t_start, 1),
           "counts": {L: {k: ({str(T): c for T, c in v.items()} if k != "step" else v) for k, v in per_layers[L].items()}
                      for L in per_layers}}
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / f"t4_projection_{date}.json"
    path.write_text(json.dumps(res, indent=2) + "\n")
    print(markdown(res))
    print(f"\nwrote {path} ({res['elapsed_s']} s)")


def markdown(res: dict) -> str:
    c, s = res["card"], res["step"]
    lines = [f"T4 assumed: {c['tensor_flops'] / 1e12:.0f} TFLOP/s fp16 x {c['tc_frac']}, "
             f"{c['fp32_flops'] / 1e12:.1f} TFLOP/s fp32 x {c['fp32_frac']}, {c['bandwidth'] / 1e9:.0f} GB/s x "
             f"{c['bw_frac']}.", "",
             f"One step (2 x 256 tokens, {s['flops'] / 1e12:.2f} TFLOP): scratch {s['scratch_s']:.2f} s, "
             f"fused {s['fused_s']:.2f} s", "",
             "| op | calls | GFLOP | GB fused | GB scratch | ms scratch | ms fused | fused bound by |",
             "|---|---|---|---|---|---|---|---|"]
    for r in s["ops"]:
        lines.append(f"| {r['op']} | {r['calls']} | {r['gflop']:,.1f} | {r['gb_fused']:,.2f} | {r['gb_scratch']:,.2f} | "
                     f"{r['ms_scratch']:,.1f} | {r['ms_fused']:,.1f} | {r['fused_bound']} |")
    lines += ["", "| dataset | records (train / val) | mean tokens | steps | evals | epoch scratch | epoch fused |",
              "|---|---|---|---|---|---|---|"]
    for name, d in res["datasets"].items():
        lines.append(f"| {name} | {d['records']} ({d['train']} / {d['val']}) | {d['mean_tokens']:.0f} | {d['steps']} | "
                     f"{d['evals']} | {d['scratch']['total_s'] / 60:.1f} min | {d['fused']['total_s'] / 60:.1f} min |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
