"""The run context: who this process is (rank, world size), where it prints, which config file it runs, and what it
has loaded once (tokenizers). cli.py builds one per command and passes it down to the stage it calls; nothing here is
bound at import time, so a test (or a library user) gets the stdout, stderr and environment of the moment it builds
one.

Printing rule: results go to stdout (`ctx.out`), progress and diagnostics to stderr (`ctx.err`), and only rank 0
speaks. Progress bars are drawn only on an interactive terminal. Elsewhere (a log file, a pipe) a progress is a plain
line now and then, `train step 1: 12/36 updates, loss 0.4281, 0:00:05 elapsed, ETA 0:00:10`: one every
SDPO_PROGRESS_EVERY seconds (default 30) per task, and a closing `done in` line for a task that printed one; a task
shorter than that prints none, so logs stay greppable.
"""

from __future__ import annotations

import os
import re
import shlex
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Mapping

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

# `sdpo NAME CONFIG` and the options after it (`--step 2`, `--force`): what RunContext.with_real_arguments rewrites
_CONFIG_COMMAND = re.compile(r"sdpo ([a-z]+) CONFIG((?: --[a-z-]+(?: (?!-)[^\s#]+)?)*)")


@dataclass
class RunContext:
    rank: int = 0  # this process's rank (torchrun / accelerate launch set RANK)
    world_size: int = 1  # processes the launcher started (WORLD_SIZE); accelerate may still see fewer
    config_path: str = "config"  # the YAML file, to name it in errors about its keys
    # CONFIG (a YAML file or a run directory) and the key=value overrides as the user gave them (cli.py), so that a
    # hint names the very command to run (`command`); empty for a library caller: hints then say CONFIG
    command_line: tuple[str, ...] = ()
    err: Console = field(default_factory=lambda: _console(stderr=True, quiet=False))
    out: Console = field(default_factory=lambda: _console(stderr=False, quiet=False))
    tokenizers: dict = field(default_factory=dict, repr=False)  # one load per source and settings (`tokenizer`)
    # `sdpo run`: reflogp(t) hands its reference to train(t) when both are M_{t-1} (`keep_model` / `take_model`)
    hand_over: bool = False
    kept: tuple | None = field(default=None, repr=False)

    @classmethod
    def from_env(cls, config_path: str = "config", environ: Mapping[str, str] | None = None,
                 command_line: tuple[str, ...] | list[str] = ()) -> RunContext:
        """The context of this process as the launcher started it. Reading RANK / WORLD_SIZE avoids initialising a
        process group just to decide who prints."""
        env = os.environ if environ is None else environ
        rank, world = int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1"))
        quiet = rank != 0
        return cls(rank=rank, world_size=world, config_path=str(config_path), command_line=tuple(command_line),
                   err=_console(stderr=True, quiet=quiet), out=_console(stderr=False, quiet=quiet))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def command(self, name: str, *options: str) -> str:
        """`sdpo NAME CONFIG OPTIONS OVERRIDES`, shell-quoted, with this command's CONFIG and overrides as the user
        gave them: the command a hint names (`sdpo reflogp configs/x.yaml --step 2 run_dir=runs/x`; a hint appends
        --force). `sdpo NAME CONFIG OPTIONS` when this context has no command line."""
        config, *overrides = self.command_line or ("CONFIG",)
        return shlex.join(["sdpo", name, config, *options, *overrides])

    def with_real_arguments(self, hint: str) -> str:
        """A hint with each `sdpo NAME CONFIG [--option value ...]` in it written as `command` writes it: the user's
        CONFIG and overrides. For the hints of code that no context reaches (integrity checks, model resolution);
        unchanged without a command line."""
        if not self.command_line:
            return hint
        return _CONFIG_COMMAND.sub(lambda m: self.command(m.group(1), *shlex.split(m.group(2))), hint)

    def info(self, message: str) -> None:
        self.err.print(message)

    def warn(self, message: str) -> None:
        self.err.print(f"[bold yellow]Warning:[/] {message}")

    def alert(self, message: str) -> None:
        """A loud red line on stderr for results that are wrong but not fatal (the ln 2 check)."""
        self.err.print(f"[bold red]{message}[/]")

    def progress(self) -> Progress | LogProgress:
        """A rich progress bar on an interactive terminal; elsewhere a LogProgress (a line now and then, with the
        elapsed time and the ETA); silent on ranks other than 0."""
        if self.is_main and not self.err.is_terminal:
            return LogProgress(self.err, every=progress_every())
        return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TimeRemainingColumn(), TextColumn("{task.fields[status]}"), console=self.err,
                        disable=not self.is_main, transient=False)

    def tokenizer(self, model_cfg: Any, path: str | None = None):
        """models.load_tokenizer, once per source and settings for the life of this context: `sdpo run` asks for the
        base tokenizer in every stage (~0.3 s each). Callers must not modify the returned tokenizer."""
        from sdpo_cli.models import load_tokenizer

        key = (path or model_cfg.base, model_cfg.revision, model_cfg.pad_token, model_cfg.chat_template,
               model_cfg.trust_remote_code)
        if key not in self.tokenizers:
            self.tokenizers[key] = load_tokenizer(model_cfg, path)
        return self.tokenizers[key]


    def keep_model(self, source: str, model) -> None:
        """Hold the model reflogp scored with (loaded from `source`) for the next stage, when `hand_over` is on."""
        self.kept = (str(source), model) if self.hand_over else None

    def take_model(self, source: str):
        """The kept model if it was loaded from `source`, else None; nothing stays kept either way (a model no stage
        takes must not sit in memory beside the next one)."""
        kept, self.kept = self.kept, None
        return kept[1] if kept is not None and kept[0] == str(source) else None


