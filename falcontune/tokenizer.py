"""Tokenizer wrapper around the Hugging Face ``tokenizers`` package.

Falcon ships a byte-level BPE tokenizer (``tokenizer.json``).  This module
wraps it with the few methods the rest of falcontune needs, a streaming
detokenizer that never cuts a UTF-8 character in half, and a trainer for the
small tokenizer used by the ``demo`` model.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

PathLike = Union[str, "os.PathLike[str]"]

EOS_TOKEN = "<|endoftext|>"

# Falcon's first twelve ids are special tokens; "<|endoftext|>" (id 11) is EOS.
FALCON_SPECIAL_TOKENS: tuple[str, ...] = (
    ">>TITLE<<",
    ">>ABSTRACT<<",
    ">>INTRODUCTION<<",
    ">>SUMMARY<<",
    ">>COMMENT<<",
    ">>ANSWER<<",
    ">>QUESTION<<",
    ">>DOMAIN<<",
    ">>PREFIX<<",
    ">>SUFFIX<<",
    ">>MIDDLE<<",
    EOS_TOKEN,
)

FALCON_TOKENIZER_URL = "https://huggingface.co/tiiuae/falcon-7b/resolve/main/tokenizer.json"

TOKENIZER_HELP = (
    "download tokenizer.json from the model's Hugging Face repository (the Falcon 7B/40B "
    f"family shares one: wget {FALCON_TOKENIZER_URL}) and put it next to the weights "
    "(.safetensors) or next to config.json, or pass tokenizer=PATH (--tokenizer=PATH on the "
    "command line)"
)


def missing_tokenizer_error(model: object) -> ValueError:
    """The error for a model loaded without a tokenizer when one is needed."""
    return ValueError(f"model {model!s}: no tokenizer.json next to the model or its weights; "
                      f"{TOKENIZER_HELP}")

_REPLACEMENT_CHAR = "\ufffd"


def _ids_list(ids: Iterable[int]) -> list[int]:
    """Plain Python ints (accepts lists, tuples and numpy arrays)."""
    if hasattr(ids, "tolist"):
        ids = ids.tolist()  # type: ignore[union-attr]
    return [int(i) for i in ids]


class Tokenizer:
    """A thin, typed wrapper over ``tokenizers.Tokenizer``."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        eos_token_id: Optional[int] = None,
        pad_token_id: Optional[int] = None,
        source: Optional[str] = None,
    ) -> None:
        """``eos_token_id`` is the fallback used when the vocabulary has no
        "<|endoftext|>"; ``pad_token_id`` defaults to the EOS id."""
        backend.no_truncation()
        backend.no_padding()
        self._tok = backend
        self.source = source
        found = backend.token_to_id(EOS_TOKEN)
        self.eos_token_id: Optional[int] = found if found is not None else eos_token_id
        self.pad_token_id: Optional[int] = (
            pad_token_id if pad_token_id is not None else self.eos_token_id
        )

    # -- construction ---------------------------------------------------
    @classmethod
    def from_file(
        cls,
        path: PathLike,
        eos_token_id: Optional[int] = None,
        pad_token_id: Optional[int] = None,
    ) -> "Tokenizer":
        """Load a ``tokenizer.json`` file, or the one inside a directory."""
        p = Path(path)
        candidate = p / "tokenizer.json" if p.is_dir() else p
        if not candidate.is_file():
            raise FileNotFoundError(
                f"tokenizer not found: looked for {candidate}; {TOKENIZER_HELP}"
            )
        try:
            backend = tokenizers.Tokenizer.from_file(str(candidate))
        except Exception as exc:  # the Rust side raises plain Exception
            raise ValueError(
                f"{candidate}: not a valid Hugging Face tokenizer.json ({exc}); "
                f"{TOKENIZER_HELP}"
            ) from exc
        return cls(backend, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                   source=str(candidate))

    @classmethod
    def from_str(cls, json_text: str, eos_token_id: Optional[int] = None) -> "Tokenizer":
        """Build from the JSON text of a tokenizer.json."""
        return cls(tokenizers.Tokenizer.from_str(json_text), eos_token_id=eos_token_id)

    def save(self, path: PathLike) -> Path:
        """Write tokenizer.json (to ``path``, or inside it when it is a directory).

        The file is written under a temporary name and renamed into place.
        """
        target = Path(path)
        if target.is_dir():
            target = target / "tokenizer.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tokenizer-", suffix=".json.tmp",
                                   dir=str(target.parent))
        os.close(fd)
        try:
            self._tok.save(tmp)
            os.replace(tmp, target)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return target

    # -- properties -----------------------------------------------------
    @property
    def backend(self) -> tokenizers.Tokenizer:
        return self._tok

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> Optional[int]:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> Optional[str]:
        return self._tok.id_to_token(int(token_id))

    # -- encoding / decoding -------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(
        self, texts: Sequence[str], add_special_tokens: bool = False
    ) -> list[list[int]]:
        encs = self._tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        return [e.ids for e in encs]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(_ids_list(ids), skip_special_tokens=skip_special_tokens)

    def stream_decoder(self, skip_special_tokens: bool = True) -> "StreamDecoder":
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, eos_token_id={self.eos_token_id}, "
                f"pad_token_id={self.pad_token_id}, source={self.source!r})")


