"""`sdpo init`: a commented YAML config for your own data, printed to stdout.

Run as: sdpo init [--model MODEL] [--data FILE_OR_ID ...] [--run-dir DIR] > my.yaml

Every key a user is likely to touch is written with its default (the schema's dataclasses in config.py, so the text
never drifts from them) and a one-line comment; the data formats of data/formats.py are shown as one example row
each. --model / --data / --run-dir fill in model.base, data.sources (as `start_config` names them) and run_dir, so
that `sdpo run my.yaml` trains what `sdpo run --model ... --data ...` would. Without them, placeholders stand in that
load (load_config accepts the file as printed) but must be edited before a run. A key that the schema lacks is left
out, so the text always loads.
"""

from __future__ import annotations

import dataclasses
import json
from enum import Enum
from pathlib import Path
from typing import Any, List, Optional, Sequence

import yaml

from sdpo_cli import config as C

PLACEHOLDER_MODEL = "your-org/your-sft-model"  # a hub id or a local folder; edit it
PLACEHOLDER_DATA = "my_pairs.jsonl"
COMMENT_COLUMN = 44  # comments start here, where the key and value leave room

HEADER = """\
# sdpo config for your own data (stepwise DPO, Kim et al. 2024, arXiv:2403.19270). Each sDPO step t trains the DPO
# loss on D_t against the model of step t-1 as the reference; with split.strategy natural each data source below is
# one step, in order. Every key and its default: docs/configs.md.
#   sdpo run my.yaml                       every stage of every step; prints the last checkpoint's folder
#   sdpo status my.yaml                    what is finished, stale or missing
#   sdpo gamma my.yaml                     mean γ of base, step-1, ... on the last step's data (the paper's Fig. 2)
#   sdpo run my.yaml dpo.beta=0.2          any key can be overridden on the command line
# Relative paths are relative to this file's folder; run_dir is relative to the working directory.
"""

Q = "What is 2+3?"
USER, GOOD, BAD = {"role": "user", "content": Q}, {"role": "assistant", "content": "5."}, \
    {"role": "assistant", "content": "6."}
