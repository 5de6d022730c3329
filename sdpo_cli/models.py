"""Loading and saving models and tokenizers: any causal LM, by hub id or local folder.

The tokenizer is always the base model's (M_0's), completed where it lacks a pad token or a chat template, and saved
with every checkpoint so that M_t loads with plain transformers and renders prompts exactly as training did.
"""

from __future__ import annotations

import json
import logging
import math
import os
from contextlib import contextmanager
from pathlib import Path

import torch

from sdpo_cli import integrity
from sdpo_cli.config import DType, ModelConfig, chat_template_problems, report
from sdpo_cli.errors import ConfigError, SdpoError, first_line
from sdpo_cli.rundir import fingerprint

# Built-in chat templates, for tokenizers that ship none (`model.chat_template: <name>`; CHAT_TEMPLATE_NAMES in
# config.py lists the names). Each renders what its family's official template renders for text messages (the source
# and any difference are named above it; tests/test_chat_templates.py pins a system/user/assistant conversation of
# each), the generation prompt is an exact prefix of the full conversation, and an assistant turn ends with the
# family's end-of-turn token, so that the completion teaches the model to stop. Markers such as <|eot_id|> or
# <start_of_turn> are special tokens in the family's own vocabulary; a tokenizer without them splits them into
# ordinary pieces.
CHAT_TEMPLATES = {
    # SOLAR-10.7B-Instruct (the paper's family): upstage/SOLAR-10.7B-Instruct-v1.0 tokenizer_config.json, plus BOS and
    # an EOS after each assistant turn (the official template has neither); a system message gets a "### System:" block
    "solar": (
        "{{ bos_token if bos_token else '' }}{% for m in messages %}"
        "{% if m['role'] == 'system' %}{{ '### System:\n' + m['content'] + '\n\n' }}"
        "{% elif m['role'] == 'user' %}{{ '### User:\n' + m['content'] + '\n\n' }}"
        "{% elif m['role'] == 'assistant' %}{{ '### Assistant:\n' + m['content'] + eos_token }}"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '### Assistant:\n' }}{% endif %}"
    ),
    # ChatML as teknium/OpenHermes-2.5-Mistral-7B's tokenizer_config.json has it (Qwen's layout without Qwen's default
    # system message: see qwen2); a system message is a turn of its own
    "chatml": (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    # Qwen/Qwen2-7B-Instruct tokenizer_config.json: ChatML, and "You are a helpful assistant." when no system message
    "qwen2": (
        "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
        "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
        "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    # HuggingFaceH4/zephyr-7b-beta tokenizer_config.json; a system message is a turn of its own
    "zephyr": (
        "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + eos_token + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
    ),
    # meta-llama/Meta-Llama-3-8B-Instruct tokenizer_config.json: contents trimmed, each turn ends with <|eot_id|>; a
    # system message is a turn of its own
    "llama3": (
        "{% for m in messages %}{% if loop.first %}{{ bos_token }}{% endif %}"
        "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim + '<|eot_id|>' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    # mistralai/Mistral-7B-Instruct-v0.1 tokenizer_config.json (its 2024 revision, for the 32K vocabulary of Mistral 7B
    # and SOLAR): " [INST] " with a leading space, so that [INST] after <s> is "▁[INST]" as in mistral_common; a system
    # message is put before the first user message, followed by a blank line; roles must alternate user/assistant
    "mistral": (
        "{% if messages[0]['role'] == 'system' %}{% set system_message = messages[0]['content'] %}"
        "{% set loop_messages = messages[1:] %}{% else %}{% set loop_messages = messages %}{% endif %}"
        "{{ bos_token }}{% for m in loop_messages %}"
        "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('After the optional system "
        "message, conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if m['role'] == 'user' %}{% if loop.first and system_message is defined %}"
        "{{ ' [INST] ' + system_message + '\n\n' + m['content'] + ' [/INST]' }}"
        "{% else %}{{ ' [INST] ' + m['content'] + ' [/INST]' }}{% endif %}"
        "{% elif m['role'] == 'assistant' %}{{ ' ' + m['content'] + eos_token }}"
        "{% else %}{{ raise_exception('Only user and assistant roles are supported, with the exception of an initial "
        "optional system message!') }}{% endif %}{% endfor %}"
    ),
    # google/gemma-2-9b-it (= gemma-7b-it) tokenizer_config.json: the assistant is "model", contents trimmed, turns end
    # with <end_of_turn>; roles must alternate. Gemma 2 raises "System role not supported" on a system message; this
    # one does what google/gemma-3-4b-it's template does instead: the system text, then a blank line, opens the
    # first user turn
    "gemma": (
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
        "{% set first_user_prefix = messages[0]['content'] + '\n\n' %}{% set loop_messages = messages[1:] %}"
        "{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
        "{% for m in loop_messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\n' }}"
        "{{ (first_user_prefix if loop.first else '') + m['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
    ),
    # microsoft/Phi-3-mini-4k-instruct tokenizer_config.json (its mid-2024 revision, which has a system turn): turns
    # end with <|end|>, and a conversation without the generation prompt ends with EOS (<|endoftext|> there)
    "phi3": (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ '<|system|>\n' + m['content'] + '<|end|>\n' }}"
        "{% elif m['role'] == 'user' %}{{ '<|user|>\n' + m['content'] + '<|end|>\n' }}"
        "{% elif m['role'] == 'assistant' %}{{ '<|assistant|>\n' + m['content'] + '<|end|>\n' }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
    ),
    # lmsys/vicuna-7b-v1.5 ships no template; this is FastChat's "vicuna_v1.1" conversation (fastchat/conversation.py,
    # SeparatorStyle.ADD_COLON_TWO, sep " ", sep2 "</s>" = EOS), with the BOS its tokenizer adds. A system message
    # replaces the default one ("A chat between a curious user and an artificial intelligence assistant. ...")
    "vicuna": (
        "{% if messages[0]['role'] == 'system' %}{% set system_message = messages[0]['content'] %}"
        "{% set loop_messages = messages[1:] %}{% else %}{% set system_message = 'A chat between a curious user and an "
        "artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the "
        "user\\'s questions.' %}{% set loop_messages = messages %}{% endif %}"
        "{{ bos_token + system_message + ' ' }}{% for m in loop_messages %}"
        "{% if m['role'] == 'user' %}{{ 'USER: ' + m['content'] + ' ' }}"
        "{% elif m['role'] == 'assistant' %}{{ 'ASSISTANT: ' + m['content'] + eos_token }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
    ),
}
DEFAULT_CHAT_TEMPLATE = "solar"

