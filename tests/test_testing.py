"""falcontune.testing: reference GPTQ packing/dequantization and random checkpoints."""
from __future__ import annotations

import json

import numpy as np
import pytest

from falcontune import gptq, models, testing
from falcontune.testing import (PRESETS, TestingError, gptq_dequantize, gptq_quantize, gptq_unpack,
                                make_checkpoint, preset_config, random_lora)
from falcontune.gptq import GPTQError
from falcontune.weights import SafetensorsFile, WeightStore, to_float32

# --------------------------------------------------------------------------------------------
# independent, straightforward bit-by-bit references (slow Python loops on small arrays)


def ref_pack(values: np.ndarray, bits: int) -> np.ndarray:
    """values [n, m] -> words [n*bits/32, m]: value k of a column occupies stream bits
    k*bits .. k*bits+bits-1; stream bit p lives in word p // 32 at bit p % 32."""
    n, m = values.shape
    words = [[0] * m for _ in range(n * bits // 32)]
    for k in range(n):
        for col in range(m):
            v = int(values[k, col])
            for b in range(bits):
                if (v >> b) & 1:
                    p = k * bits + b
                    words[p // 32][col] |= 1 << (p % 32)
    return np.array(words, dtype=np.uint32)


def ref_unpack(words: np.ndarray, bits: int) -> np.ndarray:
    w = words.astype(np.uint32)
    n = w.shape[0] * 32 // bits
    out = np.zeros((n, w.shape[1]), dtype=np.int64)
    for k in range(n):
        for col in range(w.shape[1]):
            v = 0
            for b in range(bits):
                p = k * bits + b
                v |= ((int(w[p // 32, col]) >> (p % 32)) & 1) << b
            out[k, col] = v
    return out


BITS = (2, 3, 4, 8)


@pytest.mark.parametrize("bits", BITS)
def test_pack_matches_bitwise_reference(bits):
    rng = np.random.default_rng(bits)
    vals = rng.integers(0, 2 ** bits, (64, 5), dtype=np.uint32)
    ref = ref_pack(vals, bits)
    got = gptq.pack_bits(vals.reshape(2, 32, 5), bits).reshape(64 * bits // 32, 5)
    np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("bits", BITS)
def test_unpack_matches_bitwise_reference(bits):
    rng = np.random.default_rng(10 + bits)
    in_f, out_f, groups = 64, 32, 2
    qweight = rng.integers(-2**31, 2**31, (in_f * bits // 32, out_f), dtype=np.int64).astype(np.int32)
    qzeros = rng.integers(-2**31, 2**31, (groups, out_f * bits // 32), dtype=np.int64).astype(np.int32)
    q, z = gptq_unpack(qweight, qzeros, bits, in_f, out_f)
    assert q.dtype == np.uint8 and q.shape == (in_f, out_f)
    assert z.dtype == np.uint8 and z.shape == (groups, out_f)
    np.testing.assert_array_equal(q, ref_unpack(qweight.view(np.uint32), bits))
    np.testing.assert_array_equal(z, ref_unpack(qzeros.view(np.uint32).T, bits).T)


def test_3bit_layout_straddles_words_like_autogptq():
    # 32 values in 3 words; value 10 = stream bits 30..32 (word0 bits 30,31 + word1 bit 0),
    # value 21 = stream bits 63..65 (word1 bit 31 + word2 bits 0,1)
    vals = np.zeros((32, 1), dtype=np.uint32)
    vals[10, 0] = 0b101
    words = gptq.pack_bits(vals.reshape(1, 32, 1), 3).reshape(3)
    assert list(words) == [1 << 30, 1, 0]
    vals[:] = 0
    vals[21, 0] = 0b011
    words = gptq.pack_bits(vals.reshape(1, 32, 1), 3).reshape(3)
    assert list(words) == [0, 1 << 31, 1]
    vals[:] = 0
    vals[0, 0], vals[11, 0], vals[22, 0], vals[31, 0] = 7, 7, 7, 7
    words = gptq.pack_bits(vals.reshape(1, 32, 1), 3).reshape(3)
    assert list(words) == [0b111, 0b111 << 1, (0b111 << 2) | (0b111 << 29)]


def test_4bit_lowest_bits_first_and_negative_int32():
    vals = np.arange(8, dtype=np.uint32)[:, None] * np.uint32(2) + np.uint32(1)  # 1,3,...,15
    vals = np.concatenate([vals, np.zeros((24, 1), np.uint32)])
    words = gptq.pack_bits(vals.reshape(1, 32, 1), 4).reshape(4)
    assert int(words[0]) == 0xFDB97531
    assert words.view(np.int32)[0] == np.int32(np.uint32(0xFDB97531).view(np.int32))  # two's complement


# --------------------------------------------------------------------------------------------
# quantize -> dequantize


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", [32, 64, -1])
@pytest.mark.parametrize("desc_act", [False, True])
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("sym", [False, True])
def test_round_trip_within_half_a_step(bits, group_size, desc_act, fmt, sym):
    rng = np.random.default_rng(bits * 100 + (group_size % 97))
    in_f, out_f = 128, 64
    w = (rng.standard_normal((in_f, out_f)) / np.sqrt(in_f)).astype(np.float32)
    d = gptq_quantize(w, bits, group_size, desc_act=desc_act, sym=sym, checkpoint_format=fmt,
                      rng=np.random.default_rng(5))
    groups = 1 if group_size == -1 else in_f // group_size
    assert d["qweight"].dtype == np.int32 and d["qweight"].shape == (in_f * bits // 32, out_f)
    assert d["qzeros"].dtype == np.int32 and d["qzeros"].shape == (groups, out_f * bits // 32)
    assert d["scales"].dtype == np.float16 and d["scales"].shape == (groups, out_f)
    assert d["g_idx"].dtype == np.int32 and d["g_idx"].shape == (in_f,)
    assert np.all(d["scales"] > 0)

    W = gptq_dequantize(d["qweight"], d["qzeros"], d["scales"], d["g_idx"], bits, fmt)
    assert W.dtype == np.float64 and W.shape == (in_f, out_f)
    step = d["scales"].astype(np.float64)[d["g_idx"]]
    assert np.all(np.abs(W - w) <= 0.5 * step * (1 + 1e-9))

    # the dequantizer agrees with the bit-by-bit reference and the documented formula
    q = ref_unpack(d["qweight"].view(np.uint32), bits)
    z = ref_unpack(d["qzeros"].view(np.uint32).T, bits).T + (1 if fmt == "gptq" else 0)
    W_ref = d["scales"].astype(np.float64)[d["g_idx"]] * (q - z[d["g_idx"]])
    np.testing.assert_array_equal(W, W_ref)

    stored = ref_unpack(d["qzeros"].view(np.uint32).T, bits).T
    maxq = 2 ** bits - 1
    if fmt == "gptq":
        assert stored.max() < maxq  # never the ambiguous v1 field value 2**bits - 1
    if sym:
        assert np.all(z == (maxq + 1) // 2)

    g = d["g_idx"]
    if group_size == -1:
        assert np.all(g == 0)
    else:
        assert np.all(np.bincount(g, minlength=groups) == group_size)
        if desc_act:
            assert np.any(np.diff(g) < 0)  # act-order: non-monotonic
        else:
            np.testing.assert_array_equal(g, np.arange(in_f) // group_size)


def test_quantization_uses_the_levels():
    w = np.random.default_rng(0).standard_normal((256, 32)).astype(np.float32)
    d = gptq_quantize(w, 4, 64)
    q, _ = gptq_unpack(d["qweight"], d["qzeros"], 4, 256, 32)
    assert q.min() == 0 or q.max() == 15
    assert len(np.unique(q)) >= 14


def test_v1_all_positive_group_still_exact():
    # zero point 0 cannot be stored in v1 (stored = zero - 1): the quantizer must avoid it
    rng = np.random.default_rng(3)
    w = np.abs(rng.standard_normal((64, 32))).astype(np.float32) + 0.1
    w[:, :8] = -w[:, :8]  # some all-negative columns too
    for bits in BITS:
        for fmt in ("gptq", "gptq_v2"):
            d = gptq_quantize(w, bits, 32, checkpoint_format=fmt)
            W = gptq_dequantize(d["qweight"], d["qzeros"], d["scales"], d["g_idx"], bits, fmt)
            step = d["scales"].astype(np.float64)[d["g_idx"]]
            assert np.all(np.abs(W - w) <= 0.5 * step * (1 + 1e-9)), (bits, fmt)
            _, z = gptq_unpack(d["qweight"], d["qzeros"], bits, 64, 32)
            if fmt == "gptq_v2":
                assert np.any(z[:, 8:] == 0)
            else:
                assert z.max() < 2 ** bits - 1


def test_v1_plus_one_does_not_wrap():
    bits, in_f, out_f = 4, 32, 32
    qweight = np.zeros((in_f * bits // 32, out_f), np.int32)  # q = 0
    qzeros = np.full((1, out_f * bits // 32), -1, np.int32)  # every stored field = 15
    scales = np.ones((1, out_f), np.float16)
    g_idx = np.zeros(in_f, np.int32)
    assert np.all(gptq_dequantize(qweight, qzeros, scales, g_idx, bits, "gptq") == -16.0)
    assert np.all(gptq_dequantize(qweight, qzeros, scales, g_idx, bits, "gptq_v2") == -15.0)


def test_zero_weights_and_uneven_last_group():
    w = np.zeros((64, 32), np.float32)
    d = gptq_quantize(w, 4, 32)
    assert np.all(gptq_dequantize(**d, bits=4) == 0)
    w = np.random.default_rng(1).standard_normal((96, 32)).astype(np.float32)
    d = gptq_quantize(w, 3, 64)  # AutoGPTQ's ceil: groups of 64 and 32
    assert d["scales"].shape == (2, 32)
    step = d["scales"].astype(np.float64)[d["g_idx"]]
    assert np.all(np.abs(gptq_dequantize(**d, bits=3) - w) <= 0.5 * step * (1 + 1e-9))


def test_desc_act_is_deterministic_for_a_seed():
    w = np.random.default_rng(1).standard_normal((128, 32)).astype(np.float32)
    a = gptq_quantize(w, 4, 32, desc_act=True, rng=np.random.default_rng(9))
    b = gptq_quantize(w, 4, 32, desc_act=True, rng=np.random.default_rng(9))
    c = gptq_quantize(w, 4, 32, desc_act=True, rng=np.random.default_rng(10))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["g_idx"], c["g_idx"])


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(w=np.zeros((64, 32), np.float32), bits=5, group_size=32), r"unsupported bits 5"),
    (dict(w=np.zeros((48, 32), np.float32), bits=4, group_size=16), r"multiples of 32"),
    (dict(w=np.zeros((64, 40), np.float32), bits=4, group_size=32), r"multiples of 32"),
    (dict(w=np.zeros((64, 32), np.float32), bits=4, group_size=0), r"group_size"),
    (dict(w=np.zeros((64, 32), np.int32), bits=4, group_size=32), r"float array"),
    (dict(w=np.full((64, 32), np.nan, np.float32), bits=4, group_size=32), r"NaN"),
    (dict(w=np.zeros((64, 32), np.float32), bits=4, group_size=32, checkpoint_format="awq"), r"checkpoint_format"),
])
def test_quantize_errors(kwargs, pattern):
    with pytest.raises(TestingError, match=pattern):
        gptq_quantize(**kwargs)


def test_dequantize_shape_errors():
    d = gptq_quantize(np.ones((64, 32), np.float32), 4, 32)
    with pytest.raises(GPTQError, match="scales shape"):
        gptq_dequantize(d["qweight"], d["qzeros"], d["scales"][:1], d["g_idx"], 4)
    with pytest.raises(GPTQError, match="g_idx values"):
        gptq_dequantize(d["qweight"], d["qzeros"], d["scales"], d["g_idx"] + 5, 4)
    with pytest.raises(GPTQError, match="qzeros shape"):
        gptq_unpack(d["qweight"], d["qzeros"][:, :2], 4, 64, 32)
    with pytest.raises(GPTQError, match="qweight shape"):
        gptq_unpack(d["qweight"], d["qzeros"], 3, 64, 32)
    with pytest.raises(GPTQError, match="int32"):
        gptq_unpack(d["qweight"].astype(np.int64), d["qzeros"], 4, 64, 32)


# --------------------------------------------------------------------------------------------
# presets


def test_presets_shapes():
    tiny = preset_config("tiny")
    assert tiny.num_kv_heads == 1 and tiny.qkv_layout == "multi_query"
    assert tiny.layer_norm_names == ("input_layernorm",) and tiny.rotary
    t40 = preset_config("tiny-40b")
    assert t40.qkv_layout == "grouped" and t40.num_kv_heads == 2 and t40.num_attention_heads == 8
    assert t40.layer_norm_names == ("ln_attn", "ln_mlp")
    rw = preset_config("tiny-rw")
    assert rw.qkv_layout == "interleaved" and rw.alibi and rw.bias and not rw.parallel_attn
    assert rw.layer_norm_names == ("input_layernorm", "post_attention_layernorm")
    small = preset_config("small")
    assert (small.vocab_size, small.hidden_size, small.num_attention_heads, small.num_hidden_layers) == (4096, 256, 8, 4)
    for name in PRESETS:
        c = preset_config(name)
        assert c.hidden_size % 32 == 0
        for fin, fout in c.linear_shapes.values():
            assert fin % 32 == 0 and fout % 32 == 0


def test_real_presets_match_known_models_without_writing_weights():
    c7 = preset_config("falcon-7b")
    assert c7 == models.get_known_model("falcon-7b").config
    assert c7.num_kv_heads == 1 and c7.linear_shapes["self_attention.query_key_value"] == (4544, 4672)
    assert all(fin % 64 == 0 for fin, _ in c7.linear_shapes.values())  # TheBloke's group 64
    c40 = preset_config("falcon-40b")
    assert c40 == models.get_known_model("falcon-40b").config
    assert c40.linear_shapes["self_attention.query_key_value"] == (8192, 9216)


def test_unknown_preset():
    with pytest.raises(TestingError, match=r"unknown preset 'huge'.*tiny.*falcon-40b"):
        preset_config("huge")
    with pytest.raises(TestingError, match=r"unknown preset"):
        make_checkpoint("/nonexistent-never-written", preset="huge")


# --------------------------------------------------------------------------------------------
# checkpoints


def _expected_names(cfg: models.FalconConfig, lm_head: bool = False) -> set[str]:
    names = {"transformer.word_embeddings.weight", "transformer.ln_f.weight", "transformer.ln_f.bias"}
    for i in range(cfg.num_hidden_layers):
        for ln in cfg.layer_norm_names:
            names |= {f"transformer.h.{i}.{ln}.weight", f"transformer.h.{i}.{ln}.bias"}
        for mod in cfg.linear_shapes:
            names |= {f"transformer.h.{i}.{mod}.{k}" for k in ("qweight", "qzeros", "scales", "g_idx")}
            if cfg.bias:
                names.add(f"transformer.h.{i}.{mod}.bias")
    if lm_head:
        names.add("lm_head.weight")
    return names


@pytest.mark.parametrize("preset", ["tiny", "tiny-40b", "tiny-rw"])
def test_make_checkpoint_names_and_files(tmp_path, preset):
    d = make_checkpoint(tmp_path / preset, preset=preset, bits=4, group_size=32)
    assert d == tmp_path / preset
    assert sorted(p.name for p in d.iterdir()) == [
        "config.json", "gptq_model-4bit-32g.safetensors", "quantize_config.json"]
    cfg = models.parse_config(json.loads((d / "config.json").read_text()), str(d / "config.json"))
    assert cfg == preset_config(preset)
    q = models.parse_quantize_config(json.loads((d / "quantize_config.json").read_text()))
    assert (q.bits, q.group_size, q.desc_act, q.checkpoint_format) == (4, 32, False, "gptq")
    assert q.model_file_base_name == "gptq_model-4bit-32g"
    qc = json.loads((d / "quantize_config.json").read_text())
    assert qc["true_sequential"] is True and qc["model_name_or_path"] is None and "checkpoint_format" not in qc
    with WeightStore.open(d) as s:
        assert set(s.names()) == _expected_names(cfg)
        h = cfg.hidden_size
        for i in range(cfg.num_hidden_layers):
            for mod, (fin, fout) in cfg.linear_shapes.items():
                pre = f"transformer.h.{i}.{mod}"
                assert s.shape(f"{pre}.qweight") == (fin * 4 // 32, fout)
                assert s.shape(f"{pre}.qzeros") == (fin // 32, fout * 4 // 32)
                assert s.shape(f"{pre}.scales") == (fin // 32, fout)
                assert s.dtype(f"{pre}.scales") == "F16" and s.dtype(f"{pre}.g_idx") == "I32"
                W = gptq_dequantize(s.tensor(f"{pre}.qweight"), s.tensor(f"{pre}.qzeros"),
                                    s.tensor(f"{pre}.scales"), s.tensor(f"{pre}.g_idx"), 4)
                assert 0.5 < W.std() * np.sqrt(fin) < 1.5  # ~N(0, 1/sqrt(in))
        ln = s.tensor(f"transformer.h.0.{cfg.layer_norm_names[0]}.weight").astype(np.float32)
        assert ln.shape == (h,) and not np.all(ln == 1) and abs(ln.mean() - 1) < 0.1
        assert np.all(s.tensor("transformer.ln_f.bias") != 0)
        emb = s.tensor("transformer.word_embeddings.weight")
        assert emb.shape == (cfg.vocab_size, h) and s.dtype("transformer.word_embeddings.weight") == "F16"
        if cfg.bias:
            b = s.tensor("transformer.h.1.self_attention.query_key_value.bias")
            assert b.shape == (cfg.qkv_out,) and np.any(b != 0)


def test_make_checkpoint_is_deterministic(tmp_path):
    kw = dict(preset="tiny-40b", bits=3, group_size=32, desc_act=True, seed=7)
    a = make_checkpoint(tmp_path / "a", **kw)
    b = make_checkpoint(tmp_path / "b", **kw)
    c = make_checkpoint(tmp_path / "c", **{**kw, "seed": 8})
    for f in sorted(p.name for p in a.iterdir()):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    wf = "gptq_model-3bit-32g.safetensors"
    assert (a / wf).read_bytes() != (c / wf).read_bytes()
    with WeightStore.open(a) as s:
        g = s.tensor("transformer.h.0.mlp.dense_4h_to_h.g_idx")
        assert np.any(np.diff(g) < 0)


@pytest.mark.parametrize("dense, st", [("float16", "F16"), ("bfloat16", "BF16"), ("float32", "F32")])
def test_make_checkpoint_dense_dtypes(tmp_path, dense, st):
    d = make_checkpoint(tmp_path, dense_dtype=dense, group_size=-1, seed=1)
    with WeightStore.open(d / "gptq_model-4bit--1g.safetensors") as s:
        name = "transformer.word_embeddings.weight"
        assert s.dtype(name) == st
        assert s.dtype("transformer.h.0.self_attention.dense.scales") == "F16"
        emb = to_float32(s.tensor(name), st)
        assert 0.3 < emb.std() < 0.7  # ~N(0, 0.5) for hidden 64
        assert s.shape("transformer.h.0.self_attention.dense.scales") == (1, 64)


def test_make_checkpoint_options(tmp_path):
    tok = tmp_path / "tok.json"
    tok.write_text('{"model": {}}')
    d = make_checkpoint(tmp_path / "m", preset="tiny", bits=8, group_size=64, lm_head=True, bias=True,
                        checkpoint_format="gptq_v2", weights_name="model.safetensors", tokenizer=tok,
                        num_hidden_layers=1, rope_theta=500.0)
    cfg_d = json.loads((d / "config.json").read_text())
    assert cfg_d["tie_word_embeddings"] is False and cfg_d["bias"] is True
    assert cfg_d["num_hidden_layers"] == 1 and cfg_d["rope_theta"] == 500.0
    qc = json.loads((d / "quantize_config.json").read_text())
    assert qc["checkpoint_format"] == "gptq_v2" and qc["model_file_base_name"] == "model"
    assert models.parse_quantize_config(qc).zero_offset == 0
    assert (d / "tokenizer.json").read_text() == '{"model": {}}'
    with WeightStore.open(d / "model.safetensors") as s:
        assert s.shape("lm_head.weight") == (256, 64)
        assert s.has("transformer.h.0.mlp.dense_4h_to_h.bias")
        assert not s.has("transformer.h.1.mlp.dense_4h_to_h.qweight")
        assert not np.array_equal(s.tensor("lm_head.weight"), s.tensor("transformer.word_embeddings.weight"))
    rw = make_checkpoint(tmp_path / "rw", preset="tiny-rw", bias=False)
    with WeightStore.open(rw) as s:
        assert not any(n.endswith("dense.bias") for n in s.names())


def test_make_checkpoint_copies_the_real_tokenizer(tmp_path, shared_data):
    tok = shared_data / "falcon" / "tokenizer.json"
    d = make_checkpoint(tmp_path, preset="tiny", tokenizer=tok)
    assert (d / "tokenizer.json").read_bytes() == tok.read_bytes()


def test_make_checkpoint_errors(tmp_path):
    with pytest.raises(TestingError, match=r"group_size 128 must divide in_features 64"):
        make_checkpoint(tmp_path, preset="tiny", group_size=128)
    with pytest.raises(TestingError, match="dense_dtype"):
        make_checkpoint(tmp_path, dense_dtype="int8")
    with pytest.raises(FileNotFoundError, match="no-tokenizer.json"):
        make_checkpoint(tmp_path, tokenizer=tmp_path / "no-tokenizer.json")
    with pytest.raises(models.ConfigError, match="hidden_size"):
        make_checkpoint(tmp_path, hidden_size=66)
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_readable_by_official_safetensors(tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    d = make_checkpoint(tmp_path, preset="tiny-rw", group_size=32)
    loaded = st.load_file(str(d / "gptq_model-4bit-32g.safetensors"))
    with WeightStore.open(d) as s:
        assert set(loaded) == set(s.names())
        for k in s.names():
            np.testing.assert_array_equal(loaded[k], s.tensor(k))


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["tiny", "tiny-40b", "tiny-rw"])
def test_names_match_transformers_falcon(tmp_path, preset):
    tf = pytest.importorskip("transformers")
    pytest.importorskip("torch")
    d = make_checkpoint(tmp_path, preset=preset, lm_head=True, group_size=32)
    model = tf.FalconForCausalLM(tf.FalconConfig(**json.loads((d / "config.json").read_text())))
    hf = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    with SafetensorsFile(d / "gptq_model-4bit-32g.safetensors") as f:
        ours = {}
        for n in f.names():
            if n.endswith((".qzeros", ".scales", ".g_idx")):
                continue
            if n.endswith(".qweight"):
                fin = f.shape(n)[0] * 32 // 4
                ours[n[: -len("qweight")] + "weight"] = (f.shape(n)[1], fin)  # torch Linear [out, in]
            else:
                ours[n] = f.shape(n)
    assert ours == hf


# --------------------------------------------------------------------------------------------
# LoRA


def test_random_lora_keys_shapes_and_determinism():
    cfg = preset_config("tiny-40b")
    lora = random_lora(cfg, 4, ["query_key_value", "dense_h_to_4h"], seed=3)
    assert len(lora) == cfg.num_hidden_layers * 2 * 2
    k = "base_model.model.transformer.h.1.self_attention.query_key_value"
    assert lora[f"{k}.lora_A.weight"].shape == (4, 128)
    assert lora[f"{k}.lora_B.weight"].shape == (cfg.qkv_out, 4)
    m = "base_model.model.transformer.h.0.mlp.dense_h_to_4h"
    assert lora[f"{m}.lora_A.weight"].shape == (4, 128)
    assert lora[f"{m}.lora_B.weight"].shape == (512, 4)
    for v in lora.values():
        assert v.dtype == np.float32 and np.all(v != 0)
    a = lora[f"{k}.lora_A.weight"]
    assert 0.5 < a.std() * np.sqrt(128) < 1.5
    again = random_lora(cfg, 4, ["query_key_value", "dense_h_to_4h"], seed=3)
    assert all(np.array_equal(lora[x], again[x]) for x in lora)
    other = random_lora(cfg, 4, ["query_key_value", "dense_h_to_4h"], seed=4)
    assert not np.array_equal(lora[f"{k}.lora_A.weight"], other[f"{k}.lora_A.weight"])
    only = random_lora("tiny", 2, "dense", seed=0)
    assert set(only) == {f"base_model.model.transformer.h.{i}.self_attention.dense.lora_{ab}.weight"
                         for i in range(2) for ab in "AB"}
    mlp = random_lora("tiny", 2, "dense_4h_to_h")
    assert mlp["base_model.model.transformer.h.0.mlp.dense_4h_to_h.lora_A.weight"].shape == (2, 256)


def test_random_lora_errors():
    with pytest.raises(TestingError, match=r"unknown target modules \['q_proj'\]"):
        random_lora("tiny", 4, ["q_proj"])
    with pytest.raises(TestingError, match="positive integer"):
        random_lora("tiny", 0)
