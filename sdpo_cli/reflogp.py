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

from sdpo_cli import console
from sdpo_cli.config import SdpoConfig, num_steps
from sdpo_cli.distributed import make_accelerator, score_pairs_sharded
from sdpo_cli.errors import ConfigError, SdpoError
from sdpo_cli.fingerprints import reflogp_fp, require_data
from sdpo_cli.logprobs import resolve_layout
from sdpo_cli.models import (
    check_base,
    disable_dropout,
    load_model,
    load_tokenizer,
    model_identity,
    reference_model,
    tokenizer_identity,
)
from sdpo_cli.rundir import RunDir, check_not_stale, writing


def run_reflogp(cfg: SdpoConfig, step: int, force: bool = False) -> Path:
    import datasets

    started = time.time()
    run = RunDir(cfg.run_dir)
    if not 1 <= step <= num_steps(cfg):
        raise ConfigError(f"--step {step}: this config has steps 1..{num_steps(cfg)}", hint="pick a step in range")
    check_base(cfg.model)
    tok = load_tokenizer(cfg.model)
    data_path = require_data(cfg, run, step, tok)
    out = run.reflogp(step)
    fp = reflogp_fp(cfg, run, step)
    if not force and check_not_stale(out, fp, f"sdpo reflogp CONFIG --step {step}"):
        console.info(f"reflogp step {step}: finished already ({run.rel(out)}), skipping")
        return out

    reference = reference_model(cfg, run, step)
    if reference != cfg.model.base and tokenizer_identity(load_tokenizer(cfg.model, reference)) != \
            tokenizer_identity(tok):
        raise SdpoError(f"{reference}: the reference's tokenizer differs from the base model's",
                        hint="DPO compares log-probs of the same tokens: use a reference with the base's tokenizer")
    pairs = datasets.load_from_disk(str(data_path))
    accelerator = make_accelerator(mixed_precision=cfg.train.mixed_precision)
    console.info(f"reflogp step {step}: π_ref = {reference}, {len(pairs)} pairs of {run.rel(data_path)}"
                 + (f", shared by {accelerator.num_processes} processes" if accelerator.num_processes > 1 else ""))
    model = load_model(cfg.model, reference).to(accelerator.device)
    disable_dropout(model)
    layout = resolve_layout(cfg.train.layout, model, cfg.data.max_length)  # train's, so update 0 matches exactly
    with console.progress() as bar:
        chosen, rejected = score_pairs_sharded(accelerator, model, pairs, tok.pad_token_id,
                                               cfg.inference.batch_size, bar, f"reflogp step {step}", layout)
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
        console.info(f"reflogp step {step}: mean γ_ref = {meta['gamma_ref_mean']:.4f} -> {out}")
    accelerator.wait_for_everyone()
    return out
