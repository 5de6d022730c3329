"""The run context: who this process is (rank, world size), where it prints, which config file it runs, and what it
has loaded once (tokenizers). cli.py builds one per command and passes it down to the stage it calls; nothing here is
bound at import time, so a test (or a library user) gets the stdout, stderr and environment of the moment it builds
one.

Printing rule: results go to stdout (`ctx.out`), progress and diagnostics to stderr (`ctx.err`), and only rank 0
speaks. Progress bars are drawn only on an interactive terminal; elsewhere stages print one-line metric logs, so logs
stay greppable.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


@dataclass
class RunContext:
    rank: int = 0  # this process's rank (torchrun / accelerate launch set RANK)
    world_size: int = 1  # processes the launcher started (WORLD_SIZE); accelerate may still see fewer
    config_path: str = "config"  # the YAML file, to name it in errors about its keys
    err: Console = field(default_factory=lambda: _console(stderr=True, quiet=False))
    out: Console = field(default_factory=lambda: _console(stderr=False, quiet=False))
    tokenizers: dict = field(default_factory=dict, repr=False)  # one load per source and settings (`tokenizer`)

    @classmethod
    def from_env(cls, config_path: str = "config", environ: Mapping[str, str] | None = None) -> RunContext:
        """The context of this process as the launcher started it. Reading RANK / WORLD_SIZE avoids initialising a
        process group just to decide who prints."""
        env = os.environ if environ is None else environ
        rank, world = int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1"))
        quiet = rank != 0
        return cls(rank=rank, world_size=world, config_path=str(config_path),
                   err=_console(stderr=True, quiet=quiet), out=_console(stderr=False, quiet=quiet))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def info(self, message: str) -> None:
        self.err.print(message)

    def warn(self, message: str) -> None:
        self.err.print(f"[bold yellow]Warning:[/] {message}")

    def alert(self, message: str) -> None:
        """A loud red line on stderr for results that are wrong but not fatal (the ln 2 check)."""
        self.err.print(f"[bold red]{message}[/]")

    def progress(self) -> Progress:
        """A rich progress bar that stays silent unless stderr is an interactive terminal (and this is rank 0)."""
        return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TimeRemainingColumn(), TextColumn("{task.fields[status]}"), console=self.err,
                        disable=not self.err.is_terminal or not self.is_main, transient=False)

    def tokenizer(self, model_cfg: Any, path: str | None = None):
        """models.load_tokenizer, once per source and settings for the life of this context: `sdpo run` asks for the
        base tokenizer in every stage (~0.3 s each). Callers must not modify the returned tokenizer."""
        from sdpo_cli.models import load_tokenizer

        key = (path or model_cfg.base, model_cfg.revision, model_cfg.pad_token, model_cfg.chat_template,
               model_cfg.trust_remote_code)
        if key not in self.tokenizers:
            self.tokenizers[key] = load_tokenizer(model_cfg, path)
        return self.tokenizers[key]


def _console(stderr: bool, quiet: bool) -> Console:
    # file=None: rich writes to the sys.stdout / sys.stderr of the moment it prints, not of the moment it was built
    return Console(stderr=stderr, quiet=quiet, highlight=False, soft_wrap=True)
