"""`sdpo eval` through lm-evaluation-harness, offline: a real multiple-choice task from local rows on stories260K
through the CLI (table, JSON, the context-overflow count, the cache), the four real H4 task configs on stand-in
rows (task names, shots, metric keys), `sdpo run` with eval.after_each_step, and the errors: no lm-eval, an
unreachable dataset (before any model loads), bad eval keys."""

from __future__ import annotations

import contextlib
import io
import json
import sys
import time
from pathlib import Path

import pytest
import yaml

from sdpo_cli.config import load_config
from sdpo_cli.errors import ConfigError, DataError
from tests.conftest import run_cli, tiny_pairs, write_jsonl

COLORS = ["red", "blue", "green", "yellow"]


def write_color_task(folder: Path, long_rows: tuple[int, ...] = (), name: str = "tiny_colors") -> Path:
    """An ARC-style multiple-choice task from local JSONL: 5 few-shot rows, 15 scored; rows in `long_rows` repeat
    their question 60 times (~900 tokens, beyond stories260K's 512)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"id": f"q{i}", "question": f"Lily saw a {COLORS[i % 4]} ball. What color was it?"
             * (60 if i in long_rows else 1), "choices": {"text": COLORS, "label": list("ABCD")},
             "answerKey": "ABCD"[i % 4]} for i in range(20)]
    write_jsonl(folder / "train.jsonl", rows[:5])
    write_jsonl(folder / "test.jsonl", rows[5:])
    task = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"train": str(folder / "train.jsonl"), "test": str(folder / "test.jsonl")},
                           "cache_dir": str(folder / "hf_cache")},
        "output_type": "multiple_choice",
        "training_split": "train", "test_split": "test", "fewshot_split": "train",
        "num_fewshot": 2,
        "doc_to_text": "Question: {{question}}\nAnswer:",
        "doc_to_target": "{{choices.label.index(answerKey)}}",
        "doc_to_choice": "{{choices.text}}",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(task))
    return path


def write_config(folder: Path, model: Path, **eval_section) -> Path:
    write_jsonl(folder / "a.jsonl", tiny_pairs(8))
    config = folder / "config.yaml"
    config.write_text(yaml.safe_dump({
        "run_dir": str(folder / "run"), "model": {"base": str(model)},
        "data": {"sources": [{"name": "a", "path": "a.jsonl"}], "max_length": 64},
        "eval": eval_section,
    }))
    return config


@pytest.mark.slow
def test_eval_cli_scores_a_local_task_table_json_and_cache(tmp_path, stories_dir, monkeypatch, capsys):
    pytest.importorskip("lm_eval")
    from sdpo_cli import cli, evaluate

    write_color_task(tmp_path / "tasks", long_rows=(7, 9))
    config = write_config(tmp_path, stories_dir, tasks=["tasks/tiny_colors.yaml"], batch_size=8)
    assert load_config(config).eval.tasks == [str(tmp_path / "tasks" / "tiny_colors.yaml")]  # config-relative

    result = run_cli("eval", str(config), "--limit", "10")
    assert result.returncode == 0, result.stderr
    assert "Benchmark (lm-eval 0.4.13, limit 10)" in result.stdout
    assert "checkpoint" in result.stdout and "tiny_colors" in result.stdout and "base" in result.stdout
    assert "* some prompts were longer than the model's context" in result.stdout
    assert "Warning: eval: base: tiny_colors: 2 prompts (8 of 40 requests) are longer than the model's context " \
           "of 512 tokens" in result.stderr
    assert "Overwriting" not in result.stderr and "Traceback" not in result.stderr

    report = json.loads((tmp_path / "run" / "reports" / "eval.json").read_text())
    assert report["lm_eval"] == "0.4.13" and report["limit"] == 10 and report["device"] == "cpu"
    assert report["tasks"] == [{"task": "tiny_colors", "spec": str(tmp_path / "tasks" / "tiny_colors.yaml"),
                                "column": "tiny_colors", "shots": None, "metric": None, "h4": False}]
    [row] = report["checkpoints"]
    assert row["checkpoint"] == "base" and row["model"] == str(stories_dir) and row["h4"] is None
    cell = row["tasks"]["tiny_colors"]
    assert set(cell["metrics"]) == {"acc,none", "acc_norm,none"} and cell["metric"] == "acc,none"
    assert cell["score"] == cell["metrics"]["acc,none"] and 0 <= cell["score"] <= 1
    assert f"{100 * cell['score']:.2f}*" in result.stdout  # percent, as the paper's Table 2, marked as cut
    assert (cell["shots"], cell["version"], cell["n"]) == (2, 1.0, 10)
    assert (cell["requests"], cell["truncated_requests"], cell["truncated_prompts"], cell["max_length"]) == \
        (40, 8, 2, 512)
    assert cell["cached"] is False
    assert (tmp_path / "run" / "cache" / "eval" / f"{cell['fingerprint']}.json").is_file()

    # Again, in-process (no second interpreter start): from the cache, no model loaded, the same JSON on stdout.
    # cli.main() builds its run context now, so its stdout console writes to the sys.stdout of this moment.
    monkeypatch.setattr(evaluate, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    monkeypatch.setattr(sys, "argv", ["sdpo", "eval", str(config), "--limit", "10", "--json", "--checkpoint", "base"])
    stdout = io.StringIO()
    with pytest.raises(SystemExit) as done, contextlib.redirect_stdout(stdout):
        cli.main()
    assert done.value.code == 0 and "every task already scored" in capsys.readouterr().err
    out = json.loads(stdout.getvalue())
    assert out["checkpoints"][0]["tasks"]["tiny_colors"] == {**cell, "cached": True}
    assert json.loads((tmp_path / "run" / "reports" / "eval.json").read_text()) == out


# Stand-in rows in each H4 dataset's real schema (research/lm-eval.md §3.3); pools large enough for the shots.
def _arc(i):
    return {"id": f"arc{i}", "question": f"Which color is the sky on day {i}?",
            "choices": {"text": COLORS, "label": list("ABCD")}, "answerKey": "B"}


def _hellaswag(i):
    return {"ind": i, "activity_label": "Playing", "ctx_a": "A girl throws a ball.", "ctx_b": "she",
            "ctx": "A girl throws a ball. she", "endings": ["catches it.", "eats it.", "sings.", "flies away."],
            "source_id": f"s{i}", "split": "train", "split_type": "indomain", "label": "0"}


def _mmlu(i):
    return {"question": f"What is {i} plus 1?", "subject": "x", "choices": [str(i + 1), "0", "7", "9"], "answer": 0}


def _truthfulqa(i):
    return {"question": f"Is the moon made of cheese ({i})?",
            "mc1_targets": {"choices": ["No.", "Yes."], "labels": [1, 0]},
            "mc2_targets": {"choices": ["No.", "It is rock.", "Yes."], "labels": [1, 1, 0]}}


@pytest.mark.slow
def test_h4_real_task_configs_on_stand_in_rows(tmp_path, stories_dir, monkeypatch):
    pytest.importorskip("lm_eval")
    import datasets

    from sdpo_cli.evaluate import H4, eval_table, run_eval

    def split(name, make, n):
        return str(write_jsonl(tmp_path / f"{name}.jsonl", [make(i) for i in range(n)]))

    files = {
        "allenai/ai2_arc": {"train": split("arc-train", _arc, 26), "test": split("arc-test", _arc, 3)},
        "Rowan/hellaswag": {"train": split("hs-train", _hellaswag, 12), "validation": split("hs-val", _hellaswag, 3)},
        "cais/mmlu": {"dev": split("mmlu-dev", _mmlu, 5), "test": split("mmlu-test", _mmlu, 3)},
        "cais/mmlu anatomy": {"dev": split("mmlu-dev", _mmlu, 5), "test": split("mmlu-test-1", _mmlu, 1)},
        "truthfulqa/truthful_qa": {"validation": split("tqa-val", _truthfulqa, 3)},
    }
    asked = []
    real_load_dataset = datasets.load_dataset

    def load_dataset(path, name=None, **kwargs):  # what lm-eval's Task.download calls
        asked.append((path, name))
        key = f"{path} {name}" if f"{path} {name}" in files else path  # one MMLU subject is smaller than the rest
        return real_load_dataset("json", data_files=files[key], cache_dir=str(tmp_path / "hf_cache"))

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    cfg = load_config(write_config(tmp_path, stories_dir, batch_size=16))
    assert cfg.eval.tasks == ["h4"]  # the default

    report = run_eval(cfg, ["base"], limit=2)

    assert {p for p, _ in asked} == {"allenai/ai2_arc", "Rowan/hellaswag", "cais/mmlu", "truthfulqa/truthful_qa"}
    assert ("allenai/ai2_arc", "ARC-Challenge") in asked and ("truthfulqa/truthful_qa", "multiple_choice") in asked
    assert len({n for p, n in asked if p == "cais/mmlu"}) == 57
    assert [(t["task"], t["column"], t["shots"], t["metric"], t["h4"]) for t in report["tasks"]] == [
        ("arc_challenge", "ARC", 25, "acc_norm,none", True), ("hellaswag", "HellaSwag", 10, "acc_norm,none", True),
        ("mmlu", "MMLU", 5, "acc,none", True), ("truthfulqa_mc2", "TruthfulQA", 0, "acc,none", True)]
    cells = report["checkpoints"][0]["tasks"]
    for t in H4:
        assert cells[t.task]["shots"] == t.shots  # lm-eval's own n-shot record
    assert set(cells["arc_challenge"]["metrics"]) == {"acc,none", "acc_norm,none"}
    assert cells["arc_challenge"]["score"] == cells["arc_challenge"]["metrics"]["acc_norm,none"]
    assert cells["hellaswag"]["score"] == cells["hellaswag"]["metrics"]["acc_norm,none"]
    assert set(cells["truthfulqa_mc2"]["metrics"]) == {"acc,none"}  # mc2 is lm-eval 0.4's acc of truthfulqa_mc2
    assert (cells["arc_challenge"]["version"], cells["hellaswag"]["version"], cells["truthfulqa_mc2"]["version"],
            cells["mmlu"]["version"]) == (1.0, 1.0, 3.0, "2")
    mmlu = cells["mmlu"]
    assert len(mmlu["subtasks"]) == 57 and mmlu["n"] == 56 * 2 + 1 and mmlu["subtasks"]["mmlu_anatomy"]["n"] == 1
    subjects = mmlu["subtasks"].values()
    assert mmlu["acc_weighted"] == mmlu["metrics"]["acc,none"] == pytest.approx(  # lm-eval's, weighted by size
        sum(c["acc,none"] * c["n"] for c in subjects) / mmlu["n"])
    assert mmlu["score"] == mmlu["acc_subject_mean"] == pytest.approx(  # the leaderboard's plain mean
        sum(c["acc,none"] for c in subjects) / 57)
    assert (cells["arc_challenge"]["n"], cells["hellaswag"]["n"], cells["truthfulqa_mc2"]["n"]) == (2, 2, 2)
    assert cells["arc_challenge"]["truncated_prompts"] == 2  # 25 shots do not fit stories260K's 512 tokens
    h4 = report["checkpoints"][0]["h4"]
    assert h4 == pytest.approx(sum(cells[t.task]["score"] for t in H4) / 4)

    from rich.console import Console

    screen = Console(width=120, record=True, file=io.StringIO())
    screen.print(eval_table(report))
    table = screen.export_text()
    header = next(line for line in table.splitlines() if "checkpoint" in line)
    assert [c.strip() for c in header.strip("┃│ ").split("┃")] == ["checkpoint", "H4", "ARC", "HellaSwag", "MMLU",
                                                                   "TruthfulQA"]
    assert f"{100 * h4:.2f}" in table and "H4 benchmark (lm-eval 0.4.13, limit 2)" in table


@pytest.mark.slow
def test_run_evaluates_each_step_once(tiny_config, tmp_path, capsys):
    pytest.importorskip("lm_eval")
    task = write_color_task(tmp_path / "tasks")
    config, run = tiny_config(**{"eval.tasks": [f"{task}:1"], "eval.limit": 4, "eval.after_each_step": True})
    result = run_cli("run", str(config))
    assert result.returncode == 0, result.stderr
    report = json.loads((run / "reports" / "eval.json").read_text())
    assert [r["checkpoint"] for r in report["checkpoints"]] == ["base", "step-1", "step-2"]
    cells = [r["tasks"]["tiny_colors"] for r in report["checkpoints"]]
    assert [c["cached"] for c in cells] == [True, True, False]  # base and M_1 were scored after step 1
    assert all(c["shots"] == 1 and c["n"] == 4 for c in cells)
    assert report["tasks"][0]["column"] == "tiny_colors (1-shot)"
    assert len(list((run / "cache" / "eval").iterdir())) == 3
    assert result.stderr.count("tiny_colors acc,none =") == 3

    from sdpo_cli.pipeline import run_all

    run_all(load_config(config))  # again, in-process: every stage and every score is found finished
    err = capsys.readouterr().err
    assert "acc,none =" not in err and err.count("every task already scored") == 5  # after step 1: 2, step 2: 3
    assert [r["tasks"]["tiny_colors"]["score"] for r in
            json.loads((run / "reports" / "eval.json").read_text())["checkpoints"]] == [c["score"] for c in cells]


def test_without_lm_eval_exit_2_with_install_hint(tiny_config, monkeypatch, capsys):
    from sdpo_cli import cli

    config, _ = tiny_config()
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now fails as if it were not installed
    monkeypatch.delitem(sys.modules, "sdpo_cli.harness", raising=False)  # (re)imported on first use: it imports lm_eval
    monkeypatch.setattr(sys, "argv", ["sdpo", "eval", str(config)])
    monkeypatch.delenv("SDPO_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert lines[0].startswith("Error: sdpo eval needs lm-evaluation-harness, which is not installed")
    assert lines[1] == "Hint: pip install 'sdpo[eval]'  # lm-eval==0.4.13"
    assert "Traceback" not in err


def test_unreachable_dataset_fails_before_any_model_loads(tiny_config, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    from sdpo_cli import evaluate

    task = write_color_task(tmp_path / "tasks")
    spec = yaml.safe_load(task.read_text())
    spec.update(task="hub_only", dataset_path="sdpo-tests/no-such-dataset", dataset_kwargs={})
    (tmp_path / "tasks" / "hub_only.yaml").write_text(yaml.safe_dump(spec))
    config, _ = tiny_config(**{"eval.tasks": [str(task), str(tmp_path / "tasks" / "hub_only.yaml")]})
    monkeypatch.setattr(evaluate, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.time()
    with pytest.raises(DataError) as error:
        evaluate.run_eval(load_config(config))
    assert time.time() - started < 20  # no download retries
    assert "eval task" in error.value.message and "hub_only.yaml" in error.value.message
    assert "sdpo-tests/no-such-dataset" in error.value.message
    assert "HF_HUB_OFFLINE is set" in error.value.hint and "local task YAMLs" in error.value.hint
    assert error.value.exit_code == 2


def test_eval_config_keys_are_checked(tiny_config, tmp_path):
    config, _ = tiny_config()
    cfg = load_config(config)
    assert (cfg.eval.tasks, cfg.eval.limit, cfg.eval.batch_size, cfg.eval.after_each_step) == (["h4"], None, 8, False)
    for override, message in (("eval.limit=0", "eval.limit: must be at least 1"),
                              ("eval.tasks=[]", "eval.tasks: no tasks"),
                              ("eval.tasks=[h4:5]", "h4 has its own shot counts"),
                              ("eval.batch_size=0", "eval.batch_size: must be at least 1"),
                              ("eval.task=[h4]", "unknown config key 'eval.task'")):
        with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
            load_config(config, [override])
    cfg = load_config(config, ["eval.tasks=[arc_easy:5,./my/task.yaml]"])
    assert cfg.eval.tasks == ["arc_easy:5", "./my/task.yaml"]  # command-line paths: relative to the working dir


def test_missing_task_file_and_folder_without_tasks(tiny_config, tmp_path):
    pytest.importorskip("lm_eval")
    from sdpo_cli.evaluate import run_eval

    config, _ = tiny_config()
    with pytest.raises(ConfigError, match="no such task file or folder"):
        run_eval(load_config(config), tasks=[str(tmp_path / "missing.yaml")])
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "notes.yaml").write_text("title: not a task\n")
    with pytest.raises(ConfigError, match="no lm-eval task YAML in it"):
        run_eval(load_config(config), tasks=[str(folder)])
