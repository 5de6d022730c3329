"""sdpo vs TRL 1.16 DPOTrainer: the same DPO updates on the same rows, model and settings, on this machine's CPU.

    python bench/bench.py              # full run (make bench): 6 updates, 2 interleaved repeats, about 10 minutes
    python bench/bench.py --quick      # smoke-sized: 2 updates, 1 repeat, about 2 minutes
    python bench/bench.py --only sdpo --ablations --updates 12 --repeats 1   # one technique at a time

Setup (docs/performance.md explains the choices):
  model     a Llama-shaped model built from a config (random init, seed 0): vocab 32000, hidden 256, 6 layers,
            4 heads / 2 KV heads, MLP 704, untied head: 20.8M parameters. Its tokenizer is a byte-level BPE of
            vocab 32000 trained here on the fixture texts (UltraFeedback + Orca samples), BOS added like Llama.
  rows      real UltraFeedback rows (../shared/fixtures/ultrafeedback_binarized.sample.jsonl) in TRL's standard
            text form (prompt, chosen reply, rejected reply; TRL appends EOS), tokenised TRL's way, keeping rows
            whose prompt + longer reply fits max_length=512 (so nobody truncates), first N in file order.
  updates   batch 4 pairs, one epoch over N = 4 * updates rows, lr 1e-6 linear decay, AdamW (fused), grad-norm
            clip 1.0, beta 0.1, sigmoid loss, fp32 (TRL: use_cpu=True, bf16=False), one thread.
  TRL       `trl_default`: DPOConfig defaults (gradient checkpointing on, live reference model reloaded from the
            model path). `trl_precompute`: the same with precompute_ref_log_probs=True (its reference pass
            times separately: the `reflogp` comparison).
  sdpo      our functions in-process: reference log-probs with `score_pairs` (inference batch 16), then
            collate_pairs / completion_logps / dpo_losses + AdamW, prefix-shared layout, length-grouped order.
            --ablations adds runs that switch one technique at a time (docs/performance.md).
  sDPO      `sdpo run` (the CLI) on the same rows: split.strategy=random with fractions [1.0] (DPO, T=1) and
            [0.5, 0.5] (sDPO, T=2); total CPU time of the command.

Every configuration runs in its own subprocess (peak RSS = its ru_maxrss), configurations interleaved, repeated.
Times are process CPU seconds (one thread; robust to other people's load on the shared cores); wall seconds are
reported too. Throughput counts TRL's tokens: the non-pad tokens of the [chosen; rejected] rows, 2P + C + R per pair
(the prompt twice), for every system, so tokens/s ratios are time ratios on the same work.

Last line: RESULT train_vs_trl_default=... train_vs_trl_precompute=... peak_rss_vs_trl_default=...
reflogp_vs_trl_precompute=... sdpo_t2_vs_dpo_t1=...
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures"
VOCAB = 32000
MAX_LENGTH = 512
BATCH = 4
LR = 1e-6
BETA = 0.1
REF_BATCH = 16  # sdpo's inference.batch_size default


def _env(threads: int) -> dict:
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "HF_DATASETS_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
                "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore",
                "TRANSFORMERS_VERBOSITY": "error"})
    return env


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _emit(result: dict) -> None:
    print("BENCH " + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------------------------------------- prep
def prep(work: Path, rows_needed: int) -> None:
    """Tokenizer + model + tokenised rows under `work` (skipped when already there)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from sdpo_cli.data.tokenize import common_prefix_length

    model_dir, data_file = work / "model", work / "rows.json"
    uf = [json.loads(line) for line in (FIXTURES / "ultrafeedback_binarized.sample.jsonl").open()]
    texts = []
    for r in uf:
        texts += [r["prompt"], r["chosen"][-1]["content"], r["rejected"][-1]["content"]]
    if not (model_dir / "config.json").is_file():
        orca = [json.loads(line) for line in (FIXTURES / "orca_dpo_pairs.sample.jsonl").open()]
        for r in orca:
            texts += [r.get("system") or "", r["question"], r["chosen"], r["rejected"]]
        specials = ["<pad>", "<s>", "</s>"]
        tk = Tokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=specials, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tk.train_from_iterator(texts, trainer)
        tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                          special_tokens=[("<s>", 1)])
        tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
        tok.save_pretrained(str(model_dir))
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=704, num_hidden_layers=6,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                             bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
        config._attn_implementation = "sdpa"
        LlamaForCausalLM(config).save_pretrained(str(model_dir))
    tok = PreTrainedTokenizerFast.from_pretrained(str(model_dir))
    rows = []
    for r in uf:
        prompt, chosen, rejected = r["prompt"], r["chosen"][-1]["content"], r["rejected"][-1]["content"]
        if chosen == rejected:
            continue
        # TRL 1.16 standard rows: tok(prompt), tok(prompt + reply + EOS), split at the common token prefix
        p = tok(prompt)["input_ids"]
        fc = tok(prompt + chosen + tok.eos_token)["input_ids"]
        fr = tok(prompt + rejected + tok.eos_token)["input_ids"]
        n = min(common_prefix_length(p, fc), common_prefix_length(p, fr))
        pair = {"prompt": prompt, "chosen": chosen, "rejected": rejected,
                "prompt_ids": p[:n], "chosen_ids": fc[n:], "rejected_ids": fr[n:]}
        if n >= 1 and pair["chosen_ids"] and pair["rejected_ids"] and \
                n + max(len(pair["chosen_ids"]), len(pair["rejected_ids"])) <= MAX_LENGTH:
            rows.append(pair)
    if len(rows) < rows_needed:
        raise SystemExit(f"only {len(rows)} rows fit max_length {MAX_LENGTH}; need {rows_needed}")
    data_file.write_text(json.dumps(rows[:rows_needed]))
    n_params = sum(p.numel() for p in LlamaForCausalLM.from_pretrained(str(model_dir)).parameters())
    _emit({"kind": "prep", "rows_fitting": len(rows), "rows": rows_needed, "params": n_params,
           "tokenizer_vocab": len(tok)})


