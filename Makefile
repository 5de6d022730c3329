# sdpo — stepwise DPO (sDPO) from the command line.
#   make demo            run sDPO end to end on the embedded demo (demo/: no download), print mean γ on D_2
#                        and check the paper's ordering base < step-1 < step-2 (~30 s on 2 CPU cores)
#   make demo-ablation   redo step 2 from S (dpo.target_init=base) and plot both step-2 losses (paper Fig. 3)
#   make demo-build      rebuild the committed demo assets (demo/model, demo/data) with demo/build.py
#   make test            run the test suite
# Both create or reuse .venv; torch is installed as a CPU build only where no torch is present.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
export HF_HUB_OFFLINE ?= 1
export HF_HUB_DISABLE_TELEMETRY ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install test test-fast lint demo demo-ablation demo-build clean

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# A bare `torch` requirement would pull a multi-GB CUDA build: take the CPU build where none is present.
	@#   (GPU users: install your torch into $(VENV) first, or point VENV at an environment that has it.)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dev]"
	@touch $@

install: $(VENV)/.installed

# TEST_WORKERS pytest processes (pytest-xdist), each test module on one of them (its module fixtures built once);
# one torch thread per process, as the tests' own processes use. --durations: the slowest tests at the end of every
# run (CI's log too), to keep `make test` near 20 minutes.
TEST_WORKERS ?= 2
test test-fast: export OMP_NUM_THREADS ?= 1
test: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadscope --durations=15

test-fast: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadscope -m "not slow"

# Chaos (docs/reliability.md): CHAOS_KILLS seeded random SIGKILLs (SDPO_CHAOS_SEED, default 0) over `sdpo run` of the
# demo, spread over the split, reflogp, training, state saves and checkpoint writes, a rerun after each; the end must
# be bit-identical to an uninterrupted run. Prints every kill and the stage it hit (~3 min for 20 on 2 CPU cores).
# `make test` runs the same test with 5 kills.
CHAOS_KILLS ?= 20
.PHONY: chaos
chaos: install
	SDPO_CHAOS_KILLS=$(CHAOS_KILLS) OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest -q -s tests/test_chaos.py

lint: install
	$(VENV)/bin/ruff check sdpo_cli tests bench demo

# ---- the embedded demo: S = demo/model (0.43M-parameter Llama), D_1 = orca-schema pairs, D_2 = ultrafeedback-schema
DEMO_CONFIG ?= configs/demo.yaml
DEMO_RUN    ?= runs/demo
DEMO_ABL    ?= runs/demo-ablation
SDPO        := $(VENV)/bin/sdpo
# One thread per process: on a shared 2-core machine torch's default two threads make the tiny demo ~5x slower.
demo demo-ablation demo-build: export OMP_NUM_THREADS ?= 1

# A fresh run every time (~20 s): a rerun never trips over artifacts that an older sdpo or config left behind.
demo: install
	rm -rf $(DEMO_RUN)
	$(SDPO) run $(DEMO_CONFIG) run_dir=$(DEMO_RUN)
	$(SDPO) gamma $(DEMO_CONFIG) run_dir=$(DEMO_RUN) --plot $(DEMO_RUN)/reports/gamma.png
	@$(PY) demo/check.py $(DEMO_RUN)/reports/gamma.json

# Step 2 again with the target initialised from S instead of M_1 (the reference stays M_1), in a copy of the demo
# run without M_2: `sdpo run` finds split, reflogp and step 1 finished (they do not depend on dpo.target_init, which
# only changes where step 2 starts) and trains step 2 alone.
demo-ablation: demo
	rm -rf $(DEMO_ABL)
	cp -r $(DEMO_RUN) $(DEMO_ABL)
	rm -rf $(DEMO_ABL)/checkpoints/step-2 $(DEMO_ABL)/logs/train-step-2.jsonl $(DEMO_ABL)/reports
	$(SDPO) run $(DEMO_CONFIG) run_dir=$(DEMO_ABL) dpo.target_init=base
	$(PY) demo/ablation_plot.py $(DEMO_RUN) $(DEMO_ABL) $(DEMO_RUN)/reports/ablation_target_init.png

demo-build: install
	$(PY) demo/build.py

clean:
	rm -rf runs/demo runs/demo-ablation .pytest_cache

# sdpo vs TRL 1.16 DPOTrainer on this machine's CPU (docs/performance.md; bench/ is a package run from the repo root:
# python -m bench.cpu); the sdpo rows run sdpo_cli's own split / reflogp / train. BENCH_ARGS=--quick for a smoke run
.PHONY: bench
bench: install
	$(PY) -m bench.cpu $(BENCH_ARGS)

# Long pairs (issue 16; docs/performance.md "Long pairs"): sdpo's CLI vs TRL 1.16 at 1K, 4K and 8K tokens per sequence,
# peak RSS of the whole command, CPU-s per update, longest pair within 4 GiB (bisected); runs/bench-long/bench_long.json
# and docs/img/bench_long_memory.png. About 70 min on 2 shared cores; BENCH_LONG_ARGS=--quick for a smoke run (< 2 min),
# e.g. BENCH_LONG_ARGS="--lengths 1024,4096 --no-search"
.PHONY: bench-long
bench-long: install
	OMP_NUM_THREADS=1 $(PY) -m bench.long $(BENCH_LONG_ARGS)

# ---- sdpo vs TRL on the lent GPU machine (bench/gpu.sh runs python -m bench.gpu; docs/performance.md "GPU"). That
# machine has torch, accelerate, pyarrow, ... but no trl, datasets (+ dill, multiprocess, its fsspec) or omegaconf,
# and an older transformers (+ regex; peft to match it). `make gpu-wheels` downloads these at this venv's versions as
# Python 3.12 x86-64 wheels into .whl/ (git-ignored, ~17 MB; the carried tree must stay under 64 MiB) for the device
# call to carry. bench-gpu runs the benchmark where a GPU and the packages are at hand; BENCH_GPU_ARGS=--smoke checks
# its code paths on CPU (~45 s).
GPU_WHEEL_PKGS ?= trl datasets dill multiprocess fsspec omegaconf transformers regex peft
.PHONY: gpu-wheels bench-gpu
gpu-wheels: install
	rm -rf .whl && mkdir -p .whl
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
	  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
	  $$($(PY) -c "import sys, importlib.metadata as m; print(*[f'{n}=={m.version(n)}' for n in sys.argv[1:]])" \
	     $(GPU_WHEEL_PKGS))
	@ls -1 .whl && du -ch .whl/*.whl | tail -1

bench-gpu: install
	$(PY) -m bench.gpu $(BENCH_GPU_ARGS)
