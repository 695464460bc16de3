"""Datasets: loading, prompt templates, tokenization, splitting and batching.

Formats (``data_type``):

* ``alpaca``: records with ``instruction`` (non-empty str), ``input`` (str,
  optional, default "") and ``output`` (str), as a JSON array or JSON Lines.
* ``gpt4all``: records with ``prompt`` (non-empty str) and ``response`` (str);
  the training text is ``prompt + "\\n" + response`` as in falcontune.
* ``chat``: OpenAI ``messages`` or ShareGPT ``conversations`` records, rendered
  with a chat template (falcontune.chat).
* ``text``: raw documents (.txt or ``{"text": ...}`` records) cut into
  ``cutoff_len`` windows (falcontune.textdata).

Other keys are ignored, but never silently: each unknown key is reported once
(a ``DatasetWarning`` from ``load_records``, a warning of ``check_dataset``;
an error with ``strict=True``) with the known field it probably means
(``imput`` -> ``input``), since a misspelled optional field would otherwise
drop its text from every example.

Tokenization (``tokenize_records``): the prompt and the answer are encoded
separately and concatenated, then EOS is appended.  Encoding the prompt on its
own gives exactly the ids the model sees at generation time, and it makes the
prompt/answer boundary exact for ``train_on_inputs=False``.  The EOS token is
always a label (the model learns to stop).  An example longer than
``cutoff_len`` is cut to ``cutoff_len`` tokens and gets no EOS: its answer is
unfinished, and teaching the model to stop there would teach it to stop
mid-answer (falcontune's gpt4all loader makes the same choice).
"""
from __future__ import annotations

import difflib
import json
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Protocol, Sequence, Union

import numpy as np

IGNORE_INDEX = -100
DATA_TYPES = ("alpaca", "gpt4all", "chat", "text")

PathLike = Union[str, Path]


# ---------------------------------------------------------------- templates
@dataclass(frozen=True)
class PromptTemplate:
    """An instruction prompt with instruction, input and response sections."""

    name: str
    preamble: str
    instruction_marker: str
    input_marker: str
    response_marker: str

    def format(self, instruction: str, input: str = "", output: str = "") -> str:
        # The input section is kept even when ``input`` is empty, as falcontune
        # does at training and at generation time.
        return (
            f"{self.preamble}\n\n"
            f"{self.instruction_marker}\n{instruction}\n\n"
            f"{self.input_marker}\n{input}\n\n"
            f"{self.response_marker}\n{output}"
        )


ALPACA = PromptTemplate(
    name="alpaca",
    preamble=(
        "Below is an instruction that describes a task, paired with an input that "
        "provides further context. Write a response that appropriately completes "
        "the request."
    ),
    instruction_marker="### Instruction:",
    input_marker="### Input:",
    response_marker="### Response:",
)

FRENCH = PromptTemplate(
    name="fr",
    preamble=(
        "Ci-dessous se trouve une instruction qui décrit une tâche, accompagnée "
        "d'une entrée qui apporte un contexte supplémentaire. Rédigez une réponse "
        "appropriée à la demande."
    ),
    instruction_marker="### Instruction :",
    input_marker="### Entrée :",
    response_marker="### Réponse :",
)

TEMPLATES: dict[str, PromptTemplate] = {"alpaca": ALPACA, "fr": FRENCH}

TemplateLike = Union[str, PromptTemplate]


def get_template(template: TemplateLike) -> PromptTemplate:
    if isinstance(template, PromptTemplate):
        return template
    try:
        return TEMPLATES[template]
    except KeyError:
        raise ValueError(f"unknown prompt template {template!r}; expected one of "
                         f"{', '.join(sorted(TEMPLATES))}") from None


def make_prompt(instruction: str, input: str = "", output: str = "",
                template: TemplateLike = "alpaca") -> str:
    """The full prompt; with ``output=""`` it ends right after the response marker
    line, ready for generation."""
    return get_template(template).format(instruction, input, output)


def split_response(text: str, template: TemplateLike = "alpaca") -> str:
    """The answer in a generated text: what follows the first response marker
    (up to a second one, if the model wrote one), stripped.  Text without the
    marker is returned stripped."""
    parts = text.split(get_template(template).response_marker)
    if len(parts) < 2:
        return text.strip()
    return parts[1].strip()


