"""sDPO with LoRA (peft): each step trains an adapter on M_{t-1}, merged into M_t, so the reference of step t is
exactly the merged M_{t-1}; outputs load with plain transformers (merged) and with peft (adapter on M_{t-1})."""

import json
import math

import datasets
import pytest
import torch

from sdpo_cli.scoring import score_pairs
from tests.conftest import run_cli

peft = pytest.importorskip("peft")


@pytest.mark.slow
def test_lora_sdpo_two_steps(tiny_config, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    config, run = tiny_config(**{"peft.enabled": True, "peft.r": 4, "peft.alpha": 8})
    result = run_cli("run", str(config))
    assert result.returncode == 0, result.stderr
    assert "LoRA r=4 alpha=8" in result.stderr
    for t in (1, 2):
        first = json.loads((run / "logs" / f"train-step-{t}.jsonl").read_text().splitlines()[0])
        assert first["loss"] == pytest.approx(math.log(2), abs=1e-5) and first["check"] == "ok"
        assert (run / "checkpoints" / f"step-{t}" / "adapter" / "adapter_config.json").is_file()

    def load(path):
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()

    base, m1 = load(tiny_model_dir), load(run / "checkpoints" / "step-1")
    changed = {n for (n, a), (_, b) in zip(base.named_parameters(), m1.named_parameters()) if not torch.equal(a, b)}
    assert changed and all(("q_proj" in n or "v_proj" in n) for n in changed)  # only LoRA's targets moved

    # step 2's reference log-probs are M_1's (merged) log-probs ...
    data = datasets.load_from_disk(str(run / "data" / "step-2"))
    ref = datasets.load_from_disk(str(run / "reflogp" / "step-2"))
    chosen, rejected = score_pairs(m1, data, pad_id=0, batch_size=8, device="cpu")
    assert chosen == pytest.approx(ref["ref_chosen_logp"], abs=1e-5)
    assert rejected == pytest.approx(ref["ref_rejected_logp"], abs=1e-5)
    # ... and M_1's adapter applied on S with peft gives the same model
    with_adapter = peft.PeftModel.from_pretrained(load(tiny_model_dir), str(run / "checkpoints" / "step-1" / "adapter"))
    c2, r2 = score_pairs(with_adapter.eval(), data, pad_id=0, batch_size=8, device="cpu")
    assert c2 == pytest.approx(chosen, abs=1e-4) and r2 == pytest.approx(rejected, abs=1e-4)
