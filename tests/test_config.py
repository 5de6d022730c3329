"""The config schema: every shipped config loads, precedence is CLI > YAML > defaults, paths resolve against the
YAML file's folder, and mistakes name the key."""

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sdpo_cli.config import load_config, num_steps
from sdpo_cli.errors import ConfigError
from tests.conftest import ROOT

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def test_there_are_configs():
    names = {p.name for p in CONFIGS}
    assert {"fixtures.yaml", "sdpo_solar.yaml", "dpo_solar.yaml", "sdpo_strat_solar.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert num_steps(cfg) >= 1 and cfg.data.sources


def test_paper_configs_say_what_the_paper_did():
    sdpo = load_config(ROOT / "configs" / "sdpo_solar.yaml")
    assert [s.path for s in sdpo.data.sources] == ["Intel/orca_dpo_pairs", "allenai/ultrafeedback_binarized_cleaned"]
    assert sdpo.split.strategy == "natural" and num_steps(sdpo) == 2
    assert (sdpo.dpo.reference, sdpo.dpo.target_init, sdpo.dpo.beta) == ("previous", "previous", 0.1)
    dpo = load_config(ROOT / "configs" / "dpo_solar.yaml")
    assert num_steps(dpo) == 1 and len(dpo.split.steps[0]) == 2
    strat = load_config(ROOT / "configs" / "sdpo_strat_solar.yaml")
    assert strat.split.strategy == "stratified" and strat.split.fractions == pytest.approx([0.1667, 0.8333], abs=1e-3)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sub" / "c.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    return path


BASE = """
model: {base: ./model}
data:
  sources:
    - {name: a, path: a.jsonl}
    - {name: hub, path: Intel/orca_dpo_pairs}
dpo: {beta: 0.2}
"""


def test_precedence_and_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(write(tmp_path, BASE), ["dpo.beta=0.3", "train.max_updates=5", "run_dir=out"])
    assert cfg.dpo.beta == 0.3  # command line beats the file
    assert cfg.dpo.loss == "sigmoid"  # default where neither says
    assert cfg.train.max_updates == 5
    assert cfg.model.base == str(tmp_path / "sub" / "model")  # relative to the YAML file's folder
    assert cfg.data.sources[0].path == str(tmp_path / "sub" / "a.jsonl")
    assert cfg.data.sources[1].path == "Intel/orca_dpo_pairs"  # a hub id stays a hub id
    assert cfg.run_dir == str(tmp_path / "out")  # run_dir: relative to the working directory
    assert load_config(write(tmp_path, BASE)).dpo.beta == 0.2


def test_list_overrides(tmp_path):
    cfg = load_config(write(tmp_path, BASE), ["split.strategy=stratified", "split.fractions=[0.25,0.75]",
                                              "data.sources.0.limit=10"])
    assert cfg.split.fractions == [0.25, 0.75] and cfg.data.sources[0].limit == 10 and num_steps(cfg) == 2


@pytest.mark.parametrize("overrides,message", [
    (["dpo.betta=1"], "unknown config key 'dpo.betta'"),
    (["dpo.beta=abc"], "bad value for 'dpo.beta'"),
    (["dpo.loss=kto"], "dpo.loss: unknown loss 'kto'"),
    (["split.strategy=random"], "split.fractions: strategy 'random' needs fractions"),
    (["split.strategy=random", "split.fractions=[0.5,0.6]"], "must be positive and sum to 1"),
    (["split.steps=[[a],[nope]]"], "step 2 names unknown source 'nope'"),
    (["data.max_prompt_length=5000"], "data.max_prompt_length"),
    (["dpo.target_init=middle"], "dpo.target_init"),
    (["train.lr_schedule=step"], "train.lr_schedule"),
    (["beta"], "is not key=value"),
])
def test_mistakes_name_the_key(tmp_path, overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, BASE), overrides)
    assert message in e.value.message and e.value.hint and e.value.exit_code == 2


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    path = write(tmp_path, BASE + "train: {learning_rat: 1e-6}\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(path) in e.value.message and "train.learning_rat" in e.value.message


# Choices (the Enums of the schema) and problems reported together.


@pytest.mark.parametrize("overrides,key,value,allowed", [
    (["train.layout=diagonal"], "train.layout", "'diagonal'", "prefix | padded | packed"),
    (["model.dtype=float8"], "model.dtype", "'float8'", "auto | float32 | bfloat16 | float16 | fp32 | bf16 | fp16"),
    (["data.sources.1.format=fancy"], "data.sources.1.format", "'fancy'", "orca | ultrafeedback"),
    (["train.mixed_precision=no"], "train.mixed_precision", "'False'", "YAML reads a bare no as false"),
])
def test_a_value_outside_its_choice_on_the_command_line(tmp_path, overrides, key, value, allowed):
    path = write(tmp_path, BASE)
    with pytest.raises(ConfigError) as e:
        load_config(path, overrides)
    assert e.value.exit_code == 2 and "\n" not in e.value.message
    assert e.value.message.startswith(f"{path}: {key}: unknown ") and value in e.value.message
    assert f"use one of {allowed}" in e.value.hint or allowed in e.value.hint


def test_a_value_outside_its_choice_in_the_yaml_file(tmp_path):
    path = write(tmp_path, BASE + "train: {lr_schedule: step}\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert e.value.exit_code == 2
    assert e.value.message == f"{path}: train.lr_schedule: unknown schedule 'step'"
    assert e.value.hint == "use one of linear | cosine | constant | constant_with_warmup"
    path = write(tmp_path, BASE.replace("{name: a, path: a.jsonl}", "{name: a, path: a.jsonl, format: Orca}"))
    with pytest.raises(ConfigError) as e:
        load_config(path)  # the index of a list item is kept, and values are case-sensitive
    assert e.value.message == f"{path}: data.sources.0.format: unknown format 'Orca'" and "orca" in e.value.hint


def test_problems_are_reported_together(tmp_path):
    path = write(tmp_path, BASE)
    with pytest.raises(ConfigError) as e:
        load_config(path, ["dpo.beta=-1", "train.layout=diagonal"])
    assert e.value.exit_code == 2 and "\n" not in e.value.message + e.value.hint
    assert e.value.message == (f"{path}: 2 problems: train.layout: unknown layout 'diagonal'; "
                               "dpo.beta: must be positive")
    assert e.value.hint == "train.layout: use one of prefix | padded | packed; dpo.beta: the paper uses 0.1"

    path = write(tmp_path, BASE + "train: {layout: diagonal, lr_schedule: step}\nsplit: {fractions: [0.5, 0.5]}\n")
    with pytest.raises(ConfigError) as e:
        load_config(path, ["dpo.betta=1", "dpo.label_smoothing=0.7"])
    message = e.value.message
    assert message.startswith(f"{path}: 5 problems: ")
    for part in ("train.layout: unknown layout 'diagonal'", "train.lr_schedule: unknown schedule 'step'",
                 "override 'dpo.betta=1': unknown config key 'dpo.betta'", "split.fractions: not used by strategy",
                 "dpo.label_smoothing: must be in [0, 0.5)"):
        assert part in message, (part, message)
    assert "did you mean: 'beta'?" in e.value.hint and "prefix | padded | packed" in e.value.hint


def test_a_section_with_a_refused_value_is_not_judged_on_its_default(tmp_path):
    # split.strategy=bogus is dropped, so the natural default would refuse split.fractions: not reported
    path = write(tmp_path, BASE + "split: {strategy: bogus, fractions: [0.5, 0.5]}\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert e.value.message == f"{path}: split.strategy: unknown strategy 'bogus'"


def test_values_are_plain_strings_and_hand_built_configs_are_checked():
    import torch

    from sdpo_cli.config import DTYPES, LAYOUTS, DType, Layout, SdpoConfig, TrainConfig, validate

    cfg = load_config(ROOT / "configs" / "demo.yaml", ["train.layout=packed"])
    for value in (cfg.train.layout, cfg.train.lr_schedule, cfg.model.dtype, cfg.split.strategy,
                  cfg.data.sources[0].format, cfg.dpo.loss, cfg.dpo.target_init, cfg.train.mixed_precision):
        assert type(value) is str
    assert cfg.train.layout == "packed" and LAYOUTS == ("prefix", "padded", "packed") == Layout.values()
    assert f"{TrainConfig().layout}" == str(TrainConfig().layout) == "prefix"  # a default member prints as its value
    torch_names = {name: DType(name).torch_name for name in DTYPES if name != "auto"}
    assert torch_names == {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16", "fp32": "float32",
                           "bf16": "bfloat16", "fp16": "float16"}
    assert all(isinstance(getattr(torch, name), torch.dtype) for name in torch_names.values())
    with pytest.raises(ConfigError, match="train.layout: unknown layout 'diagonal'"):
        validate(SdpoConfig(train=TrainConfig(layout="diagonal")))  # type: ignore[arg-type]


def test_docs_list_the_allowed_values_of_each_choice():
    from sdpo_cli import config

    text = (ROOT / "docs" / "configs.md").read_text()
    table = text.split("## Allowed values", 1)[1].split("\n## ", 1)[0]
    rows = {m.group(1): re.findall(r"`([^`]+)`", m.group(2)) for m in re.finditer(r"^\| `([^`]+)`[^|]*\|(.*)\|$",
                                                                                     table, re.M)}
    expected = {"model.dtype": config.DTYPES, "model.quantization": config.QUANTIZATIONS,
                "data.sources[].format": config.FORMATS, "split.strategy": config.STRATEGIES,
                "dpo.loss": config.LOSSES, "dpo.reference": config.STARTS, "dpo.target_init": config.STARTS,
                "train.lr_schedule": config.SCHEDULES, "train.mixed_precision": config.MIXED_PRECISIONS,
                "train.layout": config.LAYOUTS}
    assert {key: tuple(v for v in values if v != "null") for key, values in rows.items()} == expected


# Serialisation: to_yaml (the run's config.yaml) and section() (hashed into the fingerprints of finished runs) must
# give exactly what they gave before the choices became Enums, or every finished run would turn stale.

BEFORE_CHOICES = "ce2af0ab6eaff09733068417c15165d90a2d6fc6"  # the last commit with str-typed choices in config.py
SECTIONS = ("run_dir", "seed", "model", "data", "split", "dpo", "train", "inference", "peft", "eval")
FIXTURES = ROOT / "configs" / "fixtures.yaml"
SERIALISED = [(path, []) for path in CONFIGS] + [
    (FIXTURES, ["train.layout=packed", "train.mixed_precision=bf16", "model.dtype=bf16", "dpo.loss=ipo",
                "train.lr_schedule=constant_with_warmup", "dpo.target_init=base", "data.sources.0.format=orca"]),
    (FIXTURES, ["split.strategy=stratified", "split.steps=null", "split.fractions=[0.5,0.5]", "model.dtype=auto",
                "train.mixed_precision='no'", "data.sources.1.format=ultrafeedback", "train.layout=padded"]),
    (FIXTURES, ["split.strategy=curriculum", "split.steps=null", "split.fractions=[0.3,0.7]", "peft.enabled=true",
                "dpo.reference=base", "model.dtype=float16", "train.mixed_precision=fp16"]),
]


@pytest.fixture(scope="module")
def config_before_choices(tmp_path_factory):
    """sdpo_cli/config.py as of BEFORE_CHOICES, imported under another name."""
    try:
        source = subprocess.run(["git", "show", f"{BEFORE_CHOICES}:sdpo_cli/config.py"], cwd=ROOT, check=True,
                                capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("needs the git history of sdpo_cli/config.py")
    path = tmp_path_factory.mktemp("before") / "config_before_choices.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("sdpo_config_before_choices", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def serialised(module, cfg) -> tuple[str, str, str]:
    """The run's config.yaml, every section, and the sections the fingerprints hash, as they are written."""
    return (module.to_yaml(cfg), json.dumps(module.section(cfg, *SECTIONS), sort_keys=True),
            json.dumps(module.section(cfg, "data", "split", "dpo", "train", "peft"), sort_keys=True))


@pytest.mark.parametrize("path,overrides", SERIALISED,
                         ids=[f"{p.name}{'+' if o else ''}{i}" for i, (p, o) in enumerate(SERIALISED)])
def test_serialisation_is_unchanged(config_before_choices, path, overrides, tmp_path, monkeypatch):
    from sdpo_cli import config

    monkeypatch.chdir(tmp_path)
    assert (serialised(config, load_config(path, overrides))
            == serialised(config_before_choices, config_before_choices.load_config(path, overrides)))


def test_serialisation_of_a_hand_built_config_is_unchanged(config_before_choices):
    from sdpo_cli import config

    def build(module):
        return module.SdpoConfig(model=module.ModelConfig(base="m"),
                                 data=module.DataConfig(sources=[module.SourceConfig(name="a", path="a.jsonl")]))

    assert serialised(config, build(config)) == serialised(config_before_choices, build(config_before_choices))
