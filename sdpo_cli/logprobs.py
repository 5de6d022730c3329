"""The one place completion log-probs are computed: `train`, `reflogp`, `gamma` and the curriculum split all call
`completion_logps`.

log π(y|x) is the SUM over completion tokens (the reply plus the EOS / end-of-turn tokens the template emits) of
log p(token | everything before it), excluding every prompt token (BOS included) and padding. Token i is scored from
the hidden state at position i-1. Softmax statistics and sums are float32 whatever the model dtype (DESIGN §1).

Layouts (`collate_pairs(..., layout=)`), all giving the same per-pair sums (tests/test_layouts.py):

* ``padded`` — a batch of B pairs is 2B right-padded rows [chosen_1..chosen_B; rejected_1..rejected_B] (TRL's
  layout); the prompt is computed twice.
* ``prefix`` — prefix sharing (Wang & Hegde, arXiv 2410.20305): B rows, one per pair, ``prompt + chosen +
  rejected``. The rejected segment's position ids continue after the prompt (P..P+R-1), an explicit 4D boolean mask
  [B,1,L,L] is causal within the row and hides the chosen keys from the rejected queries, and the first rejected
  token is scored from the last prompt position. The prompt's forward and backward run once per pair.
* ``packed`` — padding-free: ONE row holding the 2B sequences ``prompt + chosen``, ``prompt + rejected`` back to
  back, position ids restarting at 0 for each, no attention mask. transformers then keeps the sequences apart itself:
  flash attention runs its variable-length kernel (we also pass the cumulative sequence lengths, so it need not
  infer them), sdpa / eager get a block-diagonal causal mask from the position ids (dense over the whole row: on
  those, packing costs more attention than it saves padding). Use it with flash_attention_2/3.

In every layout we run the decoder body, gather only the hidden states that score a completion token, and apply the
LM head to them in chunks, so the [tokens x vocab] logits of the whole batch never exist at once; in training each
chunk is recomputed in backward instead of being kept (`_ChunkedHeadLogps`: one fp32 logsumexp per token
is saved).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sdpo_cli.config import LAYOUTS

HEAD_CHUNK = 4096  # scored tokens per LM-head chunk at most
HEAD_CHUNK_ELEMENTS = 1 << 25  # and at most 32M logits (128 MB in fp32) per chunk: 1024 tokens at a 32K vocabulary
MASKED_ATTENTION = ("sdpa", "eager")  # implementations that take our explicit 4D mask as a tensor
FLASH_ATTENTION = ("flash_attention_2", "flash_attention_3")  # variable-length kernels: the packed layout's own
# (flex_attention would need a BlockMask; its CPU compile fails in torch 2.13 and it has no CPU backward)


@dataclass
class PairBatch:
    """Token tensors for one forward pass over B pairs.

    padded: input_ids, attention_mask (2B, L), position_ids None. prefix: input_ids, position_ids (B, L) and a boolean
    attention_mask (B, 1, L, L) (True = may attend). packed: input_ids, position_ids (1, N), no attention_mask,
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
    return _pair_batch(pairs, input_ids, attention_mask, None, score_index, targets, segment)


def _pair_batch(pairs, input_ids, attention_mask, position_ids, score_index, targets, segment,
                layout: str = "padded", **extra) -> PairBatch:
    def longs(values):
        return torch.tensor(values, dtype=torch.long)

    return PairBatch(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                     score_index=longs(score_index), targets=longs(targets), segment=longs(segment),
                     chosen_tokens=longs([len(p["chosen_ids"]) for p in pairs]),
                     rejected_tokens=longs([len(p["rejected_ids"]) for p in pairs]), layout=layout, **extra)


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
    part = torch.full((n, length), _PAD, dtype=torch.long)
    score_index, targets, segment = [], [], []
    for i, pair in enumerate(pairs):
        p, c, r = pair["prompt_ids"], pair["chosen_ids"], pair["rejected_ids"]
        P, C, R = len(p), len(c), len(r)
        base = i * length
        input_ids[i, : P + C + R] = torch.tensor(p + c + r, dtype=torch.long)
        position_ids[i, : P + C] = torch.arange(P + C)
        position_ids[i, P + C: P + C + R] = torch.arange(P, P + R)
        part[i, :P], part[i, P: P + C], part[i, P + C: P + C + R] = _PROMPT, _CHOSEN, _REJECTED
        score_index.extend(range(base + P - 1, base + P + C - 1))
        if R:
            score_index.append(base + P - 1)
            score_index.extend(range(base + P + C, base + P + C + R - 1))
        targets.extend(c + r)
        segment.extend([2 * i] * C + [2 * i + 1] * R)
    real = part != _PAD
    q_part, k_part = part[:, :, None], part[:, None, :]
    allowed = torch.ones(length, length, dtype=torch.bool).tril()[None] & real[:, :, None] & real[:, None, :]
    allowed &= ~((q_part == _REJECTED) & (k_part == _CHOSEN))
    allowed |= torch.eye(length, dtype=torch.bool)[None]
    return _pair_batch(pairs, input_ids, allowed[:, None], position_ids, score_index, targets, segment, "prefix")


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
    return _pair_batch(pairs, torch.tensor([ids], dtype=torch.long), None, torch.tensor([positions], dtype=torch.long),
                       score_index, targets, segment, "packed",
                       cu_seqlens=torch.tensor(bounds, dtype=torch.int32), max_seqlen=max(lengths))


