"""The preference losses: every `loss_type` of TRL 1.16's DPOTrainer, alone or as a weighted list (docs/losses.md).

Notation (per pair): log-ratios r_w = log π_θ(y_w|x) − log π_ref(y_w|x), r_l the same for y_l; β = dpo.beta;
ε = dpo.label_smoothing; s_w, s_l = f'(exp r) the f-divergence scores (dpo.f_divergence_type; reverse_kl: s = r);
z = β(s_w − s_l).

    sigmoid       −log σ(z)                       (ε > 0: cDPO −(1−ε) log σ(z) − ε log σ(−z); TRL ignores ε here)
    hinge         max(0, 1 − z)
    ipo           (s_w/|y_w| − s_l/|y_l| − 1/(2β))²
    exo_pair      KL(q ‖ p) with q = (σ(z), σ(−z)), p = (1−ε, ε)                             (needs ε > 0)
    nca_pair      −log σ(βr_w) − ½ log σ(−βr_w) − ½ log σ(−βr_l)
    robust        [−(1−ε) log σ(z) + ε log σ(−z)] / (1−2ε)
    bco_pair      −log σ(βr_w) − log σ(−βr_l)
    sppo_hard     (r_w − 1/(2β))² + (r_l + 1/(2β))²
    aot           −(1−ε) log σ(βΔ) − ε log σ(−βΔ), Δ = sort(γ_θ) − sort(γ_ref) over the micro-batch
    aot_unpaired  the same with Δ = sort(r_w) − sort(r_l)
    apo_zero      1 − σ(βr_w) + σ(βr_l)
    apo_down      σ(βr_w) + 1 − σ(β(r_w − r_l))
    discopop      (1 − m)(−log σ(z)) + m·exp(−z), m = σ(z/τ), τ = dpo.discopop_tau
    sft           mean NLL per chosen completion token
    sigmoid_norm  −log σ(β(s_w/|y_w| − s_l/|y_l|))

`sft` is pooled over the chosen tokens of the whole update (as dpo.nll_weight, which is the same term with its
weight); aot / aot_unpaired sort the real pairs of one micro-batch of one process (TRL: one device's batch). Every
other loss is per pair. With dpo.use_weighting (WPO) each pair's loss is multiplied by w_w·w_l, w = exp(mean over the
completion's tokens of log p − log Σ_v p_v²) of the policy, without gradient; `sft` by the micro-batch's mean w_w·w_l.
With dpo.ld_alpha (LD-DPO) every log-prob that enters here is shared + α·(total − shared) (the caller computes it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sdpo_cli.config import LOSSES, loss_names  # the names; config._dpo_problems checks a config's

SORTING_LOSSES = ("aot", "aot_unpaired")  # batch-level: they sort the micro-batch (no WPO weights: TRL refuses)


def loss_terms(loss, weights=None) -> list[tuple[str, float]]:
    """dpo.loss (a name or a list of names) and dpo.loss_weights (None: 1.0 each) as [(name, weight), ...]."""
    names = [str(name) for name in loss_names(loss)]
    weights = [1.0] * len(names) if weights is None else [float(w) for w in weights]
    if len(weights) != len(names):
        raise ValueError(f"{len(weights)} loss weights for {len(names)} losses")
    return list(zip(names, weights))


@dataclass(frozen=True)
class LossSpec:
    """What computes the loss of a micro-batch: the dpo section's loss keys."""

    terms: tuple[tuple[str, float], ...] = (("sigmoid", 1.0),)
    beta: float = 0.1
    label_smoothing: float = 0.0
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5
    discopop_tau: float = 0.05
    use_weighting: bool = False
    ld_alpha: float | None = None
    nll_weight: float = 0.0  # the RPO NLL term: the same as adding `sft` with this weight

    @classmethod
    def from_config(cls, dpo) -> LossSpec:
        return cls(terms=tuple(loss_terms(dpo.loss, dpo.loss_weights)), beta=dpo.beta,
                   label_smoothing=dpo.label_smoothing, f_divergence_type=dpo.f_divergence_type,
                   f_alpha_divergence_coef=dpo.f_alpha_divergence_coef, discopop_tau=dpo.discopop_tau,
                   use_weighting=dpo.use_weighting, ld_alpha=dpo.ld_alpha, nll_weight=dpo.nll_weight)

    @property
    def pair_terms(self) -> tuple[tuple[str, float], ...]:
        """The terms computed per pair (or per sorted position): all but `sft`."""
        return tuple((name, w) for name, w in self.terms if name != "sft")

    @property
    def sft_weight(self) -> float:
        """The weight of the mean NLL per chosen token: the `sft` terms' weights plus dpo.nll_weight."""
        return sum(w for name, w in self.terms if name == "sft") + self.nll_weight

    @property
    def names(self) -> str:
        return "+".join(name if w == 1 else f"{w:g}·{name}" for name, w in self.terms)