DTYPES = {d.value: getattr(torch, d.torch_name) for d in DType if d is not DType.auto}  # model.dtype -> torch


def _hub_kwargs(cfg: ModelConfig) -> dict:
    return {"revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code}


def load_tokenizer(cfg: ModelConfig, path: str | None = None):
    """The tokenizer of `path` (default: the base model), with pad token and chat template filled in if missing.
    Stages ask their run context (`ctx.tokenizer`), which loads it once per command."""
    from transformers import AutoTokenizer

    source = path or cfg.base
    if path is None:
        check_base(cfg, weights=False)

    try:
        tok = AutoTokenizer.from_pretrained(source, **_hub_kwargs(cfg))
    except (OSError, ValueError) as e:
        error = ConfigError if path is None else SdpoError  # model.base is the user's setting; a checkpoint is not
        raise error(f"{source}: cannot load a tokenizer ({first_line(e)})",
                    hint=load_hint(cfg, source, e, "a hub id or a folder with tokenizer files")) from None
    if tok.pad_token is None:
        # Padding never reaches the loss (masks come from token counts), so any existing token will do.
        tok.pad_token = cfg.pad_token or tok.unk_token or tok.eos_token
        if tok.pad_token is None:
            raise ConfigError(f"{source}: tokenizer has no pad, unk or eos token", hint="set model.pad_token=<token>")
    template = cfg.chat_template or (None if tok.chat_template else DEFAULT_CHAT_TEMPLATE)
    if template is not None:  # a built-in by name, else a Jinja template
        problems = chat_template_problems(template)  # as load_config did, for a config built by hand
        if problems:
            raise report("config", problems)
        tok.chat_template = CHAT_TEMPLATES.get(template, template)
    if tok.eos_token is None:
        raise ConfigError(f"{source}: tokenizer has no EOS token", hint="use a tokenizer that defines eos_token")
    return tok


# Files a tokenizer is loaded from (fast, its config, sentencepiece, BPE vocab, WordPiece): a folder with none of them
# has no tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model", "vocab.json",
                   "vocab.txt")


