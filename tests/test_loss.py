"""The DPO losses against hand-worked numbers (DESIGN §1).

Every case uses policy log-probs chosen −1, rejected −3 and reference log-probs −2, −2, so
δ = (−1 − −3) − (−2 − −2) = 2 and, with β = 0.1, βδ = 0.2:
    −log σ(0.2)  = log(1 + e^−0.2) = 0.5981389
    −log σ(−0.2) = log(1 + e^0.2)  = 0.7981389
"""

import math

import pytest
import torch

from sdpo_cli.loss import dpo_losses, loss_at_equal_models

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
