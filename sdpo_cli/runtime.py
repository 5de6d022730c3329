"""How this process runs (the `runtime` config section): applied once per command, before any torch work.

`runtime.threads` sets torch's CPU threads (intra-op, `torch.set_num_threads`) of each process. Unset (null), it leaves
them alone: torch takes OMP_NUM_THREADS when that is set, else its own default (the number of physical cores it
finds). On a small shared CPU one thread is much faster for small models: docs/configs.md#runtime has the figures.
`runtime.head_chunk_mb` bounds the LM head's chunks (sdpo_cli/logprobs.py `head_chunk`) in bytes: that many MiB of
logits and their fp32 work copies at once. `runtime.prefix_attention` chooses how the prefix layout's attention runs
under sdpa (sdpo_cli/attention.py); the stages read it from the config. `runtime.mmap_threshold_mb` fixes glibc's
mmap threshold (mallopt M_MMAP_THRESHOLD): host allocations of that size or more are mapped and unmapped when freed.
glibc's default threshold adapts upwards to the largest block freed (up to 32 MiB), after which activations come
from the heap, and small tensors allocated between them keep the freed space from going back: at 8K tokens per
sequence that retained 0.5 GB of peak RSS (docs/performance.md, "Long pairs"). Costs CPU time in page faults of
fresh mappings (+12 % at 4K on the bench model); no effect on GPU memory or off glibc.
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
    if cfg.runtime.mmap_threshold_mb is not None:
        set_mmap_threshold(int(cfg.runtime.mmap_threshold_mb * MIB))
    threads = cfg.runtime.threads
    if threads is not None:
        import torch

        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
    return cfg


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def set_mmap_threshold(nbytes: int) -> bool:
    """glibc's mallopt(M_MMAP_THRESHOLD, nbytes); False (and nothing done) where the C library is not glibc."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(M_MMAP_THRESHOLD, nbytes)) if name and hasattr(libc, "mallopt") else False
    except OSError:
        return False
