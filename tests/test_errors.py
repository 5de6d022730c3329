"""Bad input through the CLI: for each case of the issue's list (point 4), either exit code 2 (usage, config, data)
or 1 (runtime) with exactly one `Error:` line naming the file and the line or key, one `Hint:` line and no traceback,
nothing half-written; or, where skipping is the documented policy, a split that succeeds and reports every skipped,
truncated or dropped row on stderr and in meta.json. A traceback only with SDPO_DEBUG=1; `--help` has an example for
every command. docs/reliability.md maps each case to its test here.

Every mistake here is caught before a model is loaded (config mistakes before the tokenizer too). The cases run in
this process through `cli.main()`, the console script's entry point (the same parsing, Error/Hint lines and exit
codes; a subprocess would add seconds of imports per case on a 2-core machine); the SDPO_DEBUG test starts the real
script. `--help` of every command: tests/test_help.py."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import yaml

from tests.conftest import run_cli, set_dotted, tiny_pairs, write_jsonl


def run_in_process(*args: str) -> subprocess.CompletedProcess:
    """`sdpo ARGS` through cli.main() in this process: its exit code, stdout and stderr as the script gives them; an
    exception that escapes main() is printed to stderr as a traceback, as Python would, with exit code 1."""
    from sdpo_cli import cli

    out, err, code = io.StringIO(), io.StringIO(), 0
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        mp.setattr(sys, "argv", ["sdpo", *args])
        mp.delenv("SDPO_DEBUG", raising=False)
        for key, value in {"TOKENIZERS_PARALLELISM": "false", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
                           "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}.items():
            mp.setenv(key, value)  # what main() sets, undone afterwards
        try:
            cli.main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:  # a bug: show it as the script would
            traceback.print_exc(file=err)
            code = 1
    return subprocess.CompletedProcess(["sdpo", *args], code, out.getvalue(), err.getvalue())


def write_config(folder: Path, model: Path, **extra) -> Path:
    """A valid two-source natural config on the tiny model (as conftest's tiny_config), with dotted-key changes."""
    folder.mkdir(parents=True, exist_ok=True)
    a = write_jsonl(folder / "a.jsonl", tiny_pairs(8, seed=1))
    b = write_jsonl(folder / "b.jsonl", tiny_pairs(8, seed=2))
    cfg = {"run_dir": str(folder / "run"), "model": {"base": str(model)},
           "data": {"sources": [{"name": "a", "path": str(a)}, {"name": "b", "path": str(b)}], "max_length": 64},
           "split": {"strategy": "natural"}}
    set_dotted(cfg, extra)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# Each case: (folder, tiny model dir) -> (CLI arguments, strings the Error line must contain, text the hint must hold
# [, exit code: 2 unless given]).


def unknown_key_in_yaml(d: Path, model: Path):
    path = write_config(d, model, **{"dpo.betta": 0.2})
    return ["split", str(path)], [str(path), "unknown config key 'dpo.betta'"], "did you mean dpo.beta?"


def unknown_key_in_a_source(d: Path, model: Path):
    path = write_config(d, model, **{"data.sources": [{"name": "a", "path": str(d / "a.jsonl"), "fromat": "orca"}]})
    return (["split", str(path)], [str(path), "unknown config key 'data.sources.0.fromat'"],
            "did you mean data.sources.0.format?")


def unknown_key_as_override(d: Path, model: Path):
    path = write_config(d, model)
    return (["split", str(path), "dpo.betta=0.2"],
            ["override 'dpo.betta=0.2'", "unknown config key 'dpo.betta'"], "did you mean dpo.beta?")


def unknown_chat_template(d: Path, model: Path):
    path = write_config(d, model)
    return (["split", str(path), "model.chat_template=llama"],
            [str(path), "model.chat_template: unknown chat template 'llama'"], "did you mean llama3? use one of solar")


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


def misnamed_columns(d: Path, model: Path):
    path = write_config(d, model)
    write_jsonl(d / "b.jsonl", [{"instruction": r["question"], "good": r["chosen"], "bad": r["rejected"]}
                                for r in tiny_pairs(4)])
    return (["split", str(path)],
            [str(d / "b.jsonl"), "cannot detect the format from columns ['bad', 'good', 'instruction']"],
            "format: columns")


def wrong_type_in_a_row(d: Path, model: Path):
    path = write_config(d, model)
    rows = tiny_pairs(4)
    rows[2]["chosen"] = 5  # line 3: a number where the reply belongs
    write_jsonl(d / "a.jsonl", rows)
    return ["split", str(path)], [f"{d / 'a.jsonl'}:3: chosen: expected a string, got int"], "fix the row"


def wrong_type_in_the_config_file(d: Path, model: Path):
    path = write_config(d, model, **{"data.max_length": "long"})
    return ["split", str(path)], [str(path), "bad value for 'data.max_length'"], "docs/configs.md"


def empty_file(d: Path, model: Path):
    path = write_config(d, model)
    (d / "b.jsonl").write_text("")
    return ["split", str(path)], [str(d / "b.jsonl"), "data file is empty (source 'b')"], "data.sources"


def saved_dataset_dict(d: Path) -> Path:
    """A DatasetDict.save_to_disk folder: 'train' with rows, 'test' with none."""
    import datasets

    rows = tiny_pairs(4)
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                          "test": datasets.Dataset.from_dict({k: [] for k in rows[0]})}).save_to_disk(str(d / "saved"))
    return d / "saved"


