"""Stage `train`: one DPO step of sDPO, D_t with the target initialised from M_{t-1}; writes M_t.

Run as: sdpo train CONFIG --step T [key=value ...]

The lifecycle reads top to bottom in `run_train`: inputs (the step's pairs joined with their precomputed reference
log-probs) -> target (M_{t-1}, or S per dpo.target_init; LoRA, checkpointing, compile) -> loader -> loop -> save M_t.

The reference log-probs come from reflogp/step-t, so no reference model is held in memory. At update 0 the target
equals the reference (both are M_{t-1}), so every margin is 0 and the sigmoid loss is ln 2: we log that and warn
loudly if it is off, because it catches tokenisation or numerics drift between `reflogp` and `train`.

Vocabulary: an *update* is one optimizer step (gradient_accumulation micro-batches); a *step* is an sDPO step.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from sdpo_cli.attention import prefix_attention
from sdpo_cli.batching import WeightedPairs, train_batches, update_totals
from sdpo_cli.collate import PairBatch, collate_pairs, pair_length, resolve_layout
from sdpo_cli.config import SdpoConfig, TrainConfig, section
from sdpo_cli.context import RunContext
from sdpo_cli.distributed import deepspeed_16bit, loads_empty, make_accelerator, ram_efficient
from sdpo_cli.distributed import deepspeed_batch as _deepspeed_batch
from sdpo_cli.distributed import sharded as _sharded
from sdpo_cli.distributed import zero3 as _zero3
from sdpo_cli.errors import ArtifactError, ConfigError, Interrupted, SdpoError
from sdpo_cli.fingerprints import data_fp, logps_fp, reflogp_fp, require_data, require_step, train_fp
from sdpo_cli.logprobs import PairLogps, policy_logps
from sdpo_cli.lora import merged_model, with_lora
from sdpo_cli.loss import LossSpec, ld_logps, loss_at_equal_models, pair_losses, wpo_weights
from sdpo_cli.memory import Checkpointing, decide
from sdpo_cli.modelcard import write_model_card
from sdpo_cli.models import (
    compile_blocks,
    disable_dropout,
    load_dtype,
    load_model,
    model_from_weights,
    reference_model,
    refuse_split_tie,
    target_init_model,
    tied_aliases,
)
from sdpo_cli.reports import read_log
from sdpo_cli.rundir import (
    PROGRESS,
    RunDir,
    check_not_stale,
    disk_full,
    disk_full_error,
    leftovers,
    read_meta,
    remove,
    settle,
    write_json_atomic,
    write_text_atomic,
    writing,
)
from sdpo_cli.scoring import GatheredWeights
from sdpo_cli.split import held_out_key

METRICS = ("loss", "loss/dpo", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
           "logps/chosen", "logps/rejected", "gamma/policy", "gamma/ref")


def run_train(cfg: SdpoConfig, step: int, *, force: bool = False, redo_stale: bool = False,
              ctx: RunContext | None = None) -> Path:
    """M_t. `force` redoes the step from its start; `redo_stale` (run --redo-stale, for a stale M_t) redoes it too,
    but resumes a saved state of this very configuration: the state an interrupted redo left."""
    ctx = ctx or RunContext.from_env()
    started = time.time()
    check_trackers(cfg.train.report_to, ctx)
    inputs = StepInputs.check(cfg, step, ctx)
    if not (force or redo_stale) and check_not_stale(inputs.out, inputs.fingerprint,
                                                     ctx.command("train", "--step", str(step)), ctx.command("run")):
        ctx.info(f"train step {step}: finished already ({inputs.run.rel(inputs.out)}), skipping")
        if ctx.is_main:  # a kill after M_t was written and before its resume state was deleted left that state
            _discard_state(inputs.state_dir)
        return inputs.out
    rows, held_out = inputs.rows(), inputs.held_out_rows()

    tr = cfg.train
    accelerator = _accelerator(tr, inputs.run, ctx)
    from accelerate.utils import set_seed

    set_seed(cfg.seed)
    # FSDP2 with CPU-RAM-efficient loading: only the main process reads M_{t-1}; prepare broadcasts it into the shards
    target = Target.load(cfg, inputs, ctx, rows=rows, shards=accelerator.num_processes if _sharded(accelerator) else 1,
                         empty=loads_empty(accelerator), broadcast=ram_efficient(accelerator))
    loader = _loader(rows, target, tr, seed=cfg.seed + step, world=accelerator.num_processes)
    optimizer = _optimizer(tr, target.model, accelerator)
    _check_engine(accelerator, cfg)
    # the engines (DDP / FSDP / DeepSpeed) wrap PairLogps, so their hooks run around our lean log-prob path
    policy, optimizer, prepared = accelerator.prepare(
        PairLogps(target.model, shared=cfg.dpo.ld_alpha is not None, weighting=cfg.dpo.use_weighting), optimizer,
        loader)
    loop = TrainLoop(cfg, inputs, ctx, accelerator=accelerator, policy=policy, optimizer=optimizer,
                     loader=prepared, sampler=loader.batch_sampler, expect_ln2=target.reference == target.init,
                     chosen_tokens=[len(r["chosen_ids"]) for r in rows],
                     held_out=HeldOut(cfg, held_out, target) if held_out else None)
    ctx.info(f"train step {step}: target from {target.init}, π_ref = {target.reference}; {len(rows)} pairs, "
             f"{loop.total} updates of {tr.per_device_batch_size}×{tr.gradient_accumulation}×"
             f"{accelerator.num_processes} = {loop.pairs_per_update} pairs, lr {tr.learning_rate:g}")
    if tr.report_to:
        accelerator.init_trackers(f"sdpo-step-{step}", config=tracker_config(section(cfg, "dpo", "train")))
    records = loop.run(force=force)

    accelerator.wait_for_everyone()
    # the trackers only: accelerate's end_training also destroys the process group, which save_target (a gather
    # under FSDP, barriers under any launch) and `sdpo run`'s next step still use
    for tracker in accelerator.trackers:
        tracker.finish()
    meta = {"stage": "train", "step": step, "started": started, "fingerprint": inputs.fingerprint,
            "inputs": inputs.fingerprint.inputs,
            "target_init": target.init, "reference": target.reference, "data": inputs.run.rel(inputs.data_path),
            "pairs": len(rows), "updates": loop.total, "epochs": loop.epochs_done,
            "world_size": accelerator.num_processes, "layout": target.layout, "compiled": bool(tr.compile),
            "gradient_checkpointing": target.checkpointing.on,
            "log": inputs.run.rel(inputs.log_path), **log_summary(records)}
    save_target(cfg, inputs, target, accelerator=accelerator, policy=policy, optimizer=optimizer, meta=meta)
    if accelerator.is_main_process:
        ctx.info(f"train step {step}: loss {meta['first']['loss']:.4f} -> {meta['last']['loss']:.4f}; "
                 f"wrote {inputs.out}")
        _discard_state(inputs.state_dir)  # M_t is complete: the resume state has served
    accelerator.wait_for_everyone()
    return inputs.out


def log_summary(records: list[dict]) -> dict:
    """meta.json's view of a step's log: its first and last train records and, with held-out pairs, the first and
    last eval records (eval_first: before the first update; eval: at the step's end)."""
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval/loss" in r]
    return {"first": train[0], "last": train[-1]} | ({"eval_first": evals[0], "eval": evals[-1]} if evals else {})


def check_trackers(names: list[str], ctx: RunContext) -> None:
    """train.report_to: every tracker known to accelerate and installed, checked before any model loads (accelerate
    itself only warns about a missing one and then logs nothing to it). A tracker registered with accelerate
    (accelerate.tracking.register_tracker_class) counts as known; `all` takes whichever are installed."""
    if not names:
        return
    import accelerate.utils as accelerate_utils
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS
    from accelerate.utils import LoggerType

    known = LoggerType.list()
    for name in names:
        if name not in known and name not in LOGGER_TYPE_TO_CLASS:
            raise ConfigError(f"{ctx.config_path}: train.report_to: unknown tracker {name!r}",
                              hint=f"one of {', '.join(known)} (accelerate's trackers)")
        available = getattr(accelerate_utils, f"is_{name}_available", None)  # none for `all` and registered ones
        if available is not None and not available():
            raise ConfigError(f"{ctx.config_path}: train.report_to: {name} is not installed, so nothing would be "
                              "logged to it",
                              hint=f"pip install {name}  # or leave it out of train.report_to")


def tracker_config(sections: dict) -> dict:
    """The config as trackers take it: flat dotted keys with scalar values (TensorBoard's hparams refuse nested dicts,
    lists and None), e.g. {"dpo.beta": 0.1, "train.report_to": "['tensorboard']"}."""
    flat = {}
    for name, values in sections.items():
        for key, value in values.items():
            flat[f"{name}.{key}"] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return flat


# ---------------------------------------------------------------------------------------------------------------
# Inputs: the step's pairs and their reference log-probs, checked current


@dataclass
class StepInputs:
    step: int
    run: RunDir
    tok: object
    data_path: Path
    ref_path: Path
    fingerprint: str  # of M_t: what it is computed from (fingerprints.train_fp)
    held_out_path: Path | None = None  # data/eval-step-t or data/eval: the eval/* metrics' pairs, if any
    held_out_ref_path: Path | None = None  # reflogp/eval-step-t: their reference log-probs

    @classmethod
    def check(cls, cfg: SdpoConfig, step: int, ctx: RunContext) -> StepInputs:
        """The step's data and reference log-probs, finished, made from the current config and intact (their files
        as meta.json records them, sdpo_cli/integrity.py); else an error that names the command redoing them. M_{t-1}
        is verified when it is loaded (models.load_model)."""
        from sdpo_cli import integrity

        run = RunDir(cfg.run_dir)
        require_step(cfg, step)
        tok = ctx.tokenizer(cfg.model)
        data_path = require_data(cfg, run, step, tok, ctx)
        ref_path = run.reflogp(step)
        ref_meta = read_meta(ref_path)
        redo = ctx.command("reflogp", "--step", str(step))
        if ref_meta is None:
            raise ArtifactError(f"{ref_path}: reference log-probs not found", hint=redo)
        check_not_stale(ref_path, reflogp_fp(cfg, run, step), redo, ctx.command("run"))  # stale: why, how to redo
        integrity.verify(ref_path)
        if cfg.dpo.ld_alpha is not None:
            _require_shared(ref_path, ctx.command("reflogp", "--step", str(step), "--force"))
        inputs = cls(step, run, tok, data_path, ref_path, train_fp(cfg, run, step))
        key = held_out_key(cfg, step)
        if key is not None:  # the eval/* metrics' pairs and their log-probs under this step's reference
            inputs.held_out_path = require_data(cfg, run, key, tok, ctx)
            inputs.held_out_ref_path = run.reflogp_held_out(step)
            expected = logps_fp(cfg, data_fp(run, key), reference_model(cfg, run, step), run)
            meta = read_meta(inputs.held_out_ref_path)
            if meta is None:
                raise ArtifactError(f"{inputs.held_out_ref_path}: reference log-probs of the held-out pairs not "
                                    "found", hint=redo)
            check_not_stale(inputs.held_out_ref_path, expected, redo, ctx.command("run"))
            integrity.verify(inputs.held_out_ref_path)
            if cfg.dpo.ld_alpha is not None:
                _require_shared(inputs.held_out_ref_path, ctx.command("reflogp", "--step", str(step), "--force"))
        return inputs

    @property
    def out(self) -> Path:
        return self.run.checkpoint(self.step)

    @property
    def state_dir(self) -> Path:
        return self.out.with_name(f".{self.out.name}.state")

    @property
    def log_path(self) -> Path:
        return self.run.train_log(self.step)

    def rows(self) -> list[dict]:
        """The step's pairs joined with their reference log-probs (same rows, same order)."""
        return self._joined(self.data_path, self.ref_path)

    def held_out_rows(self) -> list[dict]:
        """The held-out pairs joined with their reference log-probs; [] when the step has none."""
        return self._joined(self.held_out_path, self.held_out_ref_path) if self.held_out_path else []

    def _joined(self, data_path: Path, ref_path: Path) -> list[dict]:
        import datasets

        pairs = datasets.load_from_disk(str(data_path))
        refs = datasets.load_from_disk(str(ref_path))
        if pairs["id"] != refs["id"]:
            raise ArtifactError(f"{ref_path}: rows do not match {data_path}",
                                hint=f"sdpo reflogp CONFIG --step {self.step} --force")
        chosen, rejected = refs["ref_chosen_logp"], refs["ref_rejected_logp"]
        # the sums over the first min(C, R) tokens (LD-DPO); reflogp of an older sdpo did not write them
        shared = SHARED_COLUMNS[0] in refs.column_names
        chosen_shared = refs[SHARED_COLUMNS[0]] if shared else chosen
        rejected_shared = refs[SHARED_COLUMNS[1]] if shared else rejected
        return [{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r, "ref_chosen": rc, "ref_rejected": rr,
                 "ref_chosen_shared": rcs, "ref_rejected_shared": rrs}
                for p, c, r, rc, rr, rcs, rrs in zip(pairs["prompt_ids"], pairs["chosen_ids"], pairs["rejected_ids"],
                                                     chosen, rejected, chosen_shared, rejected_shared)]


SHARED_COLUMNS = ("ref_chosen_logp_shared", "ref_rejected_logp_shared")  # reflogp's, for dpo.ld_alpha


def _require_shared(ref_path: Path, redo: str) -> None:
    """dpo.ld_alpha needs reflogp's shared sums, which an older sdpo did not write: rerunning reflogp adds them."""
    import datasets

    if not set(SHARED_COLUMNS) <= set(datasets.load_from_disk(str(ref_path)).column_names):
        raise ArtifactError(f"{ref_path}: no {SHARED_COLUMNS[0]} / {SHARED_COLUMNS[1]} columns, which dpo.ld_alpha "
                            "needs (the reference log-probs were written by an older sdpo)", hint=redo)


# ---------------------------------------------------------------------------------------------------------------
# The target and what trains it


@dataclass
class Target:
    model: torch.nn.Module
    init: str  # where it starts: M_{t-1} (or S, per dpo.target_init)
    reference: str  # π_ref of the step, whose log-probs reflogp computed
    layout: str  # collation layout (sdpo_cli/collate.py), reflogp's too
    pad_id: int
    checkpointing: Checkpointing  # train.gradient_checkpointing as decided for this step (sdpo_cli/memory.py)

    @classmethod
    def load(cls, cfg: SdpoConfig, inputs: StepInputs, ctx: RunContext, *, rows: list[dict], shards: int = 1,
             empty: bool = False, broadcast: bool = False) -> Target:
        """M_{t-1} (or S) ready to train on `rows`; `shards`: processes the engine divides the weights over; `empty`:
        built without weights (FSDP2's RAM-efficient loading on the non-main processes); `broadcast`: under that
        loading (on every process)."""
        tr, step = cfg.train, inputs.step
        init = target_init_model(cfg, inputs.run, step)
        # `sdpo run`: the model reflogp(t) just scored with, when that is this same M_{t-1} (its dropout is off)
        kept = ctx.take_model(init)
        if isinstance(kept, GatheredWeights):  # FSDP2: its shards gathered on the main process, empty elsewhere
            if kept.tensors is not None and not empty:
                ctx.info(f"train step {step}: starting from the reference reflogp scored with (gathered from its "
                         "shards, not read again)")
                model = model_from_weights(cfg.model, init, kept.tensors, train=True)
            else:
                model = load_model(cfg.model, init, train=True, empty=empty)
        elif kept is not None and tr.disable_dropout and not empty:
            ctx.info(f"train step {step}: starting from the reference reflogp scored with (loaded once)")
            model = kept.train()
        else:
            model = load_model(cfg.model, init, train=True, empty=empty)
        if broadcast and not empty:
            refuse_split_tie(model, init)
        if tr.disable_dropout:
            disable_dropout(model)
        if cfg.peft.enabled:
            model = with_lora(model, cfg.peft, cfg.model.quantization, info=ctx.info)  # QLoRA: quantized M_{t-1}
        layout = resolve_layout(tr.layout, model, cfg.data.max_length, warn=ctx.warn,
                                prefix_attention=prefix_attention(cfg))
        # the longest micro-batch: per_device_batch_size rows padded to the longest pair (2 rows a pair if padded)
        longest = max((pair_length(r, layout) for r in rows), default=0)
        value_bytes = 2 if tr.mixed_precision != "no" else next(model.parameters()).element_size()
        checkpointing = decide(tr.gradient_checkpointing, model, value_bytes=value_bytes,
                               positions=tr.per_device_batch_size * longest * (2 if layout == "padded" else 1),
                               budget_gb=tr.activation_budget_gb, shards=shards)
        checkpointing.apply(model)
        if checkpointing.on and cfg.peft.enabled:
            model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks still need grad inputs
        if tr.gradient_checkpointing == "auto":
            ctx.info(f"train step {step}: gradient checkpointing {'on' if checkpointing.on else 'off'} "
                     f"({checkpointing.why})")
        if tr.compile:
            ctx.info(f"train step {step}: torch.compile of {compile_blocks(model)} transformer blocks (the first "
                     "updates of each new shape compile)")
        return cls(model, init, reference_model(cfg, inputs.run, step), layout, inputs.tok.pad_token_id,
                   checkpointing)


class PairCollator:
    """DataLoader collate_fn: (PairBatch, reference log-probs (B, 4), weight (B,)) from (row, is_real) items. The
    reference columns: chosen, rejected, and their sums over the first min(C, R) tokens (LD-DPO)."""

    def __init__(self, pad_id: int, layout: str):
        self.pad_id, self.layout = pad_id, layout

    def __call__(self, items: list[tuple[dict, bool]]) -> tuple[PairBatch, torch.Tensor, torch.Tensor]:
        batch = collate_pairs([row for row, _ in items], self.pad_id, self.layout)
        # StepInputs._joined fills the shared sums (with the plain ones where an older reflogp has none)
        columns = ("ref_chosen", "ref_rejected", "ref_chosen_shared", "ref_rejected_shared")
        ref = torch.tensor([[row[c] for c in columns] for row, _ in items], dtype=torch.float32)
        weight = torch.tensor([float(real) for _, real in items])
        return batch, ref, weight


def _loader(rows: list[dict], target: Target, tr: TrainConfig, *, seed: int, world: int):
    sampler = train_batches([pair_length(r, target.layout) for r in rows], batch_size=tr.per_device_batch_size * world,
                            seed=seed, group_by_length=tr.group_by_length, shuffle=tr.shuffle, world_size=world)
    return torch.utils.data.DataLoader(WeightedPairs(rows), batch_sampler=sampler,
                                       collate_fn=PairCollator(target.pad_id, target.layout))


def _accelerator(tr: TrainConfig, run: RunDir, ctx: RunContext):
    from accelerate.utils import DataLoaderConfiguration

    # split_batches: the sampler yields global batches (per_device_batch_size x processes), each process takes its
    # slice, so N processes see exactly the pairs of one process with an N-times larger batch, in the same order.
    return make_accelerator(ctx, gradient_accumulation_steps=tr.gradient_accumulation,
                            mixed_precision=tr.mixed_precision, log_with=list(tr.report_to) or None,
                            project_dir=str(run.root / "logs"),
                            dataloader_config=DataLoaderConfiguration(split_batches=True))


def _optimizer(tr: TrainConfig, model: torch.nn.Module, accelerator) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": tr.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=tr.learning_rate,
                             betas=(tr.adam_beta1, tr.adam_beta2), eps=tr.adam_epsilon,
                             fused=_fused_adam(accelerator, model))