def _config(model):
    """The transformers config of a model, a DDP / accelerate-wrapped model, or a config itself."""
    from transformers import PretrainedConfig

    if isinstance(model, PretrainedConfig):
        return model
    while not hasattr(model, "config") and hasattr(model, "module"):  # DDP / accelerate wrappers
        model = model.module
    return getattr(model, "config", None)


def _attn_impl(model) -> str:
    return getattr(_config(model), "_attn_implementation", None) or "eager"


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
    config = _config(model)
    impl = _attn_impl(config)
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


def _attention_inputs(model, batch: PairBatch) -> dict:
    """The mask (and position ids) in the form the model's attention implementation takes."""
    if batch.layout == "padded":
        return {"attention_mask": batch.attention_mask}
    if batch.layout == "packed":
        inputs = {"position_ids": batch.position_ids}  # and no mask: transformers detects the packed sequences
        if _attn_impl(model) in FLASH_ATTENTION:  # the varlen kernel's boundaries, so it need not infer them
            inputs.update(cu_seq_lens_q=batch.cu_seqlens, cu_seq_lens_k=batch.cu_seqlens,
                          max_length_q=batch.max_seqlen, max_length_k=batch.max_seqlen)
        return inputs
    mask = batch.attention_mask
    impl = _attn_impl(model)
    if impl == "eager":  # eager adds the mask to the scores: 0 where allowed, the dtype's minimum elsewhere
        dtype = next(model.parameters()).dtype
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    elif impl != "sdpa":  # sdpa takes the boolean mask as is (True = attend)
        raise ValueError(f"layout 'prefix' needs an attention implementation that takes a 4D mask "
                         f"({', '.join(MASKED_ATTENTION)}), not {impl!r}: use layout 'packed' or 'padded'")
    return {"attention_mask": mask, "position_ids": batch.position_ids}


