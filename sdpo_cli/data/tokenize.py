"""Canonical pairs -> token ids, exactly as TRL 1.16's DPOTrainer tokenises them (research/trl-dpo.md §1c).

- chat rows: prompt = apply_chat_template(prompt, add_generation_prompt=True); full = apply_chat_template(prompt +
  reply). The template decides BOS and the end-of-turn tokens; no extra EOS.
- raw rows: prompt = tok(prompt); full = tok(prompt + reply + EOS), with the tokenizer's special tokens (its BOS).
- The completion starts where the prompt and both full sequences stop agreeing, so the prompt tokens are the same in
  chosen and rejected even when BPE merges across the boundary.
Then truncation: the prompt is cut from the left to `max_prompt_length`, each completion from the right so that
prompt + completion <= `max_length` (TRL's keep_start). A pair whose prompt leaves no room is dropped and counted.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TokenizedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    truncated: bool


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _ids(encoded) -> list[int]:
    ids = encoded["input_ids"] if not isinstance(encoded, list) else encoded
    return list(ids)


def tokenize_pair(tok, prompt: list[dict], chosen: str, rejected: str, template: str) -> tuple[list, list, list]:
    """(prompt_ids, chosen_ids, rejected_ids) before truncation."""
    if template == "chat":
        prompt_ids = _ids(tok.apply_chat_template(prompt, tokenize=True, return_dict=True, add_generation_prompt=True))
        full_c = _ids(tok.apply_chat_template(prompt + [{"role": "assistant", "content": chosen}],
                                              tokenize=True, return_dict=True))
        full_r = _ids(tok.apply_chat_template(prompt + [{"role": "assistant", "content": rejected}],
                                              tokenize=True, return_dict=True))
    else:
        text = prompt[0]["content"]
        eos = tok.eos_token
        chosen = chosen if chosen.endswith(eos) else chosen + eos
        rejected = rejected if rejected.endswith(eos) else rejected + eos
        prompt_ids = _ids(tok(text))
        full_c, full_r = _ids(tok(text + chosen)), _ids(tok(text + rejected))
    n = min(common_prefix_length(prompt_ids, full_c), common_prefix_length(prompt_ids, full_r))
    return prompt_ids[:n], full_c[n:], full_r[n:]


def truncate(prompt_ids: list, chosen_ids: list, rejected_ids: list, max_length: int,
             max_prompt_length: int | None) -> TokenizedPair | None:
    """Apply the length limits; None when the pair has to be dropped (no room left for a completion)."""
    truncated = False
    if max_prompt_length is not None and len(prompt_ids) > max_prompt_length:
        prompt_ids = prompt_ids[-max_prompt_length:]  # keep the end: the question sits next to the reply
        truncated = True
    room = max_length - len(prompt_ids)
    if room < 1 or not chosen_ids or not rejected_ids:
        return None
    if len(chosen_ids) > room or len(rejected_ids) > room:
        chosen_ids, rejected_ids = chosen_ids[:room], rejected_ids[:room]
        truncated = True
    return TokenizedPair(prompt_ids, chosen_ids, rejected_ids, truncated)


def tokenize_pairs(tok, pairs: list[dict], max_length: int, max_prompt_length: int | None, progress=None):
    """Tokenise and truncate canonical pairs. Returns (kept pairs with id columns added, dropped count)."""
    kept, dropped = [], 0
    task = progress.add_task("tokenize", total=len(pairs), status="") if progress is not None else None
    for pair in pairs:
        p, c, r = tokenize_pair(tok, pair["prompt"], pair["chosen"], pair["rejected"], pair["template"])
        result = truncate(p, c, r, max_length, max_prompt_length)
        if task is not None:
            progress.advance(task)
        if result is None:
            dropped += 1
            continue
        kept.append({**pair, "prompt_ids": result.prompt_ids, "chosen_ids": result.chosen_ids,
                     "rejected_ids": result.rejected_ids, "truncated": result.truncated})
    return kept, dropped
