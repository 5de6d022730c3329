"""The config schema: dataclass defaults < YAML file < `key=value` overrides on the command line.

Run as: any `sdpo <command> CONFIG [key=value ...]`. The schema is an omegaconf structured config in struct mode, so an
unknown key is an error that names it, and a key with a fixed set of values has a `Choice` enum as its type, so a value
outside it is an error that lists the allowed ones (each set is written once, in its enum). `load_config` collects
every problem of a config (unknown keys, wrong types, missing values, then the per-section checks) and reports them in
one `ConfigError`; the hint of an unknown key names the valid keys it may have meant, in full (`_suggest`). It
returns the dataclasses with plain `str` values, so the rest of the code, `to_yaml` and the fingerprints see the
strings they always saw. Relative paths written in the YAML file (model, data sources) are
resolved against the YAML file's folder; `run_dir` and paths given on the command line are resolved against the
working directory. Every key is documented in docs/configs.md.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib.util
import math
import re
import typing
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError
from yaml import YAMLError

from sdpo_cli.errors import ConfigError


class Choice(str, Enum):
    """A config value from a fixed set. Member names equal their values, so omegaconf accepts and prints `prefix`;
    being a `str`, a member compares, hashes, formats and serialises as its value."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(member.value for member in cls)


class DType(Choice):  # model.dtype: the weights' dtype (`auto`: the checkpoint's); fp32, bf16, fp16 are aliases
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"

    @property
    def torch_name(self) -> str:
        """The name of the torch dtype ('bf16' -> 'bfloat16'); `auto` stays `auto`."""
        return {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(self.value, self.value)


class Format(Choice):  # data.sources[].format: how rows become pairs (sdpo_cli/data/formats.py)
    auto = "auto"
    orca = "orca"
    ultrafeedback = "ultrafeedback"
    argilla = "argilla"
    preference = "preference"
    columns = "columns"


class Strategy(Choice):  # split.strategy: how pairs are cut into steps (sdpo_cli/split.py)
    natural = "natural"
    stratified = "stratified"
    random = "random"
    curriculum = "curriculum"


class CurriculumScore(Choice):  # split.curriculum_score: what strategy `curriculum` sorts pairs by (sdpo_cli/split.py)
    gamma = "gamma"  # γ under S: log π(y_w|x) − log π(y_l|x)
    gamma_per_token = "gamma_per_token"  # each log-prob divided by its completion's token count


class Loss(Choice):  # dpo.loss, one name or a list (sdpo_cli/loss.py, docs/losses.md): TRL 1.16's loss_type names
    sigmoid = "sigmoid"
    robust = "robust"
    hinge = "hinge"
    ipo = "ipo"
    exo_pair = "exo_pair"
    nca_pair = "nca_pair"
    bco_pair = "bco_pair"
    sppo_hard = "sppo_hard"
    aot = "aot"
    aot_unpaired = "aot_unpaired"
    apo_zero = "apo_zero"
    apo_down = "apo_down"
    discopop = "discopop"
    sft = "sft"
    sigmoid_norm = "sigmoid_norm"


class Start(Choice):  # dpo.target_init: the model the target of step t starts from (and dpo.reference's keywords)
    previous = "previous"  # M_{t-1}
    base = "base"  # S


class Schedule(Choice):  # train.lr_schedule: the transformers schedulers
    linear = "linear"
    cosine = "cosine"
    constant = "constant"
    constant_with_warmup = "constant_with_warmup"


class MixedPrecision(Choice):  # train.mixed_precision: accelerate autocast; weights stay in model.dtype
    no = "no"
    bf16 = "bf16"
    fp16 = "fp16"


class PrefixAttention(Choice):  # runtime.prefix_attention: the prefix layout's attention under sdpa
    auto = "auto"  # pieces, but mask with train.compile (its graphs would specialise on every row's lengths)
    pieces = "pieces"  # two causal pieces per row, no L x L mask (sdpo_cli/attention.py)
    mask = "mask"  # an explicit [L, L] boolean mask


class Layout(Choice):  # train.layout: how pairs become token rows (sdpo_cli/collate.py)
    prefix = "prefix"  # prompt computed once for chosen and rejected
    padded = "padded"  # TRL's: one row per completion
    packed = "packed"  # the batch's sequences back to back, no padding


# The allowed values as tuples of plain strings, for the modules that check or list them.
DTYPES = DType.values()
FORMATS = Format.values()
STRATEGIES = Strategy.values()
CURRICULUM_SCORES = CurriculumScore.values()
LOSSES = Loss.values()
STARTS = Start.values()
SCHEDULES = Schedule.values()
MIXED_PRECISIONS = MixedPrecision.values()
LAYOUTS = Layout.values()
QUANTIZATIONS = ("4bit", "8bit")  # model.quantization (bitsandbytes): not identifiers, so a str checked by the schema
# model.chat_template: the built-in templates by name (their Jinja text is models.CHAT_TEMPLATES, in this order); any
# other value must be a Jinja template itself. A str, not a Choice: checked by _chat_template_problems.
CHAT_TEMPLATE_NAMES = ("solar", "chatml", "qwen2", "zephyr", "llama3", "mistral", "gemma", "phi3", "vicuna")


@dataclass
class SourceConfig:
    name: str = MISSING  # short name used by split.steps and in the `source` column
    path: str = MISSING  # hub id, local dataset folder, or .jsonl/.json/.parquet/.csv file
    split: str = "train"  # dataset split (hub ids and folders); ignored for single files
    subset: Optional[str] = None  # hub dataset configuration name, if any
    format: Format = Format.auto  # `auto` detects it from the column names
    limit: Optional[int] = None  # keep only the first N rows
    columns: Optional[Dict[str, str]] = None  # format=columns: {prompt, chosen, rejected, system} -> column names


@dataclass
class ModelConfig:
    base: str = MISSING  # the SFT model S = M_0: hub id or local folder
    revision: Optional[str] = None
    dtype: DType = DType.float32  # see docs/configs.md: keep float32 for training
    attn_implementation: Optional[str] = "sdpa"  # sdpa | eager | flash_attention_2 | None (transformers default)
    chat_template: Optional[str] = None  # one of CHAT_TEMPLATE_NAMES or a Jinja template; replaces the tokenizer's own
    # if set (a tokenizer without a template gets the built-in solar one)
    pad_token: Optional[str] = None  # used when the tokenizer has none; default: unk, else eos
    trust_remote_code: bool = False
    allow_pickle: bool = False  # load .bin/.pt checkpoints (pickle); safetensors only by default
    quantization: Optional[str] = None  # None or one of QUANTIZATIONS (NF4 QLoRA, LLM.int8), for every role; needs peft


@dataclass
class DataConfig:
    sources: List[SourceConfig] = field(default_factory=list)
    eval: Optional[SourceConfig] = None  # optional held-out pairs, written to data/eval
    max_length: int = 1024  # prompt + completion tokens per sequence; completions are cut from the right
    # prompts longer than this lose text from the left of their content; BOS and the template's framing stay (None: no
    # cap; sdpo_cli/data/tokenize.py)
    max_prompt_length: Optional[int] = None
    drop_ties: bool = False  # skip rows whose chosen and rejected scores are equal (ultrafeedback, argilla formats)


@dataclass
class SplitConfig:
    strategy: Strategy = Strategy.natural
    steps: Optional[List[List[str]]] = None  # natural: source names per step; default one step per source
    fractions: Optional[List[float]] = None  # stratified | random | curriculum: share of pairs per step
    # share of each D_t held out (seeded) as data/eval-step-t: the pairs train's eval/* metrics are computed on;
    # 0: none (data.eval, if set, is the held-out set of every step instead)
    eval_fraction: float = 0.0
    # curriculum: sort by γ under S, or by γ of per-token log-probs (less tied to the replies' length difference)
    curriculum_score: CurriculumScore = CurriculumScore.gamma


@dataclass
class DPOConfig:
    beta: float = 0.1
    # a Loss, or a list of them summed with dpo.loss_weights (e.g. [sigmoid, sft]); typed Any because omegaconf has
    # no str-or-list type: _dpo_problems checks every name (docs/losses.md)
    loss: Any = Loss.sigmoid.value
    label_smoothing: float = 0.0  # ε: cDPO for sigmoid, robust DPO for robust, EXO's ε, aot's smoothing
    nll_weight: float = 0.0  # weight of an added NLL term on the chosen completions (RPO): the same as adding `sft`
    loss_weights: Optional[List[float]] = None  # one per dpo.loss entry; None: 1.0 each
    ld_alpha: Optional[float] = None  # LD-DPO: weight in [0, 1] of the longer reply's tokens past min(C, R); None: off
    use_weighting: bool = False  # WPO: weight each pair by the policy's length-normalised probabilities of both replies
    f_divergence_type: str = "reverse_kl"  # f-DPO: reverse_kl | forward_kl | js_divergence | alpha_divergence
    f_alpha_divergence_coef: float = 0.5  # α of alpha_divergence
    discopop_tau: float = 0.05  # τ of the discopop loss
    reference: str = Start.previous.value  # a Start (previous: M_{t-1}, base: S) or a path or hub id
    target_init: Start = Start.previous


@dataclass
class TrainConfig:
    # The sDPO paper gives no numbers: its training "closely follows" Zephyr (Tunstall et al. 2023, arXiv:2310.16944).
    # Where each default comes from, and where Zephyr's public sources disagree: docs/configs.md, "Where the SOLAR
    # configs' values come from".
    learning_rate: float = 5.0e-7  # Zephyr's dDPO peak rate (paper, model card and alignment-handbook recipe agree)
    lr_schedule: Schedule = Schedule.linear  # Zephyr's paper and model card; the handbook recipe now uses cosine
    warmup_ratio: float = 0.1  # share of the step's updates spent warming up (Zephyr: 10 %)
    epochs: float = 1.0  # ours: one per step (Zephyr's final model: 3 by its paper and model card; the recipe: 1)
    max_updates: Optional[int] = None  # if set, stop after this many optimizer updates (overrides epochs)
    per_device_batch_size: int = 8  # pairs per forward pass on each device
    gradient_accumulation: int = 1
    max_grad_norm: Optional[float] = 1.0  # None: no clipping (1.0: transformers' Trainer default, which Zephyr kept)
    weight_decay: float = 0.0  # the Trainer default
    adam_beta1: float = 0.9  # Adam's betas and epsilon: Zephyr's model card (the Trainer defaults)
    adam_beta2: float = 0.999
    adam_epsilon: float = 1.0e-8
    mixed_precision: MixedPrecision = MixedPrecision.no  # accelerate autocast; weights stay in model.dtype
    # activation checkpointing of the decoder layers: true | false | auto (on when the longest micro-batch's
    # activations would need more than train.activation_budget_gb; sdpo_cli/memory.py, docs/performance.md)
    gradient_checkpointing: Any = "auto"
    # auto's budget in GB; null: what the model's training state (weights, gradients, AdamW moments) already takes
    # on each process, at least 0.5 GB, i.e. checkpoint once activations would more than double the memory
    activation_budget_gb: Optional[float] = None
    disable_dropout: bool = True  # as TRL: dropout would make the ln 2 check and the reference pass noisy
    shuffle: bool = True
    layout: Layout = Layout.prefix  # see Layout and docs/performance.md
    compile: bool = False  # torch.compile each transformer block (regional, dynamic shapes); pays off on GPUs
    group_by_length: bool = True  # batches of similar length (shuffled within mega-batches), less padding
    logging_every: int = 10  # updates between metric lines; update 0 is always logged
    # updates between held-out evaluations (eval/* records); 0: only before the first update and at the step's end.
    # Held-out pairs: split.eval_fraction of each D_t, or data.eval; without either, no eval/* records
    eval_every: int = 0
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
    # whether reflogp and gamma shard the scoring model over the processes as train shards the target (sdpo_cli/
    # scoring.py): auto (under an FSDP or ZeRO-3 launch, not otherwise) | true (the launch must be FSDP or ZeRO-3) |
    # false (every process holds the whole model). In no fingerprint: the same numbers to float rounding.
    shard: str = "auto"


@dataclass
class EvalConfig:
    # h4 (ARC 25-shot, HellaSwag 10, MMLU 5, TruthfulQA mc2 0) | an lm-eval task/group name, optionally NAME:SHOTS |
    # a task YAML file or a folder of them (local data); see docs/eval.md
    tasks: List[str] = field(default_factory=lambda: ["h4"])
    limit: Optional[int] = None  # documents per task (lm-eval's limit); None: every document
    batch_size: int = 8  # lm-eval requests per forward pass
    after_each_step: bool = False  # sdpo run: score base and every M_t as it is produced (cached per checkpoint)


@dataclass
class RuntimeConfig:
    # How this process runs, not what it computes: in no fingerprint (sdpo_cli/runtime.py applies it)
    threads: Optional[int] = None  # torch CPU threads per process; None: OMP_NUM_THREADS if set, else torch's default
    prefix_attention: PrefixAttention = PrefixAttention.auto  # train.layout prefix under sdpa: pieces | mask | auto
    head_chunk_mb: float = 32.0  # LM-head chunks: at most this many MiB of logits (and their work copies) at once
    # glibc (Linux) host allocations of at least this many MiB are mapped and returned to the system when freed;
    # null: glibc's own adaptive threshold, which keeps freed activations in the heap (docs/performance.md)
    mmap_threshold_mb: Optional[float] = 4.0


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
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)  # last: config.yaml gains it at its end


