"""The model card of a checkpoint: `checkpoints/step-t/README.md`, what the Hugging Face Hub shows for M_t.

train.save_target writes it inside the checkpoint's temporary folder (rundir.writing), so the card is part of the
atomic artifact and of its integrity manifest (meta.json "files"). It says what M_t is and how it was made: the base
model, the sDPO step and its reference, the step's data (sources and pair counts from data/step-t/meta.json), the
dpo and train hyper-parameters, the first and last logged loss and margin, the mean γ_ref (reflogp/step-t/meta.json),
the sdpo version, and how to publish the folder with the hub's own CLI (`hf upload`).

The card holds no clock time and no host name; the upload command names the folder as typed from the working
directory. Local paths appear as their last component only (a card is made to be published); hub ids
appear whole, and only hub ids go to the YAML front matter (`base_model`, `datasets`), which the hub validates.
"""

from __future__ import annotations

import os
from pathlib import Path

from sdpo_cli import __version__
from sdpo_cli.config import SdpoConfig, loss_names, num_steps, section

PAPER = "[arXiv:2403.19270](https://arxiv.org/abs/2403.19270)"


def write_model_card(folder: Path, cfg: SdpoConfig, *, meta: dict, data_meta: dict, ref_meta: dict,
                     published: Path) -> Path:
    """Write `folder`/README.md for M_t. `meta`: the checkpoint's meta.json as train builds it (step, pairs, updates,
    epochs, first and last records); `data_meta` / `ref_meta`: data/step-t's and reflogp/step-t's; `published`: the
    checkpoint's final folder, named in the upload command."""
    path = folder / "README.md"
    path.write_text(render(cfg, meta=meta, data_meta=data_meta, ref_meta=ref_meta, published=published))
    return path


def render(cfg: SdpoConfig, *, meta: dict, data_meta: dict, ref_meta: dict, published: Path) -> str:
    step = meta["step"]
    parts = [_front_matter(cfg), _summary(cfg, meta), _data(cfg, step, data_meta),
             _hyper_parameters(cfg), _curve(meta, ref_meta), _usage(step, published)]
    return "\n".join(parts)


def is_local(name: str) -> bool:
    """A local file or folder, not a hub id: the config resolves local paths to absolute ones (config._resolve)."""
    return os.path.isabs(name) or name.startswith(("~", "."))


def shown(name: str) -> str:
    """How the card names a model or dataset, as code: a hub id whole, a local path by its last component."""
    return f"`{Path(name).name}` (a local path)" if is_local(name) else f"`{name}`"


def _front_matter(cfg: SdpoConfig) -> str:
    base = cfg.model.base
    lines = ["---", "library_name: transformers"]
    if is_local(base):
        lines.append(f"# base_model: the hub id of {Path(base).name} (trained from a local folder of it)")
    else:
        lines.append(f"base_model: {base}")
    hub_data = sorted({s.path for s in cfg.data.sources if not is_local(s.path)})
    if hub_data:
        lines += ["datasets:", *(f"- {d}" for d in hub_data)]
    lines += ["tags:", "- sdpo", "- dpo", "---", ""]
    return "\n".join(lines)


def _model_of(cfg: SdpoConfig, choice: str, step: int) -> str:
    """M_{t-1} / S / a named model, as dpo.reference or dpo.target_init chose it for step t."""
    if choice == "previous":
        return f"M_{step - 1}, the model of step {step - 1}" if step > 1 else "S, the base model (M_0)"
    if choice == "base":
        return "S, the base model"
    return f"{shown(choice)} (dpo.reference)"


def _loss(cfg: SdpoConfig) -> str:
    """The loss as the config sets it: `sigmoid`; `sigmoid` + 0.5 × `sft`; with its modifiers (docs/losses.md)."""
    dpo = cfg.dpo
    names = loss_names(dpo.loss)
    weights = list(dpo.loss_weights) if dpo.loss_weights is not None else [1.0] * len(names)
    terms = " + ".join(f"`{n}`" if w == 1.0 else f"{w:g} × `{n}`" for n, w in zip(names, weights))
    extras = [f"label smoothing ε = {dpo.label_smoothing:g}" if dpo.label_smoothing else "",
              f"NLL weight {dpo.nll_weight:g}" if dpo.nll_weight else "",
              f"LD-DPO α = {dpo.ld_alpha:g}" if dpo.ld_alpha is not None else "",
              "WPO weighting" if dpo.use_weighting else "",
              f"f-divergence {dpo.f_divergence_type}" if dpo.f_divergence_type != "reverse_kl" else ""]
    return f"DPO loss {terms}" + "".join(f", {e}" for e in extras if e)


