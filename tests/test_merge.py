"""-c / export --format=hf on every base: GPTQ files and float bases (quantized on load by the engine,
merged from their original float weights). Values are checked against W + scale * B @ A computed
here in float64."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import falcontune as ft
from falcontune import cli, testing
from falcontune.lora_io import lora_scale, write_adapter
from falcontune.weights import WeightStore, save_safetensors, to_float32

LINEARS = ("self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
TARGETS = ["query_key_value", "dense", "dense_4h_to_h"]


def dense_copy(gptq_dir: Path, out: Path, dtype: str = "float16", seed: int = 0) -> Path:
    """An unquantized checkpoint of the same architecture: each GPTQ linear replaced by a fresh
    random nn.Linear weight [out, in] of ``dtype`` (float16 as tiiuae's checkpoints)."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True)
    for name in ("config.json", "tokenizer.json"):
        if (gptq_dir / name).is_file():
            (out / name).write_bytes((gptq_dir / name).read_bytes())
    tensors = {}
    with WeightStore.open(gptq_dir) as store:
        for name in store.names():
            base, kind = name.rsplit(".", 1)
            if kind == "qweight":
                fin = store.shape(name)[0] * 32 // 4
                fout = store.shape(name)[1]
                tensors[f"{base}.weight"] = (rng.standard_normal((fout, fin)) / np.sqrt(fin)).astype(dtype)
            elif kind not in ("qzeros", "scales", "g_idx"):
                tensors[name] = np.array(store.tensor(name))
    save_safetensors(out / "model.safetensors", tensors)
    return out


def adapter(cfg: ft.FalconConfig, out: Path, r: int = 4, alpha: float = 8, rslora: bool = False,
            seed: int = 3) -> Path:
    state = testing.random_lora(cfg, r, TARGETS, seed=seed)
    return write_adapter(out, state, {"r": r, "lora_alpha": alpha, "lora_dropout": 0.0, "target_modules": TARGETS,
                                      "use_rslora": rslora}, base_model="test")


def reference(base_weight: np.ndarray, state: dict, layer: int, path: str, scale: float) -> np.ndarray:
    """W + scale * B @ A in float64 (W [out, in])."""
    key = f"base_model.model.transformer.h.{layer}.{path}"
    w = base_weight.astype(np.float64)
    if f"{key}.lora_A.weight" in state:
        w = w + scale * (state[f"{key}.lora_B.weight"].astype(np.float64) @ state[f"{key}.lora_A.weight"].astype(np.float64))
    return w


def assert_fp16_of(got: np.ndarray, ref: np.ndarray) -> None:
    """got (float16) is ref rounded to float16: within half a float16 ulp (+ the float32 step)."""
    assert got.dtype == np.float16 and got.shape == ref.shape
    ulp = np.spacing(np.abs(ref).astype(np.float16)).astype(np.float64)
    err = np.abs(got.astype(np.float64) - ref)
    assert np.all(err <= 0.5 * ulp + 1e-7 * np.abs(ref) + 1e-12), float((err / ulp).max())


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("merge")
    gptq = testing.make_checkpoint(root / "gptq", preset="tiny", bits=4, group_size=32, seed=1, desc_act=True)
    return {"root": root, "gptq": gptq, "fp16": dense_copy(gptq, root / "fp16"),
            "fp32": dense_copy(gptq, root / "fp32", dtype="float32", seed=2)}


def _merged(out: Path) -> WeightStore:
    return WeightStore.open(out / "model.safetensors")


@pytest.mark.parametrize("rslora", [False, True])
def test_c_on_an_unquantized_float16_base(bases: dict[str, Path], tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str], rslora: bool) -> None:
    """The bar: `finetune --skip -c` on a float16 Falcon (quantized on load for training) writes the
    merged safetensors with W + scale * B A from the ORIGINAL float16 W."""
    cfg = ft.load_model(bases["fp16"], device="cpu").config
    ad = adapter(cfg, tmp_path / "ad", rslora=rslora)
    out = tmp_path / "merged"
    code = cli.main(["finetune", f"--model={bases['fp16']}", "--skip", f"--lora_apply_dir={ad}", "-c",
                     f"--merged_dir={out}", f"--lora_out_dir={tmp_path / 'lora'}", "--backend=cpu"])
    assert code == 0, capsys.readouterr().err
    scale = lora_scale(4, 8, rslora)
    assert scale == (8 / 2 if rslora else 8 / 4)
    state = testing.random_lora(cfg, 4, TARGETS, seed=3)
    with WeightStore.open(bases["fp16"]) as base, _merged(out) as merged:
        assert set(merged.names()) == set(base.names())
        for name in base.names():
            got = merged.tensor(name)
            layer_path = name.rsplit(".", 1)[0].split(".", 3)
            if name.endswith(".weight") and any(name.endswith(f"{l}.weight") for l in LINEARS):
                ref = reference(to_float32(base.tensor(name), base.dtype(name)), state, int(layer_path[2]),
                                layer_path[3], scale)
                assert_fp16_of(got, ref)
                if "dense_h_to_4h" not in name:  # the adapter changed these
                    assert not np.array_equal(got, base.tensor(name))
            else:
                np.testing.assert_array_equal(got, base.tensor(name))
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float16"


