"""sdpo vs TRL 1.16 DPOTrainer, measured (docs/performance.md).

    python -m bench.cpu [--quick]       # this machine's CPU (make bench)
    python -m bench.gpu [--smoke]       # one GPU (bash bench/gpu.sh on the lent machine; make bench-gpu)

bench.common holds what both share: worker processes, the sdpo stages run as the CLI runs them (the real
`sdpo_cli.train.run_train`, timed from its own train log), TRL's DPOTrainer with timing callbacks, and formatting.
Run from the repository root (or with it on PYTHONPATH); nothing here is installed with sdpo_cli.
"""
