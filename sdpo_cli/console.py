"""Terminal output: progress and diagnostics on stderr, results on stdout, and only rank 0 speaks.

Progress bars are drawn only on an interactive terminal; elsewhere (CI, log files) stages print one-line metric logs
instead, so logs stay greppable.
"""

from __future__ import annotations

import os
import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def is_main_process() -> bool:
    # RANK is set by torchrun / accelerate launch; reading it avoids initialising a process group just to print.
    return int(os.environ.get("RANK", "0")) == 0


console = Console(stderr=True, quiet=not is_main_process(), highlight=False, soft_wrap=True)
stdout = Console(file=sys.stdout, quiet=not is_main_process(), highlight=False, soft_wrap=True)


def info(message: str) -> None:
    console.print(message)


def warn(message: str) -> None:
    console.print(f"[bold yellow]Warning:[/] {message}")


def progress() -> Progress:
    """A rich progress bar that stays silent unless stderr is an interactive terminal."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
        console=console,
        disable=not console.is_terminal or not is_main_process(),
        transient=False,
    )
