"""Stage `gamma`: mean γ = log π(y_w|x) − log π(y_l|x) of checkpoints on a dataset, the paper's Fig. 2.

Run as: sdpo gamma CONFIG [--checkpoint base|step-N|PATH ...] [--data step-N|eval|PATH] [--json] [--plot FILE]

Used as a reference, a model with a higher mean γ is a stricter lower bound for DPO (sDPO §2.2); the paper reports
−38.60 (S), −25.10 (M_1) and 84.35 (M_2) on UltraFeedback. Defaults: every finished checkpoint (base, step-1..T)
on the last step's data. Log-probs already computed by `reflogp` for the same model and data are reused; others are
cached under cache/logps/ so a second call is instant. Where gamma may not write (a read-only folder, a full disk,
another sdpo process holding the run directory) it still computes and returns every result, and warns once that
the cache and reports/gamma.json were not written.

A checkpoint of this run that the current config would not produce (stale: trained from an earlier M_{t-1}, from
other data, or with other settings) is still scored, as its folder holds a real model, but it is never mixed in
silently: its result says `stale: true` with `stale_reason`, the table shows it as `step-N (stale)`, the plot hatches
its bar, and one warning per stale checkpoint says why (`stale_reason`).
"""

from __future__ import annotations

import errno
import re
import statistics
from pathlib import Path

from sdpo_cli import integrity
from sdpo_cli.config import SdpoConfig, SourceConfig, num_steps
from sdpo_cli.context import RunContext
from sdpo_cli.data.formats import load_pairs
from sdpo_cli.data.tokenize import tokenize_pairs
from sdpo_cli.errors import ConfigError, DataError, SdpoError
from sdpo_cli.fingerprints import (
    NO_INPUTS,
    PROMPT_CUT,
    data_fp,
    logps_fp,
    reflogp_fp,
    require_data,
    split_fp,
    stale_reason,
    train_fp,
)
from sdpo_cli.models import check_base, finished_checkpoints, named_model
from sdpo_cli.rundir import RunDir, file_fingerprint, read_meta, write_json_atomic, writing


def run_gamma(cfg: SdpoConfig, checkpoints: list[str] | None = None, data: str | None = None, *,
              ctx: RunContext | None = None, blocked: str | None = None) -> list[dict]:
    """One summary per checkpoint: {checkpoint, data, n, mean, std, median, frac_positive, stale} (+ stale_reason
    when stale: see `staleness`). `blocked`: why this call must not write the run directory (cli.py: another process
    holds it, or it is not writable); nothing is then cached or reported, and one warning says so."""
    import datasets

    ctx = ctx or RunContext.from_env()
    run = RunDir(cfg.run_dir)
    saved = _Saving(ctx, blocked)
    check_base(cfg.model)
    tok = ctx.tokenizer(cfg.model)
    data = data or f"step-{num_steps(cfg)}"
    pairs, data_identity = _load_data(cfg, run, data, tok)
    if checkpoints is None:
        checkpoints = finished_checkpoints(cfg, run)
    results = []
    named = [named_model(cfg, run, name) for name in checkpoints]
    stale = {label: staleness(cfg, run, int(label[5:]), tok) for label, _ in named if _is_step(label)}
    for label, reason in stale.items():
        if reason is not None:
            ctx.warn(f"gamma: checkpoints/{label} is stale: {reason}; its result is marked stale")
    for _, source in named:
        # a checkpoint we wrote: all its files present with their sizes, before any scoring, also when its γ is
        # reused (its weights are then not read; load_model verifies their content when it loads them)
        integrity.check_sizes(Path(source))
    model_cache = None
    for label, source in named:
        fp = logps_fp(cfg, data_identity, source)
        gammas = _reuse(run, fp)
        if gammas is None:
            model_cache = model_cache or _Scorer(cfg, tok, ctx)
            gammas, engine = model_cache.gammas(source, pairs, f"γ {label} on {data}")
            cached = run.cache / "logps" / f"{_safe(label)}--{_safe(data)}"

            def cache(cached=cached, fp=fp, source=source, gammas=gammas, engine=engine):
                with writing(cached, {"stage": "gamma", "fingerprint": fp, "model": source, "data": data,
                                      "rows": len(gammas), "engine": engine}) as tmp:
                    datasets.Dataset.from_dict({"id": pairs["id"], "gamma": gammas}).save_to_disk(str(tmp))

            saved.write(cache)
            model_cache.accelerator.wait_for_everyone()
        result = summarize(label, data, gammas)
        result["stale"] = stale.get(label) is not None
        if result["stale"]:
            result["stale_reason"] = stale[label]
        results.append(result)
    saved.write(lambda: write_json_atomic(run.reports / "gamma.json", results))
    saved.report()
    return results


