"""Where a training step's time goes: every CUDA kernel and copy of a few steps (Falcon-7B shapes,
LoRA r8 on query_key_value, seq 256), traced by torch's profiler (CUPTI sees our kernels), grouped
by kernel name, beside the wall time of the same steps unprofiled.

    python bench/train_profile.py [--ckpt DIR] [--mb 1 16] [--steps 3] [--out DIR]

GPU busy time well under wall time means the step is bound by the host (launches, Python,
synchronisation), not by the kernels; the top kernels say where GPU time goes. The idle time
between consecutive GPU events is counted too: by size (launch spacing is a few microseconds
after every kernel; a host wait is one long gap) and by the pair of kernels around it.
"""
from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import falcontune as ft  # noqa: E402


def step(model, opt, ids, scale: float, phases: list | None = None) -> None:
    t0 = time.perf_counter()
    model.forward_backward(ids, ids, grad_scale=scale)
    t1 = time.perf_counter()
    opt.step(grad_scale=scale)
    t2 = time.perf_counter()
    model.zero_grad()
    model.engine.grad_norm()  # waits for the step's last kernels
    if phases is not None:
        phases.append((t1 - t0, t2 - t1, time.perf_counter() - t2))


def gap_report(spans: list[tuple[float, float, str]], steps: int) -> list[str]:
    """Idle time between consecutive GPU events (start, end in us), per step: by gap size, and the
    kernel pairs around the largest share of it."""
    spans.sort()
    gaps = np.array([max(0.0, b[0] - a[1]) for a, b in zip(spans, spans[1:])])
    if not len(gaps):
        return []
    edges = (0, 2, 5, 20, 100, 1000, float("inf"))
    out = [f"idle between GPU events per step: {gaps.sum() / steps / 1e3:.2f} ms over {len(gaps) / steps:.0f} gaps "
           "(the largest ones include the host's work between steps)"]
    for lo, hi in zip(edges, edges[1:]):
        sel = gaps[(gaps >= lo) & (gaps < hi)]
        out.append(f"  gaps {lo:>5} - {hi:<6} us: {len(sel) / steps:7.1f} a step, {sel.sum() / steps / 1e3:7.3f} ms")
    by_pair: dict[str, list[float]] = collections.defaultdict(list)
    for g, a, b in zip(gaps, spans, spans[1:]):
        by_pair[f"{a[2][:40]} -> {b[2][:40]}"].append(g)
    out.append("  largest idle by kernel pair (ms/step, count/step, mean us):")
    for pair, v in sorted(by_pair.items(), key=lambda kv: -sum(kv[1]))[:12]:
        out.append(f"  {sum(v) / steps / 1e3:8.3f} {len(v) / steps:7.1f} {np.mean(v):8.2f}  {pair}")
    return out


def host_report(calls: dict[str, list[float]], steps: int, top: int = 10) -> list[str]:
    """The CUDA runtime calls the host made (name -> durations in us), by host time a step: a call
    that blocks (a pageable copy, a graph launch, a synchronisation) shows up here, where the GPU
    sees only the gap it leaves."""
    if not calls:
        return []
    out = ["host time in CUDA runtime calls (ms/step, calls/step, max us):"]
    for name, v in sorted(calls.items(), key=lambda kv: -sum(kv[1]))[:top]:
        out.append(f"  {sum(v) / steps / 1e3:8.3f} {len(v) / steps:8.1f} {max(v):9.1f}  {name}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", type=Path, default=Path("/tmp/ft7b"))
    ap.add_argument("--mb", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("."))
    ap.add_argument("--top", type=int, default=22)
    ap.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float16"))
    ap.add_argument("--host", action="store_true", help="also trace the host's CUDA runtime calls")
    args = ap.parse_args()
    import torch
    from torch.profiler import ProfilerActivity, profile

    from train_bench import make_7b_checkpoint

    ckpt = make_7b_checkpoint(args.ckpt)
    torch.cuda.init()
    model = ft.load_model(ckpt, device="cuda", dtype=args.dtype)
    model.add_lora(r=8, alpha=16, dropout=0.05, target_modules=["query_key_value"])
    model.train()
    opt = ft.AdamW(model, lr=3e-4)
    scale = 1024.0 if model.dtype == "float16" else 1.0  # fp16: a fixed loss scale, as train_bench
    lines = []
    for mb in args.mb:
        ids = np.random.default_rng(0).integers(0, model.config.vocab_size, size=(mb, 256)).astype(np.int64)
        for _ in range(2):
            step(model, opt, ids, scale)
        phases: list = []
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step(model, opt, ids, scale, phases)
        wall = (time.perf_counter() - t0) / args.steps
        acts = [ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if args.host else [])
        t0 = time.perf_counter()
        with profile(activities=acts) as prof:
            for _ in range(args.steps):
                step(model, opt, ids, scale)
        prof_wall = (time.perf_counter() - t0) / args.steps
        by_name: dict[str, list[float]] = collections.defaultdict(list)
        spans: list[tuple[float, float, str]] = []
        host: dict[str, list[float]] = collections.defaultdict(list)
        for ev in prof.events():
            if ev.device_type != torch.autograd.DeviceType.CUDA:
                if ev.name.startswith("cuda"):  # runtime API calls (--host)
                    host[ev.name].append(ev.time_range.end - ev.time_range.start)
                continue
            dur = ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
            by_name[ev.name[:100]].append(dur)
            spans.append((ev.time_range.start, ev.time_range.end, ev.name[:60]))
        busy = sum(sum(v) for v in by_name.values()) / args.steps / 1e3
        n_k = sum(len(v) for v in by_name.values()) / args.steps
        lines += ["", f"== mb {mb}: wall per step (unprofiled) {wall * 1e3:.2f} ms ({mb * 256 / wall:,.0f} tok/s); "
                  f"GPU busy per step {busy:.2f} ms; {n_k:.0f} kernels+copies per step",
                  f"{'ms/step':>9} {'calls/step':>10} {'us/call':>9}  name"]
        for name, v in sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:args.top]:
            lines.append(f"{sum(v) / args.steps / 1e3:9.3f} {len(v) / args.steps:10.1f} {np.mean(v):9.2f}  {name}")
        span = (max(e for _, e, _ in spans) - min(b for b, _, _ in spans)) / args.steps / 1e3 if spans else 0.0
        fb, op, rest = (np.median([p[i] for p in phases]) * 1e3 for i in range(3))
        lines.append(f"unprofiled, median ms: forward_backward {fb:.2f} (its loss download waits for the step), "
                     f"optimizer step {op:.2f}, zero_grad + grad_norm {rest:.2f}; profiled: wall {prof_wall * 1e3:.2f} "
                     f"ms a step, first GPU event to last {span:.2f} ms a step")
        lines += gap_report(spans, args.steps)
        lines += host_report(host, args.steps)
    text = "\n".join(lines)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train_profile.txt").write_text(text + "\n")


if __name__ == "__main__":
    main()
