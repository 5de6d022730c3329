"""Loading and saving models and tokenizers: any causal LM, by hub id or local folder.

The tokenizer is always the base model's (M_0's), completed where it lacks a pad token or a chat template, and saved
with every checkpoint so that M_t loads with plain transformers and renders prompts exactly as training did.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path

import torch

from sdpo_cli.config import DType, ModelConfig
from sdpo_cli.errors import ConfigError, SdpoError, first_line
from sdpo_cli.rundir import fingerprint

# Built-in chat templates for tokenizers that ship none. Each renders the generation prompt as an exact prefix of
# the full conversation, and ends an assistant turn with EOS so that the completion teaches the model to stop.
CHAT_TEMPLATES = {
    # SOLAR-10.7B-Instruct (the paper's family): "### User:\n...\n\n### Assistant:\n"
    "solar": (
        "{{ bos_token if bos_token else '' }}{% for m in messages %}"
        "{% if m['role'] == 'system' %}{{ '### System:\n' + m['content'] + '\n\n' }}"
        "{% elif m['role'] == 'user' %}{{ '### User:\n' + m['content'] + '\n\n' }}"
        "{% elif m['role'] == 'assistant' %}{{ '### Assistant:\n' + m['content'] + eos_token }}"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '### Assistant:\n' }}{% endif %}"
    ),
    "chatml": (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "zephyr": (
        "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + eos_token + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
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
                    hint="model.base must be a hub id or a folder with tokenizer files") from None
    if tok.pad_token is None:
        # Padding never reaches the loss (masks come from token counts), so any existing token will do.
        tok.pad_token = cfg.pad_token or tok.unk_token or tok.eos_token
        if tok.pad_token is None:
            raise ConfigError(f"{source}: tokenizer has no pad, unk or eos token", hint="set model.pad_token=<token>")
    if not tok.chat_template:
        template = cfg.chat_template or DEFAULT_CHAT_TEMPLATE
        tok.chat_template = CHAT_TEMPLATES.get(template, template)
    elif cfg.chat_template:
        tok.chat_template = CHAT_TEMPLATES.get(cfg.chat_template, cfg.chat_template)
    if tok.eos_token is None:
        raise ConfigError(f"{source}: tokenizer has no EOS token", hint="use a tokenizer that defines eos_token")
    return tok


# Files a tokenizer is loaded from (fast, its config, sentencepiece, BPE vocab, WordPiece): a folder with none of them
# has no tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model", "vocab.json",
                   "vocab.txt")


def check_base(cfg: ModelConfig, weights: bool = True) -> None:
    """model.base, checked before any work: a local folder must hold safetensors weights (or pickle ones with
    model.allow_pickle; not checked when `weights` is false) and tokenizer files. A ConfigError (exit 2) that names
    the folder and the key. split, reflogp and gamma call it first (so a broken base stops `sdpo run` before the
    split), and load_tokenizer checks the folder and its tokenizer for every stage."""
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
    if weights and not any(local.glob("*.safetensors")):
        pickled = any(local.glob("*.bin")) or any(local.glob("*.pt"))
        if not pickled:
            raise ConfigError(f"{source}: model.base: no model weights (*.safetensors) in this folder",
                              hint="point model.base to a folder saved with save_pretrained")
        if not cfg.allow_pickle:
            raise ConfigError(f"{source}: model.base: only pickle weights (.bin/.pt) found; refusing to load them",
                              hint="convert to safetensors, or set model.allow_pickle=true if you trust the file")
    if not any((local / name).is_file() for name in TOKENIZER_FILES):
        raise ConfigError(f"{source}: model.base: no tokenizer in this folder (none of {', '.join(TOKENIZER_FILES)})",
                          hint="save the tokenizer next to the weights: tokenizer.save_pretrained(folder)")


def load_model(cfg: ModelConfig, path: str | Path | None = None, *, train: bool = False):
    """A causal LM from a hub id or folder; dropout is left to the caller, eval mode unless `train`."""
    from transformers import AutoModelForCausalLM

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
    if local.is_dir() and not any(local.glob("*.safetensors")) and not cfg.allow_pickle:
        if any(local.glob("*.bin")) or any(local.glob("*.pt")):
            raise SdpoError(f"{source}: only pickle weights (.bin/.pt) found; refusing to load them",
                            hint="convert to safetensors, or set model.allow_pickle=true if you trust the file")
        raise SdpoError(f"{source}: no model weights (*.safetensors) in this folder",
                        hint="point model.base to a folder saved with save_pretrained")
    if cfg.quantization:
        kwargs.update(_quantization_kwargs(cfg, source))
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as e:
        raise SdpoError(f"{source}: cannot load the model ({first_line(e)})",
                        hint="model.base must be a hub id or a folder with config.json and weights") from None
    if cfg.quantization:
        _prepare_quantized(model)
    model.config.use_cache = False  # never needed here, and the cache defeats packed-sequence masks
    model.train(train)
    return model


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
                                   bnb_4bit_compute_dtype=_compute_dtype(cfg, source))
    elif cfg.quantization == "8bit":
        quant = BitsAndBytesConfig(load_in_8bit=True)
        # LLM.int8 quantizes its inputs from fp16 by design; bitsandbytes logs that on every forward pass
        logging.getLogger("bitsandbytes.autograd._functions").addFilter(_INT8_CAST_NOTICE)
    else:
        raise ConfigError(f"model.quantization: unknown value {cfg.quantization!r}", hint="use 4bit | 8bit | null")
    # accelerate refuses to train a quantized model that sits on another device than the process's own
    return {"quantization_config": quant, "device_map": {"": PartialState().device}}


def _compute_dtype(cfg: ModelConfig, source: str) -> torch.dtype:
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
