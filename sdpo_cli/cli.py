"""The command line: a thin typer layer that parses, loads the config, calls one stage and prints the result.

Run as: sdpo <split|reflogp|train|run|gamma|eval|status> CONFIG|RUN_DIR [key=value ...]   (see docs/cli.md)
        sdpo run --model MODEL --data FILE_OR_ID [--data ...] [--run-dir DIR] [key=value ...]   (no YAML)
        sdpo init [--model MODEL] [--data FILE_OR_ID ...] [--run-dir DIR] > my.yaml

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
from sdpo_cli.distributed import leave_process_group
from sdpo_cli.errors import ConfigError, DataError, SdpoError


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

ConfigArg = Annotated[Path, typer.Argument(
    help="YAML config file (see configs/), or a run directory (the config it recorded, run_dir = that directory).",
    show_default=False)]
Overrides = Annotated[Optional[List[str]], typer.Argument(help="Overrides as key=value, e.g. dpo.beta=0.2.",
                                                          show_default=False)]
StepOpt = Annotated[int, typer.Option("--step", "-t", min=1, help="sDPO step t (1-based).")]
# A flag takes no value: metavar="" keeps typer from showing one (`--force <bool>`) in --help
ForceOpt = Annotated[bool, typer.Option("--force", metavar="", help="Redo the stage even if it is finished.")]
JsonOpt = Annotated[bool, typer.Option("--json", metavar="", help="Print JSON to stdout instead of a table.")]
RedoStaleOpt = Annotated[bool, typer.Option(
    "--redo-stale", metavar="", help="Redo every stage whose artifact is stale (made from another config or other "
                                     "inputs), and so every stage after it; finished current stages are kept.")]


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
    passed down to the stage. CONFIG is a YAML file or a run directory: the config recorded there, with run_dir = that
    directory (config.load_config). The context keeps CONFIG and the overrides as given, for the commands that hints
    name (RunContext.command)."""
    from sdpo_cli.config import config_file, load_config
    from sdpo_cli.runtime import apply_runtime  # runtime.threads, set once before any torch work

    global _command_line
    _command_line = (str(config), *(overrides or []))
    cfg = apply_runtime(load_config(config, overrides))
    return cfg, RunContext.from_env(config_path=str(config_file(config)), command_line=_command_line)


# CONFIG and the overrides of this process's command, once parsed: _fail writes them into the hints of errors raised
# where no RunContext reaches (integrity checks, model resolution), so that every hint is a command to paste.
_command_line: tuple[str, ...] = ()


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


ModelOpt = Annotated[Optional[str], typer.Option(
    "--model", "-m", help="Without CONFIG: the SFT model to start from (hub id or folder).", show_default=False)]
DataOpt = Annotated[Optional[List[str]], typer.Option(
    "--data", "-d", help="Without CONFIG: preference data (file, folder or hub id[:SPLIT]); repeat it: one sDPO step "
                         "per --data, in order.", show_default=False)]
RunDirOpt = Annotated[Optional[str], typer.Option(
    "--run-dir", help="Without CONFIG: the run directory (default: runs/<model name>-sdpo).", show_default=False)]


def _run_config(config: Path | None, overrides: list[str] | None, model: str | None, data: list[str] | None,
                run_dir: str | None):
    """`sdpo run`'s config, context, and whether it was started without CONFIG: CONFIG [key=value ...] as every
    command's, or without CONFIG the one that --model / --data / --run-dir describe (config.start_config: the same
    schema, defaults, overrides and checks). Such a run's config file is RUN_DIR/config.yaml, which it writes before
    the first stage: its hints name that file (the overrides are in it)."""
    if config is not None and "=" in str(config) and not config.exists():
        overrides, config = [str(config), *(overrides or [])], None  # typer took the first override for CONFIG
    given = [flag for flag, value in (("--model", model), ("--data", data), ("--run-dir", run_dir)) if value]
    if config is not None:
        if given:
            raise ConfigError(f"{' and '.join(given)}: only for a start without CONFIG; {config} names the model, "
                              "the data and the run directory",
                              hint=f"sdpo run {config} model.base=MODEL run_dir=DIR  # overrides of the config's keys, "
                                   "or drop CONFIG: sdpo run --model MODEL --data FILE --run-dir DIR")
        return (*_config(config, overrides), False)
    if not model or not data:
        example = f"sdpo run --model {model or 'MODEL'} --data {(data or ['FILE'])[0]} [--data FILE ...]"
        missing = " and ".join(flag for flag, value in (("--model", model), ("--data", data)) if not value)
        raise ConfigError(f"sdpo run without CONFIG needs {missing}" if given else
                          "sdpo run needs a CONFIG, or --model and --data",
                          hint=f"{example} [--run-dir DIR]  # one sDPO step per --data; or sdpo init > my.yaml, "
                               "edit it, then sdpo run my.yaml")
    from sdpo_cli.config import start_config
    from sdpo_cli.runtime import apply_runtime

    cfg = apply_runtime(start_config(model, data, run_dir, overrides))
    recorded = Path(cfg.run_dir) / "config.yaml"
    shown = os.path.relpath(recorded) if recorded.is_relative_to(Path.cwd()) else str(recorded)
    return cfg, RunContext.from_env(config_path=shown, command_line=[shown]), True


def _record_first(cfg, ctx: RunContext, started: bool) -> None:
    """config.yaml before the first stage, in a run directory that has none yet, so that a first run that stops early
    (an error, Ctrl-C) leaves the config it was started with for later commands (status, a rerun, gamma); _record
    replaces it when the run succeeds. A run `started` without CONFIG always writes it: it is that run's config file
    (a changed --data or override then shows in `sdpo status` as the stale stages it makes)."""
    if ctx.is_main and (started or not (Path(cfg.run_dir) / "config.yaml").exists()):
        _record(cfg, ctx)


