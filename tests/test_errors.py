"""User mistakes through the real CLI (a subprocess): exit code 2, an `Error:` line naming the file or key, a `Hint:`
line and no traceback; a traceback only with SDPO_DEBUG=1; and `--help` with an example for every command.

Every mistake here is caught before a model is loaded (config mistakes before the tokenizer too). Each case is one
subprocess; they are started together, a few at a time, so that the file stays fast on a 2-core machine."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from tests.conftest import run_cli, tiny_pairs, write_jsonl


def write_config(folder: Path, model: Path, **extra) -> Path:
    """A valid two-source natural config on the tiny model (as conftest's tiny_config), with dotted-key changes."""
    folder.mkdir(parents=True, exist_ok=True)
    a = write_jsonl(folder / "a.jsonl", tiny_pairs(8, seed=1))
    b = write_jsonl(folder / "b.jsonl", tiny_pairs(8, seed=2))
    cfg = {"run_dir": str(folder / "run"), "model": {"base": str(model)},
           "data": {"sources": [{"name": "a", "path": str(a)}, {"name": "b", "path": str(b)}], "max_length": 64},
           "split": {"strategy": "natural"}}
    for key, value in extra.items():
        node = cfg
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# Each case: (folder, tiny model dir) -> (CLI arguments, strings the Error line must contain, text the hint must hold).


def unknown_key_in_yaml(d: Path, model: Path):
    path = write_config(d, model, **{"dpo.betta": 0.2})
    return ["split", str(path)], [str(path), "unknown config key 'dpo.betta'"], "did you mean: 'beta'?"


def unknown_key_in_a_source(d: Path, model: Path):
    path = write_config(d, model, **{"data.sources": [{"name": "a", "path": str(d / "a.jsonl"), "fromat": "orca"}]})
    return ["split", str(path)], [str(path), "unknown config key 'data.sources[].fromat'"], "did you mean: 'format'?"


def unknown_key_as_override(d: Path, model: Path):
    path = write_config(d, model)
    return (["split", str(path), "dpo.betta=0.2"],
            ["override 'dpo.betta=0.2'", "unknown config key 'dpo.betta'"], "did you mean: 'beta'?")


def bad_override_syntax(d: Path, model: Path):
    path = write_config(d, model)
    return ["split", str(path), "dpo.beta"], ["override 'dpo.beta' is not key=value"], "dpo.beta=0.2"


def missing_config_file(d: Path, model: Path):
    return ["split", str(d / "nowhere.yaml")], [str(d / "nowhere.yaml"), "config file not found"], ""


def unknown_format_value(d: Path, model: Path):
    path = write_config(d, model)
    return (["split", str(path), "data.sources.1.format=fancy"],
            [str(path), "data.sources.1.format", "unknown format 'fancy'"], "orca")


def fractions_not_summing_to_one(d: Path, model: Path):
    path = write_config(d, model, **{"split.strategy": "random", "split.fractions": [0.5, 0.3]})
    return ["run", str(path)], [str(path), "split.fractions", "[0.5, 0.3] must be positive and sum to 1"], ""


def natural_split_unknown_source(d: Path, model: Path):
    path = write_config(d, model, **{"split.steps": [["a"], ["c"]]})
    return ["split", str(path)], [str(path), "split.steps", "step 2 names unknown source 'c'"], "known sources"


def missing_data_file(d: Path, model: Path):
    path = write_config(d, model, **{"data.sources": [{"name": "a", "path": str(d / "absent.jsonl")}]})
    return ["split", str(path)], [str(d / "absent.jsonl"), "data file not found (source 'a')"], "data.sources"


def malformed_json_line(d: Path, model: Path):
    path = write_config(d, model)
    lines = [json.dumps(r) for r in tiny_pairs(4)]
    lines[2] = lines[2][:-1]  # line 3 loses its closing brace
    (d / "b.jsonl").write_text("\n".join(lines) + "\n")
    return ["split", str(path)], [f"{d / 'b.jsonl'}:3:", "malformed JSON"], "one JSON object"


def missing_columns(d: Path, model: Path):
    path = write_config(d, model, **{"data.sources": [{"name": "a", "path": str(d / "a.jsonl"), "format": "orca"}]})
    write_jsonl(d / "a.jsonl", [{k: v for k, v in r.items() if k != "rejected"} for r in tiny_pairs(4)])
    return (["split", str(path)], [str(d / "a.jsonl"), "missing column(s) ['rejected'] for format 'orca'"],
            "format: columns")


CASES = [unknown_key_in_yaml, unknown_key_in_a_source, unknown_key_as_override, bad_override_syntax,
         missing_config_file, unknown_format_value, fractions_not_summing_to_one, natural_split_unknown_source,
         missing_data_file, malformed_json_line, missing_columns]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory, tiny_model_dir) -> dict:
    root = tmp_path_factory.mktemp("errors")
    cases = {case.__name__: case(root / case.__name__, tiny_model_dir) for case in CASES}
    with ThreadPoolExecutor(max_workers=3) as pool:
        runs = {name: pool.submit(run_cli, *args) for name, (args, _, _) in cases.items()}
        return {name: (runs[name].result(), *cases[name][1:], root / name) for name in cases}


@pytest.mark.parametrize("case", [case.__name__ for case in CASES])
def test_user_error(outcomes, case):
    result, names, hint, folder = outcomes[case]
    lines = result.stderr.splitlines()
    errors = [line for line in lines if line.startswith("Error:")]
    hints = [line for line in lines if line.startswith("Hint:")]
    assert result.returncode == 2, result.stderr
    assert len(errors) == 1 and len(hints) == 1, result.stderr
    for name in names:
        assert name in errors[0], (name, errors[0])
    assert hint in hints[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert not (folder / "run" / "data").exists()  # nothing half-written


def test_debug_shows_the_traceback(tmp_path, tiny_model_dir):
    path = write_config(tmp_path, tiny_model_dir)
    result = run_cli("split", str(path), "dpo.betta=0.2", env={"SDPO_DEBUG": "1"})
    assert result.returncode != 0
    assert "Traceback (most recent call last)" in result.stderr
    assert "sdpo_cli.errors.ConfigError" in result.stderr and "unknown config key 'dpo.betta'" in result.stderr


@pytest.mark.parametrize("command", ["split", "reflogp", "train", "run", "gamma"])
def test_command_help_has_an_example(command):
    result = run_cli(command, "--help")
    assert result.returncode == 0, result.stderr
    assert "Usage:" in result.stdout and "CONFIG" in result.stdout.upper()
    assert f"Example: sdpo {command} configs/fixtures.yaml" in result.stdout


def test_app_help_lists_the_commands():
    result = run_cli("--help")
    assert result.returncode == 0, result.stderr
    assert "Usage:" in result.stdout
    for command in ("split", "reflogp", "train", "run", "gamma"):
        assert f"│ {command} " in result.stdout


def test_app_help_has_an_example():
    assert "Example: sdpo run configs/fixtures.yaml" in run_cli("--help").stdout
