"""The rough edges a new user hit (issue 13, point 9), each through real runs on the tiny model:

* `sdpo gamma` marks a stale checkpoint (trained from an earlier M_{t-1}, or with other settings) in its table, JSON
  and plot, and says why on stderr, instead of mixing it in silently;
* gamma.png: the x-label, the legend of the colours, the ± std whiskers and the hatching of a stale bar;
* `sdpo eval`: a task defined by a YAML file or folder listed in eval.tasks is addressable by its name, as lm-eval's
  --include_path makes it;
* progress written to a log file (not a terminal) carries the elapsed time and the ETA, at SDPO_PROGRESS_EVERY;
* no bitsandbytes `kernels` notice on a full fine-tune.

The README's `make demo` table is compared with what the demo prints in tests/test_demo.py.
"""

from __future__ import annotations

import io
import json
import logging
import time
from pathlib import Path

import pytest
import yaml

from sdpo_cli.context import LogProgress, progress_every
from tests.conftest import run_cli
from tests.test_train_options import sdpo, write_config

QUICK = ["train.max_updates=2", "train.logging_every=1"]


# ------------------------------------------------------------------------------------------ gamma: stale checkpoints


@pytest.fixture(scope="module")
def retrained(tmp_path_factory, tiny_model_dir) -> tuple[Path, Path]:
    """Two steps trained, then M_1 trained again with another learning rate (after M_2 was written): M_2 was trained
    from an earlier M_1. Returns (config, run dir)."""
    folder = tmp_path_factory.mktemp("stale")
    config = write_config(folder, tiny_model_dir)
    sdpo("run", str(config), *QUICK)
    time.sleep(1.1)  # meta.json's `created` counts seconds: M_1 must be written in a later second than M_2
    sdpo("train", "--step", "1", "--force", str(config), *QUICK, "train.learning_rate=2e-3")
    return config, folder / "run"


def test_gamma_marks_a_checkpoint_trained_from_an_earlier_m1(retrained, tmp_path):
    config, run = retrained
    plot = tmp_path / "gamma.png"
    result = sdpo("gamma", str(config), *QUICK, "train.learning_rate=2e-3", "--json", "--plot", str(plot))
    rows = {r["checkpoint"]: r for r in json.loads(result.stdout)}
    assert [rows[c]["stale"] for c in ("base", "step-1", "step-2")] == [False, False, True]
    assert "stale_reason" not in rows["step-1"]
    assert rows["step-2"]["stale_reason"] == \
        "it was trained from an earlier M_1 (checkpoints/step-1 was written after it)"
    warnings = [line for line in result.stderr.splitlines() if line.startswith("Warning:")]
    assert warnings == ["Warning: gamma: checkpoints/step-2 is stale: it was trained from an earlier M_1 "
                        "(checkpoints/step-1 was written after it); its result is marked stale"]
    assert json.loads((run / "reports" / "gamma.json").read_text()) == list(rows.values())
    assert plot.stat().st_size > 0

    table = sdpo("gamma", str(config), *QUICK, "train.learning_rate=2e-3").stdout
    names = [line.split("│")[1].strip() for line in table.splitlines() if line.startswith("│")]
    assert names == ["base", "step-1", "step-2 (stale)"]
    assert "(stale): not what this config gives; see the warning on stderr" in table


def test_gamma_names_the_changed_setting_and_leaves_current_checkpoints_unmarked(retrained):
    config, _ = retrained
    # the config M_2 was trained with: now M_1 (trained with 2e-3) is the stale one, and M_2 still builds on it
    rows = {r["checkpoint"]: r for r in json.loads(sdpo("gamma", str(config), *QUICK, "--json").stdout)}
    assert rows["base"]["stale"] is False and rows["step-1"]["stale"] and rows["step-2"]["stale"]
    assert rows["step-1"]["stale_reason"] == \
        "it was trained from another configuration or other inputs (train.learning_rate 0.002 → 0.001)"
    # asked for by name, without the stale one: nothing is marked, nothing is warned about
    result = sdpo("gamma", str(config), *QUICK, "train.learning_rate=2e-3", "-c", "base", "-c", "step-1", "--json")
    assert [r["stale"] for r in json.loads(result.stdout)] == [False, False]
    assert "Warning" not in result.stderr


