"""Parity with TRL 1.16's DPOTrainer (research/trl-dpo.md §1, §6): on the same rows, our tokenisation, truncation,
per-pair completion log-probs and DPO losses equal what TRL's own code computes, to 1e-4.

Policy = the tiny Llama; reference = the same weights with every parameter (sorted-name order) perturbed by
0.02·N(0,1) from a fixed generator, saved to its own directory. TRL's side goes through TRL's own functions only:
`_prepare_dataset` (via the constructor) for the ids, `data_collator` for truncation and masks,
`compute_ref_log_probs(model, batch)` for per-pair summed log-probs of either model (it scores whatever model it is
given, through the same fused-LM-head forward `_compute_loss` uses), and `compute_loss` (eval mode) for the loss and
the logged metrics. Per-pair TRL losses come from `compute_loss` on one-pair batches.
"""

from __future__ import annotations

import json

import pytest
import torch

from sdpo_cli.collate import collate_pairs
from sdpo_cli.config import SourceConfig
from sdpo_cli.data.formats import load_pairs
from sdpo_cli.data.tokenize import tokenize_pair, tokenize_pairs, truncate
from sdpo_cli.logprobs import completion_logps
from sdpo_cli.loss import dpo_losses

trl = pytest.importorskip("trl")

BETA = 0.1
TOL = 1e-4

LONG = ("Once upon a time there was a cat. The sky is blue and the grass is green. "
        "Once upon a time there was a cat.")

# TRL's standard rows are string-concatenated (prompt + completion + EOS), so completions carry a leading space.
# Row 2 ends its prompt on a space, so BPE merges " 8" across the boundary: the split is the common token prefix.
# Row 3's chosen completion is the only sequence longer than STANDARD_MAX_LENGTH.
STANDARD_ROWS = [
    {"prompt": "What is 2 plus 3?", "chosen": " The answer is 5.", "rejected": " The answer is 7."},
    {"prompt": "Please be polite.", "chosen": " Thank you, that is a great question!", "rejected": " No. Go away."},
    {"prompt": "What is 4 plus 4? The answer is ", "chosen": "8.", "rejected": "9."},
    {"prompt": "What is 4 plus 4?", "chosen": " " + LONG, "rejected": " No."},
    {"prompt": "Once upon a time", "chosen": " there was a cat.", "rejected": " the sky is green."},
]
STANDARD_MAX_LENGTH = 24
STANDARD_TRUNCATED = 3


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


CONVERSATIONAL_ROWS = [
    {"prompt": _user("What is 2 plus 3?"), "chosen": _assistant("The answer is 5."),
     "rejected": _assistant("The answer is 7.")},
    {"prompt": [{"role": "system", "content": "You are a helpful assistant."}] + _user("Please be polite."),
     "chosen": _assistant("Thank you, that is a great question!"), "rejected": _assistant("No. Go away.")},
    {"prompt": _user("What is 4 plus 4?") + _assistant("The answer is 9.") + _user("Are you sure?"),
     "chosen": _assistant("No. The answer is 8."), "rejected": _assistant("Yes.")},
    {"prompt": _user("Tell me a story."), "chosen": _assistant(LONG + " " + LONG), "rejected": _assistant("No.")},
]
CONVERSATIONAL_MAX_LENGTH = 64
CONVERSATIONAL_TRUNCATED = 3

FORMATS = {
    "standard": (STANDARD_ROWS, STANDARD_MAX_LENGTH, STANDARD_TRUNCATED),
    "conversational": (CONVERSATIONAL_ROWS, CONVERSATIONAL_MAX_LENGTH, CONVERSATIONAL_TRUNCATED),
}


def _ours_rows(rows: list[dict], fmt: str) -> list[tuple[list[dict], str, str, str]]:
    """TRL rows -> (prompt messages, chosen text, rejected text, template) as our canonical pairs hold them."""
    if fmt == "standard":
        return [(_user(r["prompt"]), r["chosen"], r["rejected"], "raw") for r in rows]
    return [(r["prompt"], r["chosen"][0]["content"], r["rejected"][0]["content"], "chat") for r in rows]


