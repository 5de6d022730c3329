"""Batch layouts of the shared log-prob path: the prefix-shared layout (one row per pair, prompt + chosen + rejected;
its attention as two mask-free causal pieces per row under sdpa, `prefix-pieces`, or under an explicit 4D mask,
`prefix-mask`) and the packed layout (one padding-free row, position ids restarting per sequence) give the padded
layout's per-pair log-probs and gradients, on the tiny test model and on the real pretrained stories260K, with sdpa
and eager attention; so do the engine wrapper PairLogps and regional torch.compile; and the length-grouped training
order is deterministic and covers every pair exactly once."""

from __future__ import annotations

import random

import pytest
import torch

from sdpo_cli.batching import LengthGroupedBatchSampler, length_grouped_batches
from sdpo_cli.collate import collate_pairs, layout_unsupported, pair_lengths, prefix_mask, resolve_layout
from sdpo_cli.logprobs import completion_logps
from sdpo_cli.scoring import score_pairs


def random_pairs(vocab: int, n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)

    def ids(lo, hi):
        return [rng.randrange(4, vocab) for _ in range(rng.randint(lo, hi))]

    pairs = [{"prompt_ids": [1] + ids(0, 14), "chosen_ids": ids(1, 16), "rejected_ids": ids(1, 16)} for _ in range(n)]
    pairs[0]["rejected_ids"] = pairs[0]["rejected_ids"][:1]  # one-token completions: scored from the prompt only
    pairs[-1]["chosen_ids"] = pairs[-1]["chosen_ids"][:1]
    pairs[1]["prompt_ids"] = [1]  # a BOS-only prompt
    return pairs


def load(path, attn="sdpa"):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation=attn)
    model.eval()
    return model


@pytest.fixture(scope="module", params=["tiny-sdpa", "tiny-eager", "stories260K-sdpa", "stories260K-eager"])
def model(request, tiny_model_dir):
    name, attn = request.param.rsplit("-", 1)
    path = tiny_model_dir if name == "tiny" else request.getfixturevalue("stories_dir")
    return load(path, attn)


LAYOUTS = ["prefix-pieces", "prefix-mask", "packed"]  # each compared with the padded layout


def use(model, layout: str) -> str:
    """The collate layout for a LAYOUTS entry, with the model's prefix attention set as `sdpo` sets it
    (runtime.prefix_attention; eager models always take the mask)."""
    if layout == "padded":
        return layout
    layout, _, attention = layout.partition("-")
    assert resolve_layout(layout, model, prefix_attention=attention or "pieces") == layout
    return layout


def test_prefix_collate_layout():
    pairs = [{"prompt_ids": [1, 5, 6], "chosen_ids": [7, 8], "rejected_ids": [9]},
             {"prompt_ids": [1, 5], "chosen_ids": [10, 11, 12], "rejected_ids": [13, 14]}]
    b = collate_pairs(pairs, pad_id=0, layout="prefix")
    assert b.layout == "prefix"
    assert b.input_ids.tolist() == [[1, 5, 6, 7, 8, 9, 0], [1, 5, 10, 11, 12, 13, 14]]
    # the rejected segment continues the prompt's positions; padding sits at position 0
    assert b.position_ids.tolist() == [[0, 1, 2, 3, 4, 3, 0], [0, 1, 2, 3, 4, 2, 3]]
    # chosen scored from P-1.., the first rejected token from the last prompt position (P-1), the rest from P+C+j-1
    assert b.score_index.tolist() == [2, 3, 2, 7 + 1, 7 + 2, 7 + 3, 7 + 1, 7 + 5]
    assert b.targets.tolist() == [7, 8, 9, 10, 11, 12, 13, 14]
    assert b.segment.tolist() == [0, 0, 1, 2, 2, 2, 3, 3]
    assert b.chosen_tokens.tolist() == [2, 3] and b.rejected_tokens.tolist() == [1, 2]
    assert b.attention_mask is None  # built from the lengths only where the attention needs one
    mask = prefix_mask(b)
    assert mask.shape == (2, 1, 7, 7) and mask.dtype == torch.bool
    m = mask[1, 0].int().tolist()
    assert m[1] == [1, 1, 0, 0, 0, 0, 0]  # prompt: causal
    assert m[4] == [1, 1, 1, 1, 1, 0, 0]  # last chosen token: prompt + chosen
    assert m[5] == [1, 1, 0, 0, 0, 1, 0]  # first rejected token: prompt + itself, never the chosen reply
    assert m[6] == [1, 1, 0, 0, 0, 1, 1]
    m = mask[0, 0].int().tolist()
    assert m[6] == [0, 0, 0, 0, 0, 0, 1]  # padding attends to itself only (no fully masked softmax row)
    assert all(m[q][6] == 0 for q in range(6))  # and nobody attends to padding
    moved = b.to("cpu")
    assert torch.equal(moved.position_ids, b.position_ids)
    assert collate_pairs(pairs, pad_id=0).to("cpu").position_ids is None