class _Saving:
    """gamma's writes (the cache, reports/gamma.json) on the main process, while it may write: the first that
    fails (a read-only folder, a full disk) stops the others, and `report` warns once."""

    def __init__(self, ctx: RunContext, blocked: str | None):
        self.ctx, self.blocked = ctx, blocked

    def write(self, save) -> None:
        if not self.ctx.is_main or self.blocked is not None:
            return
        try:
            save()
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise  # not a permission: a real I/O problem, shown as it is
            self.blocked = f"{e.filename or 'the run directory'} is not writable ({e.strerror or e})"
        except SdpoError as e:  # a full disk (rundir.disk_full_error), a folder in the way of the cache
            self.blocked = e.message

    def report(self) -> None:
        if self.ctx.is_main and self.blocked is not None:
            self.ctx.warn(f"gamma: the results are not saved (no cache/logps, no reports/gamma.json): "
                          f"{self.blocked}")


def staleness(cfg: SdpoConfig, run: RunDir, step: int, tok) -> str | None:
    """None if checkpoints/step-t is what the current config gives (its meta.json fingerprint is train_fp, and the
    data and reference log-probs it was trained on are current); else why not, in the user's terms."""
    path = run.checkpoint(step)
    meta = read_meta(path) or {}
    for needed in (run.data(step), run.reflogp(step)):
        if read_meta(needed) is None:
            return f"{run.rel(needed)}, which it was trained on, is gone, so it cannot be checked against this config"
    try:
        data_meta, data_expected = read_meta(run.data(step)), split_fp(cfg, tok)
        ref_meta, ref_expected = read_meta(run.reflogp(step)), reflogp_fp(cfg, run, step)
        expected = train_fp(cfg, run, step)
    except SdpoError as e:  # M_{t-1} is gone
        return f"it cannot be checked against this config ({e.message})"
    data_current = data_meta.get("fingerprint") == data_expected
    reference_current = ref_meta.get("fingerprint") == ref_expected
    if data_current and reference_current and meta.get("fingerprint") == expected:
        return None
    if not data_current:
        return f"it was trained on other data ({stale_reason(run.data(step), data_meta, data_expected)})"
    uses_previous = step > 1 and "previous" in (cfg.dpo.reference, cfg.dpo.target_init)
    if uses_previous and _created(read_meta(run.checkpoint(step - 1))) > _created(meta):
        return f"it was trained from an earlier M_{step - 1} (checkpoints/step-{step - 1} was written after it)"
    if not reference_current:
        return (f"its reference changed since it was trained ({run.rel(run.reflogp(step))}: "
                f"{stale_reason(run.reflogp(step), ref_meta, ref_expected)})")
    reason = stale_reason(path, meta, expected)
    if reason == NO_INPUTS:
        return "it was trained from another configuration or other inputs (by an earlier sdpo, which did not say which)"
    return f"it was trained from another configuration or other inputs ({reason})"


def _created(meta: dict | None) -> float:
    """When an artifact was written (meta.json's `created`, to the second), as a timestamp; 0 if unknown."""
    from datetime import datetime

    try:
        return datetime.strptime((meta or {})["created"], "%Y-%m-%dT%H:%M:%S%z").timestamp()
    except (KeyError, TypeError, ValueError):
        return 0.0


def _is_step(label: str) -> bool:
    return label.startswith("step-") and label[5:].isdigit()