@dataclass
class Problem:
    """One thing wrong with a config: `key: text` (or `text` alone where it names the key itself) and a hint. `origin`
    names the command-line override it came from where that, not the config file, is the place to fix it."""

    key: str
    text: str
    hint: str
    origin: Optional[str] = None  # "override 'dpo.betta=0.2'"
    keyed: bool = True  # False: `text` names the key itself ("unknown config key 'dpo.betta'")
    refused: bool = False  # the value was refused, so the schema's default stands in for it

    @property
    def body(self) -> str:
        return f"{self.key}: {self.text}" if self.keyed else self.text

    @property
    def section(self) -> str:
        """The config section the key is in: `train` for train.layout."""
        return re.split(r"[.\[]", self.key, maxsplit=1)[0]


def report(where: str, problems: List[Problem]) -> ConfigError:
    """One ConfigError for all `problems` (at least one) of the config file `where`. One problem reads
    `<where>: <key>: <problem>` with its hint; several read `<where>: N problems: <key>: <problem>; <key>: ...`, and the
    hint line gives each one's hint after its key."""
    if len(problems) == 1:
        return ConfigError(f"{problems[0].origin or where}: {problems[0].body}", hint=problems[0].hint)
    lines = [f"{p.origin}: {p.body}" if p.origin else p.body for p in problems]
    hints = dict.fromkeys(f"{p.key}: {p.hint}" for p in problems if p.hint)  # in order, each once
    return ConfigError(f"{where}: {len(problems)} problems: " + "; ".join(lines), hint="; ".join(hints))


