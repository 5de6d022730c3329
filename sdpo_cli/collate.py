"""Collation: B preference pairs -> the token tensors of one forward pass (`PairBatch`), in one of three layouts, all
giving the same per-pair completion log-probs (tests/test_layouts.py); and which layout a model can take.

* ``padded`` — a batch of B pairs is 2B right-padded rows [chosen_1..chosen_B; rejected_1..rejected_B] (TRL's
  layout); the prompt is computed twice.
* ``prefix`` — prefix sharing (Wang & Hegde, arXiv 2410.20305): B rows, one per pair, ``prompt + chosen +
  rejected``. The rejected segment's position ids continue after the prompt (P..P+R-1), attention is causal within
  the row and hides the chosen keys from the rejected queries, and the first rejected token is scored from the last
  prompt position. The prompt's forward and backward run once per pair. Under sdpa that attention runs as two causal
  pieces per row with no mask (sdpo_cli/attention.py, `runtime.prefix_attention: pieces`); otherwise as an explicit
  4D boolean mask [B,1,L,L] (`prefix_mask`).
* ``packed`` — padding-free: ONE row holding the 2B sequences ``prompt + chosen``, ``prompt + rejected`` back to
  back, position ids restarting at 0 for each, no attention mask. transformers then keeps the sequences apart itself:
  flash attention runs its variable-length kernel (we also pass the cumulative sequence lengths, so it need not
  infer them), sdpa / eager get a block-diagonal causal mask from the position ids (dense over the whole row: on
  those, packing costs more attention than it saves padding). Use it with flash_attention_2/3.

Masks come from token counts, never from the pad id. The log-probs themselves are computed in sdpo_cli/logprobs.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from sdpo_cli.config import LAYOUTS

MASKED_ATTENTION = ("sdpa", "eager")  # implementations that take our explicit 4D mask as a tensor
FLASH_ATTENTION = ("flash_attention_2", "flash_attention_3")  # variable-length kernels: the packed layout's own
# (flex_attention would need a BlockMask; its CPU compile fails in torch 2.13 and it has no CPU backward)


@dataclass
class PairBatch:
    """Token tensors for one forward pass over B pairs.

    padded: input_ids, attention_mask (2B, L), position_ids None. prefix: input_ids, position_ids (B, L), no
    attention_mask (`prefix_mask` builds the (B, 1, L, L) mask from the lengths where one is needed). packed:
    input_ids, position_ids (1, N), no attention_mask,
    cu_seqlens (2B+1,) int32 sequence boundaries and max_seqlen. score_index: (K,) flat indices into the (rows*L)
    positions whose hidden state predicts a completion token; targets: (K,) those tokens; segment: (K,) 2i for pair
    i's chosen, 2i+1 for its rejected. chosen_tokens / rejected_tokens: (B,) completion lengths.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    score_index: torch.Tensor
    targets: torch.Tensor
    segment: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor
    position_ids: torch.Tensor | None = None
    layout: str = "padded"
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int = 0
    prompt_tokens: torch.Tensor | None = None

    @property
    def distinct_tokens(self) -> torch.Tensor:
        """(B,) tokens per pair with the prompt counted once: what a throughput figure should count."""
        return self.prompt_tokens + self.chosen_tokens + self.rejected_tokens

    @property
    def n_pairs(self) -> int:
        return self.chosen_tokens.shape[0]

    def to(self, device, non_blocking: bool = False) -> PairBatch:
        return PairBatch(**{k: v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v
                            for k, v in self.__dict__.items()})


