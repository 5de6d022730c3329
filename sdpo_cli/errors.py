"""Errors a user can cause, each with a hint that names the next command.

The CLI turns an `SdpoError` into two lines on stderr (`Error: ...` / `Hint: ...`) and an exit code, with no
traceback unless `SDPO_DEBUG=1`. Exit code 2 is for usage, config and data mistakes; 1 for everything else.
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
