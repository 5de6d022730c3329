"""The config schema: dataclass defaults < YAML file < `key=value` overrides on the command line.

Run as: any `sdpo <command> CONFIG [key=value ...]`. The schema is an omegaconf structured config in struct mode, so an
unknown key is an error that names it. Relative paths written in the YAML file (model, data sources) are resolved
against the YAML file's folder; `run_dir` and paths given on the command line are resolved against the working
directory. Every key is documented in docs/configs.md.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    MissingMandatoryValue,
    OmegaConfBaseException,
    ValidationError,
)
from yaml import YAMLError

from sdpo_cli.errors import ConfigError

LAYOUTS = ("prefix", "padded", "packed")  # train.layout: how pairs become token rows (sdpo_cli/logprobs.py)

FORMATS = ("auto", "orca", "ultrafeedback", "argilla", "preference", "columns")
STRATEGIES = ("natural", "stratified", "random", "curriculum")
LOSSES = ("sigmoid", "robust", "hinge", "ipo")
DTYPES = ("auto", "float32", "bfloat16", "float16", "fp32", "bf16", "fp16")
SCHEDULES = ("linear", "cosine", "constant", "constant_with_warmup")
QUANTIZATIONS = ("4bit", "8bit")  # model.quantization (bitsandbytes)


@dataclass
class SourceConfig:
    name: str = MISSING  # short name used by split.steps and in the `source` column
    path: str = MISSING  # hub id, local dataset folder, or .jsonl/.json/.parquet/.csv file
    split: str = "train"  # dataset split (hub ids and folders); ignored for single files
    subset: Optional[str] = None  # hub dataset configuration name, if any
    format: str = "auto"  # auto | orca | ultrafeedback | argilla | preference | columns
    limit: Optional[int] = None  # keep only the first N rows
    columns: Optional[Dict[str, str]] = None  # format=columns: {prompt, chosen, rejected, system} -> column names


@dataclass
class ModelConfig:
    base: str = MISSING  # the SFT model S = M_0: hub id or local folder
    revision: Optional[str] = None
    dtype: str = "float32"  # float32 | bfloat16 | float16 | auto (the checkpoint's dtype); see docs/configs.md
    attn_implementation: Optional[str] = "sdpa"  # sdpa | eager | flash_attention_2 | None (transformers default)
    chat_template: Optional[str] = None  # Jinja string or solar|chatml|zephyr; replaces the tokenizer's own if set
    # (a tokenizer without a template gets the built-in solar one)
    pad_token: Optional[str] = None  # used when the tokenizer has none; default: unk, else eos
    trust_remote_code: bool = False
    allow_pickle: bool = False  # load .bin/.pt checkpoints (pickle); safetensors only by default
    quantization: Optional[str] = None  # None | 4bit (NF4, QLoRA) | 8bit: bitsandbytes, for every role; needs peft


@dataclass
class DataConfig:
    sources: List[SourceConfig] = field(default_factory=list)
    eval: Optional[SourceConfig] = None  # optional held-out pairs, written to data/eval
    max_length: int = 1024  # prompt + completion tokens per sequence; completions are cut from the right
    max_prompt_length: Optional[int] = None  # prompts longer than this are cut from the left (None: no cap)


@dataclass
class SplitConfig:
    strategy: str = "natural"  # natural | stratified | random | curriculum
    steps: Optional[List[List[str]]] = None  # natural: source names per step; default one step per source
    fractions: Optional[List[float]] = None  # stratified | random | curriculum: share of pairs per step


@dataclass
class DPOConfig:
    beta: float = 0.1
    loss: str = "sigmoid"  # sigmoid | robust | hinge | ipo
    label_smoothing: float = 0.0  # ε: cDPO for sigmoid, robust DPO for robust
    nll_weight: float = 0.0  # weight of an added NLL term on the chosen completions (RPO); 0 = off
    reference: str = "previous"  # previous (M_{t-1}) | base (S) | a path or hub id
    target_init: str = "previous"  # previous (M_{t-1}) | base (S)


@dataclass
class TrainConfig:
    learning_rate: float = 5.0e-7  # Zephyr / the sDPO paper
    lr_schedule: str = "linear"  # linear | cosine | constant | constant_with_warmup
    warmup_ratio: float = 0.1  # share of the step's updates spent warming up
    epochs: float = 1.0
    max_updates: Optional[int] = None  # if set, stop after this many optimizer updates (overrides epochs)
    per_device_batch_size: int = 8  # pairs per forward pass on each device
    gradient_accumulation: int = 1
    max_grad_norm: Optional[float] = 1.0  # None: no clipping
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1.0e-8
    mixed_precision: str = "no"  # no | bf16 | fp16 (accelerate autocast; weights stay in model.dtype)
    gradient_checkpointing: bool = False
    disable_dropout: bool = True  # as TRL: dropout would make the ln 2 check and the reference pass noisy
    shuffle: bool = True
    layout: str = "prefix"  # prefix (prompt computed once for chosen and rejected) | padded (TRL's) | packed (no pad)
    compile: bool = False  # torch.compile each transformer block (regional, dynamic shapes); pays off on GPUs
    group_by_length: bool = True  # batches of similar length (shuffled within mega-batches), less padding
    logging_every: int = 10  # updates between metric lines; update 0 is always logged
    report_to: List[str] = field(default_factory=list)  # accelerate trackers: tensorboard | wandb
    save_optimizer: bool = False  # keep optimizer state next to M_t (large)
    save_every: int = 500  # updates between resumable states of a step (checkpoints/.step-t.state); 0 = never


@dataclass
class LoraConfig:
    enabled: bool = False  # train a LoRA adapter per step (peft), merged into M_t when the step ends
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: Optional[List[str]] = None  # None: peft's default for the architecture; or e.g. [q_proj, v_proj]


@dataclass
class InferenceConfig:
    batch_size: int = 16  # pairs per forward pass in reflogp, gamma and curriculum scoring


@dataclass
class EvalConfig:
    # h4 (ARC 25-shot, HellaSwag 10, MMLU 5, TruthfulQA mc2 0) | an lm-eval task/group name, optionally NAME:SHOTS |
    # a task YAML file or a folder of them (local data); see docs/eval.md
    tasks: List[str] = field(default_factory=lambda: ["h4"])
    limit: Optional[int] = None  # documents per task (lm-eval's limit); None: every document
    batch_size: int = 8  # lm-eval requests per forward pass
    after_each_step: bool = False  # sdpo run: score base and every M_t as it is produced (cached per checkpoint)


@dataclass
class SdpoConfig:
    run_dir: str = "runs/default"
    seed: int = 42
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    peft: LoraConfig = field(default_factory=LoraConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def load_config(path: Path | str, overrides: list[str] | None = None) -> SdpoConfig:
    """Merge defaults, the YAML file and dotlist overrides; validate; return a typed `SdpoConfig`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found", hint="ls configs/  # e.g. sdpo run configs/fixtures.yaml")
    try:
        file_cfg = OmegaConf.load(path)
    except (YAMLError, OmegaConfBaseException) as e:
        raise ConfigError(f"{path}: not valid YAML: {_one_line(e)}", hint="check the file's indentation") from None
    if not isinstance(file_cfg, DictConfig):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level", hint="see configs/fixtures.yaml")
    _resolve_paths(file_cfg, path.resolve().parent)

    schema = OmegaConf.structured(SdpoConfig)
    try:
        cfg = OmegaConf.merge(schema, file_cfg)
    except OmegaConfBaseException as e:
        raise _config_error(str(path), e) from None
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value", hint="e.g. sdpo run CONFIG dpo.beta=0.2")
        try:
            cfg.merge_with_dotlist([item])
        except OmegaConfBaseException as e:
            raise _config_error(f"override {item!r}", e) from None
    try:
        obj: SdpoConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    except MissingMandatoryValue as e:
        raise ConfigError(f"{path}: missing value for key '{e.full_key}'", hint=f"set it: {e.full_key}=...") from None
    except OmegaConfBaseException as e:
        raise _config_error(str(path), e) from None
    validate(obj, where=str(path))
    obj.run_dir = str(Path(obj.run_dir).expanduser().resolve())  # relative to the working directory
    obj._file = str(path)  # for messages about keys found wrong later (not a config key: not saved, not hashed)
    return obj


