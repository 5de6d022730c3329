"""sdpo vs TRL 1.16 DPOTrainer: the same DPO updates on the same rows, model and settings, on this machine's CPU.

    python -m bench.cpu              # full run (make bench): 6 updates, 2 interleaved repeats, about 12 minutes
    python -m bench.cpu --quick      # smoke-sized: 2 updates, 1 repeat, about 3 minutes
    python -m bench.cpu --only sdpo --ablations --updates 12 --repeats 1   # one technique at a time

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
            model path). `trl_precompute`: the same with precompute_ref_log_probs=True (its reference pass is timed
            separately: the `reflogp` comparison). Timed by a TrainerCallback from train begin to train end.
  sdpo      the real code path (bench.common.sdpo_stages): the same rows as a JSONL source (format preference), then
            sdpo_cli's run_split (random, fractions [1.0]), run_reflogp --step 1 (inference batch 16) and run_train
            --step 1 (layout prefix, length-grouped batches, logging every update) in one process, each with a
            freshly loaded config as its command loads it. Training is timed by the train log
            (logs/train-step-1.jsonl): its records give the tokens and the loop's own wall seconds per update (model
            loading, set-up and the checkpoint save excluded), and a watcher thread (bench.common.LogClock) reads
            the process CPU time when the log is opened and as each record lands, i.e. over the same window. The
            reference pass is the whole run_reflogp call (model load, data read and write included). --ablations
            adds runs that switch one technique at a time through the config (train.layout, train.group_by_length,
            ...), and a plain Hugging Face-style loop (no sdpo_cli code) as the baseline.
  sDPO      `sdpo run` (the CLI) on the same rows: split.strategy=random with fractions [1.0] (DPO, T=1) and
            [0.5, 0.5] (sDPO, T=2); total CPU time of the command.

Every configuration runs in its own subprocess (peak RSS = its ru_maxrss), configurations interleaved, repeated.
Times are process CPU seconds (one thread; robust to other people's load on the shared cores), of the training window
(TRL: train begin to train end; sdpo: its train log's window) and of the reference passes; wall seconds and the CPU
utilisation (CPU / wall) are reported too. Tokens are distinct tokens P + C + R per pair (the prompt counted once;
what sdpo's log counts) for every system, so tokens/s ratios are time ratios on the same work; TRL's own count
2P + C + R is shown beside it.

Last line: RESULT train_vs_trl_default=... train_vs_trl_precompute=... peak_rss_vs_trl_default=...
reflogp_vs_trl_precompute=... sdpo_t2_vs_dpo_t1=...
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import (
    BETA,
    FIXTURES,
    LR,
    ROOT,
    emit,
    env,
    log_figures,
    num,
    peak_rss_mb,
    run_trl,
    same_pairs,
    sdpo_stages,
    spawn,
    step_pairs,
    token_counts,
    train_log,
    warm_imports,
    write_sdpo_inputs,
)

VOCAB = 32000
MAX_LENGTH = 512
BATCH = 4
REF_BATCH = 16  # sdpo's inference.batch_size default


# ----------------------------------------------------------------------------------------------------------- prep
def prep(work: Path, rows_needed: int) -> None:
    """Tokenizer + model (skipped when already there), the tokenised rows and sdpo's config, under `work`."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from sdpo_cli.data.tokenize import common_prefix_length

    model_dir = work / "model"
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
    rows = rows[:rows_needed]
    # sdpo reads the same rows as a preference-format source and tokenises them itself (checked against ours)
    write_sdpo_inputs(work, rows, model_dir, max_length=MAX_LENGTH, inference_batch=REF_BATCH,
                      train={"epochs": 1, "per_device_batch_size": BATCH})
    n_params = sum(p.numel() for p in LlamaForCausalLM.from_pretrained(str(model_dir)).parameters())
    c = token_counts(rows)
    emit({"kind": "prep", "rows_fitting": len(rows), "rows": rows_needed, "params": n_params,
          "tokenizer_vocab": len(tok), "distinct_tokens": c["distinct"], "trl_tokens": c["trl"]})


def _rows(work: Path) -> list[dict]:
    return json.loads((work / "rows.json").read_text())