def load_config(path: Path | str, overrides: list[str] | None = None) -> SdpoConfig:
    """Merge defaults, the YAML file and dotlist overrides; validate; return a typed `SdpoConfig` with plain str values.
    Every problem found is reported in one ConfigError (exit code 2).

    `path` may also be a run directory: its recorded config (config.yaml, which every stage writes) with `run_dir`
    set to that directory, so that a copied or moved run works; the overrides still apply (a `run_dir=` one too)."""
    run_dir = Path(path).expanduser() if Path(path).expanduser().is_dir() else None
    path = config_file(path)
    file_cfg = _read(path)
    _resolve_paths(file_cfg, path.resolve().parent)
    if run_dir is not None:
        file_cfg.run_dir = str(run_dir.resolve())
    return _validated(file_cfg, str(path), overrides)


RECORDED = "config.yaml"  # the resolved config a run directory records (cli._record)


def config_file(path: Path | str) -> Path:
    """The YAML file a CONFIG argument names: the file itself, or a run directory's recorded config.yaml."""
    path = Path(path)
    if not path.expanduser().is_dir():
        return path
    if (path.expanduser() / RECORDED).is_file():
        return path / RECORDED
    raise ConfigError(f"{path}: a folder without {RECORDED}: neither a config file nor a run directory of sdpo",
                      hint=f"give the YAML config, or a run directory where an sdpo command has written {RECORDED} "
                           "(e.g. sdpo status runs/x)")


