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
from sdpo_cli.collate import resolve_layout
from sdpo_cli.config import SdpoConfig
from sdpo_cli.context import RunContext
from sdpo_cli.distributed import make_accelerator
from sdpo_cli.errors import SdpoError
from sdpo_cli.fingerprints import reflogp_fp, require_data, require_step
from sdpo_cli.models import check_base, disable_dropout, load_model, model_identity, reference_model, tokenizer_identity
from sdpo_cli.rundir import RunDir, check_not_stale, writing
from sdpo_cli.scoring import score_pairs_sharded


def run_reflogp(cfg: SdpoConfig, step: int, *, force: bool = False, ctx: RunContext | None = None) -> Path:
    import datasets

    ctx = ctx or RunContext.from_env()
    started = time.time()
    run = RunDir(cfg.run_dir)
    require_step(cfg, step)
    check_base(cfg.model)
    tok = ctx.tokenizer(cfg.model)
    data_path = require_data(cfg, run, step, tok)
    out = run.reflogp(step)
    fp = reflogp_fp(cfg, run, step)
    if not force and check_not_stale(out, fp, f"sdpo reflogp CONFIG --step {step}"):
        ctx.info(f"reflogp step {step}: finished already ({run.rel(out)}), skipping")
        return out

    reference = reference_model(cfg, run, step)
    integrity.verify_model(reference)  # M_{t-1} (a checkpoint we wrote): every file, before its tokenizer loads
    if reference != cfg.model.base and tokenizer_identity(ctx.tokenizer(cfg.model, reference)) != \
            tokenizer_identity(tok):
        raise SdpoError(f"{reference}: the reference's tokenizer differs from the base model's",
                        hint="DPO compares log-probs of the same tokens: use a reference with the base's tokenizer")
    pairs = datasets.load_from_disk(str(data_path))
    accelerator = make_accelerator(ctx, mixed_precision=cfg.train.mixed_precision)
    ctx.info(f"reflogp step {step}: π_ref = {reference}, {len(pairs)} pairs of {run.rel(data_path)}"
                 + (f", shared by {accelerator.num_processes} processes" if accelerator.num_processes > 1 else ""))
    model = load_model(cfg.model, reference).to(accelerator.device)
    disable_dropout(model)
    # train's layout, so that update 0 matches exactly
    layout = resolve_layout(cfg.train.layout, model, cfg.data.max_length, warn=ctx.warn)
    with ctx.progress() as bar:
        chosen, rejected = score_pairs_sharded(accelerator, model, pairs, pad_id=tok.pad_token_id,
                                               batch_size=cfg.inference.batch_size, progress=bar,
                                               description=f"reflogp step {step}", layout=layout)
    gammas = [c - r for c, r in zip(chosen, rejected)]
    meta = {"stage": "reflogp", "step": step, "started": started, "fingerprint": fp, "reference": reference,
            "reference_identity": model_identity(reference), "data": run.rel(data_path), "rows": len(gammas),
            "layout": layout,
            "gamma_ref_mean": statistics.fmean(gammas)}
    if accelerator.is_main_process:
        table = datasets.Dataset.from_dict({
            "id": pairs["id"], "ref_chosen_logp": chosen, "ref_rejected_logp": rejected, "gamma_ref": gammas,
            "chosen_tokens": [len(c) for c in pairs["chosen_ids"]],
            "rejected_tokens": [len(r) for r in pairs["rejected_ids"]]})
        with writing(out, meta) as tmp:
            table.save_to_disk(str(tmp))
        ctx.info(f"reflogp step {step}: mean γ_ref = {meta['gamma_ref_mean']:.4f} -> {out}")
    accelerator.wait_for_everyone()
    return out
