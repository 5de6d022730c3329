"""Every error type sdpo raises on purpose, and the exit-code rule.

Exit codes (the CLI turns an `SdpoError` into `Error: ...` / `Hint: ...` on stderr, no traceback unless SDPO_DEBUG=1):

    0    success
    2    the user's input: config file, key or value, command-line usage, data sources   (ConfigError, DataError)
    1    everything else the user can act on: run-directory paths, missing or stale artifacts, models that cannot be
         loaded, a full disk, runtime failures                                            (SdpoError, ArtifactError)
    130  interrupted (Ctrl-C, SIGINT, SIGTERM); training saved its state first             (Interrupted)

A bug is none of these: it escapes as a Python traceback (exit 1). Code that catches a library's exception to
translate it into one of ours (a full disk, a file that is not a dataset) re-raises with `from`; no `except
Exception` swallows or relabels an error it does not recognise.
"""

from __future__ import annotations


class SdpoError(Exception):
    """A failure the user can act on: one-line message plus a hint."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint


class ConfigError(SdpoError):
    """Bad config file, key, value or command-line usage."""

    exit_code = 2


class DataError(SdpoError):
    """A data source that cannot be read or has rows we cannot use."""

    exit_code = 2


class ArtifactError(SdpoError):
    """A run-directory artifact that is missing, stale or from another configuration."""

    exit_code = 1


class Interrupted(SdpoError):
    """Stopped by SIGINT / SIGTERM / Ctrl-C; training stops at an update boundary after saving its state."""

    exit_code = 130


def first_line(e: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message, whitespace collapsed: libraries' errors inside our one-line ones."""
    return " ".join(str(e).strip().split("\n")[0].split())[:limit]