def ld_logps(total: torch.Tensor, shared: torch.Tensor, alpha: float | None) -> torch.Tensor:
    """LD-DPO's log-prob: the first min(C, R) tokens in full, the longer reply's tail weighted by α."""
    return total if alpha is None else shared + alpha * (total - shared)


def f_scores(logratio: torch.Tensor, kind: str = "reverse_kl", alpha: float = 0.5) -> torch.Tensor:
    """f'(π/π_ref) as a function of the log-ratio (TRL's chosen_scores / rejected_scores)."""
    if kind == "reverse_kl":
        return logratio
    if kind == "forward_kl":  # f'(t) = 1 − 1/t
        return 1 - torch.exp(-logratio)
    if kind == "js_divergence":  # f'(t) = log(2t/(t+1))
        return math.log(2) + F.logsigmoid(logratio)
    if kind == "alpha_divergence":  # f'(t) = (t^(α−1) − 1)/(α−1); α = 1 is reverse KL
        if abs(alpha - 1.0) < 1e-6:
            return logratio
        t = (alpha - 1.0) * logratio
        clamp_max = {torch.float16: 11.0, torch.bfloat16: 80.0}.get(t.dtype, 80.0)
        return (torch.exp(torch.clamp(t.float(), max=clamp_max)) - 1.0).to(t.dtype) / (alpha - 1.0)
    raise ValueError(f"unknown f-divergence {kind!r}")


def _smoothed_sigmoid(z: torch.Tensor, eps: float) -> torch.Tensor:
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def pair_loss(name: str, policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
              ref_rejected: torch.Tensor, *, beta: float, label_smoothing: float = 0.0,
              chosen_tokens: torch.Tensor | None = None, rejected_tokens: torch.Tensor | None = None,
              f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5,
              discopop_tau: float = 0.05) -> torch.Tensor:
    """One loss (not `sft`) of the pairs given, shape (B,): per pair, or per sorted position for aot / aot_unpaired
    (which sort all B pairs given: pass only the real ones)."""
    eps = label_smoothing
    chosen_lr, rejected_lr = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    s_w = f_scores(chosen_lr, f_divergence_type, f_alpha_divergence_coef)
    s_l = f_scores(rejected_lr, f_divergence_type, f_alpha_divergence_coef)
    z = beta * (s_w - s_l)
    if name in ("ipo", "sigmoid_norm"):
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError(f"{name} needs completion lengths")
        norm = s_w / chosen_tokens.to(s_w.dtype).clamp(min=1) - s_l / rejected_tokens.to(s_l.dtype).clamp(min=1)
        return (norm - 1 / (2 * beta)) ** 2 if name == "ipo" else -F.logsigmoid(beta * norm)
    if name == "sigmoid":
        return _smoothed_sigmoid(z, eps)
    if name == "robust":
        return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)
    if name == "hinge":
        return torch.relu(1 - z)
    if name == "exo_pair":
        return (torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps))
                + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(eps)))
    if name == "nca_pair":
        zw, zl = beta * chosen_lr, beta * rejected_lr
        return -F.logsigmoid(zw) - 0.5 * F.logsigmoid(-zw) - 0.5 * F.logsigmoid(-zl)
    if name == "bco_pair":
        return -F.logsigmoid(beta * chosen_lr) - F.logsigmoid(-beta * rejected_lr)
    if name == "sppo_hard":
        return (chosen_lr - 0.5 / beta) ** 2 + (rejected_lr + 0.5 / beta) ** 2
    if name == "aot":
        delta = (torch.sort(policy_chosen - policy_rejected, dim=0)[0]
                 - torch.sort(ref_chosen - ref_rejected, dim=0)[0])
        return _smoothed_sigmoid(beta * delta, eps)
    if name == "aot_unpaired":
        delta = torch.sort(chosen_lr, dim=0)[0] - torch.sort(rejected_lr, dim=0)[0]
        return _smoothed_sigmoid(beta * delta, eps)
    if name == "apo_zero":
        return 1 - torch.sigmoid(beta * chosen_lr) + torch.sigmoid(beta * rejected_lr)
    if name == "apo_down":
        return torch.sigmoid(beta * chosen_lr) + 1 - torch.sigmoid(beta * (chosen_lr - rejected_lr))
    if name == "discopop":
        modulation = torch.sigmoid(z / discopop_tau)
        return -F.logsigmoid(z) * (1 - modulation) + torch.exp(-z) * modulation
    raise ValueError(f"unknown loss {name!r}")