def _rows(work: Path) -> list[dict]:
    return json.loads((work / "rows.json").read_text())


def trl_tokens(rows: list[dict]) -> int:
    """TRL's count: Σ attention_mask of the [chosen; rejected] rows = (P + C) + (P + R) per pair."""
    return sum(2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rows)


# ------------------------------------------------------------------------------------------------------------ TRL
def run_trl(work: Path, precompute: bool, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    rows = _rows(work)
    updates = len(rows) // BATCH
    rss_imports = _peak_rss_mb()
    ds = Dataset.from_list([{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in rows])
    out = tempfile.mkdtemp(prefix="trl-bench-")
    args = DPOConfig(output_dir=out, per_device_train_batch_size=BATCH, max_length=MAX_LENGTH, learning_rate=LR,
                     beta=BETA, max_steps=updates, use_cpu=True, bf16=False, report_to=[], save_strategy="no",
                     logging_steps=max(1, updates // 4), seed=0, dataloader_num_workers=0, disable_tqdm=True,
                     precompute_ref_log_probs=precompute)

    clock = {}

    class Timer(TrainerCallback):
        def on_train_begin(self, *a, **k):
            clock["t0"] = (time.perf_counter(), time.process_time())

        def on_train_end(self, *a, **k):
            clock["t1"] = (time.perf_counter(), time.process_time())

    original = DPOTrainer._precompute_ref_logps
    ref_time = [0.0, 0.0]

    def timed(self, *x, **k):
        t0, c0 = time.perf_counter(), time.process_time()
        result = original(self, *x, **k)
        ref_time[0] += time.perf_counter() - t0
        ref_time[1] += time.process_time() - c0
        return result

    DPOTrainer._precompute_ref_logps = timed
    t0 = time.perf_counter()
    tok_path = str(work / "model")
    from transformers import AutoTokenizer

    trainer = DPOTrainer(model=tok_path, args=args, train_dataset=ds, processing_class=AutoTokenizer.from_pretrained(
        tok_path))
    init_s = time.perf_counter() - t0
    trainer.add_callback(Timer())
    trainer.train()
    # the same tokens as ours? (TRL tokenised the text itself)
    prepared = trainer.train_dataset
    mismatch = sum(prepared[i]["prompt_ids"] != r["prompt_ids"] or prepared[i]["chosen_ids"] != r["chosen_ids"]
                   or prepared[i]["rejected_ids"] != r["rejected_ids"] for i, r in enumerate(rows))
    logs = [h for h in trainer.state.log_history if "loss" in h]
    shutil.rmtree(out, ignore_errors=True)
    wall = clock["t1"][0] - clock["t0"][0]
    cpu = clock["t1"][1] - clock["t0"][1]
    tokens = trl_tokens(rows)
    _emit({"kind": "trl_precompute" if precompute else "trl_default", "updates": trainer.state.global_step,
           "pairs": len(rows), "tokens": tokens, "trl_num_tokens": getattr(trainer, "_total_train_tokens", None),
           "train_cpu_s": cpu, "train_wall_s": wall, "tok_per_cpu_s": tokens / cpu, "tok_per_wall_s": tokens / wall,
           "s_per_update_cpu": cpu / max(1, trainer.state.global_step),
           "ref_cpu_s": ref_time[1] if precompute else None, "ref_wall_s": ref_time[0] if precompute else None,
           "ref_pairs_per_cpu_s": len(rows) / ref_time[1] if precompute else None,
           "init_s": init_s, "token_mismatch_rows": mismatch, "first_loss": logs[0]["loss"] if logs else None,
           "last_loss": logs[-1]["loss"] if logs else None, "rss_after_imports_mb": rss_imports,
           "peak_rss_mb": _peak_rss_mb()})


# ----------------------------------------------------------------------------------------------------------- sdpo
def run_sdpo(work: Path, layout: str, group: bool, threads: int, live_ref: bool = False, gc: bool = False,
             full_head: bool = False, ref_batch: int = REF_BATCH, extra_ref_batches: tuple[int, ...] = (),
             compile: bool = False) -> None:
    import torch

    if full_head:  # ablation: the plain HF path, [rows, L, V] logits of every position, log-softmax in autograd
        from sdpo_cli import logprobs

        logprobs._plain_head = lambda model: None

    torch.set_num_threads(threads)
    from transformers import AutoModelForCausalLM, get_scheduler

    from sdpo_cli.logprobs import (
        collate_pairs,
        compile_blocks,
        completion_logps,
        length_grouped_batches,
        pair_lengths,
        score_pairs,
    )
    from sdpo_cli.loss import dpo_losses

    rows = _rows(work)
    rss_imports = _peak_rss_mb()
    pad_id = 0
    model = AutoModelForCausalLM.from_pretrained(str(work / "model"), dtype=torch.float32, attn_implementation="sdpa")
    model.eval()  # no dropout (Llama has none; TRL disables it too)

    # ---- reference log-probs: the policy itself at step start (sDPO: M_{t-1} is both reference and init)
    ref_info = {}
    for bs in (ref_batch, *extra_ref_batches):
        t0, c0 = time.perf_counter(), time.process_time()
        ref_c, ref_r = score_pairs(model, rows, pad_id, bs, "cpu", layout=layout)
        cpu, wall = time.process_time() - c0, time.perf_counter() - t0
        ref_info[bs] = {"ref_cpu_s": cpu, "ref_wall_s": wall, "ref_pairs_per_cpu_s": len(rows) / cpu}
    rss_reflogp = _peak_rss_mb()
    reference = None
    if live_ref:  # ablation: a resident reference model with a forward every update, as TRL's default
        reference = AutoModelForCausalLM.from_pretrained(str(work / "model"), dtype=torch.float32,
                                                         attn_implementation="sdpa").eval()

    # ---- training, as sdpo_cli/train.py does it (minus accelerate, which is a no-op on one CPU process)
    model.train()
    if gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if compile:  # train.compile: the compile time of the first updates counts in the figures
        compile_blocks(model)
    updates = len(rows) // BATCH
    if group:
        batches = length_grouped_batches(pair_lengths(rows, layout), BATCH, generator_seed=0)
    else:
        perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)).tolist()
        batches = [perm[s:s + BATCH] for s in range(0, len(perm), BATCH)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0, fused=True)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=0, num_training_steps=updates)
    losses, positions, update_cpu = [], 0, []
    t0, c0 = time.perf_counter(), time.process_time()
    for idx in batches[:updates]:
        c_update = time.process_time()
        pairs = [rows[i] for i in idx]
        batch = collate_pairs(pairs, pad_id, layout=layout)
        positions += batch.input_ids.numel()
        policy_c, policy_r = completion_logps(model, batch)
        if reference is not None:
            with torch.no_grad():
                rc, rr = completion_logps(reference, batch)
        else:
            rc = torch.tensor([ref_c[i] for i in idx])
            rr = torch.tensor([ref_r[i] for i in idx])
        loss = dpo_losses(policy_c, policy_r, rc, rr, beta=BETA).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        update_cpu.append(time.process_time() - c_update)
    cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    tokens = trl_tokens([rows[i] for b in batches[:updates] for i in b])
    name = f"sdpo_{layout}_{'grouped' if group else 'random'}" + ("_liveref" if live_ref else "") + \
        ("_gc" if gc else "") + ("_fullhead" if full_head else "") + ("_compiled" if compile else "")
    _emit({"kind": name, "updates": updates, "pairs": len(rows), "tokens": tokens, "positions": positions,
           "train_cpu_s": cpu, "train_wall_s": wall, "tok_per_cpu_s": tokens / cpu, "tok_per_wall_s": tokens / wall,
           "s_per_update_cpu": cpu / updates, "update_cpu_s": update_cpu, **ref_info[ref_batch],
           "ref_extra": {str(k): v for k, v in ref_info.items() if k != ref_batch},
           "first_loss": losses[0], "ln2_ok": abs(losses[0] - math.log(2)) < 1e-4, "last_loss": losses[-1],
           "rss_after_imports_mb": rss_imports, "rss_after_reflogp_mb": rss_reflogp, "peak_rss_mb": _peak_rss_mb()})


