"""Text generation: greedy, sampling (temperature, top-k, top-p), beam search,
repetition penalty, stop strings and streaming, with or without the KV cache.

The engine computes each step's logits; choosing the next token happens on the
host (falcontune._C.sample_token for sampling), which costs O(V) per row. Greedy decoding
without a repetition penalty takes the argmax on the device instead: only the ids of the
new tokens come back, not [B, V] logits.
"""
from __future__ import annotations

import os
import sys
import warnings
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

from . import _C
from .data import get_template, make_prompt, split_response


# greedy tokens per device round (decode_greedy): one host wait per chunk instead of per token
_GREEDY_CHUNK = 16
_GREEDY_CHUNK_STREAM = 4


class _Stepper:
    """Logits of the last position, with the KV cache or by recomputing."""

    def __init__(self, model: Any, use_cache: bool, rows: int, capacity: int) -> None:
        self.engine = model.engine
        self.use_cache = use_cache
        if use_cache:
            self.engine.cache_init(rows, capacity)

    def first(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        if self.use_cache:
            return self.engine.forward_cached(ids, mask)
        return self.engine.forward(ids, mask)[:, -1, :]

    def next(self, ids: np.ndarray, mask: np.ndarray, new: np.ndarray) -> np.ndarray:
        if self.use_cache:  # generated tokens are real tokens: their mask is 1
            return self.engine.decode_step(new)
        return self.engine.forward(ids, mask)[:, -1, :]

    def greedy(self, new: np.ndarray, n: int) -> list[np.ndarray]:
        """The next n greedy ids per row after feeding `new` (cache only): each step's argmax is
        found on the device and fed to the next step there, so the host waits once per n tokens."""
        return list(self.engine.decode_greedy(new, n))

    def reorder(self, rows: np.ndarray) -> None:
        if self.use_cache:
            self.engine.cache_reorder(rows.astype(np.int32))

    def close(self) -> None:
        if self.use_cache:
            self.engine.cache_free()


def _check_ids(model: Any, input_ids: Any, attention_mask: Any) -> tuple[np.ndarray, np.ndarray]:
    ids = np.asarray(input_ids)
    if ids.ndim == 1:
        ids = ids[None, :]
    if ids.ndim != 2 or ids.shape[1] == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"input_ids: expected a non-empty integer array [batch, tokens], got {ids.dtype} {ids.shape}")
    V = model.config.vocab_size
    if ids.min() < 0 or ids.max() >= V:
        raise ValueError(f"input_ids: ids must be in [0, {V})")
    if attention_mask is None:
        mask = np.ones_like(ids, dtype=np.int64)
    else:
        mask = np.asarray(attention_mask)
        if not (np.issubdtype(mask.dtype, np.integer) or mask.dtype == np.bool_):
            raise TypeError(f"attention_mask: expected an integer or bool array of 0/1, got dtype {mask.dtype}")
        mask = mask.astype(np.int64)
        if mask.ndim == 1:
            mask = mask[None, :]
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask: expected shape {ids.shape}, got {mask.shape}")
    return ids.astype(np.int64), mask


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    m = z.max(axis=-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=-1, keepdims=True))


def _apply_repetition_penalty(logits: np.ndarray, seqs: np.ndarray, penalty: float) -> None:
    if penalty == 1.0:
        return
    for row in range(logits.shape[0]):
        prev = np.unique(seqs[row])
        vals = logits[row, prev]
        logits[row, prev] = np.where(vals < 0, vals * penalty, vals / penalty)


def _user_stacklevel() -> int:
    """The warnings stacklevel of the first caller outside falcontune (for the caller of this)."""
    package = os.path.dirname(os.path.abspath(__file__))
    level, frame = 1, sys._getframe(1)
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame, level = frame.f_back, level + 1
    return level


#: sampling parameters and their neutral values (greedy decoding and beam search ignore them)
SAMPLING_DEFAULTS = {"temperature": 1.0, "top_k": 0, "top_p": 1.0}


def check_sampling_args(do_sample: bool, **given: Any) -> list[str]:
    """The names among ``given`` (temperature, top_k, top_p; None = not given) that do nothing
    because ``do_sample`` is False."""
    return [] if do_sample else [k for k, v in given.items() if v is not None]


