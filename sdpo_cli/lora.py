"""LoRA and QLoRA steps (peft; bitsandbytes for model.quantization): a fresh adapter per sDPO step, merged into M_t.

sDPO's semantics stay exact with an adapter: the reference of step t is M_{t-1} including every earlier adapter,
because M_t is written as a plain merged checkpoint at the end of each step, and step t+1 starts a fresh adapter on it.

    LoRA    target of step t = M_{t-1} + adapter (B = 0 at start);  M_t = merge(M_{t-1}, adapter), done in place.
    QLoRA   target of step t = quant(M_{t-1}) + adapter;  M_t = merge(M_{t-1}, adapter) into the FULL-PRECISION
            M_{t-1}, reloaded unquantized in model.dtype on the CPU. Merging into the quantized weights would
            dequantize them, so M_t would inherit the quantization error of every earlier step and could not be
            saved as a plain checkpoint; this way M_t loads with plain transformers, and step t+1 quantizes it anew.

The reference side of QLoRA: reflogp (and gamma, and the curriculum scores) load the reference with the same
quantization (models.load_model applies model.quantization to every role), so at update 0 the target and the
reference are the same quant(M_{t-1}) and the loss is ln 2. The adapter is trained against quant(M_{t-1}), and the
merge adds it to M_{t-1}: quant(M_{t-1} + BA) is not quant(M_{t-1}) + BA, which is the usual QLoRA approximation; the
next step's reference and start are both quant(M_t), so the next ln 2 check holds regardless.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable

from sdpo_cli.config import LoraConfig, ModelConfig
from sdpo_cli.errors import ConfigError
from sdpo_cli.models import load_model, quiet_bitsandbytes


def _peft():
    try:
        with quiet_bitsandbytes():
            import peft
    except ImportError:
        raise ConfigError("peft.enabled: the peft package is not installed",
                          hint="pip install 'sdpo[lora]'  # or set peft.enabled=false") from None
    return peft


def with_lora(model, lora: LoraConfig, quantization: str | None = None, *,
              info: Callable[[str], None] | None = None):
    """Wrap the target in a fresh LoRA adapter (peft). B starts at zero, so update 0 still sees target == M_{t-1}
    (quant(M_{t-1}) with model.quantization, which models.load_model has already applied and prepared)."""
    peft = _peft()
    config = peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, task_type="CAUSAL_LM",
                             target_modules=list(lora.target_modules) if lora.target_modules else None)
    model = peft.get_peft_model(model, config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    kind = f"QLoRA ({quantization} base)" if quantization else "LoRA"
    if info is not None:
        info(f"{kind} r={lora.r} alpha={lora.alpha}: {trainable:,} trainable parameters")
    return model


def merged_model(model_cfg: ModelConfig, trained, init: str, adapter_dir: Path, reload: bool = False):
    """M_t as a plain transformers model: `trained` (the peft model of step t, its adapter already saved in
    `adapter_dir`) merged into M_{t-1} = `init`. Without quantization, in place; with it (or with `reload`: the
    trained model holds FSDP shards), into the full-precision `init`, loaded on the CPU in model.dtype (host RAM for
    one unquantized copy of the model)."""
    if not model_cfg.quantization and not reload:
        return trained.merge_and_unload()
    peft = _peft()
    base = load_model(replace(model_cfg, quantization=None), init)
    merged = peft.PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.config.use_cache = trained.config.use_cache
    return merged
