"""Check the paper's Fig. 2 ordering on the demo run: mean γ on D_2 rises S (base) < M_1 (step-1) < M_2 (step-2).

Run as: python demo/check.py [runs/demo/reports/gamma.json]      (written by `sdpo gamma configs/demo.yaml`)

Prints "OK: ..." and exits 0, or prints what it found and exits 1.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ORDER = ("base", "step-1", "step-2")


def check(results: list[dict]) -> tuple[bool, str]:
    means = {r["checkpoint"]: r["mean"] for r in results}
    data = {r.get("data") for r in results}
    missing = [c for c in ORDER if c not in means]
    if missing:
        return False, f"gamma.json lacks checkpoint(s) {missing}; found {sorted(means)}"
    if data != {"step-2"}:
        return False, f"γ was measured on {sorted(map(str, data))}, not on D_2 (step-2)"
    found = ", ".join(f"{c} {means[c]:.2f}" for c in ORDER)
    if not means["base"] < means["step-1"] < means["step-2"]:
        return False, f"mean γ on D_2 does not rise base < step-1 < step-2: {found}"
    return True, f"mean γ on D_2 rises base < step-1 < step-2 ({found}; paper: -38.60 < -25.10 < 84.35)"


def main(argv: list[str]) -> int:
    path = Path(argv[1] if len(argv) > 1 else "runs/demo/reports/gamma.json")
    if not path.is_file():
        print(f"FAILED: {path} not found (run: sdpo gamma configs/demo.yaml)", file=sys.stderr)
        return 1
    ok, message = check(json.loads(path.read_text()))
    print(("OK: " if ok else "FAILED: ") + message, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
