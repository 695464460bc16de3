"""Training loop: schedule, loss going down, checkpoints, rotation, exact resume, Ctrl-C,
--lora_apply_dir, fp16 loss scaling, divergence, merged checkpoints. CPU only, fast."""
from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import falcontune as ft
from falcontune import checkpoint as ckpt
from falcontune import testing
from falcontune.data import TokenizedDataset, make_prompt
from falcontune.demo import demo_model_dir
from falcontune.tokenizer import train_demo_tokenizer
from falcontune.trainer import (FinetuneConfig, FinetuneResult, Trainer, TrainingDivergedError, _Console, _Data,
                                check_world_size, lr_lambda)
from falcontune.weights import WeightStore

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "datasets" / "fr_instructions.json"


# ---------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny 7B-style model with a 512-token French tokenizer, and a 12-record dataset."""
    root = tmp_path_factory.mktemp("tiny")
    records = json.loads(SAMPLE.read_text(encoding="utf-8"))
    texts = [make_prompt(r["instruction"], r.get("input", ""), r["output"]) for r in records]
    tok = train_demo_tokenizer(texts, vocab_size=512, out_path=root / "tokenizer.json")
    model = testing.make_checkpoint(root / "model", preset="tiny", vocab_size=tok.vocab_size,
                                    tokenizer=root / "tokenizer.json")
    data = root / "data.json"
    data.write_text(json.dumps(records[:12], ensure_ascii=False), encoding="utf-8")
    return {"root": root, "model": model, "data": data}


def _run(tiny: dict[str, Path], out: Path, **kw: Any) -> FinetuneResult:
    args: dict[str, Any] = dict(model=tiny["model"], dataset=tiny["data"], lora_out_dir=out, epochs=2, lr=5e-3,
                                warmup_steps=2, logging_steps=1, save_steps=2, cutoff_len=64, mbatch_size=1,
                                batch_size=2, device="cpu", progress=False)
    args.update(kw)
    return ft.finetune(**args)


def _adapter(d: Path) -> dict[str, np.ndarray]:
    with WeightStore.open(d / "adapter_model.safetensors") as s:
        return {k: np.array(s.tensor(k)) for k in s.names()}


