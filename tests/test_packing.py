"""Packing: several examples per row with segment-id masks (block-diagonal causal attention,
positions restarting per segment). Packed and unpacked must give the same per-example logits,
losses and gradients on the CPU engine; the CUDA attention with segment masks is checked against
the CPU one (cuda-marked)."""
from __future__ import annotations

import numpy as np
import pytest

import falcontune as ft
from falcontune import testing
from falcontune.data import IGNORE_INDEX, TokenizedDataset, collate, length_grouped_batches
from falcontune.packing import PackedDataset, pack_dataset, pack_examples, padding_fraction

ALL = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]


# ---------------------------------------------------------------------------------------------
# the packing algorithm and collation


def test_pack_examples_best_fit_decreasing() -> None:
    # longest first: 7 opens row 0 (room 3), 6 opens row 1 (room 4), 4 fits row 1 exactly (best fit,
    # not the first row), 3 fits row 0 exactly, 2 and 1 open row 2
    rows = pack_examples([3, 7, 1, 6, 4, 2], capacity=10)
    assert [r.tolist() for r in rows] == [[1, 0], [3, 4], [5, 2]]


def test_pack_examples_covers_every_example_once_within_capacity() -> None:
    rng = np.random.default_rng(3)
    for cap in (1, 7, 64, 256):
        lens = rng.integers(1, cap + 1, size=500)
        rows = pack_examples(lens, cap)
        flat = np.concatenate(rows)
        assert sorted(flat.tolist()) == list(range(len(lens)))
        assert all(int(lens[r].sum()) <= cap for r in rows)
        # no two rows could have been merged... at least the packing is not worse than the bound
        assert len(rows) >= int(np.ceil(lens.sum() / cap))
        again = pack_examples(lens, cap)
        assert all(np.array_equal(a, b) for a, b in zip(rows, again))  # deterministic
    assert pack_examples([], 8) == []


def test_pack_examples_rejects_bad_lengths() -> None:
    with pytest.raises(ValueError, match="example 1 has 9 tokens; expected 1 to 8"):
        pack_examples([3, 9], 8)
    with pytest.raises(ValueError, match="capacity=0"):
        pack_examples([1], 0)


def _dataset(rng: np.random.Generator, lens: list[int], vocab: int) -> TokenizedDataset:
    ids = [rng.integers(0, vocab, size=n).astype(np.int32) for n in lens]
    labels = [x.copy() for x in ids]
    for y in labels:  # some prompt tokens without a loss, as train_on_inputs=False makes them
        y[: len(y) // 3] = IGNORE_INDEX
    n = len(lens)
    return TokenizedDataset(ids, labels, np.zeros(n, dtype=np.int64), np.zeros(n, dtype=bool), None)


def test_collate_packed_rows() -> None:
    rng = np.random.default_rng(0)
    ds = _dataset(rng, [5, 3, 4, 2], vocab=50)
    packed = PackedDataset(ds, [np.array([0, 1]), np.array([2, 3])], capacity=8)
    assert packed.lengths.tolist() == [8, 6] and len(packed) == 2 and packed.n_examples == 4
    b = collate(packed, [1, 0], pad_id=49)
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 2, 2, 0, 0], [1, 1, 1, 1, 1, 2, 2, 2]]
    assert b["input_ids"][0].tolist() == ds.input_ids[2].tolist() + ds.input_ids[3].tolist() + [49, 49]
    want = np.concatenate([ds.labels[0], ds.labels[1]]).astype(np.int64)
    want[[0, 5]] = IGNORE_INDEX  # no segment's first token is predicted from the one before
    assert b["labels"][1].tolist() == want.tolist()
    assert b["labels"][0, 6:].tolist() == [IGNORE_INDEX] * 2


def test_padding_fraction() -> None:
    lens = np.array([4, 2, 3, 3])
    assert padding_fraction(lens, [np.array([0, 1]), np.array([2, 3])]) == pytest.approx(1 - 12 / 14)
    assert padding_fraction(lens, [np.array([2, 3])]) == 0.0


# ---------------------------------------------------------------------------------------------
# the engine: packed == alone


@pytest.fixture(scope="module", params=["tiny", "tiny-40b", "tiny-rw"])
def model_dir(request, tmp_path_factory):
    d = tmp_path_factory.mktemp("pack-" + request.param)
    testing.make_checkpoint(d, preset=request.param, bits=4, group_size=32, seed=11)
    return d


def _lora_model(model_dir, rng, device: str = "cpu"):
    m = ft.load_model(model_dir, device=device)
    m.add_lora(r=2, alpha=4, dropout=0.0, target_modules=ALL, seed=0)
    sd = {k: (rng.standard_normal(v.shape) * 0.1).astype(np.float32) for k, v in m.lora_state_dict().items()}
    m.load_lora_state_dict(sd)
    return m


def _example_rows(model_dir, seed: int = 5):
    rng = np.random.default_rng(seed)
    m = _lora_model(model_dir, rng)
    ds = _dataset(rng, [7, 3, 9, 1, 5, 6, 2], m.config.vocab_size)
    return m, ds, pack_dataset(ds, capacity=12)