def _chunk_forward(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(token log-probs, logsumexp, the matmul's dtype) of one chunk; the fp32 logits are reused in place."""
    logits = hidden @ weight.t()
    mm_dtype = logits.dtype  # bf16 under autocast: the backward recomputes in the same precision
    logits = logits.float()
    target_logits = logits.gather(-1, targets[:, None]).squeeze(-1)
    peak = logits.amax(dim=-1, keepdim=True)
    lse = logits.sub_(peak).exp_().sum(dim=-1).log_().add_(peak.squeeze(-1))
    return target_logits - lse, lse, mm_dtype


class _ChunkedHeadLogps(torch.autograd.Function):
    """log p(target | hidden) through a (V, H) head, one chunk of [chunk, V] fp32 logits alive at a time.

    Forward keeps only the per-token logsumexp; backward recomputes each chunk's logits (in the forward's matmul
    precision), turns them into softmax - onehot in place, and accumulates the weight gradient in fp32.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk):
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(out)
        mm_dtype = torch.float32
        for start in range(0, hidden.shape[0], chunk):
            end = start + chunk
            out[start:end], lse[start:end], mm_dtype = _chunk_forward(hidden[start:end], weight, targets[start:end])
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk, ctx.mm_dtype = chunk, mm_dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, targets, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dt = ctx.mm_dtype
        w = weight.to(dt)
        grad_h = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_out = grad_out.float()
        for start in range(0, hidden.shape[0], ctx.chunk):
            end = start + ctx.chunk
            h = hidden[start:end].to(dt)
            g = grad_out[start:end]
            # d logp[t] / d logits = onehot(t) - softmax
            grad_logits = (h @ w.t()).float().sub_(lse[start:end, None]).exp_().mul_(-g[:, None])
            grad_logits[torch.arange(h.shape[0], device=h.device), targets[start:end]] += g
            grad_logits = grad_logits.to(dt)
            if need_h:
                grad_h[start:end] = grad_logits @ w
            if need_w:
                if dt == torch.float32:
                    grad_w.addmm_(grad_logits.t(), h)
                else:
                    grad_w += (grad_logits.t() @ h).float()
        return grad_h, grad_w.to(weight.dtype) if need_w else None, None, None


def head_chunk(vocab_size: int) -> int:
    """Scored tokens per LM-head chunk: HEAD_CHUNK, fewer for large vocabularies (HEAD_CHUNK_ELEMENTS logits)."""
    return max(64, min(HEAD_CHUNK, HEAD_CHUNK_ELEMENTS // max(vocab_size, 1)))


def chunked_token_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                        chunk: int | None = None) -> torch.Tensor:
    """log p(targets | hidden) for (K, H) hidden states and a (V, H) head, holding one chunk of logits at a time."""
    chunk = chunk or head_chunk(weight.shape[0])
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=torch.float32)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _ChunkedHeadLogps.apply(hidden, weight, targets, chunk)
    return torch.cat([_chunk_forward(hidden[s:s + chunk], weight, targets[s:s + chunk])[0]
                      for s in range(0, hidden.shape[0], chunk)])


def _engine_wrapped(model) -> bool:
    """DDP, FSDP and DeepSpeed must see their own forward (gradient sync, parameter gathering): no shortcut."""
    if type(model).__name__ in ("DistributedDataParallel", "FullyShardedDataParallel", "DeepSpeedEngine"):
        return True
    try:
        from torch.distributed.fsdp import FSDPModule  # FSDP2's fully_shard
    except ImportError:
        return False
    return isinstance(model, FSDPModule)


def _plain_head(model) -> torch.nn.Linear | None:
    """The LM head if logits are exactly hidden @ W^T (no bias, soft-capping or scaling) and its weight can be read
    directly, else None."""
    if _engine_wrapped(model):  # wrap the model in PairLogps before the engine instead (train.py does)
        return None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear) or head.bias is not None or not hasattr(model, "get_decoder"):
        return None
    if hasattr(head.weight, "ds_id"):  # DeepSpeed ZeRO-3 gathers a partitioned weight only inside its module's call
        return None
    config = getattr(model, "config", None)
    for key in ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale"):
        if getattr(config, key, None) not in (None, 1, 1.0):
            return None
    return head


def completion_logps(model, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs (chosen (B,), rejected (B,)) in float32, with gradients if enabled.

    Works for either layout; the decoder always gets use_cache=False (a cache would also switch off transformers'
    own mask handling) and, for the prefix layout, explicit position ids and a 4D mask.
    """
    head = _plain_head(model)
    inputs = _attention_inputs(model, batch)
    if head is not None:
        hidden = model.get_decoder()(input_ids=batch.input_ids, use_cache=False, **inputs).last_hidden_state
        selected = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.score_index)
        token_logps = chunked_token_logps(selected, head.weight, batch.targets)
    else:  # exotic heads: full logits through the model's own forward (correct, not lean)
        logits = model(input_ids=batch.input_ids, use_cache=False, **inputs).logits
        selected = logits.reshape(-1, logits.shape[-1]).index_select(0, batch.score_index).float()
        token_logps = selected.gather(-1, batch.targets[:, None]).squeeze(-1) - torch.logsumexp(selected, dim=-1)
    sums = torch.zeros(2 * batch.n_pairs, dtype=torch.float32, device=token_logps.device)
    sums = sums.index_add(0, batch.segment, token_logps)
    return sums[0::2], sums[1::2]


class PairLogps(torch.nn.Module):
    """The target as the engines should see it: forward(batch) = completion_logps(model, batch).

    DDP, FSDP and DeepSpeed wrap THIS module, so their hooks (gradient all-reduce, parameter gathering) run around
    our lean path (decoder body + completion-only chunked head) instead of forcing the model's own forward with
    full [tokens x vocab] logits. Under FSDP the head and embeddings belong to the root unit, which is unsharded for
    the whole forward; under ZeRO-3 `_plain_head` sees a partitioned weight and takes the model's forward.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    @property
    def _no_split_modules(self):  # accelerate's FSDP auto-wrap reads the transformer block classes from here
        return getattr(self.model, "_no_split_modules", None)

    def forward(self, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
        return completion_logps(self.model, batch)


def compile_blocks(model: torch.nn.Module) -> int:
    """Regional torch.compile, in place: every transformer block (the classes in `_no_split_modules`), with dynamic
    shapes since batch lengths vary. Blocks share one compiled graph, so compile time is about one block's; in-place
    `Module.compile` keeps parameter names, so checkpoints and engine wrapping are unchanged. Returns the count."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:  # no block classes declared: compile the decoder body as one region
        blocks = [model.get_decoder()]
    for block in blocks:
        block.compile(dynamic=True)
    return len(blocks)


def resolve_layout(layout: str, model, max_length: int | None = None) -> str:
    """The layout to use: where the model cannot take `prefix`, flash attention gets `packed` (its varlen kernel
    wastes nothing on padding) and everything else `padded` (sdpa / eager would attend densely over a packed row),
    with a warning."""
    why = layout_unsupported(model, layout, max_length)
    if why:
        from sdpo_cli.console import warn

        fallback = "packed" if _attn_impl(model) in FLASH_ATTENTION else "padded"
        warn(f"train.layout={layout} is not possible here ({why}); using the {fallback} layout")
        return fallback
    return layout


def length_sorted_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices grouped longest-first into batches of similar length (inference only: order is restored after)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]