def test_gptq_base_merge_values(bases: dict[str, Path], tmp_path: Path) -> None:
    """GPTQ base (act-order g_idx): W = dequantized GPTQ + scale * B A; export --format=hf writes the
    same bytes as -c."""
    from falcontune.merge import merge_and_save

    model = ft.load_model(bases["gptq"], device="cpu")
    ad = adapter(model.config, tmp_path / "ad", r=8, alpha=16)
    model.load_lora(ad)
    one = merge_and_save(model, tmp_path / "c")
    assert cli.main(["export", f"--model={bases['gptq']}", f"--lora_apply_dir={ad}", "--format=hf",
                     f"--out={tmp_path / 'hf'}"]) == 0
    state = testing.random_lora(model.config, 8, TARGETS, seed=3)
    q = model.quantize_config
    with WeightStore.open(bases["gptq"]) as base, _merged(one) as c, _merged(tmp_path / "hf") as hf:
        assert c.names() == hf.names()
        for name in c.names():
            np.testing.assert_array_equal(c.tensor(name), hf.tensor(name))
        for layer in range(model.config.num_hidden_layers):
            for path in LINEARS:
                pre = f"transformer.h.{layer}.{path}"
                w = testing.gptq_dequantize(base.tensor(f"{pre}.qweight"), base.tensor(f"{pre}.qzeros"),
                                            base.tensor(f"{pre}.scales"), base.tensor(f"{pre}.g_idx"), q.bits,
                                            q.checkpoint_format).T
                assert_fp16_of(c.tensor(f"{pre}.weight"), reference(w, state, layer, path, 2.0))


def test_float32_base_and_no_adapter(bases: dict[str, Path], tmp_path: Path) -> None:
    """export --format=hf without an adapter: the base converted to float16, nothing else."""
    assert cli.main(["export", f"--model={bases['fp32']}", "--format=hf", f"--out={tmp_path / 'o'}"]) == 0
    with WeightStore.open(bases["fp32"]) as base, _merged(tmp_path / "o") as out:
        for name in base.names():
            np.testing.assert_array_equal(out.tensor(name), base.tensor(name).astype(np.float16))


def test_hf_export_errors(bases: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for args, needle in (
            (["--format=hf", "--outtype=q8_0", f"--out={tmp_path / 'o'}"], "--outtype=q8_0 is for --format=gguf"),
            (["--format=hf", f"--out={blocker / 'sub'}"], f"cannot write the merged model to {blocker / 'sub'}"),
            (["--format=hf", f"--lora_apply_dir={tmp_path}", f"--out={tmp_path / 'o'}"], "adapter_config.json")):
        code = cli.main(["export", f"--model={bases['gptq']}", *args])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and needle in err[0], (args, err)
    assert not (tmp_path / "o").exists()
