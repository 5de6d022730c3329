"""Batching: which pairs go together, in which order, for training and for scoring.

Training order is a pure function of (seed, epoch), so a resumed step replays exactly the batches an uninterrupted
one would have seen (`EpochBatchSampler.batches(epoch)`). Two samplers share that protocol:

    LengthGroupedBatchSampler  batches of similar length in a random order (HF `group_by_length`): less padding
    RandomBatchSampler         random batches (or file order with shuffle=False)

Under several processes the sampler yields GLOBAL batches (per_device_batch_size x processes) that accelerate splits
(`split_batches=True`), so N processes see exactly the pairs of one process with an N-times larger batch, in the same
order; `FullBatches` tops the short last batch up with weight-0 copies (`WeightedPairs`) so that no pair is trained
on twice. Inference (reflogp, gamma) takes `length_sorted_batches` and restores the input order after.
"""

from __future__ import annotations

import torch


def length_sorted_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices grouped longest-first into batches of similar length (inference only: order is restored after)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]


def length_grouped_batches(lengths: list[int], batch_size: int, generator_seed: int,
                           mega: int | None = None) -> list[list[int]]:
    """Training batches of similar length in a random order, HF `group_by_length` style; deterministic per seed.

    Shuffle all indices, cut them into mega-batches of `mega` batches (default as transformers:
    min(50, n // (4 * batch_size)), at least 1), sort each mega-batch longest first, cut it into batches, shuffle the
    full batches, keep the one short batch (if n is not a multiple of batch_size) last, and move the batch holding
    the longest pair to the front (a too-long batch fails at update 0, not after an hour). Every index appears exactly
    once. Use `pair_lengths(pairs, layout)` for `lengths`.
    """
    n = len(lengths)
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    if n == 0:
        return []
    if mega is None:
        mega = min(50, n // (4 * batch_size))
    mega = max(1, int(mega))
    g = torch.Generator().manual_seed(int(generator_seed))
    perm = torch.randperm(n, generator=g).tolist()
    span = mega * batch_size
    batches = []
    for s in range(0, n, span):
        group = sorted(perm[s:s + span], key=lambda i: -lengths[i])  # stable: ties keep the shuffled order
        batches.extend(group[j:j + batch_size] for j in range(0, len(group), batch_size))
    tail = [batches.pop()] if len(batches[-1]) < batch_size else []
    batches = [batches[k] for k in torch.randperm(len(batches), generator=g).tolist()] + tail
    longest = max(range(len(batches)), key=lambda b: max(lengths[i] for i in batches[b]))
    if len(batches[longest]) == len(batches[0]):
        batches[0], batches[longest] = batches[longest], batches[0]
    else:  # the short tail batch holds it: swap that one pair into the first batch instead (as transformers does)
        j = max(range(len(batches[longest])), key=lambda k: lengths[batches[longest][k]])
        batches[0][0], batches[longest][j] = batches[longest][j], batches[0][0]
    return batches


class EpochBatchSampler:
    """`DataLoader(batch_sampler=...)` whose order for epoch e is `batches(e)`, a pure function of (seed, e). Call
    set_epoch(e) before iterating epoch e."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int):
        self.lengths, self.batch_size, self.seed = list(lengths), batch_size, seed
        self.epoch = 0

    def batches(self, epoch: int) -> list[list[int]]:
        raise NotImplementedError

    def real_batches(self, epoch: int) -> list[list[int]]:
        """The batches of epoch e as the data has them (no padding copies)."""
        return self.batches(epoch)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        return iter(self.batches(self.epoch))

    def __len__(self) -> int:
        return -(-len(self.lengths) // self.batch_size)


class LengthGroupedBatchSampler(EpochBatchSampler):
    """`length_grouped_batches` with seed `seed * 1000 + epoch`."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int, mega: int | None = None):
        super().__init__(lengths, batch_size, seed)
        self.mega = mega

    def batches(self, epoch: int) -> list[list[int]]:
        return length_grouped_batches(self.lengths, self.batch_size, self.seed * 1000 + epoch, self.mega)


class RandomBatchSampler(EpochBatchSampler):
    """Random batches (a permutation seeded by `seed * 1000 + epoch`), or file order with shuffle=False."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int, shuffle: bool = True):
        super().__init__(lengths, batch_size, seed)
        self.shuffle = shuffle

    def batches(self, epoch: int) -> list[list[int]]:
        n = len(self.lengths)
        if self.shuffle:
            idx = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 1000 + epoch)).tolist()
        else:
            idx = list(range(n))
        return [idx[i:i + self.batch_size] for i in range(0, n, self.batch_size)]


def train_batches(lengths: list[int], *, batch_size: int, seed: int, group_by_length: bool, shuffle: bool,
                  world_size: int) -> EpochBatchSampler | FullBatches:
    """The training sampler train.* asks for; length grouping needs shuffling (without it, file order is kept)."""
    sampler: EpochBatchSampler = (LengthGroupedBatchSampler(lengths, batch_size, seed) if group_by_length and shuffle
                                  else RandomBatchSampler(lengths, batch_size, seed, shuffle=shuffle))
    return FullBatches(sampler, len(lengths)) if world_size > 1 else sampler


def update_totals(batches: list[list[int]], accumulation: int, chosen_tokens: list[int]) -> list[tuple[int, int]]:
    """(real pairs, their chosen completion tokens) of each update of an epoch, from its (global) batches: update k is
    micro-batches k*accumulation .. (k+1)*accumulation - 1, the last update of an epoch possibly fewer. The loss of
    an update is the mean over ITS pairs (and the NLL term over its chosen tokens), so that gradient accumulation
    trains exactly as one batch of the same pairs, also when the epoch's last micro-batches are short."""
    totals = []
    for k in range(0, len(batches), accumulation):
        rows = [i for batch in batches[k:k + accumulation] for i in batch]
        totals.append((len(rows), sum(chosen_tokens[i] for i in rows)))
    return totals


class WeightedPairs(torch.utils.data.Dataset):
    """The step's rows; index n + i is a weight-0 copy of row i (FullBatches' padding): (row, is_real)."""

    def __init__(self, rows: list[dict]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, k: int) -> tuple[dict, bool]:
        return self.rows[k % len(self.rows)], k < len(self.rows)


class FullBatches:
    """Under several processes, every global batch is made full-size: the short last batch of an epoch is topped up
    with weight-0 copies of its own pairs (index n + i). accelerate then splits every batch evenly and never pads on
    its own (it would repeat pairs from the start of the data, which would then be trained on twice)."""

    def __init__(self, sampler: EpochBatchSampler, n_rows: int):
        self.sampler, self.n_rows, self.batch_size = sampler, n_rows, sampler.batch_size

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def real_batches(self, epoch: int) -> list[list[int]]:
        return self.sampler.batches(epoch)

    def __iter__(self):
        for batch in self.sampler:
            yield batch + [self.n_rows + batch[j % len(batch)] for j in range(self.batch_size - len(batch))]

    def __len__(self) -> int:
        return len(self.sampler)