def length_grouped_batches(lengths: list[int], batch_size: int, generator_seed: int,
                           mega: int | None = None) -> list[list[int]]:
    """Training batches of similar length in a random order, HF `group_by_length` style; deterministic per seed.

    Shuffle all indices, cut them into mega-batches of `mega` batches (default as transformers:
    min(50, n // (4 * batch_size)), at least 1), sort each mega-batch longest first, cut it into batches, shuffle the
    full batches, keep the one short batch (if n is not a multiple of batch_size) last, and move the batch holding
    the longest pair to the front (a too-long batch fails at update 0, not after an hour). Every index appears exactly
    once. Use `pair_lengths(pairs, layout)` for `lengths`.
    """
    n = len(lengths)
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    if n == 0:
        return []
    if mega is None:
        mega = min(50, n // (4 * batch_size))
    mega = max(1, int(mega))
    g = torch.Generator().manual_seed(int(generator_seed))
    perm = torch.randperm(n, generator=g).tolist()
    span = mega * batch_size
    batches = []
    for s in range(0, n, span):
        group = sorted(perm[s:s + span], key=lambda i: -lengths[i])  # stable: ties keep the shuffled order
        batches.extend(group[j:j + batch_size] for j in range(0, len(group), batch_size))
    tail = [batches.pop()] if len(batches[-1]) < batch_size else []
    batches = [batches[k] for k in torch.randperm(len(batches), generator=g).tolist()] + tail
    longest = max(range(len(batches)), key=lambda b: max(lengths[i] for i in batches[b]))
    if len(batches[longest]) == len(batches[0]):
        batches[0], batches[longest] = batches[longest], batches[0]
    else:  # the short tail batch holds it: swap that one pair into the first batch instead (as transformers does)
        j = max(range(len(batches[longest])), key=lambda k: lengths[batches[longest][k]])
        batches[0][0], batches[longest][j] = batches[longest][j], batches[0][0]
    return batches


class LengthGroupedBatchSampler:
    """`DataLoader(batch_sampler=...)` over `length_grouped_batches`: the order of epoch e is a pure function of
    (seed, e) — seed `seed * 1000 + e`, as train.py's EpochBatches — so a resumed run replays the same batches. Call
    set_epoch(e) before iterating epoch e."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int, mega: int | None = None):
        self.lengths, self.batch_size, self.seed, self.mega = list(lengths), batch_size, seed, mega
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self, epoch: int) -> list[list[int]]:
        return length_grouped_batches(self.lengths, self.batch_size, self.seed * 1000 + epoch, self.mega)

    def __iter__(self):
        return iter(self.batches(self.epoch))

    def __len__(self) -> int:
        return -(-len(self.lengths) // self.batch_size)


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


@torch.inference_mode()
def score_pairs(model, pairs, pad_id: int, batch_size: int, device, autocast=None, progress=None,
                description: str = "log-probs", layout: str = "padded") -> tuple[list[float], list[float]]:
    """Completion log-probs of every pair (in input order) under `model`, in length-sorted inference batches.

    `pairs` is any sequence of dicts with prompt_ids, chosen_ids, rejected_ids (a datasets.Dataset works).
    """
    from contextlib import nullcontext

    lengths = pair_lengths(pairs, layout)
    chosen = [0.0] * len(lengths)
    rejected = [0.0] * len(lengths)
    task = progress.add_task(description, total=len(lengths), status="") if progress is not None else None
    for idx in length_sorted_batches(lengths, batch_size):
        rows = [pairs[i] for i in idx]
        batch = collate_pairs(rows, pad_id, layout).to(device)
        with autocast() if autocast is not None else nullcontext():
            c, r = completion_logps(model, batch)
        for i, cv, rv in zip(idx, c.tolist(), r.tolist()):
            chosen[i], rejected[i] = cv, rv
        if task is not None:
            progress.advance(task, len(idx))
    return chosen, rejected