def config_file(cfg: SdpoConfig) -> str:
    """The YAML file `cfg` was loaded from, to name it in an error about one of its keys."""
    return getattr(cfg, "_file", "config")


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split("\n")[0].split())


def _config_error(where: str, e: OmegaConfBaseException) -> ConfigError:
    key = getattr(e, "full_key", None) or ""
    # An unknown key is a ConfigKeyError from the YAML merge but a ConfigAttributeError from a dotlist override.
    if isinstance(e, (ConfigKeyError, ConfigAttributeError)):
        if "." not in key and getattr(getattr(e, "object_type", None), "__name__", "") == "SourceConfig":
            key = f"data.sources[].{key}"  # omegaconf drops the path of keys inside list items
        hint = "valid keys are listed in docs/configs.md"
        suggestion = re.search(r"Did you mean([^?]*)\?", str(e))  # omegaconf's "Did you mean: 'beta'?"
        return ConfigError(f"{where}: unknown config key '{key}'",
                           hint=f"did you mean{suggestion.group(1)}? {hint}" if suggestion else hint)
    if isinstance(e, ValidationError):
        return ConfigError(f"{where}: bad value for '{key}': {_one_line(e)}", hint="see docs/configs.md for its type")
    return ConfigError(f"{where}: {_one_line(e)}", hint="see docs/configs.md")


