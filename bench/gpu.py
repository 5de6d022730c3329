"""sdpo vs TRL 1.16 DPOTrainer on one GPU: a 0.5B Qwen2-shaped model, bf16 autocast, the same synthetic rows.

    bash bench/gpu.sh                       # on the lent GPU machine: installs the carried wheels, runs this
    python -m bench.gpu                     # the same, where sdpo_cli, trl and datasets are importable
    python -m bench.gpu --smoke             # CPU smoke run: tiny Qwen2, fp32, 3 updates; checks the code paths

Setup (docs/performance.md, "GPU"):
  model     Qwen2 built from a config shaped like Qwen2.5-0.5B (hidden 896, 24 layers, 14 heads / 2 KV heads, MLP 4864,
            vocab 151936, tied embeddings, rope_theta 1e6): 494.0M parameters, random init (seed 0), saved as fp32
            safetensors. Tokenizer: a Qwen2 byte-level BPE of the same vocabulary size, built here (no hub access),
            in which every 3-letter word after a space (" abc") is one token, so synthetic text maps 1:1 to ids.
  rows      updates x batch synthetic pairs (seed 0): prompt, chosen and rejected lengths each drawn from a log-normal
            (median 160 tokens) clipped to [50, 400]; + EOS on each reply. P + max(C, R) < max_length 1024, so nobody
            truncates. TRL's standard text rows ({prompt, chosen, rejected}); sdpo reads the same JSONL (format
            preference) and tokenises it TRL's way (checked: its data/step-1 holds exactly our ids).
  precision fp32 weights and AdamW state, bf16 autocast on both sides: sdpo model.dtype=float32 +
            train.mixed_precision=bf16; TRL bf16=True (it loads a model path in float32 by default).
  sdpo      the real code path (bench.common.sdpo_stages): sdpo_cli's run_split, run_reflogp --step 1 and run_train
            --step 1 in one process, each with the config loaded as its command loads it (file + key=value
            overrides), with train.layout prefix, group_by_length, logging_every 1, max_updates U, lr 1e-6 linear, no
            warm-up, clip 1.0, beta 0.1. Throughput comes from logs/train-step-1.jsonl alone: per update "tokens"
            (distinct tokens) and "tokens/s" by the loop's own clock, updates < --warmup excluded. The reference
            pass is the whole reflogp stage (model load included), CUDA-synchronised. Variants with
            train.compile=true and train.layout=packed run when this sdpo has those switches (packed with
            flash_attention_2 where flash_attn is installed, else flex_attention: sdpa would be dense).
  TRL       DPOTrainer with DPOConfig defaults (gradient checkpointing on, live reference model) and with
            precompute_ref_log_probs=True; same batch, max_length, lr, schedule, beta and updates. Per-update time
            from a TrainerCallback (CUDA-synchronised at every step end), updates < --warmup excluded.
  tokens    distinct tokens P + C + R per pair (prompt counted once) for both systems: tokens/s and MFU =
            6 * N * tokens/s / peak, N = parameters with the tied embedding counted once (also shown with N without
            the embedding), peak = $PEAK_TFLOPS (default 989 TFLOP/s, H100/H200 SXM bf16 dense). TRL's own count
            (2P + C + R: the non-pad tokens of its [chosen; rejected] rows) is shown too (sdpo's: its rate scaled by
            the step's (2P + C + R) / (P + C + R)).
  memory    torch.cuda.max_memory_allocated of the training process: sdpo's train stage, TRL's train() (its resident
            models included); sdpo's reflogp stage and TRL's whole process separately.

Every variant runs in its own subprocess with a timeout inside a total --budget, so one failure or hang does not lose
the others; each result is printed as it comes and written to $OUT/gpu_bench.json when $OUT is set.

Last line: RESULT gpu device=... <variant>_tok_s=... <variant>_mfu=... <variant>_mem_gib=... sdpo_vs_trl_default=...
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import importlib.util
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

from bench.common import (
    BETA,
    LR,
    emit,
    fmt,
    log_figures,
    peak_rss_mb,
    run_trl,
    same_pairs,
    sdpo_stages,
    spawn,
    step_pairs,
    throughput,
    token_counts,
    train_log,
    warm_imports,
)

PEAK_TFLOPS_DEFAULT = 989.0  # H100 / H200 SXM, bf16 dense, no sparsity

# the model's shape for the real run and for the CPU smoke run
QWEN2_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6,
                 rms_norm_eps=1e-6, tie_word_embeddings=True)
TINY = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, rope_theta=1e6, rms_norm_eps=1e-6,
            tie_word_embeddings=True)
EOS, PAD = "<|endoftext|>", "<|pad|>"


@dataclasses.dataclass
class Setup:
    smoke: bool
    updates: int
    batch: int
    warmup: int
    max_length: int
    lengths: tuple[int, int, int]  # (min, median, max) tokens of a prompt or a reply

    @property
    def rows(self) -> int:
        return self.updates * self.batch


def _setup(a) -> Setup:
    if a.smoke:
        return Setup(True, a.updates or 3, a.batch or 2, 1 if a.warmup is None else a.warmup, 128, (8, 20, 40))
    return Setup(False, a.updates or 30, a.batch or 16, 5 if a.warmup is None else a.warmup, 1024, (50, 160, 400))


# ----------------------------------------------------------------------------------------------------------- prep
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (ByteLevel pre-tokenizer)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + \
        list(range(ord("\xae"), ord("\xff") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _tokenizer(vocab_size: int):
    """A Qwen2 tokenizer (byte-level BPE, Qwen's split pattern) of exactly `vocab_size` ids in which every word of k
    lowercase letters after a space (" abc") is ONE token: the vocabulary holds the 256 byte symbols, "Ġ" + every
    string of 1..k letters (each merge adds one letter), EOS and PAD, then unused fillers. Qwen2Tokenizer is what
    transformers 5 loads for a qwen2 model folder whatever tokenizer.json says, so the tokenizer is built as one.
    Returns (tokenizer, [(word, id)] of the k-letter words, eos id)."""
    import itertools
    import string

    from transformers import Qwen2Tokenizer

    symbols = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(symbols)}
    merges = []
    k, level = 0, [""]
    while True:
        nxt = [w + c for w in level for c in string.ascii_lowercase]
        if len(vocab) + len(nxt) + 2 > vocab_size:
            break
        for w in nxt:
            merges.append(("\u0120" + w[:-1], w[-1]))
            vocab["\u0120" + w] = len(vocab)
        k, level = k + 1, nxt
    if k < 1:
        raise ValueError(f"vocab_size {vocab_size} is too small")
    for special in (EOS, PAD):
        vocab[special] = len(vocab)
    for i in itertools.count():
        if len(vocab) >= vocab_size:
            break
        vocab[f"<|filler_{i}|>"] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, eos_token=EOS, pad_token=PAD, unk_token=EOS)
    words = [(w, vocab["\u0120" + w]) for w in level]
    return tok, words, vocab[EOS]


def prep(work: Path, st: Setup) -> None:
    """Tokenizer, model (random init, fp32 safetensors), synthetic rows and the sdpo config, under `work`."""
    import numpy as np
    import torch
    import transformers
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    import sdpo_cli.config as sdpo_config

    if not st.smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --smoke for the CPU smoke test")
    shape = TINY if st.smoke else QWEN2_05B
    vocab_size = shape["vocab_size"]
    model_dir = work / "model"
    tok, words, eos = _tokenizer(vocab_size)
    tok.save_pretrained(str(model_dir))

    config = Qwen2Config(**shape, use_sliding_window=False, sliding_window=None, pad_token_id=tok.pad_token_id,
                         eos_token_id=eos, bos_token_id=None)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() and not st.smoke else "cpu"
    t0 = time.perf_counter()
    with torch.device(device):
        model = Qwen2ForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())  # the tied embedding once
    n_embed = model.get_input_embeddings().weight.numel()
    model.save_pretrained(str(model_dir))
    del model
    init_s = time.perf_counter() - t0

    # rows: words drawn uniformly; lengths log-normal around the median, clipped
    rng = np.random.default_rng(0)
    lo, med, hi = st.lengths

    def length() -> int:
        return int(np.clip(round(rng.lognormal(math.log(med), 0.6)), lo, hi))

    def text(n: int) -> tuple[str, list[int]]:
        picked = rng.integers(0, len(words), size=n)
        return "".join(" " + words[i][0] for i in picked), [words[i][1] for i in picked]

    rows, ids = [], []
    for _ in range(st.rows):
        p, pi = text(length())
        c, ci = text(length())
        r, ri = text(length())
        while ci == ri:
            r, ri = text(length())
        # TRL's standard rows: TRL and sdpo tokenise prompt and prompt + reply + EOS; every word starts with a space
        rows.append({"prompt": p, "chosen": c, "rejected": r})
        ids.append({"prompt_ids": pi, "chosen_ids": ci + [eos], "rejected_ids": ri + [eos]})
        assert len(pi) + max(len(ci), len(ri)) + 1 <= st.max_length
    (work / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (work / "rows_ids.json").write_text(json.dumps(ids))
    # the saved tokenizer, loaded as sdpo and TRL load it, must give exactly these ids
    loaded = AutoTokenizer.from_pretrained(str(model_dir))
    for row, x in zip(rows[:4], ids):
        assert loaded(row["prompt"])["input_ids"] == x["prompt_ids"], "the tokenizer does not map words 1:1"
        assert loaded(row["prompt"] + row["rejected"] + loaded.eos_token)["input_ids"] == \
            x["prompt_ids"] + x["rejected_ids"], "the tokenizer does not map words 1:1"

    cfg = {"run_dir": str(work / "runs" / "default"), "seed": 0,
           "model": {"base": str(model_dir), "dtype": "float32", "attn_implementation": "sdpa"},
           "data": {"sources": [{"name": "synthetic", "path": str(work / "rows.jsonl"), "format": "preference"}],
                    "max_length": st.max_length},
           "split": {"strategy": "random", "fractions": [1.0]},
           "dpo": {"beta": BETA},
           "train": {"learning_rate": LR, "lr_schedule": "linear", "warmup_ratio": 0.0, "max_updates": st.updates,
                     "per_device_batch_size": st.batch, "gradient_accumulation": 1, "max_grad_norm": 1.0,
                     "mixed_precision": "no" if st.smoke else "bf16", "layout": "prefix", "group_by_length": True,
                     "logging_every": 1, "save_every": 0},
           "inference": {"batch_size": 16}}
    import yaml

    (work / "sdpo.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))

    fields = {f.name for f in dataclasses.fields(sdpo_config.TrainConfig)}
    layouts = tuple(getattr(sdpo_config, "LAYOUTS", ("prefix", "padded")))
    c = token_counts(ids)
    versions = {}
    for name in ("torch", "transformers", "trl", "datasets", "accelerate", "pyarrow"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    info = {"kind": "prep", "params": n_params, "params_non_embedding": n_params - n_embed, "embedding": n_embed,
            "shape": shape, "rows": st.rows, "updates": st.updates, "batch": st.batch, "warmup": st.warmup,
            "max_length": st.max_length, "mean_prompt": sum(len(x["prompt_ids"]) for x in ids) / len(ids),
            "mean_chosen": sum(len(x["chosen_ids"]) for x in ids) / len(ids),
            "mean_rejected": sum(len(x["rejected_ids"]) for x in ids) / len(ids),
            "distinct_tokens": c["distinct"], "trl_tokens": c["trl"], "init_s": init_s,
            "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
            "features": {"compile": "compile" in fields, "packed": "packed" in layouts,
                         "flash_attn": importlib.util.find_spec("flash_attn") is not None},
            "versions": versions, "transformers_file": transformers.__file__}
    (work / "info.json").write_text(json.dumps(info))
    emit(info)


# ----------------------------------------------------------------------------------------------------------- sdpo
def sdpo_worker(work: Path, st: Setup, name: str, overrides: list[str], threads: int) -> None:
    """sdpo's real stages in this process (bench.common.sdpo_stages), so that CUDA peak memory per stage can be read
    here; training figures from the step's train log."""
    import torch

    torch.set_num_threads(threads)
    warm_imports(work / "model")
    run_dir = work / "runs" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg, stages = sdpo_stages(work / "sdpo.yaml", [f"run_dir={run_dir}", *overrides])
    records = train_log(cfg, 1)
    pairs = step_pairs(cfg, 1)
    data = token_counts(pairs)
    log = log_figures(records, st.warmup, trl_per_distinct=data["trl"] / data["distinct"])
    logged = {"pairs": sum(r["pairs"] for r in records), "tokens": sum(r["tokens"] for r in records)}
    ref, train = stages["reflogp"], stages["train"]
    result = {"kind": name, "system": "sdpo", "overrides": overrides, "updates": len(records), **log,
              "log_pairs": logged["pairs"], "log_tokens": logged["tokens"], "data_pairs": data["pairs"],
              "data_tokens": data["distinct"],
              "log_counts_ok": logged == {"pairs": data["pairs"], "tokens": data["distinct"]},
              "token_mismatch_rows": same_pairs(pairs, json.loads((work / "rows_ids.json").read_text())),
              "peak_gpu_gib": train["peak_gpu_gib"], "reflogp_peak_gpu_gib": ref["peak_gpu_gib"],
              "split_s": stages["split"]["wall_s"], "reflogp_stage_s": ref["wall_s"], "train_stage_s": train["wall_s"],
              "ref_pairs_per_s": data["pairs"] / ref["wall_s"], "ref_tok_s": data["distinct"] / ref["wall_s"],
              "first_loss": records[0]["loss"], "last_loss": records[-1]["loss"],
              "ln2_check": records[0].get("check"), "peak_rss_mb": peak_rss_mb(),
              "layout": cfg.train.layout, "compile": getattr(cfg.train, "compile", None)}
    shutil.rmtree(run_dir, ignore_errors=True)  # the checkpoint is 2 GB: keep the disk clear for the next variant
    emit(result)


# ------------------------------------------------------------------------------------------------------------ TRL
def trl_worker(work: Path, st: Setup, precompute: bool, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    cuda = torch.cuda.is_available() and not st.smoke
    rows = [json.loads(line) for line in (work / "rows.jsonl").read_text().splitlines()]
    ids = json.loads((work / "rows_ids.json").read_text())
    r = run_trl(work, rows, ids, batch=st.batch, max_length=st.max_length, updates=st.updates,
                precompute=precompute, cuda=cuda, logging_steps=1)
    seconds = [b[0] - a[0] for a, b in zip(r["stamps"], r["stamps"][1:])]
    b = r["batches"]
    steady = throughput(seconds, [x["distinct"] for x in b], [x["pairs"] for x in b], st.warmup,
                        [x["trl"] for x in b])
    ref_s = r["ref_wall_s"]
    emit({"kind": "trl_precompute" if precompute else "trl_default", "system": "trl", "updates": r["updates"],
          **steady, "peak_gpu_gib": r["peak_gpu_gib"], "process_peak_gpu_gib": r["process_peak_gpu_gib"],
          "init_s": r["init_s"], "ref_pass_s": ref_s,
          "ref_pairs_per_s": len(rows) / ref_s if ref_s else None,
          "ref_tok_s": token_counts(ids)["distinct"] / ref_s if ref_s else None,
          "trl_num_tokens": r["trl_num_tokens"], "our_trl_tokens": sum(x["trl"] for x in b),
          "token_mismatch_rows": r["token_mismatch_rows"], "first_loss": r["first_loss"],
          "last_loss": r["last_loss"], "peak_rss_mb": r["peak_rss_mb"]})


# ----------------------------------------------------------------------------------------------------- orchestrate
def _spawn(work: Path, name: str, args: list[str], threads: int, timeout: float) -> dict | None:
    return spawn("bench.gpu", name, args, work, threads, timeout, work / "logs" / f"{name}.log",
                 extra_env={"HF_DATASETS_CACHE": str(work / "hf-datasets")})

def _plan(features: dict, only: list[str] | None, extra: list[str], smoke: bool) -> list[tuple[str, list[str], float]]:
    """(name, worker args, time cap in seconds) in run order: the core comparison first."""
    plan = [("sdpo", ["--worker", "sdpo", "--name", "sdpo"], 120),
            ("trl_default", ["--worker", "trl_default"], 120),
            ("trl_precompute", ["--worker", "trl_precompute"], 120)]
    if not smoke or only:  # optional variants: on the GPU by default, on CPU only when asked for by name
        if features.get("compile"):
            plan.append(("sdpo_compile", ["--worker", "sdpo", "--name", "sdpo_compile", "--set", "train.compile=true"],
                         180))
        # packed wants a variable-length kernel: flash attention where installed, else flex_attention (on CPU, where
        # flex has no backward, sdpa: dense over the packed row, a check of the code path only)
        attn = "flash_attention_2" if features.get("flash_attn") else "sdpa" if smoke else "flex_attention"
        packed = ["--set", "train.layout=packed", "--set", f"model.attn_implementation={attn}"]
        if features.get("packed"):
            plan.append(("sdpo_packed", ["--worker", "sdpo", "--name", "sdpo_packed", *packed], 150))
        if features.get("compile") and features.get("packed"):
            plan.append(("sdpo_packed_compile", ["--worker", "sdpo", "--name", "sdpo_packed_compile", *packed, "--set",
                                                 "train.compile=true"], 180))
    for spec in extra:  # --variant NAME:key=value,key=value
        name, _, sets = spec.partition(":")
        args = ["--worker", "sdpo", "--name", name]
        for item in filter(None, sets.split(",")):
            args += ["--set", item]
        plan.append((name, args, 180))
    if only:
        plan = [p for p in plan if p[0] in only]
    return plan


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="CPU smoke run: tiny Qwen2, fp32, 3 updates of 2 pairs")
    ap.add_argument("--updates", type=int, default=None, help="updates per training run (default 30; smoke 3)")
    ap.add_argument("--batch", type=int, default=None, help="pairs per update, both systems (default 16; smoke 2)")
    ap.add_argument("--warmup", type=int, default=None, help="first updates left out of throughput (default 5; "
                                                             "smoke 1)")
    ap.add_argument("--budget", type=float, default=270, help="seconds for everything; variants that would start "
                                                              "with less than 30 s left are skipped (default 270)")
    ap.add_argument("--only", default=None, help="comma-separated variants: sdpo,trl_default,trl_precompute,"
                                                 "sdpo_compile,sdpo_packed,sdpo_packed_compile or --variant names")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                    help="an extra sdpo variant with config overrides, e.g. sdpo_b32:inference.batch_size=32")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads per worker (default 8; smoke 1)")
    ap.add_argument("--workdir", default=None, help="keep model, rows and logs here (default: a temp dir, removed)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--name", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)
    a = ap.parse_args()
    st = _setup(a)
    threads = a.threads or (1 if a.smoke else min(8, os.cpu_count() or 1))

    if a.worker:
        work = Path(a.workdir)
        if a.worker == "prep":
            prep(work, st)
        elif a.worker == "sdpo":
            sdpo_worker(work, st, a.name, a.set, threads)
        elif a.worker in ("trl_default", "trl_precompute"):
            trl_worker(work, st, a.worker == "trl_precompute", threads)
        else:
            raise SystemExit(f"unknown worker {a.worker}")
        return

    started = time.perf_counter()
    deadline = started + a.budget
    temporary = a.workdir is None
    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="sdpo-gpu-bench-"))
    (work / "logs").mkdir(parents=True, exist_ok=True)
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    print(f"gpu bench{' (SMOKE: CPU, tiny model, fp32)' if st.smoke else ''}: {st.updates} updates x {st.batch} pairs, "
          f"max_length {st.max_length}, warm-up {st.warmup} updates excluded, budget {a.budget:.0f}s, work dir "
          f"{work}", flush=True)
    info = _spawn(work, "prep", ["--worker", "prep", *(["--smoke"] if st.smoke else []), *_size_args(a)], threads,
                  min(180, deadline - time.perf_counter()))
    if info is None:
        raise SystemExit("prep failed")
    peak = float(os.environ.get("PEAK_TFLOPS", PEAK_TFLOPS_DEFAULT)) * 1e12
    print(f"  device {info['device']}; model {info['params'] / 1e6:.1f}M parameters "
          f"({info['params_non_embedding'] / 1e6:.1f}M without the tied embedding), init+save {info['init_s']:.1f}s; "
          f"{info['rows']} pairs, mean P/C/R = {info['mean_prompt']:.0f}/{info['mean_chosen']:.0f}/"
          f"{info['mean_rejected']:.0f} tokens (2P = {2 * info['mean_prompt'] * info['rows'] / info['trl_tokens']:.0%} "
          f"of TRL's count); sdpo switches: {info['features']}; versions {info['versions']}", flush=True)
    only = a.only.split(",") if a.only else None
    plan = _plan(info["features"], only, a.variant, st.smoke)
    results: dict[str, dict] = {}

    def mfu(tok_s, n):
        return None if st.smoke or tok_s is None else 6 * n * tok_s / peak

    def save() -> None:
        if out_dir is None:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "gpu_bench.json").write_text(json.dumps(
            {"setup": dataclasses.asdict(st), "info": info, "peak_flops": peak, "results": results,
             "elapsed_s": time.perf_counter() - started}, indent=1))
        with open(out_dir / "gpu_bench_workers.log", "w") as f:  # the workers' own output, for a failed variant
            for log in sorted((work / "logs").glob("*.log")):
                f.write(f"===== {log.name}\n{log.read_text(errors='replace')[-20000:]}\n")

    for name, args, cap in plan:
        left = deadline - time.perf_counter()
        if left < 30:
            print(f"  {name:<22} SKIPPED: {left:.0f}s of the budget left", flush=True)
            continue
        r = _spawn(work, name, [*args, *(["--smoke"] if st.smoke else []), *_size_args(a)], threads, min(cap, left))
        if r is None:
            print(f"  {name:<22} FAILED", flush=True)
            results[name] = {"kind": name, "failed": True}
        else:
            r["mfu"], r["mfu_non_embedding"] = mfu(r["tok_s"], info["params"]), mfu(r["tok_s"],
                                                                                 info["params_non_embedding"])
            results[name] = r
            ref = "reflogp stage" if r["system"] == "sdpo" else "ref pass"
            print(f"  {name:<22} {fmt(r['tok_s'])} tok/s (distinct)  {fmt(r['trl_tok_s'])} TRL-count tok/s  "
                  f"{fmt(r['s_per_update'], 3)} s/update  peak GPU {fmt(r['peak_gpu_gib'], 1)} GiB  "
                  f"MFU {fmt(r['mfu'], pct=True)}  loss {r['first_loss']:.4f} -> {r['last_loss']:.4f}"
                  + (f"  ln2 {r['ln2_check']}" if r.get("ln2_check") else "")
                  + (f"  {ref} {fmt(r['ref_pairs_per_s'], 1)} pairs/s" if r.get("ref_pairs_per_s") else ""),
                  flush=True)
        save()
    save()
    _report(info, results, peak, st, time.perf_counter() - started)
    if temporary:
        shutil.rmtree(work, ignore_errors=True)


