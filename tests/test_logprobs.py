"""The shared log-prob function: equal to a plain full-logits log_softmax/gather, invariant to padding and batch
composition, with the same gradients, on the tiny test model and on the real pretrained stories260K."""

import random

import pytest
import torch

from sdpo_cli import logprobs
from sdpo_cli.collate import collate_pairs
from sdpo_cli.logprobs import completion_logps
from sdpo_cli.scoring import score_pairs


def random_pairs(vocab: int, n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)

    def ids(lo, hi):
        return [rng.randrange(4, vocab) for _ in range(rng.randint(lo, hi))]

    return [{"prompt_ids": [1] + ids(2, 12), "chosen_ids": ids(1, 15), "rejected_ids": ids(1, 15)} for _ in range(n)]


def plain_logps(model, pair: dict) -> tuple[float, float]:
    """Reference implementation: one unpadded row, full logits, log_softmax, gather, sum over the completion."""
    out = []
    for key in ("chosen_ids", "rejected_ids"):
        ids = torch.tensor([pair["prompt_ids"] + pair[key]])
        logits = model(input_ids=ids, use_cache=False).logits[0].float()
        logp = torch.log_softmax(logits[:-1], dim=-1).gather(-1, ids[0, 1:, None]).squeeze(-1)
        out.append(logp[len(pair["prompt_ids"]) - 1:].sum().item())
    return out[0], out[1]


def load(path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    model.eval()
    return model


@pytest.fixture(scope="module", params=["tiny", "stories260K"])
def model(request, tiny_model_dir):
    if request.param == "tiny":
        return load(tiny_model_dir)
    return load(request.getfixturevalue("stories_dir"))


def test_equals_plain_full_logits(model):
    pairs = random_pairs(model.config.vocab_size, 6)
    with torch.no_grad():
        chosen, rejected = completion_logps(model, collate_pairs(pairs, pad_id=0))
    for i, pair in enumerate(pairs):
        c, r = plain_logps(model, pair)
        assert chosen[i].item() == pytest.approx(c, abs=1e-5, rel=1e-6)
        assert rejected[i].item() == pytest.approx(r, abs=1e-5, rel=1e-6)


def test_invariant_to_padding_and_batch_size(model):
    pairs = random_pairs(model.config.vocab_size, 8, seed=1)
    with torch.no_grad():
        alone = [completion_logps(model, collate_pairs([p], pad_id=0)) for p in pairs]
        together = completion_logps(model, collate_pairs(pairs, pad_id=0))
        other_pad = completion_logps(model, collate_pairs(pairs, pad_id=3))
        by_score = score_pairs(model, pairs, pad_id=0, batch_size=3, device="cpu")
    for i in range(len(pairs)):
        for j in range(2):
            # 1e-5 absolute, or fp32's relative precision on sums of a few hundred nats
            assert together[j][i].item() == pytest.approx(alone[i][j].item(), abs=1e-5, rel=1e-6)
            assert other_pad[j][i].item() == pytest.approx(together[j][i].item(), abs=1e-5, rel=1e-6)
            assert by_score[j][i] == pytest.approx(together[j][i].item(), abs=1e-5, rel=1e-6)


def test_model_gradients_match_full_logits(tiny_model_dir):
    model = load(tiny_model_dir)
    pairs = random_pairs(model.config.vocab_size, 3, seed=2)
    chosen, rejected = completion_logps(model, collate_pairs(pairs, pad_id=0))
    (chosen - rejected).sum().backward()
    ours = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    total = 0
    for pair in pairs:
        for key, sign in (("chosen_ids", 1), ("rejected_ids", -1)):
            ids = torch.tensor([pair["prompt_ids"] + pair[key]])
            logp = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[0, :-1].float(), -1)
            total = total + sign * logp.gather(-1, ids[0, 1:, None])[len(pair["prompt_ids"]) - 1:].sum()
    total.backward()
    for a, p in zip(ours, model.parameters()):
        assert torch.allclose(a, p.grad, atol=1e-5)


