"""The DPO losses against hand-worked numbers (DESIGN §1).

Every case uses policy log-probs chosen −1, rejected −3 and reference log-probs −2, −2, so
δ = (−1 − −3) − (−2 − −2) = 2 and, with β = 0.1, βδ = 0.2:
    −log σ(0.2)  = log(1 + e^−0.2) = 0.5981389
    −log σ(−0.2) = log(1 + e^0.2)  = 0.7981389
"""

import math

import pytest
import torch

from sdpo_cli.config import F_DIVERGENCE_LOSSES, F_DIVERGENCES
from sdpo_cli.loss import (
    LossSpec,
    dpo_losses,
    f_scores,
    ld_logps,
    loss_at_equal_models,
    loss_terms,
    pair_losses,
    wpo_weights,
)

PC, PR, RC, RR = (torch.tensor([v]) for v in (-1.0, -3.0, -2.0, -2.0))
A, B = 0.5981389, 0.7981389  # −log σ(0.2), −log σ(−0.2)


def loss(kind, eps=0.0, **kw):
    return dpo_losses(PC, PR, RC, RR, beta=0.1, loss=kind, label_smoothing=eps, **kw).item()


def test_sigmoid():
    assert loss("sigmoid") == pytest.approx(A, abs=1e-6)


def test_cdpo_label_smoothing():
    # 0.9 · 0.5981389 + 0.1 · 0.7981389 = 0.6181389
    assert loss("sigmoid", 0.1) == pytest.approx(0.9 * A + 0.1 * B, abs=1e-6)
    assert loss("sigmoid", 0.1) == pytest.approx(0.6181389, abs=1e-6)


def test_robust():
    # [0.9 · 0.5981389 − 0.1 · 0.7981389] / 0.8 = 0.5731389
    assert loss("robust", 0.1) == pytest.approx(0.5731389, abs=1e-6)
    assert loss("robust") == pytest.approx(A, abs=1e-6)  # ε = 0 is plain DPO


def test_hinge():
    # max(0, 1 − 0.2) = 0.8
    assert loss("hinge") == pytest.approx(0.8, abs=1e-6)


def test_ipo_is_length_normalised():
    # |y_w| = 2, |y_l| = 4: δ_norm = (−1 + 2)/2 − (−3 + 2)/4 = 0.75; (0.75 − 1/(2·0.1))² = (0.75 − 5)² = 18.0625
    value = loss("ipo", chosen_tokens=torch.tensor([2.0]), rejected_tokens=torch.tensor([4.0]))
    assert value == pytest.approx(18.0625, abs=1e-5)


@pytest.mark.parametrize("kind,eps,expected", [("sigmoid", 0.0, math.log(2)), ("sigmoid", 0.2, math.log(2)),
                                               ("robust", 0.2, math.log(2)), ("hinge", 0.0, 1.0),
                                               ("ipo", 0.0, 25.0)])
def test_loss_at_equal_models(kind, eps, expected):
    """Target == reference (update 0 of every sDPO step): δ = 0 gives the known constant."""
    x = torch.tensor([-5.0, -7.5])
    got = dpo_losses(x, x - 1, x, x - 1, beta=0.1, loss=kind, label_smoothing=eps,
                     chosen_tokens=torch.tensor([3.0, 4.0]), rejected_tokens=torch.tensor([2.0, 5.0]))
    assert got.tolist() == pytest.approx([expected, expected], abs=1e-6)
    assert loss_at_equal_models(kind, 0.1, eps) == pytest.approx(expected, abs=1e-9)


