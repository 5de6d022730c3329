"""Stage `train`: one DPO step of sDPO, D_t with the target initialised from M_{t-1}; writes M_t.

Run as: sdpo train CONFIG --step T [key=value ...]

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
import shutil
import signal
import time
from pathlib import Path

import torch

from sdpo_cli import console
from sdpo_cli.config import SdpoConfig, num_steps, section
from sdpo_cli.distributed import make_accelerator
from sdpo_cli.errors import ArtifactError, ConfigError, SdpoError
from sdpo_cli.fingerprints import reflogp_fp, require_data, train_fp
from sdpo_cli.logprobs import (
    LengthGroupedBatchSampler,
    PairLogps,
    collate_pairs,
    compile_blocks,
    pair_length,
    resolve_layout,
)
from sdpo_cli.lora import merged_model, with_lora
from sdpo_cli.loss import dpo_losses, loss_at_equal_models
from sdpo_cli.models import disable_dropout, load_model, load_tokenizer, reference_model, target_init_model
from sdpo_cli.rundir import RunDir, check_not_stale, disk_full, disk_full_error, read_meta, writing

METRICS = ("loss", "loss/dpo", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
           "logps/chosen", "logps/rejected", "gamma/policy", "gamma/ref")


def run_train(cfg: SdpoConfig, step: int, force: bool = False) -> Path:
    import datasets
    from accelerate.utils import DataLoaderConfiguration, set_seed
    from transformers import get_scheduler

    started = time.time()
    run = RunDir(cfg.run_dir)
    if not 1 <= step <= num_steps(cfg):
        raise ConfigError(f"--step {step}: this config has steps 1..{num_steps(cfg)}", hint="pick a step in range")
    tok = load_tokenizer(cfg.model)
    data_path = require_data(cfg, run, step, tok)
    ref_path = run.reflogp(step)
    ref_meta = read_meta(ref_path)
    if ref_meta is None:
        raise ArtifactError(f"{ref_path}: reference log-probs not found", hint=f"sdpo reflogp CONFIG --step {step}")
    if ref_meta.get("fingerprint") != reflogp_fp(cfg, run, step):
        raise ArtifactError(f"{ref_path} is stale: its data or reference model changed",
                            hint=f"sdpo reflogp CONFIG --step {step} --force")
    out = run.checkpoint(step)
    fp = train_fp(cfg, run, step)
    if not force and check_not_stale(out, fp, f"sdpo train CONFIG --step {step}"):
        console.info(f"train step {step}: finished already ({run.rel(out)}), skipping")
        return out

    # ---- data: the step's pairs joined with their reference log-probs (same rows, same order)
    pairs = datasets.load_from_disk(str(data_path))
    refs = datasets.load_from_disk(str(ref_path))
    if pairs["id"] != refs["id"]:
        raise ArtifactError(f"{ref_path}: rows do not match {data_path}",
                            hint=f"sdpo reflogp CONFIG --step {step} --force")
    rows = [{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r, "ref_chosen": rc, "ref_rejected": rr}
            for p, c, r, rc, rr in zip(pairs["prompt_ids"], pairs["chosen_ids"], pairs["rejected_ids"],
                                       refs["ref_chosen_logp"], refs["ref_rejected_logp"])]

    tr = cfg.train
    # split_batches: the sampler yields global batches (per_device_batch_size x processes), each process takes its
    # slice, so N processes see exactly the pairs of one process with an N-times larger batch, in the same order.
    accelerator = make_accelerator(gradient_accumulation_steps=tr.gradient_accumulation,
                                   mixed_precision=tr.mixed_precision, log_with=list(tr.report_to) or None,
                                   project_dir=str(run.root / "logs"),
                                   dataloader_config=DataLoaderConfiguration(split_batches=True))
    set_seed(cfg.seed)

    # ---- the target: M_{t-1} (or S, per dpo.target_init)
    init = target_init_model(cfg, run, step)
    reference = reference_model(cfg, run, step)
    model = load_model(cfg.model, init, train=True)
    use_cache = model.config.use_cache
    if tr.disable_dropout:
        disable_dropout(model)
    if cfg.peft.enabled:
        model = with_lora(model, cfg.peft, cfg.model.quantization)  # QLoRA: load_model quantized M_{t-1}
    if tr.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.peft.enabled:
            model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks still need grad inputs
    layout = resolve_layout(tr.layout, model, cfg.data.max_length)
    if tr.compile:
        console.info(f"train step {step}: torch.compile of {compile_blocks(model)} transformer blocks (the first "
                     "updates of each new shape compile)")

    def collate(batch: list[tuple[dict, bool]]):
        b = collate_pairs([row for row, _ in batch], tok.pad_token_id, layout)
        ref = torch.tensor([[x["ref_chosen"], x["ref_rejected"]] for x, _ in batch], dtype=torch.float32)
        weight = torch.tensor([float(real) for _, real in batch])
        return b, ref, weight

    lengths = [pair_length(r, layout) for r in rows]
    world = accelerator.num_processes
    global_batch = tr.per_device_batch_size * world
    order = (LengthGroupedBatchSampler(lengths, global_batch, seed=cfg.seed + step)
             if tr.group_by_length and tr.shuffle else
             EpochBatches(lengths, global_batch, seed=cfg.seed + step, shuffle=tr.shuffle))
    order = FullBatches(order, len(rows)) if world > 1 else order
    loader = torch.utils.data.DataLoader(WeightedPairs(rows), batch_sampler=order, collate_fn=collate)
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": tr.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=tr.learning_rate,
                                  betas=(tr.adam_beta1, tr.adam_beta2), eps=tr.adam_epsilon,
                                  fused=_fused_adam(accelerator, model))
    _check_engine(accelerator, cfg)
    # the engines (DDP / FSDP / DeepSpeed) wrap PairLogps, so their hooks run around our lean log-prob path
    policy, optimizer, loader = accelerator.prepare(PairLogps(model), optimizer, loader)

    updates_per_epoch = math.ceil(len(loader) / tr.gradient_accumulation)
    total = tr.max_updates or max(1, math.ceil(tr.epochs * updates_per_epoch))
    scheduler = get_scheduler(tr.lr_schedule, optimizer, num_warmup_steps=math.ceil(tr.warmup_ratio * total),
                              num_training_steps=total)
    accelerator.register_for_checkpointing(scheduler)
    console.info(f"train step {step}: target from {init}, π_ref = {reference}; {len(rows)} pairs, "
                 f"{total} updates of {tr.per_device_batch_size}×{tr.gradient_accumulation}×{world} = "
                 f"{tr.per_device_batch_size * tr.gradient_accumulation * world} pairs, lr {tr.learning_rate:g}")
    if tr.report_to:
        accelerator.init_trackers(f"sdpo-step-{step}", config=section(cfg, "dpo", "train"))

    # ---- resume from the step's last saved state, if it was made by this very configuration
    log_path = run.train_log(step)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    state_dir = out.with_name(f".{out.name}.state")
    if force and accelerator.is_main_process:
        shutil.rmtree(state_dir, ignore_errors=True)  # --force redoes the step from its start
    accelerator.wait_for_everyone()
    progress = _load_state(accelerator, state_dir, fp, step)
    records = _read_records(log_path)[: progress["records"]] if progress else []
    update, epoch, skip = (progress["update"], progress["epoch"], progress["batches"]) if progress else (0, 0, 0)

    # ---- the loop
    sums = _zero_sums(accelerator.device)
    expected0 = loss_at_equal_models(cfg.dpo.loss, cfg.dpo.beta, cfg.dpo.label_smoothing)
    check_ln2 = reference == init  # target == reference at update 0 only when both start from the same model
    t_last = time.time()
    policy.train()
    # only rank 0 writes the log (the metrics are already reduced over ranks)
    log_target = log_path if accelerator.is_main_process else os.devnull
    with console.progress() as bar, _StopSignals() as stop, open(log_target, "w") as log_file:
        for record in records:  # the log up to the saved state; later lines are redone
            log_file.write(json.dumps(record) + "\n")
        task = bar.add_task(f"train step {step}", total=total, completed=update, status="")
        while update < total:
            order.set_epoch(epoch)
            batches = accelerator.skip_first_batches(loader, skip) if skip else loader
            done_in_epoch = skip
            skip = 0
            for batch, ref, weight in batches:
                done_in_epoch += 1
                with accelerator.accumulate(policy):
                    policy_c, policy_r = policy(batch)
                    ref_c, ref_r = ref[:, 0], ref[:, 1]
                    losses = dpo_losses(policy_c, policy_r, ref_c, ref_r, beta=cfg.dpo.beta, loss=cfg.dpo.loss,
                                        label_smoothing=cfg.dpo.label_smoothing,
                                        chosen_tokens=batch.chosen_tokens, rejected_tokens=batch.rejected_tokens)
                    # the mean over the real pairs of the GLOBAL micro-batch (and, for the NLL term, over its chosen
                    # tokens): each rank's share is scaled by world / global count, and DDP / FSDP / DeepSpeed
                    # average gradients over ranks, so N processes train exactly as one with an N-times batch
                    counts = torch.stack([weight.sum(), (weight * batch.chosen_tokens).sum()])
                    if world > 1:
                        counts = accelerator.reduce(counts, reduction="sum")
                    loss = (weight * losses).sum() * (world / counts[0])
                    if cfg.dpo.nll_weight:
                        # RPO / TRL's "sft" term: mean NLL per chosen completion token of the batch
                        loss = loss + cfg.dpo.nll_weight * (-(weight * policy_c).sum() * (world / counts[1]))
                    accelerator.backward(loss)
                    grad_norm = None
                    if accelerator.sync_gradients:
                        grad_norm = _clip(accelerator, policy, tr.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                _accumulate(sums, cfg.dpo.beta, losses.detach(), policy_c.detach(), policy_r.detach(), ref_c, ref_r,
                            batch, weight)
                if not accelerator.sync_gradients:
                    continue
                lr = scheduler.get_last_lr()[0]
                scheduler.step()
                if update == 0 or (update + 1) % tr.logging_every == 0 or update + 1 == total:
                    now = time.time()
                    record = _record(accelerator, sums, cfg.dpo.nll_weight, step, update, epoch, lr, grad_norm,
                                     now - t_last)
                    t_last, sums = now, _zero_sums(accelerator.device)
                    if update == 0:
                        _check_first_update(record, expected0, check_ln2, cfg.dpo.loss, step)
                    records.append(record)
                    log_file.write(json.dumps(record) + "\n")
                    log_file.flush()
                    if tr.report_to:
                        accelerator.log({k: v for k, v in record.items() if isinstance(v, float)}, step=update)
                    line = (f"step {step} | update {update:>4}/{total} | loss {record['loss']:.4f} | margin "
                            f"{record['rewards/margins']:.4f} | acc {record['rewards/accuracies']:.2f} | lr {lr:.2e}")
                    bar.update(task, status=f"loss {record['loss']:.4f}")
                    console.info(line)
                update += 1
                bar.update(task, completed=update)
                if update >= total:
                    break
                stopping = stop.requested(accelerator)
                if stopping or (tr.save_every and update % tr.save_every == 0):
                    _save_state(accelerator, state_dir, {"fingerprint": fp, "update": update, "epoch": epoch,
                                                         "batches": done_in_epoch, "records": len(records)})
                if stopping:
                    raise Interrupted(
                        f"train step {step}: stopped by {stopping} after update {update}/{total}; state saved in "
                        f"{state_dir}", hint="rerun the same command to resume from there")
            else:
                epoch += 1

    # ---- save M_t in Hugging Face layout
    accelerator.wait_for_everyone()
    if tr.report_to:
        accelerator.end_training()
    sharded = _sharded(accelerator)
    # the full state dict (a collective call under FSDP / ZeRO-3); with LoRA in one process or under DDP, peft
    # reads the adapter from the model itself
    state_dict = _target_state_dict(accelerator, policy) if sharded or not cfg.peft.enabled else None
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(policy).model
        unwrapped.config.use_cache = True if use_cache is False else use_cache  # for users who generate with M_t
        meta = {"stage": "train", "step": step, "started": started, "fingerprint": fp, "target_init": init,
                "reference": reference, "data": run.rel(data_path), "pairs": len(rows), "updates": total,
                "epochs": epoch, "world_size": world, "layout": layout, "compiled": bool(tr.compile),
                "first": records[0], "last": records[-1], "log": run.rel(log_path)}
        with writing(out, meta) as tmp:
            if cfg.peft.enabled:
                # sDPO with LoRA: M_t = M_{t-1} + this step's adapter, merged, so that M_t is a plain model and
                # serves exactly as the next step's reference and starting point. The adapter is kept beside it.
                # QLoRA: merged into the full-precision M_{t-1}, not the quantized one (sdpo_cli/lora.py).
                # Under FSDP the model holds shards: the adapter comes from the gathered state dict, and the merge
                # reloads M_{t-1} in full.
                unwrapped.save_pretrained(str(tmp / "adapter"), state_dict=state_dict)
                unwrapped = merged_model(cfg.model, unwrapped, init, tmp / "adapter", reload=sharded)
                state_dict = None
            unwrapped.save_pretrained(str(tmp), state_dict=state_dict)
            tok.save_pretrained(str(tmp))
            if tr.save_optimizer:
                torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        console.info(f"train step {step}: loss {records[0]['loss']:.4f} -> {records[-1]['loss']:.4f}; wrote {out}")
        shutil.rmtree(state_dir, ignore_errors=True)  # M_t is complete: the resume state has served
    accelerator.wait_for_everyone()
    return out


def _fused_adam(accelerator, model) -> bool | None:
    """torch's fused AdamW (one kernel for all parameters, as TRL's default `adamw_torch_fused`) where the parameters
    are plain tensors on CPU or CUDA; under FSDP / DeepSpeed, torch's default (the engines reshape parameters)."""
    from accelerate.utils import DistributedType

    plain = accelerator.distributed_type in (DistributedType.NO, DistributedType.MULTI_GPU, DistributedType.MULTI_CPU)
    supported = all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.bfloat16, torch.float16)
                    for p in model.parameters() if p.requires_grad)
    return True if plain and supported else None