# Hub ids of pretrained-only models (no instruction or preference tuning) that configs meet as a base: DPO, and sDPO's
# M_0 = S, start from a supervised fine-tune. A short list of well-known ids, not a classifier (docs/configs.md).
PRETRAINED_ONLY = ("upstage/SOLAR-10.7B-v1.0", "mistralai/Mistral-7B-v0.1", "mistralai/Mistral-7B-v0.3",
                   "meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-13b-hf", "meta-llama/Meta-Llama-3-8B",
                   "meta-llama/Llama-3.1-8B", "Qwen/Qwen2.5-7B")
_warned_pretrained: set[str] = set()


def warn_if_pretrained(cfg: ModelConfig, warn) -> bool:
    """One `Warning:` line per process when model.base is a known pretrained-only hub id. True if it warned."""
    base = cfg.base.strip().rstrip("/")
    if base.lower() not in {m.lower() for m in PRETRAINED_ONLY} or base.lower() in _warned_pretrained:
        return False
    _warned_pretrained.add(base.lower())
    warn(f"model.base {base} is a pretrained model, not a supervised fine-tune: DPO and sDPO start from an SFT model "
         f"(the paper's S is SOLAR 10.7B + SFT); fine-tune it first and set model.base to that checkpoint "
         f"(configs/sdpo_solar.yaml says how)")
    return True


def check_base(cfg: ModelConfig, weights: bool = True) -> None:
    """model.base, checked before any work: a local folder must hold a readable config.json, safetensors weights
    whose headers are valid and match the files' sizes (or pickle ones with model.allow_pickle), shards included, and
    tokenizer files (weights and a missing config.json are not checked when `weights` is false). Cheap: only headers
    and small JSON files are read. A model that needs its own code is refused unless model.trust_remote_code. A
    ConfigError (exit 2) that names the file and the key. split, reflogp and gamma call it first (so a broken base
    stops `sdpo run` before the split), and load_tokenizer checks the folder and its tokenizer for every stage."""
    source = cfg.base
    local = Path(source).expanduser()
    if not local.exists():
        if local.is_absolute() or source.startswith((".", "~")):
            raise ConfigError(f"{source}: model.base: model folder not found",
                              hint="check model.base; relative paths start at the config file's folder")
        return  # a hub id
    if not local.is_dir():
        raise ConfigError(f"{source}: model.base: expected a model folder, found a file",
                          hint="point model.base to the folder with config.json")
    resave = "the file is damaged or incomplete: download the model again, or save it again with save_pretrained"
    config = local / "config.json"
    if config.is_file() or weights:  # a tokenizer-only folder serves `split`; a model needs its config.json
        problem = _json_problem(config)
        if problem and not config.is_file():
            raise ConfigError(f"{source}: model.base: {problem}",
                              hint="point model.base to a folder saved with save_pretrained")
        if problem:
            raise ConfigError(f"{config}: model.base: {problem}", hint=resave)
        _check_remote_code(cfg, config)
    if weights and not any(local.glob("*.safetensors")):
        pickled = any(local.glob("*.bin")) or any(local.glob("*.pt"))
        if not pickled:
            raise ConfigError(f"{source}: model.base: no model weights (*.safetensors) in this folder",
                              hint="point model.base to a folder saved with save_pretrained")
        if not cfg.allow_pickle:
            raise ConfigError(f"{source}: model.base: only pickle weights (.bin/.pt) found; refusing to load them",
                              hint="convert to safetensors, or set model.allow_pickle=true if you trust the file")
    elif weights:
        damaged = weights_problem(local)
        if damaged:
            raise ConfigError(f"{damaged[0]}: model.base: damaged weights file: {damaged[1]}", hint=resave)
    if not any((local / name).is_file() for name in TOKENIZER_FILES):
        raise ConfigError(f"{source}: model.base: no tokenizer in this folder (none of {', '.join(TOKENIZER_FILES)})",
                          hint="save the tokenizer next to the weights: tokenizer.save_pretrained(folder)")
    for name in ("tokenizer.json", "tokenizer_config.json"):  # the rest is left to the tokenizer's own loading
        file = local / name
        problem = _json_problem(file, parse=name == "tokenizer_config.json") if file.is_file() else None
        if problem:
            raise ConfigError(f"{file}: model.base: {problem}", hint=resave)


