"""Stage `run`: every stage of every step in order, skipping the finished ones.

Run as: sdpo run CONFIG [key=value ...]

    split -> for t in 1..T: reflogp(t) with π_ref = M_{t-1}, then train(t) -> M_t [, eval(base, M_1..M_t)]

With eval.after_each_step, the eval tasks are loaded before the split (an unreachable dataset or a missing lm-eval
stops the run before any training), and each M_t is scored as soon as it is saved; scores already in cache/eval/
are reused, so base and earlier steps are scored once. reports/eval.json then holds base..M_t.

Each stage decides for itself whether it is finished (meta.json present and its fingerprint current), so a rerun
after a crash or Ctrl-C picks up at the first unfinished stage, and a changed config stops with the stage it makes
stale instead of mixing artifacts of two configurations. With --redo-stale a stale stage is redone instead
(status.stale_reasons), and so is every stage after it whose inputs that changes: a fingerprint includes those of the
artifacts it is computed from (the step's data and reference log-probs, M_{t-1}), so when the stages run in order
each one downstream of a redone stage is stale by the time its turn comes. --force redoes every stage.

A finished artifact with a missing file, or one whose size differs from its meta.json, stops the run with the
command that writes it again.
"""

from __future__ import annotations

from pathlib import Path

from sdpo_cli import integrity
from sdpo_cli.config import SdpoConfig, num_steps
from sdpo_cli.context import RunContext
from sdpo_cli.reflogp import run_reflogp
from sdpo_cli.reports import plot_losses, read_log
from sdpo_cli.rundir import RunDir
from sdpo_cli.split import run_split
from sdpo_cli.train import check_trackers, run_train


def run_all(cfg: SdpoConfig, *, force: bool = False, redo_stale: bool = False, ctx: RunContext | None = None) -> Path:
    ctx = ctx or RunContext.from_env()
    ctx.hand_over = True  # reflogp(t) keeps M_{t-1} in memory for train(t): a step loads it once
    run = RunDir(cfg.run_dir)
    steps = num_steps(cfg)
    redo = _Redo(cfg, run, ctx, force=force, stale=redo_stale)
    check_trackers(cfg.train.report_to, ctx)  # a tracker that is not installed stops the run before the split
    evaluator = _evaluator(cfg, ctx)
    # every artifact a stage returns (finished before or just written) has all its files, at their recorded sizes:
    # stat calls only. A stage that reads an artifact verifies its content itself (sdpo_cli/integrity.py).
    for path in run_split(cfg, force=redo("split"), ctx=ctx):
        integrity.check_sizes(path)
    for t in range(1, steps + 1):
        ctx.info(f"[bold]sDPO step {t}/{steps}[/]")
        integrity.check_sizes(run_reflogp(cfg, t, force=redo("reflogp", t), ctx=ctx))
        # a stale M_t is redone, but the saved state of an interrupted redo (same fingerprint) is resumed
        integrity.check_sizes(run_train(cfg, t, force=force, redo_stale=redo("train", t), ctx=ctx))
        ctx.take_model("")  # a model train did not take (it was finished) must not stay in memory
        if evaluator is not None:
            from sdpo_cli.evaluate import eval_table
            from sdpo_cli.models import named_model

            report = evaluator.evaluate([named_model(cfg, run, name) for name in ["base"] + [
                f"step-{s}" for s in range(1, t + 1)]], force=force)
            ctx.err.print(eval_table(report))
    curves = {f"step {t}": read_log(run.train_log(t)) for t in range(1, steps + 1) if run.train_log(t).is_file()}
    if curves and ctx.is_main:
        plot_losses(curves, run.reports / "loss.png")
    return run.checkpoint(steps)


class _Redo:
    """Whether `run` redoes a stage: every one with --force; with --redo-stale, one whose finished artifact is stale,
    judged just before its turn (status.stale_reasons), so that a stage after a redone one is judged on the redone
    artifact."""

    def __init__(self, cfg: SdpoConfig, run: RunDir, ctx: RunContext, *, force: bool, stale: bool):
        self.cfg, self.run, self.ctx, self.force, self.stale = cfg, run, ctx, force, stale

    def __call__(self, stage: str, step: int | None = None) -> bool:
        if self.force or not self.stale:
            return self.force
        from sdpo_cli.status import stale_reasons

        reasons = stale_reasons(self.cfg, self.run, self.ctx.tokenizer(self.cfg.model), stage, step)
        if reasons:
            from rich.markup import escape

            self.ctx.info(f"{stage}{f' step {step}' if step else ''}: stale, redoing it (--redo-stale): "
                          + escape("; ".join(reasons)))
        return bool(reasons)


def _evaluator(cfg: SdpoConfig, ctx: RunContext):
    """eval.after_each_step: the tasks, loaded (and their data reached) before any work; None when off."""
    if not cfg.eval.after_each_step:
        return None
    if ctx.world_size > 1:
        ctx.warn("eval.after_each_step is skipped in a multi-process run (lm-eval scores on one device); "
                 "afterwards: sdpo eval CONFIG")
        return None
    from sdpo_cli.evaluate import Evaluator

    return Evaluator(cfg, ctx=ctx)
