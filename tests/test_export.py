"""`falcontune export --format=gguf`: read back with gguf.GGUFReader (the reader llama.cpp ships) and
checked against the merged weights computed here (W + scale * B @ A, the qkv reorder written out
head by head) and against llama.cpp's Falcon conventions."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import falcontune as ft
from falcontune import cli, testing
from falcontune.export import FALCON_PRE_TOKENIZER, export
from falcontune.tokenizer import train_demo_tokenizer
from falcontune.weights import WeightStore

from test_merge import TARGETS, adapter, assert_fp16_of, dense_copy, reference

gguf = pytest.importorskip("gguf")  # a test dependency (pyproject [test]); the CLI explains when it is missing

LINEAR_GGUF = {"self_attention.query_key_value": "attn_qkv", "self_attention.dense": "attn_output",
               "mlp.dense_h_to_4h": "ffn_up", "mlp.dense_4h_to_h": "ffn_down"}


def qkv_rows_llama_order(cfg: ft.FalconConfig) -> list[int]:
    """Row indices of Falcon's fused qkv in the order llama.cpp reads them: every query head, then
    every key head, then every value head. Falcon's rows: kv groups of (heads/kv queries, 1 key,
    1 value) heads of head_dim rows (7B style: one group)."""
    kv, hd, per = cfg.num_kv_heads, cfg.head_dim, cfg.num_attention_heads // cfg.num_kv_heads
    head = lambda g, j: list(range((g * (per + 2) + j) * hd, (g * (per + 2) + j + 1) * hd))  # noqa: E731
    q = [r for g in range(kv) for j in range(per) for r in head(g, j)]
    k = [r for g in range(kv) for r in head(g, per)]
    v = [r for g in range(kv) for r in head(g, per + 1)]
    return q + k + v


def field(reader: "gguf.GGUFReader", key: str) -> object:
    return reader.fields[key].contents()


def tensors(reader: "gguf.GGUFReader") -> dict[str, "gguf.ReaderTensor"]:
    return {t.name: t for t in reader.tensors}


def as_numpy(t: "gguf.ReaderTensor") -> np.ndarray:
    """A GGUF tensor as float32 in numpy (HF) order: [out, in] for matrices."""
    shape = tuple(int(s) for s in reversed(t.shape))
    return gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)


VOCAB = 300


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """7B-style and 40B-style tiny GPTQ models with a small Falcon-shaped tokenizer (GGUFReader reads
    a 65,024-token vocabulary in seconds: the real tokenizer has its own test), an adapter for each."""
    root = tmp_path_factory.mktemp("export")
    train_demo_tokenizer(["un chat dort sur le tapis", "a cat sleeps on the mat"] * 20, vocab_size=VOCAB,
                         out_path=root / "tokenizer.json")
    out = {"root": root}
    for preset in ("tiny", "tiny-40b"):
        d = testing.make_checkpoint(root / preset, preset=preset, vocab_size=VOCAB, tokenizer=root / "tokenizer.json",
                                    seed=4, group_size=32, desc_act=True)
        out[preset] = d
        out[f"{preset}-adapter"] = adapter(testing.preset_config(preset, vocab_size=VOCAB), root / f"{preset}-ad")
    return out


def _merged_reference(model_dir: Path, cfg: ft.FalconConfig) -> dict[str, np.ndarray]:
    """HF name -> float64 merged weight (dequantized base + 2.0 * B A) for each linear."""
    state = testing.random_lora(cfg, 4, TARGETS, seed=3)
    q = ft.load_model(model_dir, device="cpu").quantize_config
    out = {}
    with WeightStore.open(model_dir) as s:
        for layer in range(cfg.num_hidden_layers):
            for path in LINEAR_GGUF:
                pre = f"transformer.h.{layer}.{path}"
                w = testing.gptq_dequantize(s.tensor(f"{pre}.qweight"), s.tensor(f"{pre}.qzeros"),
                                            s.tensor(f"{pre}.scales"), s.tensor(f"{pre}.g_idx"), q.bits,
                                            q.checkpoint_format).T
                out[pre] = reference(w, state, layer, path, 8 / 4)
    return out


@pytest.mark.parametrize("preset", ["tiny", "tiny-40b"])
def test_gguf_f16_structure_and_values(models: dict[str, Path], tmp_path: Path, preset: str) -> None:
    cfg = testing.preset_config(preset, vocab_size=VOCAB)
    out = tmp_path / "m.gguf"
    assert cli.main(["export", f"--model={models[preset]}", f"--lora_apply_dir={models[preset + '-adapter']}",
                     "--format=gguf", "--outtype=f16", f"--out={out}"]) == 0
    r = gguf.GGUFReader(out)
    assert field(r, "general.architecture") == "falcon"
    meta = {k: field(r, f"falcon.{k}") for k in (
        "context_length", "embedding_length", "feed_forward_length", "block_count", "attention.head_count",
        "attention.head_count_kv", "attention.layer_norm_epsilon")}
    assert meta == {"context_length": 2048, "embedding_length": cfg.hidden_size,
                    "feed_forward_length": 4 * cfg.hidden_size, "block_count": 2,
                    "attention.head_count": cfg.num_attention_heads,
                    "attention.head_count_kv": 1 if preset == "tiny" else 2,
                    "attention.layer_norm_epsilon": pytest.approx(1e-5)}
    assert field(r, "general.file_type") == 1  # MOSTLY_F16
    t = tensors(r)
    names = {"token_embd.weight", "output_norm.weight", "output_norm.bias"}
    for i in range(2):
        names |= {f"blk.{i}.attn_norm.weight", f"blk.{i}.attn_norm.bias", f"blk.{i}.attn_qkv.weight",
                  f"blk.{i}.attn_output.weight", f"blk.{i}.ffn_up.weight", f"blk.{i}.ffn_down.weight"}
        if preset == "tiny-40b":
            names |= {f"blk.{i}.attn_norm_2.weight", f"blk.{i}.attn_norm_2.bias"}
    assert set(t) == names  # tied embeddings: no output.weight (llama.cpp reuses token_embd)
    assert t["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert list(t["blk.0.attn_qkv.weight"].shape) == [cfg.hidden_size, cfg.qkv_out]  # ggml: ne0 = in

    # values: every matrix is the float64 reference rounded to float16 once; norms / embeddings as stored
    ref = _merged_reference(models[preset], cfg)
    rows = qkv_rows_llama_order(cfg)
    with WeightStore.open(models[preset]) as base:
        for layer in range(2):
            for path, short in LINEAR_GGUF.items():
                w = ref[f"transformer.h.{layer}.{path}"]
                got = t[f"blk.{layer}.{short}.weight"].data
                assert_fp16_of(got, w[rows] if short == "attn_qkv" else w)
            norms = ({"ln_attn": "attn_norm_2", "ln_mlp": "attn_norm"} if preset == "tiny-40b"
                     else {"input_layernorm": "attn_norm"})
            for hf, short in norms.items():  # llama.cpp feeds attention from attn_norm_2 and the MLP from attn_norm
                for p in ("weight", "bias"):
                    np.testing.assert_array_equal(t[f"blk.{layer}.{short}.{p}"].data,
                                                  base.tensor(f"transformer.h.{layer}.{hf}.{p}").astype(np.float32))
        np.testing.assert_array_equal(as_numpy(t["token_embd.weight"]).astype(np.float16),
                                      base.tensor("transformer.word_embeddings.weight"))
        np.testing.assert_array_equal(t["output_norm.bias"].data, base.tensor("transformer.ln_f.bias").astype(np.float32))


def test_gguf_tokenizer(tmp_path: Path, shared_data: Path) -> None:
    """Falcon's real tokenizer: tokens by id, types, merges, bos / eos, pre-tokenizer "falcon"."""
    tok = shared_data / "falcon" / "tokenizer.json"
    model = testing.make_checkpoint(tmp_path / "m", preset="tiny", vocab_size=65024, tokenizer=tok)
    out = export(model, tmp_path / "m.gguf")
    r = gguf.GGUFReader(out)
    tj = json.loads(tok.read_text(encoding="utf-8"))
    assert tj["pre_tokenizer"] == FALCON_PRE_TOKENIZER
    assert field(r, "tokenizer.ggml.model") == "gpt2" and field(r, "tokenizer.ggml.pre") == "falcon"
    tokens, types = field(r, "tokenizer.ggml.tokens"), field(r, "tokenizer.ggml.token_type")
    assert len(tokens) == len(types) == 65024
    for text, i in list(tj["model"]["vocab"].items())[::997]:
        assert tokens[i] == text
    assert tokens[11] == "<|endoftext|>" and types[11] == gguf.TokenType.CONTROL and types[100] == gguf.TokenType.NORMAL
    assert field(r, "tokenizer.ggml.merges") == tj["model"]["merges"]
    assert field(r, "tokenizer.ggml.bos_token_id") == 11 and field(r, "tokenizer.ggml.eos_token_id") == 11


