"""CPU engine throughput on a small random GPTQ Falcon (the reference backend).

    python bench/cpu_bench.py [--preset small] [--seq 128] [--mbatch 4] [--steps 5]

Prints tokens/s of a training step (forward_backward + AdamW) and of forward only.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import numpy as np

import falcontune as ft
from falcontune import testing


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--mbatch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        testing.make_checkpoint(d, preset=args.preset, bits=4, group_size=64, seed=0)
        model = ft.load_model(d, device="cpu")
        model.add_lora(r=8, alpha=16, dropout=0.05, target_modules=["query_key_value"])
        model.train()
        opt = ft.AdamW(model, lr=3e-4, max_grad_norm=1.0)
        rng = np.random.default_rng(0)
        ids = rng.integers(0, model.config.vocab_size, size=(args.mbatch, args.seq))
        model.forward_backward(ids, ids)  # warm-up
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            model.zero_grad()
            model.forward_backward(ids, ids)
            opt.step()
            times.append(time.perf_counter() - t0)
        fwd = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            model.forward(ids)
            fwd.append(time.perf_counter() - t0)
        ntok = args.mbatch * args.seq
        out = {"preset": args.preset, "seq": args.seq, "mbatch": args.mbatch, "cpu": platform.processor() or platform.machine(),
               "cores": os.cpu_count(), "train_tok_s": ntok / float(np.median(times)),
               "forward_tok_s": ntok / float(np.median(fwd))}
        print(json.dumps(out))


if __name__ == "__main__":
    main()