def test_unknown_layout_is_an_error():
    with pytest.raises(ValueError, match="unknown layout"):
        collate_pairs([{"prompt_ids": [1], "chosen_ids": [2], "rejected_ids": [3]}], pad_id=0, layout="ragged")


def test_packed_collate_layout():
    pairs = [{"prompt_ids": [1, 5, 6], "chosen_ids": [7, 8], "rejected_ids": [9]},
             {"prompt_ids": [1, 5], "chosen_ids": [10, 11, 12], "rejected_ids": [13, 14]}]
    b = collate_pairs(pairs, pad_id=0, layout="packed")
    assert b.layout == "packed" and b.attention_mask is None
    # chosen_1, chosen_2, rejected_1, rejected_2 back to back, no padding, positions restarting at 0
    assert b.input_ids.tolist() == [[1, 5, 6, 7, 8, 1, 5, 10, 11, 12, 1, 5, 6, 9, 1, 5, 13, 14]]
    assert b.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2, 3]]
    assert b.cu_seqlens.tolist() == [0, 5, 10, 14, 18] and b.cu_seqlens.dtype == torch.int32 and b.max_seqlen == 5
    assert b.score_index.tolist() == [2, 3, 6, 7, 8, 12, 15, 16]
    assert b.targets.tolist() == [7, 8, 10, 11, 12, 9, 13, 14]
    assert b.segment.tolist() == [0, 0, 2, 2, 2, 1, 3, 3]
    assert pair_lengths(pairs, "packed") == [9, 9] and b.input_ids.shape[1] == sum(pair_lengths(pairs, "packed"))
    moved = b.to("cpu")
    assert moved.layout == "packed" and moved.max_seqlen == 5 and torch.equal(moved.cu_seqlens, b.cu_seqlens)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_equals_padded_forward(model, layout):
    layout = use(model, layout)
    pairs = random_pairs(model.config.vocab_size, 7, seed=1)
    with torch.no_grad():
        padded = completion_logps(model, collate_pairs(pairs, pad_id=0))
        prefix = completion_logps(model, collate_pairs(pairs, pad_id=0, layout=layout))
        other_pad = completion_logps(model, collate_pairs(pairs, pad_id=3, layout=layout))
    for j in range(2):
        for i in range(len(pairs)):
            assert prefix[j][i].item() == pytest.approx(padded[j][i].item(), abs=1e-5, rel=1e-6)
            assert other_pad[j][i].item() == pytest.approx(prefix[j][i].item(), abs=1e-5, rel=1e-6)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_invariant_to_batch_composition(model, layout):
    layout = use(model, layout)
    pairs = random_pairs(model.config.vocab_size, 5, seed=4)
    with torch.no_grad():
        together = completion_logps(model, collate_pairs(pairs, pad_id=0, layout=layout))
        for i, pair in enumerate(pairs):
            alone = completion_logps(model, collate_pairs([pair], pad_id=0, layout=layout))
            for j in range(2):
                assert alone[j][0].item() == pytest.approx(together[j][i].item(), abs=1e-5, rel=1e-6)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_equals_padded_gradients(model, layout):
    layout = use(model, layout)
    pairs = random_pairs(model.config.vocab_size, 4, seed=2)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = []
    for each in ("padded", layout):
        chosen, rejected = completion_logps(model, collate_pairs(pairs, pad_id=0, layout=each))
        # a DPO-like objective: chosen and rejected weighted differently, so a mixed-up segment would show
        loss = -torch.nn.functional.logsigmoid(0.1 * (1.3 * chosen - rejected)).sum()
        grads.append(torch.autograd.grad(loss, params))
    for a, b in zip(*grads):
        # 1e-5 absolute, or fp32 rounding relative to the tensor's scale (sums of a few hundred nats)
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5 * max(1.0, a.abs().max().item()))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_score_pairs_same_numbers_in_every_layout(model, layout):
    layout = use(model, layout)
    pairs = random_pairs(model.config.vocab_size, 9, seed=3)
    padded = score_pairs(model, pairs, pad_id=0, batch_size=4, device="cpu")
    prefix = score_pairs(model, pairs, pad_id=0, batch_size=4, device="cpu", layout=layout)
    for j in range(2):
        for a, b in zip(padded[j], prefix[j]):
            assert b == pytest.approx(a, abs=1e-5, rel=1e-6)


