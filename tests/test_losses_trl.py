"""Every preference loss of TRL 1.16 (docs/losses.md), its combinations and modifiers, against TRL's own DPOTrainer
on the same batch: the loss, its gradient with respect to every policy token log-prob, and the logged metrics.

The machinery of tests/test_trl_parity.py: the tiny Llama as the policy and the same weights perturbed by 0.02·N(0,1)
as the reference, the rows of its `standard` format (5 pairs, one truncated), TRL's own tokenisation and collator.

sdpo's side is sdpo's train path: the policy's per-token log-probs come from `logprobs.token_logps` (the lean
chunked head `completion_logps` uses, with log Σ_v p_v² for WPO), the reference's sums from `scoring.score_pairs`
with shared=True (what `sdpo reflogp` writes, LD-DPO's shared columns included), and the loss from train.py's
`pair_scores` + `micro_batch_loss` (what `TrainLoop._micro_batch` runs) and its metrics from `MetricSums`.

TRL's side is `DPOTrainer.compute_loss` (eval mode), with TRL's `loss_type` / `loss_weights` / `ld_alpha` /
`use_weighting` / `f_divergence_type` set on one trainer per case. So that both losses are computed from the very
same numbers, at float64, the policy's fused-LM-head output inside TRL's `_compute_loss` has its `log_probs` (and
`log_sum_sq_probs`) replaced by sdpo's per-token values placed where TRL's completion mask puts them, as a leaf
tensor: the gradients of both losses with respect to the same per-token log-probs are then compared one to one. The
reference enters TRL as precomputed log-probs (TRL's `precompute_ref_log_probs` path) from sdpo's reflogp scoring,
LD-weighted by TRL's formula; that TRL's own scoring gives the same numbers (also LD-weighted and log Σ p²) is
checked separately, to 1e-5 in float32.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.test_trl_parity import BETA, STANDARD_MAX_LENGTH, STANDARD_ROWS, _load, model_dirs  # noqa: F401

trl = pytest.importorskip("trl")

F64_TOL, F32_TOL = 1e-6, 1e-5

LOSSES = ["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
          "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"]
EPS = {"exo_pair": 1e-3, "robust": 0.1, "aot": 0.1}  # label smoothing where a loss reads it (exo_pair needs it)

# (case id, dpo keys): each loss alone, two combinations, the modifiers
CASES = [(name, {"loss": [name], "label_smoothing": EPS.get(name, 0.0)}) for name in LOSSES] + [
    ("sigmoid+sft", {"loss": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]}),
    ("sigmoid+bco_pair", {"loss": ["sigmoid", "bco_pair"], "loss_weights": [1.0, 0.5]}),
    ("sigmoid+ld_alpha", {"loss": ["sigmoid"], "ld_alpha": 0.5}),
    ("sigmoid+wpo", {"loss": ["sigmoid"], "use_weighting": True}),
    ("sigmoid+forward_kl", {"loss": ["sigmoid"], "f_divergence_type": "forward_kl"}),
    ("sigmoid+js_divergence", {"loss": ["sigmoid"], "f_divergence_type": "js_divergence"}),
    ("sigmoid+alpha_divergence", {"loss": ["sigmoid"], "f_divergence_type": "alpha_divergence",
                                  "f_alpha_divergence_coef": 0.3}),
    # beyond the list asked for: modifiers together, and the sorting / pooling losses with them
    ("ipo+sigmoid+ld_alpha+wpo", {"loss": ["ipo", "sigmoid"], "loss_weights": [0.5, 2.0], "ld_alpha": 0.3,
                                  "use_weighting": True}),
    ("sft+ld_alpha", {"loss": ["sigmoid", "sft"], "ld_alpha": 0.3}),  # sft reads the plain log-probs
    ("aot_unpaired+ld_alpha", {"loss": ["aot_unpaired"], "ld_alpha": 0.7}),
    ("hinge+sigmoid_norm+js", {"loss": ["hinge", "sigmoid_norm"], "f_divergence_type": "js_divergence"}),
]
RESULTS: dict[str, dict[str, float]] = {}  # case -> max |Δ| per quantity (printed by the last test)


def _spec(keys: dict):
    from sdpo_cli.loss import LossSpec, loss_terms

    return LossSpec(terms=tuple(loss_terms(keys["loss"], keys.get("loss_weights"))), beta=BETA,
                    label_smoothing=keys.get("label_smoothing", 0.0),
                    f_divergence_type=keys.get("f_divergence_type", "reverse_kl"),
                    f_alpha_divergence_coef=keys.get("f_alpha_divergence_coef", 0.5),
                    use_weighting=keys.get("use_weighting", False), ld_alpha=keys.get("ld_alpha"))


class _Accelerator:
    """What MetricSums asks of accelerate, in one process."""

    def reduce(self, tensor, reduction="sum"):
        return tensor

    def gather(self, tensor):
        return tensor


class _SwappedLogps(torch.nn.Module):
    """TRL's policy, whose fused-LM-head output carries sdpo's per-token log-probs (and log Σ p²) instead of its own."""

    def __init__(self, inner, log_probs, log_sum_sq):
        super().__init__()
        self.inner, self.log_probs, self.log_sum_sq = inner, log_probs, log_sum_sq

    def forward(self, **kwargs):
        out = self.inner(**kwargs)
        out.log_probs = self.log_probs
        out.log_sum_sq_probs = self.log_sum_sq
        return out


@pytest.fixture(scope="module")
def setup(model_dirs, tmp_path_factory):  # noqa: F811
    from datasets import Dataset
    from transformers import AutoTokenizer

    from sdpo_cli.collate import collate_pairs
    from sdpo_cli.data.tokenize import tokenize_pair, truncate
    from sdpo_cli.logprobs import token_logps
    from sdpo_cli.scoring import score_pairs

    policy_dir, ref_dir = model_dirs
    tmp = tmp_path_factory.mktemp("trl-losses")
    args = trl.DPOConfig(output_dir=str(tmp / "trl"), use_cpu=True, bf16=False, max_length=STANDARD_MAX_LENGTH,
                         beta=BETA, loss_type=["sigmoid"], use_weighting=True, per_device_train_batch_size=5,
                         per_device_eval_batch_size=5, gradient_checkpointing=False, report_to=[], seed=0)
    tok = AutoTokenizer.from_pretrained(str(policy_dir))
    trainer = trl.DPOTrainer(model=_load(policy_dir), ref_model=_load(ref_dir), args=args,
                             train_dataset=Dataset.from_list(STANDARD_ROWS), processing_class=tok)
    trainer.model.eval()
    trainer.ref_model.eval()
    examples = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    batch = trainer.data_collator(examples)
    n = len(examples)

    # sdpo: the same rows tokenised and truncated by sdpo (test_trl_parity: the same ids as TRL's)
    pairs = []
    for row in STANDARD_ROWS:
        p, c, r = tokenize_pair(tok, [{"role": "user", "content": row["prompt"]}], row["chosen"], row["rejected"],
                                "raw")
        t = truncate(p, c, r, STANDARD_MAX_LENGTH, None)
        pairs.append({"prompt_ids": t.prompt_ids, "chosen_ids": t.chosen_ids, "rejected_ids": t.rejected_ids})
    ours = collate_pairs(pairs, tok.pad_token_id)
    policy = _load(policy_dir)
    with torch.no_grad():
        logps, log_sum_sq = token_logps(policy, ours, sum_sq=True)
    reference = _load(ref_dir)
    ref_columns = score_pairs(reference, pairs, pad_id=tok.pad_token_id, batch_size=2, device="cpu", shared=True)
    ref = torch.tensor(ref_columns, dtype=torch.float64).t()  # (B, 4): chosen, rejected, chosen_shared, rej_shared

    # where each of sdpo's scored tokens sits in TRL's [2B, L-1] per-token tensors
    shift = batch["completion_mask"][:, 1:].bool()
    rows, cols = [], []
    for segment in range(2 * n):
        trl_row = segment // 2 + (n if segment % 2 else 0)
        where = shift[trl_row].nonzero().squeeze(-1)
        assert (ours.segment == segment).sum().item() == where.numel()
        rows += [trl_row] * where.numel()
        cols += where.tolist()
    order = torch.argsort(ours.segment, stable=True)  # sdpo's tokens by segment, in order within each
    return {"trainer": trainer, "batch": batch, "n": n, "ours": ours, "logps": logps, "log_sum_sq": log_sum_sq,
            "ref": ref, "rows": torch.tensor(rows), "cols": torch.tensor(cols), "order": order, "shift": shift,
            "policy": policy, "reference": reference}


def _set_loss_keys(trainer, keys: dict) -> None:
    """The dpo keys of a case, as the DPOTrainer attributes that _compute_loss reads (one trainer serves every case)."""
    trainer.loss_types = list(keys["loss"])
    trainer.loss_weights = keys.get("loss_weights") or [1.0] * len(trainer.loss_types)
    trainer.label_smoothing = keys.get("label_smoothing", 0.0)
    trainer.ld_alpha = keys.get("ld_alpha")
    trainer.use_weighting = keys.get("use_weighting", False)
    trainer.f_divergence_type = keys.get("f_divergence_type", "reverse_kl")
    trainer.f_alpha_divergence_coef = keys.get("f_alpha_divergence_coef", 0.5)


def _trl_side(setup, keys: dict, leaf: torch.Tensor, dtype) -> tuple[torch.Tensor, dict]:
    """TRL's compute_loss on the batch, with `leaf` (sdpo's per-token log-probs, in sdpo's order) as the policy's."""
    trainer, batch = setup["trainer"], setup["batch"]
    _set_loss_keys(trainer, keys)
    trainer.precompute_ref_logps = True
    shape = setup["shift"].shape
    index = (setup["rows"], setup["cols"])
    log_probs = torch.zeros(shape, dtype=dtype).index_put(index, _to_trl_order(setup, leaf))
    log_sum_sq = torch.zeros(shape, dtype=dtype).index_put(index, _to_trl_order(setup, setup["log_sum_sq"].to(dtype)))
    ref = setup["ref"].to(dtype)
    ref_c = ref[:, 0] if trainer.ld_alpha is None else ref[:, 2] + trainer.ld_alpha * (ref[:, 0] - ref[:, 2])
    ref_r = ref[:, 1] if trainer.ld_alpha is None else ref[:, 3] + trainer.ld_alpha * (ref[:, 1] - ref[:, 3])
    inputs = dict(batch) | {"ref_chosen_logps": ref_c, "ref_rejected_logps": ref_r}
    trainer._metrics["eval"].clear()
    loss = trainer.compute_loss(_SwappedLogps(trainer.model, log_probs, log_sum_sq), inputs)
    return loss, {k: v[-1] for k, v in trainer._metrics["eval"].items()}


def _to_trl_order(setup, values: torch.Tensor) -> torch.Tensor:
    """sdpo's per-token values (scoring order) listed segment by segment, as `rows` / `cols` list TRL's places."""
    return values[setup["order"]]


def _sdpo_side(setup, keys: dict, leaf: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """sdpo's train path on the batch: the policy's sums from the per-token leaf, train.pair_scores, the loss as
    TrainLoop._micro_batch computes it (one micro-batch, one process) and MetricSums' record."""
    from sdpo_cli.logprobs import shared_mask
    from sdpo_cli.train import MetricSums, micro_batch_loss, pair_scores

    spec, ours = _spec(keys), setup["ours"]
    sums = torch.zeros(2 * ours.n_pairs, dtype=leaf.dtype).index_add(0, ours.segment, leaf)
    shared = torch.zeros(2 * ours.n_pairs, dtype=leaf.dtype).index_add(0, ours.segment, leaf * shared_mask(ours))
    aligned = torch.zeros(2 * ours.n_pairs, dtype=leaf.dtype).index_add(
        0, ours.segment, leaf.detach() - setup["log_sum_sq"].to(leaf.dtype))
    lengths = torch.stack([ours.chosen_tokens, ours.rejected_tokens], dim=1).reshape(-1).to(leaf.dtype)
    wpo = aligned / lengths
    out = (sums[0::2], sums[1::2], shared[0::2], shared[1::2], wpo[0::2], wpo[1::2])
    weight = torch.ones(ours.n_pairs, dtype=leaf.dtype)
    scores = pair_scores(spec, out, setup["ref"].to(leaf.dtype), ours, weight)
    loss = micro_batch_loss(spec, scores, weight, pairs=ours.n_pairs, chosen_tokens=ours.chosen_tokens.sum().item())
    metrics = MetricSums("cpu", spec)
    metrics.add(scores, ours, weight)
    means, _ = metrics.means(_Accelerator())
    return loss, means