def _validated(file_cfg: DictConfig, where: str, overrides: list[str] | None) -> SdpoConfig:
    """`file_cfg` (a YAML file's keys, or the ones `start_config` builds, its paths already resolved) merged over the
    defaults, then `overrides`; every problem reported at once, against `where`."""
    for item in overrides or []:  # a malformed command line, before anything else
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value", hint="e.g. sdpo run CONFIG dpo.beta=0.2")

    problems: List[Problem] = []
    data = file_cfg.get("data")
    sources = data.get("sources") if isinstance(data, DictConfig) else None
    for i, source in enumerate(sources if isinstance(sources, ListConfig) else []):
        if isinstance(source, DictConfig):  # alone, so that a problem keeps its index (omegaconf drops it in lists)
            _merge_dropping(OmegaConf.structured(SourceConfig), source, where, problems, item=f"data.sources.{i}.")
    cfg = _merge_dropping(OmegaConf.structured(SdpoConfig), file_cfg, where, problems)
    for item in overrides or []:
        try:
            cfg.merge_with_dotlist([item])
        except OmegaConfBaseException as e:
            problems.append(_problem(e, origin=f"override {item!r}", written=item.split("=", 1)[0].strip()))

    missing = sorted(OmegaConf.missing_keys(cfg))
    problems += [Problem(k, f"missing value for key '{k}'", f"set it: {_dotted(k)}=...", keyed=False) for k in missing]
    if missing:
        raise report(where, problems)
    try:
        obj: SdpoConfig = _plain(OmegaConf.to_object(cfg))
    except OmegaConfBaseException as e:
        raise report(where, [*problems, _problem(e)]) from None
    for source in obj.data.sources + ([obj.data.eval] if obj.data.eval else []):
        if source.columns and source.format == Format.auto:  # a column mapping says which format it is for
            source.format = Format.columns.value
    problems += config_problems(obj, skip={p.section for p in problems if p.refused})
    if problems:
        raise report(where, problems)
    obj.run_dir = str(Path(obj.run_dir).expanduser().resolve())  # relative to the working directory
    return obj


# A start without a YAML file: sdpo run --model MODEL --data FILE_OR_ID [--data ...] [--run-dir DIR] [key=value ...]

COMMAND_LINE = "command line"  # where the problems of a config built from --model / --data are said to be
DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")  # the single-file sources (data/formats.py FILE_BUILDERS)


def start_config(model: str, data: List[str], run_dir: Optional[str] = None,
                 overrides: list[str] | None = None) -> SdpoConfig:
    """The config of `sdpo run --model MODEL --data A --data B [--run-dir DIR] [key=value ...]`: what a YAML file with
    these keys would give (model.base; one source per --data, in order, so that the natural split makes each one a
    step; run_dir, by default runs/<model name>-sdpo), every other key at its default, then the same overrides and
    checks as load_config. Paths are relative to the working directory."""
    node = OmegaConf.create({"run_dir": run_dir or default_run_dir(model), "model": {"base": model},
                             "data": {"sources": start_sources(data)}})
    _resolve_paths(node, Path.cwd())
    return _validated(node, COMMAND_LINE, overrides)


def default_run_dir(model: str) -> str:
    """runs/<model name>-sdpo, for a start without --run-dir: runs/stories260K-sdpo, runs/SOLAR-10.7B-v1.0-sdpo."""
    return f"runs/{_last_part(model) or 'model'}-sdpo"


def start_sources(data: List[str]) -> List[Dict[str, str]]:
    """One {name, path[, split]} per --data value, in order. `PATH_OR_ID:SPLIT` names a split of a hub id or a dataset
    folder (when the whole value is no existing path). Names come from the file stems or the ids' last parts (see
    `source_name`); a name already taken gets -2, -3, ...: a/x.jsonl, b/x.jsonl -> x, x-2."""
    sources: List[Dict[str, str]] = []
    taken: set[str] = set()
    for value in data:
        path, split = _path_and_split(value)
        name = stem = source_name(path)
        n = 2
        while name in taken:
            name, n = f"{stem}-{n}", n + 1
        taken.add(name)
        sources.append({"name": name, "path": path, **({"split": split} if split else {})})
    return sources


def source_name(path: str) -> str:
    """A source's name from its path or hub id: the file's stem without its data suffix (orca_dpo_pairs.sample.jsonl
    -> orca_dpo_pairs.sample), a folder's name, an id's last part (Intel/orca_dpo_pairs -> orca_dpo_pairs); characters
    other than letters, digits, `_`, `.` and `-` become `_`."""
    name = _last_part(path)
    for suffix in DATA_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return re.sub(r"[^\w.-]+", "_", name).strip("_.-") or "data"


def _last_part(value: str) -> str:
    """The last component of a path or hub id ('.' and '..' resolved: the folder's own name)."""
    parts = [p for p in re.split(r"[/\\]", value.strip()) if p]
    if parts and parts[-1] not in (".", ".."):
        return parts[-1]
    return Path(value).expanduser().resolve().name


def _path_and_split(value: str) -> tuple[str, Optional[str]]:
    """'HuggingFaceH4/ultrafeedback_binarized:train_prefs' -> (the id, 'train_prefs'); a value that exists as a path,
    or whose part after the last ':' holds a '/', is a path alone."""
    path, sep, split = value.rpartition(":")
    if sep and path and split and not re.search(r"[/\\]", split) and not Path(value).expanduser().exists():
        return path, split
    return value, None


def _read(path: Path) -> DictConfig:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found", hint="ls configs/  # e.g. sdpo run configs/fixtures.yaml")
    try:
        file_cfg = OmegaConf.load(path)
    except (YAMLError, OmegaConfBaseException) as e:
        raise ConfigError(f"{path}: not valid YAML: {_one_line(e)}", hint="check the file's indentation") from None
    if not isinstance(file_cfg, DictConfig):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level", hint="see configs/fixtures.yaml")
    return file_cfg


def _merge_dropping(schema: DictConfig, node: DictConfig, where: str, problems: List[Problem], item: str = ""):
    """`schema` merged with `node`. A key that omegaconf refuses (unknown, wrong type, not one of its Choice) becomes a
    Problem and is dropped from `node`, and the merge is tried again, so that every such key is reported at once.
    `item`: the key prefix of `node` when it is a list item ('data.sources.0.')."""
    while True:
        try:
            return OmegaConf.merge(schema, node)
        except OmegaConfBaseException as e:
            problem = _problem(e, item=item)
            if not _drop(node, str(getattr(e, "full_key", None) or "")):  # not a key of `node`: report what we have
                raise report(where, [*problems, problem]) from None
            problems.append(problem)


def _drop(node: DictConfig, key: str) -> bool:
    """Delete the dotted `key` from `node`; False if it is not there (or not under mappings only)."""
    *parents, last = _dotted(key).split(".")
    for part in parents:
        if not isinstance(node, DictConfig) or part not in node:
            return False
        node = node[part]
    if not isinstance(node, DictConfig) or last not in node:
        return False
    del node[last]
    return True