def _json_problem(path: Path, parse: bool = True) -> str | None:
    """Why a JSON file of a model folder cannot be used (missing, unreadable, empty, not a JSON object); None if it
    can. `parse=False` only checks that it is there and not empty (for files too large to parse twice)."""
    try:
        if path.stat().st_size == 0:
            return f"{path.name} is empty (0 bytes)"
        if not parse:
            return None
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        return f"no {path.name} in this folder"
    except OSError as e:
        return f"cannot read {path.name} ({e.strerror or e})"
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        return f"{path.name} is not valid JSON ({first_line(e)})"
    return None if isinstance(data, dict) else f"{path.name} is not a JSON object"


def _check_remote_code(cfg: ModelConfig, config: Path) -> None:
    """A model whose config.json maps the auto classes to its own code (`auto_map`) and whose model_type transformers
    does not know cannot load without model.trust_remote_code: say so before any work, as transformers would later."""
    if cfg.trust_remote_code:
        return
    data = json.loads(config.read_bytes())
    auto_map = data.get("auto_map")
    if not isinstance(auto_map, dict) or not {"AutoConfig", "AutoModelForCausalLM"} & set(auto_map):
        return
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if data.get("model_type") not in CONFIG_MAPPING_NAMES:
        raise ConfigError(f"{config.parent}: model.base: the model needs its own code (config.json auto_map: "
                          f"{auto_map.get('AutoModelForCausalLM') or auto_map.get('AutoConfig')}), and "
                          "model.trust_remote_code is off", hint=REMOTE_CODE_HINT)


REMOTE_CODE_HINT = "model.trust_remote_code=true (if you trust the model's code)"

# safetensors: an 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets}}, then the
# tensor bytes, back to back; safetensors refuses headers above 100 MB. Sizes per element of the whole-byte dtypes.
_SAFETENSORS_MAX_HEADER = 100_000_000
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2, "F16": 2,
                "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8}


def safetensors_header(path: Path) -> tuple[str | None, dict]:
    """Check a .safetensors file from its header alone, never reading the weights: (what is wrong with it, {}), or
    (None, header) when the header is valid and the file's size is exactly what its data offsets describe."""
    try:
        size = path.stat().st_size
        if size < 8:
            return (f"{size} bytes, too short for a safetensors header" if size else "empty (0 bytes)"), {}
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n < 2 or n > _SAFETENSORS_MAX_HEADER or 8 + n > size:
                return f"its header length, {n} bytes, does not fit in the file's {size} bytes", {}
            raw = f.read(n)
    except OSError as e:
        return f"cannot read it ({e.strerror or e})", {}
    try:
        header = json.loads(raw)
    except ValueError:
        return "its header is not valid JSON", {}
    if not isinstance(header, dict):
        return "its header is not a JSON object", {}
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = info["data_offsets"]
            shape, dtype = list(info["shape"]), info["dtype"]
            ok = all(isinstance(v, int) and v >= 0 for v in (begin, end, *shape)) and begin <= end
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            return f"tensor {name!r} has an invalid entry in the header", {}
        if dtype in _DTYPE_BYTES and end - begin != math.prod(shape) * _DTYPE_BYTES[dtype]:
            return f"tensor {name!r}: {end - begin} bytes for shape {shape} {dtype}", {}
        spans.append((begin, end))
    at = 0
    for begin, end in sorted(spans):
        if begin != at:
            return "the tensors' data offsets overlap or leave gaps", {}
        at = end
    if 8 + n + at != size:
        return f"its header describes {8 + n + at} bytes but the file has {size} (truncated or padded)", {}
    return None, header


