"""Shared fixtures: a tiny Llama with a locally trained tokenizer (built offline in about a second), the real
fixtures in ../shared/fixtures (skipped where absent), and helpers to write configs and run the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)  # shared 2-core machines: one thread is faster and steadier for tiny models

ROOT = Path(__file__).resolve().parents[1]
SHARED_FIXTURES = ROOT.parent / "shared" / "fixtures"

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "What is 2 plus 3? The answer is 5.", "What is 4 plus 4? The answer is 8.", "Please be polite and kind.",
    "You are a helpful assistant. Answer the question.", "Thank you, that is a great question!",
    "No. Go away, I will not help.", "The sky is blue and the grass is green.", "Once upon a time there was a cat.",
]


def build_tokenizer(path: Path | None = None, chat_template: str | None = CHATML):
    """A byte-level BPE (vocab ~400) with <|pad|>, <|bos|> (added at the start like Llama), <|im_end|> as EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|pad|>", "<|bos|>", "<|im_start|>", "<|im_end|>"]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(CORPUS * 4, trainer)
    tk.post_processor = processors.TemplateProcessing(single="<|bos|> $A", pair="<|bos|> $A $B",
                                                      special_tokens=[("<|bos|>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|bos|>", eos_token="<|im_end|>",
                                  pad_token="<|pad|>")
    if chat_template:
        tok.chat_template = chat_template
    if path is not None:
        tok.save_pretrained(str(path))
    return tok


def build_tiny_model(path: Path, seed: int = 0, chat_template: str | None = CHATML, tied: bool = False) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer(path, chat_template)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         tie_word_embeddings=tied)
    LlamaForCausalLM(config).save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tied_model_dir(tmp_path_factory) -> Path:
    """The tiny model with tie_word_embeddings (one tensor for lm_head and embed_tokens, as stories260K, Gemma, small
    Llama and Qwen models)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama-tied"), tied=True)


@pytest.fixture(scope="session")
def shared_fixtures() -> Path:
    if not SHARED_FIXTURES.is_dir():
        pytest.skip("../shared/fixtures is absent (a user's fresh clone)")
    return SHARED_FIXTURES


@pytest.fixture(scope="session")
def stories_dir(shared_fixtures) -> Path:
    return shared_fixtures / "stories260K"


def tiny_pairs(n: int = 24, seed: int = 0) -> list[dict]:
    """Orca-schema rows: arithmetic (right vs wrong sum) and style (polite vs rude)."""
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        if i % 2:
            rows.append({"system": "", "question": f"What is {a} plus {b}?", "chosen": f"The answer is {a + b}.",
                         "rejected": f"The answer is {a + b + rng.randint(1, 3)}."})
        else:
            rows.append({"system": "You are a helpful assistant.", "question": f"Please help with task {i}.",
                         "chosen": "Thank you, that is a great question!", "rejected": "No. Go away."})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def set_dotted(cfg: dict, changes: dict) -> dict:
    """Apply {"train.learning_rate": 1e-3, ...} to a nested config dict."""
    for key, value in changes.items():
        node = cfg
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return cfg


@pytest.fixture
def tiny_config(tmp_path, tiny_model_dir):
    """Write a two-step config on the tiny model and two orca-schema files; returns (config path, run dir)."""

    def make(**extra) -> tuple[Path, Path]:
        import yaml

        a = write_jsonl(tmp_path / "a.jsonl", tiny_pairs(16, seed=1))
        b = write_jsonl(tmp_path / "b.jsonl", tiny_pairs(16, seed=2))
        cfg = {
            "run_dir": str(tmp_path / "run"),
            "model": {"base": str(tiny_model_dir)},
            "data": {"sources": [{"name": "a", "path": str(a)}, {"name": "b", "path": str(b)}], "max_length": 64},
            "split": {"strategy": "natural"},
            "train": {"learning_rate": 1e-3, "per_device_batch_size": 4, "logging_every": 2, "warmup_ratio": 0.0},
            "inference": {"batch_size": 8},
        }
        set_dotted(cfg, extra)
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path, tmp_path / "run"

    return make


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """The real console entry point in a subprocess: exit codes and stderr exactly as a user sees them."""
    full_env = {k: v for k, v in os.environ.items() if k != "SDPO_DEBUG"}
    full_env.update({"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", **(env or {})})
    return subprocess.run([sys.executable, "-m", "sdpo_cli", *args], capture_output=True, text=True,
                          cwd=str(cwd or ROOT), env=full_env, timeout=600)


FAST = ["train.save_every=3", "train.logging_every=1"]  # a resumable state every 3 updates, every update logged


@pytest.fixture
def long_config(tiny_config, tmp_path):
    """Two steps of 24 updates each on the tiny model: long enough to be interrupted mid-training."""
    config, run = tiny_config(**{"train.per_device_batch_size": 2})
    write_jsonl(tmp_path / "a.jsonl", tiny_pairs(48, seed=1))
    write_jsonl(tmp_path / "b.jsonl", tiny_pairs(48, seed=2))
    reference = tmp_path / "reference"
    result = run_cli("run", str(config), f"run_dir={reference}", *FAST)
    assert result.returncode == 0, result.stderr
    return config, run, reference
