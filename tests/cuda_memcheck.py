"""Run every CUDA op on a Falcon-7B-shaped layer (widths 4544 / 4672 / 18176, 71 heads, one kv
head) so compute-sanitizer can check it. Not a pytest file; run as

    compute-sanitizer --tool memcheck --error-exitcode 1 python3 tests/cuda_memcheck.py

It exits 0 when every step ran; the sanitizer's exit code says whether memory errors were seen.
"""
from __future__ import annotations

import os
import sys
import tempfile

import numpy as np

import falcontune as ft
from falcontune import testing


def main() -> int:
    if not ft.cuda_available():
        print("no CUDA device: nothing to check")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        d = testing.make_checkpoint(tmp, preset="falcon-7b", bits=4, group_size=64, num_hidden_layers=1,
                                    vocab_size=1024, desc_act=True)
        # auto (the fused quantized GEMM at these 80 rows on most cards), then the scratch_t path
        for dtype, qgemm in (("bfloat16", "auto"), ("float16", "auto"), ("bfloat16", "scratch_t")):
            os.environ["FT_CUDA_QGEMM"] = qgemm  # read when the backend is created
            m = ft.load_model(d, device="cuda", dtype=dtype)
            m.add_lora(r=8, alpha=16, dropout=0.05,
                       target_modules=("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"))
            rng = np.random.default_rng(0)
            ids = rng.integers(0, 1024, size=(2, 40))
            mask = np.ones_like(ids)
            mask[0, :4] = 0
            mask[1, -3:] = 0
            labels = np.where(mask == 1, ids, -100)
            logits = m.forward(ids, mask)
            m.train()
            loss = m.forward_backward(ids, labels, mask, grad_scale=1.0 if dtype == "bfloat16" else 256.0)
            opt = ft.AdamW(m, lr=1e-4, max_grad_norm=1.0)
            opt.step(grad_scale=1.0 if dtype == "bfloat16" else 256.0)
            m.eval()
            e = m.engine
            e.cache_init(2, 48)
            e.forward_cached(ids[:, :40], mask)
            last = e.forward_cached(ids[:, :1], np.concatenate([mask, np.ones((2, 1), mask.dtype)], 1))
            e.cache_reorder(np.array([1, 0], np.int32))
            last = e.decode_step(ids[:, 1], np.array([1, 0]))           # one token per row, a padded one
            for t in range(2, 6):  # device argmax: run, captured as a graph, then replayed
                nxt = e.decode_step(ids[:, t], argmax=True)
                assert nxt.shape == (2,) and (0 <= nxt).all() and (nxt < 1024).all()
            e.cache_free()
            print(dtype, qgemm, "loss", loss, "logits finite", bool(np.isfinite(logits).all()),
                  "cached finite", bool(np.isfinite(last).all()), flush=True)
            m.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