def _looks_like_path(value: str) -> bool:
    return value.startswith((".", "/", "~")) or value.endswith((".jsonl", ".json", ".parquet", ".csv"))


def _resolve(value: Any, base: Path) -> Any:
    """A path written in the YAML file is relative to that file; a hub id ('org/name') is left alone."""
    if not isinstance(value, str) or not value:
        return value
    candidate = Path(value).expanduser()
    if candidate.is_absolute():
        return str(candidate)
    resolved = base / candidate
    if _looks_like_path(value) or resolved.exists():
        return str(resolved.resolve())
    return value


def _resolve_paths(file_cfg: DictConfig, base: Path) -> None:
    model = file_cfg.get("model")
    if isinstance(model, DictConfig) and "base" in model:
        model.base = _resolve(model.base, base)
    dpo = file_cfg.get("dpo")
    if isinstance(dpo, DictConfig) and dpo.get("reference") not in (None, "previous", "base"):
        dpo.reference = _resolve(dpo.reference, base)
    evaluation = file_cfg.get("eval")
    if isinstance(evaluation, DictConfig) and isinstance(evaluation.get("tasks"), ListConfig):
        evaluation.tasks = [resolve_task_path(t, base) for t in evaluation.tasks]
    data = file_cfg.get("data")
    if not isinstance(data, DictConfig):
        return
    sources = list(data.get("sources") or []) if isinstance(data.get("sources"), ListConfig) else []
    if isinstance(data.get("eval"), DictConfig):
        sources.append(data.eval)
    for source in sources:
        if isinstance(source, DictConfig) and "path" in source:
            source.path = _resolve(source.path, base)


TASK_SPEC = re.compile(r"^(?P<task>.*?)(?::(?P<shots>\d+))?$")  # NAME | NAME:SHOTS | PATH | PATH:SHOTS


def split_task_spec(spec: str) -> tuple[str, int | None]:
    """An eval.tasks entry -> (name or path, shots or None): 'arc_easy:5' -> ('arc_easy', 5)."""
    match = TASK_SPEC.match(spec.strip())
    assert match is not None  # the pattern matches every string
    shots = match.group("shots")
    return match.group("task"), None if shots is None else int(shots)


def is_task_path(task: str) -> bool:
    """An eval.tasks entry that names a task YAML file or folder rather than a registered lm-eval task."""
    return "/" in task or task.startswith((".", "~")) or task.endswith((".yaml", ".yml"))


def resolve_task_path(spec: Any, base: Path) -> Any:
    """A task YAML path written in the config file is relative to that file; a task name is left alone."""
    if not isinstance(spec, str):
        return spec
    task, shots = split_task_spec(spec)
    if not is_task_path(task):
        return spec
    path = Path(task).expanduser()
    resolved = str(path if path.is_absolute() else (base / path).resolve())
    return resolved if shots is None else f"{resolved}:{shots}"