# ---------------------------------------------------------------------------------------------------------------
# The loop


@dataclass
class PairScores:
    """One micro-batch's per-pair numbers: policy and reference log-probs (B,) as the loss sees them (LD-DPO's
    weighted ones with dpo.ld_alpha), the weighted pair-level loss per pair (0 for padding copies; per sorted position
    for aot), and what the NLL (`sft`) term and the update-0 check need: the plain summed log-probs and the
    micro-batch's mean WPO weight (1 without dpo.use_weighting)."""

    policy_chosen: torch.Tensor
    policy_rejected: torch.Tensor
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor
    losses: torch.Tensor
    plain: tuple[torch.Tensor, ...] | None = None  # (policy chosen, policy rejected, ref chosen, ref rejected) sums
    pair_weights: torch.Tensor | None = None  # WPO's w_w·w_l (B,)
    sft_scale: torch.Tensor | float = 1.0  # the mean of pair_weights over the real pairs: the `sft` term's factor

    @property
    def plain_logps(self) -> tuple[torch.Tensor, ...]:
        return self.plain or (self.policy_chosen, self.policy_rejected, self.ref_chosen, self.ref_rejected)


def pair_scores(spec: LossSpec, out: tuple, ref: torch.Tensor, batch: PairBatch, weight: torch.Tensor) -> PairScores:
    """The loss of one micro-batch from the policy's output (`PairLogps`: 2 or 6 tensors), the reference columns of
    `PairCollator` and the pairs' weights (0: a padding copy, in no loss, sort or pool)."""
    policy_c, policy_r, policy_cs, policy_rs, chosen_wpo, rejected_wpo = (*out, None, None, None, None)[:6]
    ref = ref.to(policy_c.device)
    ref_c, ref_r = ref[:, 0], ref[:, 1]
    plain = (policy_c, policy_r, ref_c, ref_r)
    if spec.ld_alpha is not None:  # LD-DPO: the tail past min(C, R) weighted by α, policy and reference alike
        policy_c, policy_r = ld_logps(policy_c, policy_cs, spec.ld_alpha), ld_logps(policy_r, policy_rs, spec.ld_alpha)
        ref_c, ref_r = ld_logps(ref_c, ref[:, 2], spec.ld_alpha), ld_logps(ref_r, ref[:, 3], spec.ld_alpha)
    weight = weight.to(policy_c.device)
    real = weight > 0
    pair_weights = wpo_weights(chosen_wpo, rejected_wpo) if spec.use_weighting else None
    losses = pair_losses(spec, policy_c, policy_r, ref_c, ref_r, chosen_tokens=batch.chosen_tokens.to(policy_c.device),
                         rejected_tokens=batch.rejected_tokens.to(policy_c.device), real=real,
                         pair_weights=pair_weights)
    sft_scale = 1.0
    if pair_weights is not None:
        sft_scale = (weight * pair_weights).sum() / weight.sum().clamp(min=1)
    return PairScores(policy_c, policy_r, ref_c, ref_r, losses, plain, pair_weights, sft_scale)


