"""The config schema: every shipped config loads, precedence is CLI > YAML > defaults, paths resolve against the
YAML file's folder, and mistakes name the key."""

import importlib.util
import json
import os
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
    (["split.curriculum_score=gamma_per_token"], "split.curriculum_score: only used by strategy 'curriculum'"),
    (["split.curriculum_score=length"], "split.curriculum_score"),
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


# Hints for unknown keys name the valid key in full; an override without its section finds it.


@pytest.mark.parametrize("override,key,hint", [
    ("dpo.bta=0.2", "dpo.bta", "did you mean dpo.beta?"),  # a typo in its section
    ("beta=0.2", "beta", "did you mean dpo.beta?"),  # no section: every section is searched for the name
    ("train.beta=0.2", "train.beta", "did you mean dpo.beta?"),  # the wrong section
    ("dop.beta=0.2", "dop.beta", "did you mean dpo.beta?"),  # a typo in the section (omegaconf names only 'dop')
    ("trian.lerning_rate=1e-6", "trian.lerning_rate", "did you mean train.learning_rate?"),
    ("bta=0.2", "bta", "did you mean dpo.beta?"),
    ("sed=1", "sed", "did you mean seed?"),
    ("batch_size=4", "batch_size", "did you mean inference.batch_size or eval.batch_size?"),
    ("limit=5", "limit", "did you mean data.sources.N.limit, data.eval.limit or eval.limit?"),
    ("data.sources.1.fromat=orca", "data.sources.1.format", "did you mean data.sources.1.format?"),
    ("model.chat_templat=chatml", "model.chat_templat", "did you mean model.chat_template?"),
    ("runtime.thread=1", "runtime.thread", "did you mean runtime.threads?"),
    ("data.bogus.x=1", "data.bogus.x", "valid keys are listed in docs/configs.md"),
])
def test_an_unknown_key_suggests_the_full_key(tmp_path, override, key, hint):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, BASE), [override])
    name = override.split("=")[0]
    assert e.value.message == f"override {override!r}: unknown config key '{name}'" and e.value.exit_code == 2
    assert e.value.hint == hint, key


def test_an_unknown_key_in_a_file_keeps_its_place(tmp_path):
    text = BASE.replace("{name: a, path: a.jsonl}", "{name: a, path: a.jsonl, fromat: orca}")
    path = write(tmp_path, text + "train: {lerning_rate: 1e-6}\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert e.value.message == (f"{path}: 2 problems: unknown config key 'data.sources.0.fromat'; "
                               "unknown config key 'train.lerning_rate'")
    assert e.value.hint == ("data.sources.0.fromat: did you mean data.sources.0.format?; "
                            "train.lerning_rate: did you mean train.learning_rate?")


def test_columns_imply_format_columns(tmp_path):
    mapped = "{name: a, path: a.jsonl, columns: {prompt: q, chosen: good, rejected: bad}}"
    cfg = load_config(write(tmp_path, BASE.replace("{name: a, path: a.jsonl}", mapped)))
    assert cfg.data.sources[0].format == "columns" and cfg.data.sources[1].format == "auto"
    assert cfg.data.sources[0].columns == {"prompt": "q", "chosen": "good", "rejected": "bad"}
    cfg = load_config(write(tmp_path, BASE), ["data.sources.1.columns={chosen: c, rejected: r}"])
    assert cfg.data.sources[1].format == "columns"
    orca = mapped.replace("a.jsonl,", "a.jsonl, format: orca,")
    path = write(tmp_path, BASE.replace("{name: a, path: a.jsonl}", orca))
    with pytest.raises(ConfigError) as e:  # another format given by name: the mapping would be ignored
        load_config(path)
    assert e.value.message == f"{path}: data.sources.0.columns: a column mapping is only read by format 'columns', " \
                              "not 'orca'"
    with pytest.raises(ConfigError, match="format 'columns' needs a column mapping"):
        load_config(write(tmp_path, BASE), ["data.sources.0.format=columns"])