def summarize(checkpoint: str, data: str, gammas: list[float]) -> dict:
    return {"checkpoint": checkpoint, "data": data, "n": len(gammas), "mean": statistics.fmean(gammas),
            "std": statistics.pstdev(gammas), "median": statistics.median(gammas),
            "frac_positive": sum(g > 0 for g in gammas) / len(gammas)}


def _load_data(cfg: SdpoConfig, run: RunDir, data: str, tok):
    import datasets

    step = re.fullmatch(r"(eval-)?step-(\d+)", data)
    if data == "eval" or step:
        key: int | str = int(step[2]) if step and not step[1] else data
        if key == "eval" and not cfg.data.eval:
            raise ConfigError("--data eval: the config has no data.eval source", hint="add data.eval, or --data step-N")
        if step and step[1] and not cfg.split.eval_fraction:
            raise ConfigError(f"--data {data}: the config holds no pairs out of each step (split.eval_fraction is 0)",
                              hint="set split.eval_fraction, or --data step-N")
        path = require_data(cfg, run, key, tok)
        return datasets.load_from_disk(str(path)), data_fp(run, key)
    path = Path(data)
    if not path.exists():
        raise DataError(f"--data {data}: not step-N, eval-step-N, eval or an existing file", hint="e.g. --data step-2")
    loaded = load_pairs(SourceConfig(name=path.stem, path=str(path.resolve())), cfg.data.drop_ties)
    kept, _ = tokenize_pairs(tok, loaded.pairs, cfg.data.max_length, cfg.data.max_prompt_length)
    if not kept:
        raise DataError(f"{path}: no pair fits data.max_length", hint="raise data.max_length")
    identity = f"{file_fingerprint(path)}:{cfg.data.max_length}:{cfg.data.max_prompt_length}"
    if cfg.data.max_prompt_length is not None:  # the prompt's content is cut now, not its ids (fingerprints.py)
        identity += f":{PROMPT_CUT}"
    if cfg.data.drop_ties:
        identity += ":drop_ties"
    return datasets.Dataset.from_list(kept), identity


def _reuse(run: RunDir, fp: str) -> list[float] | None:
    """γ from a finished reflogp or an earlier gamma call that did this very computation."""
    import datasets

    candidates = sorted(run.root.glob("reflogp/*")) + sorted((run.cache / "logps").glob("*"))
    for path in candidates:
        meta = read_meta(path)
        if meta and meta.get("fingerprint") == fp:
            integrity.verify(path)
            table = datasets.load_from_disk(str(path))
            return list(table["gamma_ref" if "gamma_ref" in table.column_names else "gamma"])
    return None


class _Scorer:
    """Loads each checkpoint in turn on the accelerator's device and scores the pairs."""

    def __init__(self, cfg: SdpoConfig, tok, ctx: RunContext):
        from sdpo_cli.distributed import make_accelerator

        self.cfg, self.tok, self.ctx = cfg, tok, ctx
        self.accelerator = make_accelerator(ctx, mixed_precision=cfg.train.mixed_precision)

    def gammas(self, source: str, pairs, description: str) -> tuple[list[float], dict]:
        """γ of every pair under `source`, and what each process held while scoring (scoring.shard_figures)."""
        from sdpo_cli.scoring import load_scoring_model, score_pairs_sharded, shard_figures

        # under FSDP / ZeRO-3 sharded like train's target (inference.shard)
        model, layout = load_scoring_model(self.cfg, self.accelerator, source, warn=self.ctx.warn)
        with self.ctx.progress() as bar:
            chosen, rejected = score_pairs_sharded(self.accelerator, model, pairs, pad_id=self.tok.pad_token_id,
                                                   batch_size=self.cfg.inference.batch_size, progress=bar,
                                                   description=description, layout=layout)
        engine = shard_figures(self.accelerator, model)  # a collective: every process
        del model
        self.accelerator.free_memory()  # a prepared model: before the next checkpoint loads
        return [c - r for c, r in zip(chosen, rejected)], engine


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)[-80:]
