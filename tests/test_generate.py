"""model.generate / generate_ids: options, streaming, stop strings, prompts (CPU)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import falcontune as ft
from falcontune import testing
from falcontune.data import make_prompt
from falcontune.tokenizer import train_demo_tokenizer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("gen")
    recs = json.loads((REPO / "datasets" / "fr_instructions.json").read_text(encoding="utf-8"))
    texts = [f"{r['instruction']} {r['input']} {r['output']}" for r in recs]
    tok = train_demo_tokenizer(texts, vocab_size=512, out_path=d / "tokenizer.json")
    testing.make_checkpoint(d, preset="tiny", bits=4, group_size=32, seed=1, vocab_size=tok.vocab_size)
    m = ft.load_model(d, device="cpu")
    assert m.tokenizer is not None
    # a LoRA that makes the output less repetitive than the bare random model
    m.add_lora(r=4, alpha=32, dropout=0.0, target_modules=["query_key_value", "dense_4h_to_h"])
    rng = np.random.default_rng(0)
    m.load_lora_state_dict({k: (rng.standard_normal(v.shape) * 0.5).astype(np.float32)
                            for k, v in m.lora_state_dict().items()})
    return m


def test_stream_pieces_equal_result(model):
    pieces: list[str] = []
    text = model.generate(prompt="Bonjour, pouvez-vous m'aider ?", max_new_tokens=12, stream=pieces.append,
                          do_sample=True, temperature=1.0, seed=3)
    assert "".join(pieces) == text
    assert len(pieces) >= 2  # produced piece by piece, not at the end


def test_seeded_sampling_reproducible_and_options_change_output(model):
    kw = dict(prompt="Résumez ce texte.", max_new_tokens=10, do_sample=True, temperature=1.2, seed=5)
    a, b = model.generate(**kw), model.generate(**kw)
    assert a == b
    outs = {model.generate(**{**kw, "seed": s}) for s in range(6)}
    assert len(outs) > 1
    greedy = model.generate(prompt="Résumez ce texte.", max_new_tokens=10)
    assert greedy == model.generate(prompt="Résumez ce texte.", max_new_tokens=10, top_k=1, do_sample=True, seed=9)


def test_stop_strings(model):
    full = model.generate(prompt="Écrivez une lettre.", max_new_tokens=16)
    assert len(full) > 3
    stop = full[2:4]
    cut = model.generate(prompt="Écrivez une lettre.", max_new_tokens=16, stop=stop)
    assert cut == full[: full.find(stop)]
    assert stop not in cut


def test_instruction_returns_only_the_response(model):
    out = model.generate(instruction="Traduisez en français.", input="Good morning", max_new_tokens=8)
    assert "### Response" not in out and "Instruction" not in out
    prompt = make_prompt("Traduisez en français.", "Good morning")
    direct = model.generate(prompt=prompt, max_new_tokens=8)
    assert out == direct.split("###")[0].strip()


def test_batch_of_prompts_matches_single(model):
    prompts = ["Bonjour", "Quelle est la capitale de la France ?"]
    batch = model.generate(prompt=prompts, max_new_tokens=6)
    assert isinstance(batch, list) and len(batch) == 2
    for p, out in zip(prompts, batch):
        assert out == model.generate(prompt=p, max_new_tokens=6)


def test_beam_search_and_repetition_penalty(model):
    ids = np.array([model.tokenizer.encode("Bonjour, madame")])
    beams = model.generate_ids(ids, max_new_tokens=6, num_beams=4, eos_token_id=-1)
    assert beams.shape == (1, ids.shape[1] + 6)
    # beam search finds a sequence at least as likely as greedy
    greedy = model.generate_ids(ids, max_new_tokens=6, eos_token_id=-1)

    def logprob(seq):
        logits = model.forward(seq[:, :-1]).astype(np.float64)[0]
        lp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
        n = ids.shape[1]
        return sum(lp[t - 1, seq[0, t]] for t in range(n, seq.shape[1]))

    assert logprob(beams) >= logprob(greedy) - 1e-6
    pen = model.generate_ids(ids, max_new_tokens=8, repetition_penalty=5.0, eos_token_id=-1)
    new = pen[0, ids.shape[1]:]
    assert len(set(new.tolist())) >= len(set(greedy[0, ids.shape[1]:].tolist()))


def test_eos_stops_and_pads(model):
    ids = np.array([model.tokenizer.encode("Bonjour")] * 2)
    first = model.generate_ids(ids, max_new_tokens=1, eos_token_id=-1)[0, -1]
    out = model.generate_ids(ids, max_new_tokens=5, eos_token_id=int(first))
    assert out.shape[1] == ids.shape[1] + 1  # every row ended at once


@pytest.mark.parametrize("chunk", [1, 3, 16])
def test_greedy_chunks_on_the_device_match_stepping(model, monkeypatch, chunk):
    """Greedy generation with the cache runs decode_greedy in chunks (ids fed back on the device,
    ids computed past an EOS or a stop dropped): the same ids as recomputing every step without
    the cache, for rows that end at different steps, a stop mid-chunk and a length not a
    multiple of the chunk."""
    import falcontune.generate as gen
    monkeypatch.setattr(gen, "_GREEDY_CHUNK", chunk)
    monkeypatch.setattr(gen, "_GREEDY_CHUNK_STREAM", chunk)
    rng = np.random.default_rng(4)
    ids = rng.integers(0, model.config.vocab_size, size=(3, 6))
    mask = np.ones_like(ids)
    mask[2, :2] = 0
    ref = model.generate_ids(ids, max_new_tokens=11, attention_mask=mask, eos_token_id=-1, use_cache=False)
    got = model.generate_ids(ids, max_new_tokens=11, attention_mask=mask, eos_token_id=-1)
    np.testing.assert_array_equal(got, ref)
    # an EOS that row 0 reaches at its 5th token: row 0 is padded from there, the others go on
    eos = int(ref[0, 6 + 4])
    ref = model.generate_ids(ids, max_new_tokens=11, attention_mask=mask, eos_token_id=eos, use_cache=False)
    got = model.generate_ids(ids, max_new_tokens=11, attention_mask=mask, eos_token_id=eos)
    np.testing.assert_array_equal(got, ref)
    # a callback that stops after the 7th token
    seen: list[np.ndarray] = []

    def stop(tok: np.ndarray) -> bool:
        seen.append(tok)
        return len(seen) == 7
    got = model.generate_ids(ids, max_new_tokens=11, attention_mask=mask, eos_token_id=-1, on_token=stop)
    assert got.shape == (3, 13) and len(seen) == 7
    np.testing.assert_array_equal(got, model.generate_ids(ids, max_new_tokens=7, attention_mask=mask,
                                                          eos_token_id=-1, use_cache=False))


def test_errors(model):
    with pytest.raises(ValueError, match="prompt"):
        model.generate()
    with pytest.raises(ValueError, match="temperature"):
        model.generate(prompt="x", do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="input_ids"):
        model.generate_ids(np.array([[10_000]]))
    with pytest.raises(ValueError, match="single prompt"):
        model.generate(prompt=["a", "b"], stream=print)


def test_streamed_pieces_are_exactly_the_answer(model):
    """With instruction= the answer is returned stripped and cut where another response section
    begins; the streamed pieces add up to exactly that text (nothing printed twice or taken back)."""
    for seed in range(6):
        for kw in (dict(instruction="Réécris cette phrase.", input="La mairie est fermée."),
                   dict(prompt="Écrivez une lettre.", stop=[" l", "e,"])):
            pieces: list[str] = []
            text = model.generate(max_new_tokens=24, do_sample=True, temperature=1.3, seed=seed,
                                  stream=pieces.append, **kw)
            assert "".join(pieces) == text, (kw, pieces, text)
            assert all(pieces)


def test_stream_gate_holds_back_what_may_change() -> None:
    from falcontune.generate import _StreamGate

    sent: list[str] = []
    gate = _StreamGate(sent.append, ["### Response:"], strip=True)
    text = ""
    for piece in ("\n", " Bonjour", " !", "\n\n", "##", "# Resp"):
        text += piece
        gate.update(text, final=False)
    assert "".join(sent) == "Bonjour !"  # leading space, trailing newlines and a maybe-marker held back
    gate.update(text + "onse x\n", final=True)  # it was not the marker after all
    assert "".join(sent) == "Bonjour !\n\n### Response x"


def test_sampling_options_without_do_sample_warn(model):
    with pytest.warns(UserWarning, match="temperature, top_k only apply when sampling"):
        model.generate(prompt="Bonjour", max_new_tokens=2, temperature=0.5, top_k=3)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.generate(prompt="Bonjour", max_new_tokens=2)  # greedy with no sampling option: silent
        model.generate(prompt="Bonjour", max_new_tokens=2, do_sample=True, temperature=0.5, seed=1)