def _loaded_pairs(rows: list[dict], path) -> list[dict]:
    """The same rows read the way a user's file is: a .jsonl through our `preference` format loader."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return load_pairs(SourceConfig(name="trl", path=str(path), format="preference")).pairs


@pytest.fixture(scope="module")
def model_dirs(tiny_model_dir, tmp_path_factory):
    """(policy dir, reference dir): the reference is the policy with every parameter perturbed deterministically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ref_dir = tmp_path_factory.mktemp("tiny-llama-ref")
    ref = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for _, param in sorted(ref.named_parameters()):
            param.add_(0.02 * torch.randn(param.shape, generator=gen, dtype=param.dtype))
    ref.save_pretrained(str(ref_dir))
    AutoTokenizer.from_pretrained(str(tiny_model_dir)).save_pretrained(str(ref_dir))
    return tiny_model_dir, ref_dir


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def _trl_trainer(model_dirs, rows, max_length, tmp_path, loss_type="sigmoid", label_smoothing=0.0):
    from datasets import Dataset
    from transformers import AutoTokenizer

    policy_dir, ref_dir = model_dirs
    args = trl.DPOConfig(
        output_dir=str(tmp_path / f"trl-{loss_type}"), use_cpu=True, bf16=False, max_length=max_length, beta=BETA,
        loss_type=[loss_type], label_smoothing=label_smoothing, per_device_train_batch_size=len(rows),
        per_device_eval_batch_size=len(rows), gradient_checkpointing=False, report_to=[], seed=0,
    )
    trainer = trl.DPOTrainer(model=_load(policy_dir), ref_model=_load(ref_dir), args=args,
                             train_dataset=Dataset.from_list(rows),
                             processing_class=AutoTokenizer.from_pretrained(str(policy_dir)))
    trainer.model.eval()
    trainer.ref_model.eval()
    return trainer


def _trl_losses(trainer, examples) -> tuple[float, list[float]]:
    """TRL's batch loss on all examples and its per-pair losses (compute_loss on one-pair batches)."""
    with torch.no_grad():
        batch_loss = trainer.compute_loss(trainer.model, trainer.data_collator(examples)).item()
        per_pair = [trainer.compute_loss(trainer.model, trainer.data_collator([ex])).item() for ex in examples]
    return batch_loss, per_pair


