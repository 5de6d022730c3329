"""What the CPU and GPU benchmarks share.

- Worker processes: every measured configuration runs in a process of its own (`spawn`), which prints one
  `BENCH {json}` line (`emit`); its output goes to a log file, it is killed with its process group at its timeout.
- sdpo: `sdpo_stages` runs `split`, `reflogp --step t` and `train --step t` in the worker process as the commands run
  them (a freshly loaded config for each, then `run_split` / `run_reflogp` / `run_train` of sdpo_cli, nothing
  replaced or patched). Training is timed from the step's own train log (`log_figures`): each record holds the
  distinct tokens of the pairs it covers ("tokens") and their rate ("tokens/s"), so model loading, data
  preparation and the checkpoint save stay out of the figures, exactly as the log's own clock leaves them out;
  `LogClock` reads the process CPU time over the same window (the CPU bench's figures). The other stages are timed
  whole, around the call.
- TRL: `run_trl` drives DPOTrainer with DPOConfig defaults plus the shared settings, timed by a TrainerCallback
  (CUDA-synchronised) at train begin, every step end and train end; its reference precompute pass is timed around
  DPOTrainer._precompute_ref_logps.
- Token counts: distinct tokens P + C + R per pair (the prompt once), what sdpo's log counts; TRL's own count
  2P + C + R (the non-pad tokens of its [chosen; rejected] rows) beside it.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures"
LR = 1e-6
BETA = 0.1
MARK = "BENCH "


# ------------------------------------------------------------------------------------------------ worker processes
def env(threads: int) -> dict:
    """The environment of a worker: offline, quiet, `threads` BLAS/OpenMP threads, ROOT importable."""
    e = dict(os.environ)
    e.update({"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "HF_DATASETS_OFFLINE": "1",
              "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
              "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore",
              "TRANSFORMERS_VERBOSITY": "error"})
    e["PYTHONPATH"] = os.pathsep.join(x for x in (e.get("PYTHONPATH"), str(ROOT)) if x)
    return e


def emit(result: dict) -> None:
    print(MARK + json.dumps(result), flush=True)


def spawn(module: str, name: str, args: list[str], work: Path, threads: int, timeout: float, log: Path,
          extra_env: dict | None = None) -> dict | None:
    """`python -m module args --workdir work --threads threads` in its own process group, output to `log`; its last
    BENCH line as a dict, or None (printed: the reason and the log's last lines) when it failed or timed out."""
    cmd = [sys.executable, "-m", module, *args, "--workdir", str(work), "--threads", str(threads)]
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env={**env(threads), **(extra_env or {})},
                                cwd=str(ROOT), start_new_session=True)
        try:
            proc.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            print(f"  ! {name}: timed out after {timeout:.0f}s; last lines of {log}:\n{tail(log)}", flush=True)
            return None
    for line in log.read_text(errors="replace").splitlines()[::-1]:
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    print(f"  ! {name} failed (rc {proc.returncode}); last lines of {log}:\n{tail(log)}", flush=True)
    return None


def tail(path: Path, lines: int = 30) -> str:
    return "\n".join("    " + x for x in path.read_text(errors="replace").splitlines()[-lines:])


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def sync() -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def gpu_peak_gib() -> float | None:
    import torch

    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return None
    return torch.cuda.max_memory_allocated() / 2**30


def reset_gpu_peak() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def clock() -> tuple[float, float]:
    """(wall, process CPU) seconds, after the device has finished its queued work."""
    sync()
    return time.perf_counter(), time.process_time()


# ---------------------------------------------------------------------------------------------------------- tokens
def token_counts(pairs) -> dict:
    """Token counts of pairs (dicts with prompt_ids, chosen_ids, rejected_ids)."""
    p = sum(len(x["prompt_ids"]) for x in pairs)
    c = sum(len(x["chosen_ids"]) for x in pairs)
    r = sum(len(x["rejected_ids"]) for x in pairs)
    return {"pairs": len(pairs), "distinct": p + c + r, "trl": 2 * p + c + r, "completion": c + r}


def throughput(seconds: list[float], tokens: list[float], pairs: list[int], warmup: int,
               trl_tokens: list[float] | None = None) -> dict:
    """Figures over the updates after the first `warmup` (at least the last update is kept); one entry per update."""
    n = min(len(seconds), len(tokens), len(pairs))
    first = min(warmup, max(n - 1, 0))
    s, tok, prs = sum(seconds[first:n]), sum(tokens[first:n]), sum(pairs[first:n])
    trl = sum(trl_tokens[first:n]) if trl_tokens is not None else None
    return {"updates_measured": n - first, "first_measured_update": first, "seconds": s, "tokens": tok, "pairs": prs,
            "tok_s": tok / s if s > 0 else None, "trl_tok_s": trl / s if s > 0 and trl is not None else None,
            "pairs_per_s": prs / s if s > 0 else None, "s_per_update": s / max(n - first, 1),
            "all_updates_tok_s": sum(tokens[:n]) / max(sum(seconds[:n]), 1e-9),
            "update_seconds": [round(x, 4) for x in seconds[:n]]}


