"""How this process runs (the `runtime` config section): applied once per command, before any torch work.

`runtime.threads` sets torch's CPU threads (intra-op, `torch.set_num_threads`) of each process. Unset (null), it leaves
them alone: torch takes OMP_NUM_THREADS when that is set, else its own default (the number of physical cores it
finds). On a small shared CPU one thread is much faster for small models: docs/configs.md#runtime has the figures.
`runtime.head_chunk_mb` bounds the LM head's chunks (sdpo_cli/logprobs.py `head_chunk`) in bytes: that many MiB of
logits and their fp32 work copies at once. `runtime.prefix_attention` chooses how the prefix layout's attention runs
under sdpa (sdpo_cli/attention.py); the stages read it from the config.
None of it changes what is computed beyond float rounding, so it is in no fingerprint.
"""

from __future__ import annotations

from sdpo_cli.config import SdpoConfig

MIB = 1 << 20
head_chunk_bytes = 32 * MIB  # runtime.head_chunk_mb, as apply_runtime last set it


def apply_runtime(cfg: SdpoConfig) -> SdpoConfig:
    """Apply `cfg.runtime` to this process and return `cfg`. cli.py calls it right after loading the config; torch is
    imported only when there is something to set, so a command that fails on its config stays quick."""
    global head_chunk_bytes
    head_chunk_bytes = int(cfg.runtime.head_chunk_mb * MIB)
    threads = cfg.runtime.threads
    if threads is not None:
        import torch

        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
    return cfg
