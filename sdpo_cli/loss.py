"""The DPO losses (DESIGN §1), per pair.

With γ_θ = log π_θ(y_w|x) − log π_θ(y_l|x), γ_ref the same under the reference, δ = γ_θ − γ_ref, β = dpo.beta and
ε = dpo.label_smoothing:

    sigmoid   −log σ(βδ)                                 (ε > 0: cDPO  −(1−ε) log σ(βδ) − ε log σ(−βδ))
    robust    [−(1−ε) log σ(βδ) + ε log σ(−βδ)] / (1−2ε)
    hinge     max(0, 1 − βδ)
    ipo       (δ_norm − 1/(2β))², δ_norm from log-probs divided by completion lengths

All equal TRL 1.16's `loss_type` of the same name for ε = 0 (TRL ignores ε for sigmoid; we keep cDPO there).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def dpo_losses(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
               ref_rejected: torch.Tensor, *, beta: float, loss: str = "sigmoid", label_smoothing: float = 0.0,
               chosen_tokens: torch.Tensor | None = None, rejected_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pair losses, shape (B,). All inputs are (B,) summed completion log-probs."""
    if loss == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("ipo needs completion lengths")
        delta = (policy_chosen - ref_chosen) / chosen_tokens - (policy_rejected - ref_rejected) / rejected_tokens
        return (delta - 1 / (2 * beta)) ** 2
    z = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    eps = label_smoothing
    if loss == "sigmoid":
        return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
    if loss == "robust":
        return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)
    if loss == "hinge":
        return torch.relu(1 - z)
    raise ValueError(f"unknown loss {loss!r}")


def loss_at_equal_models(loss: str, beta: float, label_smoothing: float = 0.0) -> float:
    """The loss when target == reference (δ = 0): ln 2 for sigmoid and robust, 1 for hinge, 1/(4β²) for ipo.

    sDPO checks this at update 0 of every step, where the target starts as the reference; a mismatch means the
    reference log-probs were computed on other tokens or another model.
    """
    if loss in ("sigmoid", "robust"):
        return math.log(2.0)
    if loss == "hinge":
        return 1.0
    if loss == "ipo":
        return (1 / (2 * beta)) ** 2
    raise ValueError(f"unknown loss {loss!r}")