def weights_problem(folder: Path) -> tuple[Path, str] | None:
    """(file, what is wrong) for the safetensors weights of a model folder, as from_pretrained would pick them:
    model.safetensors, else the shards named by model.safetensors.index.json, else every *.safetensors. Reads the
    headers only. None if they look whole."""
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file() or not index.is_file():
        files = [single] if single.is_file() else sorted(folder.glob("*.safetensors"))
        for file in files:
            problem, _ = safetensors_header(file)
            if problem:
                return file, problem
        return None
    problem = _json_problem(index)
    weight_map = None if problem else json.loads(index.read_bytes()).get("weight_map")
    if problem or not isinstance(weight_map, dict) or not weight_map:
        return index, problem or "no weight_map in the index"
    shards: dict[str, list[str]] = {}
    for tensor, shard in weight_map.items():
        shards.setdefault(str(shard), []).append(tensor)
    for shard, tensors in sorted(shards.items()):
        file = folder / shard
        if not file.is_file():
            return index, f"shard {shard} is missing ({len(tensors)} tensors are mapped to it)"
        problem, header = safetensors_header(file)
        if problem:
            return file, problem
        missing = [t for t in tensors if t not in header]
        if missing:
            return file, f"{len(missing)} tensors that {index.name} maps to it are not in it (e.g. {missing[0]!r})"
    return None


def load_hint(cfg: ModelConfig, source: str | Path, error: BaseException | None, needed: str) -> str:
    """The hint for a model or tokenizer that does not load, by its real cause: code the model needs that
    model.trust_remote_code does not allow (transformers' message says so), a checkpoint that sdpo wrote and that is
    damaged now (its meta.json says "stage": "train": redo that step), else `needed`: what the source must be ("a
    folder ...", said of model.base or of the model) or, when it does not start with "a ", the whole hint."""
    if error is not None and ("trust_remote_code" in str(error) or "contains custom code" in str(error)):
        return REMOTE_CODE_HINT
    meta = Path(source) / "meta.json"
    try:
        recorded = json.loads(meta.read_text()) if meta.is_file() else None
    except (OSError, ValueError):
        recorded = None
    if isinstance(recorded, dict) and recorded.get("stage") == "train":
        step = recorded.get("step")
        if not isinstance(step, int):
            name = Path(source).name
            step = int(name[5:]) if name.startswith("step-") and name[5:].isdigit() else "N"
        return f"sdpo train CONFIG --step {step} --force  # this checkpoint that sdpo wrote is damaged: redo it"
    if not needed.startswith("a "):
        return needed
    return f"{'model.base' if str(source) == str(cfg.base) else 'the model'} must be {needed}"


def load_model(cfg: ModelConfig, path: str | Path | None = None, *, train: bool = False, empty: bool = False):
    """A causal LM from a hub id or folder; dropout is left to the caller, eval mode unless `train`.

    `empty`: the model's structure only, its weights on the meta device (no memory, nothing read but config.json),
    for the processes of an FSDP2 launch whose weights `prepare` replaces with the main process's
    (distributed.loads_empty). Buffers computed at construction (rotary frequencies) are real: accelerate keeps them.
    """
    from transformers import AutoModelForCausalLM

    if empty and not cfg.quantization:  # bitsandbytes layers cannot be built on meta: quantized models load whole
        return _empty_model(cfg, path, train)

    source = str(path or cfg.base)
    kwargs = dict(_hub_kwargs(cfg))
    kwargs["dtype"] = "auto" if cfg.dtype == "auto" else DTYPES[cfg.dtype]
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if not cfg.allow_pickle:
        kwargs["use_safetensors"] = True  # pickle checkpoints can run code on load
    local = Path(source)
    if local.exists() and not local.is_dir():
        raise SdpoError(f"{source}: expected a model folder, found a file", hint="point to the folder with config.json")
    integrity.verify_model(local)  # a checkpoint sdpo wrote: every file as its meta.json records it
    if local.is_dir() and not any(local.glob("*.safetensors")) and not cfg.allow_pickle:
        if any(local.glob("*.bin")) or any(local.glob("*.pt")):
            raise SdpoError(f"{source}: only pickle weights (.bin/.pt) found; refusing to load them",
                            hint="convert to safetensors, or set model.allow_pickle=true if you trust the file")
        raise SdpoError(f"{source}: no model weights (*.safetensors) in this folder",
                        hint=load_hint(cfg, source, None, "a folder saved with save_pretrained"))
    damaged = weights_problem(local) if local.is_dir() else None
    if damaged:  # a truncated or corrupt file: said before from_pretrained reads it (safetensors' own error is opaque)
        raise SdpoError(f"{damaged[0]}: damaged weights file: {damaged[1]}", hint=load_hint(
            cfg, source, None, "download the model again, or save it again with save_pretrained"))
    if cfg.quantization:
        kwargs.update(_quantization_kwargs(cfg, source))
    from safetensors import SafetensorError

    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (OSError, ValueError, SafetensorError) as e:
        raise SdpoError(f"{source}: cannot load the model ({first_line(e)})",
                        hint=load_hint(cfg, source, e, "a hub id or a folder with config.json and weights")) from None
    if cfg.quantization:
        _prepare_quantized(model)
    model.config.use_cache = False  # never needed here, and the cache defeats packed-sequence masks
    model.train(train)
    return model