def validate(cfg: SdpoConfig, where: str = "config") -> None:
    """Cross-field checks that a schema cannot express. Raises ConfigError naming the key."""

    def bad(key: str, message: str, hint: str) -> ConfigError:
        return ConfigError(f"{where}: {key}: {message}", hint=hint)

    if cfg.model.dtype not in DTYPES:
        raise bad("model.dtype", f"unknown dtype {cfg.model.dtype!r}", "use one of " + " | ".join(DTYPES[:4]))
    if not cfg.data.sources:
        raise bad("data.sources", "no data sources", "add at least one {name, path} under data.sources")
    names = [s.name for s in cfg.data.sources]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise bad("data.sources", f"duplicate source name(s) {dupes}", "give every source its own name")
    for i, source in enumerate(cfg.data.sources + ([cfg.data.eval] if cfg.data.eval else [])):
        key = f"data.sources.{i}" if i < len(cfg.data.sources) else "data.eval"
        if source.format not in FORMATS:
            raise bad(f"{key}.format", f"unknown format {source.format!r}", "use one of " + " | ".join(FORMATS))
        if source.format == "columns" and not source.columns:
            raise bad(f"{key}.columns", "format 'columns' needs a column mapping", "e.g. columns: {prompt: q, ...}")
        if source.limit is not None and source.limit < 1:
            raise bad(f"{key}.limit", "must be at least 1", "remove it to use every row")
    if cfg.data.max_length < 2:
        raise bad("data.max_length", "must be at least 2", "e.g. data.max_length=1024")
    mpl = cfg.data.max_prompt_length
    if mpl is not None and not 1 <= mpl < cfg.data.max_length:
        raise bad("data.max_prompt_length", f"{mpl} must be between 1 and data.max_length - 1", "or set it to null")

    strategy = cfg.split.strategy
    if strategy not in STRATEGIES:
        raise bad("split.strategy", f"unknown strategy {strategy!r}", "use one of " + " | ".join(STRATEGIES))
    if strategy == "natural":
        for t, step in enumerate(cfg.split.steps or [], start=1):
            if not step:
                raise bad("split.steps", f"step {t} lists no source", "e.g. split.steps=[[orca],[ultrafeedback]]")
            for name in step:
                if name not in names:
                    raise bad("split.steps", f"step {t} names unknown source {name!r}", f"known sources: {names}")
        if cfg.split.fractions is not None:
            raise bad("split.fractions", "not used by strategy 'natural'", "remove it, or pick split.strategy=random")
    else:
        fr = cfg.split.fractions
        if not fr:
            raise bad("split.fractions", f"strategy {strategy!r} needs fractions", "e.g. split.fractions=[0.5,0.5]")
        if any(f <= 0 for f in fr) or not math.isclose(sum(fr), 1.0, abs_tol=1e-6):
            raise bad("split.fractions", f"{list(fr)} must be positive and sum to 1", "e.g. [0.1667, 0.8333]")
        if cfg.split.steps is not None:
            raise bad("split.steps", f"only used by strategy 'natural', not {strategy!r}", "remove split.steps")

    if cfg.dpo.loss not in LOSSES:
        raise bad("dpo.loss", f"unknown loss {cfg.dpo.loss!r}", "use one of " + " | ".join(LOSSES))
    if cfg.dpo.beta <= 0:
        raise bad("dpo.beta", "must be positive", "the paper uses 0.1")
    if not 0 <= cfg.dpo.label_smoothing < 0.5:
        raise bad("dpo.label_smoothing", "must be in [0, 0.5)", "0 is plain DPO")
    if cfg.dpo.target_init not in ("previous", "base"):
        raise bad("dpo.target_init", f"unknown value {cfg.dpo.target_init!r}", "use previous | base")
    if not cfg.dpo.reference:
        raise bad("dpo.reference", "empty", "use previous | base | a model path")

    tr = cfg.train
    if tr.lr_schedule not in SCHEDULES:
        raise bad("train.lr_schedule", f"unknown schedule {tr.lr_schedule!r}", "use one of " + " | ".join(SCHEDULES))
    if tr.layout not in LAYOUTS:
        raise bad("train.layout", f"unknown layout {tr.layout!r}", f"use {' | '.join(LAYOUTS)}")
    if tr.mixed_precision not in ("no", "bf16", "fp16"):
        raise bad("train.mixed_precision", f"unknown value {tr.mixed_precision!r}", "use no | bf16 | fp16")
    for key, value in (("per_device_batch_size", tr.per_device_batch_size),
                       ("gradient_accumulation", tr.gradient_accumulation), ("logging_every", tr.logging_every)):
        if value < 1:
            raise bad(f"train.{key}", "must be at least 1", f"e.g. train.{key}=1")
    if tr.save_every < 0:
        raise bad("train.save_every", "must be 0 (off) or positive", "e.g. train.save_every=500")
    if tr.max_updates is not None and tr.max_updates < 1:
        raise bad("train.max_updates", "must be at least 1", "or null to train for train.epochs")
    if tr.epochs <= 0:
        raise bad("train.epochs", "must be positive", "e.g. train.epochs=1")
    if not 0 <= tr.warmup_ratio < 1:
        raise bad("train.warmup_ratio", "must be in [0, 1)", "e.g. 0.1")
    if cfg.peft.enabled and (cfg.peft.r < 1 or cfg.peft.alpha <= 0):
        raise bad("peft.r", "LoRA rank and alpha must be positive", "e.g. peft.r=16 peft.alpha=32")
    if cfg.model.quantization is not None:
        if cfg.model.quantization not in QUANTIZATIONS:
            raise bad("model.quantization", f"unknown value {cfg.model.quantization!r}", "use 4bit | 8bit | null")
        if not cfg.peft.enabled:
            raise bad("model.quantization", "a quantized model can only be trained through a LoRA adapter (QLoRA)",
                      "set peft.enabled=true, or model.quantization=null for full fine-tuning")
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            raise bad("model.quantization", "the bitsandbytes package is not installed",
                      "pip install 'sdpo[qlora]'  # or set model.quantization=null")
    if cfg.inference.batch_size < 1:
        raise bad("inference.batch_size", "must be at least 1", "e.g. inference.batch_size=16")
    validate_eval(cfg.eval.tasks, cfg.eval.limit, where)
    if cfg.eval.batch_size < 1:
        raise bad("eval.batch_size", "must be at least 1", "e.g. eval.batch_size=8")