# The accuracy the metric line prints: a pair counts when its margin is above the float noise of recomputing the
# reference's log-probs in other batches (reflogp scores pairs in other batches and paddings than train), so update 0,
# target == reference, prints acc 0.00 and not the share of pairs whose noise came out positive. The logged
# rewards/accuracies stays strict (margin > 0), as TRL's.
ACCURACY_SHOWN = "rewards/accuracies_shown"
CHECK_INPUTS = "_totals"  # the window's raw totals travel beside a record for the update-0 check, never logged
NOISE = 1e-5  # relative to the summed log-probs' size: float32 sums over hundreds of tokens, other kernels


def _clearly_above(margins: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, *,
                   beta: float) -> torch.Tensor:
    """margin > the noise of β·((π_c − ref_c) − (π_r − ref_r)) when each log-prob is off by NOISE of its size."""
    return margins > NOISE * beta * (1.0 + ref_chosen.abs() + ref_rejected.abs())


def micro_batch_loss(spec: LossSpec, scores: PairScores, weight: torch.Tensor, *, pairs: float, chosen_tokens: float,
                     scale: float = 1.0) -> torch.Tensor:
    """The micro-batch's share of the update's loss: the pair-level losses summed over its real pairs / the update's
    real `pairs`, plus the `sft` / dpo.nll_weight term: its chosen tokens' NLL / the update's `chosen_tokens` (the
    plain log-probs, not LD-DPO's; with WPO times the micro-batch's mean pair weight, as TRL). `scale` undoes the
    engines' averaging over micro-batches and processes. With one micro-batch in one process (scale 1) this is TRL's
    `loss` on the same pairs."""
    weight = weight.to(scores.losses.device)
    loss = (weight * scores.losses).sum() * (scale / pairs)
    if spec.sft_weight:
        loss = loss + spec.sft_weight * scores.sft_scale * (
            -(weight * scores.plain_logps[0]).sum() * (scale / max(chosen_tokens, 1)))
    return loss