def _target_state_dict(accelerator, policy) -> dict | None:
    """The target's full state dict (gathered from FSDP / ZeRO-3 shards by accelerate), named as the HF model names it
    (without PairLogps' `model.` prefix)."""
    state = accelerator.get_state_dict(policy)
    if state is None:  # non-main ranks under some engines
        return None
    return {k.removeprefix("model."): v for k, v in state.items()}


def _clip(accelerator, model, max_norm: float | None) -> torch.Tensor:
    if max_norm is not None:
        # all of model.parameters(): accelerate recognises the wrapped model (FSDP: a global norm, not per shard)
        return accelerator.clip_grad_norm_(model.parameters(), max_norm)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


def _zero_sums(device) -> dict:
    # Device-side accumulators: one host sync per logged update, not per micro-batch.
    keys = (*METRICS[1:], "nll", "chosen_tokens", "pairs", "tokens")
    return {k: torch.zeros((), dtype=torch.float64, device=device) for k in keys}


def _accumulate(sums: dict, beta: float, losses, pc, pr, rc, rr, batch, weight) -> None:
    """Sums over the real pairs of a micro-batch (weight 1; FullBatches' padding copies have weight 0)."""
    rc, rr, w = rc.to(pc.device), rr.to(pc.device), weight.to(pc.device).double()
    chosen_reward, rejected_reward = beta * (pc - rc), beta * (pr - rr)
    for key, values in (("loss/dpo", losses), ("nll", -pc), ("chosen_tokens", batch.chosen_tokens),
                        ("rewards/chosen", chosen_reward), ("rewards/rejected", rejected_reward),
                        ("rewards/margins", chosen_reward - rejected_reward),
                        ("rewards/accuracies", chosen_reward > rejected_reward),  # strict, as TRL
                        ("logps/chosen", pc), ("logps/rejected", pr), ("gamma/policy", pc - pr),
                        ("gamma/ref", rc - rr), ("pairs", torch.ones_like(pc)),
                        ("tokens", batch.chosen_tokens + batch.rejected_tokens)):
        sums[key] += (w * values.double()).sum()


