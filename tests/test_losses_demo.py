"""`sdpo run configs/demo.yaml dpo.loss=X` for every loss X of TRL 1.16 (docs/losses.md), with what it needs, and
the modifiers: both sDPO steps train (train.max_updates=2) and pass the update-0 check, whose expected value is the
loss's own at target == reference (ln 2, 1, 1/(4β²), ...; `sft`: the reference's NLL per chosen token).

One run directory serves every case: the first run makes the split and step 1's reference log-probs, and each case
then redoes the stages its loss changes (`--redo-stale`: train step 1, reflogp and train step 2)."""

from __future__ import annotations

import json
import math

import pytest

from tests.conftest import ROOT
from tests.test_errors import run_in_process

CONFIG = ROOT / "configs" / "demo.yaml"
BETA = 0.1

CASES = [
    ("sigmoid", [], math.log(2)),
    ("hinge", [], 1.0),
    ("ipo", [], 1 / (4 * BETA**2)),
    ("exo_pair", ["dpo.label_smoothing=0.1"], -math.log(2) - 0.5 * math.log(0.1 * 0.9)),
    ("nca_pair", [], 2 * math.log(2)),
    ("robust", ["dpo.label_smoothing=0.1"], math.log(2)),
    ("bco_pair", [], 2 * math.log(2)),
    ("sppo_hard", [], 2 * (0.5 / BETA) ** 2),
    ("aot", [], math.log(2)),
    ("aot_unpaired", [], math.log(2)),
    ("apo_zero", [], 1.0),
    ("apo_down", [], 1.0),
    ("discopop", [], (1 + math.log(2)) / 2),
    ("sft", [], None),  # the reference's NLL per chosen token: data-dependent
    ("sigmoid_norm", [], math.log(2)),
    ("[sigmoid,sft]", ["dpo.loss_weights=[1.0,0.5]"], None),
    ("[sigmoid,bco_pair]", ["dpo.loss_weights=[1.0,0.5]"], 2 * math.log(2)),
    ("sigmoid", ["dpo.ld_alpha=0.5"], math.log(2)),
    ("sigmoid", ["dpo.use_weighting=true"], None),  # ln 2 times the mean WPO pair weight
    ("sigmoid", ["dpo.f_divergence_type=alpha_divergence"], math.log(2)),
]
SEEN: list[tuple[str, int, float, float, float]] = []


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("demo-losses") / "run"


@pytest.mark.slow
@pytest.mark.parametrize("loss,extra,expected", CASES,
                         ids=[f"{loss}{'+' + '+'.join(e) if e else ''}" for loss, e, _ in CASES])
def test_demo_runs_and_passes_the_update_0_check(run_dir, loss, extra, expected):
    result = run_in_process("run", str(CONFIG), f"run_dir={run_dir}", f"dpo.loss={loss}", "train.max_updates=2",
                            "train.logging_every=1", *extra, "--redo-stale")
    assert result.returncode == 0, result.stderr
    assert "WARNING" not in result.stderr
    for step in (1, 2):
        first = json.loads((run_dir / "logs" / f"train-step-{step}.jsonl").read_text().splitlines()[0])
        assert first["update"] == 0 and first["check"] == "ok", first
        if expected is not None:
            assert first["check/expected_loss"] == pytest.approx(expected, abs=1e-9)
        assert first["loss"] == pytest.approx(first["check/expected_loss"], abs=1e-3)
        assert first["check/max_logp_diff_rel"] < 1e-3
        assert math.isfinite(first["loss"])
        SEEN.append((" ".join([loss, *extra]), step, first["loss"], first["check/expected_loss"],
                     first["check/max_logp_diff"]))
    words = "ln 2 check ok" if expected is not None and abs(expected - math.log(2)) < 1e-12 else "check ok"
    assert words in result.stderr


@pytest.mark.slow
def test_zz_report_update_0_values(capsys):
    """Prints what the cases saw (run with -s)."""
    if not SEEN:
        pytest.skip("no case ran")
    with capsys.disabled():
        print("\nloss | step | update-0 loss | expected | max |log π − log π_ref|")
        for name, step, loss, expected, peak in SEEN:
            print(f"{name} | {step} | {loss:.6f} | {expected:.6f} | {peak:.1e}")
