"""Held-out metrics during training (issue 13, part 1), each through the real CLI on the tiny model: the pairs
split.eval_fraction holds out of each D_t (or data.eval), their reference log-probs under each step's reference
(reflogp/eval-step-t), the eval/* records of logs/train-step-t.jsonl (update 0, every train.eval_every, the end),
meta.json, the model card and loss.png; and the numbers checked against what `sdpo gamma` computes independently."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import datasets
import pytest
import yaml

from tests.conftest import tiny_pairs, write_jsonl
from tests.test_errors import run_in_process
from tests.test_rundir_safety import BATCHES, same_records, sdpo_with
from tests.test_train_options import read_log, sdpo, write_config

HELD_OUT = ("split.eval_fraction=0.25", "train.eval_every=3")
EVAL_KEYS = {"step", "update", "epoch", "eval/loss", "eval/loss/dpo", "eval/rewards/chosen", "eval/rewards/rejected",
             "eval/rewards/margins", "eval/rewards/accuracies", "eval/logps/chosen", "eval/logps/rejected",
             "eval/gamma/policy", "eval/gamma/ref", "eval/pairs"}


@pytest.fixture(scope="module")
def held_out_run(tmp_path_factory, tiny_model_dir) -> tuple[Path, Path, str]:
    """`sdpo run` of two steps (24 + 16 pairs, a quarter held out of each, eval every 3 updates): (config, run dir,
    stderr)."""
    folder = tmp_path_factory.mktemp("held-out")
    config = write_config(folder, tiny_model_dir, pairs_a=24)
    result = sdpo("run", str(config), *HELD_OUT)
    return config, folder / "run", result.stderr


def ids(path: Path) -> list[str]:
    return list(datasets.load_from_disk(str(path))["id"])


def test_split_holds_out_a_seeded_share_of_each_step(held_out_run, tmp_path):
    config, run, stderr = held_out_run
    for t, n in ((1, 24), (2, 16)):
        kept, held = ids(run / "data" / f"step-{t}"), ids(run / "data" / f"eval-step-{t}")
        assert len(held) == round(0.25 * n) and len(kept) + len(held) == n
        assert not set(kept) & set(held)
        meta = json.loads((run / "data" / f"eval-step-{t}" / "meta.json").read_text())
        assert meta["held_out_of"] == f"step-{t}" and meta["rows"] == len(held)
    assert "held out for eval/* (split.eval_fraction=0.25): data/eval-step-1 6, data/eval-step-2 4" in stderr
    # the same seed draws the same pairs; another seed other ones
    again = tmp_path / "again"
    sdpo("split", str(config), f"run_dir={again}", *HELD_OUT)
    assert ids(again / "data" / "eval-step-1") == ids(run / "data" / "eval-step-1")
    other = tmp_path / "other"
    sdpo("split", str(config), f"run_dir={other}", "seed=7", *HELD_OUT)
    assert ids(other / "data" / "eval-step-1") != ids(run / "data" / "eval-step-1")


def test_reflogp_scores_the_held_out_pairs_under_each_steps_reference(held_out_run):
    _, run, _ = held_out_run
    for t in (1, 2):
        meta = json.loads((run / "reflogp" / f"eval-step-{t}" / "meta.json").read_text())
        train_meta = json.loads((run / "reflogp" / f"step-{t}" / "meta.json").read_text())
        assert meta["reference"] == train_meta["reference"] and meta["data"] == f"data/eval-step-{t}"
        assert ids(run / "reflogp" / f"eval-step-{t}") == ids(run / "data" / f"eval-step-{t}")
    # the sums over the first min(C, R) tokens of each reply (LD-DPO): the whole sum for the shorter reply
    table = datasets.load_from_disk(str(run / "reflogp" / "step-1"))
    for row in table:
        shorter = "chosen" if row["chosen_tokens"] <= row["rejected_tokens"] else "rejected"
        assert row[f"ref_{shorter}_logp_shared"] == pytest.approx(row[f"ref_{shorter}_logp"], abs=1e-5)
    assert any(row["ref_chosen_logp_shared"] != pytest.approx(row["ref_chosen_logp"], abs=1e-3) for row in table)
    assert json.loads((run / "reflogp" / "eval-step-2" / "meta.json").read_text())["reference"] == \
        str(run / "checkpoints" / "step-1")


def test_every_step_logs_eval_records_at_update_0_every_k_and_at_the_end(held_out_run):
    _, run, stderr = held_out_run
    for t, updates in ((1, 5), (2, 3)):  # 18 and 12 training pairs in batches of 4
        log = read_log(run / "logs" / f"train-step-{t}.jsonl")
        assert "loss" in log[0] and log[0]["update"] == 0  # update 0's train record stays the first
        evals = [r for r in log if "eval/loss" in r]
        assert [r["update"] for r in evals] == sorted({0, *range(3, updates + 1, 3), updates})
        assert all(set(r) == EVAL_KEYS for r in evals)
        assert log[1]["update"] == 0 and "eval/loss" in log[1]
        # before the first update the target is the reference: the loss's value at δ = 0, ln 2 for sigmoid
        assert evals[0]["eval/loss"] == pytest.approx(math.log(2), abs=1e-4)
        assert evals[0]["eval/rewards/margins"] == pytest.approx(0.0, abs=1e-4)
        assert evals[0]["eval/gamma/policy"] == pytest.approx(evals[0]["eval/gamma/ref"], abs=1e-4)
        assert evals[-1]["eval/loss"] < evals[0]["eval/loss"]  # lr 1e-3 on the tiny model learns
        meta = json.loads((run / "checkpoints" / f"step-{t}" / "meta.json").read_text())
        assert meta["first"] == log[0] and "eval/loss" not in meta["last"]
        assert meta["eval_first"] == evals[0] and meta["eval"] == evals[-1]
        card = (run / "checkpoints" / f"step-{t}" / "README.md").read_text()
        assert "### Held-out pairs" in card and f"| after training | {updates} | {evals[-1]['eval/loss']:.4f}" in card
    assert "step 1 | eval after   0/5 updates | loss 0.6931 | margin 0.0000 | acc 0.00" in stderr
    assert (run / "reports" / "loss.png").stat().st_size > 0


def test_the_eval_metrics_agree_with_gamma_and_reflogp(held_out_run):
    """eval/gamma/ref is the held-out pairs' mean γ under the step's reference (reflogp/eval-step-t); the end's
    eval/gamma/policy is M_t's mean γ on them, as `sdpo gamma --data eval-step-t` computes it."""
    config, run, _ = held_out_run
    result = sdpo("gamma", str(config), *HELD_OUT, "--data", "eval-step-2", "-c", "step-1", "-c", "step-2", "--json")
    gammas = {r["checkpoint"]: r for r in json.loads(result.stdout)}
    evals = [r for r in read_log(run / "logs" / "train-step-2.jsonl") if "eval/loss" in r]
    reflogp = json.loads((run / "reflogp" / "eval-step-2" / "meta.json").read_text())
    assert gammas["step-1"]["mean"] == pytest.approx(reflogp["gamma_ref_mean"], abs=1e-9)  # reused, not recomputed
    assert evals[0]["eval/gamma/ref"] == pytest.approx(reflogp["gamma_ref_mean"], abs=1e-5)
    assert evals[-1]["eval/gamma/policy"] == pytest.approx(gammas["step-2"]["mean"], abs=1e-4)
    assert gammas["step-2"]["n"] == evals[-1]["eval/pairs"] == 4