def _dotted(key: str) -> str:
    """omegaconf's 'data.sources[1].format' as the dotlist key a user writes: 'data.sources.1.format'."""
    return re.sub(r"\[(\d+)\]", r".\1", key)


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split("\n")[0].split())


def _problem(e: OmegaConfBaseException, origin: Optional[str] = None, item: str = "", written: str = "") -> Problem:
    """omegaconf's error as a Problem. A value outside its Choice is reported as the section checks would (`<key>:
    unknown <what> '<value>'`, with the allowed values), and against the file even when an override set it. An
    unknown key is named in full (`written`: the key of the override as typed, which omegaconf cuts at the first
    unknown part) with the valid keys it may have meant (`_suggest`)."""
    key = str(getattr(e, "full_key", None) or "")
    # An unknown key is a ConfigKeyError from the YAML merge but a ConfigAttributeError from a dotlist override.
    if isinstance(e, (ConfigKeyError, ConfigAttributeError)):
        if item:
            key = item + key  # a list item merged alone: omegaconf knows only the key inside it
        elif "." not in key and getattr(getattr(e, "object_type", None), "__name__", "") == "SourceConfig":
            key = f"data.sources[].{key}"  # omegaconf drops the path of keys inside list items
        key = _dotted(written or key)
        suggestions = _suggest(key)
        hint = f"did you mean {_either(suggestions)}?" if suggestions else "valid keys are listed in docs/configs.md"
        return Problem(key, f"unknown config key '{key}'", hint, origin, keyed=False)
    key = item + key
    choice = _choice_of(getattr(e, "object_type", None), getattr(e, "key", None))
    if isinstance(e, ValidationError) and choice is not None:
        return dataclasses.replace(_choice_problem(_dotted(key), choice, getattr(e, "value", None)), refused=True)
    if isinstance(e, ValidationError):
        return Problem(key, f"bad value for '{key}': {_one_line(e)}", "see docs/configs.md for its type", origin,
                       keyed=False, refused=True)
    return Problem(key, _one_line(e), "see docs/configs.md", origin, keyed=False)


def _either(options: List[str]) -> str:
    return " or ".join(options) if len(options) < 3 else ", ".join(options[:-1]) + " or " + options[-1]


def _inner(hint: Any) -> tuple[Optional[type], bool]:
    """The config dataclass a field of type `hint` holds, if any (through Optional and List), and whether a list."""
    if dataclasses.is_dataclass(hint):
        return hint, False
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is list and args:
        return _inner(args[0])[0], True
    if typing.get_origin(hint) is typing.Union and len(args) == 1:
        return _inner(args[0])
    return None, False


def _schema_at(parts: List[str]) -> Optional[type]:
    """The config dataclass at the dotted path `parts` ([] is SdpoConfig; ['data', 'sources', '0'] a SourceConfig)."""
    kind: Optional[type] = SdpoConfig
    many = False
    for part in parts:
        if many:  # a list index
            if not (part.isdigit() or part == "N"):
                return None
            many = False
        elif kind is None or part not in {f.name for f in dataclasses.fields(kind)}:
            return None
        else:
            kind, many = _inner(typing.get_type_hints(kind)[part])
    return None if many else kind


@functools.cache
def _schema_keys() -> tuple[str, ...]:
    """Every key of the schema, dotted; the keys of a list item with N for its index (data.sources.N.limit)."""
    def walk(kind: type, prefix: str):
        for name, hint in typing.get_type_hints(kind).items():
            inner, many = _inner(hint)
            if inner is None:
                yield prefix + name
            else:
                yield from walk(inner, f"{prefix}{name}.N." if many else f"{prefix}{name}.")
    return tuple(walk(SdpoConfig, ""))


def _suggest(key: str) -> List[str]:
    """The valid keys an unknown dotted `key` may have meant, in full: a close key of its own section (dpo.bta ->
    dpo.beta), else every key of that name in any section (beta, train.beta -> dpo.beta), else the closest key
    (trian.lerning_rate -> train.learning_rate), else the keys with the closest name (bta -> dpo.beta)."""
    *parent, name = key.split(".")
    kind = _schema_at(parent)
    if kind is not None:  # its section's own keys (not the sections within: `limit` is no typo of `split`)
        hints = typing.get_type_hints(kind)
        close = difflib.get_close_matches(name, [k for k, hint in hints.items() if _inner(hint)[0] is None], n=1)
        if close:
            return [".".join([*parent, close[0]])]
    keys = _schema_keys()
    leaves = {k: k.rsplit(".", 1)[-1] for k in keys}
    same = [k for k in keys if leaves[k] == name]
    if same:
        return same
    close = difflib.get_close_matches(key, keys, n=1)
    if close:
        return close
    names = difflib.get_close_matches(name, sorted(set(leaves.values())), n=1)
    return [k for k in keys if names and leaves[k] == names[0]]


_NOUNS = {DType: "dtype", Format: "format", Strategy: "strategy", Loss: "loss", Schedule: "schedule", Layout: "layout"}


def _choice_problem(key: str, choice: type[Choice], value: Any) -> Problem:
    text = "cannot be null" if value is None else f"unknown {_NOUNS.get(choice, 'value')} {str(value)!r}"
    hint = "use one of " + " | ".join(choice.values())
    if isinstance(value, bool):  # YAML (and a dotlist override) reads a bare no / off as false
        hint += " (quoted: YAML reads a bare no as false)"
    return Problem(key, text, hint)


def _choice_of(schema: Any, name: Any) -> Optional[type[Choice]]:
    """The Choice enum that is the type of field `name` of dataclass `schema`, if it is one."""
    if not (isinstance(schema, type) and dataclasses.is_dataclass(schema) and isinstance(name, str)):
        return None
    kind = typing.get_type_hints(schema).get(name)
    return kind if isinstance(kind, type) and issubclass(kind, Choice) else None


