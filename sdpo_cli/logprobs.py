"""The one place completion log-probs are computed: `train`, `reflogp`, `gamma` and the curriculum split all call
`completion_logps`.

log π(y|x) is the SUM over completion tokens (the reply plus the EOS / end-of-turn tokens the template emits) of
log p(token | everything before it), excluding every prompt token (BOS included) and padding. Token i is scored from
the hidden state at position i-1. Softmax statistics and sums are float32 whatever the model dtype (DESIGN §1).

The pairs arrive collated (sdpo_cli/collate.py: padded, prefix or packed layout, all giving the same sums).

In every layout we run the decoder body, gather only the hidden states that score a completion token, and apply the
LM head to them in chunks, so the [tokens x vocab] logits of the whole batch never exist at once; in training each
chunk is recomputed in backward instead of being kept (`_ChunkedHeadLogps`: one fp32 logsumexp per token
is saved).
"""

from __future__ import annotations

import torch

from sdpo_cli import runtime
from sdpo_cli.collate import (
    FLASH_ATTENTION,
    MASKED_ATTENTION,
    PairBatch,
    attn_implementation,
    prefix_mask,
    prefix_pieces,
)

HEAD_CHUNK_MIN = 64  # scored tokens per LM-head chunk at least, whatever the vocabulary


def _attention_inputs(model, batch: PairBatch) -> dict:
    """The mask (and position ids) in the form the model's attention implementation takes."""
    if batch.layout == "padded":
        return {"attention_mask": batch.attention_mask}
    if batch.layout == "packed":
        inputs = {"position_ids": batch.position_ids}  # and no mask: transformers detects the packed sequences
        if attn_implementation(model) in FLASH_ATTENTION:  # the varlen kernel's boundaries, so it need not infer them
            inputs.update(cu_seq_lens_q=batch.cu_seqlens, cu_seq_lens_k=batch.cu_seqlens,
                          max_length_q=batch.max_seqlen, max_length_k=batch.max_seqlen)
        return inputs
    if prefix_pieces(model):  # no mask: two causal pieces per row (sdpo_cli/attention.py) from the lengths
        lengths = torch.stack([batch.prompt_tokens, batch.chosen_tokens, batch.rejected_tokens], dim=1).tolist()
        # a prepared 4D mask (transformers passes it through as is, building none of its own) that nothing reads
        placeholder = torch.ones((1, 1, 1, 1), dtype=torch.bool, device=batch.input_ids.device)
        return {"attention_mask": placeholder, "position_ids": batch.position_ids,
                "sdpo_prefix": tuple(map(tuple, lengths))}
    mask = prefix_mask(batch)
    impl = attn_implementation(model)
    if impl == "eager":  # eager adds the mask to the scores: 0 where allowed, the dtype's minimum elsewhere
        dtype = next(model.parameters()).dtype
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    elif impl != "sdpa":  # sdpa takes the boolean mask as is (True = attend)
        raise ValueError(f"layout 'prefix' needs an attention implementation that takes a 4D mask "
                         f"({', '.join(MASKED_ATTENTION)}), not {impl!r}: use layout 'packed' or 'padded'")
    return {"attention_mask": mask, "position_ids": batch.position_ids}


def _chunk_forward(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                   sum_sq: bool = False) -> tuple[torch.Tensor, ...]:
    """(token log-probs, logsumexp, the matmul's dtype, log Σ_v p_v² or None) of one chunk; the fp32 logits are
    reused in place. `sum_sq`: also log Σ_v p_v² per token (WPO's weights, dpo.use_weighting), without gradient."""
    logits = hidden @ weight.t()
    mm_dtype = logits.dtype  # bf16 under autocast: the backward recomputes in the same precision
    logits = logits.float()
    target_logits = logits.gather(-1, targets[:, None]).squeeze(-1)
    peak = logits.amax(dim=-1, keepdim=True)
    logits.sub_(peak)
    # Σ p² = exp(2·peak − 2·lse) · Σ exp(2(l − peak))
    sq = torch.logsumexp(2 * logits.detach(), dim=-1) if sum_sq else None
    lse = logits.exp_().sum(dim=-1).log_().add_(peak.squeeze(-1))
    if sq is not None:
        sq = (sq + 2 * peak.squeeze(-1) - 2 * lse).detach()
    return target_logits - lse, lse, mm_dtype, sq


