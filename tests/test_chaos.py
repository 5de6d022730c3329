"""Chaos: `sdpo run` of the demo (configs/demo.yaml), SIGKILLed at seeded random moments and rerun after each kill,
ends bit-identical to an uninterrupted run: the same files, the same data and reference log-probs (Arrow contents),
the same weights (every tensor equal) and the same log records but for their timing fields.

The kill moments are stratified over the kinds of work: the split's write, reflogp, training, the resume-state saves
(`train.save_every=3`, so there are many) and the checkpoint writes, each at a random step, in pipeline order. Each
kill waits for its trigger (a stderr line, or the artifact's temporary folder appearing in the run directory), then a
random part of how long that work took in the uninterrupted run, measured the same way. A target that the previous
kill has already made finished moves to the next unfinished one; a run that passes its target is killed at once.
What each kill hit is read from the run directory right after it (the temporary folders being written) and from the
last stderr line.

SDPO_CHAOS_KILLS (default 5) sets the number of kills and SDPO_CHAOS_SEED (default 0) the seed; `make chaos` runs
20. With `-s` the test prints every kill: its target, its delay and what it hit."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import ROOT

KILLS = int(os.environ.get("SDPO_CHAOS_KILLS", "5"))
SEED = int(os.environ.get("SDPO_CHAOS_SEED", "0"))
CONFIG = ROOT / "configs" / "demo.yaml"
STEPS = 2  # the demo's
ARGS = ["train.save_every=3"]
TIMING = {"tokens/s"}  # log fields that measure time, not training
KINDS = ("split", "reflogp", "train", "state save", "checkpoint write")
WATCHED = ("data", "reflogp", "checkpoints")  # where artifacts are written through temporary siblings
POLL = 0.002


def position(kind: str, step: int) -> int:
    """Where a kind of work comes in the pipeline: split, then per step reflogp, training (with its state saves) and
    the checkpoint write."""
    return 0 if kind == "split" else 10 * step + OFFSET[kind]


OFFSET = {"reflogp": 1, "train": 2, "state save": 2, "checkpoint write": 3}


def line_position(line: str) -> int | None:
    """The pipeline position a stderr line belongs to (None: no stage's line)."""
    if m := re.match(r"sDPO step (\d+)/", line):
        return 10 * int(m[1])
    if m := re.match(r"reflogp step (\d+):", line):
        return 10 * int(m[1]) + 1
    if m := re.match(r"train step (\d+): (?:.* wrote |finished already)", line):
        return 10 * int(m[1]) + 4
    if m := re.match(r"(?:train step|step) (\d+)[: ]", line):
        return 10 * int(m[1]) + 2
    if line.startswith(("split:", "sDPO steps", "  ")):
        return 0
    return None


def in_flight(entry: str) -> tuple[str, int] | None:
    """(kind, step) of work whose temporary sibling `entry` ("checkpoints/.step-1.state.tmp") is; None for the
    resume state itself, which stays between runs."""
    folder, name = entry.split("/", 1)
    m = re.match(r"\.step-(\d+)", name)
    step = int(m[1]) if m else 0
    if folder == "data":
        return "split", 0
    if folder == "reflogp":
        return "reflogp", step
    if name.startswith(f".step-{step}.state"):
        return None if name == f".step-{step}.state" else ("state save", step)
    return "checkpoint write", step


def snapshot(run: Path) -> set[str]:
    names = set()
    for folder in WATCHED:
        try:
            names.update(f"{folder}/{n}" for n in os.listdir(run / folder) if n.startswith("."))
        except FileNotFoundError:
            pass
    return names


@dataclass
class Watched:
    """`sdpo run` in a subprocess, its stderr lines and the temporary siblings appearing and going, timestamped."""

    run: Path
    proc: subprocess.Popen = None
    t0: float = 0.0
    lines: list = field(default_factory=list)  # (t, line)
    events: list = field(default_factory=list)  # (t, "appear" | "gone", entry)
    seen: set = field(default_factory=set)
    read: int = 0  # lines already looked at by `poll`
    reader: threading.Thread = None

    def start(self) -> Watched:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
               "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        env.pop("SDPO_DEBUG", None)
        self.seen = snapshot(self.run)
        self.t0 = time.time()
        self.proc = subprocess.Popen([sys.executable, "-m", "sdpo_cli", "run", str(CONFIG), f"run_dir={self.run}",
                                      *ARGS], cwd=str(ROOT), env=env, text=True, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)

        def read():
            for line in iter(self.proc.stderr.readline, ""):
                self.lines.append((time.time() - self.t0, line.rstrip("\n")))

        self.reader = threading.Thread(target=read, daemon=True)
        self.reader.start()
        return self

    def poll(self) -> tuple[list[str], list[str]]:
        """The stderr lines and the temporary siblings that are new since the last poll."""
        now, names = time.time() - self.t0, snapshot(self.run)
        appeared, gone = sorted(names - self.seen), sorted(self.seen - names)
        self.events += [(now, "appear", e) for e in appeared] + [(now, "gone", e) for e in gone]
        self.seen = names
        lines = [line for _, line in self.lines[self.read:]]
        self.read += len(lines)
        return lines, appeared

    def finish(self, timeout: float = 600) -> int:
        code = self.proc.wait(timeout=timeout)
        self.reader.join(timeout=10)
        self.poll()
        return code

    def stderr(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def first(self, prefix: str) -> float | None:
        return next((t for t, line in self.lines if line.startswith(prefix)), None)


# ---------------------------------------------------------------------------------------------------------------
# The uninterrupted run: how long each kind of work took, measured as the chaos run's triggers see it.


def episodes(ref: Watched) -> dict[tuple[str, int], list[tuple[float, float]]]:
    """(start, end) of each stretch of time in which some temporary sibling of a kind of work existed: one artifact
    write, or one state save from its `.tmp` folder to its renames and the old state's removal."""
    out: dict[tuple[str, int], list[tuple[float, float]]] = {}
    open_entries: dict[tuple[str, int], set[str]] = {}
    for t, what, entry in ref.events:
        kind = in_flight(entry)
        if kind is None:
            continue
        entries = open_entries.setdefault(kind, set())
        if what == "appear":
            if not entries:
                out.setdefault(kind, []).append((t, t))
            entries.add(entry)
        elif entry in entries:
            entries.discard(entry)
            if not entries:
                out[kind][-1] = (out[kind][-1][0], t)
    return out


def windows(ref: Watched, total: float) -> dict[tuple[str, int], float]:
    """Seconds from each target's trigger to the end of that work, in the uninterrupted run."""
    spans = episodes(ref)
    out = {}
    split = spans.get(("split", 0), [])
    out[("split", 0)] = (split[-1][1] - split[0][0]) if split else 0.01  # from the first write to the last's end
    for t in range(1, STEPS + 1):
        start, end = ref.first(f"reflogp step {t}: π_ref"), ref.first(f"reflogp step {t}: mean")
        out[("reflogp", t)] = end - start
        start = ref.first(f"train step {t}: target from")
        writes = spans.get(("checkpoint write", t), [])
        out[("train", t)] = (writes[0][0] if writes else total) - start
        saves = sorted(b - a for a, b in spans.get(("state save", t), [])) or [0.01]
        out[("state save", t)] = saves[len(saves) // 2]  # the median save
        out[("checkpoint write", t)] = max([b - a for a, b in writes] or [0.01])
    return out


# ---------------------------------------------------------------------------------------------------------------
# The kills


def plan(rng: random.Random, kills: int) -> list[tuple[str, int, float]]:
    """(kind, step, fraction of its window): every kind in turn, at a random step, sorted in pipeline order."""
    targets = []
    for i in range(kills):
        kind = KINDS[i % len(KINDS)]
        targets.append((kind, 0 if kind == "split" else rng.randint(1, STEPS), rng.random(), rng.random()))
    targets.sort(key=lambda k: (position(k[0], k[1]), k[3]))
    return [(kind, step, fraction) for kind, step, fraction, _ in targets]


def finished(run: Path, kind: str, step: int) -> bool:
    if kind == "split":
        return all((run / "data" / f"step-{t}" / "meta.json").is_file() for t in range(1, STEPS + 1))
    if kind == "reflogp":
        return (run / "reflogp" / f"step-{step}" / "meta.json").is_file()
    return (run / "checkpoints" / f"step-{step}" / "meta.json").is_file()


def reachable(run: Path, kind: str, step: int) -> tuple[str, int] | None:
    """The target itself if its work is not finished yet, else the next unfinished work of the same kind, else the
    first unfinished work at all; None once the whole run is finished."""
    phases = [("split", 0)] + [(k, t) for t in range(1, STEPS + 1) for k in KINDS[1:]]
    unfinished = [p for p in phases if not finished(run, *p)]
    if (kind, step) in unfinished:
        return kind, step
    later = [p for p in unfinished if p[0] == kind and position(*p) > position(kind, step)]
    return (later or unfinished or [None])[0]


def triggered(target: tuple[str, int], lines: list[str], appeared: list[str]) -> bool:
    kind, step = target
    if kind == "reflogp":
        return any(line.startswith(f"reflogp step {step}: π_ref") for line in lines)
    if kind == "train":
        return any(line.startswith(f"train step {step}: target from") for line in lines)
    return any(in_flight(e) == target for e in appeared)


def passed(target: tuple[str, int], lines: list[str], appeared: list[str]) -> bool:
    here = position(*target)
    later = [p for p in map(line_position, lines) if p is not None and p > here]
    return bool(later) or any((k := in_flight(e)) and position(*k) > here for e in appeared)


def hit(attempt: Watched) -> str:
    """What the kill interrupted: the artifacts being written (temporary siblings that appeared in this attempt and
    are still there), else the stage of the last stderr line."""
    writing: dict[tuple[str, int], set[str]] = {}
    for _, what, entry in attempt.events:
        if what == "appear" and entry in attempt.seen and in_flight(entry):
            writing.setdefault(in_flight(entry), set()).add(re.sub(r"-\d+$", "-PID", entry.split("/", 1)[1]))
    if writing:
        return " + ".join(f"{kind if kind == 'split' else f'{kind} step {step}'} ({', '.join(sorted(names))} left)"
                          for (kind, step), names in sorted(writing.items(), key=lambda w: position(*w[0])))
    last = next(((line, p) for _, line in reversed(attempt.lines) if (p := line_position(line)) is not None), None)
    if last is None:
        return "startup / split (before any output)"
    line, p = last
    step = p // 10
    if p == 0:
        return "split"
    if p % 10 == 1:
        return f"reflogp step {step}"
    if p % 10 == 2:
        update = re.match(r"step \d+ \| update\s+(\d+)", line)
        return f"train step {step}" + (f" (after update {update[1]})" if update else "")
    return f"after step {step}" if p % 10 == 4 else f"start of step {step}"


def stage_of(hit: str) -> str:
    """The kind of work a kill hit, from `hit`'s description: what was being written first, else the stage."""
    for stage in ("state save", "checkpoint write", "split", "reflogp", "train", "startup"):
        if hit.startswith(stage):
            return stage
    return "between stages"


@dataclass
class Kill:
    number: int
    target: str
    delay: float | None  # after the trigger; None: the run passed its target and was killed at once
    hit: str
    at: float  # seconds into the attempt

    def __str__(self) -> str:
        when = "passed it: at once      " if self.delay is None else f"+{self.delay:6.3f} s after its trigger"
        return f"kill {self.number:>2}: target {self.target:<24} {when}, {self.at:6.2f} s into the run: {self.hit}"


def kill_at_random(run: Path, target: tuple[str, int] | None, fraction: float, span: dict, startup: float):
    """One attempt: start `sdpo run`, SIGKILL it `fraction` of the target's window after its trigger (or at once
    when it passes the target; with no target left, `fraction` of the startup time after it starts). Returns (Kill
    or None if it ended first, the attempt, its exit code)."""
    attempt = Watched(run).start()
    kill_at, delay = (fraction * startup, fraction * startup) if target is None else (None, 0.0)
    while attempt.proc.poll() is None:
        lines, appeared = attempt.poll()
        now = time.time() - attempt.t0
        if kill_at is None and target is not None:
            if triggered(target, lines, appeared):
                delay = fraction * span[target]
                kill_at = now + delay
            elif passed(target, lines, appeared):
                kill_at, delay = now, None
        if kill_at is not None and now >= kill_at:
            attempt.proc.send_signal(signal.SIGKILL)
            break
        time.sleep(POLL)
    code = attempt.finish()
    if code != -signal.SIGKILL:
        return None, attempt, code
    name = "a finished run's rerun" if target is None else (
        target[0] if target[0] == "split" else f"{target[0]} step {target[1]}")
    return Kill(0, name, delay, hit(attempt), kill_at if kill_at is not None else 0.0), attempt, code


# ---------------------------------------------------------------------------------------------------------------
# The comparison with the uninterrupted run


def files(run: Path) -> set[str]:
    return {str(p.relative_to(run)) for p in run.rglob("*") if p.is_file()}


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def differences(reference: Path, run: Path) -> list[str]:
    """Every way `run` differs from `reference`: files, Arrow contents, fingerprints, log records (the first differing
    record of each log, timing fields aside) and weights (every tensor compared exactly)."""
    import datasets
    import torch
    from safetensors.torch import load_file

    found = []
    if files(run) != files(reference):
        found.append(f"files only in the chaos run: {sorted(files(run) - files(reference))}, only in the "
                     f"uninterrupted one: {sorted(files(reference) - files(run))}")
    for t in range(1, STEPS + 1):
        for artifact in (f"data/step-{t}", f"reflogp/step-{t}"):
            got, want = (datasets.load_from_disk(str(r / artifact)).data.table for r in (run, reference))
            if not got.equals(want):
                found.append(f"{artifact}: Arrow contents differ")
        for artifact in (f"data/step-{t}", f"reflogp/step-{t}", f"checkpoints/step-{t}"):
            got, want = (json.loads((r / artifact / "meta.json").read_text())["fingerprint"] for r in (run, reference))
            if got != want:
                found.append(f"{artifact}: fingerprint {got} != {want}")
        got, want = (read_log(r / f"logs/train-step-{t}.jsonl") for r in (run, reference))
        if len(got) != len(want):
            found.append(f"logs/train-step-{t}.jsonl: {len(got)} records, {len(want)} uninterrupted")
        for a, b in zip(got, want):
            changed = {k: (a.get(k), b.get(k)) for k in a.keys() | b.keys() if k not in TIMING and a.get(k) != b.get(k)}
            if changed:
                found.append(f"logs/train-step-{t}.jsonl: first difference at update {b.get('update')} (epoch "
                             f"{b.get('epoch')}), (chaos, uninterrupted): {changed}")
                break
        got, want = (load_file(str(r / f"checkpoints/step-{t}/model.safetensors")) for r in (run, reference))
        unequal = sorted(k for k in want.keys() | got.keys() if k not in got or k not in want
                         or not torch.equal(got[k], want[k]))
        if unequal:
            found.append(f"checkpoints/step-{t}/model.safetensors: {len(unequal)} of {len(want)} tensors differ "
                         f"(e.g. {unequal[0]})")
    return found


@pytest.mark.slow
def test_random_sigkills_over_a_whole_run_end_bit_identical(tmp_path):
    started = time.time()
    reference, run = tmp_path / "reference", tmp_path / "run"
    ref = Watched(reference).start()
    while ref.proc.poll() is None:
        ref.poll()
        time.sleep(POLL)
    assert ref.finish() == 0, ref.stderr()
    total = time.time() - ref.t0
    span = windows(ref, total)
    startup = ref.lines[0][0]  # imports and config: a rerun of a finished run takes at least this long

    rng = random.Random(SEED)
    kills: list[Kill] = []
    log = []
    for kind, step, fraction in plan(rng, KILLS):
        target = reachable(run, kind, step)
        kill, attempt, code = kill_at_random(run, target, fraction, span, startup)
        log.append(f"attempt {len(log) + 1}: target {target}, exit {code}")
        report = "\n".join(map(str, kills))
        assert code in (0, -signal.SIGKILL) and "Traceback" not in attempt.stderr(), (
            f"the rerun after kill {len(kills)} failed (exit {code}).\nKills so far:\n{report}\n"
            f"stderr:\n{attempt.stderr()[-4000:]}")
        if kill is not None:
            kill.number = len(kills) + 1
            kills.append(kill)
    final = Watched(run).start()
    code = final.finish()
    report = "\n".join(map(str, kills))
    assert code == 0 and "Traceback" not in final.stderr(), (
        f"the last rerun failed (exit {code}).\nKills:\n{report}\nstderr:\n{final.stderr()[-4000:]}")
    print(f"\nchaos: seed {SEED}, {len(kills)} SIGKILLs over `sdpo run {CONFIG.relative_to(ROOT)} {' '.join(ARGS)}` "
          f"(uninterrupted: {total:.1f} s; windows after the triggers, uninterrupted: "
          f"{', '.join(f'{k} {t}: {w:.3f} s' for (k, t), w in span.items())})\n{report}")
    assert len(kills) == KILLS, "\n".join(log)
    found = differences(reference, run)
    assert not found, "the chaos run differs from the uninterrupted run:\n" + "\n".join(found) + f"\nKills:\n{report}"
    by_stage: dict[str, int] = {}
    for k in kills:
        by_stage[stage_of(k.hit)] = by_stage.get(stage_of(k.hit), 0) + 1
    print(f"kills by stage: {by_stage}; identical to the uninterrupted run; {time.time() - started:.0f} s in all")
