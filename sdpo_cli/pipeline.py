"""Stage `run`: every stage of every step in order, skipping the finished ones.

Run as: sdpo run CONFIG [key=value ...]

    split -> for t in 1..T: reflogp(t) with π_ref = M_{t-1}, then train(t) -> M_t

Each stage decides for itself whether it is finished (meta.json present and its fingerprint current), so a rerun
after a crash or Ctrl-C picks up at the first unfinished stage, and a changed config stops with the stage it makes
stale instead of mixing artifacts of two configurations.
"""

from __future__ import annotations

from pathlib import Path

from sdpo_cli import console
from sdpo_cli.config import SdpoConfig, num_steps
from sdpo_cli.reflogp import run_reflogp
from sdpo_cli.reports import plot_losses, read_log
from sdpo_cli.rundir import RunDir
from sdpo_cli.split import run_split
from sdpo_cli.train import run_train


def run_all(cfg: SdpoConfig, force: bool = False) -> Path:
    run = RunDir(cfg.run_dir)
    steps = num_steps(cfg)
    run_split(cfg, force=force)
    for t in range(1, steps + 1):
        console.info(f"[bold]sDPO step {t}/{steps}[/]")
        run_reflogp(cfg, t, force=force)
        run_train(cfg, t, force=force)
    curves = {f"step {t}": read_log(run.train_log(t)) for t in range(1, steps + 1) if run.train_log(t).is_file()}
    if curves:
        plot_losses(curves, run.reports / "loss.png")
    return run.checkpoint(steps)