def _chunks_forward(hidden, weight, targets, chunk: int, sum_sq: bool):
    """(log-probs, logsumexp, log Σ p² or None, the matmul's dtype) of every row, one chunk of logits at a time.

    The outputs are allocated before the first chunk and filled in place: small per-chunk results kept across the
    loop would sit above each chunk's logits in the heap and keep glibc from giving them back (seen: +0.9 GB of RSS
    for 8,192 tokens at a 32K vocabulary in the reference pass, against one 33 MB chunk)."""
    out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    lse = torch.empty_like(out)
    sq = torch.empty_like(out) if sum_sq else None
    mm_dtype = torch.float32
    for start in range(0, hidden.shape[0], chunk):
        end = start + chunk
        out[start:end], lse[start:end], mm_dtype, chunk_sq = _chunk_forward(hidden[start:end], weight,
                                                                           targets[start:end], sum_sq)
        if sum_sq:
            sq[start:end] = chunk_sq
    return out, lse, sq, mm_dtype


class _ChunkedHeadLogps(torch.autograd.Function):
    """log p(target | hidden) through a (V, H) head, one chunk of [chunk, V] fp32 logits alive at a time.

    Forward keeps only the per-token logsumexp; backward recomputes each chunk's logits (in the forward's matmul
    precision), turns them into softmax - onehot in place, and accumulates the weight gradient in fp32. With
    `sum_sq` the forward also returns log Σ_v p_v² per token, which has no gradient (WPO's weights are constants).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk, sum_sq=False):
        out, lse, sq, mm_dtype = _chunks_forward(hidden, weight, targets, chunk, sum_sq)
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk, ctx.mm_dtype = chunk, mm_dtype
        if sum_sq:
            ctx.mark_non_differentiable(sq)
            return out, sq
        return out

    @staticmethod
    def backward(ctx, grad_out, *_):
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
        return grad_h, grad_w.to(weight.dtype) if need_w else None, None, None, None


def head_chunk(vocab_size: int, sixteen_bit: bool = False) -> int:
    """Scored tokens per LM-head chunk, bounded in bytes: runtime.head_chunk_mb (32 MiB by default) of what one chunk
    holds at once — its fp32 logits, worked on in place (4 bytes a logit), and with 16-bit matmuls also the matmul's
    output and, in backward, the gradient cast back (2 + 2 bytes). 256 tokens at a 32K vocabulary in fp32, 27 at
    Qwen's 152K under bf16 raised to HEAD_CHUNK_MIN. (Until issue 16 a chunk was 1,024 tokens at 32K: 128 MiB.)"""
    per_token = max(vocab_size, 1) * (8 if sixteen_bit else 4)
    return max(HEAD_CHUNK_MIN, runtime.head_chunk_bytes // per_token)


def chunked_token_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                        chunk: int | None = None, sum_sq: bool = False):
    """log p(targets | hidden) for (K, H) hidden states and a (V, H) head, holding one chunk of logits at a time.
    `sum_sq`: return (log-probs, log Σ_v p_v² per token without gradient) instead."""
    sixteen_bit = weight.dtype in (torch.bfloat16, torch.float16) or torch.is_autocast_enabled(hidden.device.type)
    chunk = chunk or head_chunk(weight.shape[0], sixteen_bit)
    if hidden.shape[0] == 0:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return (empty, empty) if sum_sq else empty
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _ChunkedHeadLogps.apply(hidden, weight, targets, chunk, sum_sq)
    logps, _, sq, _ = _chunks_forward(hidden, weight, targets, chunk, sum_sq)
    return (logps, sq) if sum_sq else logps


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
    sums = _segment_sums(token_logps(model, batch), batch)
    return sums[0::2], sums[1::2]


def completion_logps_shared(model, batch: PairBatch) -> tuple[torch.Tensor, ...]:
    """(chosen, rejected, chosen_shared, rejected_shared) (B,) each: the sums of `completion_logps`, and the sums over
    the first min(C, R) tokens of each completion only (the length both replies share; LD-DPO weights the rest by
    dpo.ld_alpha), from one forward pass."""
    logps = token_logps(model, batch)
    sums, shared = _segment_sums(logps, batch), _segment_sums(logps * shared_mask(batch), batch)
    return sums[0::2], sums[1::2], shared[0::2], shared[1::2]