# ------------------------------------------------------------------ errors
class DatasetError(ValueError):
    """A dataset file or record is malformed.  The message names the file, the
    record number (1-based) when known, and what was expected."""

    def __init__(self, path: PathLike, problem: str, record: Optional[int] = None,
                 line: Optional[int] = None, column: Optional[int] = None) -> None:
        self.path = str(path)
        self.problem = problem
        self.record = record
        self.line = line
        self.column = column
        where = []
        if record is not None:
            where.append(f"record {record}")
        if line is not None:
            where.append(f"line {line}" + (f", column {column}" if column is not None else ""))
        loc = ""
        if where:
            loc = where[0] if len(where) == 1 else f"{where[0]} ({where[1]})"
            loc += ": "
        super().__init__(f"{self.path}: {loc}{problem}")


# ----------------------------------------------------------------- parsing
_WS = re.compile(r"[ \t\n\r]*")


@dataclass
class _Raw:
    number: int  # 1-based record number
    line: Optional[int]
    value: Any = None


def _line_col(text: str, pos: int) -> tuple[int, int]:
    line = text.count("\n", 0, pos) + 1
    return line, pos - (text.rfind("\n", 0, pos) + 1) + 1


def _read_text(path: Path) -> str:
    if not path.exists():
        raise DatasetError(path, "file not found")
    if path.is_dir():
        raise DatasetError(path, "is a directory, expected a .json or .jsonl file")
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DatasetError(path, f"not UTF-8 text (invalid byte at offset {exc.start})") from None


def _parse_array(path: Path, text: str, start: int) -> list[_Raw]:
    """Parse a JSON array element by element, so that a syntax error can be
    attributed to a record number."""
    dec = json.JSONDecoder()
    out: list[_Raw] = []
    pos = _WS.match(text, start + 1).end()
    if text.startswith("]", pos):
        end = _WS.match(text, pos + 1).end()
        if end != len(text):
            line, col = _line_col(text, end)
            raise DatasetError(path, "unexpected data after the closing ']'", line=line, column=col)
        return out
    line, last = 1 + text.count("\n", 0, pos), pos
    while True:
        number = len(out) + 1
        line, last = line + text.count("\n", last, pos), pos
        try:
            value, pos = dec.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise DatasetError(path, f"not valid JSON: {exc.msg}", record=number,
                               line=exc.lineno, column=exc.colno) from None
        except RecursionError:
            raise DatasetError(path, "not valid JSON: nested too deeply", record=number,
                               line=line) from None
        out.append(_Raw(number, line, value))
        pos = _WS.match(text, pos).end()
        if text.startswith(",", pos):
            comma = pos
            pos = _WS.match(text, pos + 1).end()
            if pos >= len(text) or text.startswith("]", pos):
                line, col = _line_col(text, comma)
                problem = ("the file ends after this record: missing ']'" if pos >= len(text)
                           else "trailing comma before ']' (not allowed in JSON)")
                raise DatasetError(path, f"not valid JSON: {problem}", record=number,
                                   line=line, column=col)
            continue
        if text.startswith("]", pos):
            end = _WS.match(text, pos + 1).end()
            if end != len(text):
                line, col = _line_col(text, end)
                raise DatasetError(path, "unexpected data after the closing ']'",
                                   line=line, column=col)
            return out
        line, col = _line_col(text, pos)
        what = "end of file" if pos >= len(text) else repr(text[pos])
        raise DatasetError(path, f"not valid JSON: expected ',' or ']' after the record, "
                                 f"found {what}", record=number, line=line, column=col)