def _empty_model(cfg: ModelConfig, path: str | Path | None, train: bool):
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    source = str(path or cfg.base)
    config = AutoConfig.from_pretrained(source, **_hub_kwargs(cfg))
    # the dtype load_model's main process gets, which accelerate casts the broadcast weights to
    dtype = (getattr(config, "dtype", None) or torch.float32) if cfg.dtype == "auto" else DTYPES[cfg.dtype]
    kwargs = {"attn_implementation": cfg.attn_implementation} if cfg.attn_implementation else {}
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=cfg.trust_remote_code,
                                                 **kwargs)
    # init_empty_weights makes a new meta parameter at every registration, which unties what from_config tied
    # (lm_head = embed_tokens): tied again, so that every rank's model has the parameters the main process's has
    model.tie_weights()
    model.config.use_cache = False
    model.train(train)
    return model


def model_from_weights(cfg: ModelConfig, path: str | Path | None, weights: dict[str, torch.Tensor], *,
                       train: bool = False):
    """The model `load_model` gives for `path`, built around `weights` (every tensor of its state dict, tied ones
    once: scoring.gathered_weights) instead of reading them from disk: `sdpo run` under FSDP2 hands the reference
    reflogp(t) scored with to train(t) this way. Each tensor takes the dtype `load_model` would give it (FSDP2 may
    have upcast a bf16 model to fp32 for mixed precision: the round trip is exact)."""
    model = _empty_model(cfg, path, train)
    dtypes = {name: t.dtype for name, t in model.state_dict().items()}
    unknown = sorted(set(weights) - set(dtypes))
    if unknown:
        raise SdpoError(f"{path}: the handed-over weights have a tensor the model does not ({unknown[0]})",
                        hint="a bug in sdpo: run the stages by hand (sdpo reflogp, then sdpo train)")
    model.load_state_dict({k: v.to(dtypes[k]) for k, v in weights.items()}, strict=False, assign=True)
    # tied as from_pretrained ties: a tied copy that came once (lm_head = embed_tokens) is tied again; two that came
    # with different values stay apart (an earlier sdpo's FSDP2 checkpoints have both: from_pretrained keeps both too)
    model.tie_weights(missing_keys=set(dtypes) - set(weights))
    missing = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if missing:
        raise SdpoError(f"{path}: the handed-over weights lack {missing[0]}",
                        hint="a bug in sdpo: run the stages by hand (sdpo reflogp, then sdpo train)")
    return model


def refuse_split_tie(model, source) -> None:
    """Refuse a checkpoint whose config ties the LM head to the embeddings (tie_word_embeddings) but whose weights
    hold the two as different tensors, when FSDP2's RAM-efficient loading is to shard it (distributed.ram_efficient):
    from_pretrained keeps such a pair apart (with a warning), but accelerate's prepare ties it again on every rank,
    dropping one of the two, and fails with a KeyError. sdpo saved such an M_t under FSDP2 before it kept the tie."""
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    tied = getattr(model.config.get_text_config(), "tie_word_embeddings", False)
    if tied and inputs is not None and outputs is not None and inputs.weight is not outputs.weight:
        raise SdpoError(f"{source}: its config.json ties the LM head to the embeddings (tie_word_embeddings), but "
                        "its weights hold them as two different tensors, which FSDP2's RAM-efficient loading would "
                        "tie again, losing one",
                        hint="launch with fsdp_cpu_ram_efficient_loading: false in the accelerate config, or under "
                             "DDP or in one process")


def tied_aliases(module: torch.nn.Module) -> set[str]:
    """The names of `module`'s state dict that hold a tensor an earlier name holds (lm_head.weight when it is
    model.embed_tokens.weight, under tie_word_embeddings). A state dict gathered from FSDP shards brings each name as
    its own copy, where save_pretrained of the model itself writes a tied tensor once: without these, M_t would be
    saved with two tensors and load untied."""
    seen, aliases = set(), set()
    for name, tensor in module.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            aliases.add(name)
        seen.add(id(tensor))
    return aliases