@pytest.mark.parametrize("case,keys", CASES, ids=[c for c, _ in CASES])
def test_loss_gradient_and_metrics_equal_trl(setup, case, keys):
    from sdpo_cli.config import F_DIVERGENCE_LOSSES

    if keys.get("f_divergence_type", "reverse_kl") != "reverse_kl":
        assert set(keys["loss"]) <= set(F_DIVERGENCE_LOSSES)
    # float64 throughout, but for TRL's alpha-divergence, which only takes 16- or 32-bit floats
    dtype = torch.float32 if keys.get("f_divergence_type") == "alpha_divergence" else torch.float64
    tol = F32_TOL if dtype == torch.float32 else F64_TOL
    ours_leaf = setup["logps"].detach().to(dtype).requires_grad_()
    trl_leaf = setup["logps"].detach().to(dtype).requires_grad_()
    trl_loss, trl_metrics = _trl_side(setup, keys, trl_leaf, dtype)
    loss, means = _sdpo_side(setup, keys, ours_leaf)
    trl_loss.backward()
    loss.backward()
    assert ours_leaf.grad is not None and trl_leaf.grad is not None
    diffs = {"loss": abs(loss.item() - trl_loss.item()), "logged loss": abs(means["loss"] - trl_loss.item()),
             "grad": (ours_leaf.grad - trl_leaf.grad).abs().max().item()}
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                "logps/rejected"):
        diffs[key] = abs(means[key] - trl_metrics[key])
    RESULTS[case] = diffs
    scale = max(1.0, abs(trl_loss.item()))
    assert diffs["loss"] <= tol * scale and diffs["logged loss"] <= tol * scale, diffs
    assert diffs["grad"] <= tol * max(1.0, trl_leaf.grad.abs().max().item()), diffs
    assert max(v for k, v in diffs.items() if k.startswith(("rewards", "logps"))) <= tol * 100, diffs  # sums of ~50
    assert trl_leaf.grad.abs().max().item() > 1e-4  # the loss really depends on the log-probs