class MetricSums:
    """Everything a log record needs, summed over the real pairs since the last record (FullBatches' weight-0
    padding copies count for nothing). Device-side accumulators: one host sync per logged update, not per
    micro-batch. `state_dict` / `load_state_dict` carry an unfinished window through a saved state, so the first
    record after a resume equals the uninterrupted run's."""

    KEYS = (*METRICS[1:], "nll", "chosen_tokens", "pairs", "tokens", ACCURACY_SHOWN,
            "nll_weighted", "ref_nll_weighted", "pair_weights")
    # the update-0 check's per-pair peaks, over the window (reduced with max): |log π − log π_ref| of either reply,
    # absolute and relative to 1 + |log π_ref|
    PEAKS = ("max_logp_diff", "max_logp_diff_rel")

    def __init__(self, device, spec: LossSpec):
        self.device, self.spec, self.beta = device, spec, spec.beta
        self.reset()

    def reset(self) -> None:
        self.sums = {k: torch.zeros((), dtype=torch.float64, device=self.device) for k in self.KEYS}
        self.peaks = {k: torch.zeros((), dtype=torch.float64, device=self.device) for k in self.PEAKS}

    def add(self, scores: PairScores, batch: PairBatch, weight: torch.Tensor) -> None:
        pc, pr = scores.policy_chosen.detach(), scores.policy_rejected.detach()
        rc, rr, w = scores.ref_chosen.to(pc.device), scores.ref_rejected.to(pc.device), weight.to(pc.device).double()
        plain_pc, plain_pr, plain_rc, plain_rr = (t.detach().to(pc.device).double() for t in scores.plain_logps)
        sft_scale = torch.as_tensor(scores.sft_scale, device=pc.device).detach().double()
        pair_weights = scores.pair_weights.detach() if scores.pair_weights is not None else torch.ones_like(pc)
        real = w > 0
        diffs = torch.cat([(plain_pc - plain_rc).abs()[real], (plain_pr - plain_rr).abs()[real]])
        sizes = torch.cat([1 + plain_rc.abs()[real], 1 + plain_rr.abs()[real]])
        if diffs.numel():
            self.peaks["max_logp_diff"] = torch.maximum(self.peaks["max_logp_diff"], diffs.max())
            self.peaks["max_logp_diff_rel"] = torch.maximum(self.peaks["max_logp_diff_rel"], (diffs / sizes).max())
        chosen_reward, rejected_reward = self.beta * (pc - rc), self.beta * (pr - rr)
        for key, values in (("loss/dpo", scores.losses.detach()), ("nll", -plain_pc),
                            ("nll_weighted", -plain_pc * sft_scale), ("ref_nll_weighted", -plain_rc * sft_scale),
                            ("pair_weights", pair_weights), ("chosen_tokens", batch.chosen_tokens),
                            ("rewards/chosen", chosen_reward), ("rewards/rejected", rejected_reward),
                            ("rewards/margins", chosen_reward - rejected_reward),
                            ("rewards/accuracies", chosen_reward > rejected_reward),  # strict, as TRL
                            (ACCURACY_SHOWN, _clearly_above(chosen_reward - rejected_reward, rc, rr, beta=self.beta)),
                            ("logps/chosen", pc), ("logps/rejected", pr), ("gamma/policy", pc - pr),
                            ("gamma/ref", rc - rr), ("pairs", torch.ones_like(pc)),
                            ("tokens", batch.distinct_tokens)):
            self.sums[key] += (w * values.to(pc.device).double()).sum()

    def totals(self, accelerator) -> dict[str, float]:
        """The sums over every process (a collective call: every rank must make it)."""
        stacked = accelerator.reduce(torch.stack([self.sums[k] for k in self.KEYS]), reduction="sum")
        return dict(zip(self.KEYS, stacked.tolist()))

    def means(self, accelerator) -> tuple[dict[str, float], dict[str, float]]:
        """(METRICS as means per pair, plus ACCURACY_SHOWN; the raw totals, with the peaks) over every process, and a
        fresh window."""
        totals = self.totals(accelerator)
        peaks = accelerator.gather(torch.stack([self.peaks[k] for k in self.PEAKS])[None])
        totals |= dict(zip(self.PEAKS, peaks.reshape(-1, len(self.PEAKS)).amax(dim=0).tolist()))
        self.reset()
        pairs = max(totals["pairs"], 1.0)
        means = {key: totals[key] / pairs for key in METRICS[1:]}
        # the objective: the pair-level losses (loss/dpo) plus the NLL (`sft`, dpo.nll_weight) term per chosen token
        means["loss"] = means["loss/dpo"] + self.spec.sft_weight * totals["nll_weighted"] / max(
            totals["chosen_tokens"], 1.0)
        # the printed accuracy travels beside the metrics; the loop takes it out before logging
        return {k: means[k] for k in METRICS} | {ACCURACY_SHOWN: totals[ACCURACY_SHOWN] / pairs}, totals

    def record(self, accelerator, *, step: int, update: int, epoch: int, lr: float, grad_norm, since: float) -> dict:
        """The log record of the window (means per pair) that began at time.time() `since`, and a fresh window."""
        means, totals = self.means(accelerator)  # the reduce waits for the device: the clock is read after it
        seconds = time.time() - since
        shown = means.pop(ACCURACY_SHOWN)
        return {"step": step, "update": update, "epoch": epoch, **means, "lr": lr,
                "grad_norm": float(grad_norm) if grad_norm is not None else None, "tokens": int(totals["tokens"]),
                "tokens/s": totals["tokens"] / max(seconds, 1e-9), "pairs": int(totals["pairs"]),
                ACCURACY_SHOWN: shown, CHECK_INPUTS: totals}

    def state_dict(self, accelerator) -> dict[str, float]:
        """The window's sums over every process (a collective call), for the main process to save."""
        return self.totals(accelerator)

    def load_state_dict(self, totals: dict[str, float], accelerator) -> None:
        """The saved totals go to the main process only: `totals` (a sum over ranks) then counts them once."""
        self.reset()
        if accelerator.is_main_process:
            for key in self.KEYS:
                self.sums[key] += float(totals.get(key, 0.0))


