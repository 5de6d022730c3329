"""Processes: one Accelerator per stage, a guard against silently training alone, rank-0-first work, and which
engine shards the model (FSDP, ZeRO-3) and how it is loaded then.

Run as: any stage under `accelerate launch [--config_file configs/accelerate/<ddp|fsdp|zero2|zero3>.yaml] -m sdpo_cli`.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager, redirect_stdout

from sdpo_cli.context import RunContext
from sdpo_cli.errors import SdpoError


def make_accelerator(ctx: RunContext, **kwargs):
    """An Accelerator, refusing the case where a launcher started several processes that each form a world of 1.

    Seen with accelerate 1.15 on CPU machines: `accelerate launch --multi_gpu --num_processes 2` (torchrun) starts
    two processes, but unless the Accelerator runs on CPU each one trains alone on all the data, twice the work and
    two different models racing to write the same checkpoint.
    """
    from accelerate import Accelerator

    quiet_deepspeed()
    accelerator = Accelerator(**kwargs)
    check_world(accelerator.num_processes, ctx)
    _fsdp_on_cpu(accelerator)
    _deepspeed_on_cpu(accelerator)
    return accelerator


def quiet_deepspeed() -> None:
    """Where DeepSpeed is installed, import it before accelerate does (its `extract_model_from_parallel`, behind every
    prepare and unwrap, imports DeepSpeed whenever it is installed, under any engine) and point its logger at stderr:
    the logger's handler writes to stdout, which carries results (`gamma --json`). What the import itself says (on a
    machine without a GPU: "Setting accelerator to CPU ...") goes to stderr under a DeepSpeed launch and is dropped
    otherwise, where DeepSpeed is only probed (e.g. under `make demo`). Called before every use of accelerate's
    process state (this module)."""
    import importlib.util
    import io
    import logging

    from accelerate.utils import parse_flag_from_env

    if "deepspeed" in sys.modules or importlib.util.find_spec("deepspeed") is None:
        return
    notes = io.StringIO()
    with redirect_stdout(notes):
        try:
            from deepspeed.utils import logger
        except ImportError:  # a broken install: accelerate says so when it needs it
            return
    for handler in logger.handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(sys.stderr)
    if parse_flag_from_env("ACCELERATE_USE_DEEPSPEED"):
        sys.stderr.write(notes.getvalue())


def _fsdp_on_cpu(accelerator) -> None:
    """An FSDP launch on CPU (ACCELERATE_USE_CPU=1, gloo) made FSDP. accelerate 1.16 turns ACCELERATE_USE_FSDP into
    FSDP only on GPU-like devices: on CPU the same launch silently became plain multi-process CPU (DDP over gloo),
    every process holding the whole model. torch's FSDP2 (`fully_shard`) runs on CPU over gloo, so the state is set
    as accelerate sets it on GPUs, with the plugin read from the launch's environment (FSDP_VERSION,
    FSDP_CPU_RAM_EFFICIENT_LOADING, ...). The state is process-wide: later Accelerators of this process share it."""
    from accelerate import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, parse_flag_from_env

    state = accelerator.state
    if state.distributed_type != DistributedType.MULTI_CPU or not parse_flag_from_env("ACCELERATE_USE_FSDP"):
        return
    plugin = FullyShardedDataParallelPlugin()
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    state.distributed_type, state.fsdp_plugin = DistributedType.FSDP, plugin
    # every later AcceleratorState() (accelerate makes some inside prepare) copies the type from PartialState's
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def _deepspeed_on_cpu(accelerator) -> None:
    """A DeepSpeed launch on CPU (ACCELERATE_USE_CPU=1, gloo) made DeepSpeed, as `_fsdp_on_cpu` does for FSDP.
    accelerate 1.16 selects DeepSpeed only when not on CPU (AcceleratorState: `ACCELERATE_USE_DEEPSPEED ... and not
    cpu`), so a ZeRO-3 launch on CPU silently became plain multi-process CPU, every process holding the whole model.
    DeepSpeed 0.19 runs on CPU (its CPU accelerator, picked when no GPU is found or with DS_ACCELERATOR=cpu, talks
    gloo unless oneccl_bindings_for_pytorch is installed) and `deepspeed.initialize` adopts the gloo group accelerate
    already made. The state is set as accelerate sets it on GPUs, with the plugin read from the launch's environment
    (ACCELERATE_DEEPSPEED_ZERO_STAGE, ..._ZERO3_INIT, ...); selecting it registers transformers' ZeRO-3 config, so
    `from_pretrained` afterwards partitions the weights as it loads them (zero3_init_flag)."""
    from accelerate import PartialState
    from accelerate.utils import DeepSpeedPlugin, DistributedType, parse_flag_from_env

    state = accelerator.state
    if state.distributed_type != DistributedType.MULTI_CPU or not parse_flag_from_env("ACCELERATE_USE_DEEPSPEED"):
        return
    plugin = DeepSpeedPlugin()
    plugin.set_mixed_precision(accelerator.mixed_precision)
    plugin.select(_from_accelerator_state=True)
    state.distributed_type, state.deepspeed_plugins = DistributedType.DEEPSPEED, plugin
    # DeepSpeed does the mixed precision itself (its bf16 / fp16 config): no autocast around it, as on GPUs
    state._mixed_precision, accelerator.native_amp = "no", False
    # every later AcceleratorState() (accelerate makes some inside prepare) copies the type from PartialState's
    PartialState._shared_state["distributed_type"] = DistributedType.DEEPSPEED
    # what PartialState does for a DeepSpeed launch on GPUs: deepspeed.comm adopts the process group (gloo here).
    # Now rather than inside from_pretrained or prepare, because its CPU backend prints a line to stdout as it builds
    # its shared-memory all-reduce op (a C++ extension, compiled on first use into ~/.cache/torch_extensions):
    # sent to stderr, as stdout carries results (`gamma --json`; DeepSpeed's logger: `quiet_deepspeed`, already
    # called by make_accelerator).
    with redirect_stdout(sys.stderr):
        import deepspeed.comm

        deepspeed.comm.init_distributed(dist_backend=state.backend, auto_mpi_discovery=False)


@contextmanager
def main_process_first(ctx: RunContext):
    """Rank 0 runs the block first (e.g. writes a shared artifact); the others run it after, finding it done."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    quiet_deepspeed()
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

    quiet_deepspeed()
    PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU")).wait_for_everyone()


