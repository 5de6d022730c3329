"""The run directory: every artifact's path, its meta.json, and atomic writes.

    runs/<name>/
      config.yaml                 resolved config of the last successful split / reflogp / train / run
      data/step-t/  data/eval/    canonical pairs + token ids (datasets.save_to_disk) + meta.json
      reflogp/step-t/             reference log-probs of D_t under the step's reference + meta.json
      checkpoints/step-t/         M_t in Hugging Face layout (+ adapter/ with LoRA, optimizer.pt if asked) + meta.json
      checkpoints/.step-t.state/  resumable state of an unfinished step (accelerate's + progress.json); removed when
                                  M_t is written
      logs/train-step-t.jsonl     one JSON object per logged update (+ tracker files with train.report_to)
      cache/logps/                gamma's log-probs of other models or data, reused by later calls
      cache/eval/                 one lm-eval score per checkpoint x task (sdpo eval)
      reports/                    gamma.json, gamma.png, loss.png, eval.json

A stage is finished iff its folder holds meta.json and the fingerprint recorded there equals the one the current
config and inputs give. A stage writes into a temporary sibling, writes meta.json last and renames the folder into
place, so a crash never leaves a half artifact that looks finished.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import platform
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from sdpo_cli import __version__
from sdpo_cli.errors import ArtifactError, SdpoError

META = "meta.json"


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
            probe.unlink()
        except OSError as e:
            if disk_full(e):
                raise SdpoError(f"{self.root}: run_dir: disk full", hint=f"free space, or {hint}") from None
            raise SdpoError(f"{self.root}: run_dir: not writable ({e.strerror})", hint=hint) from None


def read_meta(path: Path) -> dict | None:
    """The artifact's meta.json, or None when the artifact is absent or unfinished."""
    meta = path / META
    if not meta.is_file():
        return None
    try:
        return json.loads(meta.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def check_not_stale(path: Path, expected_fingerprint: str, command: str) -> bool:
    """True if the artifact is finished and current, False if absent; raise if it was made from other inputs."""
    meta = read_meta(path)
    if meta is None:
        return False
    if meta.get("fingerprint") == expected_fingerprint:
        return True
    raise ArtifactError(
        f"{path} was computed from another configuration or other inputs "
        f"(fingerprint {meta.get('fingerprint')}, now {expected_fingerprint})",
        hint=f"{command} --force  # redo it, or use a new run_dir",
    )


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


def disk_full(e: BaseException) -> bool:
    """ENOSPC / EDQUOT, also as the libraries report them: pyarrow's OSError without errno, safetensors' Rust
    IoError (StorageFull), torch's "file write failed" messages are matched on their text."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e)
    return any(s in text for s in ("No space left on device", "StorageFull", "Disk quota exceeded"))


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
    An existing artifact at `path` (a forced redo) is replaced only once the new one is complete. A full disk
    (ENOSPC) while writing becomes an SdpoError (exit 1) naming `path`; the temporary folder is removed and the
    previous artifact, if any, is left as it was.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.tmp-*"):  # left by a killed writer: never a finished artifact
        shutil.rmtree(stale, ignore_errors=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.mkdir()
    start = time.time()
    try:
        yield tmp
        meta.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        meta["seconds"] = round(time.time() - meta.pop("started", start), 3)
        meta.update(environment())
        (tmp / META).write_text(json.dumps(meta, indent=2, default=str) + "\n")
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, Exception) and not isinstance(e, SdpoError) and disk_full(e):
            raise disk_full_error(path) from e
        raise


def write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if disk_full(e):
            raise disk_full_error(path) from e
        raise


def write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, default=str) + "\n")