def test_gradient_pushes_chosen_up():
    pc = torch.tensor([-1.0], requires_grad=True)
    pr = torch.tensor([-3.0], requires_grad=True)
    dpo_losses(pc, pr, RC, RR, beta=0.1).sum().backward()
    # d/dpc of −log σ(β(pc − pr − 0)) = −β σ(−0.2) = −0.1 · 0.4501660
    assert pc.grad.item() == pytest.approx(-0.0450166, abs=1e-6)
    assert pr.grad.item() == pytest.approx(0.0450166, abs=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# TRL 1.16's other losses (docs/losses.md), on the same numbers: r_w = −1 − −2 = 1, r_l = −3 − −2 = −1, β = 0.1.
# ls(x) = log σ(x); σ(0.1) = 0.5249792, σ(0.2) = 0.5498340


def ls(x):
    return -math.log1p(math.exp(-x))


def sg(x):
    return 1 / (1 + math.exp(-x))


@pytest.mark.parametrize("kind,eps,expected", [
    # −ls(βr_w) − ½ls(−βr_w) − ½ls(−βr_l) = −ls(0.1) − ½ls(−0.1) − ½ls(0.1)
    ("nca_pair", 0.0, 1.3387933),
    # −ls(βr_w) − ls(−βr_l) = −2·ls(0.1)
    ("bco_pair", 0.0, 1.2887933),
    # (r_w − 0.5/β)² + (r_l + 0.5/β)² = (1 − 5)² + (−1 + 5)²
    ("sppo_hard", 0.0, 32.0),
    # 1 − σ(0.1) + σ(−0.1)
    ("apo_zero", 0.0, 0.9500416),
    # σ(0.1) + 1 − σ(0.2)
    ("apo_down", 0.0, 0.9751452),
    # m = σ(0.2/0.05) = σ(4): −ls(0.2)(1 − m) + e^−0.2·m
    ("discopop", 0.0, 0.8147631),
    # σ(0.2)(ls(0.2) − ln 0.9) + σ(−0.2)(ls(−0.2) − ln 0.1)
    ("exo_pair", 0.1, 0.4063043),
    # one pair: sorting changes nothing, so aot = sigmoid (with ε: cDPO's form)
    ("aot", 0.0, A), ("aot", 0.1, 0.6181389),
    # aot_unpaired: Δ = r_w − r_l = 2 for one pair, the same
    ("aot_unpaired", 0.0, A),
])
def test_trl_losses_by_hand(kind, eps, expected):
    assert loss(kind, eps) == pytest.approx(expected, abs=1e-6)


def test_hand_values_of_the_formulas_above():
    m = sg(4.0)
    assert -ls(0.1) - 0.5 * ls(-0.1) - 0.5 * ls(0.1) == pytest.approx(1.3387933, abs=1e-7)
    assert -ls(0.2) * (1 - m) + math.exp(-0.2) * m == pytest.approx(0.8147631, abs=1e-7)
    assert sg(0.2) * (ls(0.2) - math.log(0.9)) + sg(-0.2) * (ls(-0.2) - math.log(0.1)) == pytest.approx(0.4063043,
                                                                                                       abs=1e-7)


def test_sigmoid_norm_is_length_normalised():
    # |y_w| = 2, |y_l| = 4: (1/2 − (−1)/4) = 0.75; −ls(0.075) = 0.6563501
    value = loss("sigmoid_norm", chosen_tokens=torch.tensor([2.0]), rejected_tokens=torch.tensor([4.0]))
    assert value == pytest.approx(-ls(0.075), abs=1e-6) and value == pytest.approx(0.6563501, abs=1e-6)


@pytest.mark.parametrize("kind,expected", [
    # s = 1 − e^−r: s_w = 1 − e^−1, s_l = 1 − e; z = 0.1·(e − e^−1) = 0.2350402
    ("forward_kl", -ls(0.1 * (math.e - 1 / math.e))),
    # s = ln 2 + ls(r): s_w − s_l = ls(1) − ls(−1) = 1, z = 0.1
    ("js_divergence", -ls(0.1)),
    # α = 0.5: s = (e^(−0.5 r) − 1)/(−0.5): s_w − s_l = 2(e^0.5 − e^−0.5) = 2.0843812
    ("alpha_divergence", -ls(0.1 * 2 * (math.exp(0.5) - math.exp(-0.5)))),
])
def test_f_divergences_change_the_scores(kind, expected):
    assert loss("sigmoid", f_divergence_type=kind, f_alpha_divergence_coef=0.5) == pytest.approx(expected, abs=1e-6)
    assert f_scores(torch.tensor([0.0]), kind).item() == pytest.approx(0.0, abs=1e-7)  # 0 at equal models
    assert loss("sigmoid", f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.0) == pytest.approx(A,
                                                                                                              abs=1e-6)


def test_aot_sorts_only_the_real_pairs():
    """Two real pairs and a weight-0 padding copy: aot sorts γ_θ = (2, −1) and γ_ref = (0, 1) to (−1, 2) − (0, 1)
    = (−1, 1): −ls(−0.1) − ls(0.1) over two sorted positions; the copy (a wild γ) enters no sort."""
    pc, pr = torch.tensor([-1.0, -2.0, 50.0]), torch.tensor([-3.0, -1.0, -50.0])
    rc, rr = torch.tensor([-2.0, -2.0, 0.0]), torch.tensor([-2.0, -3.0, 0.0])
    real = torch.tensor([True, True, False])
    spec = LossSpec(terms=(("aot", 1.0),), beta=0.1)
    got = pair_losses(spec, pc, pr, rc, rr, chosen_tokens=torch.ones(3), rejected_tokens=torch.ones(3), real=real)
    assert got[2].item() == 0.0
    assert got.sum().item() == pytest.approx(-ls(-0.1) - ls(0.1), abs=1e-6)
    # aot_unpaired: r_w = (1, 0) sorted (0, 1), r_l = (−1, 2) sorted (−1, 2): Δ = (1, −1), the same sum
    spec = LossSpec(terms=(("aot_unpaired", 1.0),), beta=0.1)
    got = pair_losses(spec, pc, pr, rc, rr, chosen_tokens=torch.ones(3), rejected_tokens=torch.ones(3), real=real)
    assert got.sum().item() == pytest.approx(-ls(-0.1) - ls(0.1), abs=1e-6) and got[2].item() == 0.0


def test_a_list_of_losses_is_their_weighted_sum_and_wpo_scales_each_pair():
    spec = LossSpec(terms=(("sigmoid", 1.0), ("bco_pair", 0.5), ("sft", 2.0)), beta=0.1, nll_weight=0.25)
    assert spec.pair_terms == (("sigmoid", 1.0), ("bco_pair", 0.5)) and spec.sft_weight == 2.25
    one = torch.ones(1)
    got = pair_losses(spec, PC, PR, RC, RR, chosen_tokens=one, rejected_tokens=one).item()
    assert got == pytest.approx(A + 0.5 * 1.2887933, abs=1e-6)
    weighted = pair_losses(spec, PC, PR, RC, RR, chosen_tokens=one, rejected_tokens=one,
                           pair_weights=torch.tensor([0.25])).item()
    assert weighted == pytest.approx(0.25 * got, abs=1e-7)
    # w = exp(mean log p − log Σp²) of each reply, multiplied: e^−0.5 · e^−1.5 = e^−2
    assert wpo_weights(torch.tensor([-0.5]), torch.tensor([-1.5])).item() == pytest.approx(math.exp(-2), abs=1e-7)
    assert loss_terms("ipo") == [("ipo", 1.0)] and loss_terms(["sigmoid", "sft"], [1, 0.5]) == [("sigmoid", 1.0),
                                                                                                ("sft", 0.5)]


def test_ld_alpha_weights_the_tail():
    # total −10 of which −4 over the shared first min(C, R) tokens: −4 + 0.5·(−6) = −7; α = 1 is the sum, None off
    total, shared = torch.tensor([-10.0]), torch.tensor([-4.0])
    assert ld_logps(total, shared, 0.5).item() == -7.0
    assert ld_logps(total, shared, 1.0).item() == -10.0 and ld_logps(total, shared, None).item() == -10.0
    assert ld_logps(total, shared, 0.0).item() == -4.0


EQUAL_MODELS = [  # (loss, ε, value at equal models with β = 0.1)
    ("sigmoid", 0.0, math.log(2)), ("sigmoid", 0.2, math.log(2)), ("hinge", 0.0, 1.0), ("ipo", 0.0, 25.0),
    ("exo_pair", 0.1, -math.log(2) - 0.5 * math.log(0.1 * 0.9)),  # 0.4605170
    ("exo_pair", 1e-3, -math.log(2) - 0.5 * math.log(1e-3 * 0.999)),
    ("nca_pair", 0.0, 2 * math.log(2)), ("robust", 0.2, math.log(2)), ("bco_pair", 0.0, 2 * math.log(2)),
    ("sppo_hard", 0.0, 50.0), ("aot", 0.1, math.log(2)), ("aot_unpaired", 0.0, math.log(2)), ("apo_zero", 0.0, 1.0),
    ("apo_down", 0.0, 1.0), ("discopop", 0.0, (1 + math.log(2)) / 2), ("sigmoid_norm", 0.0, math.log(2)),
]


@pytest.mark.parametrize("kind,eps,expected,f_div", [
    (*case, f_div) for case in EQUAL_MODELS for f_div in F_DIVERGENCES
    if f_div == "reverse_kl" or case[0] in F_DIVERGENCE_LOSSES])  # the others: TRL refuses an f-divergence
def test_every_loss_at_equal_models(kind, eps, expected, f_div):
    """Log-ratios all 0 (update 0): the closed form, whatever the f-divergence (every f' score is 0 there)."""
    x = torch.tensor([-5.0, -7.5, -2.0])
    spec = LossSpec(terms=((kind, 1.0),), beta=0.1, label_smoothing=eps, f_divergence_type=f_div)
    got = pair_losses(spec, x, x - 1, x, x - 1, chosen_tokens=torch.tensor([3.0, 4.0, 1.0]),
                      rejected_tokens=torch.tensor([2.0, 5.0, 7.0]))
    assert got.tolist() == pytest.approx([expected] * 3, abs=1e-6)
    assert loss_at_equal_models(kind, 0.1, eps) == pytest.approx(expected, abs=1e-9)


def test_equal_models_of_a_list_and_of_sft():
    # sft: the reference's NLL per chosen token, e.g. chosen log-probs −6 and −4 over 2 + 3 tokens: 10/5 = 2
    assert loss_at_equal_models("sft", 0.1, nll=2.0) == 2.0
    assert loss_at_equal_models(["sigmoid", "sft"], 0.1, weights=[1.0, 0.5], nll=2.0) == pytest.approx(
        math.log(2) + 1.0, abs=1e-12)
    assert loss_at_equal_models(["sigmoid", "bco_pair"], 0.1, weights=[1.0, 0.5]) == pytest.approx(
        2 * math.log(2), abs=1e-12)
    with pytest.raises(ValueError, match="nll"):
        loss_at_equal_models("sft", 0.1)