def _parse_file(path: Path) -> tuple[list[_Raw], list[DatasetError]]:
    """Records of a JSON array or JSON Lines file, plus per-line JSON errors
    (JSON Lines only; an array with a syntax error raises)."""
    text = _read_text(path)
    start = _WS.match(text).end()
    if start == len(text):
        raise DatasetError(path, "empty dataset: the file is empty, expected a JSON array "
                                 "of records or JSON Lines")
    if text[start] == "[":
        return _parse_array(path, text, start), []
    if text[start] != "{":
        line, col = _line_col(text, start)
        raise DatasetError(path, f"expected a JSON array of records ('[') or JSON Lines "
                                 f"(one object per line), found {text[start]!r}",
                           line=line, column=col)
    records: list[_Raw] = []
    errors: list[DatasetError] = []
    # split on "\n" only: JSON strings may hold U+2028 and other line breaks
    for line_no, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        raw = _Raw(len(records) + 1, line_no)
        try:
            raw.value = json.loads(line)
        except RecursionError:
            errors.append(DatasetError(path, "not valid JSON: nested too deeply", record=raw.number,
                                       line=line_no))
        except json.JSONDecodeError as exc:
            if not records and not errors and _is_single_object(text):
                raise DatasetError(path, "the file holds a single JSON object; expected a "
                                         "JSON array of records or JSON Lines (one record "
                                         "per line)") from None
            errors.append(DatasetError(path, f"not valid JSON: {exc.msg}", record=raw.number,
                                       line=line_no, column=exc.colno))
        records.append(raw)
    return records, errors


def _is_single_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except (json.JSONDecodeError, RecursionError):
        return False


# -------------------------------------------------------------- validation
_FIELDS = {
    # data_type: ((field, required, non_empty), ...)
    "alpaca": (("instruction", True, True), ("input", False, False), ("output", True, False)),
    "gpt4all": (("prompt", True, True), ("response", True, False)),
}


def _check_data_type(data_type: str) -> None:
    if data_type not in DATA_TYPES:
        raise ValueError(f"unknown data_type {data_type!r}; expected one of "
                         f"{', '.join(DATA_TYPES)}")


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            int: "a number", float: "a number", type(None): "null"}.get(type(value),
                                                                     type(value).__name__)


class DatasetWarning(UserWarning):
    """Something in a dataset that loads but is probably not what was meant (an unknown field)."""


# Names other formats give to a known field: an "unknown field" warning suggests the known one.
_FIELD_ALIASES = {
    "alpaca": {"context": "input", "question": "instruction", "query": "instruction", "answer": "output",
               "completion": "output", "target": "output"},
    "gpt4all": {"instruction": "prompt", "question": "prompt", "query": "prompt", "output": "response",
                "answer": "response", "completion": "response"},
}


# top-level keys of the record types that live in their own modules (chat.py, textdata.py)
_TOP_FIELDS = {"chat": ("messages", "conversations"), "text": ("text",)}


def known_fields(data_type: str) -> tuple[str, ...]:
    _check_data_type(data_type)
    if data_type in _TOP_FIELDS:
        return _TOP_FIELDS[data_type]
    return tuple(f for f, _, _ in _FIELDS[data_type])


def closest_field(key: str, data_type: str) -> Optional[str]:
    """The known field an unknown key most likely means ('imput', 'Input', 'context' -> 'input'),
    or None."""
    known = known_fields(data_type)
    low = key.strip().lower()
    if low in known:
        return low
    aliases = _FIELD_ALIASES.get(data_type, {})
    if low in aliases:
        return aliases[low]
    close = difflib.get_close_matches(low, known, n=1, cutoff=0.6)
    return close[0] if close else None


def _unknown_key_note(key: str, data_type: str) -> str:
    near = closest_field(key, data_type)
    if near is not None:
        return f"did you mean '{near}'?"
    return f"known fields: {', '.join(known_fields(data_type))}"