def _plain(obj: Any) -> Any:
    """`obj` (a dataclass tree from OmegaConf.to_object) with every Choice member replaced by its plain str value."""
    if isinstance(obj, Enum):
        return obj.value
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            setattr(obj, f.name, _plain(getattr(obj, f.name)))
        return obj
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    return obj


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
    if isinstance(dpo, DictConfig) and dpo.get("reference") not in (None, *STARTS):
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
    """The checks a schema cannot express, on a config built by hand. Raises one ConfigError naming every problem."""
    problems = config_problems(cfg)
    if problems:
        raise report(where, problems)


def config_problems(cfg: SdpoConfig, skip: typing.Collection[str] = ()) -> List[Problem]:
    """Every problem of `cfg`, section by section; a section's checks are skipped if it (or a section they read) is in
    `skip`, the sections that already have a problem (their refused values were dropped, so their checks would judge
    defaults)."""
    problems = _choice_problems(cfg)  # none after load_config: omegaconf checked them
    for sections, check in _CHECKS:
        if not skip or not set(sections) & set(skip):
            problems += check(cfg)
    return problems


def _choice_problems(obj: Any, prefix: str = "") -> List[Problem]:
    """The Choice-typed values of a hand-built dataclass tree that are not one of their choices."""
    problems = []
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), f"{prefix}{f.name}"
        choice = _choice_of(type(obj), f.name)
        if choice is not None and value not in choice.values():
            problems.append(_choice_problem(key, choice, value))
        for i, item in enumerate(value if isinstance(value, list) else [value]):
            if dataclasses.is_dataclass(item):
                problems += _choice_problems(item, f"{key}.{i}." if isinstance(value, list) else f"{key}.")
    return problems


def _model_problems(cfg: SdpoConfig) -> List[Problem]:
    quantization, problems = cfg.model.quantization, []
    if quantization is None:
        return problems
    if quantization not in QUANTIZATIONS:
        return [Problem("model.quantization", f"unknown value {quantization!r}",
                        f"use one of {' | '.join(QUANTIZATIONS)} | null")]
    if not cfg.peft.enabled:
        problems.append(Problem("model.quantization", "a quantized model can only be trained through a LoRA adapter "
                                "(QLoRA)", "set peft.enabled=true, or model.quantization=null for full fine-tuning"))
    if importlib.util.find_spec("bitsandbytes") is None:
        problems.append(Problem("model.quantization", "the bitsandbytes package is not installed",
                                "pip install 'sdpo[qlora]'  # or set model.quantization=null"))
    return problems


def is_jinja(template: str) -> bool:
    """A model.chat_template value that is a Jinja template rather than a built-in's name."""
    return "{{" in template or "{%" in template


def chat_template_problems(template: Optional[str]) -> List[Problem]:
    """model.chat_template: null, a name of CHAT_TEMPLATE_NAMES, or a Jinja template. Anything else would be used as
    a template that renders itself for every prompt (and the error would come later, blaming the prompts' length)."""
    if template is None or template in CHAT_TEMPLATE_NAMES or is_jinja(template):
        return []
    close = difflib.get_close_matches(template.lower(), CHAT_TEMPLATE_NAMES, n=1)
    hint = (f"did you mean {close[0]}? " if close else "") + f"use one of {' | '.join(CHAT_TEMPLATE_NAMES)}, a Jinja " \
        "template (with {{ or {%), or null for the tokenizer's own"
    return [Problem("model.chat_template", f"unknown chat template {template!r}", hint)]


def _chat_template_problems(cfg: SdpoConfig) -> List[Problem]:
    return chat_template_problems(cfg.model.chat_template)


def _data_problems(cfg: SdpoConfig) -> List[Problem]:
    data, problems = cfg.data, []
    if not data.sources:
        problems.append(Problem("data.sources", "no data sources", "add at least one {name, path} under data.sources"))
    names = [s.name for s in data.sources]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        problems.append(Problem("data.sources", f"duplicate source name(s) {dupes}", "give every source its own name"))
    for i, source in enumerate(data.sources + ([data.eval] if data.eval else [])):
        key = f"data.sources.{i}" if i < len(data.sources) else "data.eval"
        if source.format == Format.columns and not source.columns:
            problems.append(Problem(f"{key}.columns", "format 'columns' needs a column mapping",
                                    "e.g. columns: {prompt: q, ...}"))
        elif source.columns and source.format not in (Format.columns, Format.auto):
            problems.append(Problem(f"{key}.columns", f"a column mapping is only read by format 'columns', not "
                                    f"'{source.format}'", "remove columns, or set format: columns (or auto)"))
        if source.limit is not None and source.limit < 1:
            problems.append(Problem(f"{key}.limit", "must be at least 1", "remove it to use every row"))
    if data.max_length < 2:
        problems.append(Problem("data.max_length", "must be at least 2", "e.g. data.max_length=1024"))
    mpl = data.max_prompt_length
    if mpl is not None and not 1 <= mpl < data.max_length:
        problems.append(Problem("data.max_prompt_length", f"{mpl} must be between 1 and data.max_length - 1",
                                "or set it to null"))
    return problems


