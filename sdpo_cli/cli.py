"""The command line: a thin typer layer that parses, loads the config, calls one stage and prints the result.

Run as: sdpo <split|reflogp|train|run|gamma|eval> CONFIG [key=value ...]   (see docs/cli.md)

stdout carries results (artifact paths, the γ table or JSON); progress and diagnostics go to stderr. A user mistake
ends as `Error: ...` + `Hint: ...` on stderr with exit code 2 (usage/config/data) or 1, and no traceback unless
SDPO_DEBUG=1.

A command that writes the run directory holds it for its whole run (`_run_dir`): the folder must be sdpo's
(rundir.RunDir.ensure), no other sdpo process may hold its lock (lock.py), and what killed writers left there is
resolved first (RunDir.recover). Ctrl-C anywhere in a command prints `Interrupted. ...` and exits 130.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, List, Optional

import typer
from rich.markup import escape
from rich.table import Table

from sdpo_cli.context import RunContext
from sdpo_cli.errors import SdpoError


class _FlagHelp:
    """-h / --help shown as the flag it is (typer would print `--help -h <bool>`), as our own flags."""

    def get_help_option(self, ctx):
        option = super().get_help_option(ctx)
        if option is not None:
            option.metavar = ""
        return option


class _Command(_FlagHelp, typer.core.TyperCommand):
    pass


class _Group(_FlagHelp, typer.core.TyperGroup):
    pass


app = typer.Typer(
    name="sdpo",
    cls=_Group,
    help="Stepwise DPO (sDPO, Kim et al. 2024, arXiv:2403.19270): align a causal LM with preference data in steps, "
         "each step's reference being the model aligned by the step before.\n\n"
         "Example: sdpo run configs/fixtures.yaml run_dir=runs/fixtures && "
         "sdpo gamma configs/fixtures.yaml run_dir=runs/fixtures",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

ConfigArg = Annotated[Path, typer.Argument(help="YAML config file (see configs/).", show_default=False)]
Overrides = Annotated[Optional[List[str]], typer.Argument(help="Overrides as key=value, e.g. dpo.beta=0.2.",
                                                          show_default=False)]
StepOpt = Annotated[int, typer.Option("--step", "-t", min=1, help="sDPO step t (1-based).")]
# A flag takes no value: metavar="" keeps typer from showing one (`--force <bool>`) in --help
ForceOpt = Annotated[bool, typer.Option("--force", metavar="", help="Redo the stage even if it is finished.")]
JsonOpt = Annotated[bool, typer.Option("--json", metavar="", help="Print JSON to stdout instead of a table.")]


def _print_version(value: bool) -> None:
    if value:
        from sdpo_cli import __version__

        typer.echo(f"sdpo {__version__}")
        raise typer.Exit()


@app.callback()
def _app(version: Annotated[bool, typer.Option(
        "--version", metavar="", is_eager=True, callback=_print_version, help="Print the version and exit.")] = False,
) -> None:
    """--version, the app's one option of its own (its help text is Typer(help=...) above)."""


def _config(config: Path, overrides: list[str] | None):
    """The command's config (mistakes are reported before torch is imported) and its run context, built once here and
    passed down to the stage."""
    from sdpo_cli.config import load_config
    from sdpo_cli.runtime import apply_runtime  # runtime.threads, set once before any torch work

    return apply_runtime(load_config(config, overrides)), RunContext.from_env(config_path=str(config))


class _CtrlC(Exception):
    """Ctrl-C inside a command, carried past typer to main() (typer turns a KeyboardInterrupt into a silent
    Exit(130) before main() would see it: typer/core.py `_main`)."""


def _interruptible(command):
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except KeyboardInterrupt:
            raise _CtrlC() from None

    return wrapper


