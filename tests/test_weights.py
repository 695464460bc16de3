"""falcontune.weights: safetensors reading/writing, sharded stores, dtype conversion."""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest

from falcontune import weights
from falcontune.weights import (SafetensorsError, SafetensorsFile, TensorNotFoundError, WeightStore,
                                float32_to_bf16_bits, save_safetensors, to_float32)


def _sample() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "a.f16": rng.standard_normal((3, 5)).astype(np.float16),
        "b.f32": rng.standard_normal((7,)).astype(np.float32),
        "c.f64": rng.standard_normal((2, 2, 2)),
        "d.i8": rng.integers(-128, 127, (9,), dtype=np.int8),
        "e.i16": rng.integers(-999, 999, (4,), dtype=np.int16),
        "f.i32": rng.integers(-2**31, 2**31 - 1, (6, 2), dtype=np.int32),
        "g.i64": rng.integers(-2**60, 2**60, (3,), dtype=np.int64),
        "h.u8": rng.integers(0, 255, (5,), dtype=np.uint8),
        "i.bool": rng.integers(0, 2, (4,)).astype(bool),
        "j.bf16": rng.integers(0, 2**16, (3, 3), dtype=np.uint16),
        "k.empty": np.zeros((0, 4), dtype=np.float32),
        "l.scalar": np.array(3.5, dtype=np.float32),
    }


def _raw(path: Path, header: dict, data: bytes = b"", pad: bool = True) -> Path:
    h = json.dumps(header).encode()
    if pad:
        h += b" " * (-len(h) % 8)
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)
    return path


# --------------------------------------------------------------------------------------------
# round trip


def test_round_trip_all_dtypes(tmp_path):
    t = _sample()
    p = save_safetensors(tmp_path / "m.safetensors", t, metadata={"format": "pt", "x": "y"},
                         dtypes={"j.bf16": "BF16"})
    with SafetensorsFile(p) as f:
        assert f.names() == sorted(t)
        assert f.metadata == {"format": "pt", "x": "y"}
        expect = {"a.f16": "F16", "b.f32": "F32", "c.f64": "F64", "d.i8": "I8", "e.i16": "I16",
                  "f.i32": "I32", "g.i64": "I64", "h.u8": "U8", "i.bool": "BOOL", "j.bf16": "BF16",
                  "k.empty": "F32", "l.scalar": "F32"}
        for name, arr in t.items():
            assert f.dtype(name) == expect[name]
            assert f.shape(name) == arr.shape
            got = f.tensor(name)
            assert got.shape == arr.shape
            assert got.dtype == arr.dtype
            np.testing.assert_array_equal(got, arr)
            assert not got.flags.writeable
            assert got.ctypes.data % got.dtype.itemsize == 0  # aligned views


def test_layout_header_padded_sorted_and_no_holes(tmp_path):
    p = save_safetensors(tmp_path / "m.safetensors", _sample(), dtypes={"j.bf16": "BF16"})
    raw = p.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    assert (8 + n) % 8 == 0
    header = json.loads(raw[8:8 + n])
    names = [k for k in header if k != "__metadata__"]
    assert names == sorted(names)
    spans = sorted(tuple(v["data_offsets"]) for v in header.values() if "data_offsets" in v)
    pos = 0
    for b, e in spans:
        assert b == pos
        pos = e
    assert 8 + n + pos == len(raw)
    for v in header.values():
        if "data_offsets" in v:
            assert v["data_offsets"][0] % weights.ST_DTYPES[v["dtype"]].itemsize == 0


def test_zero_copy_views_keep_mapping_alive_after_close(tmp_path):
    p = save_safetensors(tmp_path / "m.safetensors", {"w": np.arange(1000, dtype=np.float32)})
    f = SafetensorsFile(p)
    a = f.tensor("w")
    b = f.tensor("w")
    assert np.shares_memory(a, b)  # both views of the one mapping: no copy
    f.close()
    assert f.closed
    assert float(a[999]) == 999.0  # still readable
    with pytest.raises(SafetensorsError, match="closed"):
        f.tensor("w")
    assert f.names() == ["w"]  # the header stays available


