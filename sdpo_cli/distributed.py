"""Processes: one Accelerator per stage, a guard against silently training alone, and rank-0-first work.

Run as: any stage under `accelerate launch [--config_file configs/accelerate/<ddp|fsdp|zero2|zero3>.yaml] -m sdpo_cli`.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

from sdpo_cli.errors import SdpoError


def make_accelerator(**kwargs):
    """An Accelerator, refusing the case where a launcher started several processes that each form a world of 1.

    Seen with accelerate 1.15 on CPU machines: `accelerate launch --multi_gpu --num_processes 2` (torchrun) starts
    two processes, but unless the Accelerator runs on CPU each one trains alone on all the data, twice the work and
    two different models racing to write the same checkpoint.
    """
    from accelerate import Accelerator

    accelerator = Accelerator(**kwargs)
    check_world(accelerator.num_processes)
    return accelerator


@contextmanager
def main_process_first():
    """Rank 0 runs the block first (e.g. writes a shared artifact); the others run it after, finding it done."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    # as Accelerator() does: ACCELERATE_USE_CPU=1 is what makes CPU processes join one gloo group
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    check_world(state.num_processes)
    with state.main_process_first():
        yield state


def check_world(num_processes: int) -> None:
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and num_processes == 1:
        raise SdpoError(
            f"launched with WORLD_SIZE={launched}, but this process sees a world of 1: every process would train "
            "alone on all the data",
            hint="on CPU-only machines set ACCELERATE_USE_CPU=1 (gloo); on GPUs check that every rank sees a GPU",
        )


def score_pairs_sharded(accelerator, model, pairs, pad_id: int, batch_size: int, progress=None,
                        description: str = "log-probs", layout: str = "padded") -> tuple[list[float], list[float]]:
    """`score_pairs` with the pairs shared out across processes and gathered back: every process returns the log-probs
    of every pair, in input order, each pair computed exactly once (also when the pairs do not divide evenly)."""
    from accelerate.utils import gather_object

    from sdpo_cli.logprobs import length_sorted_batches, pair_lengths, score_pairs

    world, rank = accelerator.num_processes, accelerator.process_index
    if world == 1:
        return score_pairs(model, pairs, pad_id, batch_size, accelerator.device, accelerator.autocast, progress,
                           description, layout)
    lengths = pair_lengths(pairs, layout)
    # deal whole length-sorted batches round-robin, so every rank gets a similar mix of long and short pairs
    mine = [i for batch in length_sorted_batches(lengths, batch_size)[rank::world] for i in batch]
    subset = pairs.select(mine) if hasattr(pairs, "select") else [pairs[i] for i in mine]
    chosen, rejected = score_pairs(model, subset, pad_id, batch_size, accelerator.device, accelerator.autocast,
                                   progress, description, layout)
    gathered = gather_object(list(zip(mine, chosen, rejected)))
    out_c, out_r = [0.0] * len(pairs), [0.0] * len(pairs)
    for i, c, r in gathered:
        out_c[i], out_r[i] = c, r
    return out_c, out_r