def _validate(raw: _Raw, path: Path, data_type: str) -> dict[str, str]:
    spec = _FIELDS[data_type]
    names = ", ".join(f for f, _, _ in spec)
    value = raw.value
    if not isinstance(value, dict):
        raise DatasetError(path, f"expected a JSON object with fields {names}, "
                                 f"got {_type_name(value)}", record=raw.number, line=raw.line)
    clean: dict[str, str] = {}
    unknown = [k for k in value if k not in {f for f, _, _ in spec}]
    for name, required, non_empty in spec:
        v = value.get(name)
        if v is None:
            if required:
                extra = ""
                if data_type == "alpaca" and "prompt" in value:
                    extra = " (this looks like gpt4all data: use data_type='gpt4all')"
                elif data_type == "gpt4all" and "instruction" in value:
                    extra = " (this looks like alpaca data: use data_type='alpaca')"
                else:
                    meant = [k for k in unknown if closest_field(k, data_type) == name]
                    if meant:
                        extra = (f" (the record has an unknown field '{meant[0]}': a misspelling of "
                                 f"'{name}'?)")
                state = "is null" if name in value else "is missing"
                raise DatasetError(path, f"field '{name}' {state}; expected a string{extra}",
                                   record=raw.number, line=raw.line)
            v = ""
        if not isinstance(v, str):
            raise DatasetError(path, f"field '{name}' is {_type_name(v)}, expected a string",
                               record=raw.number, line=raw.line)
        if non_empty and not v.strip():
            raise DatasetError(path, f"field '{name}' is empty, expected a non-empty string",
                               record=raw.number, line=raw.line)
        clean[name] = v
    return clean


def _record_checker(data_type: str) -> Optional[Callable[[Any, int], dict[str, Any]]]:
    """check(value, record number) -> clean record, raising ValueError with the problem, for the
    data types whose records live in their own modules (None: alpaca / gpt4all, _validate)."""
    if data_type == "chat":
        from .chat import ConversationValidator
        return ConversationValidator()  # one per file: it remembers the file's shape
    if data_type == "text":
        from .textdata import validate_text_record
        return validate_text_record
    return None


@dataclass
class _Scan:
    n_records: int
    valid: list[dict[str, Any]]
    errors: list[DatasetError]  # record order
    unknown: dict[str, list[int]]  # unknown key -> record numbers holding it (file order)

    def unknown_field_messages(self, data_type: str) -> list[tuple[int, str]]:
        """One (first record, message) per unknown key."""
        return [(numbers[0], f"unknown field '{key}' in {len(numbers)} record(s) is ignored: "
                             f"{_unknown_key_note(key, data_type)}") for key, numbers in self.unknown.items()]


def _scan(path: Path, data_type: str) -> _Scan:
    """Every record's fate: valid, an error, and the unknown keys it holds."""
    if data_type == "text" and path.suffix.lower() == ".txt":
        from .textdata import read_txt
        raws, errors = read_txt(_read_text(path)), []
    else:
        raws, errors = _parse_file(path)
    check = _record_checker(data_type)
    bad = {e.record for e in errors}
    valid: list[dict[str, Any]] = []
    known = set(known_fields(data_type))
    unknown: dict[str, list[int]] = {}
    for raw in raws:
        if raw.number in bad:
            continue
        if isinstance(raw.value, dict):
            for key in raw.value:
                if key not in known:
                    unknown.setdefault(key, []).append(raw.number)
        try:
            valid.append(_validate(raw, path, data_type) if check is None else check(raw.value, raw.number))
        except DatasetError as exc:
            errors.append(exc)
        except ValueError as exc:
            errors.append(DatasetError(path, str(exc), record=raw.number, line=raw.line))
    errors.sort(key=lambda e: e.record or 0)
    return _Scan(len(raws), valid, errors, unknown)


def load_records(path: PathLike, data_type: str = "alpaca") -> list[dict[str, Any]]:
    """Load and validate every record of a dataset.

    Accepts a JSON array or JSON Lines (detected from the first character), and
    for ``text`` a .txt file. Returns dicts with only the known fields (alpaca:
    instruction, input, output; gpt4all: prompt, response; chat: messages with
    OpenAI roles; text: text).  Raises ``DatasetError`` for the first bad record
    (the message counts the others; ``falcontune check-dataset`` lists them
    all).  Each unknown field (a key no record format uses, such as a
    misspelled ``imput``) is reported once with a ``DatasetWarning`` naming the
    closest known field: its text would otherwise be lost silently.
    """
    _check_data_type(data_type)
    p = Path(path)
    scan = _scan(p, data_type)
    if scan.errors:
        first = scan.errors[0]
        if len(scan.errors) > 1:
            more = (f" (and {len(scan.errors) - 1} more bad record(s); "
                    f"`falcontune check-dataset {p}` lists them all)")
            raise DatasetError(p, first.problem + more, record=first.record,
                               line=first.line, column=first.column)
        raise first
    if scan.n_records == 0:
        raise DatasetError(p, "empty dataset: no records")
    for first, message in scan.unknown_field_messages(data_type):
        warnings.warn(DatasetWarning(f"{p}: record {first}: {message}"), stacklevel=2)
    return scan.valid


