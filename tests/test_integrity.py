"""Artifact integrity (sdpo_cli/integrity.py): every meta.json lists its artifact's files with size and content hash;
`sdpo run` checks the sizes of every finished artifact, and each stage verifies the content of what it reads. Each
test damages a copy of one finished tiny run for real (truncate, delete, flip bytes) and runs the CLI in-process."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from sdpo_cli import integrity
from tests.test_errors import run_in_process

ARROW = "data-00000-of-00001.arrow"


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_model_dir) -> tuple[Path, Path]:
    """One finished two-step `sdpo run` on the tiny model (one update per step): (config, run dir). Tests damage
    copies of it (`damaged_copy`), never the run itself."""
    import yaml

    from tests.conftest import tiny_pairs, write_jsonl

    tmp = tmp_path_factory.mktemp("integrity")
    a = write_jsonl(tmp / "a.jsonl", tiny_pairs(8, seed=1))
    b = write_jsonl(tmp / "b.jsonl", tiny_pairs(8, seed=2))
    config = tmp / "config.yaml"
    config.write_text(yaml.safe_dump({
        "run_dir": str(tmp / "run"), "model": {"base": str(tiny_model_dir)},
        "data": {"sources": [{"name": "a", "path": str(a)}, {"name": "b", "path": str(b)}], "max_length": 64},
        "split": {"strategy": "natural"},
        "train": {"per_device_batch_size": 4, "max_updates": 1, "save_every": 0}, "inference": {"batch_size": 8}}))
    result = run_in_process("run", str(config))
    assert result.returncode == 0, result.stderr
    return config, tmp / "run"


@pytest.fixture
def damaged_copy(finished, tmp_path):
    """A copy of the finished run to damage, and `sdpo ARGS` on it (config + run_dir=<copy>)."""
    config, run = finished
    copy = tmp_path / "run"
    shutil.copytree(run, copy)

    def sdpo(*args: str):
        return run_in_process(*args[:1], str(config), *args[1:], f"run_dir={copy}")

    # a hint names the command to paste: this config and its override, not a literal CONFIG
    sdpo.hint = lambda command, *options: " ".join(["sdpo", command, str(config), *options, f"run_dir={copy}"])
    return copy, sdpo


def artifacts(run: Path) -> list[Path]:
    return [p.parent for p in sorted(run.rglob("meta.json"))]


def flip_middle(path: Path, n: int = 64) -> None:
    """Invert n bytes in the middle of the file: same size, other content."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + n] = bytes(b ^ 0xFF for b in data[mid:mid + n])
    path.write_bytes(bytes(data))


def assert_fails(result, *parts: str, hint: str) -> None:
    """Exit 1 with one Error: line holding every part and the Hint: line, and no traceback."""
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    error = next(line for line in result.stderr.splitlines() if line.startswith("Error:"))
    for part in parts:
        assert part in error, (part, result.stderr)
    assert f"Hint: {hint}" in result.stderr, result.stderr


def test_manifest_lists_every_file_with_its_size_and_hash(finished):
    """Every artifact (data, reflogp, checkpoints) lists each of its files but meta.json, with its size and the
    SHA-256 of its content (what `sha256sum` prints)."""
    _, run = finished
    folders = artifacts(run)
    assert {p.relative_to(run).as_posix() for p in folders} == {
        "data/step-1", "data/step-2", "reflogp/step-1", "reflogp/step-2", "checkpoints/step-1", "checkpoints/step-2"}
    for folder in folders:
        files = json.loads((folder / "meta.json").read_text())["files"]
        on_disk = {p.relative_to(folder).as_posix(): p for p in folder.rglob("*") if p.is_file()}
        assert set(files) == set(on_disk) - {"meta.json"}, folder
        for rel, entry in files.items():
            data = on_disk[rel].read_bytes()
            assert entry == {"size": len(data), "hash": "sha256:" + hashlib.sha256(data).hexdigest()}, (folder, rel)
    checkpoint = json.loads((run / "checkpoints" / "step-1" / "meta.json").read_text())["files"]
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"} <= set(checkpoint)


