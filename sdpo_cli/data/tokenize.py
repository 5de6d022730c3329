"""Canonical pairs -> token ids, exactly as TRL 1.16's DPOTrainer tokenises them (research/trl-dpo.md §1c).

- chat rows: prompt = apply_chat_template(prompt, add_generation_prompt=True); full = apply_chat_template(prompt +
  reply). The template decides BOS and the end-of-turn tokens; no extra EOS.
- raw rows: prompt = tok(prompt); full = tok(prompt + reply + EOS), with the tokenizer's special tokens (its BOS).
- The completion starts where the prompt and both full sequences stop agreeing, so the prompt tokens are the same in
  chosen and rejected even when BPE merges across the boundary. A prompt that is not a token prefix of prompt + reply
  loses its diverging end to the completion, as in TRL; it is counted (`prompt_not_prefix`) and `split` warns.
Then truncation:
- `max_prompt_length` (ours; TRL 1.16's DPOConfig has no prompt cap): a longer prompt keeps its framing (BOS, the
  template's headers and the assistant header at its end) and loses text from the left of its *content*: the
  messages' texts, taken in order as one stream, are cut by whole tokens from the start, and the prompt is rendered
  again from the cut texts (prompt and both full sequences alike, so the prefix rule above still holds). A message
  whose text is cut away entirely stays, empty, so the template's turn structure does not change. A prompt that does
  not fit even with its whole content cut away is dropped.
- each completion is cut from the right so that prompt + completion <= `max_length` (TRL's keep_start). A pair
  whose prompt leaves no room is dropped and counted.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TokenizedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    truncated: bool


@dataclass
class EncodedPair:
    """One pair before the completions are cut: the ids, and what happened on the way."""
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    prompt_cut: bool = False  # the prompt's content was cut to max_prompt_length
    lost: list[int] | None = None  # prompt tokens that were not a prefix of prompt + reply (left out of the prompt)
    fits: bool = True  # False: the prompt's framing alone exceeds max_prompt_length


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


def _render_prompt(tok, prompt: list[dict], template: str) -> list[int]:
    if template == "chat":
        return _ids(tok.apply_chat_template(prompt, tokenize=True, return_dict=True, add_generation_prompt=True))
    return _ids(tok(prompt[0]["content"]))


def _encode(tok, prompt: list[dict], chosen: str, rejected: str, template: str,
            prompt_ids: list[int] | None = None) -> EncodedPair:
    if prompt_ids is None:
        prompt_ids = _render_prompt(tok, prompt, template)
    if template == "chat":
        full_c = _ids(tok.apply_chat_template(prompt + [{"role": "assistant", "content": chosen}],
                                              tokenize=True, return_dict=True))
        full_r = _ids(tok.apply_chat_template(prompt + [{"role": "assistant", "content": rejected}],
                                              tokenize=True, return_dict=True))
    else:
        text = prompt[0]["content"]
        eos = tok.eos_token
        chosen = chosen if chosen.endswith(eos) else chosen + eos
        rejected = rejected if rejected.endswith(eos) else rejected + eos
        full_c, full_r = _ids(tok(text + chosen)), _ids(tok(text + rejected))
    n = min(common_prefix_length(prompt_ids, full_c), common_prefix_length(prompt_ids, full_r))
    return EncodedPair(prompt_ids[:n], full_c[n:], full_r[n:], lost=prompt_ids[n:] or None)


def tokenize_pair(tok, prompt: list[dict], chosen: str, rejected: str, template: str) -> tuple[list, list, list]:
    """(prompt_ids, chosen_ids, rejected_ids) before truncation."""
    e = _encode(tok, prompt, chosen, rejected, template)
    return e.prompt_ids, e.chosen_ids, e.rejected_ids


def _content_ids(tok, text: str) -> list[int]:
    return _ids(tok(text, add_special_tokens=False)) if text else []


def _decode(tok, ids: list[int]) -> str:
    # A cut can split a multi-byte character of a byte-fallback tokenizer: drop the replacement characters it leaves.
    return tok.decode(ids, clean_up_tokenization_spaces=False).lstrip("\ufffd")


def cut_prompt(tok, prompt: list[dict], template: str, max_prompt_length: int
               ) -> tuple[list[dict], list[int]] | None:
    """The prompt with text cut from the left of its content until it renders to at most `max_prompt_length` tokens,
    and its ids; None when even the framing alone is longer. An uncut prompt comes back as it is."""
    ids = _render_prompt(tok, prompt, template)
    if len(ids) <= max_prompt_length:
        return prompt, ids
    contents = [_content_ids(tok, m["content"]) for m in prompt]
    total = sum(len(c) for c in contents)
    k = len(ids) - max_prompt_length  # tokens to cut; the framing is constant, so usually right at once
    while k < total:
        cut, left = [], k
        for message, content in zip(prompt, contents):
            drop = min(left, len(content))
            left -= drop
            text = message["content"] if drop == 0 else _decode(tok, content[drop:])
            cut.append({**message, "content": text})
        ids = _render_prompt(tok, cut, template)
        if len(ids) <= max_prompt_length:
            return cut, ids
        k += len(ids) - max_prompt_length
    return None


def encode_pair(tok, prompt: list[dict], chosen: str, rejected: str, template: str,
                max_prompt_length: int | None = None) -> EncodedPair:
    """tokenize_pair with the prompt cap applied to the prompt's content (see the module's docstring)."""
    if max_prompt_length is None:
        return _encode(tok, prompt, chosen, rejected, template)
    out = cut_prompt(tok, prompt, template, max_prompt_length)
    if out is None:
        return EncodedPair([], [], [], prompt_cut=True, fits=False)
    cut, ids = out
    encoded = _encode(tok, cut, chosen, rejected, template, prompt_ids=ids)
    encoded.prompt_cut = cut is not prompt
    return encoded


def truncate(prompt_ids: list, chosen_ids: list, rejected_ids: list, max_length: int,
             max_prompt_length: int | None = None) -> TokenizedPair | None:
    """Apply the length limits to ids; None when the pair has to be dropped: no room left for a completion, or a
    prompt longer than `max_prompt_length` (ids are never cut from the left here: encode_pair cuts the prompt's
    content and keeps its special tokens and framing)."""
    if max_prompt_length is not None and len(prompt_ids) > max_prompt_length:
        return None
    truncated = False
    room = max_length - len(prompt_ids)
    if room < 1 or not chosen_ids or not rejected_ids:
        return None
    if len(chosen_ids) > room or len(rejected_ids) > room:
        chosen_ids, rejected_ids = chosen_ids[:room], rejected_ids[:room]
        truncated = True
    return TokenizedPair(prompt_ids, chosen_ids, rejected_ids, truncated)


@dataclass
class TokenizeStats:
    """What tokenize_pairs saw besides dropping: for the split report."""
    prompt_cut: int = 0  # kept pairs whose prompt content was cut to data.max_prompt_length
    prompt_not_prefix: int = 0  # pairs whose tokenised prompt is not a prefix of the tokenised prompt + reply
    example: tuple[str, str] | None = None  # the first such pair: (id, the prompt text left out of its prompt)


def tokenize_pairs(tok, pairs: list[dict], max_length: int, max_prompt_length: int | None, progress=None,
                   stats: TokenizeStats | None = None):
    """Tokenise and truncate canonical pairs. Returns (kept pairs with id columns added, dropped count); `stats`, if
    given, is filled in."""
    kept, dropped = [], 0
    stats = TokenizeStats() if stats is None else stats
    task = progress.add_task("tokenize", total=len(pairs), status="") if progress is not None else None
    for pair in pairs:
        e = encode_pair(tok, pair["prompt"], pair["chosen"], pair["rejected"], pair["template"], max_prompt_length)
        result = truncate(e.prompt_ids, e.chosen_ids, e.rejected_ids, max_length) if e.fits else None
        if task is not None:
            progress.advance(task)
        if e.lost:
            stats.prompt_not_prefix += 1
            if stats.example is None:
                stats.example = (pair["id"], tok.decode(e.lost))
        if result is None:
            dropped += 1
            continue
        stats.prompt_cut += int(e.prompt_cut)
        kept.append({**pair, "prompt_ids": result.prompt_ids, "chosen_ids": result.chosen_ids,
                     "rejected_ids": result.rejected_ids, "truncated": result.truncated or e.prompt_cut})
    return kept, dropped