# ------------------------------------------------------------ tokenization
class SupportsEncode(Protocol):
    eos_token_id: Optional[int]

    def encode_batch(self, texts: Sequence[str],
                     add_special_tokens: bool = False) -> list[list[int]]: ...


@dataclass
class TokenizedDataset:
    """Tokenized examples: ``input_ids[i]`` and ``labels[i]`` are int32 arrays of
    the same length; labels are -100 where no loss is taken.  Labels are not
    shifted (the model predicts ``labels[t+1]`` at position ``t``)."""

    input_ids: list[np.ndarray]
    labels: list[np.ndarray]
    prompt_lengths: np.ndarray  # int64, prompt tokens before truncation
    truncated: np.ndarray  # bool, cut to cutoff_len (and no EOS)
    cutoff_len: Optional[int] = None

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(x) for x in self.input_ids), dtype=np.int64,
                           count=len(self.input_ids))

    @property
    def n_truncated(self) -> int:
        return int(self.truncated.sum())

    @property
    def n_label_tokens(self) -> np.ndarray:
        """Per example, the number of tokens that carry a loss."""
        return np.fromiter((int((y != IGNORE_INDEX).sum()) for y in self.labels),
                           dtype=np.int64, count=len(self.labels))

    @property
    def n_fully_masked(self) -> int:
        """Examples without any label (e.g. the prompt alone fills cutoff_len)."""
        return int((self.n_label_tokens == 0).sum())

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return {"input_ids": self.input_ids[i], "labels": self.labels[i]}

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return (self[i] for i in range(len(self)))

    def subset(self, indices: Sequence[int]) -> "TokenizedDataset":
        idx = np.asarray(indices, dtype=np.int64)
        return TokenizedDataset(
            input_ids=[self.input_ids[i] for i in idx],
            labels=[self.labels[i] for i in idx],
            prompt_lengths=self.prompt_lengths[idx],
            truncated=self.truncated[idx],
            cutoff_len=self.cutoff_len,
        )


def _split_texts(records: Sequence[dict[str, str]], data_type: str,
                 template: TemplateLike) -> tuple[list[str], list[str]]:
    """(prompt part, answer part) of every record."""
    if data_type == "alpaca":
        tpl = get_template(template)
        prompts = [tpl.format(r["instruction"], r.get("input") or "", "") for r in records]
        answers = [r["output"] for r in records]
    else:
        prompts = [r["prompt"] + "\n" for r in records]
        answers = [r["response"] for r in records]
    return prompts, answers