# ------------------------------------------------------------------------------------------------------------ sdpo
def warm_imports(model_dir: Path) -> None:
    """Import what the stages import on first use (datasets, accelerate, the model's transformers class), so that a
    timed stage measures its work, not first imports (TRL's timed windows also start after its imports)."""
    import accelerate  # noqa: F401
    import datasets  # noqa: F401
    import transformers

    for arch in json.loads((model_dir / "config.json").read_text()).get("architectures") or []:
        getattr(transformers, arch, None)


class LogClock:
    """Watches the train log from a second thread and notes (wall, process CPU) seconds when the file appears and when
    each record line lands. sdpo's loop opens the log right where it starts the clock of its records and writes a
    record after each logged update, so the stamps bracket the very window the records time, and also give its CPU
    time (the process's, less the watcher's own), which other processes on a shared machine inflate far less than
    wall time. The stamps lag the events by at most a poll period (5 ms) plus a GIL hand-over (torch releases the GIL
    in its kernels); the CPU benchmark checks the window against the records' own seconds."""

    def __init__(self, path: Path, period: float = 0.005):
        import threading

        self.path, self.period = path, period
        self.opened: tuple[float, float] | None = None
        self.records: list[tuple[float, float]] = []
        self._offset = 0
        self._own_cpu = 0.0  # this watcher thread's CPU seconds so far
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> LogClock:
        if self.path.exists():
            raise SystemExit(f"{self.path} exists already: LogClock needs a fresh run directory")
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._poll()

    def _watch(self) -> None:
        while not self._stop.wait(self.period):
            self._poll()
            self._own_cpu = time.thread_time()

    def _poll(self) -> None:
        try:
            size = os.stat(self.path).st_size
        except FileNotFoundError:
            return
        # the process's CPU time less the watcher thread's own (as of its last poll): what the training used
        now = (time.perf_counter(), time.process_time() - self._own_cpu)
        if self.opened is None:
            self.opened = now
        if size > self._offset:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                chunk = f.read(size - self._offset)
            complete = chunk.rfind(b"\n") + 1  # whole lines only; a partial one is read at the next poll
            self.records += [now] * chunk[:complete].count(b"\n")
            self._offset += complete

    def window(self) -> dict:
        """Wall and CPU seconds from the log's creation to each record, and per record."""
        if self.opened is None or not self.records:
            return {"wall_s": None, "cpu_s": None, "update_cpu_s": []}
        marks = [self.opened, *self.records]
        return {"wall_s": marks[-1][0] - marks[0][0], "cpu_s": marks[-1][1] - marks[0][1],
                "update_cpu_s": [round(b[1] - a[1], 4) for a, b in zip(marks, marks[1:])]}