def _split_problems(cfg: SdpoConfig) -> List[Problem]:
    split, problems = cfg.split, []
    names = [s.name for s in cfg.data.sources]
    if split.strategy == Strategy.natural:
        for t, step in enumerate(split.steps or [], start=1):
            if not step:
                problems.append(Problem("split.steps", f"step {t} lists no source",
                                        "e.g. split.steps=[[orca],[ultrafeedback]]"))
            problems += [Problem("split.steps", f"step {t} names unknown source {name!r}", f"known sources: {names}")
                         for name in step if name not in names]
        if split.fractions is not None:
            problems.append(Problem("split.fractions", "not used by strategy 'natural'",
                                    "remove it, or pick split.strategy=random"))
        return problems + _eval_fraction_problems(cfg) + _curriculum_score_problems(cfg)
    fractions, strategy = split.fractions, str(split.strategy)
    if not fractions:
        problems.append(Problem("split.fractions", f"strategy {strategy!r} needs fractions",
                                "e.g. split.fractions=[0.5,0.5]"))
    elif any(f <= 0 for f in fractions) or not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
        problems.append(Problem("split.fractions", f"{list(fractions)} must be positive and sum to 1",
                                "e.g. [0.1667, 0.8333]"))
    if split.steps is not None:
        problems.append(Problem("split.steps", f"only used by strategy 'natural', not {strategy!r}",
                                "remove split.steps"))
    return problems + _eval_fraction_problems(cfg) + _curriculum_score_problems(cfg)


def _curriculum_score_problems(cfg: SdpoConfig) -> List[Problem]:
    if cfg.split.curriculum_score != CurriculumScore.gamma and cfg.split.strategy != Strategy.curriculum:
        return [Problem("split.curriculum_score", f"only used by strategy 'curriculum', not '{cfg.split.strategy}'",
                        "remove it, or set split.strategy=curriculum")]
    return []


def _eval_fraction_problems(cfg: SdpoConfig) -> List[Problem]:
    fraction = cfg.split.eval_fraction
    if not 0 <= fraction < 1:
        return [Problem("split.eval_fraction", f"{fraction} must be in [0, 1)", "e.g. split.eval_fraction=0.05")]
    if fraction and cfg.data.eval:
        return [Problem("split.eval_fraction", "and data.eval both name held-out pairs",
                        "keep one: data.eval (the same pairs for every step) or split.eval_fraction (per step)")]
    return []


F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")  # dpo.f_divergence_type
# the losses TRL lets take another f-divergence: the f-DPO reparameterisation leaves β·log Z(x), which cancels only in
# the chosen − rejected reward difference
F_DIVERGENCE_LOSSES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")


def loss_names(loss: Any) -> List[Any]:
    """dpo.loss as a list of names: `sigmoid` -> [sigmoid]; a list stays as it is."""
    return list(loss) if isinstance(loss, (list, tuple, ListConfig)) else [loss]


def _dpo_problems(cfg: SdpoConfig) -> List[Problem]:
    dpo, problems = cfg.dpo, []
    if dpo.beta <= 0:
        problems.append(Problem("dpo.beta", "must be positive", "0.1 is the default (Zephyr's paper: 0.1)"))
    if not 0 <= dpo.label_smoothing < 0.5:
        problems.append(Problem("dpo.label_smoothing", "must be in [0, 0.5)", "0 is plain DPO"))
    names = loss_names(dpo.loss)
    if not names:
        problems.append(Problem("dpo.loss", "an empty list", "e.g. dpo.loss=sigmoid or dpo.loss=[sigmoid,sft]"))
    unknown = [name for name in names if not isinstance(name, str) or name not in LOSSES]
    problems += [dataclasses.replace(problem, hint=problem.hint + "; or a list of them, e.g. [sigmoid,sft]")
                 for problem in (_choice_problem("dpo.loss", Loss, name) for name in unknown)]
    names = [name for name in names if name not in unknown]
    if dpo.loss_weights is not None and len(dpo.loss_weights) != len(names):
        problems.append(Problem("dpo.loss_weights", f"{len(dpo.loss_weights)} weights for {len(names)} losses",
                                "one weight per dpo.loss entry, e.g. dpo.loss=[sigmoid,sft] "
                                "dpo.loss_weights=[1.0,0.5]; or null for 1.0 each"))
    if "exo_pair" in names and dpo.label_smoothing == 0:
        problems.append(Problem("dpo.label_smoothing", "must be above 0 for loss exo_pair (its ε)",
                                "the EXO paper recommends dpo.label_smoothing=0.001"))
    if dpo.ld_alpha is not None and not 0 <= dpo.ld_alpha <= 1:
        problems.append(Problem("dpo.ld_alpha", f"{dpo.ld_alpha} must be in [0, 1]",
                                "LD-DPO's α, e.g. dpo.ld_alpha=0.5; null: off"))
    if dpo.f_divergence_type not in F_DIVERGENCES:
        problems.append(Problem("dpo.f_divergence_type", f"unknown f-divergence {dpo.f_divergence_type!r}",
                                "use one of " + " | ".join(F_DIVERGENCES)))
    elif dpo.f_divergence_type != "reverse_kl" and not set(names) <= set(F_DIVERGENCE_LOSSES):
        others = ", ".join(str(n) for n in names if n not in F_DIVERGENCE_LOSSES)
        problems.append(Problem("dpo.f_divergence_type", f"{dpo.f_divergence_type} does not apply to loss {others}",
                                "only " + ", ".join(F_DIVERGENCE_LOSSES) + " take one; else "
                                "dpo.f_divergence_type=reverse_kl"))
    if dpo.use_weighting and {"aot", "aot_unpaired"} & set(names):
        problems.append(Problem("dpo.use_weighting", "does not apply to aot / aot_unpaired: they sort the pairs, "
                                "so per-pair weights would land on other pairs", "dpo.use_weighting=false"))
    if dpo.discopop_tau <= 0:
        problems.append(Problem("dpo.discopop_tau", "must be positive", "the DiscoPOP paper uses 0.05"))
    if not dpo.reference:
        problems.append(Problem("dpo.reference", "empty", f"use {' | '.join(STARTS)} | a model path"))
    return problems