# model.chat_template: a built-in's name or a Jinja template, checked before anything is loaded.


def test_chat_template_names_and_jinja_are_accepted(tmp_path):
    from sdpo_cli.config import CHAT_TEMPLATE_NAMES

    for name in CHAT_TEMPLATE_NAMES:
        assert load_config(write(tmp_path, BASE), [f"model.chat_template={name}"]).model.chat_template == name
    jinja = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    text = BASE.replace("model: {base: ./model}", f"model: {{base: ./model, chat_template: \"{jinja}\"}}")
    assert load_config(write(tmp_path, text)).model.chat_template == jinja
    assert load_config(write(tmp_path, BASE)).model.chat_template is None


@pytest.mark.parametrize("value,suggestion", [("llama-3", "did you mean llama3? "), ("ChatML", "did you mean chatml? "),
                                              ("### User: hello", ""), ("", "")])
def test_an_unknown_chat_template_is_a_config_error_listing_the_names(tmp_path, value, suggestion):
    from sdpo_cli.config import SdpoConfig, validate

    model = f"model: {{base: ./model, chat_template: {value!r}}}"
    path = write(tmp_path, BASE.replace("model: {base: ./model}", model))
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert e.value.exit_code == 2 and e.value.message == f"{path}: model.chat_template: unknown chat template {value!r}"
    assert e.value.hint == (f"{suggestion}use one of solar | chatml | qwen2 | zephyr | llama3 | mistral | gemma | phi3 "
                            "| vicuna, a Jinja template (with {{ or {%), or null for the tokenizer's own")
    cfg = SdpoConfig()
    cfg.model.chat_template = value
    with pytest.raises(ConfigError, match="model.chat_template: unknown chat template"):
        validate(cfg)


def test_an_unknown_chat_template_stops_the_cli_before_torch(tmp_path):
    path = write(tmp_path, BASE)
    code = ("import sys; from sdpo_cli.cli import main; sys.argv = ['sdpo', 'split', sys.argv[1], "
            "'model.chat_template=llama'];\ntry:\n    main()\nexcept SystemExit as e:\n"
            "    print('torch' in sys.modules, e.code)")
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, cwd=ROOT)
    assert done.stdout.split() == ["False", "2"], done.stderr
    assert "Error:" in done.stderr and "unknown chat template 'llama'" in done.stderr and "llama3" in done.stderr


def test_a_hand_built_config_with_an_unknown_template_is_refused_by_load_tokenizer(tiny_model_dir):
    from sdpo_cli.config import ModelConfig
    from sdpo_cli.models import CHAT_TEMPLATES, load_tokenizer

    with pytest.raises(ConfigError, match="model.chat_template: unknown chat template 'llama'"):
        load_tokenizer(ModelConfig(base=str(tiny_model_dir), chat_template="llama"))
    tok = load_tokenizer(ModelConfig(base=str(tiny_model_dir), chat_template="llama3"))  # replaces the tokenizer's own
    assert tok.chat_template == CHAT_TEMPLATES["llama3"]


# runtime.threads: torch's CPU threads, set once per command.