class StreamDecoder:
    """Incremental detokenizer for streaming generation.

    ``push(id)`` returns the text that became final with this token (possibly
    ""), ``flush()`` whatever is still held back.  Byte-level BPE tokens may end
    inside a multi-byte UTF-8 character; such text decodes to a trailing U+FFFD
    and is held back until the following tokens complete it.  The concatenation
    of every piece plus ``flush()`` equals ``tokenizer.decode(all_ids)``.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # start of the decoding window (already emitted text)
        self._read = 0  # end of the text already emitted

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def push(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        done = self._decode(self._ids[self._prefix:self._read])
        text = self._decode(self._ids[self._prefix:])
        if len(text) > len(done) and not text.endswith(_REPLACEMENT_CHAR):
            piece = text[len(done):]
            self._prefix = self._read
            self._read = len(self._ids)
            return piece
        return ""

    def extend(self, token_ids: Iterable[int]) -> str:
        return "".join(self.push(t) for t in _ids_list(token_ids))

    def flush(self) -> str:
        """Return held-back text (an incomplete character decodes as U+FFFD)."""
        done = self._decode(self._ids[self._prefix:self._read])
        text = self._decode(self._ids[self._prefix:])
        self._prefix = self._read = len(self._ids)
        return text[len(done):]

    @property
    def ids(self) -> list[int]:
        return list(self._ids)


def _falcon_like_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """The same pre-tokenization pipeline as Falcon's tokenizer.json."""
    return pre_tokenizers.Sequence([
        pre_tokenizers.Punctuation(behavior="contiguous"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        pre_tokenizers.Digits(individual_digits=False),
        pre_tokenizers.Split(tokenizers.Regex("[0-9][0-9][0-9]"), behavior="isolated"),
    ])


def train_demo_tokenizer(
    texts: Sequence[str],
    vocab_size: int = 2048,
    out_path: Optional[PathLike] = None,
) -> Tokenizer:
    """Train a small byte-level BPE shaped like Falcon's.

    Ids 0..11 are Falcon's special tokens, so "<|endoftext|>" is 11 as in the
    real model; the 256 byte symbols follow, then the learned merges.  The
    result depends only on ``texts`` and ``vocab_size``.  When ``out_path`` is
    given the tokenizer.json is written there (atomically).
    """
    n_min = len(FALCON_SPECIAL_TOKENS) + 256
    if vocab_size < n_min:
        raise ValueError(f"vocab_size={vocab_size}: expected at least {n_min} "
                         f"(12 special tokens + 256 bytes)")
    if not texts:
        raise ValueError("train_demo_tokenizer: expected at least one training text")
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = _falcon_like_pre_tokenizer()
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(FALCON_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(list(texts), trainer=trainer)
    tok = Tokenizer(backend)
    if tok.eos_token_id != 11:  # pragma: no cover - guards a tokenizers change
        raise RuntimeError(f"demo tokenizer: {EOS_TOKEN} got id {tok.eos_token_id}, "
                           f"expected 11")
    if out_path is not None:
        tok.source = str(tok.save(out_path))
    return tok