def shared_mask(batch: PairBatch) -> torch.Tensor:
    """(K,) 1.0 for the scored tokens among the first min(C, R) tokens of their completion, else 0.0. Every layout
    lists a completion's tokens together and in order (collate.py), so a token's place in its completion is its index
    minus the first index of its segment."""
    segment = batch.segment
    index = torch.arange(segment.shape[0], device=segment.device)
    first = torch.full((2 * batch.n_pairs,), segment.shape[0], dtype=torch.long, device=segment.device)
    first = first.scatter_reduce(0, segment, index, reduce="amin")
    shared = torch.minimum(batch.chosen_tokens, batch.rejected_tokens).to(segment.device)
    return ((index - first[segment]) < shared[segment // 2]).float()


def token_logps(model, batch: PairBatch, sum_sq: bool = False):
    """(K,) log p(token | everything before it) of every scored completion token (batch.targets), float32.
    `sum_sq`: return (those, log Σ_v p_v² of each token's distribution, without gradient) instead (WPO)."""
    head = _plain_head(model)
    inputs = _attention_inputs(model, batch)
    if head is not None:
        hidden = model.get_decoder()(input_ids=batch.input_ids, use_cache=False, **inputs).last_hidden_state
        selected = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.score_index)
        return chunked_token_logps(selected, head.weight, batch.targets, sum_sq=sum_sq)
    # exotic heads: full logits through the model's own forward (correct, not lean)
    logits = model(input_ids=batch.input_ids, use_cache=False, **inputs).logits
    selected = logits.reshape(-1, logits.shape[-1]).index_select(0, batch.score_index).float()
    lse = torch.logsumexp(selected, dim=-1)
    logps = selected.gather(-1, batch.targets[:, None]).squeeze(-1) - lse
    if not sum_sq:
        return logps
    with torch.no_grad():
        return logps, torch.logsumexp(2 * selected, dim=-1) - 2 * lse


def policy_logps(model, batch: PairBatch, *, shared: bool = False, weighting: bool = False) -> tuple:
    """What training needs of the policy, from one forward pass: (chosen, rejected, chosen_shared, rejected_shared,
    chosen_wpo, rejected_wpo), (B,) each. The shared sums (`shared`: LD-DPO) are over the first min(C, R) tokens as in
    `completion_logps_shared`; the WPO terms (`weighting`) are each completion's mean over its tokens of
    log p − log Σ_v p_v², without gradient (TRL's `aligned_logps`). What was not asked for is None."""
    logps, sq = token_logps(model, batch, sum_sq=True) if weighting else (token_logps(model, batch), None)
    sums = _segment_sums(logps, batch)
    out = [sums[0::2], sums[1::2], None, None, None, None]
    if shared:
        shared_sums = _segment_sums(logps * shared_mask(batch), batch)
        out[2:4] = shared_sums[0::2], shared_sums[1::2]
    if weighting:
        with torch.no_grad():
            aligned = _segment_sums(logps.detach() - sq, batch)
            lengths = torch.stack([batch.chosen_tokens, batch.rejected_tokens], dim=1).reshape(-1)
            means = aligned / lengths.to(aligned.device).clamp(min=1)
        out[4:6] = means[0::2], means[1::2]
    return tuple(out)


def _segment_sums(values: torch.Tensor, batch: PairBatch) -> torch.Tensor:
    """(2B,) per-token values summed per completion: [chosen_1, rejected_1, chosen_2, ...]."""
    sums = torch.zeros(2 * batch.n_pairs, dtype=torch.float32, device=values.device)
    return sums.index_add(0, batch.segment, values)


class PairLogps(torch.nn.Module):
    """The target as the engines should see it: forward(batch) = completion_logps(model, batch), or, with `shared`
    (LD-DPO) or `weighting` (WPO), the 6-tuple of `policy_logps`.

    DDP, FSDP and DeepSpeed wrap THIS module, so their hooks (gradient all-reduce, parameter gathering) run around
    our lean path (decoder body + completion-only chunked head) instead of forcing the model's own forward with
    full [tokens x vocab] logits. Under FSDP the head and embeddings belong to the root unit, which is unsharded for
    the whole forward; under ZeRO-3 `_plain_head` sees a partitioned weight and takes the model's forward.
    """

    def __init__(self, model: torch.nn.Module, *, shared: bool = False, weighting: bool = False):
        super().__init__()
        self.model = model
        self.shared, self.weighting = shared, weighting

    @property
    def _no_split_modules(self):  # accelerate's FSDP auto-wrap reads the transformer block classes from here
        return getattr(self.model, "_no_split_modules", None)

    def tie_weights(self, *args, **kwargs):
        """The model's own. accelerate's FSDP2 prepare moves the model to the meta device (which makes new parameter
        objects: lm_head and embed_tokens become two) and loads the full state dict into the shards (which unties
        again), re-tying after each through `model.tie_weights()` if the model it was handed has one. Without this,
        a model with tie_word_embeddings trained its LM head and its embeddings as two tensors under FSDP2, and M_t
        differed from one process's."""
        return self.model.tie_weights(*args, **kwargs)

    def forward(self, batch: PairBatch) -> tuple:
        if self.shared or self.weighting:
            return policy_logps(self.model, batch, shared=self.shared, weighting=self.weighting)
        return completion_logps(self.model, batch)
