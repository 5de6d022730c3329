"""The one place completion log-probs are computed: `train`, `reflogp`, `gamma` and the curriculum split all call
`completion_logps`.

log π(y|x) is the SUM over completion tokens (the reply plus the EOS / end-of-turn tokens the template emits) of
log p(token | everything before it), excluding every prompt token (BOS included) and padding. Token i is scored from
the hidden state at position i-1. Softmax statistics and sums are float32 whatever the model dtype (DESIGN §1).

Layout: a batch of B pairs is 2B right-padded rows [chosen_1..chosen_B; rejected_1..rejected_B] (TRL's layout).
We run the decoder body, gather only the hidden states that score a completion token, and apply the LM head to them
in chunks, so the [tokens x vocab] logits of the whole batch never exist at once; in training each chunk is
recomputed in backward instead of being kept (activation checkpointing of the head only).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

HEAD_CHUNK = 4096  # scored tokens per LM-head chunk: 4096 x 32K vocab x 4 bytes = 0.5 GB of fp32 logits at most


@dataclass
class PairBatch:
    """Token tensors for one forward pass over B pairs.

    input_ids, attention_mask: (2B, L). score_index: (K,) flat indices into the (2B*L) positions whose hidden state
    predicts a completion token; targets: (K,) those tokens; segment: (K,) 2i for pair i's chosen, 2i+1 for its
    rejected. chosen_tokens / rejected_tokens: (B,) completion lengths.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    score_index: torch.Tensor
    targets: torch.Tensor
    segment: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor

    @property
    def n_pairs(self) -> int:
        return self.chosen_tokens.shape[0]

    def to(self, device, non_blocking: bool = False) -> PairBatch:
        return PairBatch(**{k: v.to(device, non_blocking=non_blocking) for k, v in self.__dict__.items()})


def collate_pairs(pairs: list[dict], pad_id: int) -> PairBatch:
    """pairs: dicts with prompt_ids, chosen_ids, rejected_ids. Masks come from lengths, never from the pad id."""
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
    return PairBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        score_index=torch.tensor(score_index, dtype=torch.long),
        targets=torch.tensor(targets, dtype=torch.long),
        segment=torch.tensor(segment, dtype=torch.long),
        chosen_tokens=torch.tensor([len(p["chosen_ids"]) for p in pairs], dtype=torch.long),
        rejected_tokens=torch.tensor([len(p["rejected_ids"]) for p in pairs], dtype=torch.long),
    )


def _token_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = (hidden @ weight.t()).float()
    return logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def chunked_token_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                        chunk: int = HEAD_CHUNK) -> torch.Tensor:
    """log p(targets | hidden) for (K, H) hidden states and a (V, H) head, holding one chunk of logits at a time."""
    out = []
    for start in range(0, hidden.shape[0], chunk):
        h, t = hidden[start:start + chunk], targets[start:start + chunk]
        if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
            out.append(checkpoint(_token_logps, h, weight, t, use_reentrant=False))
        else:
            out.append(_token_logps(h, weight, t))
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)


def _plain_head(model) -> torch.nn.Linear | None:
    """The LM head if logits are exactly hidden @ W^T (no bias, soft-capping or scaling), else None."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear) or head.bias is not None or not hasattr(model, "get_decoder"):
        return None
    config = getattr(model, "config", None)
    for key in ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale"):
        if getattr(config, key, None) not in (None, 1, 1.0):
            return None
    return head


def completion_logps(model, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs (chosen (B,), rejected (B,)) in float32, with gradients if enabled."""
    head = _plain_head(model)
    if head is not None:
        hidden = model.get_decoder()(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                     use_cache=False).last_hidden_state
        selected = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.score_index)
        token_logps = chunked_token_logps(selected, head.weight, batch.targets)
    else:  # exotic heads: full logits through the model's own forward (correct, not lean)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
        selected = logits.reshape(-1, logits.shape[-1]).index_select(0, batch.score_index).float()
        token_logps = selected.gather(-1, batch.targets[:, None]).squeeze(-1) - torch.logsumexp(selected, dim=-1)
    sums = torch.zeros(2 * batch.n_pairs, dtype=torch.float32, device=token_logps.device)
    sums = sums.index_add(0, batch.segment, token_logps)
    return sums[0::2], sums[1::2]


def length_sorted_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices grouped longest-first into batches of similar length (inference only: order is restored after)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]


def pair_length(pair: dict) -> int:
    return len(pair["prompt_ids"]) + max(len(pair["chosen_ids"]), len(pair["rejected_ids"]))


@torch.inference_mode()
def score_pairs(model, pairs, pad_id: int, batch_size: int, device, autocast=None, progress=None,
                description: str = "log-probs") -> tuple[list[float], list[float]]:
    """Completion log-probs of every pair (in input order) under `model`, in length-sorted inference batches.

    `pairs` is any sequence of dicts with prompt_ids, chosen_ids, rejected_ids (a datasets.Dataset works).
    """
    from contextlib import nullcontext

    lengths = [len(p) + max(len(c), len(r)) for p, c, r in
               zip(pairs["prompt_ids"], pairs["chosen_ids"], pairs["rejected_ids"])] if hasattr(pairs, "column_names") \
        else [pair_length(p) for p in pairs]
    chosen = [0.0] * len(lengths)
    rejected = [0.0] * len(lengths)
    task = progress.add_task(description, total=len(lengths), status="") if progress is not None else None
    for idx in length_sorted_batches(lengths, batch_size):
        rows = [pairs[i] for i in idx]
        batch = collate_pairs(rows, pad_id).to(device)
        with autocast() if autocast is not None else nullcontext():
            c, r = completion_logps(model, batch)
        for i, cv, rv in zip(idx, c.tolist(), r.tolist()):
            chosen[i], rejected[i] = cv, rv
        if task is not None:
            progress.advance(task, len(idx))
    return chosen, rejected