def generate_ids(model: Any, input_ids: Any, max_new_tokens: int = 32, do_sample: bool = False,
                 temperature: Optional[float] = None, top_k: Optional[int] = None, top_p: Optional[float] = None,
                 num_beams: int = 1,
                 use_cache: bool = True, repetition_penalty: float = 1.0, eos_token_id: Optional[int] = None,
                 pad_token_id: Optional[int] = None, attention_mask: Any = None, seed: Optional[int] = None,
                 length_penalty: float = 1.0, on_token: Optional[Callable[[np.ndarray], bool]] = None) -> np.ndarray:
    """int64 [B, T + n] with n <= max_new_tokens (generation ends when every row has produced EOS).

    Prompts of different lengths are LEFT-padded, with attention_mask 0 on padding.
    ``on_token(new_ids)`` is called after each step with the new token of every row;
    returning True stops generation (used for stop strings and streaming).
    """
    ids, mask = _check_ids(model, input_ids, attention_mask)
    ignored = check_sampling_args(do_sample, temperature=temperature, top_k=top_k, top_p=top_p)
    if ignored:
        warnings.warn(f"{', '.join(ignored)} only apply when sampling: pass do_sample=True (greedy decoding and "
                      "beam search ignore them)", UserWarning, stacklevel=_user_stacklevel())
    temperature = SAMPLING_DEFAULTS["temperature"] if temperature is None else temperature
    top_k = SAMPLING_DEFAULTS["top_k"] if top_k is None else top_k
    top_p = SAMPLING_DEFAULTS["top_p"] if top_p is None else top_p
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    if do_sample and not temperature > 0:
        raise ValueError("do_sample=True needs temperature > 0")
    if not 0.0 < top_p <= 1.0 or top_k < 0 or repetition_penalty <= 0:
        raise ValueError("top_p must be in (0, 1], top_k >= 0, repetition_penalty > 0")
    if eos_token_id is None:
        tok = getattr(model, "tokenizer", None)
        eos_token_id = tok.eos_token_id if tok is not None and tok.eos_token_id is not None else model.config.eos_token_id
    if pad_token_id is None:
        pad_token_id = eos_token_id if eos_token_id is not None else 0
    if max_new_tokens == 0:
        return ids
    if num_beams > 1:
        if do_sample:
            raise ValueError("beam sampling is not supported: use num_beams=1 with do_sample, or do_sample=False")
        return _beam_search(model, ids, mask, max_new_tokens, num_beams, use_cache, eos_token_id,
                            pad_token_id, repetition_penalty, length_penalty)

    B, T = ids.shape
    rng = np.random.default_rng(seed)
    stepper = _Stepper(model, use_cache, B, T + max_new_tokens)
    done = np.zeros(B, dtype=bool)
    device_argmax = use_cache and not do_sample and repetition_penalty == 1.0
    # greedy ids computed ahead on the device, in order; a chunk past an EOS or a stop is dropped
    # (greedy is deterministic: the ids kept are those of one step at a time). Streaming callers
    # get their tokens in smaller bursts.
    chunk = _GREEDY_CHUNK_STREAM if on_token is not None else _GREEDY_CHUNK
    ahead: list[np.ndarray] = []
    try:
        logits = stepper.first(ids, mask)
        for k in range(max_new_tokens):
            if ahead:
                nxt = ahead.pop(0)
            elif do_sample:
                logits = np.array(logits, dtype=np.float32)
                nxt = np.array([_C.sample_token(logits[b], ids[b], repetition_penalty, temperature, top_k, top_p,
                                                float(rng.random())) for b in range(B)], dtype=np.int64)
            else:
                logits = np.array(logits, dtype=np.float32)
                _apply_repetition_penalty(logits, ids, repetition_penalty)
                nxt = logits.argmax(axis=-1).astype(np.int64)
            nxt = np.where(done, pad_token_id, nxt)
            ids = np.concatenate([ids, nxt[:, None]], axis=1)
            mask = np.concatenate([mask, np.ones((B, 1), dtype=np.int64)], axis=1)
            if eos_token_id is not None:
                done |= nxt == eos_token_id
            if on_token is not None and on_token(nxt):
                break
            if done.all():
                break
            if device_argmax:
                if not ahead and k + 1 < max_new_tokens:
                    ahead = stepper.greedy(nxt, min(chunk, max_new_tokens - k - 1))
            elif k + 1 < max_new_tokens:
                logits = stepper.next(ids, mask, nxt)
    finally:
        stepper.close()
    return ids