def segments_and_alone(m, ds: TokenizedDataset, packed: PackedDataset):
    """(row, example, logits of the example's segment in the packed batch, its logits alone)."""
    b = collate(packed, np.arange(len(packed)), pad_id=0)
    logits = m.forward(b["input_ids"], b["attention_mask"])
    for r, members in enumerate(packed.rows):
        starts = np.concatenate(([0], np.cumsum([len(ds.input_ids[i]) for i in members])))
        for k, i in enumerate(members):
            yield r, i, logits[r, starts[k]:starts[k + 1]], m.forward(ds.input_ids[i][None, :])[0]


def test_packed_logits_equal_each_example_alone(model_dir) -> None:
    m, ds, packed = _example_rows(model_dir)
    assert len(packed) < len(ds)
    for _, _, in_row, alone in segments_and_alone(m, ds, packed):
        np.testing.assert_allclose(in_row, alone, rtol=1e-4, atol=1e-4)


def test_packed_loss_and_gradients_equal_unpacked(model_dir) -> None:
    m, ds, packed = _example_rows(model_dir)
    pb = collate(packed, np.arange(len(packed)), pad_id=0)
    ub = collate(ds, np.arange(len(ds)), pad_id=0)
    m.zero_grad()
    lp, n_p = m.forward_backward_count(pb["input_ids"], pb["labels"], pb["attention_mask"])
    gp = {k: v.copy() for k, v in m.lora_grad_dict().items()}
    m.zero_grad()
    lu, n_u = m.forward_backward_count(ub["input_ids"], ub["labels"], ub["attention_mask"])
    gu = m.lora_grad_dict()
    assert n_p == n_u > 0
    assert lp == pytest.approx(lu, rel=1e-5)
    for k in gu:
        scale = float(np.abs(gu[k]).max())
        np.testing.assert_allclose(gp[k], gu[k], rtol=1e-3, atol=1e-4 * scale + 1e-7, err_msg=k)
    # evaluation: the same mean over the same label tokens
    assert m.loss(pb["input_ids"], pb["labels"], pb["attention_mask"])[0] == pytest.approx(lu, rel=1e-5)


def test_per_example_losses_packed_equal_alone(model_dir) -> None:
    m, ds, packed = _example_rows(model_dir, seed=9)
    b = collate(packed, np.arange(len(packed)), pad_id=0)
    for r, members in enumerate(packed.rows):
        seg = b["attention_mask"][r]
        for k, i in enumerate(members, start=1):
            labels = np.where(seg == k, b["labels"][r], IGNORE_INDEX)[None, :]
            if not (labels[0] != IGNORE_INDEX).any():
                continue
            packed_loss, n = m.loss(b["input_ids"][r:r + 1], labels, b["attention_mask"][r:r + 1])
            alone, n_alone = m.loss(ds.input_ids[i][None, :], ds.labels[i][None, :])
            assert n == n_alone
            assert packed_loss == pytest.approx(alone, rel=1e-5, abs=1e-6)


def test_zero_one_masks_unchanged_and_bad_segments_refused(model_dir) -> None:
    rng = np.random.default_rng(2)
    m = _lora_model(model_dir, rng)
    ids = rng.integers(0, m.config.vocab_size, size=(2, 6))
    mask = np.array([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    # segment 2 of a row is the same tokens as a row of its own, left-padded
    seg = np.array([[1, 1, 2, 2, 2, 2]])
    a = m.forward(ids[0:1], seg)[0, 2:]
    b = m.forward(ids[0:1], mask[1:2])[0, 2:]
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match=r"attention_mask\[0, 3\] = 1: segment ids must not decrease"):
        m.forward(ids[:1], np.array([[1, 2, 2, 1, 0, 0]]))
    with pytest.raises(ValueError, match=r"attention_mask\[0, 1\] = -1"):
        m.forward(ids[:1], np.array([[1, -1, 1, 1, 1, 1]]))


def test_segment_ids_refused_with_the_kv_cache(model_dir) -> None:
    m = ft.load_model(model_dir, device="cpu")
    eng = m.engine
    eng.cache_init(1, 16)
    try:
        with pytest.raises(ValueError, match="segment ids need a call without the KV cache"):
            eng.forward_cached(np.array([[3, 4, 5]], dtype=np.int32), np.array([[1, 2, 2]], dtype=np.int32))
    finally:
        eng.cache_free()


# ---------------------------------------------------------------------------------------------
# CUDA: segment masks in the CUDA attention (both kernels) against the CPU engine


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("mode,chunk_mb", [("gemm", None), ("gemm", "0.002"), ("flash", None)])
def test_cuda_packed_matches_cpu(model_dir, monkeypatch, dtype, mode, chunk_mb) -> None:
    from test_cuda import check_pair, make_pair, rel
    from test_cuda_attention import set_mode

    set_mode(monkeypatch, mode, chunk_mb)  # read when the CUDA backend is created
    cpu, gpu = make_pair(model_dir, dtype, targets=ALL)
    rng = np.random.default_rng(21)
    ds = _dataset(rng, [37, 5, 64, 1, 90, 17, 33, 2, 70], cpu.config.vocab_size)
    packed = pack_dataset(ds, capacity=128)
    b = collate(packed, np.arange(len(packed)), pad_id=0)
    assert b["attention_mask"].max() >= 3
    check_pair(cpu, gpu, b["input_ids"], b["attention_mask"], b["labels"])
    # on the GPU too, each segment of a packed row is its example computed alone
    for r, i, in_row, alone in segments_and_alone(gpu, ds, packed):
        assert rel(in_row, alone) < 2e-2, (r, i)
