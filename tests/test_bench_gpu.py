"""bench.gpu, the GPU benchmark vs TRL, still runs end to end: its CPU smoke mode (tiny Qwen2, fp32, 3 updates) goes
through the same code paths as on the GPU (sdpo's real split / reflogp / train stages, its train log's token counts
and timing, TRL's DPOTrainer with callbacks). It times nothing; it fails when a change in sdpo or TRL breaks the
benchmark before anyone has a GPU to notice: a failed variant, a warning (the log's token counts disagreeing with the
step's data, rows tokenised differently, a failed ln 2 check) or a missing RESULT figure."""

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
    proc = subprocess.run([sys.executable, "-m", "bench.gpu", "--smoke", "--workdir", str(tmp_path)],
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


def test_bench_is_a_package_that_patches_nothing_of_sdpo():
    """bench/ imports its modules normally (nothing loaded by file path) and replaces no attribute of sdpo_cli: the
    sdpo rows time the code path users run."""
    import ast

    for path in sorted((ROOT / "bench").glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        sdpo_names = set()  # names bound to sdpo_cli modules or objects in this file
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                sdpo_names |= {(a.asname or a.name).split(".")[0] for a in node.names if a.name.startswith("sdpo_cli")}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sdpo_cli"):
                sdpo_names |= {a.asname or a.name for a in node.names}
            elif isinstance(node, ast.Attribute) and node.attr in ("spec_from_file_location", "run_path"):
                raise AssertionError(f"{path.name}:{node.lineno}: loads code by file path")
        for node in ast.walk(tree):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] \
                if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
            for target in targets:
                base = target
                while isinstance(base, ast.Attribute):
                    base = base.value
                assert not (target is not base and isinstance(base, ast.Name) and base.id in sdpo_names), \
                    f"{path.name}:{node.lineno}: assigns to an attribute of sdpo_cli ({ast.unparse(target)})"
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr" and \
                    node.args and isinstance(node.args[0], ast.Name) and node.args[0].id in sdpo_names:
                raise AssertionError(f"{path.name}:{node.lineno}: setattr on sdpo_cli")