def test_non_contiguous_and_big_endian_inputs(tmp_path):
    a = np.arange(12, dtype=np.float32).reshape(3, 4).T
    b = np.arange(5, dtype=">i4")
    p = save_safetensors(tmp_path / "m.safetensors", {"a": a, "b": b})
    with SafetensorsFile(p) as f:
        np.testing.assert_array_equal(f.tensor("a"), a)
        np.testing.assert_array_equal(f.tensor("b"), b)


def test_official_safetensors_reads_our_file_and_we_read_theirs(tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    t = {k: v for k, v in _sample().items() if k != "j.bf16"}
    ours = save_safetensors(tmp_path / "ours.safetensors", t, metadata={"format": "np"})
    loaded = st.load_file(str(ours))
    assert set(loaded) == set(t)
    for k, v in t.items():
        np.testing.assert_array_equal(loaded[k], v)
    theirs = tmp_path / "theirs.safetensors"
    st.save_file(t, str(theirs), metadata={"k": "v"})
    with SafetensorsFile(theirs) as f:
        assert f.metadata == {"k": "v"}
        for k, v in t.items():
            np.testing.assert_array_equal(f.tensor(k), v)


def test_official_safetensors_reads_our_bf16(tmp_path):
    st = pytest.importorskip("safetensors")
    bits = float32_to_bf16_bits(np.array([1.0, -2.5, 3.140625], dtype=np.float32))
    p = save_safetensors(tmp_path / "b.safetensors", {"x": bits}, dtypes={"x": "BF16"})
    with st.safe_open(str(p), framework="numpy") as f:  # numpy has no bf16: check the header only
        assert list(f.keys()) == ["x"]
    raw = p.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    assert json.loads(raw[8:8 + n])["x"]["dtype"] == "BF16"


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path, monkeypatch):
    p = tmp_path / "m.safetensors"
    save_safetensors(p, {"w": np.ones(3, np.float32)})
    before = p.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(weights.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        save_safetensors(p, {"w": np.zeros(3, np.float32)})
    monkeypatch.undo()
    assert p.read_bytes() == before
    assert sorted(x.name for x in tmp_path.iterdir()) == ["m.safetensors"]


@pytest.mark.parametrize("tensors, kw, pattern", [
    ({"w": np.ones(2, np.float32)}, {"dtypes": {"w": "BF16"}}, r"'w'.*BF16.*uint16"),
    ({"w": np.ones(2, np.float32)}, {"dtypes": {"w": "F16"}}, r"'w' is float32 but dtypes asks for 'F16'"),
    ({"w": np.ones(2, np.float32)}, {"dtypes": {"v": "F32"}}, r"unknown tensors \['v'\]"),
    ({"w": np.array(["a"])}, {}, r"'w' has unsupported dtype"),
    ({"w": np.ones(2, np.complex64)}, {}, r"'w' has unsupported dtype"),
    ({"__metadata__": np.ones(2)}, {}, r"invalid tensor name"),
    ({"w": np.ones(2)}, {"metadata": {"a": 1}}, r"metadata must map strings to strings"),
])
def test_save_errors(tmp_path, tensors, kw, pattern):
    p = tmp_path / "bad.safetensors"
    with pytest.raises(SafetensorsError, match=pattern) as e:
        save_safetensors(p, tensors, **kw)
    assert str(p) in str(e.value)
    assert not p.exists() and list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------
# malformed files: every error names the file (and the tensor)


def _entry(dtype="F32", shape=(2,), offs=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offs)}


