"""Training-step benchmark at Falcon-7B shapes: falcontune (CUDA backend) vs HF transformers
FalconForCausalLM bf16 + PEFT, same LoRA (r=8, alpha=16, dropout 0.05, query_key_value), same
sequence length, same step (forward, backward, AdamW), on the same card.

    python3 bench/train_bench.py [--mb 1 4 16] [--seq 256] [--steps 8] [--warmup 3] [--no-hf]
                                 [--out bench/results] [--ckpt DIR]

The 7B GPTQ checkpoint (4-bit, group 64, random) is generated once into --ckpt (default: a temp
dir): testing.make_checkpoint writes one Falcon-7B-shaped layer and the 32 layers of the
benchmark model reuse that layer's tensors under their own names (the timing and memory of a
step do not depend on the values; this keeps generation at seconds instead of minutes).

Each measurement runs in its own process. ours: tokens/s = mb*seq / median step time; peak_GiB
= high-water mark of every byte the CUDA backend allocated (weights, activations, scratch, the
cuBLAS workspace), the counterpart of torch.cuda.max_memory_allocated; device_peak_GiB = the
largest (total - free) seen by polling cudaMemGetInfo every 2 ms (includes the CUDA context).
hf_bf16_peft: torch.cuda.max_memory_allocated (and max_memory_reserved).
Writes <out>/train_<card>_<date>.json and prints a Markdown row set for docs/PERF.md.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GiB = float(1 << 30)


def make_7b_checkpoint(directory: Path, layers: int = 32) -> Path:
    import numpy as np  # noqa: F401
    from falcontune import testing
    from falcontune.weights import SafetensorsFile, save_safetensors

    directory = Path(directory)
    if (directory / "config.json").is_file():
        return directory
    one = directory / "one_layer"
    t0 = time.time()
    testing.make_checkpoint(one, preset="falcon-7b", bits=4, group_size=64, num_hidden_layers=1)
    f = SafetensorsFile(next(one.glob("*.safetensors")))
    tensors = {}
    for name in f.names():
        a = f.tensor(name)
        if name.startswith("transformer.h.0."):
            rest = name[len("transformer.h.0."):]
            for i in range(layers):
                tensors[f"transformer.h.{i}.{rest}"] = a
        else:
            tensors[name] = a
    save_safetensors(directory / "gptq_model-4bit-64g.safetensors", tensors, metadata={"format": "pt"})
    cfg = json.loads((one / "config.json").read_text())
    for k in ("num_hidden_layers", "n_layer"):
        if k in cfg:
            cfg[k] = layers
    (directory / "quantize_config.json").write_text((one / "quantize_config.json").read_text())
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    print(f"checkpoint: {directory} in {time.time() - t0:.1f}s", flush=True)
    return directory


# --------------------------------------------------------------------------------------------
# workers (each in its own process)

def worker_ours(ckpt: str, mb: int, seq: int, steps: int, warmup: int, dtype: str) -> dict:
    import numpy as np
    import falcontune as ft
    from falcontune import _C

    dev_peak = [0]
    stop = threading.Event()

    def poll():  # device-wide use (CUDA context included), sampled while the steps run
        while not stop.is_set():
            info = _C.cuda_device_memory()
            if info:
                dev_peak[0] = max(dev_peak[0], info[0])
            time.sleep(0.002)

    make_7b_checkpoint(Path(ckpt))
    th = threading.Thread(target=poll, daemon=True)
    th.start()
    t0 = time.time()
    model = ft.load_model(ckpt, device="cuda", dtype=dtype)
    load_s = time.time() - t0
    model.add_lora(r=8, alpha=16, dropout=0.05, target_modules=["query_key_value"])
    model.train()
    opt = ft.AdamW(model, lr=3e-4)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, model.config.vocab_size, size=(mb, seq)).astype(np.int64)
    scale = 1.0 if dtype == "bfloat16" else 1024.0
    times = []
    losses = []
    for i in range(warmup + steps):
        t = time.perf_counter()
        loss = model.forward_backward(ids, ids, grad_scale=scale)
        opt.step(grad_scale=scale)
        model.zero_grad()
        model.engine.grad_norm()  # waits for the step's last kernels
        dt = time.perf_counter() - t
        losses.append(loss)
        if i >= warmup:
            times.append(dt)
    stop.set()
    th.join()
    cur, peak = model.engine.memory_stats()
    dev = (_C.cuda_device_memory() or (0, 0))[0]
    med = statistics.median(times)
    return {"tok_s": round(mb * seq / med, 1), "step_s": round(med, 5), "peak_GiB": round(peak / GiB, 3),
            "device_peak_GiB": round(max(dev_peak[0], dev) / GiB, 3), "load_s": round(load_s, 1),
            "loss_first_last": [round(losses[0], 4), round(losses[-1], 4)], "steps": steps, "warmup": warmup}


def worker_hf(mbs: list, seq: int, steps: int, warmup: int) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import FalconConfig, FalconForCausalLM

    cfg = FalconConfig(vocab_size=65024, hidden_size=4544, num_hidden_layers=32, num_attention_heads=71,
                       num_kv_heads=71, multi_query=True, parallel_attn=True, new_decoder_architecture=False,
                       alibi=False, bias=False, bos_token_id=11, eos_token_id=11)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = FalconForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    model.config.use_cache = False
    lcfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["query_key_value"], bias="none",
                      task_type="CAUSAL_LM")
    model = get_peft_model(model, lcfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()  # fp32 LoRA master weights, as ours
    opt = torch.optim.AdamW(params, lr=3e-4)
    out = {"attn_implementation": getattr(model.config, "_attn_implementation", "?")}
    for mb in mbs:
        ids = torch.randint(0, cfg.vocab_size, (mb, seq), device="cuda")
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        times = []
        try:
            for i in range(warmup + steps):
                torch.cuda.synchronize()
                t = time.perf_counter()
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                torch.cuda.synchronize()
                if i >= warmup:
                    times.append(time.perf_counter() - t)
            med = statistics.median(times)
            out[str(mb)] = {"tok_s": round(mb * seq / med, 1), "step_s": round(med, 5),
                            "peak_GiB": round(torch.cuda.max_memory_allocated() / GiB, 3),
                            "reserved_GiB": round(torch.cuda.max_memory_reserved() / GiB, 3)}
        except torch.cuda.OutOfMemoryError as e:
            out[str(mb)] = {"error": f"OOM: {str(e)[:200]}"}
            opt.zero_grad(set_to_none=True)
        print("hf", mb, out[str(mb)], flush=True)
    return out


# --------------------------------------------------------------------------------------------

def run_worker(args: list) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), *args]
    p = subprocess.run(cmd, capture_output=True, text=True)
    sys.stderr.write(p.stderr[-4000:])
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return {"error": f"worker exited {p.returncode}: {p.stdout[-1500:]} {p.stderr[-1500:]}"}


def card_name() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20).stdout.strip().splitlines()[0]
        return out
    except Exception:  # noqa: BLE001
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--ckpt", default=None)
    ap.add_argument("--worker", choices=["ours", "hf"], default=None)
    a = ap.parse_args()

    if a.worker == "ours":
        r = worker_ours(a.ckpt, a.mb[0], a.seq, a.steps, a.warmup, a.dtype)
        print("RESULT " + json.dumps(r), flush=True)
        return
    if a.worker == "hf":
        r = worker_hf(a.mb, a.seq, a.steps, a.warmup)
        print("RESULT " + json.dumps(r), flush=True)
        return

    ckpt = Path(a.ckpt) if a.ckpt else Path(tempfile.mkdtemp(prefix="ft7b_"))
    make_7b_checkpoint(ckpt)
    card = card_name()
    date = _dt.date.today().isoformat()
    res = {"card": card, "date": date, "seq": a.seq, "dtype": a.dtype,
           "lora": {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": ["query_key_value"]},
           "command": "python3 bench/train_bench.py " + " ".join(sys.argv[1:]), "ours": {}}
    for mb in a.mb:
        r = run_worker(["--worker", "ours", "--ckpt", str(ckpt), "--mb", str(mb), "--seq", str(a.seq),
                        "--steps", str(a.steps), "--warmup", str(a.warmup), "--dtype", a.dtype])
        res["ours"][str(mb)] = r
        print("ours", mb, r, flush=True)
    if not a.no_hf:
        res["hf_bf16_peft"] = run_worker(["--worker", "hf", "--mb", *map(str, a.mb), "--seq", str(a.seq),
                                          "--steps", str(a.steps), "--warmup", str(a.warmup)])
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = "".join(c if c.isalnum() else "_" for c in card).strip("_")
    path = out / f"train_{slug}_{date}.json"
    path.write_text(json.dumps(res, indent=2) + "\n")
    print("wrote", path)
    print(f"\n| card | date | mb | ours tok/s | ours peak GiB | HF bf16+PEFT tok/s | HF peak GiB |")
    print("|---|---|---|---|---|---|---|")
    for mb in a.mb:
        o = res["ours"].get(str(mb), {})
        h = res.get("hf_bf16_peft", {}).get(str(mb), {})
        print(f"| {card} | {date} | {mb} | {o.get('tok_s')} | {o.get('peak_GiB')} | {h.get('tok_s')} | "
              f"{h.get('peak_GiB')} |")


if __name__ == "__main__":
    main()