def test_gamma_plot_explains_colours_whiskers_and_stale_bars(monkeypatch, tmp_path):
    from sdpo_cli import reports

    figures = []
    real_save = reports._save

    def keep(fig, path):
        figures.append(fig)
        return real_save(fig, path)

    monkeypatch.setattr(reports, "_save", keep)
    row = {"data": "step-2", "n": 10, "std": 1.0, "median": 0.0, "frac_positive": 0.5}
    results = [{**row, "checkpoint": "base", "mean": -2.0, "stale": False},
               {**row, "checkpoint": "step-1", "mean": 3.0, "stale": False},
               {**row, "checkpoint": "step-2", "mean": 9.0, "stale": True, "stale_reason": "…"},
               {**row, "checkpoint": str(tmp_path / "other"), "mean": 1.0}]
    path = reports.plot_gamma(results, tmp_path / "g.png")
    assert path.stat().st_size > 0
    [fig] = figures
    [ax] = fig.axes
    assert ax.get_xlabel() == "checkpoint"
    assert ax.get_ylabel() == "mean γ = log π(chosen) − log π(rejected)"
    [legend] = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == [
        "base = S (SFT model)", "step-1 = M_1", "step-2 = M_2", "another model folder", "± std of γ over the pairs",
        "stale: not what this config gives"]
    bars = ax.patches
    assert [b.get_hatch() for b in bars] == [None, None, "//", None]
    assert bars[0].get_facecolor() != bars[1].get_facecolor() != bars[2].get_facecolor()
    assert [t.get_text() for t in ax.get_xticklabels()][:3] == ["base", "step-1", "step-2\n(stale)"]


# ------------------------------------------------------------------------------ eval: task names by include path


def _eval_config(folder: Path, model: Path, tasks: list[str]) -> Path:
    config = write_config(folder, model)
    spec = yaml.safe_load(config.read_text())
    spec["eval"] = {"tasks": tasks, "batch_size": 8}
    config.write_text(yaml.safe_dump(spec))
    return config


def test_eval_names_a_task_that_a_file_in_eval_tasks_defines(tmp_path, tiny_model_dir):
    pytest.importorskip("lm_eval")
    from tests.test_eval import write_color_task

    write_color_task(tmp_path / "my" / "tasks", name="pets_task")
    config = _eval_config(tmp_path, tiny_model_dir, ["my/tasks/pets_task.yaml"])  # relative to the config's folder

    result = sdpo("eval", str(config), "--tasks", "pets_task", "--limit", "2", "--json")
    report = json.loads(result.stdout)
    assert [(t["task"], t["spec"]) for t in report["tasks"]] == [("pets_task", "pets_task")]
    cell = report["checkpoints"][0]["tasks"]["pets_task"]
    assert (cell["n"], cell["shots"]) == (2, 2) and 0 <= cell["score"] <= 1
    assert "indexed lm-eval's tasks" not in result.stderr  # found in the listed file: lm-eval's own index not needed

    # by path, the same computation: the score comes from the cache
    by_path = sdpo("eval", str(config), "--limit", "2", "--json")
    assert json.loads(by_path.stdout)["checkpoints"][0]["tasks"]["pets_task"]["cached"] is True


def test_eval_names_a_task_that_a_folder_in_eval_tasks_defines(tmp_path, tiny_model_dir):
    pytest.importorskip("lm_eval")
    from sdpo_cli.config import load_config
    from sdpo_cli.evaluate import Evaluator
    from tests.test_eval import write_color_task

    folder = tmp_path / "suite"
    write_color_task(folder / "a", name="colors_a")
    write_color_task(folder / "b", name="colors_b")
    (folder / "b" / "utils.yaml").write_text("include: colors_b.yaml\ntask: colors_c\n")  # a name from another file
    cfg = load_config(_eval_config(tmp_path, tiny_model_dir, ["./suite"]))

    evaluator = Evaluator(cfg, ["colors_b:1", "colors_c"])
    assert [(t.name, t.spec, t.shots) for t in evaluator.tasks] == [("colors_b", "colors_b:1", 1),
                                                                     ("colors_c", "colors_c", None)]
    assert [t.name for t in Evaluator(cfg).tasks] == ["colors_a", "colors_b", "colors_c"]  # the folder itself