def test_score_pairs_reads_a_dataset_in_prefix_layout(tiny_model_dir):
    import datasets

    model = load(tiny_model_dir)
    pairs = random_pairs(model.config.vocab_size, 6, seed=5)
    table = datasets.Dataset.from_list(pairs)
    assert pair_lengths(table, "prefix") == pair_lengths(pairs, "prefix")
    assert pair_lengths(pairs, "prefix") == [len(p["prompt_ids"]) + len(p["chosen_ids"]) + len(p["rejected_ids"])
                                             for p in pairs]
    assert score_pairs(model, table, pad_id=0, batch_size=4, device="cpu", layout="prefix") == score_pairs(
        model, pairs, pad_id=0, batch_size=4, device="cpu", layout="prefix")


def test_unsupported_attention_is_refused(tiny_model_dir):
    model = load(tiny_model_dir)
    assert layout_unsupported(model, "prefix") is None
    assert layout_unsupported(model.config, "prefix") is None
    model.config._attn_implementation = "flash_attention_2"
    assert "flash_attention_2" in layout_unsupported(model, "prefix")
    assert "flash_attention_2" in layout_unsupported(model.config, "prefix")
    batch = collate_pairs(random_pairs(model.config.vocab_size, 2), pad_id=0, layout="prefix")
    with pytest.raises(ValueError, match="use layout 'packed' or 'padded'"):
        completion_logps(model, batch)
    model.config._attn_implementation = "sdpa"
    model.config.sliding_window = 64
    assert "sliding" in layout_unsupported(model, "prefix", max_length=128)
    assert layout_unsupported(model, "prefix", max_length=64) is None


def _grouped_check(lengths, batch_size, seed, mega=None):
    batches = length_grouped_batches(lengths, batch_size, seed, mega=mega)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))  # every index exactly once
    assert all(len(b) == batch_size for b in batches[:-1]) and 1 <= len(batches[-1]) <= batch_size
    assert max(lengths[i] for i in batches[0]) == max(lengths)  # the longest batch first
    return batches


@pytest.mark.parametrize("n,batch_size", [(1, 4), (7, 4), (8, 4), (100, 8), (1003, 16)])
def test_length_grouped_batches_cover_and_are_deterministic(n, batch_size):
    rng = random.Random(n)
    lengths = [rng.randint(5, 500) for _ in range(n)]
    a = _grouped_check(lengths, batch_size, seed=11)
    assert a == _grouped_check(lengths, batch_size, seed=11)
    if n >= 100:
        assert a != _grouped_check(lengths, batch_size, seed=12)
        _grouped_check(lengths, batch_size, seed=11, mega=1)
        _grouped_check(lengths, batch_size, seed=11, mega=10_000)


def test_length_grouping_reduces_padding():
    rng = random.Random(0)
    lengths = [rng.randint(5, 500) for _ in range(512)]
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(lengths), generator=g).tolist()
    random_batches = [perm[s:s + 8] for s in range(0, len(perm), 8)]

    def padded_tokens(batches):
        return sum(len(b) * max(lengths[i] for i in b) for b in batches)

    grouped = length_grouped_batches(lengths, 8, generator_seed=0)
    assert padded_tokens(grouped) < 0.75 * padded_tokens(random_batches)
    # with one mega-batch holding everything, batches are sorted runs: consecutive lengths within a batch
    full = length_grouped_batches(lengths, 8, generator_seed=0, mega=10_000)
    assert padded_tokens(full) < 1.05 * sum(lengths)
    # batches come in random order, not longest to shortest
    firsts = [max(lengths[i] for i in b) for b in grouped[1:]]
    assert firsts != sorted(firsts, reverse=True)


