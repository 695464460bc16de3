"""Unquantized (HF-style) checkpoints are quantized on load in C."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import falcontune as ft
from falcontune import _C, testing
from falcontune.models import parse_config
from falcontune.weights import WeightStore, save_safetensors

LINEARS = ("self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")


def _dense_copy(gptq_dir, out_dir, bits, checkpoint_format="gptq"):
    """The same model as an unquantized checkpoint: linears as fp32 nn.Linear weights [out, in]."""
    out_dir.mkdir()
    cfg = json.loads((gptq_dir / "config.json").read_text())
    (out_dir / "config.json").write_text(json.dumps(cfg))
    store = WeightStore.open(gptq_dir)
    tensors = {}
    for name in store.names():
        base = name.rsplit(".", 1)[0]
        if any(base.endswith(l) for l in LINEARS):
            if name.endswith(".qweight"):
                W = testing.gptq_dequantize(store.tensor(name), store.tensor(base + ".qzeros"), store.tensor(base + ".scales"),
                                            store.tensor(base + ".g_idx"), bits, checkpoint_format)
                tensors[base + ".weight"] = np.ascontiguousarray(W.T.astype(np.float32))
            elif name.endswith(".bias"):
                tensors[name] = np.array(store.tensor(name))
        else:
            tensors[name] = np.array(store.tensor(name))
    save_safetensors(out_dir / "model.safetensors", tensors)
    return out_dir


@pytest.mark.parametrize("preset", ["tiny", "tiny-rw"])
def test_quantize_on_load_close_to_exact(tmp_path, preset):
    gdir = testing.make_checkpoint(tmp_path / "gptq", preset=preset, bits=4, group_size=32, seed=3, dense_dtype="float32")
    ddir = _dense_copy(gdir, tmp_path / "dense", bits=4)
    exact = ft.load_model(gdir, device="cpu")
    ids = np.random.default_rng(0).integers(0, exact.config.vocab_size, size=(2, 7))
    ref = exact.forward(ids).astype(np.float64)
    for bits, tol in ((8, 2e-2), (4, 2e-1)):
        q = ft.load_model(ddir, device="cpu", quantize_bits=bits, quantize_group_size=32)
        assert q.quantize_config.bits == bits
        got = q.forward(ids)
        rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
        assert rel < tol, (bits, rel)
    # LoRA trains on a quantized-on-load model too
    q.add_lora(r=2, target_modules=["dense"])
    assert np.isfinite(q.forward_backward(ids, ids))


def test_quantize_rtn_checks_arguments():
    w = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float16)
    with pytest.raises(ValueError, match="bits"):
        _C.quantize_rtn(w, 5, 32)
    with pytest.raises(ValueError, match="2-d"):
        _C.quantize_rtn(w[0], 4, 32)
    bad = w.astype(np.float32)
    bad[3, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        _C.quantize_rtn(bad, 4, 32)
    with pytest.raises(ValueError, match="32-bit words"):
        _C.quantize_rtn(np.ones((64, 33), np.float32), 4, 32)


def test_quantize_rtn_is_within_half_a_step():
    rng = np.random.default_rng(1)
    for bits in (2, 3, 4, 8):
        w = rng.standard_normal((96, 128)).astype(np.float16)
        qw, qz, sc, gi = _C.quantize_rtn(w, bits, 32)
        W = testing.gptq_dequantize(qw, qz, sc, gi, bits, checkpoint_format="gptq_v2")
        step = np.repeat(sc.astype(np.float64), 32, axis=0)
        assert np.all(np.abs(W - w.T.astype(np.float64)) <= 0.5 * step * (1 + 1e-6))
