"""The ``falcontune`` command: the tutorial command verbatim, flag parsing, one-line errors with
exit status 2, generation with an adapter, interactive generation through a pipe, check-dataset
and -c merging."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import falcontune as ft
from falcontune import cli, testing
from falcontune.data import make_prompt
from falcontune.tokenizer import train_demo_tokenizer
from falcontune.model import resolve_device
from falcontune.trainer import FinetuneResult

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "datasets" / "fr_instructions.json"

TUTORIAL = [
    "finetune", "--model=falcon-7b-instruct-4bit", "--weights=gptq_model-4bit-64g.safetensors",
    "--dataset=./instruction_fr_wikipedia_oracle.json", "--data_type=alpaca",
    "--lora_out_dir=./falcon-7b-sample-4bit/", "--mbatch_size=1", "--batch_size=2", "--epochs=1", "--lr=3e-4",
    "--cutoff_len=256", "--lora_r=8", "--lora_alpha=16", "--lora_dropout=0.05", "--warmup_steps=5",
    "--save_steps=50", "--save_total_limit=3", "--logging_steps=5", '--target_modules=["query_key_value"]',
]


def _shortest_records(n: int) -> list[dict[str, str]]:
    """The n shortest records of the French sample, in file order (keeps the CPU test fast)."""
    records = json.loads(SAMPLE.read_text(encoding="utf-8"))
    size = [len(r["instruction"]) + len(r.get("input", "")) + len(r["output"]) for r in records]
    keep = sorted(np.argsort(size, kind="stable")[:n])
    return [records[i] for i in keep]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny model with a 512-token French tokenizer, an adapter for it and a small dataset."""
    root = tmp_path_factory.mktemp("cli")
    records = json.loads(SAMPLE.read_text(encoding="utf-8"))
    texts = [make_prompt(r["instruction"], r.get("input", ""), r["output"]) for r in records]
    tok = train_demo_tokenizer(texts, vocab_size=512, out_path=root / "tokenizer.json")
    model_dir = testing.make_checkpoint(root / "model", preset="tiny", vocab_size=tok.vocab_size,
                                        tokenizer=root / "tokenizer.json")
    model = ft.load_model(model_dir, device="cpu")
    model.add_lora(r=4, alpha=8)
    model.load_lora_state_dict(testing.random_lora(model.config, 4, seed=5))
    model.save_lora(root / "adapter")
    data = root / "data.json"
    data.write_text(json.dumps(records[:10], ensure_ascii=False), encoding="utf-8")
    return {"root": root, "model": model_dir, "adapter": root / "adapter", "data": data,
            "tokenizer": root / "tokenizer.json"}