def collate_pairs(pairs: list[dict], pad_id: int, layout: str = "padded") -> PairBatch:
    """pairs: dicts with prompt_ids, chosen_ids, rejected_ids. Masks come from lengths, never from the pad id."""
    if any(not pair["prompt_ids"] for pair in pairs):
        raise ValueError("a pair has an empty prompt: its first completion token needs a token (e.g. BOS) before it")
    if layout == "prefix":
        return _collate_prefix(pairs, pad_id)
    if layout == "packed":
        return _collate_packed(pairs)
    if layout != "padded":
        raise ValueError(f"unknown layout {layout!r}: use one of {', '.join(LAYOUTS)}")
    rows, scored = [], []
    for which in ("chosen_ids", "rejected_ids"):
        for i, pair in enumerate(pairs):
            p, c = pair["prompt_ids"], pair[which]
            rows.append(p + c)
            seg = 2 * i + (which == "rejected_ids")
            scored.append((len(p), len(c), seg))
    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    score_index, targets, segment = [], [], []
    for r, (row, (p_len, c_len, seg)) in enumerate(zip(rows, scored)):
        input_ids[r, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[r, : len(row)] = 1
        score_index.extend(range(r * length + p_len - 1, r * length + p_len + c_len - 1))
        targets.extend(row[p_len:])
        segment.extend([seg] * c_len)
    return _pair_batch(pairs, input_ids=input_ids, attention_mask=attention_mask, score_index=score_index,
                       targets=targets, segment=segment)


def _pair_batch(pairs, *, score_index, targets, segment, **tensors) -> PairBatch:
    def longs(values):
        return torch.tensor(values, dtype=torch.long)

    return PairBatch(score_index=longs(score_index), targets=longs(targets), segment=longs(segment),
                     chosen_tokens=longs([len(p["chosen_ids"]) for p in pairs]),
                     rejected_tokens=longs([len(p["rejected_ids"]) for p in pairs]),
                     prompt_tokens=longs([len(p["prompt_ids"]) for p in pairs]), **tensors)


_PROMPT, _CHOSEN, _REJECTED, _PAD = 0, 1, 2, 3


def _collate_prefix(pairs: list[dict], pad_id: int) -> PairBatch:
    """One row per pair: prompt (positions 0..P-1), chosen (P..P+C-1), rejected (again P..P+R-1), right padding.

    Chosen token j is scored from row position P-1+j as in the padded layout; rejected token 0 from P-1 (the last
    prompt token: the rejected segment continues the prompt, not the chosen reply), rejected token j>0 from
    P+C+j-1. Padding positions get position id 0 and attend only to themselves (no fully masked query row, whose
    softmax would be NaN in some sdpa kernels).
    """
    length = max(len(p["prompt_ids"]) + len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in pairs)
    n = len(pairs)
    input_ids = torch.full((n, length), pad_id, dtype=torch.long)
    position_ids = torch.zeros((n, length), dtype=torch.long)
    score_index, targets, segment = [], [], []
    for i, pair in enumerate(pairs):
        p, c, r = pair["prompt_ids"], pair["chosen_ids"], pair["rejected_ids"]
        P, C, R = len(p), len(c), len(r)
        base = i * length
        input_ids[i, : P + C + R] = torch.tensor(p + c + r, dtype=torch.long)
        position_ids[i, : P + C] = torch.arange(P + C)
        position_ids[i, P + C: P + C + R] = torch.arange(P, P + R)
        score_index.extend(range(base + P - 1, base + P + C - 1))
        if R:
            score_index.append(base + P - 1)
            score_index.extend(range(base + P + C, base + P + C + R - 1))
        targets.extend(c + r)
        segment.extend([2 * i] * C + [2 * i + 1] * R)
    return _pair_batch(pairs, input_ids=input_ids, attention_mask=None, position_ids=position_ids,
                       score_index=score_index, targets=targets, segment=segment, layout="prefix")


def prefix_mask(batch: PairBatch) -> torch.Tensor:
    """The prefix layout's (B, 1, L, L) boolean mask (True = may attend), on the batch's device: causal within the
    row, rejected queries never see chosen keys, padding positions attend only to themselves (no fully masked query
    row, whose softmax would be NaN in some sdpa kernels)."""
    n, length = batch.input_ids.shape
    device = batch.input_ids.device
    pos = torch.arange(length, device=device)[None]
    prompt, chosen = batch.prompt_tokens.to(device)[:, None], batch.chosen_tokens.to(device)[:, None]
    end = prompt + chosen + batch.rejected_tokens.to(device)[:, None]
    part = torch.where(pos < prompt, _PROMPT, torch.where(pos < prompt + chosen, _CHOSEN,
                                                          torch.where(pos < end, _REJECTED, _PAD)))
    real = part != _PAD
    q_part, k_part = part[:, :, None], part[:, None, :]
    allowed = torch.ones(length, length, dtype=torch.bool, device=device).tril()[None]
    allowed = allowed & real[:, :, None] & real[:, None, :]
    allowed &= ~((q_part == _REJECTED) & (k_part == _CHOSEN))
    allowed |= torch.eye(length, dtype=torch.bool, device=device)[None]
    return allowed[:, None]


def _collate_packed(pairs: list[dict]) -> PairBatch:
    """One row, no padding: prompt+chosen_1, ..., prompt+chosen_B, prompt+rejected_1, ..., prompt+rejected_B, each
    with position ids 0..len-1 (the restart at 0 is what tells transformers where a sequence begins). Completion
    token j of a sequence starting at offset o is scored from o+P-1+j, as in the padded layout."""
    ids, positions, bounds = [], [], [0]
    score_index, targets, segment = [], [], []
    for which in ("chosen_ids", "rejected_ids"):
        for i, pair in enumerate(pairs):
            p, c = pair["prompt_ids"], pair[which]
            start = len(ids)
            ids.extend(p + c)
            positions.extend(range(len(p) + len(c)))
            bounds.append(len(ids))
            score_index.extend(range(start + len(p) - 1, start + len(p) + len(c) - 1))
            targets.extend(c)
            segment.extend([2 * i + (which == "rejected_ids")] * len(c))
    lengths = [b - a for a, b in zip(bounds, bounds[1:])]
    return _pair_batch(pairs, input_ids=torch.tensor([ids], dtype=torch.long), attention_mask=None,
                       position_ids=torch.tensor([positions], dtype=torch.long), score_index=score_index,
                       targets=targets, segment=segment, layout="packed",
                       cu_seqlens=torch.tensor(bounds, dtype=torch.int32), max_seqlen=max(lengths))


def pair_length(pair: dict, layout: str = "padded") -> int:
    """Positions the pair takes in `layout`: P + max(C, R) (padded, per row), P + C + R (prefix), 2P + C + R
    (packed)."""
    p, c, r = len(pair["prompt_ids"]), len(pair["chosen_ids"]), len(pair["rejected_ids"])
    return {"prefix": p + c + r, "packed": 2 * p + c + r}.get(layout, p + max(c, r))


def pair_lengths(pairs, layout: str = "padded") -> list[int]:
    """`pair_length` of every pair; `pairs` is a list of dicts or a datasets.Dataset (read column-wise)."""
    if hasattr(pairs, "column_names"):
        rows = zip(pairs["prompt_ids"], pairs["chosen_ids"], pairs["rejected_ids"])
        return [pair_length({"prompt_ids": p, "chosen_ids": c, "rejected_ids": r}, layout) for p, c, r in rows]
    return [pair_length(p, layout) for p in pairs]


def model_config(model):
    """The transformers config of a model, a DDP / accelerate-wrapped model, or a config itself."""
    from transformers import PretrainedConfig

    if isinstance(model, PretrainedConfig):
        return model
    while not hasattr(model, "config") and hasattr(model, "module"):  # DDP / accelerate wrappers
        model = model.module
    return getattr(model, "config", None)


def attn_implementation(model) -> str:
    """The model's attention implementation; sdpa also where sdpo_cli/attention.py switched it to the prefix pieces."""
    from sdpo_cli.attention import PIECES

    impl = getattr(model_config(model), "_attn_implementation", None) or "eager"
    return "sdpa" if impl == PIECES else impl


def prefix_pieces(model) -> bool:
    """Whether the model runs the prefix layout's attention as causal pieces (sdpo_cli/attention.py)."""
    from sdpo_cli.attention import PIECES

    return getattr(model_config(model), "_attn_implementation", None) == PIECES


def layout_unsupported(model, layout: str, max_length: int | None = None) -> str | None:
    """Why `layout` would not give the padded layout's numbers for this model (or its config, e.g. from AutoConfig
    with the attn_implementation set as load_model sets it), or None if it does.

    `prefix` needs an attention implementation that takes an explicit 4D mask tensor (sdpa or eager; not
    flash_attention_* or flex_attention), and no sliding-window / local layers (the explicit mask replaces the
    window) unless every sequence fits inside the window (`max_length` <= window). `padded` and `packed` work with
    every implementation: transformers builds their masks (for `packed` from the position ids).
    """
    if layout != "prefix":
        return None
    config = model_config(model)
    impl = attn_implementation(config)
    if impl not in MASKED_ATTENTION:
        return f"attn_implementation {impl!r} takes no 4D attention mask (use one of {', '.join(MASKED_ATTENTION)})"
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None) or []
    local = any(t != "full_attention" for t in layer_types) or (
        window is not None and getattr(config, "use_sliding_window", True))
    if local and (window is None or max_length is None or max_length > window):
        return (f"the model has sliding-window / local attention layers (window {window}, sequences up to "
                f"{max_length} tokens): an explicit mask would override the window")
    return None


def resolve_layout(layout: str, model, max_length: int | None = None, *,
                   warn: Callable[[str], None] | None = None, prefix_attention: str = "pieces") -> str:
    """The layout to use: where the model cannot take `prefix`, flash attention gets `packed` (its varlen kernel
    wastes nothing on padding) and everything else `padded` (sdpa / eager would attend densely over a packed row),
    said through `warn` (the run context's). For `prefix` under sdpa with `prefix_attention` "pieces"
    (runtime.prefix_attention), the model is switched to the mask-free causal pieces (sdpo_cli/attention.py)."""
    why = layout_unsupported(model, layout, max_length)
    if why:
        fallback = "packed" if attn_implementation(model) in FLASH_ATTENTION else "padded"
        if warn is not None:
            warn(f"train.layout={layout} is not possible here ({why}); using the {fallback} layout")
        return fallback
    if layout == "prefix" and attn_implementation(model) == "sdpa":
        from sdpo_cli.attention import use_prefix_pieces

        use_prefix_pieces(model, prefix_attention == "pieces")
    return layout
