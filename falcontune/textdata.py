"""Raw text (``data_type="text"``): documents cut into ``cutoff_len`` windows, loss on every token.

Files: a ``.txt`` file holds documents separated by blank lines (a line of only spaces or tabs
counts as blank; the lines of a document keep their newlines); any other file is a JSON array or
JSON Lines of ``{"text": str}`` records. Document n is record n.

Each document is encoded on its own, EOS is appended (``use_eos_token``), and the ids are cut
into consecutive windows of ``cutoff_len`` tokens, the last one shorter: nothing is dropped. Each
window is one training example whose every token is learned (a window's first token has no
context to be predicted from; a one-token window teaches nothing and is left out by training).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from .data import TokenizedDataset, _Raw

_BLANK = re.compile(r"[ \t\r\f\v]*")


def read_txt(text: str) -> list[_Raw]:
    """Documents of a .txt file as records ``{"text": ...}`` numbered from 1, with the line
    each starts on."""
    records: list[_Raw] = []
    block: list[str] = []
    first_line = 0
    for n, line in enumerate(text.split("\n"), start=1):
        line = line[:-1] if line.endswith("\r") else line
        if _BLANK.fullmatch(line):
            if block:
                records.append(_Raw(len(records) + 1, first_line, {"text": "\n".join(block)}))
                block = []
            continue
        if not block:
            first_line = n
        block.append(line)
    if block:
        records.append(_Raw(len(records) + 1, first_line, {"text": "\n".join(block)}))
    return records


def is_txt(path: Path) -> bool:
    return path.suffix.lower() == ".txt"


def validate_text_record(value: Any, number: int) -> dict[str, str]:
    """The record as ``{"text": str}``; ValueError with the problem."""
    del number  # records stand alone
    if not isinstance(value, dict):
        raise ValueError("expected a JSON object with a 'text' field")
    text = value.get("text")
    if text is None:
        hint = ""
        if "messages" in value or "conversations" in value:
            hint = " (this looks like chat data: use --data_type=chat)"
        elif "instruction" in value:
            hint = " (this looks like alpaca data: use --data_type=alpaca)"
        state = "is null" if "text" in value else "is missing"
        raise ValueError(f"field 'text' {state}; expected a string{hint}")
    if not isinstance(text, str):
        raise ValueError("field 'text' is not a string")
    if not text.strip():
        raise ValueError("field 'text' is empty, expected a non-empty string")
    return {"text": text}


def window_counts(lengths: np.ndarray, cutoff_len: Optional[int]) -> np.ndarray:
    """Windows each document of the given token lengths is cut into."""
    if cutoff_len is None:
        return np.ones_like(lengths)
    return -(-lengths // cutoff_len)


def document_ids(records: Sequence[Mapping[str, Any]], tokenizer: Any, add_eos: bool = True) -> list[list[int]]:
    """Token ids of each document (+ EOS)."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if add_eos and eos is None:
        raise ValueError("tokenizer has no EOS token id: pass eos_token_id when loading it, or add_eos=False")
    tail = [int(eos)] if add_eos else []
    return [ids + tail for ids in tokenizer.encode_batch([r["text"] for r in records], add_special_tokens=False)]


def tokenize_documents(records: Sequence[Mapping[str, Any]], tokenizer: Any, cutoff_len: Optional[int],
                       add_eos: bool = True) -> TokenizedDataset:
    """One example per window (see the module docstring); labels equal the ids."""
    if cutoff_len is not None and cutoff_len < 1:
        raise ValueError(f"cutoff_len={cutoff_len}: expected a positive number of tokens")
    windows: list[np.ndarray] = []
    for ids in document_ids(records, tokenizer, add_eos):
        arr = np.asarray(ids, dtype=np.int32)
        size = cutoff_len or max(len(arr), 1)
        windows += np.split(arr, range(size, len(arr), size)) if len(arr) else []
    n = len(windows)
    return TokenizedDataset(windows, [w.copy() for w in windows], np.zeros(n, dtype=np.int64),
                            np.zeros(n, dtype=bool), cutoff_len)


def describe(report: Any, records: Sequence[Mapping[str, Any]], numbers: Sequence[int], tokenizer: Any,
             cutoff_len: Optional[int], chat_template: Optional[str] = None) -> None:
    """check_dataset's part for text: documents, and with a tokenizer their token lengths (+ EOS)
    and the windows they are cut into."""
    from .data import set_lengths

    del numbers, chat_template  # every valid document is described the same way
    chars = sum(len(r["text"]) for r in records)
    report.details.append(f"documents: {len(records)} ({chars} caractères / characters)")
    if tokenizer is None or not records:
        return
    lens = np.array([len(ids) for ids in document_ids(records, tokenizer)], dtype=np.int64)
    set_lengths(report, lens)
    if cutoff_len is not None:
        report.details.append(f"fenêtres de / windows of {cutoff_len} tokens: "
                              f"{int(window_counts(lens, cutoff_len).sum())}")