# ------------------------------------------------------------------------------------------------------------ CLI
def run_cli(work: Path, steps: int, threads: int) -> None:
    """`sdpo run` on the bench rows: DPO (T=1) or sDPO (T=2, random halves); CPU time of the whole command."""
    import resource

    import yaml

    rows = _rows(work)
    jsonl = work / "rows.jsonl"
    jsonl.write_text("".join(json.dumps({"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]})
                             + "\n" for r in rows))
    run_dir = Path(tempfile.mkdtemp(prefix=f"sdpo-cli-T{steps}-", dir=work))
    cfg = {"run_dir": str(run_dir), "seed": 0, "model": {"base": str(work / "model")},
           "data": {"sources": [{"name": "uf", "path": str(jsonl), "format": "preference"}], "max_length": MAX_LENGTH},
           "split": {"strategy": "random", "fractions": [1.0] if steps == 1 else [1 / steps] * steps},
           "dpo": {"beta": BETA}, "train": {"learning_rate": LR, "per_device_batch_size": BATCH, "warmup_ratio": 0.0,
                                             "epochs": 1, "logging_every": 1000},
           "inference": {"batch_size": REF_BATCH}}
    path = run_dir / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "sdpo_cli", "run", str(path)], capture_output=True, text=True,
                          env=_env(threads), cwd=str(ROOT))
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    result = {"kind": f"cli_T{steps}", "steps": steps, "pairs": len(rows), "cpu_s": cpu, "wall_s": wall,
              "rc": proc.returncode}
    if proc.returncode:
        result["error"] = (proc.stderr or proc.stdout)[-800:]
    else:
        shutil.rmtree(run_dir, ignore_errors=True)  # two checkpoints per step: keep the work dir small
    _emit(result)