def dpo_losses(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
               ref_rejected: torch.Tensor, *, beta: float, loss: str = "sigmoid", label_smoothing: float = 0.0,
               chosen_tokens: torch.Tensor | None = None, rejected_tokens: torch.Tensor | None = None,
               **options) -> torch.Tensor:
    """Per-pair losses of one pair-level loss, shape (B,). All inputs are (B,) summed completion log-probs."""
    return pair_loss(loss, policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=beta,
                     label_smoothing=label_smoothing, chosen_tokens=chosen_tokens, rejected_tokens=rejected_tokens,
                     **options)


def wpo_weights(chosen_wpo: torch.Tensor, rejected_wpo: torch.Tensor) -> torch.Tensor:
    """WPO's pair weight w_w·w_l from the per-completion means of log p − log Σ_v p_v² (no gradient)."""
    return torch.exp(chosen_wpo.detach()) * torch.exp(rejected_wpo.detach())


def pair_losses(spec: LossSpec, policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                ref_rejected: torch.Tensor, *, chosen_tokens: torch.Tensor, rejected_tokens: torch.Tensor,
                real: torch.Tensor | None = None, pair_weights: torch.Tensor | None = None) -> torch.Tensor:
    """The weighted sum of the pair-level terms of `spec` (every term but `sft`), shape (B,), 0 where not `real`.

    `real`: (B,) bool, the pairs that count (FullBatches' weight-0 padding copies do not): the sorting losses sort
    only those. `pair_weights`: the WPO weights (B,), or None. The sum over the pairs is the micro-batch's share; its
    mean over the real pairs equals TRL's `loss` (without `sft`) on the same pairs."""
    if real is None:
        real = torch.ones(policy_chosen.shape, dtype=torch.bool, device=policy_chosen.device)
    total = torch.zeros_like(policy_chosen)
    kw = dict(beta=spec.beta, label_smoothing=spec.label_smoothing, f_divergence_type=spec.f_divergence_type,
              f_alpha_divergence_coef=spec.f_alpha_divergence_coef, discopop_tau=spec.discopop_tau)
    for name, weight in spec.pair_terms:
        if name in SORTING_LOSSES:
            index = real.nonzero().squeeze(-1)
            values = pair_loss(name, *(t.index_select(0, index) for t in (policy_chosen, policy_rejected,
                                                                          ref_chosen, ref_rejected)), **kw)
            values = torch.zeros_like(policy_chosen).index_put((index,), values)
        else:
            values = pair_loss(name, policy_chosen, policy_rejected, ref_chosen, ref_rejected,
                               chosen_tokens=chosen_tokens, rejected_tokens=rejected_tokens, **kw)
        total = total + weight * values
    if pair_weights is not None:
        total = total * pair_weights
    return torch.where(real, total, torch.zeros_like(total))


def loss_at_equal_models(loss, beta: float, label_smoothing: float = 0.0, *, weights=None,
                         nll: float | None = None) -> float:
    """The loss when target == reference (every log-ratio 0), for one loss or a list with `weights`.

    sDPO checks this at update 0 of every step, where the target starts as the reference; a mismatch means the
    reference log-probs were computed on other tokens or another model. The f-divergence scores and LD-DPO's
    weighting are 0 / equal at log-ratio 0, so they change nothing here. `sft` is data-dependent: `nll` is the
    mean NLL per chosen token of the reference on the same pairs (what the policy gives at update 0)."""
    eps, total = label_smoothing, 0.0
    for name, weight in loss_terms(loss, weights):
        if name in ("sigmoid", "robust", "aot", "aot_unpaired", "sigmoid_norm"):
            value = math.log(2.0)
        elif name in ("hinge", "apo_zero", "apo_down"):
            value = 1.0
        elif name == "ipo":
            value = (1 / (2 * beta)) ** 2
        elif name == "exo_pair":  # ½(−ln 2 − ln(1−ε)) + ½(−ln 2 − ln ε)
            value = -math.log(2.0) - 0.5 * math.log(eps * (1 - eps))
        elif name in ("nca_pair", "bco_pair"):
            value = 2 * math.log(2.0)
        elif name == "sppo_hard":
            value = 2 * (0.5 / beta) ** 2
        elif name == "discopop":  # modulation σ(0) = ½ between ln 2 and e^0 = 1, whatever τ
            value = (math.log(2.0) + 1.0) / 2
        elif name == "sft":
            if nll is None:
                raise ValueError("sft's value at equal models is the reference's NLL per chosen token: pass nll")
            value = nll
        else:
            raise ValueError(f"unknown loss {name!r}; one of {', '.join(LOSSES)}")
        total += weight * value
    return total