def tokenize_records(
    records: Sequence[dict[str, Any]],
    tokenizer: SupportsEncode,
    data_type: str = "alpaca",
    cutoff_len: Optional[int] = 256,
    template: TemplateLike = "alpaca",
    train_on_inputs: bool = True,
    add_eos: bool = True,
    chat_template: Optional[str] = None,
) -> TokenizedDataset:
    """Tokenize validated records (see the module docstring for the rules).

    ``train_on_inputs=False`` masks the prompt tokens (template, instruction,
    input; for gpt4all the prompt and its newline; for chat every non-assistant
    token).  ``cutoff_len=None`` keeps every token.  ``chat_template``: see
    falcontune.chat.resolve_template; ``text`` ignores train_on_inputs (every
    token is learned).
    """
    _check_data_type(data_type)
    if cutoff_len is not None and cutoff_len < 1:
        raise ValueError(f"cutoff_len={cutoff_len}: expected a positive number of tokens")
    if data_type == "chat":
        from .chat import tokenize_conversations
        return tokenize_conversations(records, tokenizer, cutoff_len, train_on_inputs, add_eos, chat_template)
    if data_type == "text":
        from .textdata import tokenize_documents
        return tokenize_documents(records, tokenizer, cutoff_len, add_eos)
    eos = getattr(tokenizer, "eos_token_id", None)
    if add_eos and eos is None:
        raise ValueError("tokenizer has no EOS token id (no '<|endoftext|>' in its "
                         "vocabulary): pass eos_token_id when loading it, or add_eos=False")
    prompts, answers = _split_texts(records, data_type, template)
    prompt_ids = tokenizer.encode_batch(prompts, add_special_tokens=False)
    answer_ids = tokenizer.encode_batch(answers, add_special_tokens=False)
    tail = [int(eos)] if add_eos else []
    limit = cutoff_len if cutoff_len is not None else math.inf

    inputs: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    n = len(prompts)
    prompt_lengths = np.zeros(n, dtype=np.int64)
    truncated = np.zeros(n, dtype=bool)
    for i, (p, a) in enumerate(zip(prompt_ids, answer_ids)):
        ids = np.asarray(p + a + tail, dtype=np.int32)
        if len(ids) > limit:
            ids = np.asarray((p + a)[: int(limit)], dtype=np.int32)
            truncated[i] = True
        y = ids.copy()
        if not train_on_inputs:
            y[: len(p)] = IGNORE_INDEX
        inputs.append(ids)
        labels.append(y)
        prompt_lengths[i] = len(p)
    return TokenizedDataset(inputs, labels, prompt_lengths, truncated, cutoff_len)