def test_gguf_q8_0_within_its_error(models: dict[str, Path], tmp_path: Path) -> None:
    cfg = testing.preset_config("tiny-40b", vocab_size=VOCAB)
    out = export(models["tiny-40b"], tmp_path / "q.gguf", outtype="q8_0", lora_apply_dir=models["tiny-40b-adapter"])
    r = gguf.GGUFReader(out)
    assert field(r, "general.file_type") == 7  # MOSTLY_Q8_0
    t = tensors(r)
    assert t["blk.1.ffn_down.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert t["blk.1.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    ref = _merged_reference(models["tiny-40b"], cfg)
    rows = qkv_rows_llama_order(cfg)
    for layer in range(2):
        for path, short in LINEAR_GGUF.items():
            w = ref[f"transformer.h.{layer}.{path}"]
            w = w[rows] if short == "attn_qkv" else w
            got = as_numpy(t[f"blk.{layer}.{short}.weight"])
            # q8_0: blocks of 32 along a row, d = amax / 127 stored as float16, values round(x / d) * d
            blocks = w.reshape(w.shape[0], -1, 32)
            d = np.abs(blocks).max(axis=-1, keepdims=True) / 127
            err = np.abs(got.reshape(blocks.shape) - blocks)
            assert np.all(err <= d * (0.5 + 127 * 2.0 ** -11) + 1e-7), float((err / d).max())
            assert err.max() > 0  # it is quantized


def test_gguf_from_an_unquantized_base(models: dict[str, Path], tmp_path: Path) -> None:
    """A float16 base (quantized on load for training) exports its own float weights + LoRA."""
    fp16 = dense_copy(models["tiny"], tmp_path / "fp16")
    out = export(fp16, tmp_path / "m.gguf", lora_apply_dir=models["tiny-adapter"])
    t = tensors(gguf.GGUFReader(out))
    cfg = testing.preset_config("tiny", vocab_size=VOCAB)
    state = testing.random_lora(cfg, 4, TARGETS, seed=3)
    with WeightStore.open(fp16) as base:
        w = base.tensor("transformer.h.1.mlp.dense_4h_to_h.weight")
        assert_fp16_of(t["blk.1.ffn_down.weight"].data, reference(w, state, 1, "mlp.dense_4h_to_h", 2.0))


def test_gguf_errors_are_one_line(models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rw = testing.make_checkpoint(tmp_path / "rw", preset="tiny-rw")
    notok = testing.make_checkpoint(tmp_path / "notok", preset="tiny")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for args, needle in (
            ([f"--model={models['tiny']}", f"--out={blocker / 'm.gguf'}"], f"cannot write --out {blocker / 'm.gguf'}"),
            ([f"--model={models['tiny']}", f"--out={tmp_path}"], f"cannot write --out {tmp_path}: is a directory"),
            ([f"--model={rw}", f"--out={tmp_path / 'rw.gguf'}"], "no linear biases, ALiBi, sequential attention"),
            ([f"--model={notok}", f"--out={tmp_path / 'n.gguf'}"], "put tokenizer.json next to the model"),
            ([f"--model={models['tiny']}", f"--lora_apply_dir={models['tiny-40b-adapter']}",
              f"--out={tmp_path / 'x.gguf'}"], "has shape [4, 512], expected [4, 256]")):
        code = cli.main(["export", *args])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].startswith("falcontune: error: ") and needle in err[0], (args, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "notok", "rw"]  # no output, no temporary left


def test_help_lists_export() -> None:
    r = subprocess.run([sys.executable, "-m", "falcontune", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "export" in r.stdout


def test_missing_gguf_package_is_explained(models: dict[str, Path], tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` raises ImportError
    assert cli.main(["export", f"--model={models['tiny']}", f"--out={tmp_path / 'm.gguf'}"]) == 2
    assert "pip install gguf" in capsys.readouterr().err
    assert cli.main(["export", f"--model={models['tiny']}", "--format=hf", f"--out={tmp_path / 'hf'}"]) == 0


@pytest.mark.parametrize("preset", ["tiny", "tiny-40b"])
def test_llama_cpp_runs_the_gguf(tmp_path: Path, shared_data: Path, preset: str) -> None:
    """End to end, when llama-cpp-python is installed (not a test dependency: it compiles llama.cpp):
    llama.cpp's logits on the exported f16 GGUF match falcontune's engine on base + adapter, and its
    tokenizer splits text as falcontune's does."""
    llama_cpp = pytest.importorskip("llama_cpp")
    tok = shared_data / "falcon" / "tokenizer.json"
    d = testing.make_checkpoint(tmp_path / preset, preset=preset, vocab_size=65024, tokenizer=tok, seed=7,
                                group_size=32, desc_act=True)
    ad = adapter(testing.preset_config(preset, vocab_size=65024), tmp_path / "ad")
    model = ft.load_model(d, device="cpu", dtype="float32")
    model.load_lora(ad)
    model.eval()
    text = "Bonjour, comment allez-vous ? 12345 tokens!"
    ids = model.tokenizer.encode(text)
    ours = model.forward(np.array([ids]))[0].astype(np.float64)
    llm = llama_cpp.Llama(model_path=str(export(d, tmp_path / "m.gguf", lora_apply_dir=ad)), n_ctx=64,
                          logits_all=True, verbose=False, n_threads=1)
    assert llm.tokenize(text.encode(), add_bos=False) == ids
    llm.eval(ids)
    theirs = np.array(llm.scores[: len(ids)], dtype=np.float64)
    assert np.linalg.norm(theirs - ours) / np.linalg.norm(ours) < 5e-3  # float16 weights
    picked = ours[np.arange(len(ids)), theirs.argmax(-1)]  # llama.cpp's greedy token: ours too, or a near tie
    assert np.all(picked >= ours.max(-1) - 0.05)