def validate_eval(tasks: List[str], limit: Optional[int], where: str = "config", key: str = "eval.tasks") -> None:
    """eval.tasks (or --tasks) and eval.limit (or --limit): their form only; names and files are checked by eval."""
    hint = "e.g. eval.tasks=[h4] or [arc_easy:25, path/to/task.yaml]; see docs/eval.md"
    if not tasks:
        raise ConfigError(f"{where}: {key}: no tasks", hint=hint)
    for spec in tasks:
        task, shots = split_task_spec(spec) if isinstance(spec, str) else ("", None)
        if not task:
            raise ConfigError(f"{where}: {key}: empty task name in {list(tasks)}", hint=hint)
        if task.lower() == "h4" and shots is not None:
            raise ConfigError(f"{where}: {key}: h4 has its own shot counts (25/10/5/0); {spec!r} cannot change them",
                              hint="write h4, or name one task with its shots, e.g. arc_challenge:5")
    if limit is not None and limit < 1:
        raise ConfigError(f"{where}: eval.limit: must be at least 1", hint="or null to score every document")


def num_steps(cfg: SdpoConfig) -> int:
    """T, the number of sDPO steps the split produces."""
    if cfg.split.strategy == "natural":
        return len(cfg.split.steps) if cfg.split.steps else len(cfg.data.sources)
    return len(cfg.split.fractions or [])


def to_yaml(cfg: SdpoConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def section(cfg: SdpoConfig, *keys: str) -> dict:
    """Plain-dict view of some config sections, for fingerprints and meta.json."""
    full = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    return {k: full[k] for k in keys}  # type: ignore[index]
