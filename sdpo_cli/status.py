"""Command `status`: where a run directory stands against a config, stage by stage, and the one command that brings it
up to date.

Run as: sdpo status CONFIG|RUN_DIR [key=value ...] [--json]

    run directory /work/main/runs/x (config configs/x.yaml)
    split      data/step-1          finished
    split      data/step-2          finished
    reflogp 1  reflogp/step-1       finished
    train 1    checkpoints/step-1   stale: dpo.beta 0.1 → 0.2
    reflogp 2  reflogp/step-2       stale: its input checkpoints/step-1 is stale (redone first)
    train 2    checkpoints/step-2   stale: dpo.beta 0.1 → 0.2; its input reflogp/step-2 is stale (redone first)
    to bring it up to date: sdpo run configs/x.yaml dpo.beta=0.2 --redo-stale

Every artifact a stage writes is one `Artifact` of `artifacts()`: the stage, its step, its folder and the fingerprint
the current config gives it, in the order `sdpo run` writes them. `sdpo status`, `sdpo run --redo-stale`
(pipeline.py, through `stale_reasons`) and the stale errors of the stages (fingerprints.explain) all judge an
artifact the same way. A stage that writes a new kind of artifact adds it to `artifacts()`.

The states of an artifact:

    finished  its meta.json's fingerprint is the one the config gives, and no artifact it is computed from is stale
    stale     made from another config or other inputs: the reasons are fingerprints.explain's (`dpo.beta 0.1 → 0.2`,
              `the input file ... changed`, `its input data/step-1 was redone`); or an artifact it is computed from
              is stale, so redoing that one makes this one stale in turn
    missing   not written yet; for a training step, the progress of its saved state (checkpoints/.step-t.state), from
              which the next run resumes
    running   another sdpo process holds the run directory (lock.holder) and its command works on this stage

It only reads: it takes no lock, writes nothing and loads no model (the tokenizer only, for split's fingerprint).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from rich.markup import escape

from sdpo_cli.config import SdpoConfig, num_steps
from sdpo_cli.context import RunContext
from sdpo_cli.errors import SdpoError
from sdpo_cli.fingerprints import Fingerprint, data_fp, depends_on, explain, logps_fp, reflogp_fp, split_fp, train_fp
from sdpo_cli.lock import describe, holder
from sdpo_cli.models import reference_model
from sdpo_cli.rundir import PROGRESS, RunDir, read_meta
from sdpo_cli.split import data_paths, held_out_key

STATES = ("finished", "stale", "missing", "running")


@dataclass
class Artifact:
    stage: str  # split | reflogp | train: the stage that writes it
    step: int | None  # the sDPO step it belongs to; None for data/eval, which serves every step
    path: Path
    expected: Callable[[], Fingerprint]  # the fingerprint the config gives it; SdpoError when an input is missing


def artifacts(cfg: SdpoConfig, run: RunDir, tok) -> list[Artifact]:
    """What every stage writes, in the order `sdpo run` writes it: split's data/step-t (and the held-out
    data/eval-step-t or data/eval), then per step reflogp/step-t (and reflogp/eval-step-t) and checkpoints/step-t."""
    split = _once(lambda: split_fp(cfg, tok))  # hashes the source files: once
    found = [Artifact("split", _step_of(path), path, split) for path in data_paths(cfg, run)]
    for t in range(1, num_steps(cfg) + 1):
        found.append(Artifact("reflogp", t, run.reflogp(t), lambda t=t: reflogp_fp(cfg, run, t)))
        key = held_out_key(cfg, t)
        if key is not None:  # the held-out pairs' log-probs under the same reference (train's eval/* metrics)
            found.append(Artifact("reflogp", t, run.reflogp_held_out(t), lambda t=t, key=key: logps_fp(
                cfg, data_fp(run, key), reference_model(cfg, run, t), run, run.rel(run.data(key)))))
        found.append(Artifact("train", t, run.checkpoint(t), lambda t=t: train_fp(cfg, run, t)))
    return found


@dataclass
class Row:
    """One artifact's state."""

    artifact: Artifact
    state: str  # one of STATES
    reasons: list[str] = field(default_factory=list)  # why it is stale, in the user's terms
    saved: dict | None = None  # a training step's saved state: {"updates_done", "updates", "current"}