def test_runtime_threads(tmp_path):
    import torch

    from sdpo_cli.runtime import apply_runtime

    assert load_config(write(tmp_path, BASE)).runtime.threads is None
    with pytest.raises(ConfigError, match="runtime.threads: must be at least 1"):
        load_config(write(tmp_path, BASE), ["runtime.threads=0"])
    before = torch.get_num_threads()
    try:
        cfg = load_config(write(tmp_path, BASE), ["runtime.threads=3"])
        assert apply_runtime(cfg) is cfg and torch.get_num_threads() == 3
        torch.set_num_threads(2)
        apply_runtime(load_config(write(tmp_path, BASE)))  # null: left as it is
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_every_command_applies_runtime_threads(tmp_path):
    # cli._config, which every command calls first, sets them in the process (here over OMP_NUM_THREADS=1)
    path = write(tmp_path, BASE)
    code = ("import sys, torch; from pathlib import Path; from sdpo_cli import cli; "
            "cli._config(Path(sys.argv[1]), sys.argv[2:]); print(torch.get_num_threads())")
    for overrides, threads in (([], "1"), (["runtime.threads=3"], "3")):
        done = subprocess.run([sys.executable, "-c", code, str(path), *overrides], capture_output=True, text=True,
                              cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert done.stdout.strip() == threads, done.stderr


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
    assert e.value.hint == ("train.layout: use one of prefix | padded | packed; "
                            "dpo.beta: 0.1 is the default (Zephyr's paper: 0.1)")

    path = write(tmp_path, BASE + "train: {layout: diagonal, lr_schedule: step}\nsplit: {fractions: [0.5, 0.5]}\n")
    with pytest.raises(ConfigError) as e:
        load_config(path, ["dpo.betta=1", "dpo.label_smoothing=0.7"])
    message = e.value.message
    assert message.startswith(f"{path}: 5 problems: ")
    for part in ("train.layout: unknown layout 'diagonal'", "train.lr_schedule: unknown schedule 'step'",
                 "override 'dpo.betta=1': unknown config key 'dpo.betta'", "split.fractions: not used by strategy",
                 "dpo.label_smoothing: must be in [0, 0.5)"):
        assert part in message, (part, message)
    assert "dpo.betta: did you mean dpo.beta?" in e.value.hint and "prefix | padded | packed" in e.value.hint


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
                "split.curriculum_score": config.CURRICULUM_SCORES,
                "dpo.loss": config.LOSSES, "dpo.reference": config.STARTS, "dpo.target_init": config.STARTS,
                "train.lr_schedule": config.SCHEDULES, "train.mixed_precision": config.MIXED_PRECISIONS,
                "train.layout": config.LAYOUTS, "model.chat_template": config.CHAT_TEMPLATE_NAMES}
    assert {key: tuple(v for v in values if v != "null") for key, values in rows.items()} == expected


# Serialisation: to_yaml (the run's config.yaml) and section() (hashed into the fingerprints of finished runs) must
# give exactly what they gave before the choices became Enums, or every finished run would turn stale. Since then the
# schema has gained one section, `runtime` (how a process runs, in no fingerprint): config.yaml ends with it, and
# nothing else changed.

BEFORE_CHOICES = "ce2af0ab6eaff09733068417c15165d90a2d6fc6"  # the last commit with str-typed choices in config.py
SECTIONS = ("run_dir", "seed", "model", "data", "split", "dpo", "train", "inference", "peft", "eval")
ADDED_SINCE = "runtime:\n  threads: null\n"  # the sections added since BEFORE_CHOICES, at the end of config.yaml
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


# keys added since BEFORE_CHOICES inside existing sections, with their defaults: the fingerprints leave them out at
# these values (fingerprints.split_fp, NOT_WEIGHTS), so runs made before they existed stay current
ADDED_KEYS = {"data": {"drop_ties": False}, "split": {"eval_fraction": 0.0, "curriculum_score": "gamma"},
              "train": {"eval_every": 0, "activation_budget_gb": None}, "inference": {"shard": "auto"},
              "runtime": {"prefix_attention": "auto", "head_chunk_mb": 32.0, "mmap_threshold_mb": 4.0},
              # TRL's losses and modifiers: train_fp leaves them out at these values (fingerprints.dpo_hashed)
              "dpo": {"loss_weights": None, "ld_alpha": None, "use_weighting": False,
                      "f_divergence_type": "reverse_kl", "f_alpha_divergence_coef": 0.5, "discopop_tau": 0.05}}


def _yaml_value(value) -> str:
    """A default as config.yaml writes it (false, 0.0, gamma)."""
    return value if isinstance(value, str) else json.dumps(value)