@pytest.fixture(scope="module", params=list(FORMATS))
def parity(request, model_dirs, tmp_path_factory):
    """Everything TRL and we compute on one format's rows (computed once per format)."""
    from transformers import AutoTokenizer

    fmt = request.param
    rows, max_length, truncated_row = FORMATS[fmt]
    tmp = tmp_path_factory.mktemp(f"trl-{fmt}")

    # --- TRL
    trainer = _trl_trainer(model_dirs, rows, max_length, tmp)
    examples = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    batch = trainer.data_collator(examples)
    n = len(examples)
    ids, attn, comp = batch["input_ids"], batch["attention_mask"].bool(), batch["completion_mask"].bool()
    trl_ids = []  # (prompt, chosen, rejected) as TRL's model sees them, i.e. after its collator's truncation
    for i in range(n):
        trl_ids.append((ids[i][attn[i] & ~comp[i]].tolist(), ids[i][comp[i]].tolist(),
                        ids[n + i][comp[n + i]].tolist()))
    assert all(ids[n + i][attn[n + i] & ~comp[n + i]].tolist() == trl_ids[i][0] for i in range(n))
    with torch.no_grad():
        trl_policy = [t.tolist() for t in trainer.compute_ref_log_probs(trainer.model, batch)]
        trl_ref = [t.tolist() for t in trainer.compute_ref_log_probs(trainer.ref_model, batch)]
    trainer._metrics["eval"].clear()
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, batch).item()
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["eval"].items()}
    _, trl_pair_losses = _trl_losses(trainer, examples)

    # --- ours: rows read by our loader, then tokenize_pair + truncate
    tok = AutoTokenizer.from_pretrained(str(model_dirs[0]))
    canonical = _loaded_pairs(rows, tmp / "rows.jsonl")
    assert [(c["prompt"], c["chosen"], c["rejected"], c["template"]) for c in canonical] == _ours_rows(rows, fmt)
    pairs, untruncated = [], []
    for c in canonical:
        p, ch, rj = tokenize_pair(tok, c["prompt"], c["chosen"], c["rejected"], c["template"])
        untruncated.append((p, ch, rj))
        pairs.append(truncate(p, ch, rj, max_length, None))
    assert all(pair is not None for pair in pairs)
    kept, dropped = tokenize_pairs(tok, canonical, max_length, None)  # the batch entry point agrees
    assert dropped == 0
    assert [(k["prompt_ids"], k["chosen_ids"], k["rejected_ids"], k["truncated"]) for k in kept] == [
        (t.prompt_ids, t.chosen_ids, t.rejected_ids, t.truncated) for t in pairs]
    dicts = [{"prompt_ids": t.prompt_ids, "chosen_ids": t.chosen_ids, "rejected_ids": t.rejected_ids} for t in pairs]
    ours_batch = collate_pairs(dicts, tok.pad_token_id)
    with torch.no_grad():
        policy_c, policy_r = completion_logps(_load(model_dirs[0]), ours_batch)
        ref_c, ref_r = completion_logps(_load(model_dirs[1]), ours_batch)

    return {
        "fmt": fmt, "rows": rows, "max_length": max_length, "truncated_row": truncated_row,
        "trl_examples": examples, "trl_ids": trl_ids, "trl_policy": trl_policy, "trl_ref": trl_ref,
        "trl_loss": trl_loss, "trl_metrics": trl_metrics, "trl_pair_losses": trl_pair_losses,
        "untruncated": untruncated, "pairs": pairs, "ours_batch": ours_batch,
        "policy": (policy_c, policy_r), "ref": (ref_c, ref_r), "model_dirs": model_dirs, "tmp": tmp,
        "eos_id": tok.eos_token_id,
    }


def _max_abs(a, b) -> float:
    return (torch.as_tensor(a, dtype=torch.float64) - torch.as_tensor(b, dtype=torch.float64)).abs().max().item()


def test_token_ids_equal_trl(parity):
    examples, untruncated = parity["trl_examples"], parity["untruncated"]
    assert len(examples) == len(parity["rows"])  # TRL dropped nothing
    for ex, (p, c, r) in zip(examples, untruncated):  # before truncation: TRL's tokenised dataset
        assert (p, c, r) == (ex["prompt_ids"], ex["chosen_ids"], ex["rejected_ids"])
    for (p, c, r), pair in zip(parity["trl_ids"], parity["pairs"]):  # after truncation: what TRL's model sees
        assert (p, c, r) == (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids)


def test_exactly_one_row_is_truncated(parity):
    """The truncated row is the one planned, on both sides, and the cut lands inside its chosen completion."""
    max_length, row = parity["max_length"], parity["truncated_row"]
    assert [pair.truncated for pair in parity["pairs"]] == [i == row for i in range(len(parity["pairs"]))]
    p, c, _ = parity["untruncated"][row]
    assert len(p) < max_length < len(p) + len(c)
    assert len(p) + len(parity["pairs"][row].chosen_ids) == max_length
    trl_p, trl_c, _ = parity["trl_ids"][row]
    assert len(trl_p) + len(trl_c) == max_length


def test_raw_rows_end_with_eos_and_chat_rows_with_end_of_turn(parity):
    tok_eos = parity["eos_id"]  # <|im_end|> in the conftest tokenizer, also the ChatML end of turn
    for _, c, r in parity["untruncated"]:
        if parity["fmt"] == "standard":
            assert c[-1] == tok_eos and r[-1] == tok_eos
        else:
            assert c[-2] == tok_eos and r[-2] == tok_eos  # <|im_end|> then "\n", no extra EOS
    assert tok_eos not in parity["pairs"][parity["truncated_row"]].chosen_ids  # the cut removed EOS