def _without_timing(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    timing = ("tokens_per_second", "eval_runtime", "eval_samples_per_second", "eval_steps_per_second")
    return [{k: v for k, v in r.items() if k not in timing} for r in history if "train_runtime" not in r]


# ---------------------------------------------------------------------------------------------
# schedule and semantics


def test_lr_schedule_is_hf_linear_with_warmup() -> None:
    # HF get_linear_schedule_with_warmup(warmup=5, total=20): step s uses lr * lambda(s)
    assert [lr_lambda(s, 5, 20) for s in range(6)] == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert lr_lambda(10, 5, 20) == pytest.approx(10 / 15)
    assert lr_lambda(20, 5, 20) == 0.0 and lr_lambda(25, 5, 20) == 0.0
    assert lr_lambda(0, 0, 10) == 1.0


def test_loss_goes_down_on_demo_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FALCONTUNE_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "d.json"
    data.write_text(json.dumps(json.loads(SAMPLE.read_text(encoding="utf-8"))[:8], ensure_ascii=False),
                    encoding="utf-8")
    res = ft.finetune(model="demo", dataset=data, lora_out_dir=tmp_path / "out", epochs=4, lr=2e-2,
                      warmup_steps=0, mbatch_size=2, batch_size=2, cutoff_len=96, val_set_size=0,
                      logging_steps=1, save_steps=100, device="cpu", progress=False)
    losses = [r["loss"] for r in res.history if "loss" in r]
    assert len(losses) == res.global_step == res.total_steps == 16
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.5, losses
    assert res.eval_loss is None and res.n_val == 0
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    cache = tmp_path / "cache"
    assert [p.name for p in cache.iterdir()] == [demo_model_dir().name]  # no temporary leftovers


def test_history_log_and_eval_cadence(tiny: dict[str, Path], tmp_path: Path) -> None:
    # 12 records, val 0.2 -> 3 val / 9 train; mbatch 1, batch 2 -> 5 steps per epoch, 10 steps
    res = _run(tiny, tmp_path / "out", logging_steps=3, save_steps=100)
    assert (res.n_train, res.n_val, res.total_steps) == (9, 3, 10)
    logs = [r for r in res.history if "loss" in r]
    assert [r["step"] for r in logs] == [3, 6, 9]
    assert set(logs[0]) == {"loss", "grad_norm", "learning_rate", "epoch", "tokens_per_second", "step"}
    assert logs[0]["epoch"] == pytest.approx(6 / 9)  # 3 steps x 2 micro-batches of 9
    assert logs[0]["learning_rate"] == pytest.approx(5e-3 * lr_lambda(3, 2, 10))
    # falcontune: eval_steps = max(logging_steps, n_records // (10 * mbatch_size)) = 3, plus a final eval
    assert [r["step"] for r in res.history if "eval_loss" in r] == [3, 6, 9, 10]
    assert "train_loss" in res.history[-1]
    lines = (tmp_path / "out" / "log.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(x) for x in lines] == res.history


def test_eval_loss_is_token_mean(tiny: dict[str, Path]) -> None:
    from falcontune.trainer import evaluate
    model = ft.load_model(tiny["model"], device="cpu")
    model.add_lora(r=4, dropout=0.0)
    ids = [np.arange(3, 3 + n, dtype=np.int32) for n in (5, 9, 7)]
    ds = TokenizedDataset(ids, [x.copy() for x in ids], np.zeros(3, np.int64), np.zeros(3, bool))
    loss, _, n_batches = evaluate(model, ds, batch_size=2, pad_id=0)
    sums = [model.forward_backward_count(x[None], x[None]) for x in ids]
    expected = sum(l_ * n for l_, n in sums) / sum(n for _, n in sums)
    assert n_batches == 2 and loss == pytest.approx(expected, rel=1e-4)


# ---------------------------------------------------------------------------------------------
# checkpoints and resume


def test_rotation_keeps_exactly_the_newest(tiny: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = _run(tiny, out, epochs=1, save_steps=1, save_total_limit=2, val_set_size=0, logging_steps=10)
    assert res.total_steps == 6
    names = sorted(p.name for p in out.iterdir())
    assert names == ["adapter_config.json", "adapter_model.safetensors", "checkpoint-5", "checkpoint-6",
                     "log.jsonl"]
    c = ckpt.load_checkpoint(out / "checkpoint-6")
    assert c.step == 6 and c.state["global_step"] == 6 and c.optimizer["step"] == 6
    assert set(c.moments) == {"exp_avg", "exp_avg_sq"} and c.moments["exp_avg"]
    assert c.state["rng"]["counter"] == 12  # one dropout draw per micro-batch
    # the final adapter equals the last checkpoint's
    last, final = _adapter(out / "checkpoint-6"), _adapter(out)
    assert all(np.array_equal(last[k], final[k]) for k in final)


def test_resume_is_bit_exact(tiny: dict[str, Path], tmp_path: Path) -> None:
    a = _run(tiny, tmp_path / "a")
    b = _run(tiny, tmp_path / "b", callback=lambda info: info["step"] == 3)
    assert b.interrupted and b.global_step == 3 and (tmp_path / "b" / "checkpoint-3").is_dir()
    c = _run(tiny, tmp_path / "b", resume_checkpoint="latest")
    assert not c.interrupted and c.global_step == a.global_step == 10
    A, C = _adapter(tmp_path / "a"), _adapter(tmp_path / "b")
    assert A.keys() == C.keys() and all(np.array_equal(A[k], C[k]) for k in A)
    assert _without_timing(a.history) == _without_timing(c.history)
    lines = [json.loads(x) for x in (tmp_path / "b" / "log.jsonl").read_text(encoding="utf-8").splitlines()]
    assert _without_timing(lines) == _without_timing(a.history)


def test_resume_from_explicit_checkpoint_dir(tiny: dict[str, Path], tmp_path: Path) -> None:
    a = _run(tiny, tmp_path / "a", epochs=1)
    _run(tiny, tmp_path / "b", epochs=1, callback=lambda info: info["step"] == 2)
    c = _run(tiny, tmp_path / "c", epochs=1, resume_checkpoint=str(tmp_path / "b" / "checkpoint-2"))
    A, C = _adapter(tmp_path / "a"), _adapter(tmp_path / "c")
    assert all(np.array_equal(A[k], C[k]) for k in A)
    assert c.global_step == a.global_step


def test_resolve_resume(tmp_path: Path) -> None:
    assert ckpt.resolve_resume(None, tmp_path) is None
    assert ckpt.resolve_resume("false", tmp_path) is None
    with pytest.raises(FileNotFoundError, match="no checkpoint-N"):
        ckpt.resolve_resume("true", tmp_path)
    with pytest.raises(FileNotFoundError, match="not found"):
        ckpt.resolve_resume(str(tmp_path / "nope"), tmp_path)
    for step in (2, 10, 4):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / ckpt.STATE_FILE).write_text("{}")
    (tmp_path / ".checkpoint-12.tmp-1-ab").mkdir()  # an unfinished write is never picked
    assert ckpt.resolve_resume("latest", tmp_path) == tmp_path / "checkpoint-10"
    assert ckpt.resolve_resume(True, tmp_path) == tmp_path / "checkpoint-10"
    assert ckpt.resolve_resume(str(tmp_path), tmp_path) == tmp_path / "checkpoint-10"
    with pytest.raises(ckpt.CheckpointError, match="missing trainer_state.json"):
        ckpt.load_checkpoint(tmp_path / ".checkpoint-12.tmp-1-ab")


def test_checkpoint_writes_are_atomic(tiny: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = ft.load_model(tiny["model"], device="cpu")
    model.add_lora(r=2)
    state = {"global_step": 7, "run_id": "r"}
    first = ckpt.save_checkpoint(tmp_path, 7, model, {"step": 0}, model.optimizer_state(), state)
    again = ckpt.save_checkpoint(tmp_path, 7, model, {"step": 1}, model.optimizer_state(), state)  # replaced
    assert first == again and [p.name for p in tmp_path.iterdir()] == ["checkpoint-7"]
    assert ckpt.load_checkpoint(again).optimizer["step"] == 1

    def disk_full(*args: Any, **kwargs: Any) -> None:
        raise OSError("No space left on device")

    monkeypatch.setattr(ckpt, "save_safetensors", disk_full)
    with pytest.raises(OSError, match="No space"):
        ckpt.save_checkpoint(tmp_path, 8, model, {"step": 0}, model.optimizer_state(), state)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-7"]  # nothing half-written left


def test_sigint_stops_between_steps_and_saves(tiny: dict[str, Path], tmp_path: Path) -> None:
    def press_ctrl_c(info: dict[str, Any]) -> None:
        if info["step"] == 2:
            os.kill(os.getpid(), signal.SIGINT)

    out = tmp_path / "out"
    before = signal.getsignal(signal.SIGINT)
    res = _run(tiny, out, save_steps=100, callback=press_ctrl_c)
    assert res.interrupted and res.global_step == 2
    assert (out / "checkpoint-2" / "trainer_state.json").is_file()
    assert (out / "adapter_model.safetensors").is_file()
    assert signal.getsignal(signal.SIGINT) is before  # handler restored
    again = _run(tiny, out, save_steps=100, resume_checkpoint=True)
    assert again.global_step == 10 and not again.interrupted


def test_keyboard_interrupt_between_steps_saves(tiny: dict[str, Path], tmp_path: Path) -> None:
    def interrupt(info: dict[str, Any]) -> None:
        if info["step"] == 3:
            raise KeyboardInterrupt

    res = _run(tiny, tmp_path / "out", save_steps=100, callback=interrupt)
    assert res.interrupted and res.global_step == 3
    assert (tmp_path / "out" / "checkpoint-3").is_dir()


def test_lora_apply_dir(tiny: dict[str, Path], tmp_path: Path) -> None:
    first = _run(tiny, tmp_path / "first", lr=2e-2, epochs=2)
    copy = _run(tiny, tmp_path / "copy", lora_apply_dir=tmp_path / "first", skip=True)
    assert copy.global_step == 0
    A, B = _adapter(tmp_path / "first"), _adapter(tmp_path / "copy")
    assert all(np.array_equal(A[k], B[k]) for k in A)
    again = _run(tiny, tmp_path / "again", lr=2e-2, epochs=1, lora_apply_dir=tmp_path / "first")
    fresh_first_loss = [r["loss"] for r in first.history if "loss" in r][0]
    applied_first_loss = [r["loss"] for r in again.history if "loss" in r][0]
    assert applied_first_loss < fresh_first_loss - 0.1


def test_errors_before_loading(tiny: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the API names its parameters; the command (test_cli) names flags
    with pytest.raises(ValueError, match="multiple of mbatch_size=2"):
        _run(tiny, tmp_path / "o", mbatch_size=2, batch_size=3)
    with pytest.raises(ValueError, match="lora_dropout=1.5"):
        _run(tiny, tmp_path / "o", lora_dropout=1.5)
    with pytest.raises(ValueError, match="dataset is required"):
        _run(tiny, tmp_path / "o", dataset=None)
    with pytest.raises(ValueError, match="multi-GPU"):
        check_world_size(1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="WORLD_SIZE=2"):
        _run(tiny, tmp_path / "o")


# ---------------------------------------------------------------------------------------------
# fp16 loss scaling and divergence (a fake engine: the real CPU engine computes in float32)


class _FakeEngine:
    def __init__(self, norms: list[float]) -> None:
        self.norms = list(norms)
        self.rng = (0, 0)

    def adamw_step(self, **kw: Any) -> float:
        return self.norms.pop(0) if self.norms else 0.5

    def get_rng(self) -> tuple[int, int]:
        return self.rng

    def set_rng(self, seed: int, counter: int) -> None:
        self.rng = (seed, counter)


class _FakeModel:
    def __init__(self, dtype: str, norms: list[float], loss: float = 2.0) -> None:
        self.dtype, self.engine, self.loss, self.training = dtype, _FakeEngine(norms), loss, False
        self.grad_scales: list[float] = []

    def zero_grad(self) -> None:
        pass

    def forward_backward(self, ids: Any, labels: Any, mask: Any = None, grad_scale: float = 1.0) -> float:
        self.grad_scales.append(grad_scale)
        return self.loss

    def train(self, mode: bool = True) -> "_FakeModel":
        self.training = mode
        return self


def _fake_trainer(model: _FakeModel, tmp_path: Path) -> Trainer:
    ids = [np.arange(1, 9, dtype=np.int32) for _ in range(8)]
    ds = TokenizedDataset(ids, [x.copy() for x in ids], np.zeros(8, np.int64), np.zeros(8, bool))
    s = FinetuneConfig(model="fake", lora_out_dir=tmp_path, mbatch_size=1, batch_size=2, epochs=1, lr=1e-3,
                       warmup_steps=0, save_steps=100, save_total_limit=None, logging_steps=100, eval_steps=None,
                       seed=0)
    return Trainer(model, _Data(ds, None, 8, "x"), s, _Console(), 0, {}, progress=False)


def test_fp16_dynamic_loss_scaling(tmp_path: Path) -> None:
    model = _FakeModel("float16", [math.inf, math.nan, 1.0])
    t = _fake_trainer(model, tmp_path)
    assert t.scale == 2.0 ** 16
    loss, tokens = t._step([np.array([0]), np.array([1])])
    assert (loss, tokens) == (2.0, 16)
    assert t.scale == 2.0 ** 14  # halved twice, the step redone each time
    assert model.grad_scales == [2.0 ** 15] * 2 + [2.0 ** 14] * 2 + [2.0 ** 13] * 2  # scale / micro-batches
    assert t.opt.step_count == 1 and t.opt.skipped_steps == 2
    t.good_steps = 1999
    t._step([np.array([2]), np.array([3])])
    assert t.scale == 2.0 ** 15 and t.good_steps == 0  # doubled after 2000 good steps


def test_fp16_persistent_overflow_stops(tmp_path: Path) -> None:
    t = _fake_trainer(_FakeModel("float16", [math.inf] * 20), tmp_path)
    with pytest.raises(TrainingDivergedError, match="Lower the learning rate"):
        t._step([np.array([0]), np.array([1])])


def test_divergence_stops_with_advice(tmp_path: Path) -> None:
    t = _fake_trainer(_FakeModel("float32", [], loss=3e4), tmp_path)
    with pytest.raises(TrainingDivergedError, match=r"exceeded 10000.*--lr=0\.0001"):
        t._step([np.array([0])])
    t = _fake_trainer(_FakeModel("float32", [math.nan] * 20), tmp_path)
    for _ in range(9):
        t._step([np.array([0])])  # non-finite norm: the update is skipped, the step counts
    with pytest.raises(TrainingDivergedError, match="10 steps in a row"):
        t._step([np.array([0])])
    assert t.scale == 1.0


# ---------------------------------------------------------------------------------------------
# merged checkpoint (-c)


def test_merge_matches_ours_and_loads_in_transformers(tiny: dict[str, Path], tmp_path: Path) -> None:
    from falcontune.merge import merge_and_save

    model = ft.load_model(tiny["model"], device="cpu")
    model.add_lora(r=4, alpha=8, target_modules=["query_key_value", "dense_4h_to_h"])
    model.load_lora_state_dict(testing.random_lora(model.config, 4, ["query_key_value", "dense_4h_to_h"], seed=3))
    one = merge_and_save(model, tmp_path / "one")
    sharded = merge_and_save(model, tmp_path / "sharded", max_shard_bytes=40_000)
    assert (one / "model.safetensors").is_file() and (one / "tokenizer.json").is_file()
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    cfg = json.loads((one / "config.json").read_text())
    assert cfg["model_type"] == "falcon" and cfg["torch_dtype"] == "float16"
    with WeightStore.open(one / "model.safetensors") as s:
        w = s.tensor("transformer.h.0.self_attention.query_key_value.weight")
        assert s.dtype("transformer.h.0.self_attention.query_key_value.weight") == "F16"
        assert w.shape == (model.config.qkv_out, model.config.hidden_size)  # nn.Linear: [out, in]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    ids = np.array([[5, 100, 200, 300, 17, 42, 7, 8, 9, 10]])
    model.eval()
    ours = model.forward(ids)
    for d in (one, sharded):
        hf = transformers.FalconForCausalLM.from_pretrained(d, dtype=torch.float32)
        with torch.no_grad():
            theirs = hf(torch.tensor(ids)).logits.numpy()
        assert np.linalg.norm(ours - theirs) / np.linalg.norm(ours) < 5e-3


def test_disk_full_during_a_checkpoint_keeps_earlier_ones(tiny: dict[str, Path], tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC while writing checkpoint-4: a clear OSError, checkpoint-2 intact and resumable,
    nothing half-written left in the output directory."""
    import errno

    from falcontune import lora_io

    real = lora_io.save_safetensors
    calls = {"n": 0}

    def full_after_first(path: Any, *a: Any, **k: Any) -> Any:
        calls["n"] += 1
        if calls["n"] > 1:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, *a, **k)

    monkeypatch.setattr(lora_io, "save_safetensors", full_after_first)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="No space left"):
        _run(tiny, out, epochs=2, save_steps=2)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith((".checkpoint", "checkpoint"))) == ["checkpoint-2"]
    monkeypatch.setattr(lora_io, "save_safetensors", real)
    state = ckpt.load_checkpoint(out / "checkpoint-2")
    assert state is not None
    res = _run(tiny, out, epochs=2, save_steps=2, resume_checkpoint=str(out / "checkpoint-2"))
    assert (res.adapter_dir / "adapter_model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------
# issue 15: honest rates, file modes, the signature, cutoff_len, curves


def test_rates_are_those_of_each_run_after_ctrl_c_and_resume(tiny: dict[str, Path], tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """train_steps_per_second in log.jsonl is the steps of THAT run over its own time (within 20% of
    steps / wall time of the call), for an interrupted run, its resume, and a resume of a finished run."""
    import time

    import falcontune.trainer as trainer

    monkeypatch.setattr(trainer, "_write_plot", lambda out_dir, say: None)  # drawn after the run: not timed

    def press_ctrl_c(info: dict[str, Any]) -> None:
        if info["step"] == 24:
            os.kill(os.getpid(), signal.SIGINT)

    out = tmp_path / "out"
    kw: dict[str, Any] = dict(epochs=8, save_steps=8, logging_steps=8, val_set_size=0)  # 48 steps
    runs = []
    for extra in ({"callback": press_ctrl_c}, {"resume_checkpoint": True}, {"resume_checkpoint": True}):
        t0 = time.perf_counter()
        res = _run(tiny, out, **kw, **extra)
        runs.append((res, time.perf_counter() - t0))
    (first, wall1), (second, wall2), (third, _) = runs
    assert first.interrupted and first.global_step == 24 and second.global_step == third.global_step == 48
    log = [json.loads(x) for x in (out / "log.jsonl").read_text(encoding="utf-8").splitlines()]
    for steps, res, wall in ((24, first, wall1), (24, second, wall2)):
        rate = res.history[-1]["train_steps_per_second"]
        assert abs(rate - steps / wall) <= 0.2 * steps / wall, (rate, steps, wall)
        assert res.history[-1]["train_samples_per_second"] == pytest.approx(2 * steps / res.history[-1]["train_runtime"])
    assert log[-1]["train_steps_per_second"] == 0.0 and log[-1]["train_samples_per_second"] == 0.0  # nothing left


def test_every_written_file_is_0644(tiny: dict[str, Path], tmp_path: Path) -> None:
    """adapter_config.json is created like the other files (0666 minus the umask), in the adapter and
    in every checkpoint."""
    old = os.umask(0o022)
    try:
        _run(tiny, tmp_path / "out", epochs=1, save_steps=2)
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert any(p.name == "adapter_config.json" and p.parent.name.startswith("checkpoint-") for p in files)
    modes = {str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777) for p in files}
    assert set(modes.values()) == {"0o644"}, modes


def test_finetune_signature_is_visible_and_derived_from_the_config() -> None:
    import dataclasses
    import inspect

    sig = inspect.signature(ft.finetune)
    params = list(sig.parameters.values())
    assert [p.name for p in params[:2]] == ["model", "dataset"]
    assert params[0].default is inspect.Parameter.empty
    assert {"epochs", "lr", "cutoff_len", "callback", "progress"} <= set(sig.parameters)
    for f in dataclasses.fields(FinetuneConfig):  # same names and defaults as the one dataclass
        default = inspect.Parameter.empty if f.default is dataclasses.MISSING else f.default
        assert sig.parameters[f.name].default == default, f.name
    assert sig.parameters["epochs"].default == 3 and sig.parameters["lr"].default == 2e-4
    assert "cutoff_len : int, default 256" in ft.finetune.__doc__
    with pytest.raises(TypeError, match="'epoch'.*did you mean 'epochs'"):
        ft.finetune("demo", epoch=1)


def test_config_is_frozen_validated_and_normalized(tmp_path: Path) -> None:
    cfg = FinetuneConfig(model="m", lora_out_dir=tmp_path, target_modules='["dense", "query_key_value"]',
                         save_total_limit=0, data_type="gpt4all", lr=1)
    assert cfg.target_modules == ("query_key_value", "dense") and cfg.save_total_limit is None
    assert cfg.train_on_inputs is False and cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.out_dir == tmp_path and cfg.accumulation == 2
    with pytest.raises(dataclasses_frozen_error()):
        cfg.epochs = 2  # type: ignore[misc]
    run = cfg.run_settings()
    assert run["target_modules"] == ["query_key_value", "dense"] and "logging_steps" not in run
    assert json.loads(json.dumps(run)) == run
    with pytest.raises(ft.ParameterError, match=r"^epochs=0: expected an integer >= 1$") as e:
        FinetuneConfig(model="m", epochs=0)
    assert e.value.as_flags() == "--epochs=0: expected an integer >= 1"
    with pytest.raises(ft.ParameterError, match="target_modules=.*q_proj"):
        FinetuneConfig(model="m", target_modules=["q_proj"])


def dataclasses_frozen_error() -> type:
    import dataclasses
    return dataclasses.FrozenInstanceError


def test_demo_model_positional_with_the_bundled_sample(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ft.finetune("demo") takes the model positionally and trains on the French sample."""
    monkeypatch.setenv("FALCONTUNE_CACHE", str(tmp_path / "cache"))
    res = ft.finetune("demo", lora_out_dir=tmp_path / "out", epochs=1, cutoff_len=384, val_set_size=0,
                      progress=False, device="cpu", callback=lambda info: info["step"] == 2)
    assert res.interrupted and res.global_step == 2 and res.n_train == 174


def test_cutoff_len_that_keeps_no_answer_is_an_error(tiny: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ft.ParameterError, match=r"cutoff_len=3 is too small.*shortest prompt has \d+ tokens"):
        _run(tiny, tmp_path / "o", cutoff_len=3)
    assert not (tmp_path / "o").exists()  # nothing trained, nothing written


def test_training_leaves_the_curves_next_to_the_log(tiny: dict[str, Path], tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    _run(tiny, tmp_path / "out", epochs=1, save_steps=100)
    png = tmp_path / "out" / "training_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_untrained_demo_model_starts_near_a_uniform_guess(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The demo model's logits start small: its loss on the sample is near ln(vocab) (a uniform guess),
    not ~16 as with the unscaled random head. A changed recipe gets a new cache directory."""
    from falcontune import demo
    from falcontune.data import collate, load_records, tokenize_records

    monkeypatch.setenv("FALCONTUNE_CACHE", str(tmp_path / "cache"))
    model = ft.load_model("demo", device="cpu")
    ds = tokenize_records(load_records(SAMPLE)[:24], model.tokenizer, cutoff_len=384)
    batch = collate(ds, np.arange(len(ds)), 0)
    loss, _ = model.loss(batch["input_ids"], batch["labels"], batch["attention_mask"])
    assert abs(loss - math.log(model.config.vocab_size)) < 1.0, loss
    first = demo_model_dir()
    monkeypatch.setattr(demo, "DEMO_FINAL_NORM_SCALE", 0.5)
    assert demo_model_dir() != first and (tmp_path / "cache").is_dir()  # rebuilt, not the stale one
    assert json.loads((demo_model_dir() / "DEMO.json").read_text())["final_norm_scale"] == 0.5