@pytest.mark.parametrize("make, pattern", [
    (lambda p: p.write_bytes(b""), r"0 bytes, too short"),
    (lambda p: p.write_bytes(b"\x01\x02\x03\x04\x05\x06\x07"), r"7 bytes, too short"),
    (lambda p: p.write_bytes(struct.pack("<Q", 1000) + b"{}"), r"header length 1000 is larger"),
    (lambda p: p.write_bytes(struct.pack("<Q", 2**62) + b"{}" * 10), r"header length \d+ is larger"),
    (lambda p: p.write_bytes(struct.pack("<Q", 8) + b"not json"), r"not valid UTF-8 JSON"),
    (lambda p: p.write_bytes(struct.pack("<Q", 2) + b"\xff\xfe"), r"not valid UTF-8 JSON"),
    (lambda p: _raw(p, [1, 2]), r"header must be a JSON object"),  # type: ignore[arg-type]
    (lambda p: _raw(p, {"w": _entry(dtype="F8_E4M3", offs=(0, 2))}, b"\0" * 8), r"tensor 'w': unknown dtype 'F8_E4M3'"),
    (lambda p: _raw(p, {"w": _entry(offs=(0, 8))}, b"\0" * 4), r"tensor 'w': data_offsets \[0, 8\] run past the end"),
    (lambda p: _raw(p, {"w": _entry(offs=(0, 12))}, b"\0" * 12), r"tensor 'w': data_offsets \[0, 12\] span 12 bytes but shape \[2\] x F32 needs 8"),
    (lambda p: _raw(p, {"w": _entry(offs=(8, 0))}, b"\0" * 8), r"tensor 'w': bad data_offsets"),
    (lambda p: _raw(p, {"w": _entry(offs=(-8, 0))}, b"\0" * 8), r"tensor 'w': bad data_offsets"),
    (lambda p: _raw(p, {"w": _entry(shape=(-2,))}, b"\0" * 8), r"tensor 'w': shape must be"),
    (lambda p: _raw(p, {"w": {"dtype": "F32", "shape": [2]}}, b"\0" * 8), r"tensor 'w': data_offsets must be"),
    (lambda p: _raw(p, {"w": "x"}, b"\0" * 8), r"tensor 'w': entry must be an object"),
    (lambda p: _raw(p, {"a": _entry(offs=(0, 8)), "b": _entry(offs=(4, 12))}, b"\0" * 12), r"tensors 'a' and 'b' overlap"),
    (lambda p: _raw(p, {"__metadata__": {"a": 1}}), r"__metadata__"),
])
def test_malformed_files_raise_with_file_name(tmp_path, make, pattern):
    p = tmp_path / "broken.safetensors"
    make(p)
    with pytest.raises(SafetensorsError, match=pattern) as e:
        SafetensorsFile(p)
    assert str(p) in str(e.value)
    assert isinstance(e.value, ValueError)


def test_header_limit(tmp_path, monkeypatch):
    p = _raw(tmp_path / "big.safetensors", {"w": _entry()}, b"\0" * 8)
    monkeypatch.setattr(weights, "MAX_HEADER_BYTES", 16)
    with pytest.raises(SafetensorsError, match=r"byte limit") as e:
        SafetensorsFile(p)
    assert str(p) in str(e.value)


def test_truncated_real_file(tmp_path):
    p = save_safetensors(tmp_path / "m.safetensors", {"w": np.ones(100, np.float32)})
    data = p.read_bytes()
    p.write_bytes(data[:-10])
    with pytest.raises(SafetensorsError, match=r"m\.safetensors: tensor 'w'.*run past the end"):
        SafetensorsFile(p)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        SafetensorsFile(tmp_path / "nope.safetensors")
    with pytest.raises(SafetensorsError, match="is a directory"):
        SafetensorsFile(tmp_path)


def test_unknown_tensor_name(tmp_path):
    p = save_safetensors(tmp_path / "m.safetensors", {"w": np.ones(2, np.float32)})
    with SafetensorsFile(p) as f:
        with pytest.raises(TensorNotFoundError) as e:
            f.tensor("v")
        assert str(p) in str(e.value) and "'v'" in str(e.value)
        assert isinstance(e.value, KeyError) and isinstance(e.value, ValueError)
        assert not str(e.value).startswith('"')  # not KeyError's quoting


# --------------------------------------------------------------------------------------------
# WeightStore