def test_truncated_arrow_in_reflogp_stops_run(damaged_copy):
    """A truncated .arrow in a finished reflogp/step-1: `sdpo run` stops with the file, the sizes and the command
    that writes it again, before any stage reads it (no pyarrow traceback)."""
    run, sdpo = damaged_copy
    arrow = run / "reflogp" / "step-1" / ARROW
    size = arrow.stat().st_size
    with open(arrow, "r+b") as f:
        f.truncate(size // 2)
    result = sdpo("run")
    assert_fails(result, str(arrow), f"size {size // 2} != {size}", hint=sdpo.hint("reflogp", "--step", "1", "--force"))


def test_deleted_checkpoint_weights_stop_run_and_gamma(damaged_copy):
    """checkpoints/step-1/model.safetensors deleted: `sdpo run` and `sdpo gamma` (whose γ of M_1 on step-2 would
    be reused from reflogp/step-2 without loading M_1) both name the missing file."""
    run, sdpo = damaged_copy
    weights = run / "checkpoints" / "step-1" / "model.safetensors"
    weights.unlink()
    for args in (("run",), ("gamma",)):
        assert_fails(sdpo(*args), str(weights), "missing", hint=sdpo.hint("train", "--step", "1", "--force"))


@pytest.mark.parametrize("damaged, command, hint", [
    ("checkpoints/step-1/model.safetensors", "train", ("train", "--step", "1", "--force")),
    ("checkpoints/step-1/model.safetensors", "reflogp", ("train", "--step", "1", "--force")),
    ("checkpoints/step-1/tokenizer.json", "reflogp", ("train", "--step", "1", "--force")),
    (f"data/step-2/{ARROW}", "reflogp", ("split", "--force")),
    (f"reflogp/step-2/{ARROW}", "train", ("reflogp", "--step", "2", "--force")),
], ids=["M1_weights-train", "M1_weights-reflogp", "M1_tokenizer-reflogp", "data-reflogp", "reflogp-train"])
def test_flipped_bytes_stop_the_stage_that_reads_them(damaged_copy, damaged, command, hint):
    """64 bytes flipped in the middle of a file (same size, so only its hash shows it): the stage of step 2 that
    reads the file stops before it computes anything, naming the file and the hash mismatch."""
    run, sdpo = damaged_copy
    flip_middle(run / damaged)
    outputs = {"train": run / "checkpoints" / "step-2", "reflogp": run / "reflogp" / "step-2"}
    before = (outputs[command] / "meta.json").read_text()
    log_before = (run / "logs" / "train-step-2.jsonl").read_text()
    result = sdpo(command, "--step", "2", "--force")
    assert_fails(result, str(run / damaged), "content hash differs", hint=sdpo.hint(*hint))
    assert (outputs[command] / "meta.json").read_text() == before  # the finished step 2 is kept as it was
    assert (run / "logs" / "train-step-2.jsonl").read_text() == log_before  # no update ran


def test_artifacts_without_files_are_accepted(damaged_copy):
    """Artifacts written by an sdpo that recorded no "files": no error, nothing redone by `run` (the fingerprints do
    not include "files"), and a stage that reads them (reflogp step 2: data/step-2 and M_1) runs."""
    run, sdpo = damaged_copy
    for folder in artifacts(run):
        meta = json.loads((folder / "meta.json").read_text())
        del meta["files"]
        (folder / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    with open(run / "checkpoints" / "step-1" / "tokenizer_config.json", "a") as f:
        f.write("\n")  # another size and hash, still valid: nothing records what it was, so nothing can tell
    result = sdpo("run")
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("finished already") == 5, result.stderr
    result = sdpo("reflogp", "--step", "2", "--force")
    assert result.returncode == 0, result.stderr
    assert "files" in json.loads((run / "reflogp" / "step-2" / "meta.json").read_text())  # a rewrite records them


def test_large_files_are_verified_by_sampled_blocks(tmp_path, monkeypatch):
    """Above FULL_LIMIT a file is verified by its size and SAMPLE_BLOCKS blocks (first, last, evenly spaced),
    recorded at write time next to its full hash: damage inside a sampled block or a changed size is caught, damage
    between the blocks is not (the documented trade-off)."""
    from sdpo_cli.errors import ArtifactError
    from sdpo_cli.rundir import writing

    monkeypatch.setattr(integrity, "FULL_LIMIT", 4096)
    monkeypatch.setattr(integrity, "SAMPLE_BLOCKS", 4)
    monkeypatch.setattr(integrity, "SAMPLE_BLOCK", 256)
    out = tmp_path / "checkpoints" / "step-3"
    payload = bytes(range(256)) * 64  # 16 KiB: blocks at 0, 5376, 10752, 16128
    with writing(out, {"stage": "train", "step": 3}) as tmp:
        (tmp / "big.bin").write_bytes(payload)
        (tmp / "small.json").write_text("{}")
    files = json.loads((out / "meta.json").read_text())["files"]
    assert files["big.bin"]["hash"] == "sha256:" + hashlib.sha256(payload).hexdigest()
    assert files["big.bin"]["sample"]["blocks"] == 4 and files["big.bin"]["sample"]["block"] == 256
    assert "sample" not in files["small.json"]
    assert integrity.sample_offsets(len(payload), 4, 256) == [0, 5376, 10752, 16128]
    integrity.verify(out)

    big = out / "big.bin"
    big.write_bytes(payload[:2000] + bytes(64) + payload[2064:])  # between sampled blocks: not seen
    integrity.verify(out)
    big.write_bytes(payload[:5400] + bytes(64) + payload[5464:])  # inside the second block
    with pytest.raises(ArtifactError, match="content hash of 4 sampled blocks differs") as e:
        integrity.verify(out)
    assert str(big) in e.value.message and e.value.hint.startswith("sdpo train CONFIG --step 3 --force")
    big.write_bytes(payload + b"x")
    with pytest.raises(ArtifactError, match=f"size {len(payload) + 1} != {len(payload)}"):
        integrity.check_sizes(out)
