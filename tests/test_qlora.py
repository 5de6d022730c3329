"""QLoRA (model.quantization with peft): every role loads quant(M_{t-1}), so step t's reference is exactly the
target's starting point (ln 2 at update 0); M_t is the adapter merged into the full-precision M_{t-1}, a plain
transformers checkpoint. Config mistakes name model.quantization; the numerics fingerprint includes it."""

import json
import math
import sys
from dataclasses import replace

import pytest
import torch

from sdpo_cli.config import ModelConfig, load_config
from sdpo_cli.errors import ConfigError
from sdpo_cli.fingerprints import numerics
from tests.conftest import run_cli

QLORA = {"peft.enabled": True, "peft.r": 4, "peft.alpha": 8, "model.quantization": "4bit"}


@pytest.mark.parametrize("overrides,message,hint", [
    (["model.quantization=4bit"], "model.quantization: a quantized model can only be trained through a LoRA adapter",
     "peft.enabled=true"),
    (["model.quantization=3bit", "peft.enabled=true"], "model.quantization: unknown value '3bit'", "4bit | 8bit"),
], ids=["without-peft", "unknown-value"])
def test_quantization_mistakes_name_the_key(tiny_config, overrides, message, hint):
    config, _ = tiny_config()
    with pytest.raises(ConfigError) as e:
        load_config(config, overrides)
    assert message in e.value.message and hint in e.value.hint and e.value.exit_code == 2


def test_quantization_without_peft_is_one_line_on_the_cli(tiny_config):
    config, run = tiny_config(**{"model.quantization": "4bit"})
    result = run_cli("split", str(config))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "Error:" in result.stderr and "model.quantization" in result.stderr and "peft.enabled=true" in result.stderr
    assert not run.exists()  # refused before any work


def test_missing_bitsandbytes_says_how_to_install(tiny_config, tiny_model_dir, monkeypatch):
    from sdpo_cli.models import load_model

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` raises, find_spec finds nothing
    config, _ = tiny_config(**QLORA)
    with pytest.raises(ConfigError) as e:
        load_config(config)
    assert "bitsandbytes" in e.value.message and "sdpo[qlora]" in e.value.hint
    with pytest.raises(ConfigError) as e:  # and where a model is loaded (a config validated elsewhere)
        load_model(ModelConfig(base=str(tiny_model_dir), quantization="4bit"))
    assert "bitsandbytes" in e.value.message and "sdpo[qlora]" in e.value.hint


def test_quantization_is_part_of_the_numerics_fingerprint(tiny_config):
    config, _ = tiny_config()
    plain = load_config(config)
    assert "quantization" not in str(numerics(plain))  # unquantized runs keep the fingerprints they had
    pytest.importorskip("bitsandbytes")
    four = load_config(config, ["model.quantization=4bit", "peft.enabled=true"])
    eight = load_config(config, ["model.quantization=8bit", "peft.enabled=true"])
    assert len({str(numerics(plain)), str(numerics(four)), str(numerics(eight))}) == 3


def test_quantized_loading_is_the_same_model_for_every_role(tiny_model_dir):
    """bf16 compute: the unquantized parameters go to fp32 for every role (as peft's prepare_model_for_kbit_training
    does for the target), and inference (reflogp) and autograd (train) give the same logits."""
    bnb = pytest.importorskip("bitsandbytes")
    pytest.importorskip("peft")
    from sdpo_cli.models import load_model

    cfg = ModelConfig(base=str(tiny_model_dir), dtype="bfloat16", quantization="4bit")
    ids = torch.randint(4, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    ref = load_model(cfg)  # eval mode, as reflogp
    assert isinstance(ref.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    assert ref.model.embed_tokens.weight.dtype == torch.float32 and ref.lm_head.weight.dtype == torch.float32
    assert not any(p.requires_grad for p in ref.parameters())
    with torch.inference_mode():
        logits_ref = ref(ids).logits
    target = load_model(cfg, train=True)
    target.enable_input_require_grads()  # as train does with gradient checkpointing: inputs that need grad
    logits_target = target(ids).logits
    assert torch.equal(logits_ref, logits_target.detach())

    eight = load_model(replace(cfg, quantization="8bit"))
    assert isinstance(eight.model.layers[0].mlp.up_proj, bnb.nn.Linear8bitLt)


@pytest.mark.slow
def test_qlora_sdpo_two_steps(tiny_config, tiny_model_dir):
    pytest.importorskip("bitsandbytes")
    peft = pytest.importorskip("peft")
    import datasets
    from transformers import AutoModelForCausalLM

    from sdpo_cli.models import load_model
    from sdpo_cli.scoring import score_pairs

    config, run = tiny_config(**QLORA)
    result = run_cli("run", str(config))
    assert result.returncode == 0, result.stderr
    assert "QLoRA (4bit base) r=4 alpha=8" in result.stderr
    for t in (1, 2):
        first = json.loads((run / "logs" / f"train-step-{t}.jsonl").read_text().splitlines()[0])
        assert first["check"] == "ok" and first["loss"] == pytest.approx(math.log(2), abs=1e-6)
        assert first["rewards/margins"] == 0.0  # the target starts as exactly the reference: quant(M_{t-1})
        assert (run / "checkpoints" / f"step-{t}" / "adapter" / "adapter_config.json").is_file()

    # M_1 is a plain full-precision checkpoint: plain transformers loads it, no quantization in its config
    m1_dir = run / "checkpoints" / "step-1"
    assert "quantization_config" not in json.loads((m1_dir / "config.json").read_text())
    m1 = AutoModelForCausalLM.from_pretrained(str(m1_dir), dtype=torch.float32).eval()
    assert m1.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32

    # ... and it is S + the step-1 adapter, merged in full precision (peft on plain S gives the same weights)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    merged = peft.PeftModel.from_pretrained(base, str(m1_dir / "adapter")).merge_and_unload()
    s = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    changed = set()
    for (name, a), (_, b), (_, s_param) in zip(m1.named_parameters(), merged.named_parameters(),
                                               s.named_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        if not torch.equal(a, s_param):
            changed.add(name)
    assert changed and all(("q_proj" in n or "v_proj" in n) for n in changed)  # only LoRA's targets moved

    # step 2's reference log-probs are those of quant(M_1), the model step 2's target starts from
    data = datasets.load_from_disk(str(run / "data" / "step-2"))
    ref = datasets.load_from_disk(str(run / "reflogp" / "step-2"))
    quantized_m1 = load_model(ModelConfig(base=str(tiny_model_dir), quantization="4bit"), m1_dir)
    chosen, rejected = score_pairs(quantized_m1, data, pad_id=0, batch_size=8, device="cpu")
    assert chosen == pytest.approx(ref["ref_chosen_logp"], abs=1e-5)
    assert rejected == pytest.approx(ref["ref_rejected_logp"], abs=1e-5)
    plain_chosen, _ = score_pairs(m1, data, pad_id=0, batch_size=8, device="cpu")
    assert max(abs(a - b) for a, b in zip(plain_chosen, ref["ref_chosen_logp"])) > 1e-3  # quantization did apply
