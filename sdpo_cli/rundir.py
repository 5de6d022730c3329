"""The run directory: every artifact's path, its meta.json, and atomic writes.

    runs/<name>/
      .sdpo-run                   MARKER: this folder is sdpo's (RunDir.ensure)
      .sdpo-lock                  the run-directory lock (lock.py)
      config.yaml                 resolved config of the last successful split / reflogp / train / run
      data/step-t/  data/eval/    canonical pairs + token ids (datasets.save_to_disk) + meta.json
      data/eval-step-t/           held-out pairs of step t (split.eval_fraction), or data/eval for every step
      reflogp/step-t/             reference log-probs of D_t under the step's reference + meta.json
      reflogp/eval-step-t/        reference log-probs of step t's held-out pairs under the same reference
      checkpoints/step-t/         M_t in Hugging Face layout (+ adapter/ with LoRA, optimizer.pt if asked) + meta.json
      checkpoints/.step-t.state/  resumable state of an unfinished step (accelerate's + progress.json); removed when
                                  M_t is written
      logs/train-step-t.jsonl     one JSON object per logged update (+ tracker files with train.report_to)
      cache/logps/                gamma's log-probs of other models or data, reused by later calls
      cache/eval/                 one lm-eval score per checkpoint x task (sdpo eval)
      reports/                    gamma.json, gamma.png, loss.png, eval.json

A stage is finished iff its folder holds meta.json and the fingerprint recorded there equals the one the current
config and inputs give. A stage writes into a temporary sibling, writes meta.json last and renames the folder into
place, so a crash never leaves a half artifact that looks finished; what a kill leaves beside an artifact (a complete
temporary sibling not yet renamed, the previous version set aside) is resolved by `settle()` at the next start.

The folder is sdpo's only if it carries MARKER (written by `RunDir.ensure`): sdpo never deletes or replaces a file in
a folder it did not make, nor a folder in an artifact's place that has no meta.json.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import platform
import re
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from sdpo_cli import __version__, integrity
from sdpo_cli.errors import ArtifactError, SdpoError

META = "meta.json"
PROGRESS = "progress.json"  # what completes a resumable training state (train._save_state), as META an artifact
MARKER = ".sdpo-run"  # in the run directory's root: this folder is sdpo's, sdpo may replace what it wrote here
STAGE_DIRS = ("data", "reflogp", "checkpoints", "cache/logps")  # where earlier versions' artifacts (meta.json) live


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-able parts."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def file_fingerprint(path: Path) -> str:
    """Content hash of a file (or of a folder's files); files above 256 MB are hashed by size and mtime only."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(str(f.relative_to(path) if f != path else f.name).encode())
        if st.st_size > 256 * 2**20:
            h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
        else:
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


class RunDir:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def data(self, step: int | str) -> Path:
        return self.root / "data" / (step if isinstance(step, str) else f"step-{step}")

    def reflogp(self, step: int) -> Path:
        return self.root / "reflogp" / f"step-{step}"

    def reflogp_held_out(self, step: int) -> Path:
        """Reference log-probs of step t's held-out pairs under step t's reference (train's eval/* metrics)."""
        return self.root / "reflogp" / f"eval-step-{step}"

    def checkpoint(self, step: int) -> Path:
        return self.root / "checkpoints" / f"step-{step}"

    def train_log(self, step: int) -> Path:
        return self.root / "logs" / f"train-step-{step}.jsonl"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    def rel(self, path: Path) -> str:
        try:
            return str(path.relative_to(self.root))
        except ValueError:
            return str(path)

    def ensure(self) -> None:
        """Create the run directory and prove it writable, before any work: one clear line if it is not."""
        hint = "pick another folder: run_dir=/path/you/own"
        blocker = next((p for p in [self.root, *self.root.parents] if p.exists()), None)
        if blocker is not None and not blocker.is_dir():
            where = "run_dir is a file" if blocker == self.root else f"{blocker} is a file, not a folder"
            raise SdpoError(f"{self.root}: run_dir: cannot create the run directory: {where}", hint=hint)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".write-test-{os.getpid()}"
            probe.write_text("")
            probe.unlink(missing_ok=True)  # a recovering holder of the lock may have removed it already
        except OSError as e:
            if disk_full(e):
                raise SdpoError(f"{self.root}: run_dir: disk full", hint=f"free space, or {hint}") from None
            raise SdpoError(f"{self.root}: run_dir: not writable ({e.strerror})", hint=hint) from None
        self._claim()

    def _claim(self) -> None:
        """Mark the run directory as sdpo's (MARKER): a new or empty folder, or one an earlier sdpo version made
        (recognised by its stage folders' meta.json). Any other non-empty folder is the user's: refused, so that sdpo
        never replaces a file it did not write (a `run_dir=.` in a project folder would replace its config.yaml)."""
        marker = self.root / MARKER
        if marker.is_file():
            return
        ours = any(next(self.root.glob(f"{stage}/*/{META}"), None) for stage in STAGE_DIRS)
        theirs = sorted(p.name for p in self.root.iterdir() if not p.name.startswith(".write-test-"))
        if theirs and not ours:
            shown = ", ".join(theirs[:5]) + (", ..." if len(theirs) > 5 else "")
            raise SdpoError(f"{self.root}: run_dir: this folder is not empty and sdpo did not make it ({shown}); "
                            "sdpo writes config.yaml, data/, checkpoints/, logs/ ... there and would replace them",
                            hint=f"use a new folder: run_dir={self.root / 'run'}")
        try:
            marker.write_text(f"This folder is a run directory of sdpo {__version__}: sdpo writes, replaces and "
                              "deletes the files it made here.\n")
        except OSError as e:
            if disk_full(e):
                raise disk_full_error(marker) from e
            raise SdpoError(f"{self.root}: run_dir: not writable ({e.strerror})",
                            hint="pick another folder: run_dir=/path/you/own") from None

    def recover(self) -> list[str]:
        """Resolve what killed writers left in the run directory (call it holding the run-directory lock, before any
        stage): see `settle()`. Returns one line per artifact put back in place."""
        done = []
        for probe in self.root.glob(".write-test-*"):
            remove(probe)
        for folder in _search(self.root):
            targets = {_target(folder, m) for m in (_LEFTOVER.match(p.name) for p in folder.iterdir()) if m}
            if folder == self.root:
                targets = {t for t in targets if t.name in ROOT_FILES}
            for target in sorted(targets):
                if settle(target):
                    done.append(f"{self.rel(target)}: completed the write a killed process had left unfinished")
        for state in self.root.glob("checkpoints/.step-*.state"):
            if not _complete(state):  # its removal was cut short: never resumed from
                remove(state)
        return done


def read_meta(path: Path) -> dict | None:
    """The artifact's meta.json, or None when the artifact is absent or unfinished."""
    meta = path / META
    if not meta.is_file():
        return None
    try:
        return json.loads(meta.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def check_not_stale(path: Path, expected_fingerprint: str, command: str, run_command: str | None = None) -> bool:
    """True if the artifact is finished and current, False if absent; raise if it was made from other inputs, saying
    what changed (fingerprints.explain: `dpo.beta 0.1 → 0.2`) and how to redo it: `command` is the stage's command
    line (RunContext.command), `run_command` the run's (to name `--redo-stale`)."""
    from sdpo_cli.fingerprints import stale_reason

    meta = read_meta(path)
    if meta is None:
        return False
    if meta.get("fingerprint") == expected_fingerprint:
        return True
    raise ArtifactError(f"{path} is stale: {stale_reason(path, meta, expected_fingerprint)}",
                        hint=redo_hint(command, run_command))


def redo_hint(command: str, run_command: str | None = None) -> str:
    """The hint of a stale artifact: its stage's command with --force; with the run's command line, also the one
    command that redoes every stale stage and what follows them (`sdpo run --redo-stale`)."""
    if run_command is None:
        return f"{command} --force  # redo it, or use a new run_dir"
    return f"{command} --force  # redo it; every stale stage and what follows: {run_command} --redo-stale"


def environment() -> dict:
    import torch
    import transformers

    return {
        "sdpo_cli": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "argv": sys.argv,
    }


def disk_full(e: BaseException, where: Path | None = None) -> bool:
    """ENOSPC / EDQUOT, also as the libraries report them, matched on their text: pyarrow's OSError without errno,
    safetensors' SafetensorError ("I/O error: No space left on device (os error 28)", or IoError StorageFull). torch's
    zip writer says only that a write came short ("unexpected pos 576 vs 534", "PytorchStreamWriter failed writing
    file ...: file write failed"), which an I/O error or a file-size limit also cause: that counts as a full disk only
    when the filesystem of `where` has less than 64 MiB left."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e)
    if any(s in text for s in ("No space left on device", "StorageFull", "Disk quota exceeded", "os error 28")):
        return True
    if where is None or not any(s in text for s in ("unexpected pos", "file write failed")):
        return False
    try:
        return shutil.disk_usage(next(p for p in [where, *where.parents] if p.exists())).free < 64 * 2**20
    except (OSError, StopIteration):
        return False


def disk_full_error(path: Path) -> SdpoError:
    free = ""
    try:
        free = f" ({shutil.disk_usage(next(p for p in [path, *path.parents] if p.exists())).free / 2**20:.0f} MiB free)"
    except (OSError, StopIteration):
        pass
    return SdpoError(f"disk full while writing {path}{free}; nothing finished was lost",
                     hint="free some space (or set run_dir on a larger disk), then rerun the same command")


@contextmanager
def writing(path: Path, meta: dict) -> Iterator[Path]:
    """Yield a temporary sibling folder to fill; on success write meta.json last and move it to `path` atomically.

    `meta` may be updated by the caller inside the block (row counts, figures); versions and `seconds` (since
    meta["started"], a time.time() the stage sets when it begins, else since this block began) are added.
    An existing artifact at `path` (a forced redo) is replaced only once the new one is complete; a folder at `path`
    without meta.json is not sdpo's and is never replaced (ArtifactError). A full disk (ENOSPC) while writing
    becomes an SdpoError (exit 1) naming `path`; the temporary folder is removed and the previous artifact, if any,
    is left as it was. A kill at any point leaves `path` as it was or complete, plus siblings that `settle()`
    resolves (here, and for the whole run directory at the start of every command).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    settle(path)  # what a killed writer of this artifact left
    if path.exists() and not (path / META).is_file():
        raise ArtifactError(f"{path} is in the way: it has no {META}, so sdpo did not write it and will not replace "
                            "it", hint=f"move {path} elsewhere (or use a new run_dir), then rerun the same command")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    tmp.mkdir()
    start = time.time()
    try:
        yield tmp
        meta.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        meta["seconds"] = round(time.time() - meta.pop("started", start), 3)
        meta.update(environment())
        meta["files"] = integrity.manifest(tmp)  # size + content hash of every file (sdpo_cli/integrity.py)
        _replace_file(tmp / META, (json.dumps(meta, indent=2, default=str) + "\n").encode())  # last: tmp complete
        if path.exists():
            os.replace(path, old)  # a kill from here on: settle() moves the complete tmp in, or old back
            os.replace(tmp, path)
            remove(old)
        else:
            os.replace(tmp, path)
    except BaseException as e:
        remove(tmp)
        if not path.exists() and old.is_dir():
            os.replace(old, path)  # interrupted between the two renames: the previous artifact goes back
        if isinstance(e, Exception) and not isinstance(e, SdpoError) and disk_full(e, path):
            raise disk_full_error(path) from e
        raise


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write a file whole or not at all: a temporary sibling, flushed to disk, renamed over `path`. A full disk is
    the `disk full while writing` SdpoError; the previous file, if any, stays."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        _replace_file(path, data)
    except OSError as e:
        if disk_full(e):
            raise disk_full_error(path) from e
        raise


def _replace_file(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{_hidden(path.name)}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, default=str) + "\n")


# ---------------------------------------------------------------------------------------------------------------
# What a killed writer leaves, and how the next start resolves it

# `.<name>.tmp-<pid>` / `.<name>.old-<pid>` (writing, write_bytes_atomic) and `.step-t.state.tmp` / `.old`
# (train._save_state): a temporary sibling being filled, or the previous version set aside during a replace. Only
# these shapes, in the folders sdpo makes (`_search`): a user's `.env.old` or `notes/.draft.tmp` is never touched.
_LEFTOVER = re.compile(r"^(?P<base>\..+?)\.(?:tmp|old)-\d+$|^(?P<state>\.step-\d+\.state)\.(?:tmp|old)$")
SDPO_FOLDERS = ("data", "reflogp", "checkpoints", "cache/logps", "cache/eval", "logs", "reports")
ROOT_FILES = ("config.yaml",)  # what sdpo writes at the top of a run directory (besides its marker and lock)


def _hidden(name: str) -> str:
    return name if name.startswith(".") else f".{name}"


def _target(folder: Path, match: re.Match) -> Path:
    """The path a leftover belongs to: `.step-1.tmp-7` to `step-1`, `.step-1.state.tmp` to `.step-1.state`."""
    if match["state"]:
        return folder / match["state"]
    return folder / match["base"][1:]


def _search(root: Path) -> list[Path]:
    """The folders sdpo makes in a run directory and writes artifacts, states and files into (never the inside of an
    artifact), the root included."""
    return [root] + [root / f for f in SDPO_FOLDERS if (root / f).is_dir() and not (root / f).is_symlink()]


def leftovers(path: Path) -> list[Path]:
    """The temporary and set-aside siblings of `path` that killed writers left."""
    if not path.parent.is_dir():
        return []
    pattern = re.compile(rf"^{re.escape(_hidden(path.name))}\.(?:tmp|old)(?:-\d+)?$")
    return sorted(p for p in path.parent.iterdir() if pattern.match(p.name))


def _complete(path: Path) -> bool:
    """A folder whose completion mark is written (its last file, itself written atomically)."""
    return path.is_dir() and ((path / META).is_file() or (path / PROGRESS).is_file())


def settle(path: Path) -> bool:
    """Resolve what killed writers of `path` left beside it, wherever the kill came:

    * `path` present: every leftover is removed (a complete new version whose renames never began is lost; the
      command that wrote it writes it again);
    * `path` absent, a complete temporary version beside it (killed between setting the old version aside and
      renaming the new one in): the newest complete one is moved in, and True is returned;
    * `path` absent, only the set-aside previous version: it is moved back (True);
    * anything else (a temporary folder or file cut short) is removed.

    Only for paths sdpo writes, by the one process that holds the run directory (or in-process callers).
    """
    rest = leftovers(path)
    if not rest:
        return False
    moved = False
    if not path.exists():
        candidates = [p for p in rest if _complete(p)]
        # a complete temporary version is newer than the one set aside; among several, the last completed
        candidates.sort(key=lambda p: (".tmp" in p.name, max((p / m).stat().st_mtime_ns for m in (META, PROGRESS)
                                                             if (p / m).is_file())), reverse=True)
        if candidates:
            os.replace(candidates[0], path)
            rest.remove(candidates[0])
            moved = True
    for p in rest:
        remove(p)
    return moved


def remove(path: Path) -> None:
    """Delete a file or folder that sdpo wrote. A folder loses its completion mark first, so that a kill half-way
    through never leaves one that looks complete."""
    if path.is_dir() and not path.is_symlink():
        for mark in (META, PROGRESS):
            (path / mark).unlink(missing_ok=True)
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)