def test_defined_name_follows_includes_and_ignores_function_tags(tmp_path):
    pytest.importorskip("lm_eval")
    from sdpo_cli.harness import defined_name

    (tmp_path / "base.yaml").write_text("task: base_task\nprocess_docs: !function utils.process\n")
    (tmp_path / "child.yaml").write_text("include: base.yaml\ndataset_path: json\n")
    (tmp_path / "group.yaml").write_text("group: my_group\ntask: [base_task]\n")
    (tmp_path / "notes.yaml").write_text("title: not a task\n")
    assert [defined_name(tmp_path / f"{n}.yaml") for n in ("base", "child", "group", "notes", "missing")] == \
        ["base_task", "base_task", "my_group", None, None]


# ------------------------------------------------------------------------------------- progress in a log file


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_log_progress_lines_carry_elapsed_and_eta_at_a_sensible_rate():
    from rich.console import Console

    out, clock = io.StringIO(), Clock()
    progress = LogProgress(Console(file=out, width=200), every=30, clock=clock)
    with progress as bar:
        task = bar.add_task("train step 1", total=36, completed=0, status="")
        for update in range(1, 37):
            clock.now += 2.5  # 90 s in all: a line every 30 s at most, and the closing one
            if update % 4 == 0:
                bar.update(task, status=f"loss {1 / update:.4f}")
            bar.update(task, completed=update)
        quick = bar.add_task("γ base on step-2", total=152, status="")
        clock.now += 5
        bar.advance(quick, 152)  # 5 s: shorter than one interval, no line at all
    assert out.getvalue().splitlines() == [
        "train step 1: 12/36 updates, loss 0.0833, 0:00:30 elapsed, ETA 0:01:00",
        "train step 1: 24/36 updates, loss 0.0417, 0:01:00 elapsed, ETA 0:00:30",
        "train step 1: 36/36 updates, loss 0.0278, done in 0:01:30"]

    # a resumed step: the ETA comes from this process's own pace, not from the updates done before
    out, clock = io.StringIO(), Clock()
    with LogProgress(Console(file=out, width=200), every=10, clock=clock) as bar:
        task = bar.add_task("train step 2", total=40, completed=30, status="")
        clock.now += 10
        bar.update(task, completed=35)
    assert out.getvalue() == "train step 2: 35/40 updates, 0:00:10 elapsed, ETA 0:00:10\n"

    assert progress_every({}) == 30 and progress_every({"SDPO_PROGRESS_EVERY": "5"}) == 5
    assert progress_every({"SDPO_PROGRESS_EVERY": "often"}) == 30  # never stops a run


def test_train_in_a_log_file_prints_progress_and_no_bitsandbytes_notice(tmp_path, tiny_model_dir):
    """One real `sdpo run` in a fresh interpreter (bitsandbytes is imported once per process), stderr to a pipe."""
    config = write_config(tmp_path, tiny_model_dir)
    result = run_cli("run", str(config), "train.max_updates=3", env={"SDPO_PROGRESS_EVERY": "0",
                                                                      "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("train step 1: ") and "/3 updates" in line]
    assert [line.split(",")[0] for line in lines] == ["train step 1: 1/3 updates", "train step 1: 2/3 updates",
                                                      "train step 1: 3/3 updates"]
    assert all(" elapsed, ETA " in line for line in lines[:2]) and " done in 0:00:" in lines[2]
    assert "reflogp step 1: 16/16 pairs, done in" in result.stderr
    assert "gemm_4bit" not in result.stderr and "kernels" not in result.stderr


def test_only_the_kernels_notice_of_bitsandbytes_is_dropped(caplog):
    import sdpo_cli.models  # noqa: F401  (installs the filter)

    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING):
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you "
                       "already `pip install kernels` and the kernels >= 0.11.1", "No module named 'kernels'")
        logger.warning("a real bitsandbytes problem")
    assert [r.getMessage() for r in caplog.records] == ["a real bitsandbytes problem"]