# ------------------------------------------------------------------------------------------------------------ TRL
def trl_worker(work: Path, precompute: bool, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    rows = _rows(work)
    updates = len(rows) // BATCH
    r = run_trl(work, [{k: x[k] for k in ("prompt", "chosen", "rejected")} for x in rows], rows, batch=BATCH,
                max_length=MAX_LENGTH, updates=updates, precompute=precompute, cuda=False,
                logging_steps=max(1, updates // 4))
    (w0, c0), (w1, c1) = r["stamps"][0], r["end"]
    wall, cpu = w1 - w0, c1 - c0
    done = token_counts([])
    for b in r["batches"]:
        done = {k: done[k] + b[k] for k in done}
    pairs = done["pairs"]
    emit({"kind": "trl_precompute" if precompute else "trl_default", "system": "trl", "updates": r["updates"],
          "pairs": pairs, "tokens": done["distinct"], "trl_tokens": done["trl"], "trl_num_tokens": r["trl_num_tokens"],
          "train_wall_s": wall, "train_cpu_s": cpu, "cpu_util": cpu / wall, "tok_s": done["distinct"] / wall,
          "trl_tok_s": done["trl"] / wall, "tok_per_cpu_s": done["distinct"] / cpu,
          "trl_tok_per_cpu_s": done["trl"] / cpu, "s_per_update_cpu": cpu / max(1, r["updates"]),
          "update_s": [round(b[0] - a[0], 3) for a, b in zip(r["stamps"], r["stamps"][1:])],
          "update_cpu_s": [round(b[1] - a[1], 3) for a, b in zip(r["stamps"], r["stamps"][1:])],
          "ref_cpu_s": r["ref_cpu_s"], "ref_wall_s": r["ref_wall_s"],
          "ref_pairs_per_cpu_s": len(rows) / r["ref_cpu_s"] if r["ref_cpu_s"] else None,
          "init_s": r["init_s"], "token_mismatch_rows": r["token_mismatch_rows"], "first_loss": r["first_loss"],
          "last_loss": r["last_loss"], "rss_after_imports_mb": r["rss_after_imports_mb"],
          "peak_rss_mb": r["peak_rss_mb"]})


# ----------------------------------------------------------------------------------------------------------- sdpo
def sdpo_worker(work: Path, name: str, overrides: list[str], threads: int, ref_extra: list[int]) -> None:
    """sdpo's real stages on the bench rows (bench.common.sdpo_stages), training timed by its train log."""
    import torch

    torch.set_num_threads(threads)
    warm_imports(work / "model")
    rss_imports = peak_rss_mb()
    run_dir = work / "runs" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg, stages = sdpo_stages(work / "sdpo.yaml", [f"run_dir={run_dir}", *overrides], clock_log=True,
                              extra_reflogp={f"reflogp_b{b}": [f"inference.batch_size={b}"] for b in ref_extra})
    records = train_log(cfg, 1)
    data = token_counts(step_pairs(cfg, 1))
    log = log_figures(records, warmup=0, trl_per_distinct=data["trl"] / data["distinct"])
    train, ref = stages["train"], stages["reflogp"]
    watched = train["log_clock"]  # the same window in CPU time: from the log's creation to its last record
    cpu = watched["cpu_s"]
    clock_ok = cpu is not None and len(watched["update_cpu_s"]) == len(records) and \
        abs(watched["wall_s"] - log["seconds"]) <= max(0.02 * log["seconds"], 0.05)
    extra = {k.removeprefix("reflogp_b"): {"ref_cpu_s": v["cpu_s"], "ref_wall_s": v["wall_s"],
                                           "ref_pairs_per_cpu_s": data["pairs"] / v["cpu_s"]}
             for k, v in stages.items() if k.startswith("reflogp_b")}
    emit({"kind": name, "system": "sdpo", "overrides": overrides, "updates": len(records), "pairs": log["pairs"],
          "tokens": log["tokens"], "data_pairs": data["pairs"], "data_tokens": data["distinct"],
          "log_counts_ok": log["pairs"] == data["pairs"] and log["tokens"] == data["distinct"],
          "token_mismatch_rows": same_pairs(step_pairs(cfg, 1), _rows(work)),
          "train_wall_s": log["seconds"], "tok_s": log["tok_s"], "trl_tok_s": log["trl_tok_s"],
          "update_s": log["update_seconds"], "train_cpu_s": cpu, "update_cpu_s": watched["update_cpu_s"],
          "watched_wall_s": watched["wall_s"], "log_clock_ok": clock_ok,
          "tok_per_cpu_s": log["tokens"] / cpu if cpu else None,
          "trl_tok_per_cpu_s": data["trl"] / cpu if cpu and log["pairs"] == data["pairs"] else None,
          "s_per_update_cpu": cpu / len(records) if cpu else None,
          "cpu_util": cpu / log["seconds"] if cpu else None,
          "train_call_wall_s": train["wall_s"], "train_call_cpu_s": train["cpu_s"],
          "ref_cpu_s": ref["cpu_s"], "ref_wall_s": ref["wall_s"], "ref_pairs_per_cpu_s": data["pairs"] / ref["cpu_s"],
          "ref_extra": extra, "split_s": stages["split"]["wall_s"],
          "first_loss": records[0]["loss"], "last_loss": records[-1]["loss"],
          "ln2_ok": records[0].get("check") == "ok" and abs(records[0]["loss/dpo"] - math.log(2)) < 1e-4,
          "rss_after_imports_mb": rss_imports, "rss_after_reflogp_mb": stages["reflogp"]["peak_rss_mb"],
          "peak_rss_mb": peak_rss_mb()})
    shutil.rmtree(run_dir, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ plain baseline
def plain_worker(work: Path, live_ref: bool, threads: int) -> None:
    """The ablation table's baseline: a plain Hugging Face-style DPO loop that uses nothing of sdpo_cli. Padded
    [prompt + chosen; prompt + rejected] rows, batches in random order, the model's full [rows, L, V] logits with
    log_softmax in autograd; the reference is a second resident model run at every update (live_ref, as TRL's
    default) or scored once before training by the same code (not timed). Timed in process CPU (and wall) seconds
    from before the first batch to after the last update, the window of sdpo's train log."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, get_scheduler

    torch.set_num_threads(threads)
    rows = _rows(work)
    rss_imports = peak_rss_mb()

    def load():
        return AutoModelForCausalLM.from_pretrained(str(work / "model"), dtype=torch.float32,
                                                    attn_implementation="sdpa")

    def logps(model, pairs):  # (chosen, rejected) summed completion log-probs
        seqs = [(x["prompt_ids"], x[k]) for k in ("chosen_ids", "rejected_ids") for x in pairs]
        width = max(len(p) + len(c) for p, c in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        attention = torch.zeros_like(ids)
        scored = torch.zeros(len(seqs), width - 1)
        for i, (p, c) in enumerate(seqs):
            ids[i, :len(p) + len(c)] = torch.tensor(p + c)
            attention[i, :len(p) + len(c)] = 1
            scored[i, len(p) - 1:len(p) + len(c) - 1] = 1  # position j predicts token j + 1
        logits = model(input_ids=ids, attention_mask=attention, use_cache=False).logits[:, :-1]
        per_token = F.log_softmax(logits.float(), dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        out = (per_token * scored).sum(-1)
        return out[:len(pairs)], out[len(pairs):]

    model = load().train()
    reference = load().eval() if live_ref else None
    ref_c = ref_r = None
    if not live_ref:
        with torch.inference_mode():
            scores = [logps(model, rows[s:s + REF_BATCH]) for s in range(0, len(rows), REF_BATCH)]
        ref_c, ref_r = torch.cat([c for c, _ in scores]), torch.cat([r for _, r in scores])
    perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)).tolist()
    batches = [perm[s:s + BATCH] for s in range(0, len(perm), BATCH)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0, fused=True)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=0, num_training_steps=len(batches))
    losses = []
    t0, c0 = time.perf_counter(), time.process_time()
    for idx in batches:
        pairs = [rows[i] for i in idx]
        pc, pr = logps(model, pairs)
        if reference is not None:
            with torch.no_grad():
                rc, rr = logps(reference, pairs)
        else:
            rc, rr = ref_c[idx], ref_r[idx]
        loss = -F.logsigmoid(BETA * ((pc - rc) - (pr - rr))).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    c = token_counts(rows)
    emit({"kind": "plain_liveref" if live_ref else "plain", "system": "plain", "updates": len(batches),
          "pairs": len(rows), "tokens": c["distinct"], "train_wall_s": wall, "train_cpu_s": cpu, "cpu_util": cpu / wall,
          "tok_s": c["distinct"] / wall, "trl_tok_s": c["trl"] / wall, "tok_per_cpu_s": c["distinct"] / cpu,
          "trl_tok_per_cpu_s": c["trl"] / cpu, "s_per_update_cpu": cpu / len(batches),
          "first_loss": losses[0], "last_loss": losses[-1], "ln2_ok": abs(losses[0] - math.log(2)) < 1e-4,
          "rss_after_imports_mb": rss_imports, "peak_rss_mb": peak_rss_mb()})


# ------------------------------------------------------------------------------------------------------------ CLI
def cli_worker(work: Path, steps: int, threads: int) -> None:
    """`sdpo run` on the bench rows: DPO (T=1) or sDPO (T=2, random halves); CPU time of the whole command."""
    run_dir = Path(tempfile.mkdtemp(prefix=f"sdpo-cli-T{steps}-", dir=work))
    fractions = "[1.0]" if steps == 1 else "[" + ",".join([str(1 / steps)] * steps) + "]"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "sdpo_cli", "run", str(work / "sdpo.yaml"), f"run_dir={run_dir}",
                           f"split.fractions={fractions}", "train.logging_every=1000"],
                          capture_output=True, text=True, env=env(threads), cwd=str(ROOT))
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    result = {"kind": f"cli_T{steps}", "system": "cli", "steps": steps, "pairs": len(_rows(work)), "cpu_s": cpu,
              "wall_s": wall, "rc": proc.returncode}
    if proc.returncode:
        result["error"] = (proc.stderr or proc.stdout)[-800:]
    else:
        shutil.rmtree(run_dir, ignore_errors=True)  # two checkpoints per step: keep the work dir small
    emit(result)


# ----------------------------------------------------------------------------------------------------- orchestrate
ABLATIONS = [  # one technique at a time, from a plain HF-style loop to the full sdpo configuration
    ("plain_liveref", ["--worker", "plain", "--live-ref", "1"]),
    ("plain", ["--worker", "plain"]),
    ("sdpo_padded_random", ["--worker", "sdpo", "--set", "train.layout=padded",
                            "--set", "train.group_by_length=false"]),
    ("sdpo_padded_grouped", ["--worker", "sdpo", "--set", "train.layout=padded"]),
    ("sdpo_prefix_random", ["--worker", "sdpo", "--set", "train.group_by_length=false"]),
    ("sdpo_prefix_grouped_gc", ["--worker", "sdpo", "--set", "train.gradient_checkpointing=true"]),
    ("sdpo_packed_grouped", ["--worker", "sdpo", "--set", "train.layout=packed"]),
    ("sdpo_prefix_grouped_compiled", ["--worker", "sdpo", "--set", "train.compile=true"]),
    # sdpo as before issue 16's techniques: the explicit prefix mask, 128 MiB head chunks, glibc's mmap threshold
    ("sdpo_before_long_pairs", ["--worker", "sdpo", "--set", "runtime.prefix_attention=mask", "--set",
                                "runtime.head_chunk_mb=128", "--set", "runtime.mmap_threshold_mb=null"]),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke-sized: 2 updates, 1 repeat")
    ap.add_argument("--updates", type=int, default=None, help="updates per training run (default 6; quick 2)")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 2; quick 1)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in every subprocess")
    ap.add_argument("--ablations", action="store_true", help="also run the one-technique-at-a-time variants")
    ap.add_argument("--only", default=None, help="comma-separated subset of trl_default,trl_precompute,sdpo,"
                                                 "cli_T1,cli_T2 or an ablation name (default: all)")
    ap.add_argument("--workdir", default=None, help="keep model, tokenizer, rows and logs here (default: a temp dir)")
    ap.add_argument("--out", default=None, help="append every result as a JSON line to this file")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--name", default="sdpo", help=argparse.SUPPRESS)
    ap.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)
    ap.add_argument("--live-ref", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--ref-extra", default="", help=argparse.SUPPRESS)
    ap.add_argument("--rows", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=1, help=argparse.SUPPRESS)
    a = ap.parse_args()

    if a.worker:
        work = Path(a.workdir)
        if a.worker == "prep":
            prep(work, a.rows)
        elif a.worker in ("trl_default", "trl_precompute"):
            trl_worker(work, precompute=a.worker == "trl_precompute", threads=a.threads)
        elif a.worker == "sdpo":
            sdpo_worker(work, a.name, a.set, a.threads, [int(x) for x in a.ref_extra.split(",") if x])
        elif a.worker == "plain":
            plain_worker(work, bool(a.live_ref), a.threads)
        elif a.worker == "cli":
            cli_worker(work, a.steps, a.threads)
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
    info = spawn("bench.cpu", "prep", ["--worker", "prep", "--rows", str(updates * BATCH)], work, a.threads, 900,
                 work / "logs" / "prep.log")
    if info is None:
        raise SystemExit("prep failed")
    print(f"  model {info['params'] / 1e6:.1f}M params, tokenizer vocab {info['tokenizer_vocab']}, "
          f"{info['rows_fitting']} UltraFeedback rows fit {MAX_LENGTH} tokens, using {info['rows']} "
          f"({info['distinct_tokens']} distinct tokens, {info['trl_tokens']} in TRL's count)", flush=True)

    plan = [("trl_default", ["--worker", "trl_default"]), ("trl_precompute", ["--worker", "trl_precompute"]),
            ("sdpo", ["--worker", "sdpo", "--ref-extra", str(BATCH)]),
            ("cli_T1", ["--worker", "cli", "--steps", "1"]), ("cli_T2", ["--worker", "cli", "--steps", "2"])]
    if a.only:  # any of the plan's names or the ablations', interleaved like the plan
        wanted = set(a.only.split(","))
        plan = [(name, args) for name, args in plan + ABLATIONS if name in wanted]
    results: dict[str, list[dict]] = {name: [] for name, _ in plan}
    out = open(a.out, "a") if a.out else None

    def run(name: str, args: list[str], rep: int) -> None:
        if args[1] == "sdpo":
            args = [*args, "--name", name]
        r = spawn("bench.cpu", name, args, work, a.threads, 900, work / "logs" / f"{name}-{rep}.log")
        if r is not None:
            r["repeat"] = rep
            results.setdefault(name, []).append(r)
            if out:
                out.write(json.dumps(r) + "\n")
                out.flush()
        _progress(name, r)

    for rep in range(repeats):
        for name, args in (plan if rep % 2 == 0 else plan[::-1]):  # interleaved, alternating order
            run(name, args, rep)
    if a.ablations:
        for name, args in ABLATIONS:
            run(name, args, 0)
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
        print(f"  {name:<28} {num(r.get('tok_per_cpu_s'), 0):>7} tok/cpu-s  {num(r.get('s_per_update_cpu'))} "
              f"cpu-s/update  ({num(r.get('tok_s'), 0)} tok/wall-s, cpu util {num(r.get('cpu_util'))})  peak RSS "
              f"{r['peak_rss_mb']:6.0f} MB{ref}", flush=True)


def _median(results: list[dict], key: str) -> float:
    values = [r[key] for r in results if r and r.get(key) is not None]
    return statistics.median(values) if values else float("nan")


def _report(results: dict[str, list[dict]], elapsed: float) -> None:
    keys = ("tok_per_cpu_s", "trl_tok_per_cpu_s", "tok_s", "s_per_update_cpu", "cpu_util", "peak_rss_mb",
            "rss_after_imports_mb", "ref_pairs_per_cpu_s", "cpu_s", "wall_s")
    m = {name: {k: _median(rs, k) for k in keys} for name, rs in results.items()}
    print("\nmedians (distinct tokens per CPU-second of the training window, sdpo's window from its train log; one "
          "thread):")
    for name, v in m.items():
        if name.startswith("cli"):
            print(f"  {name:<28} cpu {num(v['cpu_s'], 1, 'nan')}s wall {num(v['wall_s'], 1, 'nan')}s")
        else:
            print(f"  {name:<28} {num(v['tok_per_cpu_s'], 0, 'nan'):>7} tok/s ({num(v['trl_tok_per_cpu_s'], 0, 'nan')} "
                  f"in TRL's count)  {num(v['s_per_update_cpu'], 2, 'nan')} s/update  wall {num(v['tok_s'], 0, 'nan')} "
                  f"tok/s (cpu util {num(v['cpu_util'], 2, 'nan')})  peak RSS {num(v['peak_rss_mb'], 0, 'nan')} MB "
                  f"(imports {num(v['rss_after_imports_mb'], 0, 'nan')} MB)"
                  + (f"  reflogp {num(v['ref_pairs_per_cpu_s'], 1)} pairs/cpu-s"
                     if v["ref_pairs_per_cpu_s"] == v["ref_pairs_per_cpu_s"] else ""))
    sd = results.get("sdpo") or []
    same_bs = [r["ref_extra"].get(str(BATCH), {}).get("ref_pairs_per_cpu_s") for r in sd if r.get("ref_extra")]
    if any(same_bs):
        print(f"  sdpo reflogp at TRL's batch size {BATCH}: {num(statistics.median(same_bs), 1)} pairs/cpu-s")
    mism = [r.get("token_mismatch_rows") for rs in results.values() for r in rs if r.get("system") in ("trl", "sdpo")]
    print(f"  rows tokenised differently from ours (TRL, sdpo split): {mism}; update 0 ln 2 check: "
          f"{[r.get('ln2_ok') for rs in results.values() for r in rs if 'ln2_ok' in r]}")
    for name, rs in results.items():
        for r in rs:
            if r.get("system") != "sdpo":
                continue
            if not r.get("log_counts_ok"):
                print(f"  ! {name}: the train log counted {r['pairs']} pairs / {r['tokens']} tokens, the step's data "
                      f"holds {r['data_pairs']} / {r['data_tokens']}")
            if not r.get("log_clock_ok"):
                print(f"  ! {name}: the watched log window ({num(r.get('watched_wall_s'))} s) is not the records' own "
                      f"({num(r.get('train_wall_s'))} s): the CPU-time figures do not cover the logged updates")
    busy = sorted({name for name, rs in results.items() for r in rs if (r.get("cpu_util") or 1.0) < 0.9})
    if busy:
        print(f"  note: CPU utilisation under 0.9 in {busy}: a busy machine; the CPU-time figures hold up, wall-clock "
              "ones do not")
    errors = [r.get("error") for k in ("cli_T1", "cli_T2") for r in results.get(k, []) if r.get("rc")]
    for e in errors:
        print(f"  ! CLI error: {e}")
    nan = {k: float("nan") for k in keys}
    s, d, p = (m.get(k, nan) for k in ("sdpo", "trl_default", "trl_precompute"))
    t1, t2 = m.get("cli_T1", nan)["cpu_s"], m.get("cli_T2", nan)["cpu_s"]
    if t1 == t1 and t2 == t2:
        print(f"  sDPO T=2 vs DPO T=1 (sdpo run): {t2 - t1:+.1f} CPU-s for the second step's fixed costs")
    if errors:
        t1 = t2 = float("nan")
    print(f"\nbench finished in {elapsed / 60:.1f} min")
    print(f"RESULT train_vs_trl_default={num(s['tok_per_cpu_s'] / d['tok_per_cpu_s'], 2, 'nan')} "
          f"train_vs_trl_precompute={num(s['tok_per_cpu_s'] / p['tok_per_cpu_s'], 2, 'nan')} "
          f"peak_rss_vs_trl_default={num(s['peak_rss_mb'] / d['peak_rss_mb'], 2, 'nan')} "
          f"reflogp_vs_trl_precompute={num(s['ref_pairs_per_cpu_s'] / p['ref_pairs_per_cpu_s'], 2, 'nan')} "
          f"sdpo_t2_vs_dpo_t1={num(t2 / t1, 2, 'nan')}", flush=True)


if __name__ == "__main__":
    main()
