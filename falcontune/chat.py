"""Chat data (``data_type="chat"``): conversations, chat templates, and the tokens of assistant turns.

Records, one shape per file (the first valid record decides it):

* OpenAI: ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``
* ShareGPT: ``{"conversations": [{"from": "system"|"human"|"gpt", "value": str}, ...]}``

Both become ``{"messages": [{"role", "content"}, ...], "format": shape}`` with OpenAI roles.

Templates. A conversation is rendered with a Jinja2 chat template the way Hugging Face's
``apply_chat_template`` renders it: a sandboxed environment with ``trim_blocks`` and
``lstrip_blocks``, the ``loopcontrols`` extension, ``raise_exception(msg)``, ``strftime_now(fmt)``,
a ``tojson`` that keeps non-ASCII characters, and the variables ``messages``, ``add_generation_prompt``,
``bos_token``, ``eos_token`` (and the tokenizer's other special tokens). The template is, in order:
``--chat_template`` (a built-in name, a .jinja file, or a tokenizer_config.json), else the
``chat_template`` of the tokenizer_config.json (or chat_template.jinja) next to tokenizer.json,
else the built-in ``falcon`` template (Falcon-instruct's ``User:`` / ``Assistant:`` lines).

Assistant turns are found by rendering prefixes, never by searching text: assistant turn i spans
from the end of ``render(messages[:i], add_generation_prompt=True)`` (the prompt a model sees at
generation time) to the end of ``render(messages[:i+1])``; both must be prefixes of the whole
rendering. The rendered text is cut at those boundaries and each piece is encoded on its own, so
the prompt tokens of turn i are exactly what ``encode_chat(..., add_generation_prompt=True)``
gives at generation time. An assistant turn whose tokens hold no EOS gets one appended (the model
learns to stop). By default only assistant tokens carry a loss (``train_on_inputs`` adds the rest).
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from .data import IGNORE_INDEX, TokenizedDataset

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "gpt": "assistant"}
SHAPES = {"openai": ("messages", "role", "content"), "sharegpt": ("conversations", "from", "value")}

# Falcon-instruct's turn format (System: / User: / Assistant: lines); every assistant turn ends
# with EOS. The generation prompt ends with "Assistant:" and the answer starts with its space, so
# the prompt's tokens are the same whether the answer follows or not.
FALCON_TEMPLATE = """\
{%- for message in messages -%}
{%- if not loop.first %}{{ '\\n' }}{% endif -%}
{%- if message['role'] == 'system' -%}
{{ 'System: ' + message['content'] }}
{%- elif message['role'] == 'user' -%}
{{ 'User: ' + message['content'] }}
{%- elif message['role'] == 'assistant' -%}
{{ 'Assistant: ' + message['content'] + eos_token }}
{%- else -%}
{{ raise_exception('unknown role ' + message['role']) }}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
{%- if messages %}{{ '\\n' }}{% endif %}{{ 'Assistant:' }}
{%- endif -%}
"""

# ChatML (<|im_start|>role ... <|im_end|>), common in chat datasets and templates.
CHATML_TEMPLATE = """\
{%- for message in messages -%}
{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif -%}
"""

BUILTIN_TEMPLATES: dict[str, str] = {"falcon": FALCON_TEMPLATE, "chatml": CHATML_TEMPLATE}


class ChatTemplateError(ValueError):
    """A chat template that cannot be read, compiled or rendered (one line, names the template)."""


# ------------------------------------------------------------------------------------ records
@dataclass
class ConversationValidator:
    """Validates chat records of one file; the first valid record fixes the file's shape."""

    shape: Optional[str] = None
    shape_record: int = 0

    def __call__(self, value: Any, number: int) -> dict[str, Any]:
        """The record as ``{"messages": [...] (OpenAI roles), "format": "openai"|"sharegpt"}``;
        ValueError with the problem."""
        if not isinstance(value, dict):
            raise ValueError("expected a JSON object with 'messages' (OpenAI) or 'conversations' (ShareGPT)")
        found = [s for s, (key, _, _) in SHAPES.items() if key in value]
        if not found:
            raise ValueError("no 'messages' (OpenAI) or 'conversations' (ShareGPT) field"
                             + (" (this looks like alpaca data: use --data_type=alpaca)"
                                if "instruction" in value else ""))
        if len(found) > 1:
            raise ValueError("has both 'messages' and 'conversations': expected one of them")
        shape = found[0]
        if self.shape is None:
            self.shape, self.shape_record = shape, number
        elif shape != self.shape:
            raise ValueError(f"mixed shapes: this record uses '{SHAPES[shape][0]}' but record "
                             f"{self.shape_record} uses '{SHAPES[self.shape][0]}'; one shape per file")
        key, role_key, text_key = SHAPES[shape]
        turns = value[key]
        if not isinstance(turns, list):
            raise ValueError(f"field '{key}' is {_kind(turns)}, expected an array of messages")
        if not turns:
            raise ValueError(f"empty conversation: '{key}' has no message")
        roles = ROLES if shape == "openai" else tuple(SHAREGPT_ROLES)
        messages = []
        for k, turn in enumerate(turns, start=1):
            if not isinstance(turn, dict):
                raise ValueError(f"message {k} is {_kind(turn)}, expected an object with '{role_key}' and "
                                 f"'{text_key}'")
            role, text = turn.get(role_key), turn.get(text_key)
            if role not in roles:
                what = f"unknown role {role!r}" if isinstance(role, str) else f"'{role_key}' is {_kind(role)}"
                raise ValueError(f"message {k}: {what}; expected {', '.join(roles)}")
            if not isinstance(text, str):
                raise ValueError(f"message {k} ({role}): '{text_key}' is {_kind(text)}, expected a string")
            messages.append({"role": role if shape == "openai" else SHAREGPT_ROLES[role], "content": text})
        return {"messages": messages, "format": shape}