def test_sft_with_wpo_is_the_nll_times_the_mean_pair_weight(setup):
    """TRL 1.16 crashes on `sft` with use_weighting (it multiplies an expanded tensor in place), so there is no TRL
    number to compare with: sdpo computes what TRL's code means, mean over pairs of NLL·w_w·w_l = NLL·mean(w)."""
    ours = setup["ours"]
    leaf = setup["logps"].detach().double().requires_grad_()
    loss, _ = _sdpo_side(setup, {"loss": ["sft"], "use_weighting": True}, leaf)
    aligned = torch.zeros(2 * ours.n_pairs, dtype=torch.float64).index_add(
        0, ours.segment, setup["logps"].double() - setup["log_sum_sq"].double())
    w = torch.exp(aligned[0::2] / ours.chosen_tokens) * torch.exp(aligned[1::2] / ours.rejected_tokens)
    chosen = torch.zeros(2 * ours.n_pairs, dtype=torch.float64).index_add(0, ours.segment, setup["logps"].double())
    nll = -chosen[0::2].sum() / ours.chosen_tokens.sum()
    assert loss.item() == pytest.approx((nll * w.mean()).item(), abs=1e-9)
    assert (w - 1).abs().min().item() > 1e-3  # the weights really weigh (log p − log Σ p² is not 0)


