"""Whether a step checkpoints its activations: `train.gradient_checkpointing: auto` (issue 16).

Checkpointing trades time (one more forward of every layer in backward: +14 % at 4K tokens per sequence, +24 % at 8K
on the bench model, docs/performance.md "Long pairs") for memory (at 4K: 1,640 MB of saved activations become 52). It
pays when activations dominate memory, which is a matter of length: saved activations grow with the tokens of a
micro-batch, the model's training state does not. `auto` therefore compares an estimate of the longest micro-batch's
activations with a budget, train.activation_budget_gb, by default the bytes the training state itself takes on this
process (weights, plus gradients and two AdamW moments of the trainable ones; a shard of them under FSDP / ZeRO-3)
but at least MIN_BUDGET_GB: checkpointing turns on once activations would more than double the memory, and never for
the few hundred MB a small model's short pairs need (the test models and the demo would otherwise always checkpoint,
their state being tiny). Short pairs train at full speed, long ones lean (the bench model at 4K tokens per sequence:
0.79 GB estimated against a 0.33 GB state and the 0.5 GB floor; at 1K, 0.2 GB: off).

Not all-or-nothing: where transformers can checkpoint every n-th layer only (`activation_checkpointing_enable(
every_n_layers=n)`, transformers 5), `auto` checkpoints the fewest layers that bring the kept activations within the
budget: a share 1/n ≥ 1 − budget / activations, so activations of 1.5× the budget checkpoint every third layer and
spend a third of full checkpointing's recompute.
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 1e9
MIN_BUDGET_GB = 0.5  # the default budget's floor


def activation_bytes(config, positions: int, value_bytes: int) -> int:
    """Estimated bytes a decoder saves for backward over `positions` token positions without checkpointing.

    Per layer and position a Llama-style block keeps about 4 × intermediate + 10 × hidden values: the gated MLP's
    gate and up outputs, its activation and the down projection's input; attention's q, k, v, output and the
    rotary inputs; the norms' inputs. On the bench model (hidden 256, MLP 704, fp32) that is 21.5 KB per position
    and layer, against 21 KB measured with saved-tensor hooks at 4K (docs/performance.md, "where the memory goes").
    """
    hidden = config.hidden_size
    intermediate = getattr(config, "intermediate_size", None) or 4 * hidden
    return positions * config.num_hidden_layers * (4 * intermediate + 10 * hidden) * value_bytes


def state_bytes(model, shards: int = 1) -> int:
    """Bytes of the training state on one process: every weight, and a gradient and two AdamW moments of each
    trainable one, divided over `shards` processes under FSDP / ZeRO-3."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return (weights + 3 * trainable) // max(shards, 1)


@dataclass
class Checkpointing:
    on: bool
    why: str  # for the log line
    every_n_layers: int = 1  # checkpoint layers 0, n, 2n, ... (1: all of them)

    def apply(self, model) -> None:
        """Turn it on in `model` (non-reentrant torch.utils.checkpoint); nothing when off."""
        if not self.on:
            return
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers 5: also every n-th layer
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs,
                                                  every_n_layers=self.every_n_layers)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _size(nbytes: float) -> str:
    return f"{nbytes / GB:.2f} GB" if nbytes >= GB / 10 else f"{nbytes / 2**20:.1f} MiB"


def decide(setting, model, *, positions: int, value_bytes: int, budget_gb: float | None,
           shards: int = 1) -> Checkpointing:
    """train.gradient_checkpointing (true | false | auto) for a step whose longest micro-batch spans `positions`."""
    if setting is not True and setting != "auto":
        return Checkpointing(False, "train.gradient_checkpointing=false")
    if setting is True:
        return Checkpointing(True, "train.gradient_checkpointing=true")
    from sdpo_cli.collate import model_config

    need = activation_bytes(model_config(model), positions, value_bytes)
    state = state_bytes(model, shards)
    budget = budget_gb * GB if budget_gb is not None else max(state, MIN_BUDGET_GB * GB)
    what = ("train.activation_budget_gb" if budget_gb is not None
            else "the training state" if state >= MIN_BUDGET_GB * GB else "the default's 0.5 GB floor")
    why = (f"auto: ~{_size(need)} of activations for the longest micro-batch ({positions} positions) "
           f"{'>' if need > budget else '<='} {_size(budget)} ({what})")
    if need <= budget:
        return Checkpointing(False, why)
    every = 1
    if hasattr(model, "activation_checkpointing_enable"):
        every = max(1, int(1 / (1 - budget / need)))  # the largest n with 1/n >= 1 - budget/need
    return Checkpointing(True, why + (f"; 1 layer in {every}" if every > 1 else ""), every)