def test_completion_logps_equal_trl(parity):
    (pc, pr), (rc, rr) = parity["policy"], parity["ref"]
    trl_pc, trl_pr = parity["trl_policy"]
    trl_rc, trl_rr = parity["trl_ref"]
    assert _max_abs(pc, trl_pc) < TOL
    assert _max_abs(pr, trl_pr) < TOL
    assert _max_abs(rc, trl_rc) < TOL
    assert _max_abs(rr, trl_rr) < TOL
    assert _max_abs(pc, rc) > 1e-2  # the reference really differs from the policy
    assert all(t.dtype == torch.float32 for t in (pc, pr, rc, rr))


def test_sigmoid_loss_and_metrics_equal_trl(parity):
    (pc, pr), (rc, rr) = parity["policy"], parity["ref"]
    losses = dpo_losses(pc, pr, rc, rr, beta=BETA, loss="sigmoid")
    assert _max_abs(losses, parity["trl_pair_losses"]) < TOL
    assert abs(losses.mean().item() - parity["trl_loss"]) < TOL
    metrics = parity["trl_metrics"]
    chosen_rewards, rejected_rewards = BETA * (pc - rc), BETA * (pr - rr)
    assert abs(chosen_rewards.mean().item() - metrics["rewards/chosen"]) < TOL
    assert abs(rejected_rewards.mean().item() - metrics["rewards/rejected"]) < TOL
    assert abs((chosen_rewards - rejected_rewards).mean().item() - metrics["rewards/margins"]) < TOL
    assert (chosen_rewards > rejected_rewards).float().mean().item() == metrics["rewards/accuracies"]
    assert abs(pc.mean().item() - metrics["logps/chosen"]) < TOL
    assert abs(pr.mean().item() - metrics["logps/rejected"]) < TOL


@pytest.mark.parametrize(("loss", "label_smoothing"), [("hinge", 0.0), ("ipo", 0.0), ("robust", 0.1)])
def test_other_losses_equal_trl(parity, loss, label_smoothing):
    rows, max_length = parity["rows"], parity["max_length"]
    trainer = _trl_trainer(parity["model_dirs"], rows, max_length, parity["tmp"], loss, label_smoothing)
    examples = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    trl_loss, trl_pair_losses = _trl_losses(trainer, examples)
    (pc, pr), (rc, rr) = parity["policy"], parity["ref"]
    batch = parity["ours_batch"]
    losses = dpo_losses(pc, pr, rc, rr, beta=BETA, loss=loss, label_smoothing=label_smoothing,
                        chosen_tokens=batch.chosen_tokens, rejected_tokens=batch.rejected_tokens)
    assert _max_abs(losses, trl_pair_losses) < TOL
    assert abs(losses.mean().item() - trl_loss) < TOL


@pytest.mark.parametrize("max_length", [48, 49])
def test_prompt_filling_max_length_is_dropped_like_trl(model_dirs, tmp_path, max_length):
    """Row 2's chat prompt is 48 tokens: at max_length 48 TRL drops the row and our truncate returns None; at 49 both
    keep it with a one-token completion."""
    from transformers import AutoTokenizer

    trainer = _trl_trainer(model_dirs, CONVERSATIONAL_ROWS, max_length, tmp_path)
    tok = AutoTokenizer.from_pretrained(str(model_dirs[0]))
    ours = [truncate(*tokenize_pair(tok, *row), max_length, None)
            for row in _ours_rows(CONVERSATIONAL_ROWS, "conversational")]
    assert len(tokenize_pair(tok, *_ours_rows(CONVERSATIONAL_ROWS, "conversational")[2])[0]) == 48
    kept = [pair for pair in ours if pair is not None]
    assert (ours[2] is None) == (max_length == 48)
    examples = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    batch = trainer.data_collator(examples)
    n = len(examples)
    assert n == len(kept)
    comp = batch["completion_mask"].bool()
    for i, pair in enumerate(kept):
        assert batch["input_ids"][i][comp[i]].tolist() == pair.chosen_ids
        assert batch["input_ids"][n + i][comp[n + i]].tolist() == pair.rejected_ids
