"""Draw the demo's Fig. 3 analogue: the loss of sDPO step 2 with the target initialised from M_1 (sDPO's default,
dpo.target_init=previous) and from S (dpo.target_init=base), the reference being M_1 in both.

Run as: python demo/ablation_plot.py [RUN_DIR [ABLATION_RUN_DIR [OUT_PNG]]]
        defaults: runs/demo runs/demo-ablation runs/demo/reports/ablation_target_init.png  (make demo-ablation)

From M_1 the target equals the reference at update 0, so the loss starts at ln 2. From S it does not: the update-0
loss is mean −log σ(β (γ_S − γ_{M_1})) over the batch, above ln 2 because S prefers the chosen replies less than M_1.
"""

from __future__ import annotations

import sys
from pathlib import Path

from sdpo_cli.reports import plot_losses, read_log


def main(argv: list[str]) -> int:
    run = Path(argv[1] if len(argv) > 1 else "runs/demo")
    ablation = Path(argv[2] if len(argv) > 2 else "runs/demo-ablation")
    out = Path(argv[3] if len(argv) > 3 else run / "reports" / "ablation_target_init.png")
    logs = {"target from M_1 (previous)": run / "logs" / "train-step-2.jsonl",
            "target from S (base)": ablation / "logs" / "train-step-2.jsonl"}
    for path in logs.values():
        if not path.is_file():
            print(f"FAILED: {path} not found (run: make demo-ablation)", file=sys.stderr)
            return 1
    curves = {label: read_log(path) for label, path in logs.items()}
    plot_losses(curves, out, title="sDPO step 2 loss, π_ref = M_1: target init M_1 vs S (Fig. 3 analogue)")
    for label, records in curves.items():
        print(f"step 2, {label}: loss at update 0 = {records[0]['loss']:.4f}, at update {records[-1]['update']} = "
              f"{records[-1]['loss']:.4f}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
