"""The engine on its own: finite differences, determinism, checkpointing, cache,
optimizer, and argument checking. (Reference parity is in test_golden.py.)"""
from __future__ import annotations

import numpy as np
import pytest

import falcontune as ft
from falcontune import testing

ALL = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]


@pytest.fixture(scope="module", params=["tiny", "tiny-40b", "tiny-rw"])
def model_dir(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    testing.make_checkpoint(d, preset=request.param, bits=4, group_size=32, seed=7)
    return d


def _random_lora(model, rng, scale=0.1):
    sd = {k: (rng.standard_normal(v.shape) * scale).astype(np.float32) for k, v in model.lora_state_dict().items()}
    model.load_lora_state_dict(sd)
    return sd


def _lora_model(model_dir, rng, r=2, alpha=4, dropout=0.0, targets=ALL, scale=0.1, seed=0):
    """A CPU model with an adapter of random nonzero A and B (B = 0 would hide gradient paths)."""
    m = ft.load_model(model_dir, device="cpu")
    m.add_lora(r=r, alpha=alpha, dropout=dropout, target_modules=targets, seed=seed)
    return m, _random_lora(m, rng, scale=scale)


def _decode_model(model_dir, seed, B, T):
    """A CPU model with a random adapter, random ids [B, T] and a mask of ones (the test pads it)."""
    rng = np.random.default_rng(seed)
    m, _ = _lora_model(model_dir, rng, scale=0.3)
    ids = rng.integers(0, m.config.vocab_size, size=(B, T))
    return m, ids, np.ones_like(ids)


def _batch(rng, vocab, B=2, T=9):
    ids = rng.integers(0, vocab, size=(B, T))
    mask = np.ones_like(ids)
    mask[1, T - 3:] = 0
    labels = ids.copy()
    labels[mask == 0] = -100
    labels[0, 2] = -100
    return ids, labels, mask


def _check_fd(m, sd, grads, k, batch, eps=1e-2):
    """The gradient of parameter k's largest-gradient entry (well above float32 noise) against a
    central difference of the loss; leaves the adapter perturbed (the caller reloads sd)."""
    idx = np.unravel_index(np.argmax(np.abs(grads[k])), grads[k].shape)
    losses = []
    for sign in (1, -1):
        pert = {kk: vv.copy() for kk, vv in sd.items()}
        pert[k][idx] += sign * eps
        m.load_lora_state_dict(pert)
        losses.append(m.forward_backward(*batch))
    fd = (losses[0] - losses[1]) / (2 * eps)
    assert abs(fd - grads[k][idx]) <= 2e-2 * abs(fd) + 1e-4, (k, fd, grads[k][idx])


def test_finite_differences(model_dir):
    rng = np.random.default_rng(1)
    m, sd = _lora_model(model_dir, rng, r=4, alpha=8)
    ids, labels, mask = _batch(rng, m.config.vocab_size)
    m.zero_grad()
    m.forward_backward(ids, labels, mask)
    grads = m.lora_grad_dict()
    keys = sorted(sd)
    checked = 0
    for k in keys[:: max(1, len(keys) // 8)]:
        _check_fd(m, sd, grads, k, (ids, labels, mask))
        checked += 1
    assert checked >= 4


def test_step_in_pieces_covers_every_layer(tmp_path):
    """A training step runs its layers in pieces (recorded one graph each on a GPU: csrc/train.c);
    with 11 layers the pieces are uneven (2, 2, 2, 2, 2, 1). The loss is the full forward's, the
    gradients of layers in the first, a middle and the last piece match finite differences, and
    checkpointing half the layers changes nothing."""
    d = testing.make_checkpoint(tmp_path / "m11", preset="tiny", bits=4, group_size=32, seed=5, num_hidden_layers=11)
    rng = np.random.default_rng(3)
    m, sd = _lora_model(d, rng, r=2, alpha=4, targets=["query_key_value", "dense_4h_to_h"])
    ids, labels, mask = _batch(rng, m.config.vocab_size)
    m.zero_grad()
    loss = m.forward_backward(ids, labels, mask)
    grads = m.lora_grad_dict()
    logits = m.forward(ids, mask).astype(np.float64)
    tgt = labels[:, 1:]
    logp = logits[:, :-1] - np.log(np.exp(logits[:, :-1] - logits[:, :-1].max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits[:, :-1].max(-1, keepdims=True)
    valid = tgt != -100
    ref = -np.take_along_axis(logp, np.where(valid, tgt, 0)[..., None], -1)[..., 0][valid].mean()
    assert abs(loss - ref) <= 1e-5 * abs(ref), (loss, ref)
    for layer in (0, 5, 10):
        for k in sorted(k for k in sd if f".h.{layer}." in k):
            assert np.abs(grads[k]).max() > 0.0, k
            _check_fd(m, sd, grads, k, (ids, labels, mask))
    m.load_lora_state_dict(sd)
    m.set_gradient_checkpointing(0.5)
    m.zero_grad()
    assert m.forward_backward(ids, labels, mask) == loss
    for k, g in m.lora_grad_dict().items():
        np.testing.assert_array_equal(g, grads[k], err_msg=k)


def test_checkpointing_gives_same_gradients(model_dir):
    results = []
    for ratio in (0.0, 0.5, 1.0):
        m, _ = _lora_model(model_dir, np.random.default_rng(4), r=4, alpha=8, dropout=0.1, seed=3)
        ids, labels, mask = _batch(np.random.default_rng(2), m.config.vocab_size)
        m.train()
        m.set_gradient_checkpointing(ratio)
        loss = m.forward_backward(ids, labels, mask)
        results.append((loss, m.lora_grad_dict()))
    for loss, g in results[1:]:
        assert loss == results[0][0]
        for k in g:
            np.testing.assert_array_equal(g[k], results[0][1][k])


def test_training_is_deterministic_and_dropout_is_seeded(model_dir):
    def run(seed):
        rng = np.random.default_rng(5)
        m = ft.load_model(model_dir, device="cpu")
        m.add_lora(r=4, alpha=8, dropout=0.2, target_modules=["query_key_value", "dense_4h_to_h"], seed=seed)
        m.train()
        m.engine.set_rng(seed, 0)
        opt = ft.AdamW(m, lr=1e-2, max_grad_norm=1.0)
        losses = []
        for _ in range(3):
            ids, labels, mask = _batch(rng, m.config.vocab_size)
            m.zero_grad()
            losses.append(m.forward_backward(ids, labels, mask))
            opt.step()
        return losses, m.lora_state_dict()

    l1, s1 = run(0)
    l2, s2 = run(0)
    l3, _ = run(1)
    assert l1 == l2
    for k in s1:
        np.testing.assert_array_equal(s1[k], s2[k])
    assert l1 != l3  # another seed: another init and dropout stream


def test_eval_mode_has_no_dropout(model_dir):
    rng = np.random.default_rng(6)
    m, _ = _lora_model(model_dir, rng, r=4, alpha=8, dropout=0.5)
    ids, labels, mask = _batch(rng, m.config.vocab_size)
    m.eval()
    a = m.forward_backward(ids, labels, mask)
    b = m.forward_backward(ids, labels, mask)
    m.train()
    c = m.forward_backward(ids, labels, mask)
    d = m.forward_backward(ids, labels, mask)
    assert a == b
    assert c != a and d != c  # each step draws a fresh mask


def test_forward_matches_loss_and_padding_is_ignored(model_dir):
    rng = np.random.default_rng(8)
    m, _ = _lora_model(model_dir, rng)
    ids, labels, mask = _batch(rng, m.config.vocab_size)
    logits = m.forward(ids, mask).astype(np.float64)
    z = logits[:, :-1]
    y = labels[:, 1:]
    lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
    valid = y != -100
    picked = np.take_along_axis(z, np.where(valid, y, 0)[..., None], -1)[..., 0]
    ref = ((lse - picked) * valid).sum() / valid.sum()
    assert abs(m.forward_backward(ids, labels, mask) - ref) < 1e-5 * abs(ref)
    # padding tokens do not change the real tokens' logits
    ids2 = ids.copy()
    ids2[mask == 0] = (ids2[mask == 0] + 17) % m.config.vocab_size
    logits2 = m.forward(ids2, mask)
    np.testing.assert_allclose(logits2[mask == 1], logits[mask == 1], rtol=1e-5, atol=1e-5)


def test_left_padding_matches_unpadded(model_dir):
    rng = np.random.default_rng(9)
    m = ft.load_model(model_dir, device="cpu")
    ids = rng.integers(0, m.config.vocab_size, size=(1, 6))
    padded = np.concatenate([np.zeros((1, 3), dtype=ids.dtype), ids], axis=1)
    mask = np.concatenate([np.zeros((1, 3), dtype=int), np.ones((1, 6), dtype=int)], axis=1)
    a = m.forward(ids)[0]
    b = m.forward(padded, mask)[0, 3:]
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)


def test_generation_cache_equals_recompute(model_dir):
    m, ids, mask = _decode_model(model_dir, 10, 2, 5)
    mask[0, :2] = 0
    for kw in ({}, {"num_beams": 3}, {"do_sample": True, "top_k": 10, "top_p": 0.9, "temperature": 0.7, "seed": 1}):
        a = m.generate_ids(ids, max_new_tokens=6, attention_mask=mask, eos_token_id=-1, **kw)
        b = m.generate_ids(ids, max_new_tokens=6, attention_mask=mask, eos_token_id=-1, use_cache=False, **kw)
        assert a.shape == (2, 11)
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a[:, :5], ids)


def test_decode_step_matches_full_forward(model_dir):
    """decode_step (one token per row, only the new key's mask uploaded) against the full forward:
    a left-padded row, a padded step inside a row, a beam-style reorder, and the device argmax."""
    B, P, T = 3, 5, 12
    m, ids, mask = _decode_model(model_dir, 12, B, T)
    e = m.engine
    mask[0, :2] = 0     # left padding in the prompt
    mask[2, 8] = 0      # a padded step: its key stays masked for the later steps
    full = m.forward(ids, mask)
    e.cache_init(B, T)
    first = e.forward_cached(ids[:, :P], mask[:, :P])
    np.testing.assert_allclose(first, full[:, P - 1], rtol=1e-4, atol=1e-4)
    for t in range(P, T):
        logits = e.decode_step(ids[:, t], mask[:, t])
        rows = mask[:, t] == 1  # a padded query's own output is not compared
        np.testing.assert_allclose(logits[rows], full[rows, t], rtol=1e-4, atol=1e-4)
    assert e.cache_len() == T
    e.cache_free()
    # greedy ids from the device argmax equal numpy's argmax of the logits
    e.cache_init(B, T)
    e.forward_cached(ids[:, :P], mask[:, :P])
    e.cache_reorder(np.array([2, 0, 1], np.int32))  # rows move with their key masks and positions
    perm = [2, 0, 1]
    ref = m.forward(np.concatenate([ids[perm, :P], ids[perm, P:P + 1]], 1),
                    np.concatenate([mask[perm, :P], np.ones((B, 1), int)], 1))[:, -1]
    got = e.decode_step(ids[perm, P], argmax=True)
    assert got.dtype == np.int64 and got.shape == (B,)
    np.testing.assert_array_equal(got, ref.argmax(-1))
    e.cache_free()


def test_decode_greedy_equals_greedy_decode_steps(model_dir):
    """decode_greedy (each step's device argmax fed to the next step on the device) gives the ids of
    the same number of decode_step(argmax=True) calls fed one by one, and leaves the cache where
    they leave it; a left-padded prompt row, two calls in a row, then stepping on after it."""
    B, P, n = 3, 6, 7
    m, ids, mask = _decode_model(model_dir, 21, B, P)
    e = m.engine
    mask[1, :3] = 0
    runs = []
    for chained in (False, True):
        e.cache_init(B, P + 2 * n + 1)
        first = e.forward_cached(ids, mask).argmax(-1)
        if chained:
            a = e.decode_greedy(first, n)
            b = e.decode_greedy(a[-1], n)
            out = np.concatenate([a, b])
        else:
            out, cur = [], first
            for _ in range(2 * n):
                cur = e.decode_step(cur, argmax=True)
                out.append(cur)
            out = np.stack(out)
        assert out.dtype == np.int64 and out.shape == (2 * n, B)
        assert e.cache_len() == P + 2 * n
        runs.append((out, e.decode_step(out[-1])))  # the cache keeps working after the chain
        e.cache_free()
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    np.testing.assert_allclose(runs[0][1], runs[1][1], rtol=1e-6, atol=1e-6)
    # and both follow the full forward's argmax (first: the prompt's; then every fed token's)
    gen = np.concatenate([first[:, None], runs[1][0].T], 1)  # [B, 2n + 1]
    full = m.forward(np.concatenate([ids, gen[:, :-1]], 1), np.concatenate([mask, np.ones((B, 2 * n), int)], 1))
    np.testing.assert_array_equal(full[:, P - 1:].argmax(-1), gen)


def test_decode_greedy_rejects_bad_input(model_dir):
    m = ft.load_model(model_dir, device="cpu")
    e = m.engine
    with pytest.raises(Exception, match="cache"):
        e.decode_greedy(np.array([1]), 2)
    e.cache_init(2, 5)
    e.forward_cached(np.array([[1, 2], [3, 4]]), None)
    with pytest.raises(ValueError, match="batch"):
        e.decode_greedy(np.array([1]), 2)
    with pytest.raises(ValueError, match="vocabulary"):
        e.decode_greedy(np.array([1, m.config.vocab_size]), 2)
    with pytest.raises(ValueError, match="positive"):
        e.decode_greedy(np.array([1, 2]), 0)
    with pytest.raises(ValueError, match="n x batch"):  # refused before an [n, B] result is allocated
        e.decode_greedy(np.array([1, 2]), 2**30)
    with pytest.raises(ValueError, match="full"):
        e.decode_greedy(np.array([1, 2]), 4)
    assert e.cache_len() == 2  # nothing committed by the refused calls
    assert e.decode_greedy(np.array([1, 2]), 3).shape == (3, 2)
    assert e.cache_len() == 5
    e.cache_free()


def test_decode_step_rejects_bad_input(model_dir):
    m = ft.load_model(model_dir, device="cpu")
    e = m.engine
    with pytest.raises(Exception, match="cache"):
        e.decode_step(np.array([1]))
    e.cache_init(2, 3)
    e.forward_cached(np.array([[1, 2], [3, 4]]), None)
    with pytest.raises(ValueError, match="batch"):
        e.decode_step(np.array([1]))
    with pytest.raises(ValueError, match="vocabulary"):
        e.decode_step(np.array([1, m.config.vocab_size]))
    with pytest.raises(ValueError, match="0 or 1"):
        e.decode_step(np.array([1, 2]), np.array([1, 2]))
    e.decode_step(np.array([1, 2]))
    with pytest.raises(ValueError, match="full"):
        e.decode_step(np.array([1, 2]))
    e.cache_free()


def test_adamw_matches_torch_formula(model_dir):
    rng = np.random.default_rng(11)
    m, p0 = _lora_model(model_dir, rng, targets=["dense"])
    ids, labels, mask = _batch(rng, m.config.vocab_size)
    lr, b1, b2, eps, wd = 1e-2, 0.9, 0.99, 1e-6, 0.1
    opt = ft.AdamW(m, lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    p = {k: v.astype(np.float64) for k, v in p0.items()}
    mom = {k: np.zeros_like(v) for k, v in p.items()}
    vel = {k: np.zeros_like(v) for k, v in p.items()}
    for step in (1, 2):
        m.zero_grad()
        m.forward_backward(ids, labels, mask)
        g = m.lora_grad_dict()
        opt.step()
        for k in p:
            p[k] *= 1 - lr * wd
            mom[k] = b1 * mom[k] + (1 - b1) * g[k]
            vel[k] = b2 * vel[k] + (1 - b2) * g[k].astype(np.float64) ** 2
            p[k] -= lr / (1 - b1 ** step) * mom[k] / (np.sqrt(vel[k]) / np.sqrt(1 - b2 ** step) + eps)
    got = m.lora_state_dict()
    for k in p:
        np.testing.assert_allclose(got[k], p[k], rtol=1e-4, atol=1e-6)


def test_grad_clipping(model_dir):
    rng = np.random.default_rng(12)
    m, _ = _lora_model(model_dir, rng)
    ids, labels, mask = _batch(rng, m.config.vocab_size)
    m.forward_backward(ids, labels, mask, grad_scale=1000.0)
    g = m.lora_grad_dict()
    norm = np.sqrt(sum(float((v.astype(np.float64) ** 2).sum()) for v in g.values()))
    opt = ft.AdamW(m, lr=0.0, max_grad_norm=1.0)
    assert abs(opt.step(grad_scale=1000.0) - norm / 1000.0) < 1e-4 * norm / 1000.0


@pytest.mark.parametrize("bad, exc, words", [
    (lambda ids: ids.astype(np.float32), TypeError, "integer"),
    (lambda ids: ids + 10_000, ValueError, "vocabulary"),
    (lambda ids: -ids - 1, ValueError, "vocabulary"),
    (lambda ids: ids[None], ValueError, "batch"),
    (lambda ids: ids[:, :0], ValueError, "non-empty"),
])
def test_bad_input_ids(model_dir, bad, exc, words):
    m = ft.load_model(model_dir, device="cpu")
    ids = np.random.default_rng(0).integers(0, m.config.vocab_size, size=(2, 4))
    with pytest.raises(exc, match=words):
        m.forward(bad(ids))


def test_bad_masks_labels_and_lora_shapes(model_dir):
    m = ft.load_model(model_dir, device="cpu")
    ids = np.random.default_rng(0).integers(0, m.config.vocab_size, size=(2, 4))
    with pytest.raises(ValueError, match="attention_mask"):
        m.forward(ids, np.ones((2, 5), dtype=int))
    with pytest.raises(ValueError, match="0 or 1"):  # (2 is a segment id of packed rows: test_packing.py)
        m.forward(ids, np.full((2, 4), -1))
    with pytest.raises(RuntimeError, match="add_lora"):
        m.forward_backward(ids, ids)
    m.add_lora(r=2, target_modules=["dense"])
    with pytest.raises(ValueError, match="labels"):
        m.forward_backward(ids, ids + 10_000)
    sd = m.lora_state_dict()
    k = next(iter(sd))
    sd[k] = np.zeros((3, 3), dtype=np.float32)
    with pytest.raises(ValueError, match="expected shape"):
        m.load_lora_state_dict(sd)
    sd = m.lora_state_dict()
    sd[k] = np.full_like(sd[k], np.nan)
    with pytest.raises(ValueError, match="non-finite"):
        m.load_lora_state_dict(sd)
    with pytest.raises(ValueError, match="unknown module"):
        m.add_lora(target_modules=["q_proj"])


def test_cpu_memory_stats_are_not_counted(model_dir):
    m = ft.load_model(model_dir, device="cpu")
    assert m.engine.memory_stats() == (0, 0)
    if not ft._C.have_cuda():
        assert ft._C.cuda_device_memory() is None


def test_forward_loss_is_the_eval_loss_without_side_effects(model_dir):
    rng = np.random.default_rng(13)
    m = ft.load_model(model_dir, device="cpu")
    ids, labels, mask = _batch(rng, m.config.vocab_size)
    loss0, n0 = m.loss(ids, labels, mask)  # no LoRA needed
    assert n0 == int((labels[:, 1:] != -100).sum())
    m.add_lora(r=2, alpha=4, dropout=0.5, target_modules=ALL)
    _random_lora(m, rng)
    m.train()  # dropout on for training, never for the loss
    rng_state = m.engine.get_rng()
    m.zero_grad()
    a, n = m.loss(ids, labels, mask)
    b, _ = m.loss(ids, labels, mask)
    assert a == b and n == n0
    assert m.engine.get_rng() == rng_state
    assert all(not v.any() for v in m.lora_grad_dict().values())
    m.eval()
    assert abs(m.forward_backward(ids, labels, mask) - a) <= 1e-6 * abs(a)