# ----------------------------------------------------------------------------------------------------- orchestrate
def _spawn(work: Path, args: list[str], threads: int, timeout: float = 900) -> dict | None:
    cmd = [sys.executable, str(Path(__file__).resolve()), *args, "--workdir", str(work), "--threads", str(threads)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(threads), cwd=str(ROOT), timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"  ! {' '.join(args)}: timed out after {timeout:.0f}s", flush=True)
        return None
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith("BENCH "):
            return json.loads(line[6:])
    print(f"  ! {' '.join(args)} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}", flush=True)
    return None


def _median(results: list[dict], key: str) -> float:
    values = [r[key] for r in results if r and r.get(key) is not None]
    return statistics.median(values) if values else float("nan")


def _fmt(x: float, digits: int = 2) -> str:
    return "nan" if x != x else f"{x:.{digits}f}"


ABLATIONS = [  # one technique at a time, from the plain HF-style loop to the full sdpo configuration
    ("sdpo_padded_random_liveref_fullhead", ["--layout", "padded", "--group", "0", "--live-ref", "1",
                                             "--full-head", "1"]),
    ("sdpo_padded_random_fullhead", ["--layout", "padded", "--group", "0", "--full-head", "1"]),
    ("sdpo_padded_random", ["--layout", "padded", "--group", "0"]),
    ("sdpo_padded_grouped", ["--layout", "padded", "--group", "1"]),
    ("sdpo_prefix_random", ["--layout", "prefix", "--group", "0"]),
    ("sdpo_prefix_grouped_gc", ["--layout", "prefix", "--group", "1", "--gc", "1"]),
    ("sdpo_packed_grouped", ["--layout", "packed", "--group", "1"]),
    ("sdpo_prefix_grouped_compiled", ["--layout", "prefix", "--group", "1", "--compile", "1"]),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke-sized: 2 updates, 1 repeat")
    ap.add_argument("--updates", type=int, default=None, help="updates per training run (default 6; quick 2)")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 2; quick 1)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in every subprocess")
    ap.add_argument("--ablations", action="store_true", help="also run the one-technique-at-a-time sdpo variants")
    ap.add_argument("--only", default=None, help="comma-separated subset of trl_default,trl_precompute,sdpo,"
                                                 "cli_T1,cli_T2 or an ablation name (default: all)")
    ap.add_argument("--workdir", default=None, help="keep model, tokenizer and rows here (default: a temp dir)")
    ap.add_argument("--out", default=None, help="append every result as a JSON line to this file")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--layout", default="prefix", help=argparse.SUPPRESS)
    ap.add_argument("--group", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--live-ref", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--full-head", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--gc", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--compile", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--ref-extra", default="", help=argparse.SUPPRESS)
    ap.add_argument("--rows", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=1, help=argparse.SUPPRESS)
    a = ap.parse_args()

    if a.worker:
        work = Path(a.workdir)
        if a.worker == "prep":
            prep(work, a.rows)
        elif a.worker == "trl_default":
            run_trl(work, precompute=False, threads=a.threads)
        elif a.worker == "trl_precompute":
            run_trl(work, precompute=True, threads=a.threads)
        elif a.worker == "sdpo":
            extra = tuple(int(x) for x in a.ref_extra.split(",") if x)
            run_sdpo(work, a.layout, bool(a.group), a.threads, live_ref=bool(a.live_ref), gc=bool(a.gc),
                     full_head=bool(a.full_head), extra_ref_batches=extra, compile=bool(a.compile))
        elif a.worker == "cli":
            run_cli(work, a.steps, a.threads)
        else:
            raise SystemExit(f"unknown worker {a.worker}")
        return

    updates = a.updates or (2 if a.quick else 6)
    repeats = a.repeats if a.repeats is not None else (1 if a.quick else 2)
    temporary = a.workdir is None
    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="sdpo-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    print(f"bench: {updates} updates x batch {BATCH}, {repeats} repeat(s), {a.threads} thread(s), work dir {work}",
          flush=True)
    info = _spawn(work, ["--worker", "prep", "--rows", str(updates * BATCH)], a.threads)
    if info is None:
        raise SystemExit("prep failed")
    print(f"  model {info['params'] / 1e6:.1f}M params, tokenizer vocab {info['tokenizer_vocab']}, "
          f"{info['rows_fitting']} UltraFeedback rows fit {MAX_LENGTH} tokens, using {info['rows']}", flush=True)

    plan = [("trl_default", ["--worker", "trl_default"]), ("trl_precompute", ["--worker", "trl_precompute"]),
            ("sdpo", ["--worker", "sdpo", "--layout", "prefix", "--group", "1", "--ref-extra", str(BATCH)]),
            ("cli_T1", ["--worker", "cli", "--steps", "1"]), ("cli_T2", ["--worker", "cli", "--steps", "2"])]
    if a.only:  # any of the plan's names or the ablations', interleaved like the plan
        wanted = set(a.only.split(","))
        plan = [(name, args) for name, args in plan + [(n, ["--worker", "sdpo", *x]) for n, x in ABLATIONS]
                if name in wanted]
    results: dict[str, list[dict]] = {name: [] for name, _ in plan}
    out = open(a.out, "a") if a.out else None

    def record(name: str, r: dict | None) -> None:
        if r is not None:
            results.setdefault(name, []).append(r)
            if out:
                out.write(json.dumps(r) + "\n")
                out.flush()
        _progress(name, r)

    for rep in range(repeats):
        for name, args in (plan if rep % 2 == 0 else plan[::-1]):  # interleaved, alternating order
            r = _spawn(work, args, a.threads)
            if r is not None:
                r["repeat"] = rep
            record(name, r)
    if a.ablations:
        for name, args in ABLATIONS:
            record(name, _spawn(work, ["--worker", "sdpo", *args], a.threads))
    if out:
        out.close()
    if temporary:
        shutil.rmtree(work, ignore_errors=True)
    _report(results, time.perf_counter() - started)


