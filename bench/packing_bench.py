"""Packing: padding saved, and (with --time, on a GPU) the epoch-time speed-up at Falcon-7B shapes.

    python3 bench/packing_bench.py [--tokenizer PATH] [--dataset datasets/fr_instructions.json]
                                   [--cutoff 256] [--mb 1 4 8 16]
                                   [--time --ckpt DIR --device cuda] [--out bench/results]

Padding (no model): the dataset is tokenized as `finetune` does (alpaca template, prompt learned,
EOS), every example cut to --cutoff. For each micro-batch size, the training batches of one epoch
(data.length_grouped_batches, seed 42, epoch 0) are right-padded to their longest row; the
padded fraction is padding tokens / all tokens of those batches. Packed: the same for the rows
of packing.pack_dataset (best-fit decreasing into --cutoff rows). "slots" = every token position
the engine computes in an epoch (sum of rows x width): its ratio is the work saved.

--time: one epoch of forward_backward (no optimizer, the same for both) over those batches on
the 7B-shaped random GPTQ checkpoint of bench/train_bench.py (--ckpt, made once); epoch seconds
and real tokens per second, unpacked and packed, and the speed-up.
Writes <out>/packing_<date>.json and prints Markdown rows for docs/PERF.md.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _default_tokenizer() -> Path:
    shared = Path(os.environ.get("FALCONTUNE_SHARED_DATA") or ROOT.parent / "shared" / "data")
    return shared / "falcon" / "tokenizer.json"


def _batches(lengths: np.ndarray, mb: int) -> list[np.ndarray]:
    from falcontune.data import length_grouped_batches
    return length_grouped_batches(lengths, mb, seed=42, epoch=0, shuffle=True)


def padding_rows(ds: object, packed: object, mb: int) -> dict:
    from falcontune.packing import padding_fraction

    out = {"mb": mb}
    for name, data in (("unpacked", ds), ("packed", packed)):
        lens = data.lengths  # type: ignore[attr-defined]
        batches = _batches(lens, mb)
        slots = sum(len(b) * int(lens[b].max()) for b in batches)
        out[name] = {"rows": int(len(lens)), "batches": len(batches), "slots": int(slots),
                     "padding_fraction": padding_fraction(lens, batches)}
    out["slots_ratio"] = out["packed"]["slots"] / out["unpacked"]["slots"]
    return out


def time_epoch(model: object, data: object, mb: int, pad_id: int) -> float:
    from falcontune.data import collate

    batches = _batches(data.lengths, mb)  # type: ignore[attr-defined]
    first = collate(data, batches[0], pad_id)
    model.forward_backward(first["input_ids"], first["labels"], first["attention_mask"])  # warm-up
    t0 = time.perf_counter()
    for idx in batches:
        b = collate(data, idx, pad_id)
        model.forward_backward(b["input_ids"], b["labels"], b["attention_mask"])
    model.zero_grad()
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", type=Path, default=_default_tokenizer())
    ap.add_argument("--dataset", type=Path, default=ROOT / "datasets" / "fr_instructions.json")
    ap.add_argument("--data_type", default="alpaca")
    ap.add_argument("--cutoff", type=int, default=256)
    ap.add_argument("--mb", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--time", action="store_true", help="also time an epoch (needs a GPU for 7B shapes)")
    ap.add_argument("--ckpt", type=Path, default=Path("/tmp/ft7b"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float16"))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    a = ap.parse_args()

    from falcontune.data import load_records, tokenize_records
    from falcontune.packing import pack_dataset
    from falcontune.tokenizer import Tokenizer

    tok = Tokenizer.from_file(a.tokenizer)
    records = load_records(a.dataset, a.data_type)
    ds = tokenize_records(records, tok, a.data_type, cutoff_len=a.cutoff, train_on_inputs=a.data_type == "alpaca")
    packed = pack_dataset(ds, a.cutoff)
    result = {"dataset": str(a.dataset.relative_to(ROOT) if a.dataset.is_relative_to(ROOT) else a.dataset),
              "tokenizer": a.tokenizer.name, "cutoff": a.cutoff, "examples": len(ds),
              "tokens": int(ds.lengths.sum()), "truncated": ds.n_truncated,
              "date": _dt.date.today().isoformat(), "rows": [padding_rows(ds, packed, mb) for mb in a.mb]}

    if a.time:
        import falcontune as ft

        sys.path.insert(0, str(ROOT / "bench"))
        from train_bench import make_7b_checkpoint

        m = ft.load_model(make_7b_checkpoint(a.ckpt), device=a.device, dtype=a.dtype)
        m.add_lora(r=8, alpha=16, dropout=0.05, target_modules=["query_key_value"], seed=0)
        m.train()
        result["device"] = str(m.device)
        for row in result["rows"]:
            for name, data in (("unpacked", ds), ("packed", packed)):
                secs = time_epoch(m, data, row["mb"], tok.pad_token_id or 0)
                row[name]["epoch_s"] = secs
                row[name]["tokens_per_s"] = result["tokens"] / secs
            row["speedup"] = row["unpacked"]["epoch_s"] / row["packed"]["epoch_s"]

    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / f"packing_{result['date']}.json"
    path.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(f"{result['dataset']}: {result['examples']} examples, {result['tokens']} tokens, cutoff {a.cutoff}, "
          f"{len(packed)} packed rows ({result['truncated']} examples cut)")
    print("| mb | unpacked padding | packed padding | rows unpacked -> packed | slots packed / unpacked |"
          + (" epoch s unpacked -> packed | speed-up |" if a.time else ""))
    print("|---|---|---|---|---|" + ("---|---|" if a.time else ""))
    for r in result["rows"]:
        u, p = r["unpacked"], r["packed"]
        line = (f"| {r['mb']} | {100 * u['padding_fraction']:.1f}% | {100 * p['padding_fraction']:.1f}% | "
                f"{u['rows']} -> {p['rows']} | {r['slots_ratio']:.3f} |")
        if a.time:
            line += f" {u['epoch_s']:.2f} -> {p['epoch_s']:.2f} | {r['speedup']:.2f}x |"
        print(line)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
