"""Facts in C, advice in Python: the engine's errors say what happened; ``falcontune.cli`` adds the
advice that fits the command that failed, once (no training advice while generating)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from falcontune import cli, testing
from falcontune.data import make_prompt
from falcontune.model import FalconModel
from falcontune.tokenizer import train_demo_tokenizer

REPO = Path(__file__).resolve().parent.parent
TRAINING_WORDS = ("mbatch_size", "cutoff_len", "gradient_checkpointing", "gradient checkpointing")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("advice")
    records = json.loads((REPO / "datasets" / "fr_instructions.json").read_text(encoding="utf-8"))[:6]
    texts = [make_prompt(r["instruction"], r.get("input", ""), r["output"]) for r in records]
    tok = train_demo_tokenizer(texts, vocab_size=300, out_path=root / "tokenizer.json")
    model = testing.make_checkpoint(root / "model", preset="tiny", vocab_size=tok.vocab_size,
                                    tokenizer=root / "tokenizer.json")
    data = root / "data.json"
    data.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return {"model": model, "data": data, "out": root / "lora"}


def _error_line(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    code = cli.main(args)
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("falcontune: error:")]
    assert code == 2 and len(err) == 1, err
    return err[0]


def test_engine_messages_carry_no_cli_advice():
    """No flag names or advice in the C sources' error strings (item 8 of issue 14)."""
    advice = re.compile(r"--\w|\b(lower|enable|try|use|pass|set|rerun|reinstall) (--|the |a |mbatch|cutoff|max_)"
                        r"|\bcall \w+ first")
    hits = []
    for ext in ("*.c", "*.cu", "*.h", "*.cuh"):
        for p in (REPO / "csrc").rglob(ext):
            code = re.sub(r"/\*.*?\*/|//[^\n]*", " ", p.read_text(encoding="utf-8"), flags=re.S)
            hits += [f"{p.relative_to(REPO)}: {lit}" for lit in re.findall(r'"(?:[^"\\\n]|\\.)*"', code)
                     if advice.search(lit)]
    assert not hits


def test_out_of_memory_while_training_advises_training_once(tiny, monkeypatch, capsys):
    def engine_oom(self, *args, **kwargs):  # a real engine error: activations for 4M tokens
        ids = np.zeros((1, 1 << 22), np.int32)
        return self.engine.forward_backward(ids, ids)

    monkeypatch.setattr(FalconModel, "forward_backward", engine_oom)
    line = _error_line(["finetune", f"--model={tiny['model']}", f"--dataset={tiny['data']}",
                        f"--lora_out_dir={tiny['out']}", "--backend=cpu", "--epochs=1", "--val_set_size=0"], capsys)
    assert "MiB of activations for 4194304 tokens" in line
    assert line.count("out of memory") == 1
    for flag in ("--mbatch_size", "--cutoff_len", "--gradient_checkpointing"):
        assert line.count(flag) == 1
    assert "max_new_tokens" not in line


def test_cache_too_large_while_generating_gives_no_training_advice(tiny, monkeypatch, capsys):
    def engine_refuses(self, *args, **kwargs):  # a real engine error: a KV cache of 2^20 x 2^20 tokens
        self.engine.cache_init(1 << 20, 1 << 20)  # (refused by the engine's size limit before any allocation)

    monkeypatch.setattr(FalconModel, "generate", engine_refuses)
    line = _error_line(["generate", f"--model={tiny['model']}", "--prompt=Bonjour", "--backend=cpu"], capsys)
    assert "1048576 rows x 1048576 tokens" in line and line.count("2^31 - 1") == 1
    assert not [w for w in TRAINING_WORDS if w in line]


def test_other_errors_get_no_memory_advice(tiny, capsys):
    line = _error_line(["generate", f"--model={tiny['model']}", "--backend=cpu", "--prompt=x", "--num_beams=0"],
                       capsys)
    assert "--max_new_tokens" not in line and not [w for w in TRAINING_WORDS if w in line]
    plain = cli._message(MemoryError("cannot allocate 2 GiB"), "check-dataset")
    assert plain == "out of memory (cannot allocate 2 GiB)"