def _record(accelerator, sums: dict, nll_weight: float, step: int, update: int, epoch: int, lr: float, grad_norm,
            seconds: float) -> dict:
    stacked = accelerator.reduce(torch.stack([sums[k] for k in sums]), reduction="sum")
    totals = dict(zip(sums, stacked.tolist()))
    pairs = max(totals["pairs"], 1.0)
    record = {"step": step, "update": update, "epoch": epoch}
    for key in METRICS[1:]:  # means per pair over the updates since the last record
        record[key] = totals[key] / pairs
    # the objective: the DPO loss (the ln 2 check reads loss/dpo) plus the NLL term per chosen token
    record["loss"] = record["loss/dpo"] + nll_weight * totals["nll"] / max(totals["chosen_tokens"], 1.0)
    record["lr"] = lr
    record["grad_norm"] = float(grad_norm) if grad_norm is not None else None
    record["tokens/s"] = totals["tokens"] / max(seconds, 1e-9)
    record["pairs"] = int(totals["pairs"])
    return {k: record[k] for k in ("step", "update", "epoch", *METRICS, "lr", "grad_norm", "tokens/s", "pairs")}


def _check_first_update(record: dict, expected: float, applies: bool, loss: str, step: int) -> None:
    """sDPO sanity check: update 0 sees target == reference, so margins are 0 and the loss is ln 2 (sigmoid)."""
    if not applies:
        console.info(f"train step {step}: update 0 loss {record['loss']:.6f} (target init != reference: no ln 2 check)")
        record["check"] = "skipped"
        return
    off = abs(record["loss/dpo"] - expected)
    record["check"] = "ok" if off <= 1e-3 else "FAILED"
    if off <= 1e-3:
        console.info(f"train step {step}: update 0 loss {record['loss/dpo']:.6f} = expected {expected:.6f} for "
                     f"{loss} at target == reference (ln 2 check ok)")
    else:
        console.console.print(
            f"[bold red]WARNING: step {step} update 0 loss {record['loss/dpo']:.6f} != {expected:.6f} "
            f"(off by {off:.2e}). "
            "The target should equal the reference here: the reference log-probs were computed on other tokens, "
            "another model or other numerics. Redo `sdpo reflogp --force` for this step.[/]")


