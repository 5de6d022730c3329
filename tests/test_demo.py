"""The embedded demo (`make demo`): the committed assets in demo/ load offline, and configs/demo.yaml reproduces the
paper's Fig. 2 ordering of mean γ on D_2, base < step-1 < step-2."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_cli

DEMO = ROOT / "demo"
CONFIG = ROOT / "configs" / "demo.yaml"


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"demo_{name}", DEMO / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_model_loads_offline():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(DEMO / "model"))
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
    assert tok.chat_template, "the demo tokenizer ships its own chat template"
    text = tok.apply_chat_template([{"role": "user", "content": "What is 2 plus 3?"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text == "<s>### User:\nWhat is 2 plus 3?\n\n### Assistant:\n"
    model = AutoModelForCausalLM.from_pretrained(str(DEMO / "model"), use_safetensors=True)
    assert model.config.model_type == "llama"
    assert model.config.vocab_size == len(tok)
    assert 2e5 <= sum(p.numel() for p in model.parameters()) <= 2e6
    assert sum(f.stat().st_size for f in (DEMO / "model").iterdir()) < 4 * 2**20  # a few MB in git at most


def test_demo_data_autodetects_real_schemas():
    from sdpo_cli.config import SourceConfig
    from sdpo_cli.data.formats import load_pairs

    orca = load_pairs(SourceConfig(name="orca", path=str(DEMO / "data" / "orca_pairs.jsonl")))
    uf = load_pairs(SourceConfig(name="ultrafeedback", path=str(DEMO / "data" / "ultrafeedback_pairs.jsonl")))
    assert orca.format == "orca" and uf.format == "ultrafeedback"
    assert len(orca.pairs) == orca.rows_read > 100 and len(uf.pairs) == uf.rows_read > 100
    assert not orca.skipped and not uf.skipped

    rows = [json.loads(line) for line in (DEMO / "data" / "ultrafeedback_pairs.jsonl").read_text().splitlines()]
    assert list(rows[0]) == ["prompt", "prompt_id", "chosen", "rejected", "messages", "score_chosen",
                             "score_rejected"]
    for row in rows:
        assert row["prompt_id"] == hashlib.sha256(row["prompt"].encode()).hexdigest()
        assert [m["role"] for m in row["chosen"]] == [m["role"] for m in row["rejected"]] == ["user", "assistant"]
        assert row["messages"] == row["chosen"]
        assert isinstance(row["score_chosen"], float) and row["score_chosen"] > row["score_rejected"]
    orca_rows = [json.loads(line) for line in (DEMO / "data" / "orca_pairs.jsonl").read_text().splitlines()]
    assert list(orca_rows[0]) == ["system", "question", "chosen", "rejected"]
    # different prompts, one shared preference: the steps do not overlap
    assert not {r["question"] for r in orca_rows} & {r["prompt"] for r in rows}


def test_demo_check_script():
    check = _load_script("check").check
    result = [{"checkpoint": c, "data": "step-2", "mean": m} for c, m in (("base", -2.0), ("step-1", 5.0),
                                                                           ("step-2", 50.0))]
    assert check(result)[0]
    result[1]["mean"] = -3.0
    ok, message = check(result)
    assert not ok and "step-1 -3.00" in message
    assert not check(result[:2])[0]


@pytest.mark.slow
def test_demo_end_to_end_gamma_rises(tmp_path: Path):
    """The demo config as shipped: sdpo run, then mean γ on D_2 rises base < step-1 < step-2 (sDPO Fig. 2)."""
    run_dir = tmp_path / "demo"
    env = {"OMP_NUM_THREADS": "1"}  # tiny model on a shared machine: one thread is several times faster
    done = run_cli("run", str(CONFIG), f"run_dir={run_dir}", env=env)
    assert done.returncode == 0, done.stderr
    assert "ln 2 check ok" in done.stderr
    assert (run_dir / "reports" / "loss.png").is_file()
    gamma = run_cli("gamma", str(CONFIG), f"run_dir={run_dir}", "--json", env=env)
    assert gamma.returncode == 0, gamma.stderr
    means = {r["checkpoint"]: r["mean"] for r in json.loads(gamma.stdout)}
    assert {r["data"] for r in json.loads(gamma.stdout)} == {"step-2"}
    assert means["base"] < means["step-1"] < means["step-2"], means
    assert means["base"] < 0, "S slightly prefers the rejected (rude) replies, like the paper's S"
    assert _load_script("check").check(json.loads((run_dir / "reports" / "gamma.json").read_text()))[0]
