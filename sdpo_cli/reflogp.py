"""Stage `reflogp`: reference log-probs of every pair of D_t under the step's reference π_ref.

Run as: sdpo reflogp CONFIG --step T [key=value ...]

sDPO §2.2: the reference of step t is M_{t-1}, the model aligned by the previous step (S for t = 1); dpo.reference
can name S or any other model instead. Precomputing these numbers once per step means training never holds a
second model in memory, and gives the paper's γ_ref = log π_ref(y_w|x) − log π_ref(y_l|x) for free (Fig. 2).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from sdpo_cli import integrity
from sdpo_cli.config import SdpoConfig
from sdpo_cli.context import RunContext
from sdpo_cli.distributed import make_accelerator
from sdpo_cli.errors import SdpoError
from sdpo_cli.fingerprints import data_fp, logps_fp, reflogp_fp, require_data, require_step
from sdpo_cli.models import (
    check_base,
    model_identity,
    reference_model,
    target_init_model,
    tokenizer_identity,
    warn_if_pretrained,
)
from sdpo_cli.rundir import RunDir, check_not_stale, writing
from sdpo_cli.scoring import (
    gathered_weights,
    load_scoring_model,
    score_pairs_sharded,
    shard_figures,
    shard_wrapped,
)
from sdpo_cli.split import held_out_key


def run_reflogp(cfg: SdpoConfig, step: int, *, force: bool = False, ctx: RunContext | None = None) -> Path:
    """reflogp/step-t (D_t) and, where the step has held-out pairs, reflogp/eval-step-t (the pairs train's eval/*
    metrics are computed on), both under the step's reference, loaded once."""
    ctx = ctx or RunContext.from_env()
    started = time.time()
    run = RunDir(cfg.run_dir)
    require_step(cfg, step)
    check_base(cfg.model)
    warn_if_pretrained(cfg.model, ctx.warn)  # once per process: `run` has warned at its split already
    tok = ctx.tokenizer(cfg.model)
    reference = reference_model(cfg, run, step)
    parts = [(require_data(cfg, run, step, tok, ctx), run.reflogp(step), reflogp_fp(cfg, run, step))]
    key = held_out_key(cfg, step)
    if key is not None:
        parts.append((require_data(cfg, run, key, tok, ctx), run.reflogp_held_out(step),
                      logps_fp(cfg, data_fp(run, key), reference, run)))
    todo = [(data, out, fp) for data, out, fp in parts
            if force or not check_not_stale(out, fp, ctx.command("reflogp", "--step", str(step)),
                                                      ctx.command("run"))]
    if not todo:
        ctx.info(f"reflogp step {step}: finished already ({run.rel(parts[0][1])}), skipping")
        return parts[0][1]

    integrity.verify_model(reference)  # M_{t-1} (a checkpoint we wrote): every file, before its tokenizer loads
    if reference != cfg.model.base and tokenizer_identity(ctx.tokenizer(cfg.model, reference)) != \
            tokenizer_identity(tok):
        raise SdpoError(f"{reference}: the reference's tokenizer differs from the base model's",
                        hint="DPO compares log-probs of the same tokens: use a reference with the base's tokenizer")
    accelerator = make_accelerator(ctx, mixed_precision=cfg.train.mixed_precision)
    # under FSDP / ZeRO-3 sharded like train's target (inference.shard), with train's layout so that update 0 matches
    model, layout = load_scoring_model(cfg, accelerator, reference, warn=ctx.warn)
    for data_path, out, fp in todo:
        _score(cfg, step, ctx, accelerator, model, data_path, out,
               meta={"stage": "reflogp", "step": step, "started": started, "fingerprint": fp, "inputs": fp.inputs,
                     "reference": reference,
                     "reference_identity": model_identity(reference), "data": run.rel(data_path), "layout": layout})
    # `sdpo run`: train(t) starts from M_{t-1} as scored here, not read again: a whole model (one process, DDP) as it
    # is; a sharded one (FSDP2) as its weights gathered on the main process
    if not shard_wrapped(model):
        ctx.keep_model(reference, model)
    elif ctx.hand_over and not cfg.model.quantization and target_init_model(cfg, run, step) == reference:
        ctx.keep_model(reference, gathered_weights(accelerator, model))  # a collective: only when train will take it
    del model
    accelerator.free_memory()  # the prepared model: `run` trains next in this process
    return parts[0][1]


def _score(cfg: SdpoConfig, step: int, ctx: RunContext, accelerator, model, data_path: Path, out: Path,
           meta: dict) -> None:
    """Log-probs of one dataset's pairs under the loaded reference, written to `out` with their meta.json."""
    import datasets

    pairs = datasets.load_from_disk(str(data_path))
    what = "held-out pairs" if out.name.startswith("eval-") else "pairs"
    ctx.info(f"reflogp step {step}: π_ref = {meta['reference']}, {len(pairs)} {what} of {meta['data']}"
             + (f", shared by {accelerator.num_processes} processes" if accelerator.num_processes > 1 else ""))
    with ctx.progress() as bar:
        chosen, rejected, chosen_shared, rejected_shared = score_pairs_sharded(
            accelerator, model, pairs, pad_id=ctx.tokenizer(cfg.model).pad_token_id,
            batch_size=cfg.inference.batch_size, progress=bar, description=f"reflogp step {step}",
            layout=meta["layout"], shared=True)
    gammas = [c - r for c, r in zip(chosen, rejected)]
    meta = meta | {"rows": len(gammas), "gamma_ref_mean": statistics.fmean(gammas),
                   "engine": shard_figures(accelerator, model)}
    if accelerator.is_main_process:
        table = datasets.Dataset.from_dict({
            "id": pairs["id"], "ref_chosen_logp": chosen, "ref_rejected_logp": rejected, "gamma_ref": gammas,
            "chosen_tokens": [len(c) for c in pairs["chosen_ids"]],
            "rejected_tokens": [len(r) for r in pairs["rejected_ids"]],
            # over the first min(C, R) tokens of each reply, for LD-DPO (dpo.ld_alpha); the rest is the sum minus these
            "ref_chosen_logp_shared": chosen_shared, "ref_rejected_logp_shared": rejected_shared})
        with writing(out, meta) as tmp:
            table.save_to_disk(str(tmp))
        ctx.info(f"reflogp step {step}: mean γ_ref = {meta['gamma_ref_mean']:.4f} -> {out}")
    accelerator.wait_for_everyone()
