"""Training-step benchmark: falcontune (CUDA backend) and its peers on the same card in the same
call, same LoRA (r=8, alpha=16, dropout 0.05, query_key_value), same sequence length, same step
(forward, backward, AdamW):

* ``ours``          falcontune, GPTQ 4-bit checkpoint of the preset's shapes
* ``hf_bf16_peft``  HF transformers FalconForCausalLM bf16 + PEFT LoRA
* ``hf_bnb4_qlora`` HF transformers + bitsandbytes NF4 (double quant, bf16 compute) + PEFT LoRA
  (bench/hf_peers.py says how each peer is built); neither peer uses gradient checkpointing.

    python3 bench/train_bench.py [--preset falcon-7b|falcon-40b] [--mb 1 4 16] [--seq 256]
                                 [--steps 8] [--warmup 3] [--peers hf_bf16_peft hf_bnb4_qlora]
                                 [--no-hf] [--out bench/results] [--ckpt DIR]

Presets: ``falcon-7b`` (GPTQ 4-bit, group 64, 32 layers; mb 1 4 16 by default) and
``falcon-40b`` (GPTQ 4-bit, act-order, one group (-1), new_decoder_architecture, 60 layers;
mb 1 4). The checkpoint (random) is generated once into --ckpt (default /tmp/ft7b or
/tmp/ft40b): testing.make_checkpoint writes ONE layer of the preset's shapes and the
benchmark model reuses that layer's tensors under every layer's name (timing and memory do
not depend on the values; generation takes seconds instead of minutes). At 40B the file is
~21 GB.

Peers at shapes that may not fit the card (40B in bf16 is ~78 GiB of weights, and building the
NF4 model passes through the bf16 one): before building, and before each mb, the worker
compares hf_peers.estimate_bytes with the card's memory; what does not fit is recorded as
{"skipped": "..."} instead of being run, and an out-of-memory error is recorded as
{"error": "OOM: ..."}. On an H200 (139 GiB) every peer runs at 40B mb 1 and 4.

Each measurement runs in its own process: ours one per mb, each peer one for all its mbs
(torch's peak counter reset before each mb). ours: tokens/s = mb*seq / median step time;
peak_GiB = high-water mark of every byte the CUDA backend allocated (weights, activations,
scratch, the cuBLAS workspace), the counterpart of torch.cuda.max_memory_allocated;
device_peak_GiB = the largest (total - free) seen by polling cudaMemGetInfo every 2 ms
(includes the CUDA context). Peers: torch.cuda.max_memory_allocated (and max_memory_reserved).
Writes <out>/train_<card>_<date>.json (falcon-7b) or <out>/train40b_<card>_<date>.json
(falcon-40b) and prints the Markdown rows for docs/PERF.md.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import hf_peers  # noqa: E402
from falcontune.models import FALCON_7B_CONFIG, FALCON_40B_CONFIG  # noqa: E402

GiB = float(1 << 30)


@dataclass(frozen=True)
class Preset:
    testing_preset: str  # falcontune.testing preset of the one generated layer
    model_config: dict
    group_size: int
    desc_act: bool
    layers: int
    mbs: tuple[int, ...]
    steps: int
    warmup: int
    ckpt: str
    result_prefix: str


PRESETS = {
    "falcon-7b": Preset("falcon-7b", FALCON_7B_CONFIG, 64, False, 32, (1, 4, 16), 8, 3, "/tmp/ft7b", "train"),
    "falcon-40b": Preset("falcon-40b", FALCON_40B_CONFIG, -1, True, 60, (1, 4), 5, 2, "/tmp/ft40b", "train40b"),
}


def make_bench_checkpoint(directory: Path, preset: str = "falcon-7b", layers: int | None = None) -> Path:
    """One random GPTQ layer of the preset's shapes (directory/one_layer, itself a 1-layer
    checkpoint), replicated to `layers` (default: the preset's count) in directory."""
    from falcontune import testing
    from falcontune.weights import SafetensorsFile, save_safetensors

    p = PRESETS[preset]
    layers = layers or p.layers
    directory = Path(directory)
    if (directory / "config.json").is_file():
        return directory
    one = directory / "one_layer"
    t0 = time.time()
    testing.make_checkpoint(one, preset=p.testing_preset, bits=4, group_size=p.group_size, desc_act=p.desc_act,
                            num_hidden_layers=1)
    src = next(one.glob("*.safetensors"))
    f = SafetensorsFile(src)
    tensors = {}
    for name in f.names():
        a = f.tensor(name)
        if name.startswith("transformer.h.0."):
            rest = name[len("transformer.h.0."):]
            for i in range(layers):
                tensors[f"transformer.h.{i}.{rest}"] = a
        else:
            tensors[name] = a
    save_safetensors(directory / src.name, tensors, metadata={"format": "pt"})
    cfg = json.loads((one / "config.json").read_text())
    for k in ("num_hidden_layers", "n_layer"):
        if k in cfg:
            cfg[k] = layers
    (directory / "quantize_config.json").write_text((one / "quantize_config.json").read_text())
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    print(f"checkpoint ({preset}): {directory} in {time.time() - t0:.1f}s", flush=True)
    return directory


def make_7b_checkpoint(directory: Path) -> Path:
    """The Falcon-7B benchmark checkpoint (decode_bench, decode_profile and a CLI test use it)."""
    return make_bench_checkpoint(directory, "falcon-7b")


# --------------------------------------------------------------------------------------------
# workers (each in its own process)

def worker_ours(ckpt: str, preset: str, mb: int, seq: int, steps: int, warmup: int, dtype: str) -> dict:
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

    make_bench_checkpoint(Path(ckpt), preset)
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


def worker_peer(peer: str, preset: str, mbs: list, seq: int, steps: int, warmup: int) -> dict:
    import torch

    p = PRESETS[preset]
    cfg = hf_peers.hf_config(p.model_config, p.layers)
    total = torch.cuda.get_device_properties(0).total_memory
    budget = 0.92 * total
    build_need, _ = hf_peers.estimate_bytes(peer, cfg, 0)
    out = {"attn_implementation": "?", "lora_layer": "?", "versions": hf_peers.versions(), "build_s": None}
    if build_need > budget:
        out["skipped"] = (f"building needs ~{build_need / GiB:.0f} GiB (bf16 weights), the card has "
                          f"{total / GiB:.0f} GiB")
        return out
    t0 = time.time()
    try:
        model = hf_peers.build(peer, cfg, device="cuda")
        model, params, out["lora_layer"] = hf_peers.add_lora(model)
    except torch.cuda.OutOfMemoryError as e:
        out["error"] = f"OOM while building: {str(e)[:200]}"
        return out
    out["build_s"] = round(time.time() - t0, 1)
    out["attn_implementation"] = getattr(model.config, "_attn_implementation", "?")
    model.train()
    opt = torch.optim.AdamW(params, lr=3e-4)
    for mb in mbs:
        _, need = hf_peers.estimate_bytes(peer, cfg, mb * seq)
        if need > budget:
            out[str(mb)] = {"skipped": f"needs ~{need / GiB:.0f} GiB, the card has {total / GiB:.0f} GiB"}
            print(peer, mb, out[str(mb)], flush=True)
            continue
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
        print(peer, mb, out[str(mb)], flush=True)
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


def _cell(r: dict, key: str) -> str:
    if not r:
        return "-"
    if key in r:
        return f"{r[key]:,}" if isinstance(r[key], (int, float)) else str(r[key])
    return "skipped" if "skipped" in r else "error" if "error" in r else "-"


def markdown_rows(res: dict) -> str:
    head = ["card", "date", "mb", "ours tok/s", "ours peak GiB"]
    for peer in hf_peers.PEERS:
        head += [f"{peer} tok/s", f"{peer} peak GiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for mb in res["ours"]:
        o = res["ours"][mb]
        row = [res["card"], res["date"], mb, _cell(o, "tok_s"), _cell(o, "peak_GiB")]
        for peer in hf_peers.PEERS:
            r = res.get(peer, {}).get(mb, {})
            row += [_cell(r, "tok_s"), _cell(r, "peak_GiB")]
        lines.append("| " + " | ".join(map(str, row)) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", choices=sorted(PRESETS), default="falcon-7b")
    ap.add_argument("--mb", type=int, nargs="+", default=None, help="micro-batch sizes (default: the preset's)")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--peers", nargs="*", choices=hf_peers.PEERS, default=list(hf_peers.PEERS))
    ap.add_argument("--no-hf", action="store_true", help="ours only (same as --peers with no name)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--ckpt", default=None)
    ap.add_argument("--worker", choices=["ours", *hf_peers.PEERS], default=None)
    a = ap.parse_args()
    p = PRESETS[a.preset]
    mbs = a.mb or list(p.mbs)
    steps = a.steps if a.steps is not None else p.steps
    warmup = a.warmup if a.warmup is not None else p.warmup

    if a.worker == "ours":
        r = worker_ours(a.ckpt, a.preset, mbs[0], a.seq, steps, warmup, a.dtype)
        print("RESULT " + json.dumps(r), flush=True)
        return
    if a.worker:
        r = worker_peer(a.worker, a.preset, mbs, a.seq, steps, warmup)
        print("RESULT " + json.dumps(r), flush=True)
        return

    ckpt = Path(a.ckpt or p.ckpt)
    make_bench_checkpoint(ckpt, a.preset)
    card = card_name()
    date = _dt.date.today().isoformat()
    res = {"card": card, "date": date, "preset": a.preset, "seq": a.seq, "dtype": a.dtype,
           "quantization": {"bits": 4, "group_size": p.group_size, "act_order": p.desc_act, "layers": p.layers},
           "lora": {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": ["query_key_value"]},
           "command": "python3 bench/train_bench.py " + " ".join(sys.argv[1:]), "ours": {}}
    common = ["--preset", a.preset, "--seq", str(a.seq), "--steps", str(steps), "--warmup", str(warmup)]
    for mb in mbs:
        t0 = time.time()
        r = run_worker(["--worker", "ours", "--ckpt", str(ckpt), "--mb", str(mb), "--dtype", a.dtype, *common])
        res["ours"][str(mb)] = r
        print(f"ours mb {mb} ({time.time() - t0:.0f} s)", r, flush=True)
    for peer in ([] if a.no_hf else a.peers):
        t0 = time.time()
        res[peer] = run_worker(["--worker", peer, "--mb", *map(str, mbs), *common])
        print(f"{peer} ({time.time() - t0:.0f} s)", res[peer], flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = "".join(c if c.isalnum() else "_" for c in card).strip("_")
    path = out / f"{p.result_prefix}_{slug}_{date}.json"
    path.write_text(json.dumps(res, indent=2) + "\n")
    print("wrote", path)
    print("\n" + markdown_rows(res))


if __name__ == "__main__":
    main()