def survey(cfg: SdpoConfig, run: RunDir, tok) -> list[Row]:
    """Every artifact's state as the files say (no `running` yet: see run_status)."""
    rows: list[Row] = []
    states: dict[str, str] = {}  # run-relative path -> state, for the artifacts computed from it
    for artifact in artifacts(cfg, run, tok):
        meta = read_meta(artifact.path)
        try:
            expected, unmet = artifact.expected(), None
        except SdpoError as e:  # an input it needs is not there (M_{t-1})
            expected, unmet = None, e.message.replace(f"{run.root}/", "")
        if meta is None:
            row = Row(artifact, "missing")
        elif expected is None:
            row = Row(artifact, "stale", [unmet])
        elif meta.get("fingerprint") != expected:
            row = Row(artifact, "stale", explain(meta, expected, run.root))
        else:
            row = Row(artifact, "finished")
        if meta is not None and expected is not None:
            for name in depends_on(expected):
                if states.get(name) == "stale":  # redone first, which makes this one stale in turn
                    row.state = "stale"
                    row.reasons.append(f"its input {name} is stale (redone first)")
        if artifact.stage == "train" and row.state != "finished":
            row.saved = _saved_state(artifact.path, expected)
        states[run.rel(artifact.path)] = row.state
        rows.append(row)
    return rows


def stale_reasons(cfg: SdpoConfig, run: RunDir, tok, stage: str, step: int | None = None) -> list[str]:
    """Why the finished artifacts of `stage` (of `step`; every one of split's) are stale, by their own inputs; [] if
    none is. `sdpo run --redo-stale` redoes a stage when this is not empty: the stages run in order, so an artifact
    computed from one that was just redone is stale by then."""
    reasons = []
    for artifact in artifacts(cfg, run, tok):
        if artifact.stage != stage or (step is not None and stage != "split" and artifact.step != step):
            continue
        meta = read_meta(artifact.path)
        if meta is None:
            continue
        try:
            expected = artifact.expected()
        except SdpoError as e:
            reasons.append(e.message)
            continue
        if meta.get("fingerprint") != expected:
            reasons += [f"{run.rel(artifact.path)}: {r}" for r in explain(meta, expected, run.root)]
    return reasons


def run_status(cfg: SdpoConfig, *, ctx: RunContext | None = None) -> dict:
    """The status report (what `sdpo status --json` prints): the run directory, who holds it, every artifact's state
    with its reasons, whether the run is up to date, and the command that brings it there."""
    ctx = ctx or RunContext.from_env()
    run = RunDir(cfg.run_dir)
    rows = survey(cfg, run, ctx.tokenizer(cfg.model))
    busy = holder(run.root) if run.root.is_dir() else None
    if busy is not None:
        for row in _worked_on(busy.get("command") or "", rows):
            row.state = "running"
    states = {row.state for row in rows}
    command = None
    if "stale" in states:
        command = f"{ctx.command('run')} --redo-stale"
    elif states - {"finished"}:
        command = ctx.command("run")
    return {
        "run_dir": str(run.root),
        "config": ctx.config_path,
        "in_use": None if busy is None else {**busy, "says": describe(busy)},
        "stages": [{"stage": row.artifact.stage, "step": row.artifact.step, "path": run.rel(row.artifact.path),
                    "state": row.state, "reasons": row.reasons, "saved_state": row.saved} for row in rows],
        "up_to_date": states == {"finished"},
        "command": command,
    }