def with_data_eval(tmp_path: Path, model: Path) -> Path:
    """write_config's config with data.eval = 5 pairs of its own (held.jsonl)."""
    config = write_config(tmp_path, model)
    cfg = yaml.safe_load(config.read_text())
    cfg["data"]["eval"] = {"name": "held", "path": str(write_jsonl(tmp_path / "held.jsonl", tiny_pairs(5, seed=9)))}
    config.write_text(yaml.safe_dump(cfg))
    return config


def test_data_eval_serves_every_step_under_its_own_reference(tmp_path, tiny_model_dir):
    config = with_data_eval(tmp_path, tiny_model_dir)
    result = sdpo("run", str(config), "train.max_updates=2")
    assert "held out for eval/* (data.eval, held): read 5, kept 5" in result.stderr
    run = tmp_path / "run"
    refs = [json.loads((run / "reflogp" / f"eval-step-{t}" / "meta.json").read_text()) for t in (1, 2)]
    assert [r["data"] for r in refs] == ["data/eval", "data/eval"] and refs[0]["reference"] != refs[1]["reference"]
    for t in (1, 2):
        evals = [r for r in read_log(run / "logs" / f"train-step-{t}.jsonl") if "eval/loss" in r]
        assert [r["update"] for r in evals] == [0, 2] and evals[0]["eval/pairs"] == 5
        assert evals[0]["eval/loss"] == pytest.approx(math.log(2), abs=1e-4)


def test_a_step_resumed_after_a_kill_logs_the_uninterrupted_eval_records(held_out_run, tmp_path):
    config, run, _ = held_out_run
    want = read_log(run / "logs" / "train-step-1.jsonl")
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "checkpoints")
    (copy / "logs" / "train-step-1.jsonl").unlink()
    args = ["train", "--step", "1", str(config), f"run_dir={copy}", *HELD_OUT, "train.save_every=2"]
    killed = sdpo_with(BATCHES, *args, env={"SDPO_KILL_AT_BATCH": "5"})  # in update 4: the state after 4 is saved
    assert killed.returncode == 9, killed.stderr
    result = run_in_process(*args)
    assert result.returncode == 0 and "resuming after update 3" in result.stderr, result.stderr
    same_records(read_log(copy / "logs" / "train-step-1.jsonl"), want)


@pytest.mark.parametrize("overrides, message", [
    (["split.eval_fraction=1.0"], "split.eval_fraction: 1.0 must be in [0, 1)"),
    (["train.eval_every=-1"], "train.eval_every: must be 0 (start and end only) or positive"),
])
def test_bad_held_out_settings_are_config_errors(tmp_path, tiny_model_dir, overrides, message):
    config = write_config(tmp_path, tiny_model_dir)
    result = run_in_process("split", str(config), *overrides)
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_data_eval_and_eval_fraction_together_are_a_config_error(tmp_path, tiny_model_dir):
    config = with_data_eval(tmp_path, tiny_model_dir)
    result = run_in_process("split", str(config), "split.eval_fraction=0.1")
    assert result.returncode == 2 and "and data.eval both name held-out pairs" in result.stderr, result.stderr