def _train_problems(cfg: SdpoConfig) -> List[Problem]:
    train, problems = cfg.train, []
    if train.eval_every < 0:
        problems.append(Problem("train.eval_every", "must be 0 (start and end only) or positive",
                                "e.g. train.eval_every=50"))
    for key in ("per_device_batch_size", "gradient_accumulation", "logging_every"):
        if getattr(train, key) < 1:
            problems.append(Problem(f"train.{key}", "must be at least 1", f"e.g. train.{key}=1"))
    if train.save_every < 0:
        problems.append(Problem("train.save_every", "must be 0 (off) or positive", "e.g. train.save_every=500"))
    if train.max_updates is not None and train.max_updates < 1:
        problems.append(Problem("train.max_updates", "must be at least 1", "or null to train for train.epochs"))
    if train.epochs <= 0:
        problems.append(Problem("train.epochs", "must be positive", "e.g. train.epochs=1"))
    if not 0 <= train.warmup_ratio < 1:
        problems.append(Problem("train.warmup_ratio", "must be in [0, 1)", "e.g. 0.1"))
    if train.gradient_checkpointing not in (True, False, "auto"):
        problems.append(Problem("train.gradient_checkpointing", f"must be true, false or auto, not "
                                f"{train.gradient_checkpointing!r}", "auto: on when activations pass the budget"))
    if train.activation_budget_gb is not None and train.activation_budget_gb <= 0:
        problems.append(Problem("train.activation_budget_gb", "must be positive",
                                "or null: the memory of the model's training state"))
    return problems


def _peft_problems(cfg: SdpoConfig) -> List[Problem]:
    if cfg.peft.enabled and (cfg.peft.r < 1 or cfg.peft.alpha <= 0):
        return [Problem("peft.r", "LoRA rank and alpha must be positive", "e.g. peft.r=16 peft.alpha=32")]
    return []


def _inference_problems(cfg: SdpoConfig) -> List[Problem]:
    problems = []
    if cfg.inference.batch_size < 1:
        problems.append(Problem("inference.batch_size", "must be at least 1", "e.g. inference.batch_size=16"))
    if inference_shard(cfg) is ...:
        problems.append(Problem("inference.shard", f"must be auto, true or false, not {cfg.inference.shard!r}",
                                "e.g. inference.shard=auto"))
    return problems


def inference_shard(cfg: SdpoConfig):
    """inference.shard as None (auto), True or False; Ellipsis if it is none of them. YAML's true / false arrive as
    the strings 'True' / 'False' (the key is a string, for `auto`)."""
    return {"auto": None, "true": True, "false": False}.get(str(cfg.inference.shard).lower(), ...)


def _runtime_problems(cfg: SdpoConfig) -> List[Problem]:
    problems = []
    if cfg.runtime.threads is not None and cfg.runtime.threads < 1:
        problems.append(Problem("runtime.threads", "must be at least 1",
                                "or null: OMP_NUM_THREADS if set, else torch's default"))
    if cfg.runtime.head_chunk_mb <= 0:
        problems.append(Problem("runtime.head_chunk_mb", "must be positive", "e.g. runtime.head_chunk_mb=32"))
    if cfg.runtime.mmap_threshold_mb is not None and not 0 < cfg.runtime.mmap_threshold_mb <= 32:
        problems.append(Problem("runtime.mmap_threshold_mb", "must be in (0, 32] (glibc's limit)",
                                "e.g. runtime.mmap_threshold_mb=4, or null for glibc's default"))
    return problems


def _eval_problems(cfg: SdpoConfig) -> List[Problem]:
    problems = eval_problems(cfg.eval.tasks, cfg.eval.limit)
    if cfg.eval.batch_size < 1:
        problems.append(Problem("eval.batch_size", "must be at least 1", "e.g. eval.batch_size=8"))
    return problems


# (sections a check reads, the check), in the order problems are reported
_CHECKS: tuple[tuple[tuple[str, ...], Callable[[SdpoConfig], List[Problem]]], ...] = (
    (("model", "peft"), _model_problems),
    (("model",), _chat_template_problems),
    (("data",), _data_problems),
    (("split", "data"), _split_problems),
    (("dpo",), _dpo_problems),
    (("train",), _train_problems),
    (("peft",), _peft_problems),
    (("inference",), _inference_problems),
    (("eval",), _eval_problems),
    (("runtime",), _runtime_problems),
)


def eval_problems(tasks: List[str], limit: Optional[int], key: str = "eval.tasks") -> List[Problem]:
    """eval.tasks (or --tasks) and eval.limit (or --limit): their form only; names and files are checked by eval."""
    hint = "e.g. eval.tasks=[h4] or [arc_easy:25, path/to/task.yaml]; see docs/eval.md"
    problems = [] if tasks else [Problem(key, "no tasks", hint)]
    for spec in tasks:
        task, shots = split_task_spec(spec) if isinstance(spec, str) else ("", None)
        if not task:
            problems.append(Problem(key, f"empty task name in {list(tasks)}", hint))
        elif task.lower() == "h4" and shots is not None:
            problems.append(Problem(key, f"h4 has its own shot counts (25/10/5/0); {spec!r} cannot change them",
                                    "write h4, or name one task with its shots, e.g. arc_challenge:5"))
    if limit is not None and limit < 1:
        problems.append(Problem("eval.limit", "must be at least 1", "or null to score every document"))
    return problems


def validate_eval(tasks: List[str], limit: Optional[int], where: str = "config", key: str = "eval.tasks") -> None:
    """eval_problems as one ConfigError."""
    problems = eval_problems(tasks, limit, key)
    if problems:
        raise report(where, problems)


def num_steps(cfg: SdpoConfig) -> int:
    """T, the number of sDPO steps the split produces."""
    if cfg.split.strategy == Strategy.natural:
        return len(cfg.split.steps) if cfg.split.steps else len(cfg.data.sources)
    return len(cfg.split.fractions or [])


def to_yaml(cfg: SdpoConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def section(cfg: SdpoConfig, *keys: str) -> dict:
    """Plain-dict view of some config sections, for fingerprints and meta.json (Choice values as their str)."""
    full = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True, enum_to_str=True)
    return {k: full[k] for k in keys}  # type: ignore[index]
