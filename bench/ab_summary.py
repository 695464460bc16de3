"""One line of figures from the JSON a benchmark wrote into a folder (bench/device_ab.sh's summary).

    python3 bench/ab_summary.py train DIR    ->  "mb 1: 9930 tok/s 4.85 GiB; mb 16: 19212 tok/s 14.13 GiB"
    python3 bench/ab_summary.py decode DIR   ->  "326.3 tok/s end to end, 332.5 decode-only, prefill 29033"
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def newest_json(folder: Path, prefix: str) -> dict | None:
    files = sorted(folder.glob(f"{prefix}_*.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(files[-1].read_text()) if files else None


def train_line(result: dict) -> str:
    parts = []
    for mb, r in sorted(result.get("ours", {}).items(), key=lambda kv: int(kv[0])):
        if "tok_s" in r:
            parts.append(f"mb {mb}: {r['tok_s']:.0f} tok/s {r['peak_GiB']:.2f} GiB")
        else:
            parts.append(f"mb {mb}: {r.get('error', 'no result')}")
    return "; ".join(parts) or "no result"


def decode_line(result: dict) -> str:
    ours = result.get("ours", {})
    if "tok_s_b1" not in ours:
        return str(ours.get("error", "no result"))
    return (f"{ours['tok_s_b1']:.1f} tok/s end to end, {ours['decode_only_tok_s_b1']:.1f} decode-only, "
            f"prefill {ours['prefill_tok_s_512']:.0f}")


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[1] not in ("train", "decode"):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    result = newest_json(Path(argv[2]), argv[1])
    if result is None:
        print("no JSON written")
        return 0
    print(train_line(result) if argv[1] == "train" else decode_line(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