def serialised(module, cfg) -> tuple[str, str, str]:
    """The run's config.yaml, every section, and the sections the fingerprints hash, as they are written (without
    ADDED_KEYS where they have their defaults)."""
    # train.gradient_checkpointing's default went from false to auto, which train_fp hashes as false
    text = module.to_yaml(cfg).replace("  gradient_checkpointing: auto\n", "  gradient_checkpointing: false\n")
    for keys in ADDED_KEYS.values():
        for key, default in keys.items():
            text = text.replace(f"  {key}: {_yaml_value(default)}\n", "")

    def sections(*names):
        values = module.section(cfg, *names)
        if values.get("train", {}).get("gradient_checkpointing") == "auto":
            values["train"]["gradient_checkpointing"] = False
        for name, keys in ADDED_KEYS.items():
            for key, default in keys.items():
                if name in values and values[name].get(key, default) == default:
                    values[name].pop(key, None)
        return json.dumps(values, sort_keys=True)

    return text, sections(*SECTIONS), sections("data", "split", "dpo", "train", "peft")


def test_added_keys_at_their_defaults_leave_every_fingerprint_as_it_was(tmp_path, monkeypatch):
    """split.eval_fraction=0, data.drop_ties=false, split.curriculum_score=gamma and train.eval_every (any value)
    change no fingerprint: split_fp drops the first three at these values, train_fp never hashes the last
    (NOT_WEIGHTS)."""
    from sdpo_cli import fingerprints

    monkeypatch.chdir(tmp_path)
    cfg = load_config(FIXTURES)
    split = fingerprints.section(cfg, "data", "split")
    for name in ("data", "split"):
        for key, default in ADDED_KEYS[name].items():
            assert split[name].pop(key) == default
    assert "eval_every" in fingerprints.NOT_WEIGHTS
    called = {}
    monkeypatch.setattr(fingerprints, "fingerprint", lambda *parts: called.setdefault("parts", parts))
    monkeypatch.setattr(fingerprints, "source_identity", lambda *a: "source")
    monkeypatch.setattr(fingerprints, "tokenizer_identity", lambda tok: "tok")
    fingerprints.split_fp(cfg, None)
    assert called["parts"][1] == split


def test_added_dpo_keys_at_their_defaults_leave_the_train_fingerprint_as_it_was(tmp_path, monkeypatch):
    """The dpo keys of TRL's losses (ADDED_KEYS["dpo"]) are not hashed at their defaults, nor where they do not apply
    (f_alpha_divergence_coef without alpha_divergence, discopop_tau without discopop), so train_fp of a run made
    before they existed is unchanged; set, they are hashed."""
    from sdpo_cli import fingerprints

    monkeypatch.chdir(tmp_path)
    called = {}
    monkeypatch.setattr(fingerprints, "fingerprint", lambda *parts: called.setdefault("parts", parts))
    monkeypatch.setattr(fingerprints, "data_fp", lambda run, step: "data")
    monkeypatch.setattr(fingerprints, "target_init_model", lambda cfg, run, step: "init")
    monkeypatch.setattr(fingerprints, "model_identity", lambda *a: "model")

    def hashed_dpo(*overrides):
        called.clear()
        fingerprints.train_fp(load_config(FIXTURES, list(overrides)), fingerprints.RunDir(tmp_path), 1)
        return called["parts"][4]["dpo"]

    assert hashed_dpo() == {"beta": 0.1, "loss": "sigmoid", "label_smoothing": 0.0, "nll_weight": 0.0}
    assert hashed_dpo("dpo.f_alpha_divergence_coef=0.3", "dpo.discopop_tau=0.1") == hashed_dpo()  # do not apply
    assert hashed_dpo("dpo.loss=[sigmoid,sft]", "dpo.loss_weights=[1.0,0.5]", "dpo.ld_alpha=0.5")["loss_weights"] == [
        1.0, 0.5]
    assert hashed_dpo("dpo.f_divergence_type=alpha_divergence", "dpo.f_alpha_divergence_coef=0.3")[
        "f_alpha_divergence_coef"] == 0.3
    assert hashed_dpo("dpo.loss=discopop")["loss"] == "discopop"
    assert hashed_dpo("dpo.loss=discopop", "dpo.discopop_tau=0.1")["discopop_tau"] == 0.1


