"""Chat data (OpenAI and ShareGPT records, chat templates, assistant-only labels) and raw-text data
(.txt documents, windows): validation with record numbers, rendering as Hugging Face renders it,
token spans, check-dataset, finetune and generate --chat."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import falcontune as ft
from falcontune import cli, testing
from falcontune.chat import (CHATML_TEMPLATE, FALCON_TEMPLATE, ChatTemplate, ChatTemplateError, chat_pieces,
                             encode_chat, resolve_template, tokenize_conversations)
from falcontune.data import IGNORE_INDEX, DatasetError, check_dataset, load_records, make_prompt, tokenize_records
from falcontune.textdata import read_txt
from falcontune.tokenizer import Tokenizer, train_demo_tokenizer

REPO = Path(__file__).resolve().parent.parent
OPENAI = REPO / "datasets" / "fr_chat.jsonl"
SHAREGPT = REPO / "datasets" / "fr_chat_sharegpt.json"
TEXTS = REPO / "datasets" / "fr_textes.txt"
SAMPLE = REPO / "datasets" / "fr_instructions.json"

CONV = [{"role": "system", "content": "Tu es un assistant."},
        {"role": "user", "content": "Bonjour, où est la gare ?"},
        {"role": "assistant", "content": "Au bout de la rue, à gauche."},
        {"role": "user", "content": "Merci !"},
        {"role": "assistant", "content": "Avec plaisir, bonne journée."}]


def _write(path: Path, records: list[Any], jsonl: bool = True) -> Path:
    if jsonl:
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    else:
        path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny model whose 512-token tokenizer was trained on French instructions and chats."""
    root = tmp_path_factory.mktemp("chat")
    records = json.loads(SAMPLE.read_text(encoding="utf-8"))
    texts = [make_prompt(r["instruction"], r.get("input", ""), r["output"]) for r in records]
    texts += [m["content"] for r in load_records(OPENAI, "chat") for m in r["messages"]]
    tok = train_demo_tokenizer(texts, vocab_size=512, out_path=root / "tokenizer.json")
    model = testing.make_checkpoint(root / "model", preset="tiny", vocab_size=tok.vocab_size,
                                    tokenizer=root / "tokenizer.json")
    return {"root": root, "model": model, "tok": tok}


# ---------------------------------------------------------------------------------------------
# records


