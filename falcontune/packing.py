"""Packing: several tokenized examples per ``cutoff_len`` row, each computed as if alone.

A packed row holds examples back to back, then padding. Its attention mask holds *segment ids*
(1, 2, ... for the row's examples, 0 for padding): the engine lets a token attend only to the
earlier tokens of its own segment and restarts positions (rotary, alibi) at 0 in each segment
(csrc/ft.h). The label of the first token of every segment is -100: the loss predicts
``labels[t + 1]`` at position ``t``, and that token must not be predicted from the end of the
previous example. An example alone has no prediction of its first token either, so a packed row
has exactly the label tokens of its examples, and each example's loss is the same as unpacked
(up to float rounding).

Algorithm: best-fit decreasing (the first-fit-decreasing family). Examples are taken longest
first (ties in index order) and each goes into the open row with the least free room that still
fits it (a new row when none fits; among rows with the same free room, the latest opened). It is
deterministic and needs no seed; the order in which rows are trained is shuffled per epoch by
``data.length_grouped_batches`` like unpacked examples. Rows are built once, so the same examples
share a row in every epoch; since they cannot see each other, that changes nothing but which
micro-batch their gradients are averaged in.
"""
from __future__ import annotations

from bisect import bisect_left, insort
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .data import IGNORE_INDEX, TokenizedDataset


def pack_examples(lengths: Sequence[int] | np.ndarray, capacity: int) -> list[np.ndarray]:
    """Rows of example indices (best-fit decreasing), each row's lengths summing to <= capacity.

    Every index appears in exactly one row; within a row, indices are in insertion order
    (longest first). Raises ValueError for an example longer than ``capacity``.
    """
    lens = np.asarray(lengths, dtype=np.int64).reshape(-1)
    if capacity < 1:
        raise ValueError(f"packing: capacity={capacity}, expected a positive number of tokens")
    if lens.size and (lens.max() > capacity or lens.min() < 1):
        bad = int(np.flatnonzero((lens > capacity) | (lens < 1))[0])
        raise ValueError(f"packing: example {bad} has {int(lens[bad])} tokens; expected 1 to {capacity} "
                         "(examples are cut to cutoff_len before packing)")
    rows: list[list[int]] = []
    free_sizes: list[int] = []  # sorted distinct free room of the open rows that still have some
    rows_with: dict[int, list[int]] = {}  # free room -> rows with exactly that much (a stack)
    for i in np.argsort(-lens, kind="stable").tolist():
        need = int(lens[i])
        k = bisect_left(free_sizes, need)
        if k == len(free_sizes):
            r, room = len(rows), capacity
            rows.append([])
        else:
            room = free_sizes[k]
            stack = rows_with[room]
            r = stack.pop()
            if not stack:
                del rows_with[room]
                free_sizes.pop(k)
        rows[r].append(i)
        left = room - need
        if left > 0:
            if left not in rows_with:
                insort(free_sizes, left)
                rows_with[left] = []
            rows_with[left].append(r)
    return [np.asarray(r, dtype=np.int64) for r in rows]


@dataclass
class PackedDataset:
    """Examples of a TokenizedDataset grouped into rows of at most ``capacity`` tokens.

    It stands where a TokenizedDataset stands in training and evaluation: ``len()`` and
    ``lengths`` count rows, and ``data.collate`` builds rows with segment-id masks.
    """

    examples: TokenizedDataset
    rows: list[np.ndarray]  # example indices of each row
    capacity: int

    @property
    def lengths(self) -> np.ndarray:
        ex = self.examples.lengths
        return np.fromiter((int(ex[r].sum()) for r in self.rows), dtype=np.int64, count=len(self.rows))

    @property
    def n_examples(self) -> int:
        return len(self.examples)

    def __len__(self) -> int:
        return len(self.rows)

    def row_arrays(self, indices: Sequence[int] | np.ndarray
                   ) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
        """(input_ids, labels, segment ids) of the selected rows, unpadded. Labels are -100 at
        the first token of every segment; segments are numbered 1.. in each row."""
        xs, ys, segs = [], [], []
        for r in np.asarray(indices, dtype=np.int64).reshape(-1):
            members = self.rows[int(r)]
            lens = np.fromiter((len(self.examples.input_ids[i]) for i in members), dtype=np.int64,
                               count=len(members))
            starts = np.concatenate(([0], np.cumsum(lens)[:-1]))
            y = np.concatenate([self.examples.labels[i] for i in members]).astype(np.int32)
            y[starts] = IGNORE_INDEX
            xs.append(np.concatenate([self.examples.input_ids[i] for i in members]))
            ys.append(y)
            segs.append(np.repeat(np.arange(1, len(members) + 1, dtype=np.int32), lens))
        return xs, ys, segs


def pack_dataset(ds: TokenizedDataset, capacity: int) -> PackedDataset:
    """Pack ``ds`` into rows of at most ``capacity`` tokens (see the module docstring)."""
    return PackedDataset(ds, pack_examples(ds.lengths, capacity), int(capacity))


def padding_fraction(row_lengths: Sequence[int] | np.ndarray, batches: Sequence[np.ndarray]) -> float:
    """Fraction of the tokens of right-padded micro-batches that are padding: each batch is as
    wide as its longest row."""
    lens = np.asarray(row_lengths, dtype=np.int64)
    real = sum(int(lens[b].sum()) for b in batches)
    total = sum(len(b) * int(lens[b].max()) for b in batches if len(b))
    return 1.0 - real / total if total else 0.0