COLOURS = {"finished": "green", "stale": "yellow", "missing": "red", "running": "cyan"}


def status_lines(report: dict) -> list[str]:
    """The report as `sdpo status` prints it: one line per artifact, then the command (rich markup)."""
    lines = [f"run directory {escape(report['run_dir'])} (config {escape(report['config'])})"]
    if report["in_use"] is not None:
        lines.append(f"in use by {escape(report['in_use']['says'])}")
    width = max((len(s["path"]) for s in report["stages"]), default=0)
    for s in report["stages"]:
        label = s["stage"] + (f" {s['step']}" if s["step"] is not None and s["stage"] != "split" else "")
        details = list(s["reasons"])
        if s["saved_state"] is not None:
            details.append(_saved_words(s["saved_state"]))
        state = f"[{COLOURS[s['state']]}]{s['state']}[/]"
        lines.append(f"{label:<10} {escape(s['path']):<{width}}  {state}"
                     + (f": {escape('; '.join(details))}" if details else ""))
    if report["command"] is None:
        lines.append("up to date: every stage is finished")
    elif report["in_use"] is not None:
        lines.append(f"to bring it up to date, once that process has ended: {escape(report['command'])}")
    else:
        lines.append(f"to bring it up to date: {escape(report['command'])}")
    return lines


# ---------------------------------------------------------------------------------------------------------------
# Helpers


def _once(compute: Callable[[], Fingerprint]) -> Callable[[], Fingerprint]:
    done: list[Fingerprint] = []

    def get() -> Fingerprint:
        if not done:
            done.append(compute())
        return done[0]

    return get


def _step_of(path: Path) -> int | None:
    """data/step-3 -> 3, data/eval-step-2 -> 2, data/eval -> None."""
    match = re.search(r"step-(\d+)$", path.name)
    return int(match[1]) if match else None


def _saved_state(checkpoint: Path, expected: Fingerprint | None) -> dict | None:
    """The resumable state of an unfinished training step (train._save_state's progress.json): updates done, of how
    many (None where the state predates recording it), and whether this config resumes from it."""
    try:
        progress = json.loads((checkpoint.with_name(f".{checkpoint.name}.state") / PROGRESS).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(progress, dict) or not isinstance(progress.get("update"), int):
        return None
    return {"updates_done": progress["update"], "updates": progress.get("total"),
            "current": expected is not None and progress.get("fingerprint") == expected}


def _saved_words(saved: dict) -> str:
    done = f"{saved['updates_done']}/{saved['updates']}" if saved["updates"] else f"{saved['updates_done']}"
    if saved["current"]:
        return f"saved state: {done} updates done (the run resumes there)"
    return f"a saved state ({done} updates) from another configuration, ignored: the step starts over"


def _worked_on(command: str, rows: list[Row]) -> list[Row]:
    """The rows that the command holding the run directory works on (lock.py records it as `sdpo NAME ARGS`):
    `split` its unfinished data, `reflogp`/`train --step t` that stage of step t, `run` the first unfinished stage;
    nothing for gamma, eval or a command not known."""
    words = command.split()
    name = words[1] if len(words) > 1 and words[0] == "sdpo" else None
    step = None
    for i, word in enumerate(words):
        if word in ("--step", "-t") and i + 1 < len(words) and words[i + 1].isdigit():
            step = int(words[i + 1])
        elif word.startswith("--step=") and word[7:].isdigit():
            step = int(word[7:])
    unfinished = [row for row in rows if row.state != "finished"]
    if name == "run" and unfinished:
        first = unfinished[0].artifact
        return [row for row in unfinished if row.artifact.stage == first.stage
                and (first.stage == "split" or row.artifact.step == first.step)]
    if name == "split":
        return [row for row in unfinished if row.artifact.stage == "split"]
    if name in ("reflogp", "train") and step is not None:
        return [row for row in unfinished if row.artifact.stage == name and row.artifact.step == step]
    return []
