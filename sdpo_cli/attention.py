"""The prefix layout's attention without an L × L mask: two causal pieces per row (issue 16).

A prefix row is ``prompt (P) + chosen (C) + rejected (R)`` (sdpo_cli/collate.py). Chosen queries see the prompt and
the chosen reply before them; rejected queries see the prompt and the rejected reply before them, never the chosen
reply. With an explicit [L, L] mask, sdpa's CPU kernel turns the boolean mask into an fp32 copy that every layer
saves for backward (144 MiB per layer for a 6,144-token row, 3.4 GiB over 6 layers at 8K tokens per sequence:
docs/performance.md, "Long pairs"), and it computes every one of the L² scores. Here each row is two plain causal
attentions instead, with no mask at all:

* piece 1: queries, keys and values of ``prompt + chosen`` (positions 0..P+C-1), causal;
* piece 2: those of ``prompt + rejected`` (positions 0..P-1 and P+C..P+C+R-1), causal; its rejected queries see
  exactly the prompt and the rejected reply before them. Its prompt queries repeat piece 1's (same inputs, same
  output), and are dropped.

That is (P+C)²/2 + (P+R)²/2 scores with the kernels' causal block skipping, the cost of TRL's two padded rows,
instead of (P+C+R)² — and memory linear in L. Padding positions get a zero output: nothing attends to them and they
are never scored.

How it is wired: `use_prefix_pieces(model)` switches a model whose attention is sdpa to the implementation
registered here under PIECES (transformers' AttentionInterface), which is sdpa itself for every call that does not
carry the prefix lengths (so the padded and packed layouts are unchanged), and runs the pieces for calls that do
(`logprobs._attention_inputs` passes them as the ``sdpo_prefix`` keyword, which transformers hands through the
decoder to every attention call, also when gradient checkpointing recomputes a layer). `runtime.prefix_attention:
mask` keeps the explicit mask (tests compare both: tests/test_layouts.py).
"""

from __future__ import annotations

import torch

PIECES = "sdpo_prefix_sdpa"  # the attention implementation's registered name
_registered = False


def _sdpa():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward


def prefix_pieces_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                            is_causal=None, sdpo_prefix=None, **kwargs):
    """transformers' attention signature: query (B, Hq, L, D), key/value (B, Hkv, L, D) -> ((B, L, Hq, D), None).
    `sdpo_prefix`: ((P, C, R) per row) for a prefix-layout batch; without it, plain sdpa with `attention_mask`."""
    sdpa = _sdpa()
    if sdpo_prefix is None:
        if attention_mask is not None and attention_mask.shape[-1] == 1 and query.shape[2] > 1:
            # our placeholder arrived without the lengths: this architecture does not hand the forward's keyword
            # arguments to its attention, and sdpa would attend to everything
            raise RuntimeError(f"{type(module).__name__} does not pass keyword arguments to its attention, which the "
                               "prefix layout's causal pieces need: set runtime.prefix_attention=mask")
        return sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                    is_causal=is_causal, **kwargs)
    length, rows = query.shape[2], []
    for b, (prompt, chosen, rejected) in enumerate(sdpo_prefix):
        q, k, v = query[b:b + 1], key[b:b + 1], value[b:b + 1]
        end = prompt + chosen
        first, _ = sdpa(module, q[:, :, :end], k[:, :, :end], v[:, :, :end], None, dropout=dropout,
                        scaling=scaling, is_causal=True)
        parts = [first]
        if rejected:
            q, k, v = (torch.cat([t[:, :, :prompt], t[:, :, end:end + rejected]], dim=2) for t in (q, k, v))
            second, _ = sdpa(module, q, k, v, None, dropout=dropout, scaling=scaling, is_causal=True)
            parts.append(second[:, prompt:])
        pad = length - end - rejected
        if pad:
            parts.append(first.new_zeros((1, pad, *first.shape[2:])))
        rows.append(torch.cat(parts, dim=1))
    return torch.cat(rows, dim=0), None


def _register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(PIECES, prefix_pieces_attention)
    # masks for calls without the prefix lengths are sdpa's (the prefix calls pass a prepared placeholder)
    AttentionMaskInterface.register(PIECES, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    _registered = True


def prefix_attention(cfg) -> str:
    """runtime.prefix_attention resolved: `auto` is pieces, or mask with train.compile (compiled blocks would
    specialise on every row's lengths, which the pieces pass as Python integers)."""
    choice = str(cfg.runtime.prefix_attention)
    if choice == "auto":
        return "mask" if cfg.train.compile else "pieces"
    return choice


def use_prefix_pieces(model, on: bool = True) -> None:
    """Switch `model` (its config, shared by every layer) from sdpa to PIECES (`on`) or back; idempotent."""
    from sdpo_cli.collate import model_config

    _register()
    config = model_config(model)
    if config._attn_implementation in ("sdpa", PIECES):
        config._attn_implementation = PIECES if on else "sdpa"
