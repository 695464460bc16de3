"""Decode throughput: Falcon-7B shapes, GPTQ 4-bit g64, batch 1, 32-token prompt, 128 new tokens,
plus prefill tokens/s at 512; and the peers' HF transformers ``generate`` (greedy, KV cache) on the
same card in the same run: ``hf_bf16`` (all weights bf16) and ``hf_bnb4`` (decoder linears in
bitsandbytes NF4, double quant, bf16 compute: bench/hf_peers.py), one after the other, each
model freed before the next is built.

    python bench/decode_bench.py [--ckpt DIR] [--out bench/results] [--skip-hf] [--peers hf_bf16 hf_bnb4]
                                 [--lora R]

--lora R measures ours as a tutorial user generates after training: with a rank-R adapter on
query_key_value (random nonzero weights); the JSON is then decode_lora<R>_<card>_<date>.json.

Ceiling (count first): each new token reads the packed weights (~3.5 GB at 4 bits + scales)
and the bf16 lm_head (65024 x 4544 x 2 B = 0.59 GB): ~3.9 GB per token; at the H100's measured
~3.0 TB/s that is ~760 tok/s.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import falcontune as ft  # noqa: E402


def card_name() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20).stdout.strip().splitlines()
        return out[0].replace(" ", "_") if out else "unknown"
    except OSError:
        return "cpu"


def ensure_checkpoint(path: Path) -> Path:
    """The same 7B-shaped checkpoint as the training benchmark (one random layer, 32 copies):
    decode speed does not depend on the weight values, and it is written in seconds."""
    sys.path.insert(0, str(REPO / "bench"))
    from train_bench import make_7b_checkpoint

    return make_7b_checkpoint(path)


def bench_ours(ckpt: Path, prompt_len: int, new_tokens: int, reps: int, lora_r: int = 0) -> dict:
    model = ft.load_model(ckpt, device="cuda")
    if lora_r:  # the tutorial's adapter: rank r on query_key_value, nonzero weights
        from falcontune import testing

        model.add_lora(r=lora_r, alpha=2 * lora_r, dropout=0.05, target_modules=["query_key_value"])
        model.load_lora_state_dict(testing.random_lora(model.config, lora_r, ["query_key_value"], seed=1))
    rng = np.random.default_rng(0)
    ids = rng.integers(100, 60000, size=(1, prompt_len))
    model.generate_ids(ids, max_new_tokens=8, eos_token_id=-1)  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = model.generate_ids(ids, max_new_tokens=new_tokens, eos_token_id=-1)
        times.append(time.perf_counter() - t0)
    assert out.shape[1] == prompt_len + new_tokens
    # prefill alone at 512 tokens
    long_ids = rng.integers(100, 60000, size=(1, 512))
    pre = []
    for _ in range(reps + 1):
        model.engine.cache_init(1, 520)
        t0 = time.perf_counter()
        model.engine.forward_cached(long_ids, None)
        pre.append(time.perf_counter() - t0)
        model.engine.cache_free()
    # per-token decode time excluding the prompt: time of (n+8) minus time of 8 new tokens
    t_small = []
    for _ in range(reps):
        t0 = time.perf_counter()
        model.generate_ids(ids, max_new_tokens=8, eos_token_id=-1)
        t_small.append(time.perf_counter() - t0)
    per_tok = (np.median(times) - np.median(t_small)) / (new_tokens - 8)
    return {"tok_s_b1": new_tokens / float(np.median(times)), "decode_only_tok_s_b1": 1.0 / per_tok,
            "prefill_tok_s_512": 512 / float(np.median(pre[1:])), "seconds": [float(t) for t in times]}


def bench_hf(peer: str, prompt_len: int, new_tokens: int, reps: int) -> dict:
    import torch

    sys.path.insert(0, str(REPO / "bench"))
    import hf_peers
    from falcontune.models import FALCON_7B_CONFIG

    model = hf_peers.build(peer, hf_peers.hf_config(FALCON_7B_CONFIG, 32), device="cuda")
    model.config.use_cache = True
    ids = torch.randint(100, 60000, (1, prompt_len), device="cuda")
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
        times = []
        for _ in range(reps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = model.generate(ids, **kw)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    assert out.shape[1] == prompt_len + new_tokens
    del model
    torch.cuda.empty_cache()
    return {"tok_s_b1": new_tokens / float(np.median(times)), "seconds": [float(t) for t in times],
            "versions": hf_peers.versions()}


# JSON key -> hf_peers model
HF_PEERS = {"hf_bf16": "hf_bf16_peft", "hf_bnb4": "hf_bnb4_qlora"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", type=Path, default=Path(tempfile.gettempdir()) / "ft7b")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--peers", nargs="*", choices=sorted(HF_PEERS), default=sorted(HF_PEERS))
    ap.add_argument("--lora", type=int, default=0, metavar="R",
                    help="ours with a rank-R adapter on query_key_value (the tutorial's), as a user generates "
                         "after training; the peers stay as they are")
    args = ap.parse_args()
    card = card_name()
    result = {"card": card, "date": datetime.date.today().isoformat(), "prompt_tokens": args.prompt,
              "new_tokens": args.new, "batch": 1, "ours_lora_r": args.lora}
    result["ours"] = bench_ours(ensure_checkpoint(args.ckpt), args.prompt, args.new, args.reps, args.lora)
    print("ours", json.dumps(result["ours"]), flush=True)
    for key in ([] if args.skip_hf else args.peers):
        try:
            result[key] = bench_hf(HF_PEERS[key], args.prompt, args.new, args.reps)
        except Exception as e:  # noqa: BLE001 - a peer that cannot run is recorded, ours is kept
            result[key] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        print(key, json.dumps(result[key]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"decode{f'_lora{args.lora}' if args.lora else ''}_{card}_{result['date']}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    out_dir = os.environ.get("OUT")
    if out_dir:
        Path(out_dir, path.name).write_text(path.read_text())
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
