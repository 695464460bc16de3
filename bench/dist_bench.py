"""Data parallel scaling: the training step of ``falcontune finetune`` on N processes (one GPU each).

    mpiexec -n N python3 bench/dist_bench.py [--ckpt /tmp/ft7b] [--mb 4] [--seq 256] [--micro 8]
                                             [--steps 6] [--warmup 2] [--dtype bfloat16] [--out bench/results]
    mpiexec -n 2 python3 bench/dist_bench.py --tiny --device cpu      # the script itself, in seconds

Run it for N = 1 first, then 2, 4, 8 (same flags, same day): each run writes
<out>/dist_<card>_<date>_n<N>.json and, when the N = 1 file of the same settings is there, the
scaling efficiency (tokens/s at N / (N x tokens/s at 1)) and the largest relative difference of
the LoRA weights after the run from the N = 1 weights (<out>/dist_weights_<card>_<date>_n<N>.npy).

A step is the trainer's (falcontune.trainer.Trainer._step): --micro micro-batches of mb x seq
tokens (a global batch of micro x mb rows), dealt round-robin to the ranks, each micro-batch's
dropout drawn from counter base + i, the LoRA gradients summed (NCCL on CUDA, MPI on the CPU),
one AdamW update. Micro-batch i of step s holds the same random tokens whatever N, so every N
trains the same adapter. The checkpoint is train_bench's (Falcon-7B shapes, random GPTQ weights,
one layer replicated; --tiny: the 2-layer test preset).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def _tokens(seed: int, step: int, micro: int, mb: int, seq: int, vocab: int) -> np.ndarray:
    """Micro-batch `micro` of step `step`: the same tokens on every rank and every N."""
    return np.random.default_rng([seed, step, micro]).integers(0, vocab, size=(mb, seq))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", default="/tmp/ft7b")
    ap.add_argument("--tiny", action="store_true", help="the tiny test model instead of Falcon-7B shapes")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--mb", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--micro", type=int, default=8, help="micro-batches per step, all ranks together")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()

    import falcontune as ft
    from falcontune import dist, testing

    world = dist.current()
    if args.micro % world.size:
        raise SystemExit(f"--micro={args.micro} must be a multiple of the {world.size} processes")
    if args.tiny:
        ckpt = Path(args.ckpt) / "tiny"
        if world.is_root and not (ckpt / "config.json").is_file():
            testing.make_checkpoint(ckpt, preset="tiny", vocab_size=512)
    else:
        from train_bench import make_7b_checkpoint

        ckpt = Path(args.ckpt)
        if world.is_root:
            make_7b_checkpoint(ckpt)
    world.barrier()  # rank 0 made the checkpoint
    device = ft.resolve_device(device=args.device)
    if world.size > 1 and device.startswith("cuda"):
        from falcontune import _C

        dist.check_gpu_placement(world, int(_C.cuda_device_count()))
    model = ft.load_model(ckpt, device=device, dtype=args.dtype)
    model.add_lora(r=8, alpha=16, dropout=0.05, target_modules=["query_key_value"], seed=0)
    model.train()
    eng = model.engine
    eng.set_rng(0, 0)
    opt = ft.AdamW(model, lr=1e-4)
    sum_gradients = dist.GradientSum(world, eng)
    scale = 1024.0 if model.dtype == "float16" else 1.0
    vocab = model.config.vocab_size
    k = args.micro
    step_times, reduce_times = [], []
    for step in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        seed, base = eng.get_rng()
        model.zero_grad()
        for i in range(world.rank, k, world.size):
            ids = _tokens(1, step, i, args.mb, args.seq, vocab)
            eng.set_rng(seed, base + i)
            model.forward_backward(ids, ids, grad_scale=scale / k)
        eng.set_rng(seed, base + k)
        t1 = time.perf_counter()
        sum_gradients()
        reduce_s = time.perf_counter() - t1
        opt.step(grad_scale=scale)
        eng.grad_norm()  # waits for the update's kernels
        world.barrier()
        if step >= args.warmup:
            step_times.append(time.perf_counter() - t0)
            reduce_times.append(reduce_s)
    sum_gradients.close()
    weights = np.concatenate([a.ravel() for _, a in sorted(model.lora_state_dict().items())]).astype(np.float32)
    if not world.is_root:
        return

    from train_bench import card_name

    card = "cpu" if model.device == "cpu" else card_name()
    tag = f"{card.replace(' ', '_')}_{_dt.date.today().isoformat()}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    step_s = statistics.median(step_times)
    res = {"card": card, "date": _dt.date.today().isoformat(), "device": model.device, "dtype": model.dtype,
           "processes": world.size,
           "collective": "nccl" if sum_gradients.nccl else ("mpi" if world.size > 1 else "none"),
           "model": "tiny" if args.tiny else "falcon-7b shapes", "mb": args.mb, "seq": args.seq,
           "micro_per_step": k, "steps": args.steps, "warmup": args.warmup, "step_s": round(step_s, 5),
           "reduce_s": round(statistics.median(reduce_times), 5),
           "tok_s": round(k * args.mb * args.seq / step_s, 1),
           "lora_floats": int(weights.size)}
    np.save(out / f"dist_weights_{tag}_n{world.size}.npy", weights)
    base_json = out / f"dist_{tag}_n1.json"
    if world.size > 1 and base_json.is_file():
        base = json.loads(base_json.read_text())
        same = all(base[key] == res[key] for key in ("mb", "seq", "micro_per_step", "steps", "model", "dtype"))
        if same:
            ref = np.load(out / f"dist_weights_{tag}_n1.npy")
            res["efficiency"] = round(res["tok_s"] / (world.size * base["tok_s"]), 4)
            res["weights_max_rel_diff_vs_n1"] = float(np.abs(weights - ref).max() / np.abs(ref).max())
    (out / f"dist_{tag}_n{world.size}.json").write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))
    eff = res.get("efficiency")
    print(f"| {res['date']} | {card} | {world.size} | {res['mb']} x {k} | {res['tok_s']:,.0f} | "
          f"{'' if eff is None else f'{100 * eff:.0f}%'} | {res['reduce_s'] * 1e3:.1f} ms |")


if __name__ == "__main__":
    main()