def test_store_single_file_and_model_prefix(tmp_path):
    t = {"model.transformer.h.0.self_attention.query_key_value.qweight": np.ones((2, 3), np.int32),
         "model.transformer.word_embeddings.weight": np.ones((4, 2), np.float16),
         "lm_head.weight": np.ones((4, 2), np.float16)}
    p = save_safetensors(tmp_path / "gptq.safetensors", t)
    with WeightStore.open(p) as s:
        assert s.names() == ["lm_head.weight", "transformer.h.0.self_attention.query_key_value.qweight",
                             "transformer.word_embeddings.weight"]
        assert s.has("transformer.word_embeddings.weight") and "lm_head.weight" in s
        assert s.dtype("transformer.h.0.self_attention.query_key_value.qweight") == "I32"
        assert s.shape("transformer.word_embeddings.weight") == (4, 2)
        assert s.tensor("lm_head.weight").dtype == np.float16
        assert s.files == [p]
        with pytest.raises(TensorNotFoundError, match=r"gptq\.safetensors: no tensor named 'x'"):
            s.tensor("x")


def test_store_prefix_collision_is_an_error(tmp_path):
    p = save_safetensors(tmp_path / "m.safetensors", {"model.a": np.ones(1), "a": np.ones(1)})
    with pytest.raises(SafetensorsError, match=r"tensor 'a' is stored twice"):
        WeightStore.open(p)


def _two_shards(d: Path) -> dict[str, np.ndarray]:
    a = {"transformer.h.0.x": np.arange(4, dtype=np.float32), "transformer.ln_f.weight": np.ones(2, np.float16)}
    b = {"transformer.h.1.x": np.arange(6, dtype=np.int32).reshape(2, 3), "lm_head.weight": np.zeros((2, 2))}
    save_safetensors(d / "model-00001-of-00002.safetensors", a)
    save_safetensors(d / "model-00002-of-00002.safetensors", b)
    wmap = {**{k: "model-00001-of-00002.safetensors" for k in a},
            **{k: "model-00002-of-00002.safetensors" for k in b}}
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 1}, "weight_map": wmap}))
    return {**a, **b}


def test_sharded_index_file_and_directory(tmp_path):
    t = _two_shards(tmp_path)
    for src in (tmp_path / "model.safetensors.index.json", tmp_path):
        with WeightStore.open(src) as s:
            assert s.names() == sorted(t)
            assert len(s.files) == 2
            for k, v in t.items():
                np.testing.assert_array_equal(s.tensor(k), v)
            assert s.file_of("lm_head.weight").name == "model-00002-of-00002.safetensors"
            assert s.dtype("transformer.h.1.x") == "I32" and s.shape("transformer.h.1.x") == (2, 3)


def test_sharded_index_errors(tmp_path):
    _two_shards(tmp_path)
    idx = tmp_path / "model.safetensors.index.json"
    doc = json.loads(idx.read_text())
    doc["weight_map"]["lm_head.weight"] = "model-00001-of-00002.safetensors"
    idx.write_text(json.dumps(doc))
    with pytest.raises(SafetensorsError, match=r"index\.json: weight_map puts tensor 'lm_head\.weight' in 'model-00001"):
        WeightStore.open(idx)
    doc["weight_map"]["lm_head.weight"] = "model-00003-of-00002.safetensors"
    idx.write_text(json.dumps(doc))
    with pytest.raises(FileNotFoundError, match=r"index\.json: shard 'model-00003-of-00002\.safetensors'"):
        WeightStore.open(idx)
    idx.write_text("{not json")
    with pytest.raises(SafetensorsError, match=r"index\.json: not a valid JSON index"):
        WeightStore.open(idx)
    idx.write_text(json.dumps({"weight_map": {}}))
    with pytest.raises(SafetensorsError, match=r"index\.json: expected a non-empty 'weight_map'"):
        WeightStore.open(idx)


def test_directory_without_index_uses_all_files(tmp_path):
    save_safetensors(tmp_path / "a.safetensors", {"x": np.ones(1)})
    save_safetensors(tmp_path / "b.safetensors", {"y": np.ones(1)})
    (tmp_path / "notes.txt").write_text("hi")
    with WeightStore.open(tmp_path) as s:
        assert s.names() == ["x", "y"]
    save_safetensors(tmp_path / "c.safetensors", {"x": np.ones(1)})
    with pytest.raises(SafetensorsError, match=r"tensor 'x' is stored twice"):
        WeightStore.open(tmp_path)