@pytest.mark.parametrize("overrides,message", [
    (["dpo.loss=[sigmoid,kto]"], "dpo.loss: unknown loss 'kto'"),
    (["dpo.loss=[sigmoid,sft]", "dpo.loss_weights=[1.0]"], "dpo.loss_weights: 1 weights for 2 losses"),
    (["dpo.loss=exo_pair"], "dpo.label_smoothing: must be above 0 for loss exo_pair"),
    (["dpo.ld_alpha=1.5"], "dpo.ld_alpha: 1.5 must be in [0, 1]"),
    (["dpo.f_divergence_type=kl"], "dpo.f_divergence_type: unknown f-divergence 'kl'"),
    (["dpo.loss=bco_pair", "dpo.f_divergence_type=forward_kl"], "forward_kl does not apply to loss bco_pair"),
    (["dpo.loss=aot", "dpo.use_weighting=true"], "dpo.use_weighting: does not apply to aot"),
    (["dpo.loss=discopop", "dpo.discopop_tau=0"], "dpo.discopop_tau: must be positive"),
    (["dpo.loss=[]"], "dpo.loss: an empty list"),
])
def test_what_trl_refuses_is_refused_naming_the_key(tmp_path, overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, BASE), overrides)
    assert message in e.value.message and e.value.hint and e.value.exit_code == 2


def test_loss_takes_a_name_or_a_list(tmp_path):
    assert load_config(write(tmp_path, BASE), ["dpo.loss=ipo"]).dpo.loss == "ipo"
    cfg = load_config(write(tmp_path, BASE), ["dpo.loss=[sigmoid,sft]", "dpo.loss_weights=[1.0,0.5]"])
    assert cfg.dpo.loss == ["sigmoid", "sft"] and cfg.dpo.loss_weights == [1.0, 0.5]
    assert type(cfg.dpo.loss[0]) is str
    path = write(tmp_path, BASE.replace("dpo: {beta: 0.2}", "dpo: {beta: 0.2, loss: [sigmoid, bco_pair]}"))
    assert load_config(path).dpo.loss == ["sigmoid", "bco_pair"]
    for name in ("exo_pair", "nca_pair", "sppo_hard", "aot_unpaired", "apo_down", "sigmoid_norm"):
        assert load_config(write(tmp_path, BASE), [f"dpo.loss={name}", "dpo.label_smoothing=0.1"]).dpo.loss == name


def test_a_prompt_cap_marks_the_split_made_by_the_new_cut(tmp_path, monkeypatch):
    """data.max_prompt_length now cuts the prompt's content (not its ids from the left): a split made with a cap is
    stale, its reason a rule; without a cap the fingerprint's parts are what they were."""
    from sdpo_cli import fingerprints

    monkeypatch.chdir(tmp_path)
    parts = []
    monkeypatch.setattr(fingerprints, "fingerprint", lambda *p: parts.append(p) or str(len(parts)))
    monkeypatch.setattr(fingerprints, "source_identity", lambda *a: "source")
    monkeypatch.setattr(fingerprints, "tokenizer_identity", lambda tok: "tok")
    capped = fingerprints.split_fp(load_config(FIXTURES), None)
    uncapped = fingerprints.split_fp(load_config(FIXTURES, ["data.max_prompt_length=null"]), None)
    assert parts[0][-1] == fingerprints.PROMPT_CUT and capped.inputs["rules"] == [fingerprints.PROMPT_CUT]
    assert len(parts[1]) == 7 and uncapped.inputs["rules"] == []
    before = {k: v for k, v in capped.inputs.items() if k != "rules"}  # a meta.json written before the rule
    reasons = fingerprints.explain({"inputs": before}, capped)
    assert reasons == [f"made by an earlier sdpo, which computed it another way ({fingerprints.PROMPT_CUT})"]


@pytest.mark.parametrize("path,overrides", SERIALISED,
                         ids=[f"{p.name}{'+' if o else ''}{i}" for i, (p, o) in enumerate(SERIALISED)])