class Interrupted(SdpoError):
    """Training stopped on SIGINT/SIGTERM at an update boundary, after saving its state."""

    exit_code = 130


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

    def __init__(self, sampler, n_rows: int):
        self.sampler, self.n_rows, self.batch_size = sampler, n_rows, sampler.batch_size

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __iter__(self):
        for batch in self.sampler:
            yield batch + [self.n_rows + batch[j % len(batch)] for j in range(self.batch_size - len(batch))]

    def __len__(self) -> int:
        return len(self.sampler)


class EpochBatches(LengthGroupedBatchSampler):
    """Random (or file-order) batches, with the sampler protocol of LengthGroupedBatchSampler: the order of each
    epoch is a pure function of (seed, epoch), so a resumed step replays exactly the batches an uninterrupted one
    would have seen."""

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


class _StopSignals:
    """SIGINT / SIGTERM set a flag; the loop stops at the next update boundary after saving its state. A second
    signal falls back to the default behaviour (immediate stop)."""

    def __init__(self):
        self.received: str | None = None
        self.previous: dict = {}

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def requested(self, accelerator) -> str | None:
        if accelerator.num_processes > 1:  # every rank must stop at the same update
            flag = torch.tensor([1.0 if self.received else 0.0], device=accelerator.device)
            if accelerator.reduce(flag, reduction="sum").item() > 0:
                return self.received or "a signal on another rank"
            return None
        return self.received

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        return False


