"""Inference over a dataset of pairs: completion log-probs of every pair under one model, in length-sorted batches,
shared out across processes when there are several. reflogp, gamma and the curriculum split (in one process) score
this way; training calls `completion_logps` per batch itself.

Under an FSDP or ZeRO-3 launch the scoring model is sharded like train's target (inference.shard: auto): it goes
through `accelerator.prepare` wrapped in `PairLogps`, so each process holds 1/N of the weights, the engine gathers one
block at a time around our lean log-prob path (decoder body + chunked head), and every process scores its share of
the pairs. In one process, under DDP or with inference.shard=false every process holds the whole model.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from sdpo_cli.batching import length_sorted_batches
from sdpo_cli.collate import collate_pairs, pair_lengths, resolve_layout
from sdpo_cli.config import SdpoConfig, inference_shard
from sdpo_cli.distributed import deepspeed_batch, loads_empty, ram_efficient, sharded
from sdpo_cli.errors import ConfigError
from sdpo_cli.logprobs import PairLogps, completion_logps, completion_logps_shared
from sdpo_cli.models import tied_aliases


def load_scoring_model(cfg: SdpoConfig, accelerator, source: str | None = None, *, warn=None, alone: bool = False):
    """(the model to score with, the layout: train's, so that update 0 matches exactly). Sharded (see the module's
    docstring) a prepared `PairLogps` whose forward gives the 4 sums of `completion_logps_shared`; otherwise the model
    itself on this process's device. `alone`: this process scores by itself while the others wait (the curriculum
    split, on the main process): never sharded, as sharding needs every process."""
    from sdpo_cli.attention import prefix_attention
    from sdpo_cli.models import disable_dropout, load_model, refuse_split_tie

    shard = not alone and shards(cfg, accelerator)
    # FSDP2 with CPU-RAM-efficient loading: only the main process reads the weights; prepare broadcasts them
    model = load_model(cfg.model, source, empty=shard and loads_empty(accelerator))
    if shard and ram_efficient(accelerator):
        refuse_split_tie(model, source or cfg.model.base)
    disable_dropout(model)
    layout = resolve_layout(cfg.train.layout, model, cfg.data.max_length, warn=warn,
                            prefix_attention=prefix_attention(cfg))
    if not shard:
        return model.to(accelerator.device), layout
    deepspeed_batch(accelerator, cfg.inference.batch_size)  # no data loader for DeepSpeed to infer it from
    model.requires_grad_(False)
    prepared = accelerator.prepare(PairLogps(model, shared=True))
    prepared.eval()  # not chained: DeepSpeedEngine.eval() returns None, not the engine
    return prepared, layout


@dataclass
class GatheredWeights:
    """A sharded scoring model's weights, whole, in the main process's host memory (`tensors`; None on the others),
    for `sdpo run`'s train(t) to start from (models.model_from_weights) instead of reading M_{t-1} again."""

    tensors: dict[str, torch.Tensor] | None


def gathered_weights(accelerator, model) -> GatheredWeights | None:
    """The whole weights of a model `load_scoring_model` sharded under FSDP2, one tensor at a time: each DTensor is
    all-gathered (the traffic of one forward) and only the main process keeps it, on the CPU, so its peak is what
    loading M_{t-1} costs it under RAM-efficient loading (one whole copy) plus its shard. A collective: every process
    calls it. None under ZeRO-3 (its partitions are not DTensors; train then loads from disk)."""
    if not isinstance(model, PairLogps):
        return None
    keep = accelerator.is_main_process
    tensors, aliases = {}, tied_aliases(model.model)
    for name, tensor in model.model.state_dict(keep_vars=True).items():
        if name in aliases:  # a tied weight (lm_head = embed_tokens): once, tied again on the other side
            continue
        whole = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
        if keep:
            tensors[name] = whole.detach().to("cpu", copy=True)
    return GatheredWeights(tensors if keep else None)


def shards(cfg: SdpoConfig, accelerator) -> bool:
    """inference.shard: auto follows the launch's engine (FSDP, ZeRO-3: sharded)."""
    want = inference_shard(cfg)
    if want and not sharded(accelerator):
        raise ConfigError("inference.shard=true, but this launch does not shard the model (no FSDP or ZeRO-3)",
                          hint="accelerate launch --config_file configs/accelerate/fsdp.yaml ..., or "
                               "inference.shard=auto")
    return sharded(accelerator) if want is None else want


def shard_wrapped(model) -> bool:
    """A PairLogps prepared by FSDP2 (still a PairLogps) or by DeepSpeed (an engine around one)."""
    return isinstance(model, PairLogps) or isinstance(getattr(model, "module", None), PairLogps)


