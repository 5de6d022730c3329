"""Processes: one Accelerator per stage, a guard against silently training alone, and rank-0-first work.

Run as: any stage under `accelerate launch [--config_file configs/accelerate/<ddp|fsdp|zero2|zero3>.yaml] -m sdpo_cli`.
"""

from __future__ import annotations

from contextlib import contextmanager

from sdpo_cli.context import RunContext
from sdpo_cli.errors import SdpoError


def make_accelerator(ctx: RunContext, **kwargs):
    """An Accelerator, refusing the case where a launcher started several processes that each form a world of 1.

    Seen with accelerate 1.15 on CPU machines: `accelerate launch --multi_gpu --num_processes 2` (torchrun) starts
    two processes, but unless the Accelerator runs on CPU each one trains alone on all the data, twice the work and
    two different models racing to write the same checkpoint.
    """
    from accelerate import Accelerator

    accelerator = Accelerator(**kwargs)
    check_world(accelerator.num_processes, ctx)
    return accelerator


@contextmanager
def main_process_first(ctx: RunContext):
    """Rank 0 runs the block first (e.g. writes a shared artifact); the others run it after, finding it done."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    # as Accelerator() does: ACCELERATE_USE_CPU=1 is what makes CPU processes join one gloo group
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    check_world(state.num_processes, ctx)
    with state.main_process_first():
        yield state


def check_world(num_processes: int, ctx: RunContext) -> None:
    if ctx.world_size > 1 and num_processes == 1:
        raise SdpoError(
            f"launched with WORLD_SIZE={ctx.world_size}, but this process sees a world of 1: every process would "
            "train alone on all the data",
            hint="on CPU-only machines set ACCELERATE_USE_CPU=1 (gloo); on GPUs check that every rank sees a GPU",
        )


def wait_for_ranks(ctx: RunContext) -> None:
    """A barrier over the launched processes (none in one process): e.g. every rank waits until rank 0 has locked
    the run directory and put back what killed writers left, before any rank looks at an artifact."""
    if ctx.world_size <= 1:
        return
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU")).wait_for_everyone()
