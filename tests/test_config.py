"""The config schema: every shipped config loads, precedence is CLI > YAML > defaults, paths resolve against the
YAML file's folder, and mistakes name the key."""

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
