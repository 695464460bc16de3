"""Dataset loading, prompt templates, tokenization, splitting and batching."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from falcontune import data
from falcontune.data import DatasetError
from falcontune.tokenizer import Tokenizer, train_demo_tokenizer

REPO = Path(__file__).resolve().parents[1]
DATASET = REPO / "datasets" / "fr_instructions.json"

ALPACA_EXPECTED = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n"
    "\n"
    "### Instruction:\n"
    "Résume ce texte.\n"
    "\n"
    "### Input:\n"
    "Un texte.\n"
    "\n"
    "### Response:\n"
    "Un résumé."
)

FR_EXPECTED = (
    "Ci-dessous se trouve une instruction qui décrit une tâche, accompagnée d'une entrée qui "
    "apporte un contexte supplémentaire. Rédigez une réponse appropriée à la demande.\n"
    "\n"
    "### Instruction :\n"
    "Résume ce texte.\n"
    "\n"
    "### Entrée :\n"
    "Un texte.\n"
    "\n"
    "### Réponse :\n"
    "Un résumé."
)

RECORDS = [
    {"instruction": "Dis bonjour.", "input": "", "output": "Bonjour !"},
    {"instruction": "Traduis en français.", "input": "Good morning", "output": "Bonjour"},
    {"instruction": "Donne la capitale de la France.", "input": "",
     "output": "La capitale de la France est Paris, sur la Seine."},
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    records = json.loads(DATASET.read_text("utf-8"))
    texts = [data.make_prompt(r["instruction"], r["input"], r["output"]) for r in records]
    return train_demo_tokenizer(texts, vocab_size=1024)


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------ templates
def test_alpaca_template_exact() -> None:
    got = data.make_prompt("Résume ce texte.", "Un texte.", "Un résumé.")
    assert got == ALPACA_EXPECTED
    assert data.TEMPLATES["alpaca"].format("Résume ce texte.", "Un texte.", "Un résumé.") == got


def test_alpaca_template_empty_input_keeps_section() -> None:
    # falcontune keeps "### Input:" followed by an empty line when input is empty
    got = data.make_prompt("Dis bonjour.")
    assert got.endswith("### Instruction:\nDis bonjour.\n\n### Input:\n\n\n### Response:\n")
    assert got.startswith("Below is an instruction that describes a task")


def test_french_template_exact() -> None:
    assert data.make_prompt("Résume ce texte.", "Un texte.", "Un résumé.", template="fr") == FR_EXPECTED
    assert set(data.TEMPLATES) == {"alpaca", "fr"}


def test_unknown_template() -> None:
    with pytest.raises(ValueError, match="alpaca"):
        data.make_prompt("x", template="nope")


def test_split_response() -> None:
    prompt = data.make_prompt("Dis bonjour.")
    assert data.split_response(prompt + " Bonjour !\n") == "Bonjour !"
    assert data.split_response(prompt + "Salut\n### Response:\nencore") == "Salut"
    fr = data.make_prompt("Dis bonjour.", template="fr")
    assert data.split_response(fr + "Bonjour !", "fr") == "Bonjour !"
    assert data.split_response("  pas de marqueur ") == "pas de marqueur"


# -------------------------------------------------------------------- loading
def test_load_json_array(tmp_path: Path) -> None:
    records = [{"instruction": "a", "output": "b"},
               {"instruction": "c", "input": None, "output": "d", "id": 7},
               {"instruction": "e", "input": "f", "output": ""}]
    path = write(tmp_path, "d.json", "\ufeff" + json.dumps(records, indent=2))
    with pytest.warns(data.DatasetWarning, match=r"record 2: unknown field 'id' in 1 record\(s\) is ignored"):
        loaded = data.load_records(path)
    assert loaded == [
        {"instruction": "a", "input": "", "output": "b"},
        {"instruction": "c", "input": "", "output": "d"},
        {"instruction": "e", "input": "f", "output": ""},
    ]


def test_load_jsonl(tmp_path: Path) -> None:
    lines = [json.dumps(r, ensure_ascii=False) for r in RECORDS]
    # blank lines are skipped; U+2028 inside a string is not a line break
    text = lines[0] + "\n\n" + lines[1] + "\r\n" + lines[2] + "\n"
    text += json.dumps({"instruction": "x\u2028y", "output": "z"}, ensure_ascii=False) + "\n"
    path = write(tmp_path, "d.jsonl", text)
    got = data.load_records(path)
    assert got[:3] == RECORDS
    assert got[3]["instruction"] == "x\u2028y"


def test_load_gpt4all(tmp_path: Path) -> None:
    path = write(tmp_path, "g.jsonl", '{"prompt": "p", "response": "r", "source": "s"}\n')
    with pytest.warns(data.DatasetWarning, match="'source'"):
        loaded = data.load_records(path, data_type="gpt4all")
    assert loaded == [{"prompt": "p", "response": "r"}]
    with pytest.raises(DatasetError, match="gpt4all"):
        data.load_records(path, data_type="alpaca")
    with pytest.raises(ValueError, match="data_type"):
        data.load_records(path, data_type="sharegpt")


MALFORMED = [
    # (name, file content, record number, words expected in the message)
    ("syntax.json", '[{"instruction": "a", "output": "b"},\n {"instruction": "a" "output": "b"}]',
     2, ["not valid JSON", "line 2"]),
    ("trailing.json", '[{"instruction": "a", "output": "b"},\n {"instruction": "a", "output": "b"},\n',
     2, ["missing ']'"]),
    ("trailing_comma.json", '[{"instruction": "a", "output": "b"},\n {"instruction": "a", "output": "b"},\n]',
     2, ["trailing comma", "line 2"]),
    ("no_comma.json", '[{"instruction": "a", "output": "b"}\n {"instruction": "a", "output": "b"}]',
     1, ["expected ',' or ']'", "line 2"]),
    ("syntax.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n',
     2, ["not valid JSON", "line 2"]),
    ("type.json", '[{"instruction": "a", "output": "b"}, {"instruction": "a", "output": 3}]',
     2, ["'output'", "a number", "expected a string"]),
    ("input_type.json", '[{"instruction": "a", "input": ["x"], "output": "b"}]',
     1, ["'input'", "an array"]),
    ("missing.json", '[{"instruction": "a", "output": "b"}, {"instruction": "a"}, {"output": "b"}]',
     2, ["'output'", "missing"]),
    ("empty_instruction.json", '[{"instruction": "  ", "output": "b"}]',
     1, ["'instruction'", "empty"]),
    ("not_object.json", '[{"instruction": "a", "output": "b"}, "a string"]',
     2, ["expected a JSON object", "a string"]),
    ("not_object.jsonl", '{"instruction": "a", "output": "b"}\n\n[1, 2]\n',
     2, ["expected a JSON object", "line 3"]),
]


@pytest.mark.parametrize("name,text,record,words", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_records(tmp_path: Path, name: str, text: str, record: int,
                           words: list[str]) -> None:
    path = write(tmp_path, name, text)
    with pytest.raises(DatasetError) as err:
        data.load_records(path)
    msg = str(err.value)
    assert err.value.record == record
    assert msg.startswith(f"{path}: record {record}")
    for w in words:
        assert w in msg, msg


FILE_ERRORS = [
    ("empty.json", "", "empty"),
    ("blank.json", "  \n ", "empty"),
    ("empty_list.json", "[ ]", "empty dataset"),
    ("number.json", "42", "expected a JSON array"),
    ("object.json", '{\n "instruction": "a",\n "output": "b"\n}', "single JSON object"),
    ("after.json", '[{"instruction": "a", "output": "b"}] x', "after the closing"),
]


@pytest.mark.parametrize("name,text,words", FILE_ERRORS, ids=[f[0] for f in FILE_ERRORS])
def test_malformed_files(tmp_path: Path, name: str, text: str, words: str) -> None:
    path = write(tmp_path, name, text)
    with pytest.raises(DatasetError, match=words) as err:
        data.load_records(path)
    assert str(err.value).startswith(str(path))
    assert isinstance(err.value, ValueError)


def test_missing_and_binary_files(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not found"):
        data.load_records(tmp_path / "absent.json")
    path = tmp_path / "latin1.json"
    path.write_bytes('[{"instruction": "été", "output": "b"}]'.encode("latin-1"))
    with pytest.raises(DatasetError, match="UTF-8"):
        data.load_records(path)


def test_first_error_counts_the_others(tmp_path: Path) -> None:
    path = write(tmp_path, "d.json", '[{"instruction": 1, "output": "b"}, {}, {"instruction": "a"}]')
    with pytest.raises(DatasetError, match=r"record 1.*2 more") as err:
        data.load_records(path)
    assert err.value.record == 1


# --------------------------------------------------------------- tokenization
def test_labels_mask_exactly_the_prompt(tok: Tokenizer) -> None:
    ds = data.tokenize_records(RECORDS, tok, cutoff_len=512, train_on_inputs=False)
    for rec, x, y, plen in zip(RECORDS, ds.input_ids, ds.labels, ds.prompt_lengths):
        prompt = tok.encode(data.make_prompt(rec["instruction"], rec["input"]))
        answer = tok.encode(rec["output"])
        assert x.dtype == np.int32 and y.dtype == np.int32
        assert x.tolist() == prompt + answer + [11]
        assert plen == len(prompt)
        assert (y[: len(prompt)] == -100).all()
        assert (y[len(prompt):] == x[len(prompt):]).all()
        assert y[-1] == 11  # EOS is learned
        assert tok.decode(x[len(prompt):]) == rec["output"]
    assert ds.n_truncated == 0 and ds.n_fully_masked == 0


def test_train_on_inputs_and_eos(tok: Tokenizer) -> None:
    ds = data.tokenize_records(RECORDS, tok, cutoff_len=512, train_on_inputs=True)
    for x, y in zip(ds.input_ids, ds.labels):
        assert (x == y).all() and x[-1] == 11 and (x[:-1] != 11).all()
    no_eos = data.tokenize_records(RECORDS, tok, cutoff_len=512, add_eos=False)
    assert [len(a) for a in no_eos.input_ids] == [len(a) - 1 for a in ds.input_ids]
    assert all(a[-1] != 11 for a in no_eos.input_ids)


def test_french_template_tokenization(tok: Tokenizer) -> None:
    ds = data.tokenize_records(RECORDS[:1], tok, template="fr", train_on_inputs=False)
    prompt = tok.encode(data.make_prompt(RECORDS[0]["instruction"], template="fr"))
    assert ds.input_ids[0][: len(prompt)].tolist() == prompt


def test_truncation(tok: Tokenizer) -> None:
    full = data.tokenize_records(RECORDS, tok, cutoff_len=None)
    lengths = full.lengths
    cutoff = int(np.sort(lengths)[1])  # the two shortest fit (one exactly), the longest does not
    assert lengths.max() > cutoff
    ds = data.tokenize_records(RECORDS, tok, cutoff_len=cutoff)
    assert ds.n_truncated == int((lengths > cutoff).sum()) == 1
    for i in range(len(RECORDS)):
        x = ds.input_ids[i]
        if ds.truncated[i]:
            assert len(x) == cutoff and x[-1] != 11  # unfinished answer: no EOS
            assert (x == full.input_ids[i][:cutoff]).all()
        else:
            assert (x == full.input_ids[i]).all() and x[-1] == 11
    # a prompt longer than cutoff_len leaves nothing to learn when inputs are masked
    tiny = data.tokenize_records(RECORDS, tok, cutoff_len=8, train_on_inputs=False)
    assert tiny.n_truncated == 3 and tiny.n_fully_masked == 3
    with pytest.raises(ValueError, match="cutoff_len"):
        data.tokenize_records(RECORDS, tok, cutoff_len=0)


def test_gpt4all_tokenization(tok: Tokenizer) -> None:
    recs = [{"prompt": "Question ?", "response": "Réponse."}]
    ds = data.tokenize_records(recs, tok, data_type="gpt4all", train_on_inputs=False)
    prompt = tok.encode("Question ?\n")
    assert ds.input_ids[0].tolist() == prompt + tok.encode("Réponse.") + [11]
    assert (ds.labels[0][: len(prompt)] == -100).all() and ds.labels[0][-1] == 11


def test_subset(tok: Tokenizer) -> None:
    ds = data.tokenize_records(RECORDS, tok)
    sub = ds.subset([2, 0])
    assert len(sub) == 2 and (sub.input_ids[0] == ds.input_ids[2]).all()
    assert sub.lengths.tolist() == [len(ds.input_ids[2]), len(ds.input_ids[0])]


# ------------------------------------------------------------------ splitting
def test_train_val_split() -> None:
    tr, va = data.train_val_split(100, 0.2, seed=42)
    assert len(va) == 20 and len(tr) == 80
    assert np.array_equal(np.sort(np.concatenate([tr, va])), np.arange(100))
    tr2, va2 = data.train_val_split(100, 0.2, seed=42)
    assert np.array_equal(tr, tr2) and np.array_equal(va, va2)
    _, va3 = data.train_val_split(100, 0.2, seed=43)
    assert not np.array_equal(va, va3)
    assert len(data.train_val_split(10, 0.25)[1]) == 3  # fractions round up
    assert len(data.train_val_split(100, 7)[1]) == 7  # > 1: a count
    assert len(data.train_val_split(100, 0)[1]) == 0
    assert len(data.train_val_split(1, 0.2)[0]) == 1  # keeps one training example
    with pytest.raises(ValueError):
        data.train_val_split(5, 5)
    with pytest.raises(ValueError):
        data.train_val_split(5, 2.5)


# ------------------------------------------------------------------- batching
def test_length_grouped_batches_cover_and_group() -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 300, size=1000)
    batches = data.length_grouped_batches(lengths, 4, seed=1, epoch=0)
    flat = np.concatenate(batches)
    assert np.array_equal(np.sort(flat), np.arange(1000))
    assert max(len(b) for b in batches) == 4
    # padding is much smaller than with random batches
    grouped_pad = sum(int(lengths[b].max() * len(b) - lengths[b].sum()) for b in batches)
    perm = rng.permutation(1000)
    random_pad = sum(int(lengths[b].max() * len(b) - lengths[b].sum())
                     for b in np.array_split(perm, 250))
    assert grouped_pad * 5 < random_pad
    # deterministic for (seed, epoch), different across epochs
    again = data.length_grouped_batches(lengths, 4, seed=1, epoch=0)
    assert all(np.array_equal(a, b) for a, b in zip(batches, again))
    other = data.length_grouped_batches(lengths, 4, seed=1, epoch=1)
    assert not all(np.array_equal(a, b) for a, b in zip(batches, other))
    assert np.array_equal(np.sort(np.concatenate(other)), np.arange(1000))


def test_length_grouped_batches_no_shuffle_and_edges() -> None:
    lengths = [3, 9, 1, 9, 5]
    batches = data.length_grouped_batches(lengths, 2, shuffle=False)
    assert [b.tolist() for b in batches] == [[1, 3], [4, 0], [2]]
    assert data.length_grouped_batches([], 2) == []
    small = data.length_grouped_batches([4, 2, 7], 8, seed=3)
    assert len(small) == 1 and sorted(small[0].tolist()) == [0, 1, 2]
    with pytest.raises(ValueError):
        data.length_grouped_batches([1], 0)


def test_collate(tok: Tokenizer) -> None:
    ds = data.tokenize_records(RECORDS, tok, train_on_inputs=False)
    idx = [2, 0]
    batch = data.collate(ds, idx, pad_id=11)
    lens = [len(ds.input_ids[i]) for i in idx]
    T = max(lens)
    for key in ("input_ids", "labels", "attention_mask"):
        assert batch[key].shape == (2, T) and batch[key].dtype == np.int64
    for row, i in enumerate(idx):
        n = lens[row]
        assert (batch["input_ids"][row, :n] == ds.input_ids[i]).all()
        assert (batch["labels"][row, :n] == ds.labels[i]).all()
        assert (batch["attention_mask"][row, :n] == 1).all()
        assert (batch["input_ids"][row, n:] == 11).all()
        assert (batch["labels"][row, n:] == -100).all()
        assert (batch["attention_mask"][row, n:] == 0).all()
    # the EOS keeps its label even though pad_id == eos
    assert batch["labels"][1, lens[1] - 1] == 11


# ------------------------------------------------------------------- checking
def test_check_dataset_collects_all_errors(tmp_path: Path, tok: Tokenizer) -> None:
    records = [
        {"instruction": "a", "output": "b"},
        {"instruction": "", "output": "b"},
        {"instruction": "c", "input": 4, "output": "d"},
        {"instruction": "e", "output": ""},
        ["not", "an", "object"],
        {"instruction": "f"},
        {"instruction": "g", "input": "h", "output": "i"},
    ]
    path = write(tmp_path, "bad.json", json.dumps(records, indent=1))
    report = data.check_dataset(path, tokenizer=tok, cutoff_len=64)
    assert not report.ok
    assert report.n_records == 7 and report.n_valid == 3
    assert [num for num, _ in report.errors] == [2, 3, 5, 6]
    assert [num for num, _ in report.warnings] == [4]
    assert report.length_min is not None and report.length_max >= report.length_min
    assert report.lengths["p95"] <= report.length_max
    text = str(report)
    assert str(path) in text and "3 / 7" in text
    assert "enregistrement / record 5" in text and "erreurs / errors (4)" in text
    assert text.index("enregistrements valides") < text.index("valid records")


def test_check_dataset_malformed_json_is_one_error(tmp_path: Path) -> None:
    path = write(tmp_path, "broken.json", '[{"instruction": "a", "output": "b"},\n {"instruction": ]')
    report = data.check_dataset(path)
    assert not report.ok and len(report.errors) == 1 and report.errors[0][0] == 2
    assert "not valid JSON" in report.errors[0][1]
    report = data.check_dataset(write(tmp_path, "empty.json", "[]"))
    assert not report.ok and report.errors[0][0] == 0


def test_check_dataset_jsonl_collects_syntax_errors(tmp_path: Path) -> None:
    text = '{"instruction": "a", "output": "b"}\n{oops}\n{"instruction": "c", "output": "d"}\n{"x": 1}\n'
    report = data.check_dataset(write(tmp_path, "d.jsonl", text))
    assert report.n_records == 4 and report.n_valid == 2
    assert [num for num, _ in report.errors] == [2, 4]


# ---------------------------------------------------------- project dataset
def test_project_dataset() -> None:
    records = data.load_records(DATASET)
    assert len(records) >= 160
    assert sum(1 for r in records if r["input"]) >= 50
    assert len({(r["instruction"], r["input"]) for r in records}) == len(records)
    assert all(r["output"].strip() for r in records)
    report = data.check_dataset(DATASET)
    assert report.ok and report.n_valid == len(records) and not report.warnings


def test_project_dataset_with_falcon_tokenizer(shared_data: Path) -> None:
    path = shared_data / "falcon" / "tokenizer.json"
    falcon = Tokenizer.from_file(path)
    report = data.check_dataset(DATASET, tokenizer=falcon, cutoff_len=256)
    assert report.ok and report.length_median < 256
    ds = data.tokenize_records(data.load_records(DATASET), falcon, cutoff_len=256)
    assert ds.n_truncated == report.n_truncated


# ------------------------------------------------------------ unknown fields (issue 15)
def test_closest_field() -> None:
    cases = {"imput": "input", "Input": "input", "INPUT ": "input", "context": "input", "instuction": "instruction",
             "ouput": "output", "answer": "output", "Output": "output", "id": None, "source": None}
    for key, want in cases.items():
        assert data.closest_field(key, "alpaca") == want, key
    assert data.closest_field("promt", "gpt4all") == "prompt"
    assert data.closest_field("output", "gpt4all") == "response"


def test_unknown_fields_warn_once_per_key_and_count(tmp_path: Path) -> None:
    records = [{"instruction": f"q{i}", "imput": "contexte", "output": "r"} for i in range(5)]
    records.append({"instruction": "q", "context": "c", "output": "r", "id": 3})
    path = write(tmp_path, "t.json", json.dumps(records))
    with pytest.warns(data.DatasetWarning) as caught:
        loaded = data.load_records(path)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 3  # imput, context, id: one each
    assert any("record 1: unknown field 'imput' in 5 record(s) is ignored: did you mean 'input'?" in m
               for m in messages)
    assert any("'id'" in m and "known fields: instruction, input, output" in m for m in messages)
    assert all(r["input"] == "" for r in loaded)  # the text really is not used: hence the warning
    report = data.check_dataset(path)
    assert report.ok and report.unknown_fields == {"imput": 5, "context": 1, "id": 1}
    assert [n for n, _ in report.warnings] == [1, 6, 6]
    strict = data.check_dataset(path, strict=True)
    assert not strict.ok and len(strict.errors) == 3 and not strict.warnings
    assert "--strict" in str(strict) and "imput (5)" in str(strict)


def test_misspelled_required_field_names_the_unknown_key(tmp_path: Path) -> None:
    path = write(tmp_path, "t.json", json.dumps([{"instruction": "q", "ouput": "r"}]))
    with pytest.raises(DatasetError, match=r"field 'output' is missing.*unknown field 'ouput': a misspelling"):
        data.load_records(path)
    path = write(tmp_path, "g.json", json.dumps([{"promt": "q", "response": "r"}]))
    with pytest.raises(DatasetError, match=r"field 'prompt' is missing.*'promt'"):
        data.load_records(path, data_type="gpt4all")


def test_every_error_is_listed_and_the_command_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, "bad.jsonl", "".join('{"instruction": ""}\n' for _ in range(45)))
    report = data.check_dataset(path)
    assert len(report.errors) == 45 and str(report).count("enregistrement / record") == 45
    with pytest.raises(DatasetError, match=rf"44 more bad record\(s\); `falcontune check-dataset {re.escape(str(path))}`"):
        data.load_records(path)