# --------------------------------------------------------------- splitting
def train_val_split(n: int, val_set_size: float = 0.2,
                    seed: int = 42) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of ``range(n)`` into sorted (train, val) index arrays.

    ``val_set_size`` below 1 is a fraction (rounded up, as HF datasets does;
    at least one training example is kept); 1 or more is a count; 0 means no
    validation set.
    """
    if n < 0:
        raise ValueError(f"n={n}: expected a non-negative number of examples")
    if val_set_size < 0 or not math.isfinite(val_set_size):
        raise ValueError(f"val_set_size={val_set_size}: expected a fraction in [0, 1) "
                         f"or a count >= 1")
    if val_set_size < 1:
        n_val = min(math.ceil(val_set_size * n), max(n - 1, 0))
    else:
        if val_set_size != int(val_set_size):
            raise ValueError(f"val_set_size={val_set_size}: a value >= 1 is a number of "
                             f"examples and must be a whole number")
        n_val = int(val_set_size)
        if n_val >= n:
            raise ValueError(f"val_set_size={n_val} leaves no training example out of {n}")
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


# ---------------------------------------------------------------- batching
def length_grouped_batches(lengths: Sequence[int] | np.ndarray, mbatch_size: int,
                           seed: int = 0, epoch: int = 0, shuffle: bool = True,
                           chunk_batches: int = 50) -> list[np.ndarray]:
    """Micro-batches of indices whose examples have similar lengths.

    With ``shuffle``: a permutation seeded by (seed, epoch) is cut into chunks
    of ``chunk_batches * mbatch_size`` examples, each chunk is sorted by length
    (longest first) and cut into micro-batches, and the batch order is
    shuffled.  Without ``shuffle`` (evaluation): all examples sorted by length,
    longest first, ties in index order.  Every index appears exactly once; only
    the last batch of a chunk may be smaller than ``mbatch_size``.
    """
    if mbatch_size < 1:
        raise ValueError(f"mbatch_size={mbatch_size}: expected >= 1")
    lens = np.asarray(lengths, dtype=np.int64)
    n = len(lens)
    if n == 0:
        return []
    if not shuffle:
        order = np.argsort(-lens, kind="stable")
        return [order[i:i + mbatch_size] for i in range(0, n, mbatch_size)]
    rng = np.random.default_rng([int(seed), int(epoch)])
    perm = rng.permutation(n)
    chunk = max(1, chunk_batches) * mbatch_size
    batches: list[np.ndarray] = []
    for c in range(0, n, chunk):
        part = perm[c:c + chunk]
        part = part[np.argsort(-lens[part], kind="stable")]
        batches.extend(part[i:i + mbatch_size] for i in range(0, len(part), mbatch_size))
    order = rng.permutation(len(batches))
    return [batches[i] for i in order]


def collate(dataset: Any, indices: Sequence[int] | np.ndarray,
            pad_id: int) -> dict[str, np.ndarray]:
    """Right-pad the selected examples (or packed rows) to the longest one.

    Returns int64 arrays [B, T]: ``input_ids`` (pad_id on padding), ``labels``
    (-100 on padding) and ``attention_mask`` (1 on tokens, 0 on padding; for a
    ``packing.PackedDataset``, the segment id of each token: see falcontune.packing).
    """
    from .packing import PackedDataset

    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if idx.size == 0:
        raise ValueError("collate: expected at least one example index")
    rows_seg: Optional[list[np.ndarray]] = None
    if isinstance(dataset, PackedDataset):
        rows_x, rows_y, rows_seg = dataset.row_arrays(idx)
    else:
        rows_x = [dataset.input_ids[i] for i in idx]
        rows_y = [dataset.labels[i] for i in idx]
    lens = np.fromiter((len(r) for r in rows_x), dtype=np.int64, count=len(rows_x))
    width = max(int(lens.max()), 1)
    mask = np.arange(width)[None, :] < lens[:, None]
    input_ids = np.full(mask.shape, pad_id, dtype=np.int64)
    labels = np.full(mask.shape, IGNORE_INDEX, dtype=np.int64)
    input_ids[mask] = np.concatenate(rows_x)
    labels[mask] = np.concatenate(rows_y)
    attention_mask = mask.astype(np.int64)
    if rows_seg is not None:
        attention_mask[mask] = np.concatenate(rows_seg)
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


# ----------------------------------------------------------------- checking
@dataclass
class DatasetReport:
    """What ``check_dataset`` found.  ``errors`` and ``warnings`` hold (record
    number, message); record number 0 means the file as a whole.
    ``unknown_fields`` counts, per unknown key, the records holding it."""

    path: str
    data_type: str
    n_records: int = 0
    n_valid: int = 0
    errors: list[tuple[int, str]] = field(default_factory=list)
    warnings: list[tuple[int, str]] = field(default_factory=list)
    unknown_fields: dict[str, int] = field(default_factory=dict)
    strict: bool = False
    cutoff_len: Optional[int] = None
    n_truncated: int = 0
    n_empty_input: int = 0
    length_min: Optional[int] = None
    length_mean: Optional[float] = None
    length_median: Optional[float] = None
    length_p95: Optional[float] = None
    length_max: Optional[int] = None
    details: list[str] = field(default_factory=list)  # data-type specific lines (chat, text)

    @property
    def ok(self) -> bool:
        return not self.errors and self.n_valid > 0

    @property
    def lengths(self) -> Optional[dict[str, float]]:
        if self.length_min is None:
            return None
        return {"min": self.length_min, "mean": self.length_mean, "median": self.length_median,
                "p95": self.length_p95, "max": self.length_max}

    def __str__(self) -> str:
        def where(num: int) -> str:
            return "fichier / file" if num == 0 else f"enregistrement / record {num}"

        status = "OK" if self.ok else "ERREURS / ERRORS"
        out = [f"Jeu de données / dataset: {self.path} ({self.data_type}) : {status}",
               f"  enregistrements valides / valid records: {self.n_valid} / {self.n_records}"]
        if self.unknown_fields:
            out.append("  champs inconnus / unknown fields: " + ", ".join(
                f"{k} ({n})" for k, n in self.unknown_fields.items())
                + (" (--strict: errors)" if self.strict else ""))
        if self.length_min is not None:
            out.append(f"  longueur en tokens / token length: min {self.length_min}, "
                       f"moyenne / mean {self.length_mean:.1f}, médiane / median "
                       f"{self.length_median:g}, p95 {self.length_p95:g}, max {self.length_max}")
            if self.data_type == "text":
                out.append(f"  plus longs que / longer than {self.cutoff_len} tokens (découpés en fenêtres, "
                           f"rien n'est perdu / cut into windows, nothing dropped): {self.n_truncated}")
            else:
                out.append(f"  tronqués à / truncated to {self.cutoff_len} tokens: {self.n_truncated}")
        out.extend(f"  {line}" for line in self.details)
        for title, items in (("erreurs / errors", self.errors),
                             ("avertissements / warnings", self.warnings)):
            if items:
                out.append(f"  {title} ({len(items)}):")
                out.extend(f"    {where(num)}: {msg}" for num, msg in items)
        return "\n".join(out)


def check_dataset(path: PathLike, data_type: str = "alpaca", tokenizer: Any = None,
                  cutoff_len: Optional[int] = 256,
                  template: TemplateLike = "alpaca",
                  chat_template: Optional[str] = None, strict: bool = False) -> DatasetReport:
    """Validate a dataset file and describe it, collecting every record error.

    Unknown fields (keys no record format uses) are warnings, one per key,
    naming the closest known field; with ``strict=True`` they are errors.
    With a tokenizer, token lengths (prompt + answer + EOS, before truncation)
    and the number of examples longer than ``cutoff_len`` are reported.  Chat
    conversations are also rendered with their template (``chat_template``, see
    falcontune.chat), so a template that fails is reported per record.
    """
    _check_data_type(data_type)
    get_template(template)
    p = Path(path)
    report = DatasetReport(path=str(p), data_type=data_type, cutoff_len=cutoff_len, strict=strict)
    try:
        scan = _scan(p, data_type)
    except DatasetError as exc:
        report.errors.append((exc.record or 0, _short(exc)))
        return report
    n, valid, errors = scan.n_records, scan.valid, scan.errors
    report.n_records, report.n_valid = n, len(valid)
    report.errors = [(e.record or 0, _short(e)) for e in errors]
    if n == 0:
        report.errors.append((0, "empty dataset: no records"))
    report.unknown_fields = {k: len(v) for k, v in scan.unknown.items()}
    unknown = scan.unknown_field_messages(data_type)
    if strict:
        report.errors = sorted(report.errors + unknown, key=lambda e: e[0])
    else:
        report.warnings.extend(unknown)
    numbered = _valid_numbers(n, errors)
    if data_type in ("chat", "text"):
        if data_type == "chat":
            from .chat import describe as describe_records
        else:
            from .textdata import describe as describe_records
        describe_records(report, valid, numbered, tokenizer, cutoff_len, chat_template)
        report.errors.sort(key=lambda e: e[0])
        return report
    answer_field = "output" if data_type == "alpaca" else "response"
    for num, rec in zip(numbered, valid):
        if not rec[answer_field].strip():
            report.warnings.append((num, f"field '{answer_field}' is empty: only EOS is learned"))
    report.warnings.sort(key=lambda w: w[0])
    if data_type == "alpaca":
        report.n_empty_input = sum(1 for r in valid if not r["input"])
    if tokenizer is not None and valid:
        ds = tokenize_records(valid, tokenizer, data_type=data_type, cutoff_len=None,
                              template=template)
        set_lengths(report, ds.lengths)
    return report


def set_lengths(report: DatasetReport, lens: np.ndarray) -> None:
    """Token-length statistics of the report (lengths before truncation)."""
    if len(lens) == 0:
        return
    report.length_min = int(lens.min())
    report.length_mean = float(lens.mean())
    report.length_median = float(np.median(lens))
    report.length_p95 = float(np.percentile(lens, 95))
    report.length_max = int(lens.max())
    if report.cutoff_len is not None:
        report.n_truncated = int((lens > report.cutoff_len).sum())


def _valid_numbers(n: int, errors: list[DatasetError]) -> list[int]:
    bad = {e.record for e in errors}
    return [i for i in range(1, n + 1) if i not in bad]


def _short(exc: DatasetError) -> str:
    """The message without the file name (the report prints it once)."""
    if exc.line is not None and exc.record is None:
        col = f", column {exc.column}" if exc.column is not None else ""
        return f"line {exc.line}{col}: {exc.problem}"
    if exc.line is not None:
        col = f", column {exc.column}" if exc.column is not None else ""
        return f"(line {exc.line}{col}) {exc.problem}"
    return exc.problem