# ---------------------------------------------------------------------------------------------------------------
# model.quantization (QLoRA): every role loads the same quantized model. The target of step t is quant(M_{t-1}) plus a
# fresh zero-initialised adapter, so its reference log-probs (and gamma's, and the curriculum scores) must come from
# quant(M_{t-1}) too: then target == reference at update 0 (the ln 2 check) and the DPO loss compares one model with
# itself plus the adapter. This is TRL's choice as well (its QLoRA reference is the quantized model, adapter off).
# M_t itself is never quantized: the adapter is merged into the full-precision M_{t-1} (sdpo_cli/lora.py).


@contextmanager
def quiet_bitsandbytes():
    """Around the first import of bitsandbytes (peft imports it too, whenever it is installed): its CPU backend warns
    on import that an optional `kernels` package is missing, which is noise for every run."""
    logger = logging.getLogger("bitsandbytes")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


class _DropKernelsNotice(logging.Filter):
    """bitsandbytes' CPU backend, on import on a CPU with AVX512-BF16, warns that the optional `kernels` package (a
    faster 4-bit matmul) is missing. peft imports bitsandbytes whenever it is installed, and transformers imports
    peft for things as unrelated as `get_scheduler` (transformers.trainer_utils), so every full fine-tune printed
    it. Only that notice is dropped; every other bitsandbytes message (QLoRA's included) still comes through."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward from kernels-community")


# on the logger that emits it (bitsandbytes/backends/cpu/ops.py), before anything can import bitsandbytes: every
# sdpo stage imports this module first
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropKernelsNotice())


class _DropInt8CastNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("MatMul8bitLt: inputs will be cast")


_INT8_CAST_NOTICE = _DropInt8CastNotice()


def _quantization_kwargs(cfg: ModelConfig, source: str) -> dict:
    """from_pretrained arguments for model.quantization: bitsandbytes 4-bit NF4 with double quantization (the QLoRA
    paper's recipe) or LLM.int8, computing in model.dtype, loaded straight onto this process's device."""
    from accelerate import PartialState

    try:
        with quiet_bitsandbytes():
            import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError("model.quantization: the bitsandbytes package is not installed",
                          hint="pip install 'sdpo[qlora]'  # or set model.quantization=null") from None
    from transformers import BitsAndBytesConfig

    if cfg.quantization == "4bit":
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=load_dtype(cfg, source))
    elif cfg.quantization == "8bit":
        quant = BitsAndBytesConfig(load_in_8bit=True)
        # LLM.int8 quantizes its inputs from fp16 by design; bitsandbytes logs that on every forward pass
        logging.getLogger("bitsandbytes.autograd._functions").addFilter(_INT8_CAST_NOTICE)
    else:
        raise ConfigError(f"model.quantization: unknown value {cfg.quantization!r}", hint="use 4bit | 8bit | null")
    # accelerate refuses to train a quantized model that sits on another device than the process's own
    return {"quantization_config": quant, "device_map": {"": PartialState().device}}


def load_dtype(cfg: ModelConfig, source: str) -> torch.dtype:
    """The dtype load_model gives the weights of `source`: model.dtype, or with auto the one its config names."""
    if cfg.dtype != "auto":
        return DTYPES[cfg.dtype]
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source, **_hub_kwargs(cfg))
    except (OSError, ValueError):
        return torch.float32  # from_pretrained will say what is wrong with the source
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = DTYPES.get(dtype)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def _prepare_quantized(model) -> None:
    """What peft's prepare_model_for_kbit_training does to a quantized model, for every role alike: the parameters
    left unquantized (embeddings, norms, LM head) go to fp32 and everything is frozen. Doing it for the target only
    would make the target differ from the reference at update 0 whenever model.dtype is
    16-bit. Gradient checkpointing stays train.gradient_checkpointing's business."""
    try:
        from peft import prepare_model_for_kbit_training
    except ImportError:
        raise ConfigError("model.quantization: the peft package is not installed (QLoRA trains a LoRA adapter)",
                          hint="pip install 'sdpo[qlora]'  # or set model.quantization=null") from None
    prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    for module in model.modules():
        # bitsandbytes (0.50.2) on CPUs with AVX512-BF16: the first no-grad eval forward repacks 4-bit weights for a
        # faster inference kernel that rounds the block scales to bf16. reflogp (inference) and train (autograd)
        # would then score the same model differently, breaking the ln 2 check; the repacking also fails for layers
        # narrower than one quantization block (64). Keep one kernel for both.
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def compile_blocks(model: torch.nn.Module) -> int:
    """Regional torch.compile, in place: every transformer block (the classes in `_no_split_modules`), with dynamic
    shapes since batch lengths vary. Blocks share one compiled graph, so compile time is about one block's; in-place
    `Module.compile` keeps parameter names, so checkpoints and engine wrapping are unchanged. Returns the count."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:  # no block classes declared: compile the decoder body as one region
        blocks = [model.get_decoder()]
    for block in blocks:
        block.compile(dynamic=True)
    return len(blocks)


def disable_dropout(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def model_identity(source: str, revision: str | None = None) -> str:
    """A fingerprint of a model source: its meta.json fingerprint if we made it, else its files or hub id@revision."""
    path = Path(source)
    meta = path / "meta.json"
    if meta.is_file():
        import json

        return json.loads(meta.read_text()).get("fingerprint", "")
    if path.is_dir():
        files = sorted((p.name, p.stat().st_size) for p in path.iterdir() if p.is_file())
        config = (path / "config.json").read_text() if (path / "config.json").is_file() else ""
        return fingerprint(os.path.abspath(source), files, config)
    return fingerprint(source, revision)


def tokenizer_identity(tok) -> str:
    return fingerprint(sorted(tok.get_vocab().items()), tok.chat_template, tok.eos_token, tok.bos_token)


# ---------------------------------------------------------------------------------------------------------------
# Which model plays which role (sDPO §2.2): at step t the reference and the target both start from M_{t-1}.


def previous_model(cfg, run, step: int) -> str:
    """M_{t-1}: the base model S for step 1, else the checkpoint of step t-1 (which must be finished)."""
    from sdpo_cli.errors import ArtifactError
    from sdpo_cli.rundir import read_meta

    if step == 1:
        return cfg.model.base
    path = run.checkpoint(step - 1)
    if read_meta(path) is None:
        raise ArtifactError(f"{path}: M_{step - 1} not found, but step {step} starts from it",
                            hint=f"sdpo train CONFIG --step {step - 1}  # or sdpo run CONFIG")
    return str(path)


def reference_model(cfg, run, step: int) -> str:
    """π_ref of step t per dpo.reference: previous (M_{t-1}) | base (S) | a path or hub id (paper Table 1)."""
    if cfg.dpo.reference == "previous":
        return previous_model(cfg, run, step)
    if cfg.dpo.reference == "base":
        return cfg.model.base
    return cfg.dpo.reference


def target_init_model(cfg, run, step: int) -> str:
    """Where the target of step t starts, per dpo.target_init: previous (M_{t-1}) | base (S) (paper §3.5)."""
    return previous_model(cfg, run, step) if cfg.dpo.target_init == "previous" else cfg.model.base


def named_model(cfg, run, name: str) -> tuple[str, str]:
    """A checkpoint named on the command line -> (label, source): base | step-N | a path."""
    from sdpo_cli.errors import ArtifactError, ConfigError
    from sdpo_cli.rundir import read_meta

    if name == "base":
        return "base", cfg.model.base
    if name.startswith("step-") and name[5:].isdigit():
        path = run.checkpoint(int(name[5:]))
        if read_meta(path) is None:
            raise ArtifactError(f"{path}: checkpoint {name} not found", hint=f"sdpo train CONFIG --step {name[5:]}")
        return name, str(path)
    if Path(name).exists():
        return name, str(Path(name).resolve())
    raise ConfigError(f"--checkpoint {name}: not base, step-N or an existing path", hint="e.g. --checkpoint step-1")


def finished_checkpoints(cfg, run) -> list[str]:
    """The default checkpoints of `gamma` and `eval`: base and every finished step."""
    from sdpo_cli.config import num_steps
    from sdpo_cli.rundir import read_meta

    return ["base"] + [f"step-{t}" for t in range(1, num_steps(cfg) + 1) if read_meta(run.checkpoint(t)) is not None]
