"""Tokenizer wrapper, streaming detokenizer and demo tokenizer."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from falcontune.tokenizer import (
    EOS_TOKEN,
    FALCON_SPECIAL_TOKENS,
    StreamDecoder,
    Tokenizer,
    train_demo_tokenizer,
)

REPO = Path(__file__).resolve().parents[1]
SEPARATOR = "\n__ggml_vocab_test__\n"

MULTIBYTE_TEXTS = [
    "L'été à Noël, où ça ? Déjà vu : « çà et là ».",
    "Le lama 🦙 et la fusée 🚀 ; 😶‍🌫️ puis ✅ fin.",
    "Cửa Việt, нещо на Български, 我想在apple工作 ½ €.",
]


@pytest.fixture(scope="module")
def falcon(shared_data: Path) -> Tokenizer:
    path = shared_data / "falcon" / "tokenizer.json"
    if not path.is_file():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"missing {path}")
        pytest.skip(f"missing {path}")
    return Tokenizer.from_file(path)


@pytest.fixture(scope="module")
def demo() -> Tokenizer:
    records = json.loads((REPO / "datasets" / "fr_instructions.json").read_text("utf-8"))
    texts = [r["instruction"] + "\n" + r["input"] + "\n" + r["output"] for r in records]
    return train_demo_tokenizer(texts, vocab_size=1024)


def read_vectors(data: Path) -> list[tuple[str, list[int]]]:
    """llama.cpp's convention: each test string is followed by a separator line
    (so the text after the last separator is empty); the .out file has one line
    of space-separated ids per string, taken as is (no space is prepended)."""
    inp = (data / "falcon" / "tokenizer-vectors.inp").read_text("utf-8")
    out = (data / "falcon" / "tokenizer-vectors.out").read_text("utf-8")
    texts = inp.split(SEPARATOR)
    assert texts[-1] == ""
    texts = texts[:-1]
    lines = out.split("\n")
    assert lines[-1] == ""
    lines = lines[:-1]
    assert len(texts) == len(lines) == 46
    return [(t, [int(x) for x in line.split()]) for t, line in zip(texts, lines)]


def test_falcon_vectors_exact(falcon: Tokenizer, shared_data: Path) -> None:
    vectors = read_vectors(shared_data)
    got = falcon.encode_batch([t for t, _ in vectors])
    for (text, expected), ids in zip(vectors, got):
        assert ids == expected, f"{text!r}: {ids} != {expected}"
        assert falcon.encode(text) == expected


def test_falcon_special_ids(falcon: Tokenizer) -> None:
    assert falcon.vocab_size == 65024
    assert falcon.eos_token_id == 11
    assert falcon.pad_token_id == 11
    assert falcon.token_to_id(EOS_TOKEN) == 11
    for i, tok in enumerate(FALCON_SPECIAL_TOKENS):
        assert falcon.token_to_id(tok) == i
    # the special token written as text is recognized
    assert falcon.encode("fin" + EOS_TOKEN)[-1] == 11


def test_falcon_roundtrip_and_skip_special(falcon: Tokenizer) -> None:
    for text in MULTIBYTE_TEXTS + [" Hello world", "\n\n  x"]:
        ids = falcon.encode(text)
        assert falcon.decode(ids) == text
        assert falcon.decode(np.asarray(ids + [11], dtype=np.int64)) == text
        assert falcon.decode(ids + [11], skip_special_tokens=False) == text + EOS_TOKEN


def test_from_file_directory_and_missing(tmp_path: Path, falcon: Tokenizer) -> None:
    saved = falcon.save(tmp_path)
    assert saved == tmp_path / "tokenizer.json"
    again = Tokenizer.from_file(tmp_path)
    assert again.encode("Bonjour à tous") == falcon.encode("Bonjour à tous")
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as err:
        Tokenizer.from_file(missing)
    msg = str(err.value)
    assert str(missing) in msg and "tiiuae/falcon-7b" in msg and "tokenizer.json" in msg
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="empty_dir"):
        Tokenizer.from_file(empty)


def test_from_file_invalid(tmp_path: Path) -> None:
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_file(bad)


def stream(tok: Tokenizer, ids: list[int]) -> list[str]:
    dec = StreamDecoder(tok)
    pieces = [dec.push(i) for i in ids]
    pieces.append(dec.flush())
    return pieces


@pytest.mark.parametrize("text", MULTIBYTE_TEXTS)
def test_stream_decoder_falcon(falcon: Tokenizer, text: str) -> None:
    ids = falcon.encode(text)
    pieces = stream(falcon, ids)
    assert "".join(pieces) == falcon.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)


@pytest.mark.parametrize("text", MULTIBYTE_TEXTS)
def test_stream_decoder_demo_byte_pieces(demo: Tokenizer, text: str) -> None:
    ids = demo.encode(text)
    # the small vocabulary has no token for these characters: they are split into bytes
    assert len(ids) > len(text) // 2
    pieces = stream(demo, ids)
    assert "".join(pieces) == demo.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)
    assert pieces[-1] == ""  # nothing left over once the text is complete


def test_stream_decoder_holds_partial_character(demo: Tokenizer) -> None:
    ids = demo.encode("🦙")
    assert len(ids) >= 2
    dec = demo.stream_decoder()
    assert all(dec.push(i) == "" for i in ids[:-1])
    assert dec.push(ids[-1]) == "🦙"
    # an incomplete character at the very end comes out of flush() only
    dec = demo.stream_decoder()
    assert dec.extend(ids[:-1]) == ""
    assert dec.flush() == demo.decode(ids[:-1])


def test_stream_decoder_skips_eos(demo: Tokenizer) -> None:
    ids = demo.encode("Bonjour") + [11]
    assert "".join(stream(demo, ids)) == "Bonjour"


def test_demo_tokenizer(tmp_path: Path, demo: Tokenizer) -> None:
    assert demo.eos_token_id == 11 and demo.pad_token_id == 11
    for i, tok in enumerate(FALCON_SPECIAL_TOKENS):
        assert demo.token_to_id(tok) == i
    assert demo.vocab_size <= 1024
    text = "Réécris ce texte en langage clair : « 15 h 30 », 1 234 €, 🦙 !\n\tFin."
    assert demo.decode(demo.encode(text)) == text
    assert demo.encode("Bonjour" + EOS_TOKEN)[-1] == 11


def test_demo_tokenizer_deterministic_and_saved(tmp_path: Path) -> None:
    texts = [f"Le numéro {i} : une phrase d'exemple, écrite en français." for i in range(200)]
    out = tmp_path / "sub" / "tokenizer.json"
    a = train_demo_tokenizer(texts, vocab_size=400, out_path=out)
    b = train_demo_tokenizer(texts, vocab_size=400)
    assert a.backend.to_str() == b.backend.to_str()
    assert out.is_file() and a.source == str(out)
    loaded = Tokenizer.from_file(out)
    assert loaded.eos_token_id == 11
    assert loaded.encode(texts[7]) == a.encode(texts[7])


def test_demo_tokenizer_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        train_demo_tokenizer(["abc"], vocab_size=100)
    with pytest.raises(ValueError):
        train_demo_tokenizer([], vocab_size=512)


def test_demo_tokenizer_same_in_another_process(tmp_path: Path) -> None:
    """Training does not depend on the process (hash seeds, threads)."""
    import subprocess
    import sys

    texts = [f"Exemple {i} : l'été, à Noël, où ça ? {i * 37}" for i in range(300)]
    (tmp_path / "texts.json").write_text(json.dumps(texts), encoding="utf-8")
    code = (
        "import json, sys\n"
        "from falcontune.tokenizer import train_demo_tokenizer\n"
        "texts = json.load(open(sys.argv[1], encoding='utf-8'))\n"
        "train_demo_tokenizer(texts, vocab_size=500, out_path=sys.argv[2])\n"
    )
    out = tmp_path / "child.json"
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONHASHSEED="12345")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "texts.json"), str(out)],
                   check=True, env=env, cwd=str(tmp_path))
    here = train_demo_tokenizer(texts, vocab_size=500)
    assert Tokenizer.from_file(out).backend.to_str() == here.backend.to_str()