def test_the_reference_really_differs_and_weights_are_not_trivial(setup):
    ref = setup["ref"]
    ours = setup["ours"]
    sums = torch.zeros(2 * ours.n_pairs, dtype=torch.float64).index_add(0, ours.segment, setup["logps"].double())
    assert (sums[0::2] - ref[:, 0]).abs().max().item() > 1e-2
    assert (ref[:, 2] != ref[:, 0]).any() or (ref[:, 3] != ref[:, 1]).any()  # some reply has a tail past min(C, R)


def test_trl_scores_what_sdpo_scores(setup):
    """TRL's own per-token log-probs and log Σ p² of the policy, and its LD-weighted reference log-probs, equal
    sdpo's (token_logps with sum_sq, reflogp's scoring with the shared columns), float32: per token to 1e-5, the sums
    to 1e-5 of their size."""
    trainer, batch = setup["trainer"], setup["batch"]
    index = (setup["rows"], setup["cols"])
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    kwargs = {k: v for k, v in batch.items() if k not in ("completion_mask", "ref_chosen_logps", "ref_rejected_logps")}
    with torch.no_grad():
        out = trainer.model(**kwargs, labels=labels, fused_lm_head=True, use_cache=False)
    assert (out.log_probs[index] - _to_trl_order(setup, setup["logps"])).abs().max().item() < F32_TOL
    assert (out.log_sum_sq_probs[index] - _to_trl_order(setup, setup["log_sum_sq"])).abs().max().item() < F32_TOL
    ref = setup["ref"]
    for alpha in (None, 0.5):
        trainer.ld_alpha = alpha
        with torch.no_grad():
            trl_c, trl_r = trainer.compute_ref_log_probs(trainer.ref_model, batch)
        ours_c = ref[:, 0] if alpha is None else ref[:, 2] + alpha * (ref[:, 0] - ref[:, 2])
        ours_r = ref[:, 1] if alpha is None else ref[:, 3] + alpha * (ref[:, 1] - ref[:, 3])
        # sums of up to ~100 in float32 (one ulp: 7.6e-6): relative to their size
        assert ((trl_c.double() - ours_c).abs() / (1 + ours_c.abs())).max().item() < F32_TOL
        assert ((trl_r.double() - ours_r).abs() / (1 + ours_r.abs())).max().item() < F32_TOL
    trainer.ld_alpha = None