def empty_split(d: Path, model: Path):
    path = write_config(d, model, **{"data.sources": [{"name": "a", "path": str(saved_dataset_dict(d)),
                                                      "split": "test"}]})
    return ["split", str(path)], [str(d / "saved"), "split 'test': no rows"], "pick a split that has rows"


def unknown_split(d: Path, model: Path):
    path = write_config(d, model, **{"data.sources": [{"name": "a", "path": str(saved_dataset_dict(d)),
                                                      "split": "validation"}]})
    return (["split", str(path)], [str(d / "saved"), "no split 'validation' (has ['test', 'train'])"],
            "split: one of ['test', 'train']")


def every_row_skipped(d: Path, model: Path):
    path = write_config(d, model)
    write_jsonl(d / "b.jsonl", [{**r, "rejected": r["chosen"]} for r in tiny_pairs(4)])
    return (["split", str(path)],
            [str(d / "b.jsonl"), "source 'b' has no usable rows (skipped: {'chosen identical to rejected': 4})"],
            "skipped on purpose")


def invalid_utf8(d: Path, model: Path):
    path = write_config(d, model)
    lines = [json.dumps(r).encode() for r in tiny_pairs(4)]
    lines[2] = lines[2].replace(b'"chosen": "', b'"chosen": "\xff\xfe')  # line 3: bytes that are not UTF-8
    (d / "b.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return ["split", str(path)], [f"{d / 'b.jsonl'}:3:", "invalid UTF-8"], "re-encode the file as UTF-8"


def invalid_utf8_in_csv(d: Path, model: Path):
    path = write_config(d, model, **{"data.sources": [{"name": "a", "path": str(d / "a.csv")}]})
    lines = [b"question,chosen,rejected"] + [f'"{r["question"]}","{r["chosen"]}","{r["rejected"]}"'.encode()
                                             for r in tiny_pairs(4)]
    lines[3] = lines[3].replace(b'"No', b'"\xe9No').replace(b'"The', b'"\xe9The')  # line 4: a Latin-1 byte
    (d / "a.csv").write_bytes(b"\n".join(lines) + b"\n")
    return ["split", str(path)], [f"{d / 'a.csv'}:4:", "invalid UTF-8"], "re-encode the file as UTF-8"


def json_line_not_an_object(d: Path, model: Path):
    path = write_config(d, model)
    lines = [json.dumps(r) for r in tiny_pairs(4)]
    lines[1] = json.dumps(list(tiny_pairs(1)[0].values()))  # line 2: a list, not an object
    (d / "b.jsonl").write_text("\n".join(lines) + "\n")
    return ["split", str(path)], [f"{d / 'b.jsonl'}:2:", "expected a JSON object, got list"], "one JSON object"


def natural_step_with_no_rows(d: Path, model: Path):
    path = write_config(d, model)
    write_jsonl(d / "b.jsonl", [{**r, "question": "What is this? " * 40} for r in tiny_pairs(4)])
    return (["split", str(path)], [str(path), "split.steps: step 2 has no rows", str(d / "b.jsonl"),
                                   "all 4 pairs of source 'b' have prompts of data.max_length=64 tokens or more"],
            "data.max_prompt_length")


def fractions_leaving_a_step_with_no_rows(d: Path, model: Path):
    path = write_config(d, model, **{"split.strategy": "random", "split.fractions": [0.99, 0.01]})
    return (["split", str(path)], [str(path), "split.fractions: step 2 has no rows (16 pairs cut by [0.99, 0.01])"],
            "larger fractions")


def copy_model(d: Path, model: Path, keep) -> Path:
    folder = d / "model"
    folder.mkdir(parents=True)
    for f in model.iterdir():
        if keep(f.name):
            shutil.copy(f, folder / f.name)
    return folder


def base_model_without_weights(d: Path, model: Path):
    folder = copy_model(d, model, lambda name: not name.endswith(".safetensors"))
    path = write_config(d, folder)
    return (["run", str(path)], [str(folder), "model.base: no model weights (*.safetensors) in this folder"],
            "save_pretrained")


def base_model_without_tokenizer(d: Path, model: Path):
    folder = copy_model(d, model, lambda name: name in ("config.json", "model.safetensors"))
    path = write_config(d, folder)
    return ["run", str(path)], [str(folder), "model.base: no tokenizer in this folder"], "tokenizer.save_pretrained"


def base_model_folder_not_found(d: Path, model: Path):
    path = write_config(d, d / "no-model")
    return ["run", str(path)], [str(d / "no-model"), "model.base: model folder not found"], "model.base"


def unwritable_run_dir(d: Path, model: Path):
    # Tests run as root, where a read-only folder is still writable: a run_dir below a regular file never is.
    path = write_config(d, model)
    (d / "a-file").write_text("not a folder")
    return (["run", str(path), f"run_dir={d / 'a-file' / 'run'}"],
            [str(d / "a-file" / "run"), "run_dir: cannot create the run directory",
             f"{d / 'a-file'} is a file, not a folder"], "run_dir=", 1)


CASES = [unknown_key_in_yaml, unknown_key_in_a_source, unknown_key_as_override, unknown_chat_template,
         bad_override_syntax, missing_config_file, unknown_format_value, fractions_not_summing_to_one,
         natural_split_unknown_source,
         missing_data_file, malformed_json_line, missing_columns, misnamed_columns, wrong_type_in_a_row,
         wrong_type_in_the_config_file, empty_file, empty_split, unknown_split, every_row_skipped, invalid_utf8,
         invalid_utf8_in_csv, json_line_not_an_object, natural_step_with_no_rows,
         fractions_leaving_a_step_with_no_rows, base_model_without_weights, base_model_without_tokenizer,
         base_model_folder_not_found, unwritable_run_dir]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory, tiny_model_dir) -> dict:
    root = tmp_path_factory.mktemp("errors")
    cases = {case.__name__: case(root / case.__name__, tiny_model_dir) for case in CASES}
    from transformers import AutoModelForCausalLM

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the mistake was reported")

    with pytest.MonkeyPatch.context() as mp:  # every mistake must be caught before a model is loaded
        mp.setattr(AutoModelForCausalLM, "from_pretrained", no_model)
        return {name: (run_in_process(*case[0]), case[1], case[2], case[3] if len(case) > 3 else 2, root / name)
                for name, case in cases.items()}


