"""The engine's guards against silent corruption (issue 14, item 9), one test per guard.

CPU tests run everywhere; the ``cuda``-marked ones need a GPU (two for the multi-device test).
"""
from __future__ import annotations

import threading

import numpy as np
import pytest

import falcontune as ft
from falcontune import _C, testing

ALL = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")


def rel(a, b) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def with_lora(m, seed: int = 1, r: int = 4):
    m.add_lora(r=r, alpha=2 * r, dropout=0.0, target_modules=ALL)
    m.load_lora_state_dict(testing.random_lora(m.config, r, ALL, seed=seed))
    return m


# ---------------------------------------------------------------------------------------------
# recorded decode steps are keyed by a generation counter, not by the workspace's address


@pytest.mark.cuda
def test_recorded_decode_steps_dropped_when_the_workspace_is_recarved(tmp_path, monkeypatch):
    """Decode steps replay a CUDA graph; between them the workspace is freed and carved again with
    another layout (training layout -> inference layout, often at the same device address). The
    steps after it must not replay the old graph: greedy ids equal those of a model that never
    records graphs, and logits stay close to the CPU's."""
    d = testing.make_checkpoint(tmp_path / "m", preset="tiny-40b", bits=4, group_size=32)
    cpu = with_lora(ft.load_model(d, device="cpu"))
    gpu = with_lora(ft.load_model(d, device="cuda"))
    monkeypatch.setenv("FT_CUDA_GRAPHS", "0")  # read when the backend is created
    direct = with_lora(ft.load_model(d, device="cuda"))
    monkeypatch.delenv("FT_CUDA_GRAPHS")
    V = cpu.config.vocab_size
    rng = np.random.default_rng(7)
    B, P, T = 2, 8, 40
    ids = rng.integers(0, V, size=(B, T)).astype(np.int64)
    full = cpu.forward(ids)
    out = {}
    for name, m in (("graph", gpu), ("direct", direct)):
        m.forward_backward(ids[:, :12], ids[:, :12])  # a training workspace first
        e = m.engine
        e.cache_init(B, T)
        e.forward_cached(ids[:, :P])
        got = []
        for t in range(P, T):
            if t == 16:  # the workspace is freed; the next step carves an inference one
                m.set_gradient_checkpointing(1.0)
            if t == 24:  # and grows it: a forward of more rows than it holds
                m.forward(ids[:, :20])
            if t % 2:
                got.append(e.decode_step(ids[:, t], argmax=True))
            else:
                lg = e.decode_step(ids[:, t])
                assert rel(lg, full[:, t]) < 2e-2, (name, t, rel(lg, full[:, t]))
                got.append(lg)
        out[name] = got
        e.cache_free()
    for t, (a, b) in enumerate(zip(out["graph"], out["direct"])):
        np.testing.assert_array_equal(a, b, err_msg=f"step {P + t}")