def test_exotic_head_fallback_gives_same_numbers(tiny_model_dir, monkeypatch):
    model = load(tiny_model_dir)
    batch = collate_pairs(random_pairs(model.config.vocab_size, 4, seed=3), pad_id=0)
    with torch.no_grad():
        lean = completion_logps(model, batch)
        monkeypatch.setattr(logprobs, "_plain_head", lambda m: None)
        full = completion_logps(model, batch)
    assert torch.allclose(lean[0], full[0], atol=1e-5) and torch.allclose(lean[1], full[1], atol=1e-5)


def test_collate_scores_exactly_the_completion_tokens():
    pairs = [{"prompt_ids": [1, 5, 6], "chosen_ids": [7, 8], "rejected_ids": [9]},
             {"prompt_ids": [1, 5], "chosen_ids": [10, 11, 12], "rejected_ids": [13, 14]}]
    b = collate_pairs(pairs, pad_id=0)
    assert b.input_ids.tolist() == [[1, 5, 6, 7, 8], [1, 5, 10, 11, 12], [1, 5, 6, 9, 0], [1, 5, 13, 14, 0]]
    assert b.attention_mask.tolist() == [[1] * 5, [1] * 5, [1, 1, 1, 1, 0], [1, 1, 1, 1, 0]]
    # token at position i is scored from position i-1: row 0 scores positions 2,3 -> targets 7,8
    assert b.score_index.tolist() == [2, 3, 6, 7, 8, 12, 16, 17]
    assert b.targets.tolist() == [7, 8, 10, 11, 12, 9, 13, 14]
    assert b.segment.tolist() == [0, 0, 2, 2, 2, 1, 3, 3]
    assert b.chosen_tokens.tolist() == [2, 3] and b.rejected_tokens.tolist() == [1, 2]


def plain_shared_logps(model, pair: dict) -> tuple[float, float]:
    """LD-DPO's split by hand: the sums over the first min(C, R) completion tokens, from one unpadded row each."""
    shared = min(len(pair["chosen_ids"]), len(pair["rejected_ids"]))
    out = []
    for key in ("chosen_ids", "rejected_ids"):
        ids = torch.tensor([pair["prompt_ids"] + pair[key]])
        logits = model(input_ids=ids, use_cache=False).logits[0].float()
        logp = torch.log_softmax(logits[:-1], dim=-1).gather(-1, ids[0, 1:, None]).squeeze(-1)
        out.append(logp[len(pair["prompt_ids"]) - 1:][:shared].sum().item())
    return out[0], out[1]


@pytest.mark.parametrize("layout", ["padded", "prefix", "packed"])
def test_shared_sums_cover_the_first_min_length_tokens_in_every_layout(model, layout):
    """completion_logps_shared: the full sums as completion_logps, and the sums over the length both replies share
    (LD-DPO's split, TRL 1.16 `_compute_loss` shared_mask) equal to a by-hand cut of an unpadded row's log-probs."""
    pairs = random_pairs(model.config.vocab_size, 6, seed=3)
    assert len({(len(p["chosen_ids"]) < len(p["rejected_ids"])) for p in pairs}) == 2  # both sides are the shorter
    with torch.no_grad():
        batch = collate_pairs(pairs, pad_id=0, layout=layout)
        chosen, rejected, chosen_shared, rejected_shared = logprobs.completion_logps_shared(model, batch)
        full = completion_logps(model, batch)
    assert torch.equal(chosen, full[0]) and torch.equal(rejected, full[1])
    for i, pair in enumerate(pairs):
        c, r = plain_shared_logps(model, pair)
        assert chosen_shared[i].item() == pytest.approx(c, abs=1e-5, rel=1e-6)
        assert rejected_shared[i].item() == pytest.approx(r, abs=1e-5, rel=1e-6)