@pytest.mark.parametrize("case", [case.__name__ for case in CASES])
def test_user_error(outcomes, case):
    result, names, hint, code, folder = outcomes[case]
    lines = result.stderr.splitlines()
    errors = [line for line in lines if line.startswith("Error:")]
    hints = [line for line in lines if line.startswith("Hint:")]
    assert result.returncode == code, result.stderr
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


# ---------------------------------------------------------------------------------------------------------------
# Rows skipped or cut by policy (formats.py, tokenize.py): the split succeeds, and `sdpo split` reports each count on
# stderr and in data/step-t/meta.json under "sources". One split of five sources, each with one kind of bad row.


def conversation(question: str, reply: str) -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]


def skip_sources(d: Path) -> dict[str, list[dict]]:
    good = tiny_pairs(4, seed=3)
    uf = [{"prompt": f"Q{i}?", "chosen": conversation(f"Q{i}?", "Right."), "rejected": conversation(f"Q{i}?", "Wrong."),
           "score_chosen": 8.0, "score_rejected": 2.0} for i in range(7)]
    uf[4]["score_chosen"] = float("nan")  # json.dumps writes NaN, as pandas' to_json does not: both are read
    uf[5]["score_rejected"] = None
    del uf[6]["score_chosen"]
    return {
        "empty_strings": good + [{"system": "", "question": "Q?", "chosen": "", "rejected": "No."},
                                 {"system": "", "question": "Q?", "chosen": "Yes.", "rejected": "   "},
                                 {"system": "", "question": "", "chosen": "Yes.", "rejected": "No."}],
        "identical": good + [{"system": "", "question": "Q?", "chosen": "Same.", "rejected": "Same."}] * 2,
        "prompts_differ": [{"chosen": conversation(f"Q{i}?", "Yes."),
                            "rejected": conversation(f"Q{i}?" if i < 4 else "Another question?", "No.")}
                           for i in range(6)],
        "scores": uf,
        "too_long": good + [{"system": "", "question": "Q?", "chosen": "Yes, " * 80, "rejected": "No."},
                            {"system": "", "question": "Why? " * 80, "chosen": "Yes.", "rejected": "No."}],
    }


