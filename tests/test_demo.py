"""The embedded demo (`make demo`): the committed assets in demo/ load offline, and configs/demo.yaml reproduces the
paper's Fig. 2 ordering of mean γ on D_2, base < step-1 < step-2."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
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
    gamma = run_cli("gamma", str(CONFIG), f"run_dir={run_dir}", env=env)  # the table, as `make demo` prints it
    assert gamma.returncode == 0, gamma.stderr
    results = json.loads((run_dir / "reports" / "gamma.json").read_text())
    means = {r["checkpoint"]: r["mean"] for r in results}
    assert {r["data"] for r in results} == {"step-2"}
    assert means["base"] < means["step-1"] < means["step-2"], means
    assert means["base"] < 0, "S slightly prefers the rejected (rude) replies, like the paper's S"
    ok, message = _load_script("check").check(results)
    assert ok, message

    # the README shows what `make demo` prints: the γ table, then demo/check.py's line
    printed = gamma.stdout.rstrip("\n").splitlines() + [f"OK: {message}"]
    assert_same_figures(readme_demo_block(), printed)


NUMBER = re.compile(r"(?<![\w-])-?\d+(?:\.\d+)?")  # a figure, not the digit of a label (step-2, D_2)


def readme_demo_block() -> list[str]:
    """The lines of the README's fenced block that shows `make demo`'s output (the one with demo/check.py's line)."""
    blocks, block = [], None
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith("```") and block is None:  # an opening fence
            block = []
        elif line.startswith("```"):  # the closing one
            blocks.append(block)
            block = None
        elif block is not None:
            block.append(line)
    [block] = [b for b in blocks if any(line.startswith("OK: mean γ on D_2") for line in b)]
    return block


def assert_same_figures(readme: list[str], printed: list[str]) -> None:
    """The README's lines as printed: every character but the numbers identical (the table's layout, labels and
    widths) and every count exact; every decimal equal to within one unit of its last printed digit (float noise:
    the README committed as "what make demo prints now" and a fresh run of that commit on another day differed in
    the 4th decimal of two figures); else the README needs the printed block."""
    def split(line: str) -> tuple[list[str], list[str]]:
        return NUMBER.split(line)[::2], [m.group(0) for m in NUMBER.finditer(line)]

    drift = "the README's `make demo` block differs from what the demo prints; paste this:\n" + "\n".join(printed)
    assert len(readme) == len(printed), drift
    for old, new in zip(readme, printed):
        (old_text, old_numbers), (new_text, new_numbers) = split(old), split(new)
        assert old_text == new_text and len(old_numbers) == len(new_numbers), drift
        for a, b in zip(old_numbers, new_numbers):
            unit = 10.0 ** -len(a.split(".")[1]) if "." in a else 0.0
            assert len(a) == len(b) and abs(float(a) - float(b)) <= unit * 1.001, drift


def test_readme_figure_comparison():
    block = readme_demo_block()
    assert block[0] == "γ on step-2" and block[-1].startswith("OK: mean γ on D_2 rises")
    assert_same_figures(block, list(block))
    row = next(i for i, line in enumerate(block) if line.startswith("│ step-2"))
    mean = [m.group(0) for m in NUMBER.finditer(block[row])][1]  # after n: the mean, "142.3608"
    last = int(mean[-1])
    nudged = block[:row] + [block[row].replace(mean, mean[:-1] + str(last + 1 if last < 9 else last - 1))] \
        + block[row + 1:]
    assert_same_figures(block, nudged)  # float noise in the last digit
    changed = block[:row] + [block[row].replace(mean, mean[:-3] + str((int(mean[-3]) + 1) % 10) + mean[-2:])] \
        + block[row + 1:]
    for wrong in (changed, [line.replace("step-2 ", "step-3 ") for line in block],
                  [line.replace(" 152 ", " 153 ") for line in block], block[:-1]):
        with pytest.raises(AssertionError):
            assert_same_figures(block, wrong)