def _kind(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


# ---------------------------------------------------------------------------------- templates
def _token_text(value: Any) -> Optional[str]:
    """A special token of tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


@dataclass(frozen=True)
class ChatTemplate:
    """A Jinja2 chat template and the special tokens it is rendered with."""

    name: str
    source: str
    special_tokens: Mapping[str, str] = field(default_factory=dict)  # bos_token, eos_token, ...

    @cached_property
    def _compiled(self) -> Any:
        try:
            import jinja2
            from jinja2.ext import loopcontrols
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError:
            raise ChatTemplateError("chat templates need the jinja2 package: pip install 'jinja2>=3.1'") from None

        def raise_exception(message: str) -> None:
            raise jinja2.exceptions.TemplateError(message)

        def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
                   sort_keys: bool = False) -> str:
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                              sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)  # used by some Hub templates
        try:
            return env.from_string(self.source)
        except jinja2.exceptions.TemplateSyntaxError as exc:
            raise ChatTemplateError(f"chat template {self.name}: syntax error at line {exc.lineno}: "
                                    f"{exc.message}") from None

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False) -> str:
        compiled = self._compiled  # first: a clear error when jinja2 is missing
        import jinja2

        tokens = {"bos_token": "", "eos_token": "", **self.special_tokens}
        try:
            return str(compiled.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                       tools=None, documents=None, **tokens))
        except jinja2.exceptions.TemplateError as exc:
            raise ChatTemplateError(f"chat template {self.name} failed to render: "
                                    f"{' '.join(str(exc).split()) or type(exc).__name__}") from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, ZeroDivisionError) as exc:
            # Python errors inside the template's expressions (e.g. str + int) are failures to render too
            raise ChatTemplateError(f"chat template {self.name} failed to render: {type(exc).__name__}: "
                                    f"{' '.join(str(exc).split())}") from None


def _tokenizer_dir(tokenizer: Any) -> Optional[Path]:
    source = getattr(tokenizer, "source", None)
    return Path(source).parent if source else None


def _config_template(config: Mapping[str, Any], where: str) -> Optional[str]:
    tpl = config.get("chat_template")
    if tpl is None or isinstance(tpl, str):
        return tpl
    if isinstance(tpl, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
    raise ChatTemplateError(f"{where}: 'chat_template' is neither a string nor a list with a 'default' template")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ChatTemplateError(f"{path}: cannot read it as JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ChatTemplateError(f"{path}: expected a JSON object (tokenizer_config.json)")
    return value


def special_tokens(tokenizer: Any) -> dict[str, str]:
    """bos/eos/unk/pad token strings: tokenizer_config.json next to tokenizer.json, else the
    tokenizer's EOS."""
    out: dict[str, str] = {}
    eos_id = getattr(tokenizer, "eos_token_id", None)
    if eos_id is not None and hasattr(tokenizer, "id_to_token"):
        out["eos_token"] = tokenizer.id_to_token(eos_id) or ""
    folder = _tokenizer_dir(tokenizer)
    if folder is not None and (folder / "tokenizer_config.json").is_file():
        config = _read_json(folder / "tokenizer_config.json")
        for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
            text = _token_text(config.get(name))
            if text is not None:
                out[name] = text
    return out


def resolve_template(spec: Optional[str], tokenizer: Any = None) -> ChatTemplate:
    """The chat template to use (see the module docstring for the order)."""
    tokens = special_tokens(tokenizer) if tokenizer is not None else {}
    if spec is None:
        folder = _tokenizer_dir(tokenizer) if tokenizer is not None else None
        if folder is not None:
            if (folder / "chat_template.jinja").is_file():
                path = folder / "chat_template.jinja"
                return ChatTemplate(str(path), path.read_text(encoding="utf-8"), tokens)
            if (folder / "tokenizer_config.json").is_file():
                path = folder / "tokenizer_config.json"
                source = _config_template(_read_json(path), str(path))
                if source is not None:
                    return ChatTemplate(str(path), source, tokens)
        return ChatTemplate("falcon (built-in)", FALCON_TEMPLATE, tokens)
    if spec in BUILTIN_TEMPLATES:
        return ChatTemplate(f"{spec} (built-in)", BUILTIN_TEMPLATES[spec], tokens)
    path = Path(spec)
    if not path.is_file():
        raise ChatTemplateError(f"--chat_template={spec}: not a built-in template "
                                f"({', '.join(BUILTIN_TEMPLATES)}) nor a file")
    if path.suffix.lower() == ".json":
        source = _config_template(_read_json(path), str(path))
        if source is None:
            raise ChatTemplateError(f"{path}: no 'chat_template' in this file")
        return ChatTemplate(str(path), source, tokens)
    try:
        return ChatTemplate(str(path), path.read_text(encoding="utf-8"), tokens)
    except (OSError, UnicodeDecodeError) as exc:
        raise ChatTemplateError(f"--chat_template={spec}: cannot read it ({exc})") from None


# ------------------------------------------------------------------------- assistant spans
def _prefix_end(template: ChatTemplate, full: str, messages: Sequence[Mapping[str, Any]], i: int) -> int:
    """Where assistant turn i starts in ``full``: after the generation prompt (or, for a template
    whose generation prompt is not how it starts an assistant turn, after the previous turns)."""
    for with_prompt in (True, False):
        head = template.render(messages[:i], add_generation_prompt=with_prompt)
        if full.startswith(head):
            return len(head)
    raise ChatTemplateError(f"chat template {template.name}: the conversation up to message {i} does not "
                            f"render as the start of the whole conversation, so assistant turn {i + 1} "
                            "cannot be located (the template rewrites earlier turns)")


def chat_pieces(template: ChatTemplate, messages: Sequence[Mapping[str, Any]],
                add_generation_prompt: bool = False) -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, is_assistant_turn) pieces, in order; their
    concatenation is ``template.render(messages, add_generation_prompt)``."""
    full = template.render(messages, add_generation_prompt=add_generation_prompt)
    pieces: list[tuple[str, bool]] = []
    pos = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = _prefix_end(template, full, messages, i)
        turn = template.render(messages[: i + 1])
        if not full.startswith(turn) or start < pos or len(turn) < start:
            raise ChatTemplateError(f"chat template {template.name}: assistant turn {i + 1} does not render "
                                    "as a continuation of the turns before it")
        pieces += [(full[pos:start], False), (full[start:len(turn)], True)]
        pos = len(turn)
    pieces.append((full[pos:], False))
    return [(text, is_assistant) for text, is_assistant in pieces if text or is_assistant]


def _pieces_to_ids(pieces: list[tuple[str, bool]], encoded: list[list[int]], eos: Optional[int],
                   train_on_inputs: bool) -> tuple[list[int], list[int], int]:
    """(ids, labels, tokens before the first assistant turn) of one conversation."""
    ids: list[int] = []
    labels: list[int] = []
    first = -1
    for (_, is_assistant), piece in zip(pieces, encoded):
        if is_assistant:
            if first < 0:
                first = len(ids)
            if eos is not None and eos not in piece:
                piece = piece + [eos]
            labels += piece
        else:
            labels += piece if train_on_inputs else [IGNORE_INDEX] * len(piece)
        ids += piece
    return ids, labels, (len(ids) if first < 0 else first)


def encode_chat(template: ChatTemplate, messages: Sequence[Mapping[str, Any]], tokenizer: Any,
                add_generation_prompt: bool = True) -> list[int]:
    """Token ids of a conversation as training encodes it; with ``add_generation_prompt`` the
    prompt for the next assistant turn (for generation)."""
    pieces = chat_pieces(template, messages, add_generation_prompt)
    encoded = tokenizer.encode_batch([text for text, _ in pieces], add_special_tokens=False)
    return _pieces_to_ids(pieces, encoded, getattr(tokenizer, "eos_token_id", None), True)[0]


class RecordError(ValueError):
    """A conversation that cannot be rendered: its 1-based index in the records and why."""

    def __init__(self, index: int, problem: str) -> None:
        self.index, self.problem = index, problem
        super().__init__(f"record {index}: {problem}")


def render_all(template: ChatTemplate, records: Sequence[Mapping[str, Any]]
               ) -> tuple[list[Optional[list[tuple[str, bool]]]], list[RecordError]]:
    """The pieces of every record (None where it failed) and the failures."""
    out: list[Optional[list[tuple[str, bool]]]] = []
    errors: list[RecordError] = []
    for n, rec in enumerate(records, start=1):
        try:
            out.append(chat_pieces(template, rec["messages"]))
        except ChatTemplateError as exc:
            out.append(None)
            errors.append(RecordError(n, str(exc)))
    return out, errors


def _tokenize_pieces(pieces: Sequence[list[tuple[str, bool]]], tokenizer: Any, cutoff_len: Optional[int],
                     train_on_inputs: bool, add_eos: bool) -> TokenizedDataset:
    counts = [len(p) for p in pieces]
    flat = tokenizer.encode_batch([text for p in pieces for text, _ in p], add_special_tokens=False)
    eos = getattr(tokenizer, "eos_token_id", None) if add_eos else None
    if add_eos and eos is None:
        raise ValueError("tokenizer has no EOS token id: pass eos_token_id when loading it, or add_eos=False")
    n = len(pieces)
    inputs, labels = [], []
    prompt_lengths = np.zeros(n, dtype=np.int64)
    truncated = np.zeros(n, dtype=bool)
    at = 0
    for i, (p, c) in enumerate(zip(pieces, counts)):
        ids, ys, prompt_lengths[i] = _pieces_to_ids(p, flat[at:at + c], eos, train_on_inputs)
        at += c
        if cutoff_len is not None and len(ids) > cutoff_len:
            ids, ys, truncated[i] = ids[:cutoff_len], ys[:cutoff_len], True
        inputs.append(np.asarray(ids, dtype=np.int32))
        labels.append(np.asarray(ys, dtype=np.int32))
    return TokenizedDataset(inputs, labels, prompt_lengths, truncated, cutoff_len)


def tokenize_conversations(records: Sequence[Mapping[str, Any]], tokenizer: Any, cutoff_len: Optional[int],
                           train_on_inputs: bool = False, add_eos: bool = True,
                           chat_template: Optional[str] = None) -> TokenizedDataset:
    """Tokenize validated chat records (see the module docstring). A conversation longer than
    ``cutoff_len`` is cut there. Raises RecordError for the first record the template cannot
    render (check_dataset lists them all)."""
    template = resolve_template(chat_template, tokenizer)
    rendered, errors = render_all(template, records)
    if errors:
        raise errors[0]
    return _tokenize_pieces([p for p in rendered if p is not None], tokenizer, cutoff_len, train_on_inputs,
                            add_eos)


def describe(report: Any, records: Sequence[Mapping[str, Any]], numbers: Sequence[int], tokenizer: Any,
             cutoff_len: Optional[int], chat_template: Optional[str]) -> None:
    """check_dataset's part for chat: turns, roles, the template (each record rendered), and with a
    tokenizer the token lengths and the share of learned (assistant) tokens."""
    from .data import set_lengths

    if not records:
        return
    shape = records[0]["format"]
    turns = np.array([len(r["messages"]) for r in records])
    roles = Counter(m["role"] for r in records for m in r["messages"])
    for num, r in zip(numbers, records):
        if not any(m["role"] == "assistant" for m in r["messages"]):
            report.warnings.append((num, "no assistant turn: nothing to learn (unless --train_on_inputs=true)"))
    report.details += [
        f"conversations ({SHAPES[shape][0]}, {'OpenAI' if shape == 'openai' else 'ShareGPT'}): "
        f"tours / turns {int(turns.sum())}, moyenne / mean {turns.mean():.1f}, max {int(turns.max())}",
        "rôles / roles: " + ", ".join(f"{role} {roles[role]}" for role in ROLES)]
    try:
        template = resolve_template(chat_template, tokenizer)
    except ChatTemplateError as exc:
        report.errors.append((0, str(exc)))
        return
    report.details.append(f"modèle de conversation / chat template: {template.name}")
    rendered, errors = render_all(template, records)
    report.errors += [(numbers[e.index - 1], e.problem) for e in errors]
    report.n_valid -= len(errors)
    pieces = [p for p in rendered if p is not None]
    if tokenizer is None or not pieces:
        return
    ds = _tokenize_pieces(pieces, tokenizer, None, train_on_inputs=False, add_eos=True)
    set_lengths(report, ds.lengths)
    learned = int(ds.n_label_tokens.sum())
    report.details.append(f"tokens appris / learned tokens (assistant): {learned} "
                          f"({100.0 * learned / max(1, int(ds.lengths.sum())):.0f} %)")