@pytest.fixture(scope="module")
def skips(tmp_path_factory, tiny_model_dir):
    d = tmp_path_factory.mktemp("skips")
    sources = skip_sources(d)
    for name, rows in sources.items():
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = write_config(d, tiny_model_dir, **{
        "data.sources": [{"name": name, "path": str(d / f"{name}.jsonl")} for name in sources],
        "split.steps": [list(sources)]})
    result = run_in_process("split", str(path))
    assert result.returncode == 0, result.stderr
    meta = json.loads((d / "run" / "data" / "step-1" / "meta.json").read_text())
    return result, meta


def assert_reported(skips, source: str, counts: dict) -> None:
    result, meta = skips
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "Error:" not in result.stderr
    line = next(line for line in result.stderr.splitlines() if line.startswith(f"  {source}: read "))
    plain = {k: counts.pop(k) for k in ("read", "kept", "truncated", "dropped_too_long") if k in counts}
    assert (f"read {plain['read']}, kept {plain['kept']}, truncated {plain.get('truncated', 0)}, "
            f"dropped (too long) {plain.get('dropped_too_long', 0)}") in line, line
    for reason, n in counts.items():
        assert f"'{reason}': {n}" in line, line
    assert meta["sources"][source] == {"truncated": 0, "dropped_too_long": 0, **plain, **counts}


def test_skip_empty_strings(skips):
    assert_reported(skips, "empty_strings", {"read": 7, "kept": 4, "empty chosen or rejected": 2, "empty prompt": 1})


def test_skip_chosen_identical_to_rejected(skips):
    assert_reported(skips, "identical", {"read": 6, "kept": 4, "chosen identical to rejected": 2})


def test_skip_chosen_and_rejected_prompts_that_differ(skips):
    assert_reported(skips, "prompts_differ", {"read": 6, "kept": 4, "chosen and rejected prompts differ": 2})


def test_skip_nan_or_missing_scores(skips):
    assert_reported(skips, "scores", {"read": 7, "kept": 4, "missing or NaN score_chosen": 2,
                                      "missing or NaN score_rejected": 1})


def test_rows_longer_than_max_length_are_truncated_or_dropped(skips):
    # a long reply is cut to fit data.max_length; a prompt that leaves no room for a reply drops the pair
    assert_reported(skips, "too_long", {"read": 6, "kept": 5, "truncated": 1, "dropped_too_long": 1})
    assert skips[1]["rows"] == 4 + 4 + 4 + 4 + 5


# ---------------------------------------------------------------------------------------------------------------
# A full disk, --force, and safe loading.


