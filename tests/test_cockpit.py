"""What a practitioner reads of a training step, each through `sdpo train` / `sdpo run` (cli.main() in this process) on
the tiny model: a tracker that is not installed refused before any model loads, meta.json's epochs, one numbering of
updates in the stop and resume lines, the printed update-0 accuracy, and the model card of every checkpoint
(checkpoints/step-t/README.md). One split + reflogp of step 1 is shared (tests/test_train_options.py's helpers);
every test trains on its own copy."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from tests.test_errors import run_in_process
from tests.test_train_options import prepare, read_log, sdpo, shift_reference, train, write_config


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_model_dir) -> tuple[Path, Path]:
    return prepare(tmp_path_factory.mktemp("prepared"), tiny_model_dir)


@pytest.fixture(scope="module")
def trained(prepared, tmp_path_factory) -> Path:
    """Step 1 trained with the default options (16 pairs, batches of 4: 4 updates, one epoch): its run dir."""
    config, run = prepared
    dest = tmp_path_factory.mktemp("trained") / "run"
    train(config, run, dest)
    return dest


def printed_lines(stderr: str) -> dict[int, str]:
    """The metric lines on stderr by update: `step 1 | update    0/4 | loss ... | acc 0.00 | lr ...`."""
    return {int(m[1]): m[0] for m in re.finditer(r"step \d+ \| update\s+(\d+)/\d+ \|[^\n]*", stderr)}


def printed_accuracy(line: str) -> float:
    return float(re.search(r"\| acc ([0-9.]+) \|", line)[1])


# ---------------------------------------------------------------------------------------------------------------
# train.report_to: trackers that are not installed, or unknown


def wandb_available() -> bool:
    from accelerate.utils import is_wandb_available

    return is_wandb_available()


@pytest.mark.skipif(wandb_available(), reason="wandb is installed here")
def test_a_tracker_that_is_not_installed_is_an_error_before_any_model_loads(prepared, tmp_path):
    config, run = prepared
    shutil.copytree(run, tmp_path / "run")
    result = run_in_process("train", "--step", "1", str(config), f"run_dir={tmp_path / 'run'}",
                            "train.report_to=[tensorboard,wandb]")
    assert result.returncode == 2, result.stderr
    assert "Error: " in result.stderr and "train.report_to: wandb is not installed" in result.stderr, result.stderr
    assert "Hint: pip install wandb" in result.stderr
    assert "target from" not in result.stderr and "Traceback" not in result.stderr  # no model was loaded
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.skipif(wandb_available(), reason="wandb is installed here")
def test_sdpo_run_refuses_a_missing_tracker_before_the_split(tmp_path, tiny_model_dir):
    config = write_config(tmp_path, tiny_model_dir)
    result = run_in_process("run", str(config), "train.report_to=[wandb]")
    assert result.returncode == 2 and "Hint: pip install wandb" in result.stderr, result.stderr
    assert not (tmp_path / "run" / "data").exists()


def test_an_unknown_tracker_is_an_error(prepared, tmp_path):
    config, run = prepared
    shutil.copytree(run, tmp_path / "run")
    result = run_in_process("train", "--step", "1", str(config), f"run_dir={tmp_path / 'run'}",
                            "train.report_to=[tensorbord]")
    assert result.returncode == 2, result.stderr
    assert "train.report_to: unknown tracker 'tensorbord'" in result.stderr
    assert "Hint: one of " in result.stderr and "tensorboard" in result.stderr and "wandb" in result.stderr


# ---------------------------------------------------------------------------------------------------------------
# meta.json: epochs trained


def test_meta_records_the_epochs_trained(prepared, trained, tmp_path):
    assert json.loads((trained / "checkpoints" / "step-1" / "meta.json").read_text())["epochs"] == 1.0
    config, run = prepared
    train(config, run, tmp_path / "run", "train.max_updates=6")  # 4 updates per epoch
    meta = json.loads((tmp_path / "run" / "checkpoints" / "step-1" / "meta.json").read_text())
    assert meta["updates"] == 6 and meta["epochs"] == 1.5


# ---------------------------------------------------------------------------------------------------------------
# One numbering of updates: the log's (from 0) in the stop and resume lines


def test_stop_and_resume_name_updates_as_the_log_does(prepared, tmp_path, monkeypatch):
    """A stop requested at the 2nd update boundary (as a SIGINT would be): updates 0 and 1 are done and logged."""
    from sdpo_cli import train as train_module

    asked = []

    def requested(self, accelerator):
        asked.append(1)
        return "SIGINT" if len(asked) == 2 else None

    config, run = prepared
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    with monkeypatch.context() as mp:
        mp.setattr(train_module.StopSignals, "requested", requested)
        stopped = run_in_process("train", "--step", "1", str(config), f"run_dir={copy}")
    assert stopped.returncode == 130, stopped.stderr
    assert [r["update"] for r in read_log(copy / "logs" / "train-step-1.jsonl")] == [0, 1]
    assert "Error: train step 1: stopped by SIGINT after update 1 (2 of 4 done); state saved in" in stopped.stderr
    resumed = sdpo("train", "--step", "1", str(config), f"run_dir={copy}")
    assert "train step 1: resuming after update 1 (2 of 4 done) from" in resumed.stderr, resumed.stderr
    assert sorted(printed_lines(resumed.stderr)) == [2, 3]
    assert [r["update"] for r in read_log(copy / "logs" / "train-step-1.jsonl")] == [0, 1, 2, 3]


# ---------------------------------------------------------------------------------------------------------------
# The printed accuracy: a tolerance for the float noise at update 0; the logged one stays strict


def test_update_0_prints_no_accuracy_out_of_float_noise(prepared, tmp_path):
    """Reference log-probs off by float noise (1e-4 on ~-50, as reflogp's other batches give): at update 0, target ==
    reference, every margin is β·1e-4 > 0, so the logged (strict, as TRL) accuracy is 1.0, but the printed one is
    0.00. Later updates' real margins print the logged accuracy."""
    config, run = prepared
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    shift_reference(copy / "reflogp" / "step-1", "ref_chosen_logp", -1e-4)
    result = sdpo("train", "--step", "1", str(config), f"run_dir={copy}")
    log = {r["update"]: r for r in read_log(copy / "logs" / "train-step-1.jsonl")}
    lines = printed_lines(result.stderr)
    assert sorted(lines) == sorted(log) == [0, 1, 2, 3]
    assert log[0]["rewards/accuracies"] == 1.0 and log[0]["check"] == "ok"
    assert printed_accuracy(lines[0]) == 0.0, lines[0]
    for update in (1, 2, 3):
        assert printed_accuracy(lines[update]) == round(log[update]["rewards/accuracies"], 2), lines[update]
    assert not any("accuracies_shown" in key for r in log.values() for key in r)  # printed only, never logged


# ---------------------------------------------------------------------------------------------------------------
# The model card


def test_every_checkpoint_has_a_model_card(trained, tiny_model_dir):
    ckpt = trained / "checkpoints" / "step-1"
    card = (ckpt / "README.md").read_text()
    meta = json.loads((ckpt / "meta.json").read_text())
    assert "README.md" in meta["files"]  # part of the artifact and of its integrity manifest
    front, body = card.split("---\n")[1], card.split("---\n", 2)[2]
    assert "library_name: transformers" in front and "- sdpo\n- dpo\n" in front
    assert "base_model:" not in front.replace("# base_model", "")  # a local base model has no hub id to name
    assert "# M_1: sDPO step 1 of 2" in body
    assert f"**Base model (S = M_0):** `{tiny_model_dir.name}` (a local path)" in body
    assert str(tiny_model_dir) not in card
    assert "**Reference π_ref:** S, the base model (M_0)\n" in body
    data_meta = json.loads((trained / "data" / "step-1" / "meta.json").read_text())
    assert data_meta["rows_per_source"] == {"a": 16}
    assert "| a | `a.jsonl` (a local path) | 16 |" in body
    assert "| dpo.beta | 0.1 |" in body and "| train.learning_rate | 0.001 |" in body
    log = read_log(trained / "logs" / "train-step-1.jsonl")
    for label, r in (("first logged", log[0]), ("last logged", log[-1])):
        assert f"| {label} | {r['update']} | {r['loss']:.4f} | {r['rewards/margins']:.4f} |" in body
    gamma = json.loads((trained / "reflogp" / "step-1" / "meta.json").read_text())["gamma_ref_mean"]
    assert f"{gamma:.4f}" in body
    assert f"sdpo {meta['sdpo_cli']}" in body
    assert "hf upload <your-name>/<repo> " in body and str(ckpt) in body  # (the tmp run dir is outside the cwd)


def test_a_card_names_hub_models_and_data_in_its_front_matter(tmp_path):
    """Step 2 with dpo.reference: base, a hub base model and a hub dataset (rendered alone: nothing is loaded)."""
    import yaml

    from sdpo_cli.config import load_config
    from sdpo_cli.modelcard import render

    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({
        "run_dir": str(tmp_path / "run"), "model": {"base": "org/sft-model"},
        "data": {"sources": [{"name": "uf", "path": "org/prefs", "split": "train_prefs"},
                             {"name": "local", "path": str(tmp_path / "mine.jsonl")}]},
        "dpo": {"reference": "base"}}))
    cfg = load_config(path)
    record = {"update": 0, "loss": 0.7, "rewards/margins": 0.0, "check": "skipped"}
    meta = {"step": 2, "pairs": 10, "updates": 2, "epochs": 1.0, "world_size": 1, "first": record,
            "last": dict(record, update=1, loss=0.5, **{"rewards/margins": 0.25})}
    card = render(cfg, meta=meta, data_meta={"rows": 10, "strategy": "natural", "rows_per_source": {"uf": 10}},
                  ref_meta={"gamma_ref_mean": 1.5}, published=tmp_path / "run" / "checkpoints" / "step-2")
    front = card.split("---\n")[1]
    assert "base_model: org/sft-model\n" in front and "datasets:\n- org/prefs\n" in front
    assert "mine.jsonl" not in front
    assert "# M_2: sDPO step 2 of 2" in card
    assert "the target started from M_1, the model of step 1" in card
    assert "**Reference π_ref:** S, the base model\n" in card
    assert "| uf | `org/prefs`, split train_prefs | 10 |" in card
    assert "| last logged | 1 | 0.5000 | 0.2500 |" in card and "1.5000" in card
    assert "Update-0 check" not in card  # skipped: target init != reference