class HeldOut:
    """The step's held-out pairs, scored by the target without gradients: the eval/* records (TRL's eval metrics).

    Their reference log-probs were computed by `reflogp` under this step's reference (reflogp/eval-step-t), as the
    training pairs' were: in sDPO the reference changes every step, so no number of an earlier step's is reused.
    Scored before the first update (target == reference: eval/loss is the loss's value at δ = 0, ln 2 for sigmoid),
    every train.eval_every updates and at the step's end. Each process scores its share of length-sorted batches: in
    one process or under DDP with the unwrapped model; under FSDP / ZeRO-3 through the wrapped target, whose
    all-gathers are collectives, so a process short of batches re-runs the first one, counted for nothing, until
    every process has run as many forwards."""

    def __init__(self, cfg: SdpoConfig, rows: list[dict], target: Target):
        from sdpo_cli.batching import length_sorted_batches

        self.cfg, self.rows, self.target = cfg, rows, target
        self.batches = length_sorted_batches([pair_length(r, target.layout) for r in rows], cfg.inference.batch_size)

    def record(self, accelerator, policy, *, step: int, update: int, epoch: int) -> dict:
        """The eval record after `update` updates: {step, update, epoch, eval/<metric>..., eval/pairs}."""
        dpo, sharded = self.cfg.dpo, _sharded(accelerator)
        spec = LossSpec.from_config(dpo)
        sums = MetricSums(accelerator.device, spec)
        model = policy if sharded else accelerator.unwrap_model(policy).model
        world = accelerator.num_processes
        batches = [(idx, 1.0) for idx in self.batches[accelerator.process_index::world]]
        if sharded:
            batches += [(self.batches[0], 0.0)] * (-(-len(self.batches) // world) - len(batches))
        was_training = policy.training
        policy.eval()
        collate = PairCollator(self.target.pad_id, self.target.layout)
        with torch.no_grad(), accelerator.autocast():
            for idx, counts in batches:
                batch, ref, weight = collate([(self.rows[i], True) for i in idx])
                batch, ref = batch.to(accelerator.device), ref.to(accelerator.device)
                out = model(batch) if sharded else policy_logps(model, batch, shared=spec.ld_alpha is not None,
                                                                weighting=spec.use_weighting)
                sums.add(pair_scores(spec, out, ref, batch, weight), batch, weight * counts)
        policy.train(was_training)
        means, totals = sums.means(accelerator)
        return {"step": step, "update": update, "epoch": epoch, **{f"eval/{k}": v for k, v in means.items()},
                "eval/pairs": int(totals["pairs"])}


class TrainLoop:
    """The updates of one step: resume from the step's saved state, train, log, save state, stop on signals."""

    def __init__(self, cfg: SdpoConfig, inputs: StepInputs, ctx: RunContext, *, accelerator, policy, optimizer,
                 loader, sampler, expect_ln2: bool, chosen_tokens: list[int], held_out: HeldOut | None = None):
        from transformers import get_scheduler

        self.cfg, self.tr, self.inputs, self.ctx, self.step = cfg, cfg.train, inputs, ctx, inputs.step
        self.accelerator, self.policy, self.optimizer, self.loader, self.sampler = (accelerator, policy, optimizer,
                                                                                   loader, sampler)
        self.expect_ln2 = expect_ln2  # target == reference at update 0 only when both start from the same model
        self.world = accelerator.num_processes
        self.chosen_tokens = chosen_tokens  # per row: the NLL term's denominator
        self.updates_per_epoch = math.ceil(len(loader) / self.tr.gradient_accumulation)
        self.total = self.tr.max_updates or max(1, math.ceil(self.tr.epochs * self.updates_per_epoch))
        self.pairs_per_update = self.tr.per_device_batch_size * self.tr.gradient_accumulation * self.world
        self.scheduler = get_scheduler(self.tr.lr_schedule, optimizer, num_training_steps=self.total,
                                       num_warmup_steps=math.ceil(self.tr.warmup_ratio * self.total))
        accelerator.register_for_checkpointing(self.scheduler)
        self.spec = LossSpec.from_config(cfg.dpo)
        self.sums = MetricSums(accelerator.device, self.spec)
        self.update = self.epoch = self.skip = 0
        self.records: list[dict] = []
        self.held_out = held_out
        self.pending_eval: dict | None = None  # the update-0 eval record, logged right after update 0's record

    def run(self, force: bool = False) -> list[dict]:
        """Train to `total` updates; returns every log record of the step."""
        self._resume(force)
        self.policy.train()
        self.t_last = time.time()
        log_path = self.inputs.log_path
        if self.accelerator.is_main_process:
            # the log on disk is at every instant a prefix of the uninterrupted run's log: cut back at once (a new
            # file renamed over the old one) to the records of the saved state, none at a fresh start; the later
            # records are redone, and appended one by one as they come
            _write_records(log_path, self.records)
        if self.held_out is not None and self.update == 0:  # before the first update: target == reference
            self.pending_eval = self._evaluate()
        # only rank 0 writes the log (the metrics are already reduced over ranks)
        with self.ctx.progress() as bar, StopSignals(self.inputs.state_dir) as stop, \
                _LogFile(log_path if self.accelerator.is_main_process else None) as log_file:
            task = bar.add_task(f"train step {self.step}", total=self.total, completed=self.update, status="")
            while self.update < self.total:
                # accelerate's prepared loader sets the sampler's epoch from its own iteration count whenever it is
                # iterated; in a resumed process that count starts at 0, so tell it the epoch we are in
                self.loader.set_epoch(self.epoch)
                self.sampler.set_epoch(self.epoch)
                totals = update_totals(self.sampler.real_batches(self.epoch), self.tr.gradient_accumulation,
                                       self.chosen_tokens)
                batches = self.accelerator.skip_first_batches(self.loader, self.skip) if self.skip else self.loader
                done_in_epoch, self.skip = self.skip, 0
                for batch, ref, weight in batches:
                    done_in_epoch += 1
                    grad_norm = self._micro_batch(batch, ref, weight,
                                                  totals[(done_in_epoch - 1) // self.tr.gradient_accumulation])
                    if not self.accelerator.sync_gradients:
                        continue
                    lr = self.scheduler.get_last_lr()[0]
                    self.scheduler.step()
                    if self._logs(self.update):
                        record = self._log(lr, grad_norm, log_file)
                        bar.update(task, status=f"loss {record['loss']:.4f}")
                    self.update += 1
                    bar.update(task, completed=self.update)
                    if self._evaluates(self.update):
                        self._log_eval(self._evaluate(), log_file)
                    stopping = stop.requested(self.accelerator)
                    if self.update >= self.total and not stopping:
                        break
                    # a stop asked for during the last update saves the state too: the rerun writes M_t from it
                    self._maybe_save(stopping, done_in_epoch)
                else:
                    self.epoch += 1
        return self.records

    @property
    def epochs_done(self) -> float:
        """The epochs trained so far: updates done / updates per epoch (1.0 for one whole epoch; meta.json)."""
        return round(self.update / self.updates_per_epoch, 4)

    def _micro_batch(self, batch: PairBatch, ref: torch.Tensor, weight: torch.Tensor, update_total: tuple[int, int]):
        """Forward, loss and backward of one micro-batch (and the optimizer update at an accumulation boundary);
        returns the gradient norm at a boundary, else None. `update_total`: (real pairs, chosen tokens) of the
        update this micro-batch belongs to, over every process."""
        spec, accelerator = self.spec, self.accelerator
        with accelerator.accumulate(self.policy):
            scores = pair_scores(spec, self.policy(batch), ref, batch, weight)
            # the mean over the real pairs of the whole UPDATE, every micro-batch and every process (and, for the
            # NLL term, over its chosen tokens): accelerate (or DeepSpeed) divides each micro-batch's loss by
            # gradient_accumulation and DDP / FSDP / DeepSpeed average gradients over ranks, so the scale
            # world * accumulation / count makes N processes x A micro-batches train exactly as one batch of the
            # same pairs, also for a short last update of an epoch. aot / aot_unpaired sort within the micro-batch.
            pairs, chosen_tokens = update_total
            loss = micro_batch_loss(spec, scores, weight, pairs=pairs, chosen_tokens=chosen_tokens,
                                    scale=self.world * self.tr.gradient_accumulation)
            accelerator.backward(loss)
            grad_norm = _clip(accelerator, self.policy, self.tr.max_grad_norm) if accelerator.sync_gradients else None
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.sums.add(scores, batch, weight)
        return grad_norm

    def _logs(self, update: int) -> bool:
        return update == 0 or (update + 1) % self.tr.logging_every == 0 or update + 1 == self.total

    def _log(self, lr: float, grad_norm, log_file) -> dict:
        record = self.sums.record(self.accelerator, step=self.step, update=self.update, epoch=self.epoch, lr=lr,
                                  grad_norm=grad_norm, since=self.t_last)
        self.t_last = time.time()
        accuracy = record.pop(ACCURACY_SHOWN)
        totals = record.pop(CHECK_INPUTS)
        if self.update == 0:
            check_first_update(record, self.cfg, step=self.step, applies=self.expect_ln2, ctx=self.ctx,
                               totals=totals)
        self.records.append(record)
        log_file.append(record)
        if self.tr.report_to:
            self.accelerator.log({k: v for k, v in record.items() if isinstance(v, float)}, step=self.update)
        self.ctx.info(f"step {self.step} | update {self.update:>4}/{self.total} | loss {record['loss']:.4f} | margin "
                      f"{record['rewards/margins']:.4f} | acc {accuracy:.2f} | lr {lr:.2e}")
        if self.pending_eval is not None:  # train's update-0 record stays the log's first record
            self._log_eval(self.pending_eval, log_file)
            self.pending_eval = None
        return record

    def _evaluates(self, done: int) -> bool:
        """Held-out evaluation after `done` updates: every train.eval_every, and at the step's end."""
        every = self.tr.eval_every
        return self.held_out is not None and (done == self.total or bool(every and done % every == 0))

    def _evaluate(self) -> dict:
        record = self.held_out.record(self.accelerator, self.policy, step=self.step, update=self.update,
                                      epoch=self.epoch)
        self.t_last = time.time()  # the next train record's tokens/s counts training time only
        return record

    def _log_eval(self, record: dict, log_file) -> None:
        accuracy = record.pop(f"eval/{ACCURACY_SHOWN}")
        self.records.append(record)
        log_file.append(record)
        if self.tr.report_to:
            self.accelerator.log({k: v for k, v in record.items() if isinstance(v, float)}, step=record["update"])
        self.ctx.info(f"step {self.step} | eval after {record['update']:>3}/{self.total} updates | loss "
                      f"{record['eval/loss']:.4f} | margin {record['eval/rewards/margins']:.4f} | acc {accuracy:.2f} "
                      f"| γ {record['eval/gamma/policy']:.4f} ({record['eval/pairs']} held-out pairs)")

    def _maybe_save(self, stopping: str | None, done_in_epoch: int) -> None:
        """Save the resumable state every train.save_every updates and before stopping on a signal."""
        if stopping or (self.tr.save_every and self.update % self.tr.save_every == 0):
            progress = {"fingerprint": self.inputs.fingerprint, "update": self.update, "total": self.total,
                        "epoch": self.epoch,
                        "batches": done_in_epoch, "records": len(self.records),
                        "sums": self.sums.state_dict(self.accelerator)}
            _save_state(self.accelerator, self.inputs.state_dir, progress)
        if stopping:
            raise Interrupted(
                f"train step {self.step}: stopped by {stopping} after update {self.update - 1} ({self.update} of "
                f"{self.total} done); state saved in {self.inputs.state_dir}",
                hint="rerun the same command to resume from there")

    def _resume(self, force: bool) -> None:
        """Continue from the step's last saved state, if it was made by this very configuration."""
        state_dir = self.inputs.state_dir
        if force and self.accelerator.is_main_process:
            _discard_state(state_dir)  # --force redoes the step from its start
        self.accelerator.wait_for_everyone()
        progress = _load_state(self.accelerator, state_dir, self.inputs.fingerprint, self.step, self.ctx)
        if progress is None:
            return
        # updates are numbered from 0, as in the log: after `update` updates done, the last one was update - 1
        self.ctx.info(f"train step {self.step}: resuming after update {progress['update'] - 1} ({progress['update']} "
                      f"of {self.total} done) from {state_dir}")
        self.records = _read_records(self.inputs.log_path)[: progress["records"]]
        self.update, self.epoch, self.skip = progress["update"], progress["epoch"], progress["batches"]
        if "sums" in progress:  # states saved before the window's sums were kept start a fresh window
            self.sums.load_state_dict(progress["sums"], self.accelerator)


# The update-0 check's bound on each pair's |log π − log π_ref|, relative to 1 + |log π_ref| (the summed log-probs'
# size): fp32 recomputation in other batches and paddings stays far below the first; 16-bit weights or autocast
# (bf16 / fp16 matmuls, other kernels per batch shape) below the second
PAIR_TOLERANCE = {"fp32": 1e-3, "16-bit": 2e-2}
LOSS_TOLERANCE = 1e-3  # |update-0 loss − its value at target == reference|


def pair_tolerance(cfg: SdpoConfig) -> float:
    full = cfg.model.dtype in ("float32", "fp32") and cfg.train.mixed_precision == "no" and not cfg.model.quantization
    return PAIR_TOLERANCE["fp32" if full else "16-bit"]


def check_first_update(record: dict, cfg: SdpoConfig, *, step: int, applies: bool, ctx: RunContext,
                       totals: dict | None = None) -> None:
    """sDPO sanity check: update 0 sees target == reference, so every log-ratio is 0 and the loss is its value at
    equal models (loss.loss_at_equal_models: ln 2 for sigmoid; `sft`: the reference's NLL per chosen token of the
    same pairs; with WPO times the mean pair weight), and no pair's log-probs differ from the reference's beyond
    float noise. `totals`: the update's raw sums (MetricSums), for the data-dependent parts and the per-pair peaks."""
    if not applies:
        ctx.info(f"train step {step}: update 0 loss {record['loss']:.6f} (target init != reference: no ln 2 check)")
        record["check"] = "skipped"
        return
    spec = LossSpec.from_config(cfg.dpo)
    totals = totals or {}
    pairs = max(totals.get("pairs", 0.0), 1.0)
    pair_weight = totals.get("pair_weights", pairs) / pairs  # WPO's mean w_w·w_l (1 without it)
    nll = totals.get("ref_nll_weighted", 0.0) / max(totals.get("chosen_tokens", 0.0), 1.0)
    expected = pair_weight * loss_at_equal_models([n for n, _ in spec.pair_terms], spec.beta, spec.label_smoothing,
                                                  weights=[w for _, w in spec.pair_terms])
    expected += spec.sft_weight * nll  # the `sft` terms and dpo.nll_weight: pair_weight is inside ref_nll_weighted
    off = abs(record["loss"] - expected)
    peak, peak_rel = totals.get("max_logp_diff", 0.0), totals.get("max_logp_diff_rel", 0.0)
    tolerance = pair_tolerance(cfg)
    record["check/expected_loss"] = expected
    record["check/max_logp_diff"] = peak
    record["check/max_logp_diff_rel"] = peak_rel
    ok = off <= LOSS_TOLERANCE and peak_rel <= tolerance
    record["check"] = "ok" if ok else "FAILED"
    words = "ln 2 check ok" if abs(expected - math.log(2)) < 1e-12 else "update-0 check ok"
    pairs_line = f"max |log π − log π_ref| per reply {peak:.2e} ({peak_rel:.1e} of its size)"
    if ok:
        ctx.info(f"train step {step}: update 0 loss {record['loss']:.6f} = expected {expected:.6f} for "
                 f"{spec.names} at target == reference; {pairs_line} ({words})")
    else:
        ctx.alert(f"WARNING: step {step} update 0 loss {record['loss']:.6f} != {expected:.6f} "
                  f"(off by {off:.2e}, tolerance {LOSS_TOLERANCE:.0e}); {pairs_line}, tolerance {tolerance:.0e}. "
                  "The target should equal the reference here: the reference log-probs were computed on other tokens, "
                  "another model or other numerics. Redo `sdpo reflogp --force` for this step.")


class StopSignals:
    """SIGINT / SIGTERM: the first sets a flag, and the loop stops at the next update boundary after saving its state.
    A second one, also while that stop is under way, stops the process at once: one line on stderr, then exit code
    130 without unwinding (no cleanup runs, as after a SIGKILL). The last saved state stays usable (a state is renamed
    into place only when complete), so the rerun resumes from it. `state_dir` only names that state in the message."""

    def __init__(self, state_dir: Path | None = None):
        self.received: str | None = None
        self.previous: dict = {}
        self.state_dir = state_dir

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.received is None:
            self.received = name
            return
        self.stop_now(name)

    def stop_now(self, name: str) -> None:
        """The second signal: say so on stderr (once per machine: local rank 0) and exit with 130 at once."""
        if os.environ.get("LOCAL_RANK", "0") == "0":
            state = f" in {self.state_dir}" if self.state_dir else ""
            line = (f"Stopped at once by a second {name}; the step's last saved state{state}, if any, is kept: rerun "
                    "the same command to resume from it.\n")
            if os.isatty(2):  # the progress bar may have hidden the cursor and left the line unfinished
                line = "\x1b[?25h\n" + line
            try:
                os.write(2, line.encode())
            except OSError:
                pass
        os._exit(130)

    def requested(self, accelerator) -> str | None:
        if accelerator.num_processes > 1:  # every rank must stop at the same update
            flag = torch.tensor([1.0 if self.received else 0.0], device=accelerator.device)
            if accelerator.reduce(flag, reduction="sum").item() > 0:
                return self.received or "a signal on another rank"
            return None
        return self.received

    def __exit__(self, exc_type, *exc):
        if self.received and exc_type is not None:
            return False  # stopping on a signal: the process is on its way out, and a second signal still ends it
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        return False


# ---------------------------------------------------------------------------------------------------------------
# Saving: M_t, and the resumable state of an unfinished step


def save_target(cfg: SdpoConfig, inputs: StepInputs, target: Target, *, accelerator, policy, optimizer,
                meta: dict) -> None:
    """M_t in Hugging Face layout with the base tokenizer and its model card (README.md, sdpo_cli/modelcard.py),
    written atomically with its meta.json (main process)."""
    sharded = _sharded(accelerator)
    # the full state dict (a collective call under FSDP / ZeRO-3); with LoRA in one process or under DDP, peft
    # reads the adapter from the model itself
    state_dict = _target_state_dict(accelerator, policy, cfg, target) if sharded or not cfg.peft.enabled else None
    if not accelerator.is_main_process:
        return
    unwrapped = accelerator.unwrap_model(policy).model
    unwrapped.config.use_cache = True  # load_model turned the KV cache off for training; users generate with M_t
    with writing(inputs.out, meta) as tmp:
        if cfg.peft.enabled:
            # sDPO with LoRA: M_t = M_{t-1} + this step's adapter, merged, so that M_t is a plain model and
            # serves exactly as the next step's reference and starting point. The adapter is kept beside it.
            # QLoRA: merged into the full-precision M_{t-1}, not the quantized one (sdpo_cli/lora.py).
            # Under FSDP the model holds shards: the adapter comes from the gathered state dict, and the merge
            # reloads M_{t-1} in full.
            unwrapped.save_pretrained(str(tmp / "adapter"), state_dict=state_dict)
            unwrapped = merged_model(cfg.model, unwrapped, target.init, tmp / "adapter", reload=sharded)
            state_dict = None
        unwrapped.save_pretrained(str(tmp), state_dict=state_dict)
        inputs.tok.save_pretrained(str(tmp))
        if cfg.train.save_optimizer:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        write_model_card(tmp, cfg, meta=meta, data_meta=read_meta(inputs.data_path) or {},
                         ref_meta=read_meta(inputs.ref_path) or {}, published=inputs.out)


def _save_state(accelerator, state_dir: Path, progress: dict) -> None:
    """Model, optimizer, scheduler and RNG states (accelerate) + our progress, replaced atomically.

    Filled in `.step-t.state.tmp`, completed by progress.json (written last, itself whole or absent), then the
    previous state is set aside as `.step-t.state.old`, the new one renamed in, and the old one deleted. A kill at
    any point leaves the previous state or the new one complete, and siblings that rundir.settle() resolves at the
    next start (a complete tmp whose rename was cut is moved in; an `.old` without a state is moved back). A full
    disk is the `disk full while writing` error, with the previous state still in place."""
    tmp = state_dir.with_name(state_dir.name + ".tmp")
    if accelerator.is_main_process:
        settle(state_dir)  # a stale tmp (a save killed half-way) goes; so does anything else a kill left
    accelerator.wait_for_everyone()
    quiet = logging.getLogger("accelerate")  # its per-save notes (tied weights dropped and re-tied) are noise here
    level, quiet.level = quiet.level, logging.ERROR
    try:
        accelerator.save_state(str(tmp))
        # every rank writes its own files (RNG states, shards): the state is complete only when all have finished
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            write_json_atomic(tmp / PROGRESS, progress)  # written last: marks the state complete
    except Exception as e:  # torch: RuntimeError ("unexpected pos"), safetensors: SafetensorError, ours: SdpoError
        if accelerator.is_main_process:
            remove(tmp)
        if disk_full(e.__cause__ if isinstance(e, SdpoError) and e.__cause__ else e, state_dir):
            raise disk_full_error(state_dir) from e  # the previous state, if any, is still there to resume from
        raise
    finally:
        quiet.setLevel(level)
    if accelerator.is_main_process:
        old = state_dir.with_name(state_dir.name + ".old")
        if state_dir.exists():
            os.replace(state_dir, old)
        os.replace(tmp, state_dir)
        remove(old)
    accelerator.wait_for_everyone()


def _load_state(accelerator, state_dir: Path, fp: str, step: int, ctx: RunContext) -> dict | None:
    if accelerator.is_main_process:
        settle(state_dir)  # a save killed between its renames: the complete state goes (back) in place
    accelerator.wait_for_everyone()
    progress_file = state_dir / PROGRESS
    if not progress_file.is_file():
        return None
    try:
        progress = json.loads(progress_file.read_text())
    except (OSError, ValueError):
        progress = {}
    if progress.get("fingerprint") != fp:
        ctx.warn(f"train step {step}: ignoring {state_dir}: it was saved by another configuration")
        return None
    accelerator.load_state(str(state_dir))
    return progress


def _discard_state(state_dir: Path) -> None:
    """Delete the step's resumable state and whatever a killed save left beside it (progress.json first: a kill
    half-way never leaves a state that looks complete)."""
    for path in (state_dir, *leftovers(state_dir)):
        remove(path)


def _read_records(path: Path) -> list[dict]:
    """The train log's records; a last line cut short by a kill or a full disk is not one."""
    return read_log(path) if path.is_file() else []


def _write_records(path: Path, records: list[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in records))


class _LogFile:
    """The train log, open for appending, one whole record per write, straight to the file (no buffer: a kill loses
    at most the record being written). A write that fails half-way is cut back off, so the file stays a sequence of
    whole records; a full disk is the `disk full while writing` error. Ranks other than 0 (path None) write
    nothing."""

    def __init__(self, path: Path | None):
        self.path, self.file = path, None

    def __enter__(self) -> _LogFile:
        if self.path is not None:
            self.file = open(self.path, "ab", buffering=0)
        return self

    def append(self, record: dict) -> None:
        if self.file is None:
            return
        data = (json.dumps(record) + "\n").encode()
        size = os.fstat(self.file.fileno()).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[self.file.write(view):]
        except OSError as e:
            try:
                os.ftruncate(self.file.fileno(), size)
            except OSError:
                pass
            if disk_full(e):
                raise disk_full_error(self.path) from e
            raise

    def __exit__(self, *exc) -> bool:
        if self.file is not None:
            self.file.close()
        return False


# ---------------------------------------------------------------------------------------------------------------
# Engines: what DDP / FSDP / DeepSpeed need, and what they change


def _fused_adam(accelerator, model) -> bool | None:
    """torch's fused AdamW (one kernel for all parameters, as TRL's default `adamw_torch_fused`) where the parameters
    are plain tensors on CPU or CUDA; under FSDP / DeepSpeed, torch's default (the engines reshape parameters)."""
    from accelerate.utils import DistributedType

    plain = accelerator.distributed_type in (DistributedType.NO, DistributedType.MULTI_GPU, DistributedType.MULTI_CPU)
    supported = all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.bfloat16, torch.float16)
                    for p in model.parameters() if p.requires_grad)
    return True if plain and supported else None


def _target_state_dict(accelerator, policy, cfg: SdpoConfig, target: Target) -> dict | None:
    """The target's full state dict (gathered from FSDP / ZeRO-3 shards by accelerate), named as the HF model names it
    (without PairLogps' `model.` prefix), each tied tensor once, as save_pretrained writes it.

    Under DeepSpeed with bf16 / fp16 the module holds 16-bit copies, rounded from the fp32 master weights that its
    optimizer updates, and accelerate gathers those copies: the trained parameters are taken from the masters
    instead, in the dtype the target was loaded in, as one process with autocast saves them. DPO's updates
    (lr ~5e-7) are far below bf16's resolution (2^-8 of a weight), so a 16-bit M_t loses most of what a step
    learned, and the next step starts from, and is measured against, that rounded model."""
    state = accelerator.get_state_dict(policy)
    if deepspeed_16bit(accelerator):
        from deepspeed.utils import safe_get_full_fp32_param

        keep, dtype = state is not None and accelerator.is_main_process, load_dtype(cfg.model, target.init)
        for name, param in accelerator.unwrap_model(policy).named_parameters():
            master = safe_get_full_fp32_param(param)  # a collective under ZeRO: every rank, in the same order
            if master is not None and keep:  # None: a frozen parameter, which has no master
                state[name] = master.to("cpu", dtype)
    if state is None:  # non-main ranks under some engines
        return None
    aliases = tied_aliases(accelerator.unwrap_model(policy))
    return {k.removeprefix("model."): v for k, v in state.items() if k not in aliases}


def _clip(accelerator, model, max_norm: float | None) -> torch.Tensor:
    if max_norm is not None:
        # all of model.parameters(): accelerate recognises the wrapped model (FSDP: a global norm, not per shard)
        return accelerator.clip_grad_norm_(model.parameters(), max_norm)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


def _check_engine(accelerator, cfg: SdpoConfig) -> None:
    """What DeepSpeed needs before `prepare`, and the combinations we do not support yet."""
    # our loader uses a batch sampler (batch_size None), so DeepSpeed cannot infer the micro-batch itself
    _deepspeed_batch(accelerator, cfg.train.per_device_batch_size, cfg.train.gradient_accumulation)
    if cfg.peft.enabled and _zero3(accelerator):
        raise ConfigError("peft.enabled with DeepSpeed ZeRO-3: merging a ZeRO-3-partitioned LoRA model is not "
                          "supported", hint="use FSDP, DDP or ZeRO-2 for LoRA (configs/accelerate/fsdp.yaml, ...)")
    if cfg.model.quantization and _sharded(accelerator):
        raise ConfigError("model.quantization with FSDP or ZeRO-3: sharding a bitsandbytes-quantized model is not "
                          "supported", hint="QLoRA runs in one process or under DDP (configs/accelerate/ddp.yaml)")