def test_disk_full_during_a_save_keeps_what_was_finished(tmp_path, tiny_model_dir, monkeypatch):
    """A real full disk cannot be made in a test: save_to_disk is patched to fail with ENOSPC half-way."""
    import errno

    import datasets

    from sdpo_cli.rundir import read_meta

    path = write_config(tmp_path, tiny_model_dir)
    assert run_in_process("split", str(path)).returncode == 0
    data = tmp_path / "run" / "data"
    finished = {p: p.read_text() for p in data.rglob("meta.json")}

    def no_space(self, *args, **kwargs):
        (Path(args[0]) / "data-00000-of-00001.arrow").write_text("half")  # some bytes made it to disk
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(datasets.Dataset, "save_to_disk", no_space)
    result = run_in_process("split", str(path), "--force")
    err = result.stderr
    errors = [line for line in err.splitlines() if line.startswith("Error:")]
    assert result.returncode == 1, err
    assert len(errors) == 1, err
    assert errors[0].startswith(f"Error: disk full while writing {data / 'step-1'} (")  # then the free space
    assert errors[0].endswith("MiB free); nothing finished was lost")
    assert [line for line in err.splitlines() if line.startswith("Hint:")] == [
        "Hint: free some space (or set run_dir on a larger disk), then rerun the same command"]
    assert "Traceback" not in err
    assert {p: p.read_text() for p in data.rglob("meta.json")} == finished  # the finished split is intact
    assert read_meta(data / "step-1")["rows"] == 8
    assert not [p.name for p in data.iterdir() if ".tmp-" in p.name or ".old-" in p.name]  # no temp dir remains


def test_disk_full_reported_by_a_library_without_errno(tmp_path):
    """safetensors and pyarrow report ENOSPC in their own exception types: the message text is enough."""
    from sdpo_cli.errors import SdpoError
    from sdpo_cli.rundir import writing

    target = tmp_path / "checkpoints" / "step-1"
    with pytest.raises(SdpoError) as e:
        with writing(target, {"stage": "test"}):
            raise RuntimeError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No '
                               'space left on device" })')
    assert e.value.exit_code == 1 and f"disk full while writing {target}" in e.value.message
    assert not target.exists() and not list(target.parent.iterdir())


def test_force_redoes_a_finished_stage_and_replaces_it_whole(tmp_path, tiny_model_dir):
    path = write_config(tmp_path, tiny_model_dir)
    step1 = tmp_path / "run" / "data" / "step-1"
    assert run_in_process("split", str(path)).returncode == 0
    first = step1.stat().st_ino
    again = run_in_process("split", str(path))
    assert again.returncode == 0 and "split: finished already" in again.stderr
    assert step1.stat().st_ino == first  # skipped: not rewritten
    forced = run_in_process("split", str(path), "--force")
    assert forced.returncode == 0 and forced.stdout.split() == [str(step1), str(step1.parent / "step-2")]
    assert step1.stat().st_ino != first  # a new folder, renamed into place once complete
    assert not [p.name for p in step1.parent.iterdir() if p.name.startswith(".")]


# ---------------------------------------------------------------------------------------------------------------
# Safe loading: no code runs from a config file or a checkpoint unless the user says so.


def test_yaml_python_tags_are_not_evaluated(tmp_path, tiny_model_dir):
    from sdpo_cli.config import load_config
    from sdpo_cli.errors import ConfigError

    marker = tmp_path / "pwned"
    path = write_config(tmp_path, tiny_model_dir)
    path.write_text(path.read_text() + f"seed: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(path) in e.value.message and "not valid YAML" in e.value.message and e.value.exit_code == 2
    assert not marker.exists()


def test_pickle_weights_and_remote_code_are_off_unless_allowed(tmp_path, tiny_model_dir, monkeypatch):
    import transformers

    from sdpo_cli.config import ModelConfig
    from sdpo_cli.errors import ConfigError
    from sdpo_cli.models import check_base, load_model, load_tokenizer

    pickled = copy_model(tmp_path, tiny_model_dir, lambda name: not name.endswith(".safetensors"))
    (pickled / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ConfigError, match=r"model\.base: only pickle weights \(\.bin/\.pt\) found; refusing"):
        check_base(ModelConfig(base=str(pickled)))
    check_base(ModelConfig(base=str(pickled), allow_pickle=True))  # the user's explicit choice

    seen = {}
    for cls in (transformers.AutoTokenizer, transformers.AutoModelForCausalLM):
        original = cls.from_pretrained.__func__

        def spy(klass, source, *args, _original=original, _name=cls.__name__, **kwargs):
            seen[_name] = kwargs
            return _original(klass, source, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    load_tokenizer(ModelConfig(base=str(tiny_model_dir)))
    load_model(ModelConfig(base=str(tiny_model_dir)))
    assert seen["AutoTokenizer"]["trust_remote_code"] is False
    assert seen["AutoModelForCausalLM"]["trust_remote_code"] is False
    assert seen["AutoModelForCausalLM"]["use_safetensors"] is True  # never unpickles a .bin by default
