#!/usr/bin/env bash
# sdpo vs TRL 1.16 DPOTrainer on the lent GPU machine (python -m bench.gpu; docs/performance.md "GPU"), in one device
# call of under 5 minutes: a 0.5B Qwen2-shaped model, bf16 autocast, tokens/s, peak GPU memory and MFU per variant.
#
# 1. Here, in the repo root (no GPU needed; once per checkout, again after the venv's versions change):
#        make gpu-wheels          # .whl/ (git-ignored, 17.5 MB): trl, datasets, dill, multiprocess, fsspec,
#                                 # omegaconf, transformers, regex, peft at this venv's versions, Python 3.12 x86-64
# 2. The device call (the `run` tool), from a session whose task has a GPU (`status`: can_start_another true):
#        command:   bash bench/gpu.sh
#        carry:     [".whl"]
#        timeout_s: 420
#    It ends by itself within GPU_BENCH_BUDGET (default: 285 s from its start, wheel install included); variants
#    that would start too late are skipped and named. Then give_back, unless you rerun at once.
# Output: the table and a final `RESULT gpu ...` line in output_tail; $OUT/gpu_bench.json (every figure, per-update
# times), $OUT/gpu_bench.out (this console) and $OUT/gpu_bench_workers.log (each variant's own log) come back.
# Arguments go to bench.gpu, e.g. `bash bench/gpu.sh --only sdpo,sdpo_compile` or `--batch 8 --updates 40`.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
ROOT=$(pwd)
PY=${PYTHON:-python3}
start=$(date +%s)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv,noheader || {
  echo "gpu.sh: nvidia-smi failed: no GPU here (on CPU: python -m bench.gpu --smoke)"; exit 2; }

if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "gpu.sh: installing the carried wheels failed"; exit 3; }
  export PYTHONPATH=/tmp/site:$ROOT${PYTHONPATH:+:$PYTHONPATH}
else
  echo "gpu.sh: no .whl/ here (make gpu-wheels, then carry [\".whl\"]): using the installed packages"
  export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
fi

# what runs: versions, and the two requirements the wheels cannot meet (pyarrow is too large to carry)
"$PY" - <<'EOF' || exit 4
import importlib.metadata as m, sys
names = ("torch", "transformers", "trl", "datasets", "accelerate", "pyarrow", "fsspec", "huggingface_hub",
         "tokenizers", "safetensors", "omegaconf", "flash_attn")
def version(n):
    try:
        return m.version(n)
    except m.PackageNotFoundError:
        return "-"
print("gpu.sh: " + ", ".join(f"{n} {version(n)}" for n in names), flush=True)
import torch
if not torch.cuda.is_available():
    sys.exit("gpu.sh: torch sees no CUDA device")
if int(version("pyarrow").split(".")[0]) < 24:
    print("gpu.sh: WARNING: datasets 5.2 wants pyarrow >= 24; this machine's is older", flush=True)
import importlib
for module in ("trl", "sdpo_cli.split", "sdpo_cli.reflogp", "sdpo_cli.train", "bench.gpu"):  # fail now, not per run
    try:
        importlib.import_module(module)
    except Exception as e:
        sys.exit(f"gpu.sh: import {module} failed: {type(e).__name__}: {e} (a package to add to GPU_WHEEL_PKGS?)")
EOF

budget=${GPU_BENCH_BUDGET:-$((285 - ($(date +%s) - start)))}
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  "$PY" -m bench.gpu --budget "$budget" "$@" 2>&1 | tee "$OUT/gpu_bench.out"
else
  "$PY" -m bench.gpu --budget "$budget" "$@"
fi
