"""Inference over a dataset of pairs: completion log-probs of every pair under one model, in length-sorted batches,
shared out across processes when there are several. reflogp, gamma and the curriculum split score this way; training
calls `completion_logps` per batch itself."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from sdpo_cli.batching import length_sorted_batches
from sdpo_cli.collate import collate_pairs, pair_lengths
from sdpo_cli.logprobs import completion_logps, completion_logps_shared


@torch.inference_mode()
def score_pairs(model, pairs, *, pad_id: int, batch_size: int, device, autocast=None, progress=None,
                description: str = "log-probs", layout: str = "padded",
                shared: bool = False) -> tuple[list[float], ...]:
    """Completion log-probs (chosen, rejected) of every pair, in input order, under `model`; with shared=True also
    (chosen_shared, rejected_shared), the sums over the first min(C, R) tokens (logprobs.completion_logps_shared).

    `pairs` is any sequence of dicts with prompt_ids, chosen_ids, rejected_ids (a datasets.Dataset works).
    """
    lengths = pair_lengths(pairs, layout)
    columns = [[0.0] * len(lengths) for _ in range(4 if shared else 2)]
    logps = completion_logps_shared if shared else completion_logps
    task = progress.add_task(description, total=len(lengths), status="") if progress is not None else None
    for idx in length_sorted_batches(lengths, batch_size):
        batch = collate_pairs([pairs[i] for i in idx], pad_id, layout).to(device)
        with autocast() if autocast is not None else nullcontext():
            sums = logps(model, batch)
        for column, values in zip(columns, sums):
            for i, v in zip(idx, values.tolist()):
                column[i] = v
        if task is not None:
            progress.advance(task, len(idx))
    return tuple(columns)


def score_pairs_sharded(accelerator, model, pairs, *, pad_id: int, batch_size: int, progress=None,
                        description: str = "log-probs", layout: str = "padded",
                        shared: bool = False) -> tuple[list[float], ...]:
    """`score_pairs` with the pairs shared out across processes and gathered back: every process returns the log-probs
    of every pair, in input order, each pair computed exactly once (also when the pairs do not divide evenly)."""
    from accelerate.utils import gather_object

    world, rank = accelerator.num_processes, accelerator.process_index
    options = dict(pad_id=pad_id, batch_size=batch_size, device=accelerator.device, autocast=accelerator.autocast,
                   progress=progress, description=description, layout=layout, shared=shared)
    if world == 1:
        return score_pairs(model, pairs, **options)
    lengths = pair_lengths(pairs, layout)
    # deal whole length-sorted batches round-robin, so every rank gets a similar mix of long and short pairs
    mine = [i for batch in length_sorted_batches(lengths, batch_size)[rank::world] for i in batch]
    subset = pairs.select(mine) if hasattr(pairs, "select") else [pairs[i] for i in mine]
    columns = score_pairs(model, subset, **options)
    gathered = gather_object(list(zip(mine, *columns)))
    out = [[0.0] * len(pairs) for _ in columns]
    for i, *values in gathered:
        for column, v in zip(out, values):
            column[i] = v
    return tuple(out)