def write_sdpo_inputs(folder: Path, rows: list[dict], model_dir: Path, *, max_length: int, train: dict,
                      inference_batch: int, run_name: str = "default") -> None:
    """folder/rows.json (the pairs with their token ids), folder/rows.jsonl (the same rows as a `preference` source,
    which sdpo tokenises itself) and folder/sdpo.yaml: the benchmarks' config (fp32, sdpa, split random [1.0], prefix
    layout, length grouping, lr LR linear without warm-up, clip 1.0, β BETA, logging every update, no resumable
    states), `train` adding or overriding train keys (the length of a step, the batch)."""
    import yaml

    (folder / "rows.json").write_text(json.dumps(rows))
    (folder / "rows.jsonl").write_text("".join(json.dumps({k: r[k] for k in ("prompt", "chosen", "rejected")}) + "\n"
                                               for r in rows))
    cfg = {"run_dir": str(folder / "runs" / run_name), "seed": 0,
           "model": {"base": str(model_dir), "dtype": "float32", "attn_implementation": "sdpa"},
           "data": {"sources": [{"name": "uf", "path": str(folder / "rows.jsonl"), "format": "preference"}],
                    "max_length": max_length},
           "split": {"strategy": "random", "fractions": [1.0]},
           "dpo": {"beta": BETA},
           "train": {"learning_rate": LR, "lr_schedule": "linear", "warmup_ratio": 0.0, "gradient_accumulation": 1,
                     "max_grad_norm": 1.0, "layout": "prefix", "group_by_length": True, "logging_every": 1,
                     "save_every": 0, **train},
           "inference": {"batch_size": inference_batch}}
    (folder / "sdpo.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))


def sdpo_stages(config: Path, overrides: list[str], *, step: int = 1, clock_log: bool = False,
                extra_reflogp: dict[str, list[str]] | None = None) -> tuple[object, dict]:
    """`sdpo split`, `sdpo reflogp --step t`, `sdpo train --step t` in this process, each as its command runs it: the
    config loaded afresh from the file and the key=value overrides, then the stage's function with force=True
    (a fresh run directory is expected). Then each of `extra_reflogp` (name -> more overrides): reflogp again, e.g. at
    another inference batch size, after train has read the step's reference log-probs. Returns (the config, per stage
    {wall_s, cpu_s, peak_gpu_gib (the stage's), peak_rss_mb (the process's so far)}); `runtime.*` is applied as the
    CLI applies it (runtime.threads stays null: the worker has set its torch threads); with clock_log, the train
    stage's entry also holds "log_clock": `LogClock.window()` of its train log. typer and the console entry point are
    left out: the lent GPU machine's typer is not the one sdpo pins."""
    import contextlib

    from sdpo_cli.config import load_config
    from sdpo_cli.reflogp import run_reflogp
    from sdpo_cli.rundir import RunDir
    from sdpo_cli.runtime import apply_runtime
    from sdpo_cli.split import run_split
    from sdpo_cli.train import run_train

    stages: dict[str, dict] = {}

    def stage(name: str, run, *args, more: tuple[str, ...] = ()):
        cfg = apply_runtime(load_config(config, [*overrides, *more]))  # runtime.*, as cli.py applies it
        watch = LogClock(RunDir(cfg.run_dir).train_log(step)) if clock_log and run is run_train else None
        reset_gpu_peak()
        with watch or contextlib.nullcontext():
            t0, c0 = clock()
            run(cfg, *args, force=True)
            t1, c1 = clock()
        stages[name] = {"wall_s": t1 - t0, "cpu_s": c1 - c0, "peak_gpu_gib": gpu_peak_gib(),
                        "peak_rss_mb": peak_rss_mb()}
        if watch is not None:
            stages[name]["log_clock"] = watch.window()
        return cfg

    stage("split", run_split)
    stage("reflogp", run_reflogp, step)
    cfg = stage("train", run_train, step)
    for name, more in (extra_reflogp or {}).items():
        stage(name, run_reflogp, step, more=tuple(more))
    return cfg, stages


def train_log(cfg, step: int) -> list[dict]:
    """The records of logs/train-step-t.jsonl."""
    from sdpo_cli.rundir import RunDir

    path = RunDir(cfg.run_dir).train_log(step)
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def log_figures(records: list[dict], warmup: int, trl_per_distinct: float | None = None) -> dict:
    """Throughput from the train log alone. A record covers the updates since the previous record: "pairs" and
    "tokens" (distinct tokens of those real pairs) count them, "tokens/s" is tokens over the seconds the loop took for
    them by its own clock (time from the previous record, or from the loop's start; data loading included, model
    loading, set-up and the checkpoint save not). The bench asks for a record per update (train.logging_every=1).
    trl_per_distinct: the step's (2P + C + R) / (P + C + R), to show a TRL-count rate beside the distinct one."""
    lacking = sorted({k for r in records for k in ("update", "pairs", "tokens", "tokens/s") if k not in r})
    if lacking:
        raise SystemExit(f"the train log's records lack {lacking}: this sdpo_cli logs no per-record token counts")
    if [r["update"] for r in records] != list(range(len(records))):
        raise SystemExit("the train log has no record for every update: run train with train.logging_every=1")
    seconds = [r["seconds"] if "seconds" in r else r["tokens"] / r["tokens/s"] for r in records]
    tokens = [r["tokens"] for r in records]
    trl = [t * trl_per_distinct for t in tokens] if trl_per_distinct else None
    return throughput(seconds, tokens, [r["pairs"] for r in records], warmup, trl)


def step_pairs(cfg, step: int) -> list[dict]:
    """data/step-t's token ids (what the step trains on), to cross-check the log's counts."""
    import datasets

    from sdpo_cli.rundir import RunDir

    ds = datasets.load_from_disk(str(RunDir(cfg.run_dir).data(step)))
    return [{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r}
            for p, c, r in zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"])]


def same_pairs(a: list[dict], b: list[dict]) -> int:
    """How many pairs of `a` have no identical pair (prompt, chosen and rejected ids) in `b` (order ignored)."""
    from collections import Counter

    def key(x):
        return tuple(x["prompt_ids"]), tuple(x["chosen_ids"]), tuple(x["rejected_ids"])

    return sum((Counter(map(key, a)) - Counter(map(key, b))).values())


# ------------------------------------------------------------------------------------------------------------- TRL
def run_trl(work: Path, texts: list[dict], ids: list[dict], *, batch: int, max_length: int, updates: int,
            precompute: bool, cuda: bool, logging_steps: int = 1) -> dict:
    """TRL 1.16's DPOTrainer on `texts` (standard rows: prompt, chosen, rejected) and the model folder work/model:
    DPOConfig defaults (gradient checkpointing, live reference model, fused AdamW) plus the shared settings; fp32 on
    CPU (use_cpu=True), bf16 autocast on CUDA. `ids`: our tokenisation of the same rows, to check TRL's.

    Returns the clocks (wall, process CPU) at train begin, at every step end and at train end, the token counts of
    every batch TRL collated (its collator is wrapped; one batch = one update), the reference pass's time
    (precompute=True), and the checks."""
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    rss_imports = peak_rss_mb()
    out = tempfile.mkdtemp(prefix="trl-bench-", dir=str(work))
    args = DPOConfig(output_dir=out, per_device_train_batch_size=batch, max_length=max_length, learning_rate=LR,
                     beta=BETA, max_steps=updates, bf16=cuda, use_cpu=not cuda, report_to=[], save_strategy="no",
                     logging_steps=logging_steps, seed=0, dataloader_num_workers=0, disable_tqdm=True,
                     precompute_ref_log_probs=precompute)

    ref = {"wall_s": 0.0, "cpu_s": 0.0}
    original = DPOTrainer._precompute_ref_logps

    def timed(self, *a, **k):
        t0, c0 = clock()
        try:
            return original(self, *a, **k)
        finally:
            t1, c1 = clock()
            ref["wall_s"] += t1 - t0
            ref["cpu_s"] += c1 - c0

    DPOTrainer._precompute_ref_logps = timed
    model_dir = str(work / "model")
    t0 = time.perf_counter()
    trainer = DPOTrainer(model=model_dir, args=args, train_dataset=Dataset.from_list(texts),
                         processing_class=AutoTokenizer.from_pretrained(model_dir))
    init_s = time.perf_counter() - t0
    init_peak = gpu_peak_gib()

    batches: list[dict] = []
    collator = trainer.data_collator

    def counting_collator(examples):
        batches.append(token_counts(examples))
        return collator(examples)

    trainer.data_collator = counting_collator
    stamps: list[tuple[float, float]] = []
    end: dict = {}

    class Timer(TrainerCallback):
        def on_train_begin(self, *a, **k):
            reset_gpu_peak()
            stamps.append(clock())

        def on_step_end(self, *a, **k):
            stamps.append(clock())

        def on_train_end(self, *a, **k):
            end["clock"] = clock()
            end["peak"] = gpu_peak_gib()

    trainer.add_callback(Timer())
    trainer.train()
    steps = trainer.state.global_step
    prepared = trainer.train_dataset
    mismatch = sum(prepared[i]["prompt_ids"] != r["prompt_ids"] or prepared[i]["chosen_ids"] != r["chosen_ids"]
                   or prepared[i]["rejected_ids"] != r["rejected_ids"] for i, r in enumerate(ids))
    logs = [h for h in trainer.state.log_history if "loss" in h]
    trl_num_tokens = getattr(trainer, "_total_train_tokens", None)
    shutil.rmtree(out, ignore_errors=True)
    return {"updates": steps, "stamps": stamps, "end": end.get("clock"), "batches": batches[:steps],
            "ref_wall_s": ref["wall_s"] if precompute else None, "ref_cpu_s": ref["cpu_s"] if precompute else None,
            "init_s": init_s, "token_mismatch_rows": mismatch,
            "first_loss": logs[0]["loss"] if logs else None, "last_loss": logs[-1]["loss"] if logs else None,
            "trl_num_tokens": trl_num_tokens,
            "peak_gpu_gib": end.get("peak"),
            "process_peak_gpu_gib": max((x for x in (init_peak, end.get("peak")) if x is not None), default=None),
            "rss_after_imports_mb": rss_imports, "peak_rss_mb": peak_rss_mb()}


# ------------------------------------------------------------------------------------------------------ formatting
def fmt(x, digits: int = 0, pct: bool = False) -> str:
    """For tables: thousands separators, n/a for missing."""
    if x is None or (isinstance(x, float) and x != x):
        return "n/a"
    return f"{100 * x:.1f}%" if pct else f"{x:,.{digits}f}"


def num(x, digits: int = 2, missing: str = "n/a") -> str:
    """For RESULT lines: a plain number a parser reads back, or `missing`."""
    if x is None or (isinstance(x, float) and x != x):
        return missing
    return f"{x:.{digits}f}"