@app.command(cls=_Command)
@_interruptible
def run(config: Annotated[Optional[Path], typer.Argument(
            help="YAML config file (see configs/); omit it to start from --model and --data.", show_default=False)]
        = None,
        overrides: Overrides = None, force: ForceOpt = False, model: ModelOpt = None, data: DataOpt = None,
        run_dir: RunDirOpt = None, redo_stale: RedoStaleOpt = False) -> None:
    """Run every stage of every step (split, then reflogp + train per step), skipping finished stages.

    Example: sdpo run configs/fixtures.yaml run_dir=runs/demo

    Without a YAML file (one sDPO step per --data, in order; the config is written to RUN_DIR/config.yaml):
    sdpo run --model MODEL --data d1.jsonl --data d2.jsonl --run-dir runs/mine [key=value ...]
    """
    cfg, ctx, started = _run_config(config, overrides, model, data, run_dir)
    with _run_dir(cfg, ctx):
        from sdpo_cli.pipeline import run_all

        _record_first(cfg, ctx, started)
        out = run_all(cfg, force=force, redo_stale=redo_stale, ctx=ctx)
        _record(cfg, ctx)
    ctx.out.print(str(out))


@app.command(cls=_Command)
def init(
    model: Annotated[Optional[str], typer.Option(
        "--model", "-m", help="model.base: the SFT model (hub id or folder).", show_default=False)] = None,
    data: Annotated[Optional[List[str]], typer.Option(
        "--data", "-d", help="data.sources: a file, folder or hub id[:SPLIT]; repeat it: one sDPO step per --data, "
                             "in order.", show_default=False)] = None,
    run_dir: Annotated[Optional[str], typer.Option(
        "--run-dir", help="run_dir (default: runs/<model name>-sdpo).", show_default=False)] = None,
) -> None:
    """Print a commented YAML config for your own data: every key you are likely to touch, with its default, and an
    example row of each data format. --model / --data / --run-dir fill those in.

    Example: sdpo init --model my-org/my-sft-model --data d1.jsonl --data d2.jsonl > my.yaml && sdpo run my.yaml
    """
    from sdpo_cli.init import init_yaml

    typer.echo(init_yaml(model, data, run_dir), nl=False)


@app.command(cls=_Command)
@_interruptible
def gamma(
    config: ConfigArg,
    overrides: Overrides = None,
    checkpoint: Annotated[Optional[List[str]], typer.Option(
        "--checkpoint", "-c", help="base | step-N | PATH; repeat for several (default: base and every step).")] = None,
    data: Annotated[Optional[str], typer.Option(
        "--data", "-d", help="step-N | eval-step-N (held out of step N) | eval | a data file (default: the last "
                             "step's data).")] = None,
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
    for r in results:  # a stale checkpoint (gamma.staleness, warned about on stderr) is marked, never mixed in silently
        table.add_row(r["checkpoint"] + (" (stale)" if r.get("stale") else ""), str(r["n"]), f"{r['mean']:.4f}",
                      f"{r['std']:.4f}", f"{r['median']:.4f}", f"{r['frac_positive']:.3f}")
    if any(r.get("stale") for r in results):
        table.caption = "(stale): not what this config gives; see the warning on stderr"
        table.caption_justify = "left"
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


@app.command(cls=_Command)
@_interruptible
def status(config: ConfigArg, overrides: Overrides = None, as_json: JsonOpt = False) -> None:
    """Every stage of every step: finished, stale (and why), missing or running; and the command that brings the run
    up to date. Reads only: takes no lock, writes nothing, loads no model (the tokenizer only).

    Example: sdpo status configs/fixtures.yaml run_dir=runs/fixtures dpo.beta=0.2

    On a run directory (the config it recorded): sdpo status runs/fixtures
    """
    cfg, ctx = _config(config, overrides)
    from sdpo_cli.status import run_status, status_lines

    report = run_status(cfg, ctx=ctx)
    if as_json:
        ctx.out.print(json.dumps(report, indent=2, ensure_ascii=False), markup=False, highlight=False)
        return
    for line in status_lines(report):
        ctx.out.print(line)


def main() -> None:
    """Entry point of the `sdpo` script: maps SdpoError to `Error:`/`Hint:` lines and an exit code."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Our own progress bars and counts replace the libraries' per-call bars and length warnings.
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' loading bars too: ours say what loads
    global _command_line
    _command_line = ()  # set by _config once CONFIG is parsed
    try:
        app(standalone_mode=True)
    except SdpoError as e:
        _fail(e)
    except SystemExit as e:
        if not e.code:  # success: after an error a peer may still wait in a collective that the group's end joins
            leave_process_group()
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                # A launched process whose work is done and written skips the interpreter's finalization: even with
                # the group destroyed, a rank of a finished 2-process ZeRO-3 `sdpo run` died there of SIGABRT in CI
                # ("terminate called without an active exception", C++ threads outliving Python), and torchrun then
                # reports the whole job failed. Trackers are finished and files closed by then.
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(0)
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
        hint = e.hint if isinstance(e, (ConfigError, DataError)) else RunContext(
            command_line=_command_line).with_real_arguments(e.hint)  # input errors' hints show how to fix the input
        err.print(f"Hint: {escape(hint)}", soft_wrap=True)
    sys.exit(e.exit_code)


__all__ = ["app", "main"]