def _beam_search(model: Any, ids: np.ndarray, mask: np.ndarray, max_new: int, K: int, use_cache: bool,
                 eos: Optional[int], pad: int, penalty: float, length_penalty: float) -> np.ndarray:
    """Beam search with HF's defaults (early_stopping=False, score = logprob / length^length_penalty)."""
    B, T = ids.shape
    seqs = np.repeat(ids, K, axis=0)
    masks = np.repeat(mask, K, axis=0)
    scores = np.full((B, K), -np.inf)
    scores[:, 0] = 0.0  # only the first beam is live at the start
    finished: list[list[tuple[float, np.ndarray]]] = [[] for _ in range(B)]
    closed = np.zeros(B, dtype=bool)
    stepper = _Stepper(model, use_cache, B * K, T + max_new)
    try:
        logits = stepper.first(seqs, masks)
        for step in range(max_new):
            logits = np.array(logits, dtype=np.float32)
            _apply_repetition_penalty(logits, seqs, penalty)
            logp = _log_softmax(logits).reshape(B, K, -1) + scores[:, :, None]
            V = logp.shape[-1]
            flat = logp.reshape(B, K * V)
            top = np.argsort(-flat, axis=1, kind="stable")[:, : 2 * K]
            new_rows = np.zeros(B * K, dtype=np.int64)
            new_tok = np.full(B * K, pad, dtype=np.int64)
            new_scores = np.full((B, K), -np.inf)
            cur_len = T + step + 1 - T  # generated length including this token
            for b in range(B):
                if closed[b]:
                    new_rows[b * K:(b + 1) * K] = b * K
                    continue
                filled = 0
                for rank, c in enumerate(top[b]):
                    beam, tok = divmod(int(c), V)
                    s = float(flat[b, c])
                    if eos is not None and tok == eos:
                        if rank >= K:
                            continue
                        seq = np.concatenate([seqs[b * K + beam], [tok]])
                        finished[b].append((s / (cur_len ** length_penalty), seq))
                        finished[b].sort(key=lambda x: -x[0])
                        del finished[b][K:]
                        continue
                    new_rows[b * K + filled] = b * K + beam
                    new_tok[b * K + filled] = tok
                    new_scores[b, filled] = s
                    filled += 1
                    if filled == K:
                        break
                if len(finished[b]) == K:
                    best_running = new_scores[b].max() / (cur_len ** length_penalty)
                    if finished[b][-1][0] >= best_running:
                        closed[b] = True
            seqs = np.concatenate([seqs[new_rows], new_tok[:, None]], axis=1)
            masks = np.concatenate([masks[new_rows], np.ones((B * K, 1), dtype=np.int64)], axis=1)
            scores = new_scores
            if closed.all():
                break
            stepper.reorder(new_rows)
            logits = stepper.next(seqs, masks, new_tok)
    finally:
        stepper.close()
    # best hypothesis per prompt: finished ones, or the best running beam
    out = []
    gen_len = seqs.shape[1] - T
    for b in range(B):
        cands = list(finished[b])
        if not closed[b]:
            for k in range(K):
                if np.isfinite(scores[b, k]):
                    cands.append((scores[b, k] / (gen_len ** length_penalty), seqs[b * K + k]))
        best = max(cands, key=lambda x: x[0])[1]
        out.append(best)
    width = max(len(s) for s in out)
    return np.stack([np.concatenate([s, np.full(width - len(s), pad, dtype=np.int64)]) for s in out])


class _StreamGate:
    """Sends streamed text on only once it is final, so the pieces add up exactly to the text
    ``generate_text`` returns: text that may still turn out to be the start of a stop string is
    held back, and with ``strip`` (instruction prompts, whose answer is returned stripped) so are
    leading and trailing whitespace."""

    def __init__(self, sink: Callable[[str], Any], stops: Sequence[str], strip: bool) -> None:
        self.sink, self.stops, self.strip = sink, [s for s in stops if s], strip
        self.sent = 0

    def _held(self, text: str) -> int:
        """Length of the longest end of ``text`` that begins some stop string."""
        return max((n for stop in self.stops for n in range(min(len(stop) - 1, len(text)), 0, -1)
                    if stop.startswith(text[-n:])), default=0)

    def update(self, text: str, final: bool) -> None:
        visible = text.lstrip() if self.strip else text
        end = len(visible) if final else len(visible) - self._held(visible)
        if self.strip:
            end = len(visible[:end].rstrip())
        if end > self.sent:
            self.sink(visible[self.sent:end])
            self.sent = end