def _main(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(args)
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------------------------------------
# the tutorial command, verbatim


def test_tutorial_command_verbatim(tmp_path: Path, shared_data: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    # a tiny model with the real Falcon tokenizer (65,024 ids), laid out as the tutorial's files:
    # ./falcon-7b-instruct-4bit/ (config, tokenizer) and ./gptq_model-4bit-64g.safetensors
    monkeypatch.chdir(tmp_path)
    testing.make_checkpoint("falcon-7b-instruct-4bit", preset="tiny", vocab_size=65024,
                            tokenizer=shared_data / "falcon" / "tokenizer.json")
    shutil.move("falcon-7b-instruct-4bit/gptq_model-4bit-64g.safetensors", ".")
    Path("instruction_fr_wikipedia_oracle.json").write_text(json.dumps(_shortest_records(20), ensure_ascii=False),
                                                            encoding="utf-8")
    code, out, err = _main(TUTORIAL, capsys)
    assert code == 0, err
    lora = tmp_path / "falcon-7b-sample-4bit"
    curves = ["training_curves.png"] if importlib.util.find_spec("matplotlib") else []  # drawn when it can be
    assert sorted(p.name for p in lora.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                      "log.jsonl", *curves]  # 8 steps < save_steps: no checkpoint
    cfg = json.loads((lora / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"], cfg["target_modules"]) == (
        8, 16.0, 0.05, ["query_key_value"])
    log = [json.loads(x) for x in (lora / "log.jsonl").read_text().splitlines()]
    losses = [r for r in log if "loss" in r]
    assert [r["step"] for r in losses] == [5]  # 16 train examples / 2 per step = 8 steps, log every 5
    assert losses[0]["learning_rate"] == pytest.approx(3e-4 * 3 / 3)  # after 5 warmup steps: lambda(5) = 1
    assert [r["step"] for r in log if "eval_loss" in r] == [5, 8]  # eval_steps = max(5, 20 // 10), + final
    assert "{'loss': " in out and "'learning_rate': " in out and "'epoch': 0.62" in out
    assert "falcontune: error" not in err


@pytest.mark.slow
@pytest.mark.cuda
def test_tutorial_command_on_the_real_7b_shape(tmp_path: Path, shared_data: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    # random weights with Falcon-7B's exact shapes, loaded by name (--model=falcon-7b-instruct-4bit)
    monkeypatch.chdir(tmp_path)
    # the benchmark's builder: one random 7B layer repeated 32 times (seconds instead of minutes)
    sys.path.insert(0, str(REPO / "bench"))
    from train_bench import make_7b_checkpoint
    ckpt = make_7b_checkpoint(Path(os.environ.get("FT_7B_CKPT", tmp_path / "ckpt")))
    os.symlink(ckpt / "gptq_model-4bit-64g.safetensors", "gptq_model-4bit-64g.safetensors")
    shutil.copy(ckpt / "quantize_config.json", "quantize_config.json")
    shutil.copy(shared_data / "falcon" / "tokenizer.json", "tokenizer.json")  # the known name supplies the config
    Path("instruction_fr_wikipedia_oracle.json").write_text(json.dumps(_shortest_records(4), ensure_ascii=False),
                                                            encoding="utf-8")
    code, out, err = _main(TUTORIAL, capsys)
    assert code == 0, err
    log = [json.loads(x) for x in (tmp_path / "falcon-7b-sample-4bit" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 2 and np.isfinite(log[-1]["train_loss"])  # 3 train examples, 2 per step


# ---------------------------------------------------------------------------------------------
# flags


def test_flag_forms_and_booleans() -> None:
    p = cli.build_parser()
    a = p.parse_args(["finetune", "--model", "m", "--gradient_checkpointing", "--skip=true", "-c",
                      "--use_eos_token=0", "--train_on_inputs", "false", "--lr", "1e-3", "--epochs=2"])
    assert a.gradient_checkpointing is True and a.skip is True and a.checkpoint is True
    assert a.use_eos_token is False and a.train_on_inputs is False and a.lr == 1e-3 and a.epochs == 2
    d = p.parse_args(["finetune", "--model=m"])
    assert (d.mbatch_size, d.batch_size, d.epochs, d.lr, d.cutoff_len, d.lora_r, d.lora_alpha, d.lora_dropout,
            d.val_set_size, d.warmup_steps, d.save_steps, d.save_total_limit, d.logging_steps,
            d.gradient_checkpointing_ratio, d.lora_out_dir, d.data_type, d.local_rank, d.use_eos_token) == (
        1, 2, 3, 2e-4, 256, 8, 16, 0.05, 0.2, 50, 50, 3, 10, 1.0, "alpaca_lora", "alpaca", 0, True)
    assert d.checkpoint is False and d.skip is False and d.train_on_inputs is None
    g = p.parse_args(["generate", "--model=m", "--do_sample", "--use_cache=false", "--interactive=1"])
    assert g.do_sample and not g.use_cache and g.interactive
    assert (g.max_new_tokens, g.top_p, g.top_k, g.temperature, g.num_beams) == (400, 0.95, 40, 0.8, 1)
    with pytest.raises(SystemExit) as e:
        p.parse_args(["finetune", "--model=m", "--skip=maybe"])
    assert e.value.code == 2


def test_backend_aliases(capsys: pytest.CaptureFixture[str]) -> None:
    """One resolution for --backend / --device and load_model(device=): concrete devices, falcontune's
    triton / torch mean CUDA, --device wins, errors name the parameter that was given."""
    say = print
    cuda = "cuda:0" if ft.cuda_available() else None
    for alias in ("triton", "torch", "cuda"):
        if cuda:
            assert resolve_device(alias, None, say) == cuda
        else:  # a CPU-only build or no GPU: a clear error naming the parameter, no weights path
            with pytest.raises(ft.ParameterError, match=rf"^backend='{alias}': ") as e:
                resolve_device(alias, None, say)
            assert e.value.as_flags().startswith(f"--backend={alias}: ")
    assert "triton" in capsys.readouterr().out  # told what triton means here
    assert resolve_device("cpu", None, say) == "cpu"
    assert resolve_device("auto", None, say) == (cuda or "cpu")
    assert resolve_device("triton", "cpu", say) == "cpu"  # --device wins
    with pytest.raises(ValueError, match="backend='opencl'") as e:
        resolve_device("opencl", None, say)
    assert "--backend=opencl" in e.value.as_flags()
    with pytest.raises(ValueError, match="device='cuda:x'"):
        resolve_device(None, "cuda:x", say)


# ---------------------------------------------------------------------------------------------
# errors


def _bad_cases(t: dict[str, Path], tmp: Path) -> list[tuple[list[str], str]]:
    bad = tmp / "bad.json"
    bad.write_text('[{"instruction": "a", "output": "b"}, {"instruction": "c"}]', encoding="utf-8")
    big_tok = tmp / "big"
    testing.make_checkpoint(big_tok, preset="tiny", vocab_size=256, tokenizer=t["tokenizer"])
    base = ["finetune", f"--model={t['model']}", f"--dataset={t['data']}", f"--lora_out_dir={tmp / 'o'}"]
    return [
        (["finetune", f"--model={t['model']}", f"--dataset={bad}"], "bad.json: record 2"),
        (["finetune", "--model=falcon-13b", "--weights=x.safetensors", f"--dataset={t['data']}"],
         "known models: "),
        (["finetune", "--model=falcon-7b-instruct-4bit", f"--weights={tmp / 'nope.safetensors'}",
          f"--dataset={t['data']}"], "nope.safetensors"),
        (["finetune", f"--model={t['model']}", f"--dataset={tmp / 'missing.json'}"], "missing.json"),
        (["finetune", f"--model={big_tok}", f"--dataset={t['data']}"], "vocab_size is 256"),
        (base + ["--local_rank=1"], "multi-GPU"),
        (base + ["--batch_size=3", "--mbatch_size=2"], "--batch_size=3"),
        (base + ["--target_modules=['q_proj', 'v_proj']"], "q_proj"),
        (base + [f"--resume_checkpoint={tmp / 'ckpt'}"], "ckpt"),
        (["generate", f"--model={t['model']}", f"--lora_apply_dir={tmp}", "--prompt=x"], "adapter_config.json"),
        (["generate", f"--model={t['model']}"], "--prompt or --instruction"),
    ]


def test_user_errors_are_one_line_exit_2(tiny: dict[str, Path], tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    for args, needle in _bad_cases(tiny, tmp_path):
        code, _, err = _main(args, capsys)
        lines = err.strip().splitlines()
        assert code == 2, (args, err)
        assert len(lines) == 1 and lines[0].startswith("falcontune: error: "), (args, err)
        assert needle in lines[0], (args, lines[0])


def test_verbose_shows_traceback(tiny: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _main(["finetune", f"--model={tiny['model']}", f"--dataset={tmp_path / 'x.json'}",
                          "--verbose"], capsys)
    assert code == 2 and "Traceback" in err and err.strip().splitlines()[-1].startswith("falcontune: error:")


def test_interrupted_run_exits_130(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import falcontune.trainer as trainer
    monkeypatch.setattr(trainer, "finetune", lambda **kw: FinetuneResult(adapter_dir=None, interrupted=True))
    assert cli.main(["finetune", "--model=demo"]) == 130


def test_memory_and_internal_errors(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import falcontune.trainer as trainer

    def oom(**kw: object) -> None:
        raise MemoryError("cannot allocate 2.1 GiB on cuda:0")

    monkeypatch.setattr(trainer, "finetune", oom)
    code, _, err = _main(["finetune", "--model=demo"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "out of memory" in err and "--mbatch_size" in err and "2.1 GiB" in err

    def bug(**kw: object) -> None:
        raise RuntimeError("engine failure")

    monkeypatch.setattr(trainer, "finetune", bug)
    code, _, err = _main(["finetune", "--model=demo"], capsys)
    assert code == 1 and err.strip() == ("falcontune: error: engine failure "
                                         "(run with --verbose for the traceback)")


# ---------------------------------------------------------------------------------------------
# generation


def test_generate_with_adapter(tiny: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _main(["generate", f"--model={tiny['model']}", f"--lora_apply_dir={tiny['adapter']}",
                            "--instruction=Quelle est la capitale de la France ?", "--max_new_tokens=8",
                            "--backend=cpu"], capsys)
    assert code == 0, err
    model = ft.load_model(tiny["model"], device="cpu")
    model.load_lora(tiny["adapter"])
    model.eval()
    expected = model.generate(instruction="Quelle est la capitale de la France ?", max_new_tokens=8)
    assert out == expected + "\n"
    plain = ft.load_model(tiny["model"], device="cpu").generate(
        instruction="Quelle est la capitale de la France ?", max_new_tokens=8)
    assert expected != plain or expected == ""  # the adapter changes the answer (random weights)
    assert "Took" in err


def test_interactive_generation_through_a_pipe(tiny: dict[str, Path]) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "falcontune.cli", "generate", f"--model={tiny['model']}",
           f"--lora_apply_dir={tiny['adapter']}", "--interactive", "--max_new_tokens=4", "--backend=cpu"]
    run = subprocess.run(cmd, input="Bonjour\nDonne un exemple.\n\nne pas lire\n", capture_output=True,
                         text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stderr.count("(Took") == 2  # stopped at the empty line
    run = subprocess.run(cmd + ["--prompt=Il était une fois"], input="Encore\n", capture_output=True, text=True,
                         env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stderr.count("(Took") == 2  # the --prompt, then one line until EOF


# ---------------------------------------------------------------------------------------------
# check-dataset and merging


def test_check_dataset_command(tiny: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _main(["check-dataset", str(tiny["data"]), f"--tokenizer={tiny['tokenizer']}",
                          "--cutoff_len=64"], capsys)
    assert code == 0 and "OK" in out and "10 / 10" in out
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "", "output": "b"}\n', encoding="utf-8")
    code, out, _ = _main(["check-dataset", str(bad)], capsys)
    assert code == 1 and "record 2" in out


def test_merge_with_skip(tiny: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _main(["finetune", f"--model={tiny['model']}", f"--lora_apply_dir={tiny['adapter']}",
                          f"--lora_out_dir={tmp_path / 'out'}", "--skip", "-c"], capsys)
    assert code == 0, err
    merged = tmp_path / "out" / "merged"
    assert sorted(p.name for p in merged.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    a = np.frombuffer((tiny["adapter"] / "adapter_model.safetensors").read_bytes(), np.uint8)
    b = np.frombuffer((tmp_path / "out" / "adapter_model.safetensors").read_bytes(), np.uint8)
    assert np.array_equal(a, b)  # --skip keeps the applied adapter as is


# ---------------------------------------------------------------------------------------------
# issue 15: the command's errors name flags, a useless cutoff_len stops, rounded numbers, curves,
# sampling flags without --do_sample, streaming, check-dataset's report


def test_flags_are_derived_from_the_finetune_config() -> None:
    import dataclasses

    from falcontune.trainer import FinetuneConfig

    args = cli.build_parser().parse_args(["finetune", "--model=m"])
    for f in dataclasses.fields(FinetuneConfig):
        if f.name != "model":
            assert getattr(args, f.name) == f.default, f.name
    help_text = cli.build_parser()._subparsers._group_actions[0].choices["finetune"].format_help()
    assert "Maximum tokens per example" in " ".join(help_text.split()) and "-c [BOOL], --checkpoint" in help_text


def test_setting_errors_name_flags_on_the_command_line(tiny: dict[str, Path], tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    base = ["finetune", f"--model={tiny['model']}", f"--dataset={tiny['data']}", f"--lora_out_dir={tmp_path / 'o'}"]
    for extra, line in ((["--epochs=0"], "falcontune: error: --epochs=0: expected an integer >= 1"),
                        (["--lora_dropout=1"], "falcontune: error: --lora_dropout=1.0: expected a probability in [0, 1)"),
                        (["--cutoff_len=3"], "falcontune: error: --cutoff_len=3 is too small for this dataset")):
        code, out, err = _main(base + extra, capsys)
        assert code == 2 and err.startswith(line) and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o" / "adapter_model.safetensors").exists()  # cutoff_len=3 trained nothing


def test_device_errors_name_the_flag_not_a_weights_file(tiny: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    if ft.cuda_available():
        pytest.skip("a GPU is visible: --backend=cuda works")
    for cmd in (["generate", "--prompt=x"], ["finetune", f"--dataset={tiny['data']}"]):
        code, _, err = _main([*cmd, f"--model={tiny['model']}", "--backend=cuda"], capsys)
        assert code == 2 and err.startswith("falcontune: error: --backend=cuda: "), err
        assert str(tiny["model"]) not in err and ".safetensors" not in err
        assert ("FALCONTUNE_CUDA=1" in err) if not ft.cuda_compiled() else ("no NVIDIA GPU" in err)


def test_missing_files_say_where_to_get_them(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _main(["generate", "--model=falcon-7b-instruct-4bit", "--prompt=x", "--backend=cpu"], capsys)
    assert code == 2 and "https://huggingface.co/TheBloke/falcon-7b-instruct-GPTQ" in err, err
    code, _, err = _main(["generate", "--model=falcon-7b-instruct-4bit", f"--weights={tmp_path / 'w.safetensors'}",
                          "--prompt=x", "--backend=cpu"], capsys)
    assert code == 2 and "w.safetensors" in err and "huggingface.co/TheBloke/falcon-7b-instruct-GPTQ" in err
    model = testing.make_checkpoint(tmp_path / "notok", preset="tiny")
    code, _, err = _main(["generate", f"--model={model}", "--prompt=x", "--backend=cpu"], capsys)
    assert code == 2 and "/resolve/main/tokenizer.json" in err and "/blob/" not in err
    assert "next to the weights" in err and "--tokenizer" in err


def test_learning_rate_is_printed_rounded(tiny: dict[str, Path], tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _main(["finetune", f"--model={tiny['model']}", f"--dataset={tiny['data']}", "--epochs=1",
                            f"--lora_out_dir={tmp_path / 'o'}", "--lr=3e-4", "--warmup_steps=3", "--logging_steps=1",
                            "--cutoff_len=64", "--backend=cpu"], capsys)
    assert code == 0, err
    printed = [float(x) for x in re.findall(r"'learning_rate': ([0-9.e-]+)", out)]
    logged = [r["learning_rate"] for r in map(json.loads, (tmp_path / "o" / "log.jsonl").read_text().splitlines())
              if "learning_rate" in r]
    assert printed == [float(f"{x:.4g}") for x in logged] and 0.0002 in printed
    assert not re.search(r"'learning_rate': [0-9.]*(9999|0000)\d", out), out


def test_plot_command(tiny: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
                      monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    out.mkdir()
    log = [{"loss": 3.0 - 0.1 * i, "grad_norm": 1.0, "learning_rate": 1e-4 * i, "epoch": i / 10, "step": i}
           for i in range(1, 6)] + [{"eval_loss": 2.8, "step": 5}, {"train_runtime": 1.0, "train_loss": 2.7, "step": 5}]
    (out / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log), encoding="utf-8")
    if importlib.util.find_spec("matplotlib") is not None:
        code, printed, err = _main(["plot", str(out)], capsys)
        assert code == 0, err
        assert (out / "training_curves.png").read_bytes()[:4] == b"\x89PNG" and "training_curves.png" in printed
        code, _, err = _main(["plot", str(out), f"--output={tmp_path / 'c.png'}"], capsys)
        assert code == 0 and (tmp_path / "c.png").is_file()
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    code, _, err = _main(["plot", str(out)], capsys)
    assert code == 2 and err.strip() == "falcontune: error: drawing the training curves needs matplotlib: " \
                                        "pip install matplotlib"
    code, _, err = _main(["plot", str(tmp_path / "nothing")], capsys)
    assert code == 2 and "no training log here" in err


def test_sampling_flags_without_do_sample_are_reported(tiny: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    base = ["generate", f"--model={tiny['model']}", "--prompt=Bonjour", "--max_new_tokens=3", "--backend=cpu"]
    code, out, err = _main(base + ["--temperature=0.3", "--top_k=5"], capsys)
    assert code == 0 and "note: --temperature, --top_k only apply with --do_sample" in err, err
    greedy = out
    code, out, err = _main(base, capsys)
    assert code == 0 and "only apply with" not in err and out == greedy  # the defaults say nothing
    code, out, err = _main(base + ["--temperature=0.3", "--do_sample", "--seed=1"], capsys)
    assert code == 0 and "only apply with" not in err
    model = ft.load_model(tiny["model"], device="cpu")
    with pytest.warns(UserWarning, match="top_p only apply when sampling: pass do_sample=True") as w:
        model.generate(prompt="Bonjour", max_new_tokens=2, top_p=0.5)
    assert w[0].filename == __file__  # points at the caller, not inside falcontune


def test_generate_streams_pieces_as_they_come(tiny: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    writes: list[str] = []
    real_write = sys.stdout.write
    monkeypatch.setattr(sys.stdout, "write", lambda s: (writes.append(s), real_write(s))[1])
    code, out, err = _main(["generate", f"--model={tiny['model']}", f"--lora_apply_dir={tiny['adapter']}",
                            "--prompt=Il était une fois", "--max_new_tokens=12", "--backend=cpu"], capsys)
    assert code == 0, err
    pieces = [w for w in writes if w]
    assert len(pieces) > 2 and "".join(pieces) == out and out.endswith("\n")  # piece by piece, printed once


def test_check_dataset_unknown_fields_and_every_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    typo = tmp_path / "typo.json"
    typo.write_text(json.dumps([{"instruction": f"q{i}", "imput": "contexte", "output": "r"} for i in range(3)]
                               + [{"instruction": "q", "ouput": "r"}]), encoding="utf-8")
    code, out, _ = _main(["check-dataset", str(typo)], capsys)
    assert code == 1  # record 4 misses 'output'
    assert "unknown field 'imput' in 3 record(s) is ignored: did you mean 'input'?" in out
    assert "field 'output' is missing" in out and "unknown field 'ouput'" in out
    assert "unknown fields: imput (3), ouput (1)" in out
    ok = tmp_path / "ok.json"
    ok.write_text(json.dumps([{"instruction": "q", "Input": "c", "output": "r"}]), encoding="utf-8")
    code, out, _ = _main(["check-dataset", str(ok)], capsys)
    assert code == 0 and ": OK" in out and "did you mean 'input'?" in out
    code, out, _ = _main(["check-dataset", str(ok), "--strict"], capsys)
    assert code == 1 and "erreurs / errors (1)" in out and "'Input'" in out
    many = tmp_path / "many.jsonl"
    many.write_text("".join('{"instruction": ""}\n' for _ in range(30)), encoding="utf-8")
    code, out, _ = _main(["check-dataset", str(many)], capsys)
    assert code == 1 and "errors (30)" in out and "record 30:" in out and "more" not in out
    help_text = cli.build_parser()._subparsers._group_actions[0].choices["check-dataset"].format_help()
    for flag in ("--cutoff_len", "--data_type", "--strict"):
        assert re.search(rf"{flag}[^\n]*\n?\s+\S", help_text), help_text


def test_finetune_warns_about_unknown_fields(tiny: dict[str, Path], tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    records = json.loads(tiny["data"].read_text(encoding="utf-8"))
    typo = tmp_path / "typo.json"
    typo.write_text(json.dumps([{("imput" if k == "input" else k): v for k, v in r.items()} for r in records]),
                    encoding="utf-8")
    code, out, err = _main(["finetune", f"--model={tiny['model']}", f"--dataset={typo}", "--skip=false",
                            f"--lora_out_dir={tmp_path / 'o'}", "--epochs=1", "--cutoff_len=64", "--backend=cpu",
                            "--logging_steps=100"], capsys)
    assert code == 0, err
    assert f"warning: {typo}: record 1: unknown field 'imput' in {len(records)} record(s) is ignored: " \
           "did you mean 'input'?" in out
