"""Where a decode step's time goes: every CUDA kernel and copy of N greedy steps (Falcon-7B
shapes, batch 1), traced by torch's profiler (CUPTI sees the kernels of any library in the
process, ours included), grouped by kernel name.

    python bench/decode_profile.py [--ckpt DIR] [--steps 32] [--out DIR] [--env "A=1,B=2;A=2"]

--env runs the trace once per ';'-separated set of environment variables, loading the model
again for each (the CUDA backend reads its FT_CUDA_* knobs when it is created).

Prints per-token GPU busy time, wall time per token and the top kernels; writes
decode_profile.txt under --out. For finding hot spots; bench/decode_bench.py gives the figures.
"""
from __future__ import annotations

import argparse
import collections
import gc
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import falcontune as ft  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", type=Path, default=Path("/tmp/ft7b"))
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("."))
    ap.add_argument("--env", default="")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    import torch
    from torch.profiler import ProfilerActivity, profile

    from train_bench import make_7b_checkpoint

    ckpt = make_7b_checkpoint(args.ckpt)
    torch.cuda.init()
    ids = np.random.default_rng(0).integers(100, 60000, size=(args.batch, 32))
    lines = [f"batch {args.batch}, {args.steps} new tokens (+ 32-token prompt)"]
    for env in (args.env.split(";") if args.env else [""]):
        pairs = [kv.split("=", 1) for kv in env.split(",") if kv]
        for k, v in pairs:
            os.environ[k] = v
        model = ft.load_model(ckpt, device="cuda")  # the backend reads its FT_CUDA_* knobs here
        model.generate_ids(ids, max_new_tokens=8, eos_token_id=-1)
        t0 = time.perf_counter()
        model.generate_ids(ids, max_new_tokens=args.steps, eos_token_id=-1)
        wall = time.perf_counter() - t0
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            model.generate_ids(ids, max_new_tokens=args.steps, eos_token_id=-1)
        for k, _ in pairs:
            del os.environ[k]
        del model
        gc.collect()
        by_name: dict[str, list[float]] = collections.defaultdict(list)
        gemv: list[tuple[float, float]] = []  # (start, duration) of the quantized GEMV calls
        for ev in prof.events():
            if ev.device_type != torch.autograd.DeviceType.CUDA:
                continue
            dur = ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
            by_name[ev.name[:90]].append(dur)
            if "qgemv" in ev.name:
                gemv.append((ev.time_range.start, dur))
        total = sum(sum(v) for v in by_name.values())
        lines += ["", f"== env: {env or '(default)'}",
                  f"wall per token (unprofiled run, incl. prefill): {wall / args.steps * 1e3:.3f} ms",
                  f"GPU busy per token (kernels + copies, incl. prefill): {total / args.steps / 1e3:.3f} ms",
                  f"{'us total':>10} {'calls':>7} {'us/call':>9}  name"]
        for name, v in sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:args.top]:
            lines.append(f"{sum(v):10.0f} {len(v):7d} {np.mean(v):9.2f}  {name}")
        if gemv and len(gemv) % 4 == 0:
            # the four quantized linears of a layer run in this order at every layer and step
            d = np.array([g[1] for g in sorted(gemv)]).reshape(-1, 4)
            names = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")
            lines.append("GEMV per linear (us, mean over layers and steps): " +
                         ", ".join(f"{n} {v:.2f}" for n, v in zip(names, d.mean(axis=0))))
    text = "\n".join(lines)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "decode_profile.txt").write_text(text + "\n")


if __name__ == "__main__":
    main()
