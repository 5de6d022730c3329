"""The run-directory lock: one sdpo command at a time writes a run directory.

`hold()` takes an exclusive `fcntl.flock` on `<run_dir>/.sdpo-lock` for the whole command (cli.py, around the stage
call). The kernel releases it when the process ends, however it ends (SIGKILL included), so a killed run never
wedges the directory and no stale lock is ever cleaned up by hand. The holder writes who it is into the file (pid,
host, command, since when) and empties it when it is done; a second writer is refused before any stage starts with
an `Error:` that names the holder.

* Under a launcher (RANK / WORLD_SIZE in the run context) rank 0 holds the lock for the whole job; the other ranks,
  which never write the run directory, take none. If rank 0 is refused it exits, and the launcher stops the others.
* `gamma` takes it with `required=False`: when another process holds it (or the folder cannot be written) gamma
  computes and prints, but writes nothing.
* `holder()` tells a reader (a future `status`) who holds it, without taking it.
* A lock on a network file system is as good as that system's flock (NFSv4 and Lustre honour it across hosts).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from sdpo_cli.errors import SdpoError

try:
    import fcntl
except ImportError:  # not a POSIX system: no lock
    fcntl = None

LOCK = ".sdpo-lock"


def holder(root: Path) -> dict | None:
    """Who holds the lock of `root` ({"pid", "host", "command", "since"}, {} if it has not said yet), or None when
    nobody does. Takes nothing."""
    if fcntl is None:
        return None
    try:
        fd = os.open(root / LOCK, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return _read(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


@contextmanager
def hold(root: Path, ctx, *, required: bool = True) -> Iterator[str | None]:
    """Hold the run directory's lock for the block; yields None. When another process holds it: an SdpoError
    naming that process, or with `required=False` the reason this process must not write (yielded instead of None,
    as when the folder is read-only). Ranks other than 0 take no lock and get None."""
    if fcntl is None or not ctx.is_main:
        yield None
        return
    try:
        fd = os.open(root / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        if required:
            raise SdpoError(f"{root}: run_dir: cannot open its lock file {LOCK} ({e.strerror})",
                            hint="pick a folder you can write: run_dir=/path/you/own") from None
        yield f"{root} is not writable ({e.strerror})"
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            busy = f"{root} is in use by another sdpo process: {describe(_read(fd))}"
            if required:
                raise SdpoError(busy, hint="wait until it ends (or stop it); two commands writing one run directory "
                                           "would mix their artifacts: give this one another run_dir=...") from None
            yield busy
            return
        _write(fd, {"pid": os.getpid(), "host": socket.gethostname(), "command": _command(),
                    "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")})
        try:
            yield None
        finally:
            _write(fd, None)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def describe(info: dict | None) -> str:
    if not info:
        return "it has not written who it is yet"
    return f"pid {info.get('pid')} on {info.get('host')} since {info.get('since')}: {info.get('command')}"


def _command() -> str:
    args = sys.argv[1:] if sys.argv and sys.argv[0].endswith(("sdpo", "__main__.py", "-c")) else sys.argv
    return " ".join(["sdpo", *args])


def _read(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return json.loads(os.read(fd, 65536).decode() or "{}")
    except (OSError, ValueError):
        return {}


def _write(fd: int, info: dict | None) -> None:
    """Best effort: who holds the lock is for the error message of a second writer; a full disk must not stop the
    holder here (its stage reports the full disk where it writes)."""
    try:
        os.ftruncate(fd, 0)
        if info is not None:
            os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    except OSError:
        pass