@contextmanager
def _run_dir(cfg, ctx: RunContext, *, required: bool = True):
    """The run directory, for one command that writes it: sdpo's own (RunDir.ensure: created and marked, or refused
    when it is a folder of the user's), locked by this command (lock.py; rank 0 for the whole job), and cleared of
    what killed writers left (RunDir.recover). Yields None; with required=False (gamma) it yields instead the
    reason why this command must not write there (read-only, another process holds it)."""
    from sdpo_cli.distributed import wait_for_ranks
    from sdpo_cli.lock import hold
    from sdpo_cli.rundir import RunDir

    run = RunDir(cfg.run_dir)
    if ctx.is_main:
        try:
            run.ensure()
        except SdpoError as e:
            if required:
                raise
            yield e.message
            return
    with hold(run.root, ctx, required=required) as blocked:
        if blocked is None and ctx.is_main:
            for line in run.recover():
                ctx.info(line)
        if required:  # the other ranks look at the run directory only once rank 0 has recovered it
            wait_for_ranks(ctx)
        yield blocked


def _record(cfg, ctx: RunContext) -> None:
    """Keep the resolved config of the last successful stage next to its artifacts."""
    from sdpo_cli.config import to_yaml
    from sdpo_cli.rundir import write_text_atomic

    if ctx.is_main:
        write_text_atomic(Path(cfg.run_dir) / "config.yaml", to_yaml(cfg))


@app.command(cls=_Command)
@_interruptible
def split(config: ConfigArg, overrides: Overrides = None, force: ForceOpt = False) -> None:
    """Build the step datasets data/step-1..T (and data/eval) from the configured sources.

    Example: sdpo split configs/fixtures.yaml run_dir=runs/fixtures

    Stratified: sdpo split configs/fixtures.yaml split.strategy=stratified split.steps=null 'split.fractions=[0.5,0.5]'
    """
    cfg, ctx = _config(config, overrides)
    with _run_dir(cfg, ctx):  # before the imports: a refusal does not wait for torch
        from sdpo_cli.split import run_split

        paths = run_split(cfg, force=force, ctx=ctx)
        _record(cfg, ctx)
    for path in paths:
        ctx.out.print(str(path))


@app.command(cls=_Command)
@_interruptible
def reflogp(config: ConfigArg, step: StepOpt, overrides: Overrides = None, force: ForceOpt = False) -> None:
    """Precompute reference log-probs (and γ_ref) of D_t with the step's reference (M_{t-1} by default).

    Example: sdpo reflogp configs/fixtures.yaml --step 2 run_dir=runs/demo
    """
    cfg, ctx = _config(config, overrides)
    with _run_dir(cfg, ctx):
        from sdpo_cli.reflogp import run_reflogp

        out = run_reflogp(cfg, step, force=force, ctx=ctx)
        _record(cfg, ctx)
    ctx.out.print(str(out))


@app.command(cls=_Command)
@_interruptible
def train(config: ConfigArg, step: StepOpt, overrides: Overrides = None, force: ForceOpt = False) -> None:
    """Run one DPO step on D_t, starting from M_{t-1}; writes checkpoints/step-t (M_t).

    Example: sdpo train configs/fixtures.yaml --step 1 run_dir=runs/demo train.learning_rate=1e-5
    """
    cfg, ctx = _config(config, overrides)
    with _run_dir(cfg, ctx):
        from sdpo_cli.train import run_train

        out = run_train(cfg, step, force=force, ctx=ctx)
        _record(cfg, ctx)
    ctx.out.print(str(out))


@app.command(cls=_Command)
@_interruptible
def run(config: ConfigArg, overrides: Overrides = None, force: ForceOpt = False) -> None:
    """Run every stage of every step (split, then reflogp + train per step), skipping finished stages.

    Example: sdpo run configs/fixtures.yaml run_dir=runs/demo
    """
    cfg, ctx = _config(config, overrides)
    with _run_dir(cfg, ctx):
        from sdpo_cli.pipeline import run_all

        out = run_all(cfg, force=force, ctx=ctx)
        _record(cfg, ctx)
    ctx.out.print(str(out))