def generate_text(model: Any, prompt: Union[str, Sequence[str], None] = None, input_ids: Any = None,
                  instruction: Optional[str] = None, input: str = "", template: str = "alpaca",
                  max_new_tokens: int = 128, stop: Union[str, Sequence[str], None] = None,
                  stream: Optional[Callable[[str], Any]] = None, **kw: Any) -> Union[str, list[str]]:
    """Generate a continuation and return it as text (without the prompt).

    ``instruction=``/``input=`` build the Alpaca prompt (or ``template="fr"``) and return only
    the response, as falcontune does: generation stops where the model starts another response
    section, and the answer is stripped. ``stream`` receives text pieces as they are produced;
    joined, they equal the returned text. ``stop`` strings end generation; the returned text
    stops before them.
    """
    tok = model.tokenizer
    if tok is None:
        raise ValueError("this model has no tokenizer: pass tokenizer= to load_model (a tokenizer.json), "
                         "or call generate_ids with token ids")
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if instruction is not None:
        if prompt is not None:
            raise ValueError("give either prompt= or instruction=, not both")
        prompt = make_prompt(instruction, input or "", template=template)
        stops.append(get_template(template).response_marker)  # the answer ends where another begins
    if input_ids is not None:
        ids, mask = _check_ids(model, input_ids, kw.pop("attention_mask", None))
        batch = False
    elif isinstance(prompt, str):
        enc = tok.encode(prompt)
        if not enc:
            raise ValueError("prompt is empty after tokenization")
        ids, mask = np.array([enc], dtype=np.int64), np.ones((1, len(enc)), dtype=np.int64)
        batch = False
    elif prompt is not None:
        encs = [tok.encode(p) for p in prompt]
        if not encs or any(not e for e in encs):
            raise ValueError("prompt list is empty or holds an empty prompt")
        width = max(len(e) for e in encs)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        ids = np.array([[pad] * (width - len(e)) + e for e in encs], dtype=np.int64)  # left padding
        mask = np.array([[0] * (width - len(e)) + [1] * len(e) for e in encs], dtype=np.int64)
        batch = True
    else:
        raise ValueError("give prompt=, instruction= or input_ids=")
    if stream is not None and ids.shape[0] != 1:
        raise ValueError("stream= works with a single prompt")

    B, T = ids.shape
    decoders = [tok.stream_decoder() for _ in range(B)]
    texts = [""] * B
    stopped = np.zeros(B, dtype=bool)
    eos = tok.eos_token_id
    gate = _StreamGate(stream, stops, strip=instruction is not None) if stream is not None else None

    def on_token(new: np.ndarray) -> bool:
        for b in range(B):
            if stopped[b]:
                continue
            if eos is not None and new[b] == eos:
                stopped[b] = True
                continue
            texts[b] += decoders[b].push(int(new[b]))
            cut = _stop_index(texts[b], stops)
            if cut is not None:
                texts[b] = texts[b][:cut]
                stopped[b] = True
            if gate is not None:
                gate.update(texts[b], final=False)
        return bool(stopped.all())

    if kw.get("num_beams", 1) == 1:
        generate_ids(model, ids, max_new_tokens=max_new_tokens, attention_mask=mask, on_token=on_token, **kw)
        for b in range(B):
            if not stopped[b]:
                texts[b] += decoders[b].flush()
                cut = _stop_index(texts[b], stops)
                texts[b] = texts[b] if cut is None else texts[b][:cut]
    else:  # beam search picks its winner at the end: decode it then
        out = generate_ids(model, ids, max_new_tokens=max_new_tokens, attention_mask=mask, **kw)
        for b in range(B):
            new = [int(t) for t in out[b, T:]]
            if eos is not None and eos in new:
                new = new[: new.index(eos)]
            text = tok.decode(new)
            cut = _stop_index(text, stops)
            texts[b] = text if cut is None else text[:cut]
    if gate is not None:
        gate.update(texts[0], final=True)
    if instruction is not None:
        texts = [split_response(prompt + t, template) for t in texts]  # type: ignore[operator]
    return texts if batch else texts[0]


def _stop_index(text: str, stops: Sequence[str]) -> Optional[int]:
    cuts = [text.find(s) for s in stops if s and s in text]
    return min(cuts) if cuts else None