def test_length_grouped_sampler_epochs():
    rng = random.Random(1)
    lengths = [rng.randint(1, 100) for _ in range(50)]
    sampler = LengthGroupedBatchSampler(lengths, 4, seed=3)
    assert len(sampler) == 13
    first = list(sampler)
    assert first == list(sampler) == length_grouped_batches(lengths, 4, 3000)  # a pure function of (seed, epoch)
    sampler.set_epoch(1)
    second = list(sampler)
    assert second == sampler.batches(1) == length_grouped_batches(lengths, 4, 3001) and second != first
    sampler.set_epoch(0)
    loader = torch.utils.data.DataLoader(list(range(50)), batch_sampler=sampler)
    assert [b.tolist() for b in loader] == first


def _full_head(hidden, weight, targets):
    return torch.log_softmax((hidden @ weight.t()).float(), -1).gather(-1, targets[:, None]).squeeze(-1)


@pytest.mark.parametrize("chunk", [5, 8, 64])
def test_fused_head_matches_autograd(chunk):
    from sdpo_cli.logprobs import chunked_token_logps

    torch.manual_seed(0)
    hidden = torch.randn(37, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    upstream = torch.randn(37)  # per-token weights, as a DPO loss gives per segment
    ours = chunked_token_logps(hidden, weight, targets, chunk=chunk)
    full = _full_head(hidden, weight, targets)
    assert torch.allclose(ours, full, atol=1e-5)
    g_ours = torch.autograd.grad((ours * upstream).sum(), (hidden, weight))
    g_full = torch.autograd.grad((full * upstream).sum(), (hidden, weight))
    for a, b in zip(g_ours, g_full):
        assert torch.allclose(a, b, atol=1e-5)
    # a frozen head (LoRA-style): only the hidden states get a gradient
    frozen = weight.detach()
    (g_h,) = torch.autograd.grad(chunked_token_logps(hidden, frozen, targets, chunk=chunk).sum(), (hidden,))
    assert torch.allclose(g_h, torch.autograd.grad(_full_head(hidden, frozen, targets).sum(), (hidden,))[0],
                          atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(chunked_token_logps(hidden, weight, targets, chunk=chunk), full, atol=1e-5)


def test_fused_head_under_bf16_autocast():
    from sdpo_cli.logprobs import chunked_token_logps

    torch.manual_seed(1)
    hidden = torch.randn(40, 32, requires_grad=True)
    weight = (0.2 * torch.randn(300, 32)).requires_grad_()
    targets = torch.randint(0, 300, (40,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = chunked_token_logps(hidden, weight, targets, chunk=16)
        full = _full_head(hidden, weight, targets)  # autocast runs the matmul in bf16, softmax in fp32
    assert ours.dtype == torch.float32
    assert torch.allclose(ours, full, atol=1e-4)
    g_ours = torch.autograd.grad(ours.sum(), (hidden, weight))
    g_full = torch.autograd.grad(full.sum(), (hidden, weight))
    for a, b in zip(g_ours, g_full):
        assert a.dtype == torch.float32
        assert torch.allclose(a, b, atol=2e-2 * b.abs().max().item())  # bf16 matmuls on both sides


@pytest.mark.parametrize("layout", ["padded", "prefix"])
def test_empty_prompt_is_refused(layout):
    with pytest.raises(ValueError, match="empty prompt"):
        collate_pairs([{"prompt_ids": [], "chosen_ids": [2], "rejected_ids": [3]}], pad_id=0, layout=layout)


def test_resolve_layout_falls_back_by_attention(tiny_model_dir):
    from sdpo_cli.collate import resolve_layout
    from sdpo_cli.logprobs import _attention_inputs

    model = load(tiny_model_dir)
    assert resolve_layout("prefix", model) == "prefix"
    assert resolve_layout("packed", model) == "packed"
    model.config._attn_implementation = "flash_attention_2"
    assert resolve_layout("prefix", model) == "packed"  # flash: its varlen kernel, no padding
    assert resolve_layout("padded", model) == "padded"
    # the varlen kernel gets the sequence boundaries from us instead of inferring them from position ids
    batch = collate_pairs(random_pairs(model.config.vocab_size, 3), pad_id=0, layout="packed")
    inputs = _attention_inputs(model, batch)
    assert "attention_mask" not in inputs and inputs["position_ids"] is batch.position_ids
    assert inputs["cu_seq_lens_q"] is batch.cu_seqlens and inputs["max_length_k"] == batch.max_seqlen
    model.config._attn_implementation = "sdpa"
    assert set(_attention_inputs(model, batch)) == {"position_ids"}  # sdpa: transformers builds the block mask
    model.config.sliding_window = 8
    assert resolve_layout("prefix", model, max_length=128) == "padded"  # a dense packed row would cost more


def _head_calls(model) -> list:
    calls = []
    model.get_output_embeddings().register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_pair_logps_under_ddp_keeps_the_lean_path(tiny_model_dir, tmp_path):
    """DDP wraps PairLogps, not the model: same log-probs and gradients as the plain call, and the LM head module is
    never called (the completion-only chunked head ran instead of full logits)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from sdpo_cli.logprobs import PairLogps

    model = load(tiny_model_dir)
    pairs = random_pairs(model.config.vocab_size, 4, seed=6)
    batch = collate_pairs(pairs, pad_id=0, layout="prefix")
    chosen, rejected = completion_logps(model, batch)
    (chosen.sum() - 2 * rejected.sum()).backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        calls = _head_calls(model)
        wrapped = DistributedDataParallel(PairLogps(model))
        c, r = wrapped(batch)
        (c.sum() - 2 * r.sum()).backward()
        assert calls == []
        assert torch.allclose(c, chosen) and torch.allclose(r, rejected)
        for n, p in model.named_parameters():
            assert torch.allclose(p.grad, expected[n], rtol=1e-5, atol=1e-6), n
        # wrapping the model itself would force its own forward (full logits): the fallback still gives the numbers
        direct = DistributedDataParallel(model)
        c2, _ = completion_logps(direct, batch)
        assert calls and torch.allclose(c2, chosen, atol=1e-5)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_compiled_blocks_give_the_same_log_probs_and_gradients(tiny_model_dir):
    from torch._dynamo.utils import counters

    from sdpo_cli.models import compile_blocks

    graphs_before = counters["stats"]["unique_graphs"]
    eager, compiled = load(tiny_model_dir), load(tiny_model_dir)
    assert compile_blocks(compiled) == compiled.config.num_hidden_layers
    assert list(compiled.state_dict()) == list(eager.state_dict())  # in place: checkpoints keep their names
    for seed, layout in ((7, "prefix"), (8, "prefix"), (9, "packed")):  # new lengths: dynamic shapes, no crash
        batch = collate_pairs(random_pairs(eager.config.vocab_size, 3 + seed % 2, seed=seed), pad_id=0, layout=layout)
        out = []
        for model in (eager, compiled):
            model.zero_grad(set_to_none=True)
            c, r = completion_logps(model, batch)
            (c.sum() - 2 * r.sum()).backward()
            out.append((c.detach(), r.detach(), [p.grad for p in model.parameters()]))
        (c1, r1, g1), (c2, r2, g2) = out
        assert counters["stats"]["unique_graphs"] > graphs_before  # dynamo really compiled the blocks
        assert torch.allclose(c1, c2, atol=1e-4) and torch.allclose(r1, r2, atol=1e-4)
        for a, b in zip(g1, g2):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * max(1.0, a.abs().max().item()))


def test_prepared_pair_logps_runs_under_accelerate_autocast(tiny_model_dir):
    """train.mixed_precision reaches the lean path: accelerate's autocast wraps PairLogps.forward, so training
    computes what reflogp computes under accelerator.autocast (the model's own forward is never called there)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from sdpo_cli.logprobs import PairLogps

    model = load(tiny_model_dir)
    batch = collate_pairs(random_pairs(model.config.vocab_size, 3, seed=10), pad_id=0, layout="prefix")
    AcceleratorState._reset_state(reset_partial_state=True)  # a process-wide singleton: earlier tests made one
    try:
        accelerator = Accelerator(cpu=True, mixed_precision="bf16")
        policy = accelerator.prepare(PairLogps(model))
        with torch.no_grad():
            trained = policy(batch)
            with accelerator.autocast():
                scored = completion_logps(model, batch)
            plain = completion_logps(model, batch)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert torch.equal(trained[0], scored[0]) and torch.equal(trained[1], scored[1])
    assert not torch.equal(trained[0], plain[0])  # bf16 matmuls really ran


def test_prefix_pieces_build_no_mask_and_match_the_mask(tiny_model_dir):
    """Under sdpa the prefix layout's attention runs as two causal pieces per row (sdpo_cli/attention.py): no
    [L, L] mask is built, the model's own attention really calls the pieces, and log-probs and gradients equal the
    explicit mask's; `mask` switches the model back."""
    from transformers import AttentionInterface

    from sdpo_cli import attention
    from sdpo_cli.logprobs import _attention_inputs

    model = load(tiny_model_dir)
    batch = collate_pairs(random_pairs(model.config.vocab_size, 5, seed=11), pad_id=0, layout="prefix")
    params = [p for p in model.parameters() if p.requires_grad]
    calls, out = [], {}

    def counted(*args, **kwargs):
        calls.append(kwargs.get("sdpo_prefix") is not None)
        return attention.prefix_pieces_attention(*args, **kwargs)

    for choice in ("mask", "pieces"):
        assert resolve_layout("prefix", model, prefix_attention=choice) == "prefix"
        inputs = _attention_inputs(model, batch)
        if choice == "pieces":
            assert inputs["attention_mask"].numel() == 1  # a placeholder, not an L x L mask
            assert inputs["sdpo_prefix"] == tuple(
                (int(p), int(c), int(r)) for p, c, r in zip(batch.prompt_tokens, batch.chosen_tokens,
                                                            batch.rejected_tokens))
        else:
            assert inputs["attention_mask"].shape[-2:] == (batch.input_ids.shape[1],) * 2
        calls.clear()
        AttentionInterface.register(attention.PIECES, counted)
        try:
            chosen, rejected = completion_logps(model, batch)
        finally:
            AttentionInterface.register(attention.PIECES, attention.prefix_pieces_attention)
        assert calls == ([True] * model.config.num_hidden_layers if choice == "pieces" else [])
        loss = -torch.nn.functional.logsigmoid(0.1 * (1.3 * chosen - rejected)).sum()
        out[choice] = (chosen.detach(), rejected.detach(), torch.autograd.grad(loss, params))
    (c1, r1, g1), (c2, r2, g2) = out["mask"], out["pieces"]
    assert torch.allclose(c1, c2, atol=1e-5) and torch.allclose(r1, r2, atol=1e-5)
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5 * max(1.0, a.abs().max().item()))


@pytest.mark.parametrize("attention", ["pieces", "mask"])
def test_gradient_checkpointing_gives_the_plain_gradients(tiny_model_dir, attention):
    """train.gradient_checkpointing (and `auto` when it turns on) recomputes each layer in backward: the same
    log-probs and gradients as the plain path, with the prefix pieces too (their lengths reach the recomputed
    layers as keyword arguments)."""
    pairs = random_pairs(64, 4, seed=12)
    out = []
    for checkpointed in (False, True):
        model = load(tiny_model_dir)
        model.train()
        resolve_layout("prefix", model, prefix_attention=attention)
        if checkpointed:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        chosen, rejected = completion_logps(model, collate_pairs(pairs, pad_id=0, layout="prefix"))
        loss = -torch.nn.functional.logsigmoid(0.1 * (1.3 * chosen - rejected)).sum()
        out.append((loss.detach(), torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])))
    (l1, g1), (l2, g2) = out
    assert torch.equal(l1, l2)
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7 * max(1.0, a.abs().max().item()))


def test_prefix_pieces_refuse_a_model_that_drops_the_lengths():
    """An architecture whose decoder does not hand keyword arguments to its attention would deliver the placeholder
    mask without the lengths, and sdpa would attend to every position: an error naming the switch instead."""
    from types import SimpleNamespace

    from sdpo_cli.attention import prefix_pieces_attention

    q = torch.zeros(1, 2, 5, 4)
    placeholder = torch.ones(1, 1, 1, 1, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="runtime.prefix_attention=mask"):
        prefix_pieces_attention(SimpleNamespace(), q, q, q, placeholder)