# (format auto detects, what the lines under it say, one JSON Lines row): shown as comments, loaded by the tests
EXAMPLE_ROWS = (
    ("orca", ["strings: system (may be empty), question, chosen, rejected (Intel/orca_dpo_pairs):"],
     {"system": "You are a helpful assistant.", "question": Q, "chosen": "2+3 = 5.", "rejected": "2+3 = 6."}),
    ("ultrafeedback", ["message lists; the prompt is what chosen and rejected share; detected by score_chosen,",
                       "score_rejected or prompt_id (HuggingFaceH4/ultrafeedback_binarized; argilla: *-rating)"],
     {"prompt": Q, "score_chosen": 9.0, "score_rejected": 2.0, "chosen": [USER, GOOD], "rejected": [USER, BAD]}),
    ("preference", ["TRL's rows. Strings, trained as raw text (no chat template; EOS appended):"],
     {"prompt": Q, "chosen": " 5.", "rejected": " 6."}),
    ("preference", ["or conversational, rendered with the chat template:"],
     {"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]}),
    ("preference", ["without prompt, chosen and rejected are whole texts or conversations and the prompt is",
                    "what they share (TRL's implicit prompt):"],
     {"chosen": [USER, GOOD], "rejected": [USER, BAD]}),
    ("columns", ["any column names, mapped with columns: {prompt: instruction, chosen: good, rejected: bad}",
                 "(and system: <column>, optional); a mapping implies format: columns:"],
     {"instruction": Q, "good": "5.", "bad": "6."}),
)
EXAMPLE_COLUMNS = {"prompt": "instruction", "chosen": "good", "rejected": "bad"}  # the columns example's mapping


def init_yaml(model: Optional[str] = None, data: Optional[Sequence[str]] = None, run_dir: Optional[str] = None) -> str:
    """The commented config. `model`, `data` and `run_dir` as given on the command line (relative to the working
    directory); local paths are written absolute, since the file's own paths are read relative to its folder."""
    sources = C.start_sources(list(data)) if data else [{"name": "mydata", "path": PLACEHOLDER_DATA}]
    for source in sources:
        source["path"] = _absolute(source["path"]) if data else source["path"]
    base = _absolute(model) if model else PLACEHOLDER_MODEL
    run = run_dir or (C.default_run_dir(model) if model else "runs/my-sdpo")

    d = {cls: cls() for cls in (C.DataConfig, C.SplitConfig, C.DPOConfig, C.TrainConfig, C.LoraConfig,
                                C.InferenceConfig, C.EvalConfig, C.RuntimeConfig)}
    model_defaults = {f.name: f.default for f in dataclasses.fields(C.ModelConfig)}
    source_defaults = {f.name: f.default for f in dataclasses.fields(C.SourceConfig)}
    data_d, split_d, dpo_d, train_d = d[C.DataConfig], d[C.SplitConfig], d[C.DPOConfig], d[C.TrainConfig]
    peft_d, inference_d, eval_d, runtime_d = d[C.LoraConfig], d[C.InferenceConfig], d[C.EvalConfig], d[C.RuntimeConfig]
    top = C.SdpoConfig.__dataclass_fields__

    out: List[str] = [HEADER]
    out += _entries(None, top, [
        ("run_dir", run, "every artifact of this run goes here (relative to the working directory)"),
        ("seed", top["seed"].default, "the split, the batch order and the model RNGs"),
    ])
    out.append("")
    out.append("model:")
    out += _entries(C.ModelConfig, None, [
        ("base", base, "the SFT model S = M_0: a hub id or a local folder (EDIT)" if not model else
         "the SFT model S = M_0: a hub id or a local folder"),
        ("dtype", model_defaults["dtype"], "keep float32 for training; bf16 compute: train.mixed_precision=bf16"),
        ("chat_template", model_defaults["chat_template"],
         "null: the tokenizer's own (else solar); or chatml, llama3, ... (docs/configs.md)"),
        ("pad_token", model_defaults["pad_token"], "for a tokenizer without one; null: unk, else EOS"),
        ("attn_implementation", model_defaults["attn_implementation"], "sdpa | eager | flash_attention_2 | null"),
        ("trust_remote_code", model_defaults["trust_remote_code"], "models whose code is on the hub"),
        ("quantization", model_defaults["quantization"], "QLoRA: 4bit | 8bit (needs peft.enabled: true)"),
    ], indent=2)
    out.append("")
    out.append("data:")
    out += _formats()
    out.append(_line("  sources:", "one sDPO step per source, in this order (split.strategy natural)"))
    for source in sources:
        out += _source(source, source_defaults)
    out.append(_line("  # eval: {name: heldout, path: heldout.jsonl}", "held-out pairs (sdpo gamma --data eval)"))
    out += _entries(C.DataConfig, None, [
        ("max_length", data_d.max_length, "prompt + completion tokens; completions are cut from the right"),
        ("max_prompt_length", data_d.max_prompt_length,
         "longer prompts lose text from the left of their content (BOS, template kept); null: no cap"),
        ("drop_ties", getattr(data_d, "drop_ties", None), "skip rows whose chosen and rejected scores are equal"),
    ], indent=2)
    out.append("")
    out.append("split:")
    out += _entries(C.SplitConfig, None, [
        ("strategy", split_d.strategy, "natural: whole sources per step | stratified | random | curriculum"),
        ("steps", split_d.steps, "natural: source names per step, e.g. [[a], [b, c]]; null: one step per source"),
        ("eval_fraction", getattr(split_d, "eval_fraction", None), "share of each step's pairs held out for eval/*"),
    ], indent=2)
    out.append(_line("  # fractions: [0.5, 0.5]", "stratified | random | curriculum: share of pairs per step"))
    out.append(_line("  # curriculum_score: gamma", "curriculum: gamma | gamma_per_token (what it sorts by)"))
    out.append("")
    out.append("dpo:")
    out += _entries(C.DPOConfig, None, [
        ("beta", dpo_d.beta, "β: how far the policy may move from the reference (Zephyr's paper: 0.1)"),
        ("loss", dpo_d.loss, "TRL's loss_type names (docs/losses.md): sigmoid | ipo | hinge | robust | sft | ..."),
        ("loss_weights", dpo_d.loss_weights, "for a list: loss: [sigmoid, sft] with loss_weights: [1.0, 0.5]"),
        ("label_smoothing", dpo_d.label_smoothing, "ε of cDPO (sigmoid), robust, exo_pair (needs > 0), aot; 0: plain"),
        ("reference", dpo_d.reference, "previous: M_{t-1} (sDPO) | base: S | a model path or hub id"),
        ("target_init", dpo_d.target_init, "where step t's target starts: previous (M_{t-1}) | base (S)"),
    ], indent=2)
    out.append("")
    out.append("train:")
    out += _entries(C.TrainConfig, None, [
        ("learning_rate", train_d.learning_rate, "peak AdamW rate (Zephyr's 5e-7); small models need more"),
        ("lr_schedule", train_d.lr_schedule, " | ".join(C.SCHEDULES)),
        ("warmup_ratio", train_d.warmup_ratio, "share of each step's updates spent warming up"),
        ("epochs", train_d.epochs, "epochs over D_t per step"),
        ("max_updates", train_d.max_updates, "if set: exactly this many updates per step (ignores epochs)"),
        ("per_device_batch_size", train_d.per_device_batch_size, "pairs per forward pass on each device"),
        ("gradient_accumulation", train_d.gradient_accumulation, "global batch = batch × accumulation × processes"),
        ("max_grad_norm", train_d.max_grad_norm, "gradient clipping; null: none"),
        ("mixed_precision", train_d.mixed_precision, "'no' (quoted) | bf16 | fp16: autocast; weights stay in dtype"),
        ("gradient_checkpointing", train_d.gradient_checkpointing,
         "true | false | auto: on when the longest batch's activations pass the budget"),
        ("logging_every", train_d.logging_every, "updates between metric lines (and log records)"),
        ("eval_every", getattr(train_d, "eval_every", None), "updates between held-out eval/* records; 0: start/end"),
        ("save_every", train_d.save_every, "updates between resumable states; 0: never"),
        ("report_to", train_d.report_to, "trackers: [tensorboard] or [wandb]"),
    ], indent=2)
    out.append("")
    out.append("peft:")
    out += _entries(C.LoraConfig, None, [
        ("enabled", peft_d.enabled, "train a LoRA adapter per step (pip install 'sdpo[lora]'), merged into M_t"),
        ("r", peft_d.r, "LoRA rank"),
        ("alpha", peft_d.alpha, "the update is scaled by alpha / r"),
        ("dropout", peft_d.dropout, "dropout on the adapter's input"),
        ("target_modules", peft_d.target_modules, "null: peft's default (Llama: q_proj, v_proj)"),
    ], indent=2)
    out.append("")
    out.append("inference:")
    out += _entries(C.InferenceConfig, None, [
        ("batch_size", inference_d.batch_size, "pairs per forward pass in reflogp and gamma"),
    ], indent=2)
    out.append("")
    out.append("eval:")
    out += _entries(C.EvalConfig, None, [
        ("tasks", eval_d.tasks, "sdpo eval: h4 | lm-eval NAME[:SHOTS] | task YAML (pip install 'sdpo[eval]')"),
        ("after_each_step", eval_d.after_each_step, "sdpo run: benchmark every M_t as it is written"),
    ], indent=2)
    out.append("")
    out.append("runtime:")
    out += _entries(C.RuntimeConfig, None, [
        ("threads", runtime_d.threads, "torch CPU threads; null: OMP_NUM_THREADS, else torch's default"),
    ], indent=2)
    return "\n".join(out) + "\n"


def _formats(width: int = 118) -> List[str]:
    """The formats and their example rows, as comments under data:."""
    lines = ["  # Data formats (format: auto detects them from the column names), one JSON Lines row each:"]
    shown = None
    for fmt, notes, row in EXAMPLE_ROWS:
        head = f"  #   {fmt if fmt != shown else '':<15}"
        shown = fmt
        for note in notes:
            lines.append(head + note)
            head = "  #" + " " * 18
        lines += [("  #" + " " * 18 + "  ") + text for text in _wrap_json(row, width - 23)]
    return lines


def _wrap_json(row: dict, width: int) -> List[str]:
    """`row` as JSON over lines of at most about `width` characters, broken between its keys."""
    items = [f"{json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}" for k, v in row.items()]
    lines, current = [], "{"
    for i, item in enumerate(items):
        piece = item + ("}" if i == len(items) - 1 else ",")
        if len(current) > 1 and len(current) + 1 + len(piece) > width:
            lines.append(current)
            current = " " + piece
        else:
            current += ("" if current == "{" else " ") + piece
    return lines + [current]


def _source(source: dict, defaults: dict) -> List[str]:
    lines = [_line(f"    - name: {_scalar(source['name'])}", "short name: split.steps and the pairs' ids use it"),
             _line(f"      path: {_scalar(source['path'])}",
                   "a .jsonl/.json/.parquet/.csv file, a dataset folder or a hub id"
                   + (" (EDIT)" if source["path"] == PLACEHOLDER_DATA else "")),
             _line(f"      format: {_scalar(defaults['format'])}", " | ".join(C.FORMATS))]
    split = source.get("split")
    if split:
        lines.append(_line(f"      split: {_scalar(split)}", "the dataset split (hub ids and folders)"))
    else:
        lines.append(_line(f"      # split: {defaults['split']}", "hub ids and folders: the dataset split"))
    lines.append(_line("      # limit: 1000", "keep only the first N rows"))
    lines.append(_line("      # columns: {prompt: q, chosen: good, rejected: bad}", "format columns: the mapping"))
    return lines


def _entries(schema: Optional[type], fields: Optional[dict], items: list, indent: int = 0) -> List[str]:
    """`key: value  # comment` lines of one section; a key the schema does not have is left out."""
    known = set(fields) if fields is not None else {f.name for f in dataclasses.fields(schema)}
    pad = " " * indent
    return [_line(f"{pad}{key}: {_scalar(value)}", comment) for key, value, comment in items if key in known]


def _line(text: str, comment: str) -> str:
    return f"{text.ljust(COMMENT_COLUMN - 1)} # {comment}"


def _scalar(value: Any) -> str:
    """`value` as YAML that reads back as itself: null, true, 5.0e-07, 'no', [h4]."""
    if isinstance(value, Enum):
        value = value.value
    text = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, width=10_000)
    return text.removesuffix("\n...\n").rstrip("\n")


def _absolute(value: str) -> str:
    """A path given on the command line, made absolute (the file's own paths are read relative to its folder); a hub
    id stays as it is. The same rule as load_config's (`config._resolve`), against the working directory."""
    return C._resolve(value, Path.cwd())
