"""Crash safety: SIGKILL or SIGINT at any moment of `sdpo run`, then the same command finishes the job, redoing
nothing that was finished, and a step resumed from its saved state logs the losses of an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import FAST, ROOT, run_cli


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def start(args: list[str], cwd=ROOT) -> tuple[subprocess.Popen, list[str], threading.Thread]:
    """`python -m sdpo_cli ARGS` in the background; its stderr lines collect in the returned list as they come."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "sdpo_cli", *args], cwd=str(cwd), env=env, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")), daemon=True)
    reader.start()
    return proc, lines, reader


def run_and_signal(args: list[str], when, sig=signal.SIGKILL, cwd=ROOT, timeout=600):
    """Start `python -m sdpo_cli ARGS`, send `sig` as soon as when(stderr_lines) is true; return (code, stderr)."""
    proc, lines, reader = start(args, cwd)
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        if when(lines):
            proc.send_signal(sig)
            break
        time.sleep(0.01)
    code = proc.wait(timeout=timeout)
    reader.join(timeout=10)
    return code, "".join(lines)


def metas(run: Path) -> dict:
    return {str(p.relative_to(run)): p.read_text() for p in run.rglob("meta.json")}


@pytest.mark.slow
def test_sigkill_mid_training_resumes_with_identical_losses(long_config):
    config, run, reference = long_config
    log1 = run / "logs" / "train-step-1.jsonl"
    code, _ = run_and_signal(["run", str(config), *FAST], lambda _: len(read_log(log1)) >= 8)
    assert code == -signal.SIGKILL
    assert (run / "checkpoints" / ".step-1.state" / "progress.json").is_file()
    assert not (run / "checkpoints" / "step-1").exists()
    before = metas(run)

    result = run_cli("run", str(config), *FAST)
    assert result.returncode == 0, result.stderr
    assert "train step 1: resuming after update" in result.stderr
    assert "split: finished already" in result.stderr and "reflogp step 1: finished already" in result.stderr
    assert {k: v for k, v in metas(run).items() if k in before} == before  # nothing finished was redone
    for t in (1, 2):
        resumed, straight = read_log(run / "logs" / f"train-step-{t}.jsonl"), read_log(
            reference / "logs" / f"train-step-{t}.jsonl")
        assert [r["update"] for r in resumed] == [r["update"] for r in straight] == list(range(24))
        for a, b in zip(resumed, straight):
            assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
            assert a["rewards/margins"] == pytest.approx(b["rewards/margins"], abs=1e-4)
    assert not (run / "checkpoints" / ".step-1.state").exists()  # removed once M_1 was complete


@pytest.mark.slow
def test_sigint_stops_at_an_update_and_says_how_to_resume(long_config):
    config, run, reference = long_config
    log2 = run / "logs" / "train-step-2.jsonl"
    code, stderr = run_and_signal(["run", str(config), *FAST], lambda _: len(read_log(log2)) >= 5, signal.SIGINT)
    assert code == 130
    assert "Error: train step 2: stopped by SIGINT after update" in stderr
    assert "Hint: rerun the same command to resume from there" in stderr and "Traceback" not in stderr
    progress = json.loads((run / "checkpoints" / ".step-2.state" / "progress.json").read_text())
    assert progress["update"] >= 5
    result = run_cli("run", str(config), *FAST)
    assert result.returncode == 0, result.stderr
    assert f"resuming after update {progress['update'] - 1} ({progress['update']} of " in result.stderr
    final = read_log(log2)[-1]
    assert final["loss"] == pytest.approx(read_log(reference / "logs" / "train-step-2.jsonl")[-1]["loss"], abs=1e-5)


def test_a_killed_writer_leaves_no_finished_looking_artifact(tiny_config):
    from sdpo_cli.rundir import read_meta, writing

    config, run = tiny_config()
    target = run / "reflogp" / "step-1"
    with pytest.raises(RuntimeError):
        with writing(target, {"stage": "test"}) as tmp:
            (tmp / "half.arrow").write_text("partial")
            raise RuntimeError("crash while writing")
    assert not target.exists() and read_meta(target) is None and not list(target.parent.iterdir())
    # a SIGKILLed writer leaves its temporary sibling behind; it never counts and the next writer clears it
    (target.parent / ".step-1.tmp-999999").mkdir()
    with writing(target, {"stage": "test"}) as tmp:
        (tmp / "x").write_text("done")
    assert read_meta(target)["stage"] == "test" and [p.name for p in target.parent.iterdir()] == ["step-1"]


@pytest.mark.slow
def test_fixtures_run_survives_sigkill_in_training_and_in_reflogp(tmp_path, shared_fixtures):
    """The issue's acceptance: configs/fixtures.yaml killed inside step 1's training, then inside step 2's reflogp."""
    config = str(ROOT / "configs" / "fixtures.yaml")
    reference, run = tmp_path / "reference", tmp_path / "run"
    args = ["train.save_every=5", "train.logging_every=1"]
    assert run_cli("run", config, f"run_dir={reference}", *args).returncode == 0

    log1 = run / "logs" / "train-step-1.jsonl"
    code, _ = run_and_signal(["run", config, f"run_dir={run}", *args], lambda _: len(read_log(log1)) >= 12)
    assert code == -signal.SIGKILL and not (run / "checkpoints" / "step-1").exists()
    step1 = {k: v for k, v in metas(run).items() if "step-1" in k}
    assert set(step1) == {"data/step-1/meta.json", "reflogp/step-1/meta.json"}

    code, _ = run_and_signal(["run", config, f"run_dir={run}", *args],
                             lambda lines: any("reflogp step 2: π_ref" in line for line in lines))
    assert code == -signal.SIGKILL and not (run / "reflogp" / "step-2" / "meta.json").exists()

    result = run_cli("run", config, f"run_dir={run}", *args)
    assert result.returncode == 0, result.stderr
    assert {k: v for k, v in metas(run).items() if k in step1} == step1  # data and reflogp of step 1 not redone
    for t in (1, 2):
        got, want = read_log(run / "logs" / f"train-step-{t}.jsonl"), read_log(
            reference / "logs" / f"train-step-{t}.jsonl")
        assert got[-1]["update"] == want[-1]["update"]
        assert got[-1]["loss"] == pytest.approx(want[-1]["loss"], abs=1e-4)