def _summary(cfg: SdpoConfig, meta: dict) -> str:
    step, steps = meta["step"], num_steps(cfg)
    lora = (f"\n- **LoRA:** r={cfg.peft.r}, alpha={cfg.peft.alpha}; the step's adapter is merged into these weights "
            "and kept in `adapter/`" if cfg.peft.enabled else "")
    check = meta["first"].get("check")
    expected = meta["first"].get("check/expected_loss")  # logged since every TRL loss (docs/losses.md)
    value = f", {expected:.6f}" if expected is not None else ""
    check_line = (f"\n- **Update-0 check:** {check} (target == reference there, so the loss must be its value at "
                  f"equal models{value})" if check in ("ok", "FAILED") else "")
    return f"""# M_{step}: sDPO step {step} of {steps}

This is M_{step}, the model after step {step} of {steps} of stepwise DPO (sDPO, Kim et al. 2024, {PAPER}), trained
with sdpo {__version__}. sDPO aligns a model with DPO on preference data in steps, by default each step against the
model aligned by the step before as its reference, so that later steps learn against a stronger reference.

- **Base model (S = M_0):** {shown(cfg.model.base)}
- **This step:** {step} of {steps}; the target started from {_model_of(cfg, str(cfg.dpo.target_init), step)}
- **Reference π_ref:** {_model_of(cfg, cfg.dpo.reference, step)}
- **Training:** {meta['pairs']} preference pairs, {meta['updates']} optimizer updates ({meta['epochs']} epochs) on \
{meta['world_size']} process(es); {_loss(cfg)}, β = {cfg.dpo.beta}{lora}{check_line}
"""


def _data(cfg: SdpoConfig, step: int, data_meta: dict) -> str:
    sources = {s.name: s for s in cfg.data.sources}
    rows = []
    for name, count in sorted(data_meta.get("rows_per_source", {}).items()):
        src = sources.get(name)
        where = shown(src.path) if src is not None else "?"
        detail = "" if src is None or is_local(src.path) else f", split {src.split}" + (
            f", subset {src.subset}" if src.subset else "")
        rows.append(f"| {name} | {where}{detail} | {count} |")
    return f"""## Data of step {step}

{data_meta.get('rows', sum(data_meta.get('rows_per_source', {}).values()))} pairs (split strategy \
`{data_meta.get('strategy', cfg.split.strategy)}`), tokenised to at most {cfg.data.max_length} tokens per sequence:

| source | dataset | pairs |
|---|---|---|
""" + "\n".join(rows) + "\n"


def _hyper_parameters(cfg: SdpoConfig) -> str:
    rows = []
    for name, values in section(cfg, "dpo", "train").items():
        for key, value in values.items():
            if isinstance(value, str) and is_local(value):
                value = shown(value)  # dpo.reference: a local model
            rows.append(f"| {name}.{key} | {'null' if value is None else value} |")
    return "## Hyper-parameters\n\n| key | value |\n|---|---|\n" + "\n".join(rows) + "\n"


def _curve(meta: dict, ref_meta: dict) -> str:
    first, last = meta["first"], meta["last"]
    rows = [f"| {label} | {r['update']} | {r['loss']:.4f} | {r['rewards/margins']:.4f} |"
            for label, r in (("first logged", first), ("last logged", last))]
    gamma = ref_meta.get("gamma_ref_mean")
    gamma_line = "" if gamma is None else (
        f"\nMean γ_ref = log π_ref(chosen) − log π_ref(rejected) over the step's pairs: {gamma:.4f}.\n")
    return ("## Training\n\nUpdates are numbered from 0; the full log is `logs/train-step-"
            f"{meta['step']}.jsonl` in the run directory.\n\n"
            "| record | update | loss | margin (rewards/margins) |\n|---|---|---|---|\n" + "\n".join(rows) + "\n"
            + gamma_line + _held_out(meta))


def _held_out(meta: dict) -> str:
    """The eval/* metrics on the step's held-out pairs before the first update and at the end, if it had any."""
    if "eval" not in meta:
        return ""
    rows = [f"| {label} | {r['update']} | {r['eval/loss']:.4f} | {r['eval/rewards/margins']:.4f} | "
            f"{r['eval/rewards/accuracies']:.3f} | {r['eval/gamma/policy']:.4f} |"
            for label, r in (("before training", meta["eval_first"]), ("after training", meta["eval"]))]
    return (f"\n### Held-out pairs\n\n{meta['eval']['eval/pairs']} pairs not trained on, scored with this step's "
            "reference log-probs (eval/* in the log; γ = mean log π(chosen) − log π(rejected) under the model):\n\n"
            "| when | updates done | loss | margin | accuracy | γ |\n|---|---|---|---|---|---|\n"
            + "\n".join(rows) + "\n")


def _usage(step: int, published: Path) -> str:
    folder = _as_typed(published)
    return f"""## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("<your-name>/<repo>")
tokenizer = AutoTokenizer.from_pretrained("<your-name>/<repo>")
```

## Publish

With the Hugging Face Hub's own CLI (`pip install -U huggingface_hub`, then `hf auth login`):

```
hf upload <your-name>/<repo> {folder}
```

`meta.json` in this folder records the fingerprint, the versions and a hash of every file of M_{step}.
"""


def _as_typed(path: Path) -> str:
    """The checkpoint folder as the user would type it: relative to the working directory when inside it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)
