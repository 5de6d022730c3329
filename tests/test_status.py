"""`sdpo status` (sdpo_cli/status.py), the stale reasons every command gives (fingerprints.explain), `sdpo run
--redo-stale`, and a run directory used as CONFIG, each through the CLI (cli.main() in this process) on the tiny
model: a fresh, a finished, a stale, a running and a half-trained run. One finished two-step run (two updates per
step) is shared; every test works on its own copy."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, tiny_pairs, write_jsonl
from tests.test_errors import run_in_process
from tests.test_train_options import sdpo

ARROW = "data-00000-of-00001.arrow"
STAGES = ["data/step-1", "data/step-2", "reflogp/step-1", "checkpoints/step-1", "reflogp/step-2",
          "checkpoints/step-2"]


def write_config(folder: Path, model: Path, **train) -> Path:
    """A two-step config on the tiny model, 8 pairs per step, two updates per step; its run dir is folder/run."""
    folder.mkdir(parents=True, exist_ok=True)
    a = write_jsonl(folder / "a.jsonl", tiny_pairs(8, seed=1))
    b = write_jsonl(folder / "b.jsonl", tiny_pairs(8, seed=2))
    cfg = {"run_dir": str(folder / "run"), "model": {"base": str(model)},
           "data": {"sources": [{"name": "a", "path": str(a)}, {"name": "b", "path": str(b)}], "max_length": 64},
           "train": {"learning_rate": 1e-3, "per_device_batch_size": 4, "max_updates": 2, "save_every": 0,
                     "logging_every": 1, **train},
           "inference": {"batch_size": 8}}
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def status(*args: str) -> dict:
    """`sdpo status ARGS --json`, parsed."""
    return json.loads(sdpo("status", *args, "--json").stdout)


def states(report: dict) -> dict[str, str]:
    return {s["path"]: s["state"] for s in report["stages"]}


def reasons(report: dict) -> dict[str, list[str]]:
    return {s["path"]: s["reasons"] for s in report["stages"]}


def printed_command(stdout: str) -> list[str]:
    """The arguments of the command `sdpo status` prints to bring the run up to date (without `sdpo`)."""
    line = next(line for line in stdout.splitlines() if line.startswith("to bring it up to date"))
    words = shlex.split(line.split(": ", 1)[1])
    assert words[0] == "sdpo", line
    return words[1:]


def snapshot(run: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(run)): (p.stat().st_size, p.stat().st_mtime_ns) for p in run.rglob("*")}


def metas(run: Path) -> dict[str, str]:
    return {name: (run / name / "meta.json").read_text() for name in STAGES if (run / name / "meta.json").is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_model_dir) -> tuple[Path, Path]:
    """A finished two-step run: (config, run dir). Tests work on copies (`copy_of`)."""
    config = write_config(tmp_path_factory.mktemp("status"), tiny_model_dir)
    sdpo("run", str(config))
    return config, config.parent / "run"


def copy_of(finished, tmp_path: Path) -> tuple[Path, Path]:
    config, run = finished
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return config, copy


# ---------------------------------------------------------------------------------------------------------------
# The fingerprints of finished runs do not change: the values sdpo 0.1 (git HEAD before inputs were recorded)
# computed for fixed configs (hub ids for the model and the sources, so that no path of this machine enters them)


class FakeTokenizer:
    chat_template = "{{ x }}"
    eos_token, bos_token = "</s>", "<s>"

    def get_vocab(self):
        return {"a": 0, "b": 1, "</s>": 2, "<s>": 3}


BEFORE = {  # split, reflogp 1, train 1, reflogp 2, train 2
    "natural": ([], ["423014686936131e", "a8364d0de36211d2", "f9b5ebfb1f00e0bb", "b4abcbbb0600fc12",
                     "aca2023106ba0b6c"]),
    "stratified": (["split.strategy=stratified", "split.steps=null", "split.fractions=[0.3,0.7]",
                    "train.gradient_accumulation=2", "peft.enabled=true", "dpo.beta=0.2", "train.save_every=7"],
                   ["1dc29dfff50bd955", "c5523e8f4673d78b", "0b95cbad7ecf5ea7", "8c478e15e28d83c6",
                    "08cee58d60d3dbc1"]),
    "curriculum": (["split.strategy=curriculum", "split.steps=null", "split.fractions=[0.5,0.5]", "model.dtype=bf16",
                    "dpo.target_init=base", "data.eval={name: e, path: org/evalset}"],
                   ["ec80944e2894d972", "a116a28ef0b97ed4", "afc492ab8eb03173", "8a99eee9c256fa09",
                    "ce7005ddb18b29b5"]),
}


@pytest.mark.parametrize("case", list(BEFORE))
def test_fingerprints_are_what_they_were(case, tmp_path, monkeypatch):
    from sdpo_cli import fingerprints as F
    from sdpo_cli.config import load_config
    from sdpo_cli.rundir import RunDir

    monkeypatch.chdir(tmp_path)
    Path("c.yaml").write_text(json.dumps({
        "run_dir": "run", "model": {"base": "org/tiny-model"},
        "data": {"sources": [{"name": "a", "path": "org/set-a"}, {"name": "b", "path": "org/set-b", "split": "x"}]}}))
    overrides, want = BEFORE[case]
    cfg = load_config("c.yaml", overrides)
    run = RunDir(cfg.run_dir)
    got = [F.split_fp(cfg, FakeTokenizer())]
    for t in (1, 2):  # each artifact as the stages would record it, so that the next fingerprint builds on it
        run.data(t).mkdir(parents=True)
        (run.data(t) / "meta.json").write_text(json.dumps({"fingerprint": got[0]}))
        got.append(F.reflogp_fp(cfg, run, t))
        run.reflogp(t).mkdir(parents=True)
        (run.reflogp(t) / "meta.json").write_text(json.dumps({"fingerprint": got[-1]}))
        got.append(F.train_fp(cfg, run, t))
        run.checkpoint(t).mkdir(parents=True)
        (run.checkpoint(t) / "meta.json").write_text(json.dumps({"fingerprint": got[-1]}))
    assert got == want
    assert all(isinstance(fp, F.Fingerprint) and fp.inputs for fp in got)
    assert json.loads(json.dumps(got[2].inputs)) == got[2].inputs  # JSON-able, as meta.json records it


# ---------------------------------------------------------------------------------------------------------------
# explain: the reasons, in the user's terms


def test_explain_names_keys_files_models_and_inputs(tmp_path):
    from sdpo_cli.fingerprints import NO_INPUTS, Fingerprint, explain

    source = tmp_path / "a.jsonl"
    source.write_text("{}\n")
    (tmp_path / "checkpoints" / "step-1").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-1" / "meta.json").write_text("{}")
    old = {"config": {"dpo.beta": 0.1, "split.fractions": [0.5, 0.5], "dpo.loss": "sigmoid"},
           "files": {str(source): "aaa"},
           "models": {"starting model": {"model": "checkpoints/step-1", "identity": "m1"},
                      "tokenizer": {"model": "org/base", "identity": "t1"}},
           "artifacts": {"data/step-1": "d1", "reflogp/step-1": "r1"}}
    new = {"config": {"dpo.beta": 0.2, "split.fractions": [0.3, 0.7], "dpo.loss": "sigmoid", "dpo.nll_weight": 0.5},
           "files": {str(source): "bbb"},
           "models": {"starting model": {"model": "checkpoints/step-1", "identity": "m2"},
                      "tokenizer": {"model": "org/other", "identity": "t2"}},
           "artifacts": {"data/step-1": "d1", "reflogp/step-1": None}}
    assert explain({"inputs": old}, Fingerprint("f", new), tmp_path) == [
        "dpo.beta 0.1 → 0.2", "split.fractions [0.5, 0.5] → [0.3, 0.7]", "dpo.nll_weight (unset) → 0.5",
        f"the input file {source} changed", "its input checkpoints/step-1 was redone",
        "tokenizer org/base → org/other", "its input reflogp/step-1 is missing"]
    assert explain({"fingerprint": "f"}, Fingerprint("g", new), tmp_path) == [NO_INPUTS]
    assert explain({"inputs": new, "fingerprint": "f"}, Fingerprint("g", new), tmp_path) == [
        "made by another version of sdpo (the same inputs, another fingerprint)"]


# ---------------------------------------------------------------------------------------------------------------
# status: fresh, finished, stale, running, half-trained


def test_a_fresh_run_is_missing_everywhere_and_status_creates_nothing(tmp_path, tiny_model_dir):
    config = write_config(tmp_path, tiny_model_dir)
    result = sdpo("status", str(config))
    report = status(str(config))
    assert states(report) == dict.fromkeys(STAGES, "missing")
    assert not report["up_to_date"] and report["in_use"] is None
    assert report["command"] == f"sdpo run {config}"
    assert printed_command(result.stdout) == ["run", str(config)]
    assert "split      data/step-1" in result.stdout and "train 2    checkpoints/step-2" in result.stdout
    assert not (tmp_path / "run").exists()  # status writes nothing, not even the run directory


def test_status_lists_the_held_out_artifacts(tmp_path, tiny_model_dir):
    """split.eval_fraction adds data/eval-step-t and reflogp/eval-step-t: status lists them with their stage."""
    config = write_config(tmp_path, tiny_model_dir)
    report = status(str(config), "split.eval_fraction=0.25")
    assert [(s["stage"], s["step"], s["path"]) for s in report["stages"]] == [
        ("split", 1, "data/step-1"), ("split", 2, "data/step-2"), ("split", 1, "data/eval-step-1"),
        ("split", 2, "data/eval-step-2"), ("reflogp", 1, "reflogp/step-1"), ("reflogp", 1, "reflogp/eval-step-1"),
        ("train", 1, "checkpoints/step-1"), ("reflogp", 2, "reflogp/step-2"), ("reflogp", 2, "reflogp/eval-step-2"),
        ("train", 2, "checkpoints/step-2")]


def test_a_finished_run_is_up_to_date_and_status_writes_nothing(finished):
    config, run = finished
    before = snapshot(run)
    result = sdpo("status", str(config))
    report = status(str(config))
    assert states(report) == dict.fromkeys(STAGES, "finished")
    assert report["up_to_date"] and report["command"] is None
    assert result.stdout.splitlines()[-1] == "up to date: every stage is finished"
    assert snapshot(run) == before
    for name in STAGES:  # every stage recorded what it hashed
        inputs = json.loads((run / name / "meta.json").read_text())["inputs"]
        assert {"config"} <= set(inputs), name
    assert json.loads((run / "checkpoints" / "step-2" / "meta.json").read_text())["inputs"]["models"] == {
        "starting model": {"model": "checkpoints/step-1",
                           "identity": json.loads((run / "checkpoints" / "step-1" / "meta.json").read_text())[
                               "fingerprint"]}}


def test_a_stale_run_names_the_key_and_the_printed_command_brings_it_up_to_date(finished, tmp_path):
    config, run = copy_of(finished, tmp_path)
    args = [str(config), f"run_dir={run}", "dpo.beta=0.2"]
    result = sdpo("status", *args)
    report = status(*args)
    assert states(report) == {"data/step-1": "finished", "data/step-2": "finished", "reflogp/step-1": "finished",
                              "checkpoints/step-1": "stale", "reflogp/step-2": "stale", "checkpoints/step-2": "stale"}
    why = reasons(report)
    assert why["checkpoints/step-1"] == ["dpo.beta 0.1 → 0.2"]
    assert why["reflogp/step-2"] == ["its input checkpoints/step-1 is stale (redone first)"]
    assert why["checkpoints/step-2"][0] == "dpo.beta 0.1 → 0.2"
    assert "train 1    checkpoints/step-1  stale: dpo.beta 0.1 → 0.2" in result.stdout
    command = printed_command(result.stdout)
    assert command == ["run", *args, "--redo-stale"]

    before = metas(run)
    redone = run_in_process(*command)
    assert redone.returncode == 0, redone.stderr
    assert "train step 1: stale, redoing it (--redo-stale): checkpoints/step-1: dpo.beta 0.1 → 0.2" in redone.stderr
    after = metas(run)
    assert {name for name in STAGES if after[name] != before[name]} == {
        "checkpoints/step-1", "reflogp/step-2", "checkpoints/step-2"}  # exactly the stale ones
    assert status(*args)["up_to_date"]
    assert sdpo("status", *args).stdout.splitlines()[-1] == "up to date: every stage is finished"


def test_stale_errors_give_the_reason_and_the_real_command(finished, tmp_path):
    config, run = finished
    run = shutil.copytree(run, tmp_path / "my run")  # a space: the hints quote it as a shell needs
    result = run_in_process("train", str(config), "--step", "1", f"run_dir={run}", "dpo.beta=0.2")
    assert result.returncode == 1, result.stderr
    assert f"Error: {run}/checkpoints/step-1 is stale: dpo.beta 0.1 → 0.2\n" in result.stderr
    assert (f"Hint: sdpo train {config} --step 1 'run_dir={run}' dpo.beta=0.2 --force  # redo it; every stale stage "
            f"and what follows: sdpo run {config} 'run_dir={run}' dpo.beta=0.2 --redo-stale") in result.stderr
    # train's check of its reference log-probs: train.layout is one of the numerics reflogp is computed with
    result = run_in_process("train", str(config), "--step", "1", f"run_dir={run}", "train.layout=padded")
    assert result.returncode == 1, result.stderr
    assert f"Error: {run}/reflogp/step-1 is stale: train.layout prefix → padded\n" in result.stderr
    assert f"Hint: sdpo reflogp {config} --step 1 'run_dir={run}' train.layout=padded --force" in result.stderr
    # sdpo run stops at the first stale stage with the same words
    result = run_in_process("run", str(config), f"run_dir={run}", "dpo.loss=ipo")
    assert result.returncode == 1, result.stderr
    assert f"Error: {run}/checkpoints/step-1 is stale: dpo.loss sigmoid → ipo\n" in result.stderr
    assert f"sdpo run {config} 'run_dir={run}' dpo.loss=ipo --redo-stale" in result.stderr


def test_a_changed_source_file_is_named(tmp_path, tiny_model_dir):
    config = write_config(tmp_path, tiny_model_dir)
    sdpo("split", str(config))
    source = tmp_path / "a.jsonl"
    write_jsonl(source, tiny_pairs(9, seed=1))
    report = status(str(config))
    assert reasons(report)["data/step-1"] == [f"the input file {source} changed"]
    assert states(report)["data/step-2"] == "stale"  # one split writes both
    assert report["command"] == f"sdpo run {config} --redo-stale"
    result = run_in_process("reflogp", str(config), "--step", "1")
    assert result.returncode == 1, result.stderr
    assert f"data/step-1 is stale: the input file {source} changed" in result.stderr
    assert f"Hint: sdpo split {config} --force  # redo it; every stale stage and what follows: sdpo run {config} " \
           "--redo-stale" in result.stderr


def test_artifacts_of_an_earlier_sdpo_are_current_until_the_config_changes(finished, tmp_path):
    from sdpo_cli.fingerprints import NO_INPUTS

    config, run = copy_of(finished, tmp_path)
    for name in STAGES:  # as sdpo wrote meta.json before it recorded the inputs
        meta = json.loads((run / name / "meta.json").read_text())
        del meta["inputs"]
        (run / name / "meta.json").write_text(json.dumps(meta))
    assert status(str(config), f"run_dir={run}")["up_to_date"]  # the fingerprints are what they were
    report = status(str(config), f"run_dir={run}", "dpo.beta=0.2")
    assert reasons(report)["checkpoints/step-1"] == [NO_INPUTS]
    assert NO_INPUTS == "made by an earlier sdpo or another configuration (no recorded inputs)"


def hold_lock(run: Path, *command: str) -> subprocess.Popen:
    """Another process holding the run directory's lock (lock.hold), which it records as `sdpo COMMAND` (lock.py
    names a `python -c` holder by the arguments after -c); it says `held` once it holds it."""
    code = ("import os, time; from pathlib import Path; from sdpo_cli.lock import hold; "
            "from sdpo_cli.context import RunContext\n"
            "with hold(Path(os.environ['LOCKED']), RunContext()):\n    print('held', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code, *command], cwd=str(ROOT), stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "LOCKED": str(run)})
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_running_stage_is_shown_with_its_process(finished, tmp_path):
    config, run = copy_of(finished, tmp_path)
    shutil.rmtree(run / "checkpoints" / "step-2")
    proc = hold_lock(run, "train", str(run), "--step", "2")
    try:
        result = sdpo("status", str(run))
        report = status(str(run))
    finally:
        proc.kill()
        proc.wait()
    assert states(report)["checkpoints/step-2"] == "running"
    assert {s for p, s in states(report).items() if p != "checkpoints/step-2"} == {"finished"}
    assert report["in_use"]["pid"] == proc.pid and report["in_use"]["command"].startswith("sdpo ")
    assert f"in use by pid {proc.pid}" in result.stdout
    assert "train 2    checkpoints/step-2  running" in result.stdout
    assert f"to bring it up to date, once that process has ended: sdpo run {run}" in result.stdout


@pytest.mark.slow
def test_a_half_trained_step_shows_its_saved_state_and_the_command_resumes_it(tmp_path, tiny_model_dir):
    """Training stopped by SIGINT (a real one, as tests/test_resume.py sends it) leaves checkpoints/.step-1.state:
    status shows its updates done of all, as missing and, while a process holds the run, as running; the printed
    command resumes there and finishes the run."""
    from tests.test_resume import read_log, run_and_signal

    config = write_config(tmp_path, tiny_model_dir, max_updates=16, save_every=1, per_device_batch_size=2)
    run = tmp_path / "run"
    sdpo("split", str(config))
    sdpo("reflogp", str(config), "--step", "1")
    code, stderr = run_and_signal(["train", str(config), "--step", "1"],
                                  lambda _: len(read_log(run / "logs" / "train-step-1.jsonl")) >= 3, signal.SIGINT)
    assert code == 130, stderr
    progress = json.loads((run / "checkpoints" / ".step-1.state" / "progress.json").read_text())
    done = progress["update"]
    assert 3 <= done < 16 and progress["total"] == 16

    result = sdpo("status", str(config))
    report = status(str(config))
    step1 = next(s for s in report["stages"] if s["path"] == "checkpoints/step-1")
    assert step1["state"] == "missing"
    assert step1["saved_state"] == {"updates_done": done, "updates": 16, "current": True}
    assert f"train 1    checkpoints/step-1  missing: saved state: {done}/16 updates done (the run resumes there)" \
        in result.stdout

    proc = hold_lock(run, "run", str(config))
    try:
        held = sdpo("status", str(config)).stdout
    finally:
        proc.kill()
        proc.wait()
    assert f"train 1    checkpoints/step-1  running: saved state: {done}/16 updates done" in held

    resumed = run_in_process(*printed_command(result.stdout))
    assert resumed.returncode == 0, resumed.stderr
    assert f"train step 1: resuming after update {done - 1} ({done} of 16 done)" in resumed.stderr
    assert status(str(config))["up_to_date"]


# ---------------------------------------------------------------------------------------------------------------
# A run directory is a valid CONFIG


def test_a_copied_run_directory_works_as_config(finished, tmp_path):
    config, run = finished
    copy = tmp_path / "elsewhere" / "x"
    shutil.copytree(run, copy)
    report = status(str(copy))
    assert report["run_dir"] == str(copy.resolve()) and report["config"] == str(copy / "config.yaml")
    assert report["up_to_date"]
    out = json.loads(sdpo("gamma", str(copy), "--json").stdout)
    assert [r["checkpoint"] for r in out] == ["base", "step-1", "step-2"]
    assert (copy / "reports" / "gamma.json").is_file() and not (run / "reports" / "gamma.json").exists()
    # overrides still apply on top of the recorded config
    stale = status(str(copy), "dpo.beta=0.2")
    assert reasons(stale)["checkpoints/step-1"] == ["dpo.beta 0.1 → 0.2"]
    assert stale["command"] == f"sdpo run {copy} dpo.beta=0.2 --redo-stale"


def test_a_folder_without_config_yaml_is_one_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    for command in (["status"], ["gamma"], ["train", "--step", "1"]):
        result = run_in_process(command[0], str(tmp_path / "empty"), *command[1:])
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert lines[0] == f"Error: {tmp_path / 'empty'}: a folder without config.yaml: neither a config file nor a " \
                           "run directory of sdpo", result.stderr
        assert lines[1].startswith("Hint: give the YAML config, or a run directory") and len(lines) == 2


def test_redo_stale_keeps_a_current_run_as_it_is(finished, tmp_path):
    config, run = copy_of(finished, tmp_path)
    before = metas(run)
    result = sdpo("run", str(config), f"run_dir={run}", "--redo-stale")
    assert result.stderr.count("finished already") == 5 and "redoing" not in result.stderr
    assert metas(run) == before


def test_an_interrupted_redo_stale_resumes_its_saved_state(tmp_path, tiny_model_dir):
    """`run --redo-stale` stopped by SIGINT while it redoes a stale M_1 leaves the state of the new configuration:
    the same command again resumes it (it does not start the redo over, as --force would)."""
    from tests.test_resume import run_and_signal

    config = write_config(tmp_path, tiny_model_dir, max_updates=16, save_every=1, per_device_batch_size=2)
    state = tmp_path / "run" / "checkpoints" / ".step-1.state" / "progress.json"
    sdpo("run", str(config))
    assert not state.exists()
    redo = ["run", str(config), "dpo.beta=0.2", "--redo-stale"]

    def three_updates_saved(_) -> bool:
        try:  # a newer state replaces the folder: it may be gone for an instant
            return json.loads(state.read_text())["update"] >= 3
        except (OSError, ValueError):
            return False

    code, stderr = run_and_signal(redo, three_updates_saved, signal.SIGINT)
    assert code == 130, stderr
    assert "train step 1: stale, redoing it (--redo-stale)" in stderr
    done = json.loads(state.read_text())["update"]

    resumed = run_in_process(*redo)
    assert resumed.returncode == 0, resumed.stderr
    assert f"train step 1: resuming after update {done - 1} ({done} of 16 done)" in resumed.stderr
    assert status(str(config), "dpo.beta=0.2")["up_to_date"]