def test_serialisation_is_unchanged(config_before_choices, path, overrides, tmp_path, monkeypatch):
    from sdpo_cli import config

    monkeypatch.chdir(tmp_path)
    before = serialised(config_before_choices, config_before_choices.load_config(path, overrides))
    assert serialised(config, load_config(path, overrides)) == (before[0] + ADDED_SINCE, *before[1:])


def test_serialisation_of_a_hand_built_config_is_unchanged(config_before_choices):
    from sdpo_cli import config

    def build(module):
        return module.SdpoConfig(model=module.ModelConfig(base="m"),
                                 data=module.DataConfig(sources=[module.SourceConfig(name="a", path="a.jsonl")]))

    before = serialised(config_before_choices, build(config_before_choices))
    assert serialised(config, build(config)) == (before[0] + ADDED_SINCE, *before[1:])


def test_runtime_is_in_no_fingerprint(tmp_path, monkeypatch):
    from sdpo_cli import fingerprints
    from sdpo_cli.config import section, to_yaml

    monkeypatch.chdir(tmp_path)
    default, threads = load_config(FIXTURES), load_config(FIXTURES, ["runtime.threads=1"])
    assert (default.runtime.threads, threads.runtime.threads) == (None, 1)
    assert to_yaml(threads).endswith("runtime:\n  threads: 1\n  prefix_attention: auto\n  head_chunk_mb: 32.0\n"
                                      "  mmap_threshold_mb: 4.0\n")
    for keys in (SECTIONS, ("data", "split"), ("dpo", "train", "peft")):
        assert section(default, *keys) == section(threads, *keys)
    assert fingerprints.numerics(default) == fingerprints.numerics(threads)


def test_memory_keys_are_checked_and_auto_checkpointing_keeps_old_fingerprints(tmp_path):
    """train.gradient_checkpointing takes true | false | auto (the default), train.activation_budget_gb must be
    positive; `auto` hashes as the old default false, so runs trained before it existed stay current."""
    from sdpo_cli.config import SdpoConfig, config_problems
    from sdpo_cli.fingerprints import NOT_WEIGHTS

    cfg = SdpoConfig()
    assert cfg.train.gradient_checkpointing == "auto" and cfg.train.activation_budget_gb is None
    cfg.train.gradient_checkpointing = "sometimes"
    cfg.train.activation_budget_gb = 0.0
    cfg.runtime.head_chunk_mb = -1.0
    cfg.runtime.mmap_threshold_mb = 64.0
    keys = [p.key for p in config_problems(cfg)]
    assert {"train.gradient_checkpointing", "train.activation_budget_gb", "runtime.head_chunk_mb",
            "runtime.mmap_threshold_mb"} <= set(keys)
    assert "activation_budget_gb" in NOT_WEIGHTS


def test_apply_runtime_sets_the_head_chunk_and_the_mmap_threshold(monkeypatch):
    """runtime.head_chunk_mb reaches logprobs.head_chunk; runtime.mmap_threshold_mb calls glibc's mallopt (null:
    not at all)."""
    from sdpo_cli import runtime
    from sdpo_cli.config import SdpoConfig
    from sdpo_cli.logprobs import head_chunk

    calls = []
    monkeypatch.setattr(runtime, "set_mmap_threshold", calls.append)
    monkeypatch.setattr(runtime, "head_chunk_bytes", runtime.head_chunk_bytes)
    cfg = SdpoConfig()
    cfg.runtime.head_chunk_mb = 1.0
    runtime.apply_runtime(cfg)
    assert head_chunk(32000) == 64 and head_chunk(1000) == (1 << 20) // 4000  # the floor; 1 MiB of fp32 logits
    assert head_chunk(1000, sixteen_bit=True) == (1 << 20) // 8000
    assert calls == [4 << 20]
    cfg.runtime.mmap_threshold_mb = None
    runtime.apply_runtime(cfg)
    assert calls == [4 << 20]