def test_policy_logps_gives_the_shared_sums_and_wpo_terms(setup):
    """logprobs.policy_logps (what PairLogps returns with LD-DPO / WPO on) equals the sums taken above by hand."""
    from sdpo_cli.logprobs import completion_logps_shared, policy_logps

    ours, policy = setup["ours"], setup["policy"]
    with torch.no_grad():
        c, r, cs, rs, cw, rw = policy_logps(policy, ours, shared=True, weighting=True)
        c2, r2, cs2, rs2 = completion_logps_shared(policy, ours)
        plain = policy_logps(policy, ours)
    assert torch.equal(c, c2) and torch.equal(cs, cs2) and torch.equal(rs, rs2)
    assert plain[2:] == (None, None, None, None) and torch.equal(plain[0], c)
    aligned = torch.zeros(2 * ours.n_pairs).index_add(0, ours.segment, setup["logps"] - setup["log_sum_sq"])
    assert torch.allclose(cw, aligned[0::2] / ours.chosen_tokens, atol=1e-6)
    assert torch.allclose(rw, aligned[1::2] / ours.rejected_tokens, atol=1e-6)
    assert torch.isfinite(cw).all() and (cw.abs() > 1e-4).all()


# ---------------------------------------------------------------------------------------------------------------
# End to end: `sdpo split` + `sdpo reflogp` + `sdpo train` (train.max_updates=1) on the same rows, with the perturbed
# model as dpo.reference, so that update 0's policy (the tiny Llama) differs from the reference; update 0's record
# (loss and metrics, logged before the update) against TRL's compute_loss with TRL's own forward passes of both
# models, float32.

E2E = [("sigmoid", {"loss": ["sigmoid"]}), ("exo_pair", {"loss": ["exo_pair"], "label_smoothing": 1e-3}),
       ("aot", {"loss": ["aot"], "label_smoothing": 0.1}),
       ("sigmoid+sft", {"loss": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]}),
       ("sigmoid+ld_alpha", {"loss": ["sigmoid"], "ld_alpha": 0.5}),
       ("sigmoid+wpo", {"loss": ["sigmoid"], "use_weighting": True}),
       ("ipo+js_divergence", {"loss": ["ipo"], "f_divergence_type": "js_divergence"})]


@pytest.fixture(scope="module")
def e2e_run(model_dirs, tmp_path_factory):  # noqa: F811
    """A run directory whose step 1 has its data and reference log-probs (under the perturbed reference)."""
    import json

    import yaml

    from tests.test_errors import run_in_process

    policy_dir, ref_dir = model_dirs
    tmp = tmp_path_factory.mktemp("trl-e2e")
    (tmp / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in STANDARD_ROWS))
    config = tmp / "config.yaml"
    config.write_text(yaml.safe_dump({
        "run_dir": str(tmp / "run"), "model": {"base": str(policy_dir)},
        "data": {"sources": [{"name": "trl", "path": str(tmp / "rows.jsonl"), "format": "preference"}],
                 "max_length": STANDARD_MAX_LENGTH, "max_prompt_length": None},
        "split": {"strategy": "natural"}, "dpo": {"beta": BETA, "reference": str(ref_dir)},
        "train": {"per_device_batch_size": len(STANDARD_ROWS), "max_updates": 1, "logging_every": 1,
                  "warmup_ratio": 0.0, "learning_rate": 1e-6},
        "inference": {"batch_size": 2}}))
    for args in (("split", str(config)), ("reflogp", str(config), "--step", "1")):
        result = run_in_process(*args)
        assert result.returncode == 0, result.stderr
    return config, tmp / "run"


def _overrides(keys: dict) -> list[str]:
    def value(v):
        return "[" + ",".join(str(x) for x in v) + "]" if isinstance(v, list) else str(v).lower() if isinstance(
            v, bool) else str(v)

    return [f"dpo.{k}={value(v)}" for k, v in keys.items()]