def test_a_card_states_the_loss_as_configured_and_the_update0_value(tmp_path):
    """A list of losses with weights and modifiers reads as a sum, and the update-0 check shows the value it
    compared with (docs/losses.md), not ln 2 whatever the loss."""
    import yaml

    from sdpo_cli.config import load_config
    from sdpo_cli.modelcard import render

    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({
        "run_dir": str(tmp_path / "run"), "model": {"base": "org/sft-model"},
        "data": {"sources": [{"name": "uf", "path": "org/prefs"}]},
        "dpo": {"loss": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5], "ld_alpha": 0.5}}))
    record = {"update": 0, "loss": 0.835957, "rewards/margins": 0.0, "check": "ok",
              "check/expected_loss": 0.835957}
    meta = {"step": 1, "pairs": 10, "updates": 2, "epochs": 1.0, "world_size": 1, "first": record,
            "last": dict(record, update=1)}
    card = render(load_config(path), meta=meta, data_meta={"rows": 10, "strategy": "natural"},
                  ref_meta={"gamma_ref_mean": 1.5}, published=tmp_path / "run" / "checkpoints" / "step-1")
    assert "; DPO loss `sigmoid` + 0.5 × `sft`, LD-DPO α = 0.5, β = 0.1" in card
    assert "- **Update-0 check:** ok (target == reference there, so the loss must be its value at equal models, " \
           "0.835957)" in card