def _size_args(a) -> list[str]:
    out = []
    for flag, value in (("--updates", a.updates), ("--batch", a.batch), ("--warmup", a.warmup)):
        if value is not None:
            out += [flag, str(value)]
    return out


def _report(info: dict, results: dict, peak: float, st: Setup, elapsed: float) -> None:
    ok = {k: v for k, v in results.items() if not v.get("failed")}
    print(f"\n{info['device']}, {info['params'] / 1e6:.1f}M-parameter Qwen2, {st.updates} updates x {st.batch} pairs "
          f"(updates >= {st.warmup} measured), {'fp32 on CPU' if st.smoke else 'bf16 autocast'}; MFU = 6 N tok/s / "
          f"{peak / 1e12:.0f} TFLOP/s" + (" (n/a on CPU)" if st.smoke else ""))
    head = (f"{'variant':<22} {'tok/s':>9} {'TRL-count':>10} {'s/update':>9} {'peak GiB':>9} {'MFU':>7} "
            f"{'MFU(N-emb)':>10} {'ref pairs/s':>11} {'stage peak':>10} {'RSS MB':>7}")
    print(head)
    print("-" * len(head))
    for name, r in results.items():
        if r.get("failed"):
            print(f"{name:<22} FAILED")
            continue
        other_peak = r.get("reflogp_peak_gpu_gib") if r["system"] == "sdpo" else r.get("process_peak_gpu_gib")
        print(f"{name:<22} {fmt(r['tok_s']):>9} {fmt(r['trl_tok_s']):>10} {fmt(r['s_per_update'], 3):>9} "
              f"{fmt(r['peak_gpu_gib'], 2):>9} {fmt(r['mfu'], pct=True):>7} "
              f"{fmt(r['mfu_non_embedding'], pct=True):>10} {fmt(r.get('ref_pairs_per_s'), 1):>11} "
              f"{fmt(other_peak, 2):>10} {fmt(r.get('peak_rss_mb')):>7}")
    print("  tok/s: distinct tokens (P + C + R per pair) per second (sdpo: from its train log); TRL-count: 2P + C + R "
          "(sdpo: its rate x the step's (2P+C+R)/(P+C+R)); ref pairs/s: sdpo's whole reflogp stage (model load "
          "included), TRL's precompute pass; stage peak: sdpo's reflogp stage, TRL's whole process (GiB, CUDA "
          "allocated); RSS: the worker process's peak")
    for name, r in ok.items():
        if r["system"] == "trl" and r.get("token_mismatch_rows"):
            print(f"  ! {name}: TRL tokenised {r['token_mismatch_rows']} rows differently from ours")
        if r["system"] == "trl" and r.get("trl_num_tokens") not in (None, r.get("our_trl_tokens")):
            print(f"  ! {name}: TRL counted {r['trl_num_tokens']} tokens, we counted {r['our_trl_tokens']}")
        if r["system"] == "sdpo" and r.get("ln2_check") not in (None, "ok"):
            print(f"  ! {name}: update 0 ln 2 check {r.get('ln2_check')}")
        if r["system"] == "sdpo" and not r.get("log_counts_ok"):
            print(f"  ! {name}: the train log counted {r.get('log_pairs')} pairs / {r.get('log_tokens')} tokens, the "
                  f"step's data holds {r.get('data_pairs')} / {r.get('data_tokens')}")
        if r["system"] == "sdpo" and r.get("token_mismatch_rows"):
            print(f"  ! {name}: sdpo split tokenised {r['token_mismatch_rows']} rows differently from ours")
    print(f"\ngpu bench finished in {elapsed:.0f}s")

    def num(x, digits=1):
        return "n/a" if x is None else f"{x:.{digits}f}"

    parts = [f"device={info['device'].replace(' ', '_')}"]
    for name, r in ok.items():
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        parts += [f"{name}_tok_s={num(r['tok_s'], 0)}", f"{name}_mem_gib={num(r['peak_gpu_gib'], 2)}",
                  f"{name}_mfu={mfu}"]
    s = ok.get("sdpo", {})
    for base in ("trl_default", "trl_precompute"):
        b = ok.get(base, {})
        ratio = s["tok_s"] / b["tok_s"] if s.get("tok_s") and b.get("tok_s") else None
        parts.append(f"sdpo_vs_{base}={num(ratio, 2)}")
    d = ok.get("trl_default", {})
    if s.get("peak_gpu_gib") and d.get("peak_gpu_gib"):
        parts.append(f"sdpo_mem_vs_trl_default={s['peak_gpu_gib'] / d['peak_gpu_gib']:.2f}")
    print("RESULT gpu " + " ".join(parts), flush=True)


if __name__ == "__main__":
    main()