def _progress(name: str, r: dict | None) -> None:
    if r is None:
        print(f"  {name:<28} FAILED", flush=True)
    elif name.startswith("cli"):
        print(f"  {name:<28} cpu {r['cpu_s']:7.1f}s  wall {r['wall_s']:7.1f}s  rc {r['rc']}", flush=True)
    else:
        ref = f"  ref {r['ref_pairs_per_cpu_s']:6.1f} pairs/cpu-s" if r.get("ref_pairs_per_cpu_s") else ""
        print(f"  {name:<28} {r['tok_per_cpu_s']:7.0f} tok/cpu-s  {r['s_per_update_cpu']:6.2f} cpu-s/update  "
              f"peak RSS {r['peak_rss_mb']:6.0f} MB{ref}", flush=True)


def _report(results: dict[str, list[dict]], elapsed: float) -> None:
    m = {name: {k: _median(rs, k) for k in ("tok_per_cpu_s", "tok_per_wall_s", "s_per_update_cpu", "peak_rss_mb",
                                            "rss_after_imports_mb", "ref_pairs_per_cpu_s", "cpu_s", "wall_s")}
         for name, rs in results.items()}
    print("\nmedians (CPU-time based; one thread):")
    for name, v in m.items():
        if name.startswith("cli"):
            print(f"  {name:<28} cpu {_fmt(v['cpu_s'], 1)}s wall {_fmt(v['wall_s'], 1)}s")
        else:
            print(f"  {name:<28} {_fmt(v['tok_per_cpu_s'], 0):>7} tok/s  {_fmt(v['s_per_update_cpu'])} s/update  "
                  f"peak RSS {_fmt(v['peak_rss_mb'], 0)} MB (imports {_fmt(v['rss_after_imports_mb'], 0)} MB)"
                  + (f"  reflogp {_fmt(v['ref_pairs_per_cpu_s'], 1)} pairs/s" if v["ref_pairs_per_cpu_s"] ==
                     v["ref_pairs_per_cpu_s"] else ""))
    sd = results.get("sdpo") or []
    same_bs = [r["ref_extra"].get(str(BATCH), {}).get("ref_pairs_per_cpu_s") for r in sd if r.get("ref_extra")]
    if same_bs:
        print(f"  sdpo reflogp at TRL's batch size {BATCH}: {_fmt(statistics.median(same_bs), 1)} pairs/s")
    mism = [r.get("token_mismatch_rows") for k in ("trl_default", "trl_precompute") for r in results.get(k, [])]
    print(f"  TRL tokenised rows differing from ours: {mism}; sdpo ln2 at update 0: "
          f"{[r.get('ln2_ok') for r in sd]}")
    errors = [r.get("error") for k in ("cli_T1", "cli_T2") for r in results.get(k, []) if r.get("rc")]
    for e in errors:
        print(f"  ! CLI error: {e}")
    nan = {k: float("nan") for k in ("tok_per_cpu_s", "peak_rss_mb", "ref_pairs_per_cpu_s", "cpu_s")}
    s, d, p = (m.get(k, nan) for k in ("sdpo", "trl_default", "trl_precompute"))
    t1, t2 = m.get("cli_T1", nan)["cpu_s"], m.get("cli_T2", nan)["cpu_s"]
    if t1 == t1 and t2 == t2:
        print(f"  sDPO T=2 vs DPO T=1 (sdpo run): +{t2 - t1:.1f} CPU-s for the second step's fixed costs")
    if errors:
        t1 = t2 = float("nan")
    print(f"\nbench finished in {elapsed / 60:.1f} min")
    print(f"RESULT train_vs_trl_default={_fmt(s['tok_per_cpu_s'] / d['tok_per_cpu_s'])} "
          f"train_vs_trl_precompute={_fmt(s['tok_per_cpu_s'] / p['tok_per_cpu_s'])} "
          f"peak_rss_vs_trl_default={_fmt(s['peak_rss_mb'] / d['peak_rss_mb'])} "
          f"reflogp_vs_trl_precompute={_fmt(s['ref_pairs_per_cpu_s'] / p['ref_pairs_per_cpu_s'])} "
          f"sdpo_t2_vs_dpo_t1={_fmt(t2 / t1)}", flush=True)


if __name__ == "__main__":
    main()