PROGRESS_EVERY = 30.0  # seconds between two progress lines of one task off a terminal (SDPO_PROGRESS_EVERY)


def progress_every(environ: Mapping[str, str] | None = None) -> float:
    """SDPO_PROGRESS_EVERY (seconds, >= 0; 0: a line at every advance), else PROGRESS_EVERY. A value that is not
    a number is ignored: a progress setting must never stop a run."""
    value = (os.environ if environ is None else environ).get("SDPO_PROGRESS_EVERY", "")
    try:
        return max(0.0, float(value)) if value.strip() else PROGRESS_EVERY
    except ValueError:
        return PROGRESS_EVERY


@dataclass
class _LogTask:
    description: str
    total: float | None
    completed: float
    unit: str
    status: str = ""
    started: float = field(default_factory=time.monotonic)
    start_completed: float = 0.0  # where this process began (a resumed training step starts past 0)
    last_line: float = field(default_factory=time.monotonic)
    lines: int = 0


class LogProgress:
    """rich.progress.Progress's calls that sdpo makes (add_task, update, advance; a context manager), for a stderr
    that is not a terminal: instead of a bar, a line per task at most every `every` seconds,
    `train step 1: 12/36 updates, loss 0.4281, 0:00:05 elapsed, ETA 0:00:10`, and `…: 36/36 updates, done in
    0:00:15` when a task that printed a line (or ran `every` seconds) completes. The unit is the task's `unit` field,
    else updates for a training step and pairs for everything else (tokenizing, scoring)."""

    def __init__(self, console: Console, every: float = PROGRESS_EVERY, clock=time.monotonic):
        self.console, self.every, self.clock = console, every, clock
        self.tasks: list[_LogTask] = []

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def add_task(self, description: str, start: bool = True, total: float | None = 100.0, completed: float = 0,
                 visible: bool = True, **fields: Any) -> int:
        now = self.clock()
        unit = fields.get("unit") or ("updates" if description.startswith("train") else "pairs")
        self.tasks.append(_LogTask(description, total, completed, unit, str(fields.get("status") or ""), now,
                                   completed, now))
        return len(self.tasks) - 1

    def advance(self, task_id: int, advance: float = 1) -> None:
        self.update(task_id, advance=advance)

    def update(self, task_id: int, *, total: float | None = None, completed: float | None = None,
               advance: float | None = None, description: str | None = None, visible: bool | None = None,
               refresh: bool = False, **fields: Any) -> None:
        task = self.tasks[task_id]
        if total is not None:
            task.total = total
        if description is not None:
            task.description = description
        if "status" in fields:
            task.status = str(fields["status"] or "")
        before = task.completed
        if completed is not None:
            task.completed = completed
        if advance is not None:
            task.completed += advance
        if task.completed == before:
            return  # a status change alone prints nothing: the next advance carries it
        now = self.clock()
        finished = task.total is not None and task.completed >= task.total
        if finished:
            if task.lines or now - task.started >= self.every:
                self._print(task, f"done in {_clock(now - task.started)}")
        elif now - task.last_line >= self.every:
            task.last_line = now
            self._print(task, f"{_clock(now - task.started)} elapsed, ETA {self._eta(task, now)}")

    def _eta(self, task: _LogTask, now: float) -> str:
        done, elapsed = task.completed - task.start_completed, now - task.started
        if task.total is None or done <= 0 or elapsed <= 0:
            return "unknown"
        return _clock((task.total - task.completed) * elapsed / done)

    def _print(self, task: _LogTask, timing: str) -> None:
        task.lines += 1
        count = _count(task.completed) + (f"/{_count(task.total)}" if task.total is not None else "")
        status = f", {task.status}" if task.status else ""
        self.console.print(f"{task.description}: {count} {task.unit}{status}, {timing}", markup=False,
                           highlight=False)


def _count(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.1f}"


def _clock(seconds: float) -> str:
    """H:MM:SS, as rich's elapsed and remaining columns write it."""
    return str(timedelta(seconds=max(0, round(seconds))))


def _console(stderr: bool, quiet: bool) -> Console:
    # file=None: rich writes to the sys.stdout / sys.stderr of the moment it prints, not of the moment it was built
    return Console(stderr=stderr, quiet=quiet, highlight=False, soft_wrap=True)