@app.command(cls=_Command)
@_interruptible
def gamma(
    config: ConfigArg,
    overrides: Overrides = None,
    checkpoint: Annotated[Optional[List[str]], typer.Option(
        "--checkpoint", "-c", help="base | step-N | PATH; repeat for several (default: base and every step).")] = None,
    data: Annotated[Optional[str], typer.Option(
        "--data", "-d", help="step-N | eval | a data file (default: the last step's data).")] = None,
    as_json: JsonOpt = False,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Draw mean γ per checkpoint to this PNG.")] = None,
) -> None:
    """Mean γ = log π(chosen) − log π(rejected) of checkpoints on a dataset (the paper's Fig. 2).

    Example: sdpo gamma configs/fixtures.yaml run_dir=runs/demo --checkpoint base --checkpoint step-1 --json
    """
    cfg, ctx = _config(config, overrides)
    from sdpo_cli.gamma import run_gamma

    # gamma only reads finished artifacts: where it may not write (read-only, another process holds the run
    # directory) it still computes and prints, and says once that nothing was saved
    with _run_dir(cfg, ctx, required=False) as blocked:
        results = run_gamma(cfg, checkpoint, data, ctx=ctx, blocked=blocked)
    if plot is not None:
        from sdpo_cli.reports import plot_gamma

        ctx.info(f"gamma: wrote {plot_gamma(results, plot)}")
    if as_json:
        ctx.out.print(json.dumps(results, indent=2), markup=False, highlight=False)
        return
    table = Table(title=f"γ on {results[0]['data']}" if results else "γ", title_justify="left")
    for col in ("checkpoint", "n", "mean", "std", "median", "γ > 0"):
        table.add_column(col, justify="left" if col == "checkpoint" else "right")
    for r in results:
        table.add_row(r["checkpoint"], str(r["n"]), f"{r['mean']:.4f}", f"{r['std']:.4f}", f"{r['median']:.4f}",
                      f"{r['frac_positive']:.3f}")
    ctx.out.print(table)


@app.command("eval", cls=_Command)
@_interruptible
def evaluate(
    config: ConfigArg,
    overrides: Overrides = None,
    checkpoint: Annotated[Optional[List[str]], typer.Option(
        "--checkpoint", "-c", help="base | step-N | PATH; repeat for several (default: base and every step).")] = None,
    tasks: Annotated[Optional[List[str]], typer.Option(
        "--tasks", help="h4 | lm-eval task/group NAME[:SHOTS] | task YAML file or folder; comma-separated or "
                        "repeated (default: eval.tasks, i.e. h4).")] = None,
    limit: Annotated[Optional[int], typer.Option(
        "--limit", min=1, help="Score only the first N documents of each task (default: eval.limit: all).")] = None,
    force: Annotated[bool, typer.Option("--force", metavar="",
                                        help="Score again even if cache/eval has the score.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Benchmark checkpoints with lm-evaluation-harness: H4 = ARC, HellaSwag, MMLU, TruthfulQA (the paper's Table 2).

    Needs the extra: pip install 'sdpo\\[eval]'. Writes reports/eval.json; scores are cached per checkpoint and task.

    Example: sdpo eval configs/fixtures.yaml run_dir=runs/demo --checkpoint base --checkpoint step-2 --limit 100

    Offline, local data: sdpo eval CONFIG --tasks path/to/my_task.yaml  (see docs/eval.md)
    """
    cfg, ctx = _config(config, overrides)
    task_list = [t.strip() for item in tasks for t in item.split(",") if t.strip()] if tasks else None
    from sdpo_cli.evaluate import eval_table, run_eval

    with _run_dir(cfg, ctx):
        report = run_eval(cfg, checkpoint, task_list, limit, force=force, ctx=ctx)
    if as_json:
        ctx.out.print(json.dumps(report, indent=2), markup=False, highlight=False)
        return
    ctx.out.print(eval_table(report))


def main() -> None:
    """Entry point of the `sdpo` script: maps SdpoError to `Error:`/`Hint:` lines and an exit code."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Our own progress bars and counts replace the libraries' per-call bars and length warnings.
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' loading bars too: ours say what loads
    try:
        app(standalone_mode=True)
    except SdpoError as e:
        _fail(e)
    except SystemExit:
        raise
    except (_CtrlC, KeyboardInterrupt):
        RunContext.from_env().err.print("Interrupted. Finished stages are kept; rerun the same command to continue.")
        sys.exit(130)


def _fail(e: SdpoError) -> None:
    if os.environ.get("SDPO_DEBUG"):
        raise e
    err = RunContext.from_env().err
    err.print(f"[bold red]Error:[/] {escape(e.message)}", soft_wrap=True)
    if e.hint:
        err.print(f"Hint: {escape(e.hint)}", soft_wrap=True)
    sys.exit(e.exit_code)


__all__ = ["app", "main"]
