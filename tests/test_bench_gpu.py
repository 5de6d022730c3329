"""bench/gpu.py, the GPU benchmark vs TRL, still runs end to end: its CPU smoke mode (tiny Qwen2, fp32, 3 updates)
goes through the same code paths as on the GPU (sdpo's stages, its train log, TRL's DPOTrainer with callbacks). It
times nothing; it fails when a change in sdpo or TRL breaks the benchmark before anyone has a GPU to notice."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_bench_smoke(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    env.pop("OUT", None)
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--smoke", "--workdir", str(tmp_path)],
                          capture_output=True, text=True, env=env, cwd=str(ROOT), timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    result = [line for line in proc.stdout.splitlines() if line.startswith("RESULT gpu ")]
    assert result, out[-3000:]
    assert "FAILED" not in proc.stdout and "\n  ! " not in proc.stdout, out[-3000:]  # no failed variant, no warning
    fields = dict(item.split("=", 1) for item in result[0].split()[2:])
    for key in ("sdpo_tok_s", "trl_default_tok_s", "trl_precompute_tok_s", "sdpo_vs_trl_default",
                "sdpo_vs_trl_precompute"):
        assert float(fields[key]) > 0, result[0]
    assert fields["sdpo_mfu"] == "n/a"  # no MFU on CPU
