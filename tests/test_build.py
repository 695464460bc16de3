"""The portable build (issue 14, item 10): the CPU kernels' instruction-set copies.

setup.py compiles for the compiler's baseline ISA; csrc/cpu/isa_*.c compile the kernels again
for AVX2 and AVX-512 and the CPU backend picks the widest the machine runs (FT_CPU_ISA forces
one). These tests check that every copy computes the same bits and that AVX code lives only in
the copies, so the module runs on any x86-64 CPU.
"""
from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest

import falcontune as ft
from falcontune import _C, testing

ISAS = ("baseline", "avx2", "avx512")
ALL = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")


def _run(d, isa, monkeypatch):
    """Forward, loss + gradients (dropout on), one AdamW step, greedy generation under one ISA."""
    monkeypatch.setenv("FT_CPU_ISA", isa)  # read when the backend is created
    try:
        m = ft.load_model(d, device="cpu")
    except NotImplementedError as exc:  # this CPU lacks it
        return str(exc)
    finally:
        monkeypatch.delenv("FT_CPU_ISA")
    m.add_lora(r=4, alpha=8, dropout=0.1, target_modules=ALL)
    m.load_lora_state_dict(testing.random_lora(m.config, 4, ALL, seed=3))
    m.train()
    m.engine.set_rng(99, 0)
    rng = np.random.default_rng(1)
    ids = rng.integers(0, m.config.vocab_size, size=(3, 33))
    mask = np.ones_like(ids)
    mask[0, :4] = 0
    logits = m.forward(ids, mask)
    loss = m.forward_backward(ids, np.where(mask == 1, ids, -100), mask)
    grads = m.lora_grad_dict()
    ft.AdamW(m, lr=1e-2, weight_decay=0.01).step()
    return logits, loss, grads, m.lora_state_dict(), m.generate_ids(ids[1:], max_new_tokens=6)


@pytest.mark.parametrize("preset,bits,desc_act", [("tiny", 4, False), ("tiny-40b", 3, True), ("tiny-rw", 8, True)])
def test_every_kernel_copy_computes_the_same_bits(tmp_path, monkeypatch, preset, bits, desc_act):
    d = testing.make_checkpoint(tmp_path / "m", preset=preset, bits=bits, group_size=32, desc_act=desc_act)
    runs = {isa: _run(d, isa, monkeypatch) for isa in ISAS}
    base = runs["baseline"]
    assert not isinstance(base, str), base
    compared = 0
    for isa in ISAS[1:]:
        got = runs[isa]
        if isinstance(got, str):
            assert "does not have it" in got or "only its own kernels" in got, got
            continue
        compared += 1
        np.testing.assert_array_equal(got[0], base[0], err_msg=f"{isa} logits")
        assert got[1] == base[1], (isa, got[1], base[1])
        for k in base[2]:
            np.testing.assert_array_equal(got[2][k], base[2][k], err_msg=f"{isa} gradient {k}")
            np.testing.assert_array_equal(got[3][k], base[3][k], err_msg=f"{isa} parameter {k}")
        np.testing.assert_array_equal(got[4], base[4], err_msg=f"{isa} generated ids")
    if not compared:
        pytest.skip("no instruction-set copy runs on this machine (or the build has none)")


def test_unknown_isa_is_refused(tmp_path, monkeypatch):
    d = testing.make_checkpoint(tmp_path / "m", preset="tiny", bits=4, group_size=32)
    monkeypatch.setenv("FT_CPU_ISA", "sse9")
    with pytest.raises(ValueError, match="FT_CPU_ISA must be 'baseline', 'avx2' or 'avx512', got 'sse9'"):
        ft.load_model(d, device="cpu")


def _functions_with_avx(so: str) -> tuple[set[str], dict[str, set[str]]]:
    """(functions of the ISA copies, {other function: its AVX mnemonics}) of a shared object."""
    dis = subprocess.run(["objdump", "-d", "--no-show-raw-insn", so], capture_output=True, text=True,
                         check=True).stdout
    copies: set[str] = set()
    avx: dict[str, set[str]] = {}
    fn = None
    for line in dis.splitlines():
        head = re.match(r"^[0-9a-f]+ <(.+)>:$", line)
        if head:
            fn = head.group(1)
            continue
        cols = line.split("\t")
        if fn is None or len(cols) < 2 or not cols[1].split():
            continue
        if re.search(r"_(avx2|avx512)(\.|$)", fn):  # omp outlines and GCC clones keep the suffix
            copies.add(fn)
            continue
        mnemonic = cols[1].split()[0]
        # VEX / EVEX encodings (AVX and later) all start with "v"; ymm / zmm registers need AVX too
        if mnemonic.startswith("v") or "%ymm" in line or "%zmm" in line:
            avx.setdefault(fn, set()).add(mnemonic)
    return copies, avx


@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs objdump (binutils)")
def test_avx_code_only_in_the_dispatched_copies():
    copies, avx = _functions_with_avx(_C.__file__)
    if not copies:
        pytest.skip("this build carries no kernel copies (FALCONTUNE_NATIVE=1, or not GCC on x86-64)")
    assert any(f.startswith("cpu_gemm_nn_avx2") for f in copies) and any("_avx512" in f for f in copies)
    assert not avx, f"AVX instructions outside the dispatched kernel copies: {sorted(avx)[:20]}"