def test_both_shapes_load_as_openai_messages() -> None:
    openai = load_records(OPENAI, "chat")
    sharegpt = load_records(SHAREGPT, "chat")
    assert len(openai) == 6 and len(sharegpt) == 6
    assert {r["format"] for r in openai} == {"openai"} and {r["format"] for r in sharegpt} == {"sharegpt"}
    raw = json.loads(SHAREGPT.read_text(encoding="utf-8"))[1]["conversations"]
    assert [m["role"] for m in sharegpt[1]["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert [m["content"] for m in sharegpt[1]["messages"]] == [t["value"] for t in raw]


@pytest.mark.parametrize("record, words", [
    ({"messages": []}, "empty conversation"),
    ({"conversations": []}, "empty conversation"),
    ({"messages": [{"role": "bot", "content": "x"}]}, "message 1: unknown role 'bot'; expected system, user, assistant"),
    ({"conversations": [{"from": "human", "value": "x"}, {"from": "assistant", "value": "y"}]},
     "message 2: unknown role 'assistant'; expected system, human, gpt"),
    ({"messages": [{"role": "user", "content": None}]}, "message 1 (user): 'content' is null"),
    ({"messages": ["bonjour"]}, "message 1 is a string"),
    ({"messages": "bonjour"}, "field 'messages' is a string"),
    ({"messages": [], "conversations": []}, "has both"),
    ({"instruction": "x", "output": "y"}, "use --data_type=alpaca"),
    ([1, 2], "expected a JSON object"),
])
def test_bad_chat_record_is_named_by_number(tmp_path: Path, record: Any, words: str) -> None:
    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    if isinstance(record, dict) and list(record) == ["conversations"]:  # a ShareGPT file
        good = {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}
    path = _write(tmp_path / "d.jsonl", [good, good, record])
    with pytest.raises(DatasetError, match="record 3") as ei:
        load_records(path, "chat")
    assert words in str(ei.value) and "\n" not in str(ei.value)
    report = check_dataset(path, "chat")
    assert not report.ok and report.errors[0][0] == 3 and words in report.errors[0][1]
    assert report.n_valid == 2


def test_mixed_shapes_in_one_file(tmp_path: Path) -> None:
    a = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    b = {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}
    report = check_dataset(_write(tmp_path / "d.json", [a, a, b, a], jsonl=False), "chat")
    assert report.errors == [(3, "(line 1) mixed shapes: this record uses 'conversations' but record 1 uses "
                                 "'messages'; one shape per file")]


# ---------------------------------------------------------------------------------------------
# templates


def test_falcon_template_text() -> None:
    t = ChatTemplate("falcon", FALCON_TEMPLATE, {"eos_token": "<|endoftext|>"})
    assert t.render(CONV) == ("System: Tu es un assistant.\nUser: Bonjour, où est la gare ?\nAssistant: Au bout de "
                              "la rue, à gauche.<|endoftext|>\nUser: Merci !\nAssistant: Avec plaisir, bonne "
                              "journée.<|endoftext|>")
    assert t.render(CONV[:2], add_generation_prompt=True).endswith("gare ?\nAssistant:")
    assert t.render([], add_generation_prompt=True) == "Assistant:"


# a template written for this test in the style of common Hub templates: a system prompt folded into the
# first user turn, raise_exception on bad alternation, bos/eos tokens, whitespace control, loop controls,
# tojson with non-ASCII text
HUB_STYLE = """{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}{% set turns = messages[1:] %}
{% else %}{% set system = '' %}{% set turns = messages %}{% endif %}
{% for m in turns %}
    {% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{ raise_exception('Conversation roles must alternate user/assistant/user/...') }}
    {% endif %}
    {% if m['role'] == 'user' %}
        {{ bos_token }}[Q] {% if loop.first and system %}({{ system | trim }}) {% endif %}{{ m['content'] | trim }}
    {% else %}
 [R] {{ m['content'] | trim }}{{ eos_token }}
    {% endif %}
    {% if loop.index > 50 %}{% break %}{% endif %}
{% endfor %}
{% if add_generation_prompt %} [R]{% endif %}
{% if false %}{{ turns | tojson }}{% endif %}"""


@pytest.mark.parametrize("source", [FALCON_TEMPLATE, CHATML_TEMPLATE, HUB_STYLE, "{{ messages | tojson }}"],
                         ids=["falcon", "chatml", "hub-style", "tojson"])
def test_rendering_matches_hugging_face(shared_data: Path, source: str) -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(shared_data / "falcon" / "tokenizer.json"),
                                             eos_token="<|endoftext|>", bos_token=">>ABSTRACT<<")
    ours = ChatTemplate("t", source, {"eos_token": "<|endoftext|>", "bos_token": ">>ABSTRACT<<"})
    convs = [CONV, CONV[1:], [{"role": "user", "content": "  «Ça va ?»  "}]]
    for conv in convs:
        for k in range(1, len(conv) + 1):
            for gen in (False, True):
                want = hf.apply_chat_template(conv[:k], chat_template=source, tokenize=False,
                                              add_generation_prompt=gen)
                assert ours.render(conv[:k], add_generation_prompt=gen) == want
        ids = hf.apply_chat_template(conv, chat_template=source, tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        tok = Tokenizer.from_file(shared_data / "falcon" / "tokenizer.json")
        assert tok.encode(ours.render(conv)) == list(ids)
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    if source == HUB_STYLE:
        with pytest.raises(Exception, match="Conversation roles must alternate"):
            hf.apply_chat_template(bad, chat_template=source, tokenize=False)
        with pytest.raises(ChatTemplateError, match="failed to render: Conversation roles must alternate"):
            ours.render(bad)


def test_hub_globals() -> None:
    import datetime

    t = ChatTemplate("date", "{{ strftime_now('%Y') }}")
    assert t.render([]) == str(datetime.date.today().year)


def test_help_documents_the_flags(capsys: pytest.CaptureFixture[str]) -> None:
    for command, flags in (("finetune", ("--data_type", "chat", "text", "--chat_template", "--packing")),
                           ("check-dataset", ("--data_type", "chat", "text", "--chat_template")),
                           ("generate", ("--chat", "--chat_template"))):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        text = capsys.readouterr().out
        assert all(f in text for f in flags), command


def test_template_errors_are_one_line() -> None:
    with pytest.raises(ChatTemplateError, match=r"chat template broken: syntax error at line 1"):
        ChatTemplate("broken", "{% for m in messages %}").render(CONV)
    with pytest.raises(ChatTemplateError, match="failed to render"):
        ChatTemplate("undef", "{{ messages[0].nope.deeper }}").render(CONV)
    with pytest.raises(ChatTemplateError, match="failed to render: TypeError"):
        ChatTemplate("types", "{{ messages[0]['content'] + 1 }}").render(CONV)
    with pytest.raises(ChatTemplateError, match="access to attribute"):  # the sandbox
        ChatTemplate("sandbox", "{{ messages.__class__.__mro__ }}").render(CONV)


def test_assistant_spans_and_labels_with_the_real_tokenizer(shared_data: Path) -> None:
    tok = Tokenizer.from_file(shared_data / "falcon" / "tokenizer.json")
    ds = tokenize_conversations([{"messages": CONV}], tok, cutoff_len=None)
    ids, labels = ds.input_ids[0], ds.labels[0]
    template = resolve_template(None, tok)
    assert template.name == "falcon (built-in)"
    # cut by prefix renderings: the same ids as encoding the whole text at once
    assert ids.tolist() == tok.encode(template.render(CONV))
    learned = labels[labels != IGNORE_INDEX]
    assert tok.decode(learned, skip_special_tokens=False) == (" Au bout de la rue, à gauche.<|endoftext|>"
                                                              " Avec plaisir, bonne journée.<|endoftext|>")
    assert (learned == tok.eos_token_id).sum() == 2
    # the prompt of each assistant turn is what generation encodes
    for i in (2, 4):
        prompt = encode_chat(template, CONV[:i], tok)
        assert ids[:len(prompt)].tolist() == prompt
        assert labels[len(prompt) - 1] == IGNORE_INDEX and labels[len(prompt)] != IGNORE_INDEX
    assert ds.prompt_lengths[0] == len(encode_chat(template, CONV[:2], tok))
    # train_on_inputs: every token; cutoff: cut and flagged
    every = tokenize_conversations([{"messages": CONV}], tok, cutoff_len=None, train_on_inputs=True)
    assert every.labels[0].tolist() == ids.tolist()
    cut = tokenize_conversations([{"messages": CONV}], tok, cutoff_len=10)
    assert cut.lengths.tolist() == [10] and cut.truncated.tolist() == [True]


def test_eos_appended_when_the_template_has_none(shared_data: Path) -> None:
    tok = Tokenizer.from_file(shared_data / "falcon" / "tokenizer.json")
    ds = tokenize_records([{"messages": CONV}], tok, "chat", cutoff_len=None, train_on_inputs=False,
                          chat_template="chatml")
    labels = ds.labels[0]
    learned = tok.decode(labels[labels != IGNORE_INDEX], skip_special_tokens=False)
    assert learned == ("Au bout de la rue, à gauche.<|im_end|>\n<|endoftext|>"
                       "Avec plaisir, bonne journée.<|im_end|>\n<|endoftext|>")
    # the EOS is in the history of the next turn too, as generation encodes it
    prompt = encode_chat(resolve_template("chatml", tok), CONV[:4], tok)
    assert ds.input_ids[0][:len(prompt)].tolist() == prompt


def test_template_that_rewrites_earlier_turns_is_refused() -> None:
    # the last message is rendered differently: a prefix rendering is not a prefix of the whole
    source = "{% for m in messages %}{{ m['role'] }}{% if loop.last %}!{% endif %}: {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(ChatTemplateError, match="assistant turn 3 cannot be located"):
        chat_pieces(ChatTemplate("rewrites", source), CONV)


def _tokenizer_dir(tmp_path: Path, tok: Tokenizer, config: dict[str, Any] | None) -> Tokenizer:
    tmp_path.mkdir(parents=True, exist_ok=True)
    tok.save(tmp_path / "tokenizer.json")
    if config is not None:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return Tokenizer.from_file(tmp_path / "tokenizer.json")


def test_template_resolution(tmp_path: Path, tiny: dict[str, Any]) -> None:
    tok = tiny["tok"]
    own = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}{{ bos_token }}"
    t = resolve_template(None, _tokenizer_dir(tmp_path / "a", tok, {"chat_template": own,
                                                                    "bos_token": {"content": "<s>"}}))
    assert t.name.endswith("tokenizer_config.json") and t.render(CONV[1:2]) == "<user>Bonjour, où est la gare ?<s>"
    named = {"chat_template": [{"name": "tool_use", "template": "x"}, {"name": "default", "template": own}]}
    assert resolve_template(None, _tokenizer_dir(tmp_path / "b", tok, named)).source == own
    assert resolve_template(None, _tokenizer_dir(tmp_path / "c", tok, {"eos_token": "<|endoftext|>"})).name \
        == "falcon (built-in)"
    jinja = tmp_path / "mine.jinja"
    jinja.write_text(own, encoding="utf-8")
    assert resolve_template(str(jinja), tok).source == own
    assert resolve_template(str(tmp_path / "a" / "tokenizer_config.json"), tok).source == own
    assert resolve_template("chatml", tok).source == CHATML_TEMPLATE
    with pytest.raises(ChatTemplateError, match="--chat_template=nope: not a built-in template"):
        resolve_template("nope", tok)
    with pytest.raises(ChatTemplateError, match="no 'chat_template' in this file"):
        resolve_template(str(tmp_path / "c" / "tokenizer_config.json"), tok)


def test_check_dataset_chat(tmp_path: Path, tiny: dict[str, Any]) -> None:
    for path, shape in ((OPENAI, "OpenAI"), (SHAREGPT, "ShareGPT")):
        report = check_dataset(path, "chat", tokenizer=tiny["tok"], cutoff_len=64)
        assert report.ok, report
        text = str(report)
        assert shape in text and "rôles / roles: system" in text and "tokens appris / learned tokens" in text
        assert report.length_max is not None and report.n_truncated == int((np.array(
            tokenize_conversations(load_records(path, "chat"), tiny["tok"], None).lengths) > 64).sum())
    # a template that fails on one record: that record's number, one line
    strict = tmp_path / "strict.jinja"
    strict.write_text("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system "
                      "prompt here') }}{% endif %}{{ m['content'] }}{% endfor %}", encoding="utf-8")
    report = check_dataset(OPENAI, "chat", tokenizer=tiny["tok"], chat_template=str(strict))
    assert [n for n, _ in report.errors] == [1, 4]
    assert all("failed to render: no system prompt here" in msg for _, msg in report.errors)
    assert report.n_valid == 4 and not report.ok
    no_assistant = _write(tmp_path / "q.jsonl", [{"messages": [{"role": "user", "content": "a"}]}])
    assert check_dataset(no_assistant, "chat").warnings[0][0] == 1


# ---------------------------------------------------------------------------------------------
# raw text


def test_txt_documents_and_windows(tmp_path: Path, tiny: dict[str, Any]) -> None:
    raws = read_txt("\n\nPremier document,\nsur deux lignes.\n  \t\nDeuxième.\r\n\r\n\n\nTroisième\n")
    assert [(r.number, r.line, r.value["text"]) for r in raws] == [
        (1, 3, "Premier document,\nsur deux lignes."), (2, 6, "Deuxième."), (3, 10, "Troisième")]
    tok = tiny["tok"]
    records = load_records(TEXTS, "text")
    assert len(records) == 6 and records[0]["text"].startswith("La Loire")
    ds = tokenize_records(records, tok, "text", cutoff_len=32)
    whole = [tok.encode(r["text"]) + [tok.eos_token_id] for r in records]
    assert np.concatenate(ds.input_ids).tolist() == [i for ids in whole for i in ids]  # nothing dropped
    assert ds.lengths.max() == 32 and sum(-(-len(w) // 32) for w in whole) == len(ds)
    assert all(np.array_equal(x, y) for x, y in zip(ds.input_ids, ds.labels))
    same = load_records(_write(tmp_path / "t.jsonl", [{"text": r["text"]} for r in records]), "text")
    assert same == records
    report = check_dataset(TEXTS, "text", tokenizer=tok, cutoff_len=32)
    assert report.ok and f"windows of 32 tokens: {len(ds)}" in str(report)


@pytest.mark.parametrize("record, words", [({"text": ""}, "field 'text' is empty"),
                                           ({"text": 3}, "not a string"),
                                           ({"messages": []}, "use --data_type=chat"),
                                           ({}, "field 'text' is missing")])
def test_bad_text_records(tmp_path: Path, record: Any, words: str) -> None:
    report = check_dataset(_write(tmp_path / "t.jsonl", [{"text": "a"}, record]), "text")
    assert report.errors[0][0] == 2 and words in report.errors[0][1]
    assert not check_dataset(_write(tmp_path / "e.txt", []), "text").ok  # no document


# ---------------------------------------------------------------------------------------------
# the command


def _finetune(tiny: dict[str, Any], out: Path, *flags: str) -> int:
    return cli.main(["finetune", f"--model={tiny['model']}", f"--lora_out_dir={out}", "--epochs=1",
                     "--cutoff_len=64", "--mbatch_size=2", "--batch_size=2", "--val_set_size=2",
                     "--logging_steps=1", "--backend=cpu", "--warmup_steps=1", *flags])


@pytest.mark.parametrize("data", [OPENAI, SHAREGPT], ids=["openai", "sharegpt"])
def test_finetune_chat_both_shapes(tiny: dict[str, Any], tmp_path: Path, data: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["check-dataset", str(data), "--data_type=chat", f"--tokenizer={tiny['root']}"]) == 0
    assert _finetune(tiny, tmp_path / "out", f"--dataset={data}", "--data_type=chat") == 0
    out = capsys.readouterr().out
    assert "chat template falcon (built-in)" in out and "eval_loss" in out
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


def test_finetune_text_on_a_txt(tiny: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _finetune(tiny, tmp_path / "out", f"--dataset={TEXTS}", "--data_type=text", "--cutoff_len=32",
                     "--packing=true") == 0
    out = capsys.readouterr().out
    assert "documents cut into" in out and "packing=True" in out and "packing: " in out
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


def test_chat_errors_exit_2_with_one_line(tiny: dict[str, Any], tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    bad = _write(tmp_path / "b.jsonl", [{"messages": [{"role": "user", "content": "a"}]},
                                         {"messages": [{"role": "robot", "content": "a"}]}])
    assert _finetune(tiny, tmp_path / "out", f"--dataset={bad}", "--data_type=chat") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "record 2" in err and "unknown role 'robot'" in err
    assert _finetune(tiny, tmp_path / "out", f"--dataset={OPENAI}", "--data_type=chat",
                     "--chat_template=missing.jinja") == 2
    assert "--chat_template=missing.jinja" in capsys.readouterr().err
    assert cli.main(["check-dataset", str(bad), "--data_type=chat"]) == 1
    assert "enregistrement / record 2: (line 2) message 1: unknown role 'robot'" in capsys.readouterr().out


def test_generate_chat_uses_the_template(tiny: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    seen: list[list[int]] = []
    real = ft.FalconModel.generate

    def spy(self: Any, *args: Any, **kw: Any) -> Any:
        seen.append(np.asarray(kw["input_ids"])[0].tolist())
        return real(self, *args, **kw)

    monkeypatch.setattr(ft.FalconModel, "generate", spy)
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("Merci !\n\n"))
    assert cli.main(["generate", f"--model={tiny['model']}", "--backend=cpu", "--chat", "--interactive",
                     "--prompt=Bonjour, où est la gare ?", "--max_new_tokens=3"]) == 0
    template = resolve_template(None, tiny["tok"])
    assert seen[0] == encode_chat(template, CONV[1:2], tiny["tok"])
    # the second prompt holds the first exchange: the conversation is kept
    assert len(seen) == 2 and seen[1][:len(seen[0])] == seen[0] and len(seen[1]) > len(seen[0]) + 3


def test_demo_tokenizer_eos_is_special(tiny: dict[str, Any]) -> None:
    # the assistant turns' "<|endoftext|>" text must encode to the EOS id, not to characters
    assert tiny["tok"].encode("a<|endoftext|>")[-1] == tiny["tok"].eos_token_id


# ---------------------------------------------------------------------------------------------
# the packing bar: finetune --packing=true --lr=0 ends with the eval_loss of --packing=false
# (the engine side of packing is tested in test_packing.py)


@pytest.mark.parametrize("data_type", ["alpaca", "chat"])
def test_finetune_packing_lr0_same_eval_loss(tiny: dict[str, Any], tmp_path: Path, data_type: str) -> None:
    data = OPENAI
    if data_type == "alpaca":
        data = tmp_path / "data.json"
        data.write_text(json.dumps(json.loads(SAMPLE.read_text(encoding="utf-8"))[:40]), encoding="utf-8")
    results = {}
    for packing in (False, True):
        results[packing] = ft.finetune(model=tiny["model"], dataset=data, data_type=data_type,
                                       lora_out_dir=tmp_path / str(packing), epochs=1, lr=0.0, cutoff_len=384,
                                       mbatch_size=1, batch_size=1, val_set_size=0.25, warmup_steps=0,
                                       logging_steps=1, save_steps=100, device="cpu", progress=False,
                                       packing=packing)
    unpacked, packed = results[False], results[True]
    assert packed.eval_loss == pytest.approx(unpacked.eval_loss, rel=1e-4)
    assert packed.total_steps < unpacked.total_steps  # fewer rows: fewer steps
    assert (packed.n_train, packed.n_val) == (unpacked.n_train, unpacked.n_val)  # examples, not rows
    assert (tmp_path / "True" / "adapter_model.safetensors").is_file()