def test_empty_directory_and_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        WeightStore.open(tmp_path)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        WeightStore.open(tmp_path / "missing.safetensors")


# --------------------------------------------------------------------------------------------
# dtype conversion


def _bf16_value(bits: int) -> float:
    """Exact float64 value of a finite bf16 pattern; 0x7F80 (the overflow step) counts as 2**128."""
    sign = -1.0 if bits & 0x8000 else 1.0
    e, m = (bits >> 7) & 0xFF, bits & 0x7F
    if e == 0:
        return sign * m / 128.0 * 2.0 ** -126
    return sign * (1.0 + m / 128.0) * 2.0 ** (e - 127)


def _bf16_reference(x: np.ndarray) -> np.ndarray:
    """Independent float32 -> bf16 round-to-nearest-even: pick the nearer of the two bf16
    neighbours (truncation and truncation + 1 ulp) with float64 arithmetic; ties go to even."""
    out = []
    for v in x.ravel().tolist():  # small arrays only
        if v in (np.inf, -np.inf):
            out.append(0x7F80 if v > 0 else 0xFF80)
            continue
        lo = int(np.array(v, np.float32).view(np.uint32)) >> 16
        hi = lo + 1
        d_lo, d_hi = abs(v - _bf16_value(lo)), abs(_bf16_value(hi) - v)
        out.append(lo if d_lo < d_hi or (d_lo == d_hi and lo % 2 == 0) else hi)
    return np.array(out, dtype=np.uint16).reshape(x.shape)


def test_bf16_round_trip_exact():
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2**16, 20000, dtype=np.uint16)
    bits = bits[(bits & 0x7F80) != 0x7F80]  # drop inf/NaN patterns
    f = to_float32(bits, "BF16")
    assert f.dtype == np.float32
    np.testing.assert_array_equal(float32_to_bf16_bits(f), bits)
    np.testing.assert_array_equal(f.view(np.uint32) & 0xFFFF, 0)
    np.testing.assert_array_equal(f.view(np.uint32) >> 16, bits)


def test_bf16_rounding_nearest_even():
    one = 1.0
    cases = np.array([one, one + 2**-8, one + 3 * 2**-8, one + 2**-8 + 2**-20, -(one + 2**-8),
                      3.4e38, -3.4e38, 1e-40, -0.0, np.inf, -np.inf, 65504.0, 1.0 / 3.0], dtype=np.float32)
    got = float32_to_bf16_bits(cases)
    np.testing.assert_array_equal(got, _bf16_reference(cases))
    assert got[1] == 0x3F80  # tie -> even (1.0)
    assert got[2] == 0x3F82  # tie -> even (up)
    assert got[3] == 0x3F81  # above the tie -> up
    assert got[8] == 0x8000  # -0 keeps its sign
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(3000) * 10.0 ** rng.integers(-30, 30, 3000)).astype(np.float32)
    np.testing.assert_array_equal(float32_to_bf16_bits(x), _bf16_reference(x))


def test_bf16_nan_stays_nan():
    x = np.array([np.nan, -np.nan, np.float32(np.uint32(0x7F800001).view(np.float32))], dtype=np.float32)
    f = to_float32(float32_to_bf16_bits(x), "BF16")
    assert np.isnan(f).all()


def test_to_float32():
    x = np.array([1.5, -2.25, 65504.0], dtype=np.float16)
    np.testing.assert_array_equal(to_float32(x, "F16"), x.astype(np.float32))
    y = np.array([1.0, 2.0], dtype=np.float32)
    assert to_float32(y, "F32") is y
    z = np.array([1e-3, 2.5], dtype=np.float64)
    assert to_float32(z, "F64").dtype == np.float32
    with pytest.raises(SafetensorsError, match="I32"):
        to_float32(np.ones(2, np.int32), "I32")
    with pytest.raises(SafetensorsError, match="does not match F16"):
        to_float32(y, "F16")
    with pytest.raises(SafetensorsError, match="16-bit"):
        to_float32(y, "BF16")