def _save_state(accelerator, state_dir: Path, progress: dict) -> None:
    """Model, optimizer, scheduler and RNG states (accelerate) + our progress, replaced atomically."""
    tmp = state_dir.with_name(state_dir.name + ".tmp")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    quiet = logging.getLogger("accelerate")  # its per-save notes (tied weights dropped and re-tied) are noise here
    level, quiet.level = quiet.level, logging.ERROR
    try:
        accelerator.save_state(str(tmp))
    except Exception as e:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        if disk_full(e):  # the previous state, if any, is still there to resume from
            raise disk_full_error(state_dir) from e
        raise
    finally:
        quiet.setLevel(level)
    if accelerator.is_main_process:
        (tmp / "progress.json").write_text(json.dumps(progress) + "\n")  # written last: marks the state complete
        old = state_dir.with_name(state_dir.name + ".old")
        if state_dir.exists():
            os.replace(state_dir, old)
        os.replace(tmp, state_dir)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _load_state(accelerator, state_dir: Path, fp: str, step: int) -> dict | None:
    progress_file = state_dir / "progress.json"
    if not progress_file.is_file():
        return None
    progress = json.loads(progress_file.read_text())
    if progress.get("fingerprint") != fp:
        console.warn(f"train step {step}: ignoring {state_dir}: it was saved by another configuration")
        return None
    accelerator.load_state(str(state_dir))
    console.info(f"train step {step}: resuming after update {progress['update']} from {state_dir}")
    return progress


def _read_records(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _check_engine(accelerator, cfg: SdpoConfig) -> None:
    """What DeepSpeed needs before `prepare`, and the combinations we do not support yet."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is not None:
        # our loader uses a batch sampler (batch_size None), so DeepSpeed cannot infer the micro-batch itself
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.train.per_device_batch_size
    if cfg.peft.enabled and _zero3(accelerator):
        raise ConfigError("peft.enabled with DeepSpeed ZeRO-3: merging a ZeRO-3-partitioned LoRA model is not "
                          "supported", hint="use FSDP, DDP or ZeRO-2 for LoRA (configs/accelerate/fsdp.yaml, ...)")
    if cfg.model.quantization and _sharded(accelerator):
        raise ConfigError("model.quantization with FSDP or ZeRO-3: sharding a bitsandbytes-quantized model is not "
                          "supported", hint="QLoRA runs in one process or under DDP (configs/accelerate/ddp.yaml)")


def _zero3(accelerator) -> bool:
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return plugin is not None and plugin.deepspeed_config.get("zero_optimization", {}).get("stage") == 3


def _sharded(accelerator) -> bool:
    """FSDP or ZeRO-3: each process holds shards of the parameters; full tensors come from get_state_dict."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP or _zero3(accelerator)