def score_pairs(model, pairs, *, pad_id: int, batch_size: int, device, autocast=None, progress=None,
                description: str = "log-probs", layout: str = "padded",
                shared: bool = False) -> tuple[list[float], ...]:
    """Completion log-probs (chosen, rejected) of every pair, in input order, under `model`; with shared=True also
    (chosen_shared, rejected_shared), the sums over the first min(C, R) tokens (logprobs.completion_logps_shared).

    `pairs` is any sequence of dicts with prompt_ids, chosen_ids, rejected_ids (a datasets.Dataset works).
    """
    batches = length_sorted_batches(pair_lengths(pairs, layout), batch_size)
    return _score(model, pairs, batches, [], pad_id=pad_id, device=device, autocast=autocast, progress=progress,
                  description=description, layout=layout, shared=shared)


def _score(model, pairs, batches: list[list[int]], dummies: list[list[int]], *, pad_id: int, device, autocast,
           progress, description: str, layout: str, shared: bool) -> tuple[list[float], ...]:
    """The columns of every pair of `batches` (indices into `pairs`; the other entries stay 0.0), then a forward of
    each of `dummies`, whose results are dropped."""
    columns = [[0.0] * len(pairs) for _ in range(4 if shared else 2)]
    wrapped = shard_wrapped(model)
    width = len(columns)
    task = (progress.add_task(description, total=sum(map(len, batches)), status="")
            if progress is not None else None)
    # FSDP2 unshards parameters in place: no inference tensors there (torch.inference_mode), plain no_grad
    with torch.no_grad() if wrapped else torch.inference_mode():
        for n, idx in enumerate(batches + dummies):
            batch = collate_pairs([pairs[i] for i in idx], pad_id, layout).to(device)
            with autocast() if autocast is not None else nullcontext():
                if wrapped:
                    sums = model(batch)[:width]
                else:
                    sums = (completion_logps_shared if shared else completion_logps)(model, batch)
            if n >= len(batches):
                continue
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
    of every pair, in input order, each pair computed exactly once (also when the pairs do not divide evenly).

    A sharded model (`load_scoring_model`) is a collective: its parameters are all-gathered block by block in every
    forward, so every process must run as many forwards. A process with fewer batches than the others (or none: fewer
    batches than processes, e.g. 1 pair over 2) re-runs the first batch and drops the result."""
    from accelerate.utils import gather_object

    world, rank = accelerator.num_processes, accelerator.process_index
    options = dict(pad_id=pad_id, device=accelerator.device, autocast=accelerator.autocast,
                   progress=progress, description=description, layout=layout, shared=shared)
    batches = length_sorted_batches(pair_lengths(pairs, layout), batch_size)
    if world == 1:
        return _score(model, pairs, batches, [], **options)
    # deal whole length-sorted batches round-robin, so every rank gets a similar mix of long and short pairs
    mine = batches[rank::world]
    rounds = -(-len(batches) // world)
    dummies = [batches[0]] * (rounds - len(mine)) if shard_wrapped(model) and batches else []
    columns = _score(model, pairs, mine, dummies, **options)
    gathered = gather_object([(i, *(column[i] for column in columns)) for idx in mine for i in idx])
    out = [[0.0] * len(pairs) for _ in columns]
    for i, *values in gathered:
        for column, v in zip(out, values):
            column[i] = v
    return tuple(out)


def shard_figures(accelerator, model) -> dict:
    """What each process held, for meta.json: the whole model's parameter bytes, each process's share of them (its
    local shards under FSDP / ZeRO-3; the whole model otherwise) and each process's peak resident memory so far
    (loading and scoring). A collective call: every process makes it."""
    import resource

    from accelerate.utils import gather_object
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():  # the units FSDP2 left gathered after the forward (the root's, the head's)
        if isinstance(module, FSDPModule):
            module.reshard()
    full = local = 0
    for p in model.parameters():
        size = p.element_size()
        numel = getattr(p, "ds_numel", None) or p.numel()  # DTensor: the global shape; ZeRO-3: ds_numel
        full += numel * size
        if hasattr(p, "to_local"):  # FSDP2's DTensor
            local += p.to_local().numel() * size
        elif hasattr(p, "ds_tensor"):  # ZeRO-3's partition
            local += p.ds_tensor.numel() * size
        else:
            local += numel * size
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    per_rank = gather_object([(accelerator.process_index, local, peak)])
    per_rank.sort()
    return {"processes": accelerator.num_processes, "sharded": shard_wrapped(model), "param_bytes": full,
            "shard_param_bytes": [b for _, b, _ in per_rank], "peak_rss_bytes": [r for _, _, r in per_rank]}