def leave_process_group() -> None:
    """Destroy torch's default process group, where this process made one, while the interpreter is still whole.
    Left to the interpreter's exit, gloo's worker threads can still hold the tensors of finished collectives as
    Python is torn down, and the process dies of SIGABRT ("terminate called without an active exception") after all
    its work is done and written: seen in CI on rank 1 of a 2-process FSDP2 reflogp (pytorch/pytorch#190489)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def zero3(accelerator) -> bool:
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return plugin is not None and plugin.deepspeed_config.get("zero_optimization", {}).get("stage") == 3


def deepspeed_16bit(accelerator) -> bool:
    """DeepSpeed with bf16 or fp16: its module's weights are 16-bit copies of the fp32 masters its optimizer holds."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    config = plugin.deepspeed_config if plugin is not None else {}
    return any(config.get(kind, {}).get("enabled") is True for kind in ("bf16", "fp16"))


def deepspeed_batch(accelerator, micro_batch: int, accumulation: int = 1) -> None:
    """DeepSpeed's batch entries for the next `prepare` (none without DeepSpeed). Our loaders use batch samplers
    (batch_size None) and inference prepares no loader at all, so DeepSpeed cannot infer the micro-batch itself.
    All three are set, every time: the plugin's config is process-wide (every Accelerator of the process shares it)
    and accelerate fills its "auto" entries in place at the first `prepare`, so in `sdpo run` the reflogp engine's
    train_batch_size (inference.batch_size × 1 × N) and gradient_accumulation_steps (1) would otherwise stay for
    train's engine: DeepSpeed's batch assertion fails, or accelerate overrides train.gradient_accumulation with
    DeepSpeed's stale 1 (with a warning only)."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return
    config = plugin.deepspeed_config
    config["train_micro_batch_size_per_gpu"] = micro_batch
    config["gradient_accumulation_steps"] = accumulation
    config["train_batch_size"] = micro_batch * accumulation * accelerator.num_processes


def sharded(accelerator) -> bool:
    """FSDP or ZeRO-3: each process holds shards of the parameters; full tensors come from get_state_dict."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP or zero3(accelerator)


def ram_efficient(accelerator) -> bool:
    """FSDP2 with `fsdp_cpu_ram_efficient_loading` (the shipped configs/accelerate/fsdp.yaml): `prepare` moves every
    rank's model to the meta device, ties its weights again and fills the shards from the main process's weights."""
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    return plugin is not None and plugin.fsdp_version == 2 and bool(plugin.cpu_ram_efficient_loading)


def loads_empty(accelerator) -> bool:
    """Whether this process may skip reading the weights: `ram_efficient`, on every rank but the main one, whose
    weights `prepare` broadcasts into every rank's shard (accelerate.utils.fsdp_utils.fsdp2_load_full_state_dict), so
    what the others had loaded was never used: 1 copy of the model in host memory instead of one per process.
    transformers 5.24's `from_pretrained` does not do this itself under FSDP (its `is_fsdp_enabled` only changes how
    missing keys and buffers are initialised; only ZeRO-3 loads on rank 0 alone, through `zero3_init_flag`)."""
    return ram_efficient(accelerator) and not accelerator.is_main_process