@pytest.mark.parametrize("case,keys", E2E, ids=[c for c, _ in E2E])
def test_update_0_of_sdpo_train_equals_trl(e2e_run, setup, case, keys):
    import json

    from tests.test_errors import run_in_process

    config, run = e2e_run
    result = run_in_process("train", str(config), "--step", "1", "--force", *_overrides(keys))
    assert result.returncode == 0, result.stderr
    first = json.loads((run / "logs" / "train-step-1.jsonl").read_text().splitlines()[0])
    assert first["update"] == 0 and first["pairs"] == len(STANDARD_ROWS) and first["check"] == "skipped"

    trainer, batch = setup["trainer"], setup["batch"]
    _set_loss_keys(trainer, keys)
    trainer.precompute_ref_logps = False  # TRL's own reference forward
    trainer._metrics["eval"].clear()
    try:
        with torch.no_grad():
            trl_loss = trainer.compute_loss(trainer.model, batch).item()
    finally:
        trainer.ld_alpha, trainer.use_weighting, trainer.f_divergence_type = None, False, "reverse_kl"
    metrics = {k: v[-1] for k, v in trainer._metrics["eval"].items()}
    diffs = {"loss": abs(first["loss"] - trl_loss)}
    diffs |= {k: abs(first[k] - metrics[k]) for k in ("rewards/chosen", "rewards/rejected", "rewards/margins",
                                                       "rewards/accuracies", "logps/chosen", "logps/rejected")}
    RESULTS[f"e2e {case}"] = diffs
    assert diffs["loss"] <= F32_TOL * max(1.0, abs(trl_loss)), diffs
    assert max(diffs[k] for k in ("rewards/chosen", "rewards/rejected", "rewards/margins")) <= F32_TOL, diffs
    assert max(diffs["logps/chosen"], diffs["logps/rejected"]) <= 1e-4, diffs  # means of sums of up to ~100
    assert diffs["rewards/accuracies"] <= 1e-6


@pytest.mark.parametrize("loss", [["aot"], ["aot_unpaired"], ["sigmoid", "sft"], ["sft"]])
def test_padding_copies_enter_no_sort_and_no_pool(loss):
    """FullBatches fills a short last batch with weight-0 copies: the micro-batch's loss (train.micro_batch_loss on
    train.pair_scores) with a copy of pair 0 added equals the loss without it, for the sorting and the pooled losses."""
    from types import SimpleNamespace

    from sdpo_cli.train import micro_batch_loss, pair_scores

    spec = _spec({"loss": loss, "label_smoothing": 0.1})
    gen = torch.Generator().manual_seed(0)
    logps = -10 * torch.rand(4, 4, generator=gen, dtype=torch.float64)  # policy c, r; reference c, r of 4 pairs
    tokens = torch.tensor([3.0, 5.0, 2.0, 7.0], dtype=torch.float64)

    def loss_of(rows, weight):
        batch = SimpleNamespace(chosen_tokens=tokens[rows], rejected_tokens=tokens[rows] + 1)
        policy = logps[rows, 0].clone().requires_grad_(), logps[rows, 1]
        ref = torch.stack([logps[rows, 2], logps[rows, 3], logps[rows, 2], logps[rows, 3]], dim=1)
        weight = torch.tensor(weight, dtype=torch.float64)
        scores = pair_scores(spec, policy, ref, batch, weight)
        real = weight > 0
        value = micro_batch_loss(spec, scores, weight, pairs=real.sum().item(),
                                 chosen_tokens=tokens[rows][real].sum().item())
        (grad,) = torch.autograd.grad(value, policy[0])
        return value.item(), grad[real]

    plain, padded = loss_of([0, 1, 2, 3], [1, 1, 1, 1]), loss_of([0, 1, 2, 3, 0], [1, 1, 1, 1, 0])
    assert padded[0] == pytest.approx(plain[0], abs=1e-12)
    assert torch.allclose(padded[1], plain[1], atol=1e-12)


def test_zz_report(capsys):
    """Prints the table of max |Δ| (run with -s to see it)."""
    if not RESULTS:
        pytest.skip("no case ran")
    with capsys.disabled():
        keys = list(next(iter(RESULTS.values())))
        print("\ncase | " + " | ".join(keys))
        for case, diffs in RESULTS.items():
            print(f"{case} | " + " | ".join(f"{diffs[k]:.1e}" if k in diffs else "–" for k in keys))
    assert all(math.isfinite(v) for d in RESULTS.values() for v in d.values())
