"""Long pairs: sdpo vs TRL 1.16 DPOTrainer at 1K, 4K and 8K tokens per sequence on this machine's CPU (issue 16).

    python -m bench.long                          # make bench-long: 1K, 4K, 8K (2 repeats up to 4K), 4 GiB search
    python -m bench.long --lengths 1024,4096 --repeats 2 --no-search
    python -m bench.long --quick                  # smoke run: 512 tokens, no search, < 2 minutes

Setup (docs/performance.md, "Long pairs"):
  model     the `make bench` model (bench/cpu.py: Llama, vocab 32000, hidden 256, 6 layers, 4 heads / 2 KV heads, MLP
            704, untied head, 20.8M parameters, random init seed 0) with max_position_embeddings 32768, fp32, sdpa.
  tokenizer the real Mistral 7B v0.1 SentencePiece tokenizer (../shared/fixtures/mistral-7b-v0.1-tokenizer/,
            loaded as a fast LlamaTokenizer as the fixture README says; pad = unk on sdpo's side, TRL's own choice
            on its side).
  pairs     2 pairs per length L from real UltraFeedback text (../shared/fixtures/ultrafeedback_binarized.sample
            .jsonl): the prompt is the prompts of consecutive rows joined by a blank line, the chosen reply the same
            rows' chosen replies, the rejected reply their rejected replies, cycling through the 300 rows where one
            pass is not long enough (pair 2 starts 150 rows after pair 1). Each text is cut at a token boundary so
            that, tokenised TRL's way (tok(prompt), tok(prompt + reply + EOS), split at the common prefix), the prompt
            has L/2 tokens (BOS included) and prompt + chosen = prompt + rejected = L tokens (EOS included). Both
            sides get max_length = L, so neither truncates (checked for TRL).
  updates   one pair per update, 2 updates, lr 1e-6 linear, AdamW, clip 1.0, beta 0.1, sigmoid, fp32, one thread.
  TRL       `trl_default`: DPOConfig defaults (gradient checkpointing on, live reference model) + use_cpu=True,
            bf16=False; `trl_precompute`: the same + precompute_ref_log_probs=True (bench.common.run_trl).
  sdpo      the CLI, `python -m sdpo_cli run CONFIG` (split, reflogp, train, checkpoint save, loss plot) on a generated
            config: split random [1.0], train.per_device_batch_size=1, train.max_updates=2, layout prefix, length
            grouping, inference.batch_size=1, save_every 0. Rows: `sdpo` (sdpo's defaults: the prefix attention as
            causal pieces, gradient checkpointing `auto`), `sdpo_nogc` (the same, train.gradient_checkpointing=false)
            and `sdpo_mask` (runtime.prefix_attention=mask, train.gradient_checkpointing=true: sdpo before issue
            16's techniques, but for the head chunk). The RESULT line uses --result-row (sdpo).

Every figure is of one whole command in its own process group:
  peak RSS  the larger of the command's ru_maxrss (os.wait4) and the polled RSS sum of its process tree (20 ms);
  time      process CPU seconds of the command (user + sys, os.wait4) less a start-up baseline (a command that imports
            what the side imports and loads the model twice, as both sides do), divided by the 2 updates. So sdpo's
            figure includes its split, reference pass and checkpoint save; TRL's its tokenisation and (precompute)
            reference pass.
  longest   the longest L (512..32768 in steps of 512, bisected) whose command stays within a 4 GiB peak RSS; a
            command is killed as soon as its tree passes the budget (it does not fit).

Rows run interleaved (alternating order per repeat). Before each command the free memory is checked against the
expected peak + 4 GB (waits, then skips); each command is also killed if its tree nears the machine's free memory.

Results: every command as a JSON line, and the summary, in WORKDIR/bench_long.json (default workdir
runs/bench-long/, git-ignored); the plot of peak RSS against length in docs/img/bench_long_memory.png.

Last line: RESULT mem_vs_trl_precompute_4k=... mem_vs_trl_precompute_8k=... mem_vs_trl_default_8k=...
time_vs_trl_default_8k=... longest_vs_trl_default=...   (sdpo / TRL; time as CPU seconds per update)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.common import FIXTURES, MARK, ROOT, emit, env, num, write_sdpo_inputs

VOCAB = 32000
UPDATES = 2
MAX_POSITIONS = 32768
STEP = 512  # the search's granularity
BUDGET_MB = 4096.0  # 4 GiB, in MiB like ru_maxrss / 1024
ROWS = ("sdpo", "sdpo_nogc", "sdpo_mask", "trl_default", "trl_precompute")
SDPO_SETS = {"sdpo": [], "sdpo_nogc": ["train.gradient_checkpointing=false"],
             "sdpo_mask": ["runtime.prefix_attention=mask", "train.gradient_checkpointing=true"]}
TOKENIZER = FIXTURES / "mistral-7b-v0.1-tokenizer"
# rough peak RSS (MB) per 1K tokens of L, used only to decide whether there is room to start a command
PRIOR_MB_PER_K = {"sdpo": 250, "sdpo_nogc": 450, "sdpo_mask": 450, "trl_default": 1600, "trl_precompute": 1600}
PRIOR_BASE_MB = {"sdpo": 600, "sdpo_nogc": 600, "sdpo_mask": 600, "trl_default": 1700, "trl_precompute": 1700}


# ----------------------------------------------------------------------------------------------------------- prep
def build_model(work: Path) -> Path:
    """work/model: the bench model (max_position_embeddings raised) + the Mistral tokenizer; kept when present."""
    model_dir = work / "model"
    if (model_dir / "config.json").is_file() and (model_dir / "tokenizer.json").is_file():
        return model_dir
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok_dir = work / "tokenizer-src"
    tok_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(TOKENIZER / "tokenizer.model", tok_dir / "tokenizer.model")
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
         "add_bos_token": True, "add_eos_token": False, "legacy": False}))
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    assert len(tok) == VOCAB, len(tok)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=704, num_hidden_layers=6,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_POSITIONS,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    LlamaForCausalLM(config).save_pretrained(str(model_dir))
    tok.save_pretrained(str(model_dir))
    return model_dir


def _cut(tok, text: str, n: int) -> str:
    """The text up to its n-th token (tokenised alone, no special tokens)."""
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    if n >= len(enc["input_ids"]):
        return text
    return text[:enc["offset_mapping"][n][0]]


def _long_text(texts: list[str], start: int, tokens: int, tok) -> str:
    """Texts from `start` on (cycling), joined by blank lines, until they hold > `tokens` tokens, cut to `tokens`."""
    parts, i, total = [], start, 0
    while total <= tokens + 16:
        t = texts[i % len(texts)].strip()
        parts.append(t)
        total += len(tok(t, add_special_tokens=False)["input_ids"]) + 2
        i += 1
    return _cut(tok, "\n\n".join(parts), tokens)


def make_pair(tok, uf: list[dict], start: int, length: int) -> dict:
    """One pair of `length` tokens per sequence (TRL's tokenisation): prompt L/2 (BOS included), replies L - L/2."""
    from sdpo_cli.data.tokenize import common_prefix_length

    eos = tok.eos_token
    prompt = _long_text([r["prompt"] for r in uf], start, length // 2 - 3, tok) + "\n\n"  # + BOS, 2 newlines
    p = tok(prompt)["input_ids"]
    pair = {"prompt": prompt}
    for key, col in (("chosen", "chosen"), ("rejected", "rejected")):
        want = length - len(p)  # reply tokens incl. EOS, if the prompt's tokens stay as they are
        source = _long_text([r[col][-1]["content"] for r in uf], start, want + 8, tok)
        k = want - 1
        for _ in range(20):  # prompt + reply + EOS tokenised together: adjust the reply's cut until it is L tokens
            reply = _cut(tok, source, k)
            total = len(tok(prompt + reply + eos)["input_ids"])
            if length - 2 <= total <= length:
                break
            k += length - total
        pair[key] = reply
    # TRL 1.16's tokenisation, as bench/cpu.py: prompt ids, then the replies after the common token prefix
    fc, fr = tok(prompt + pair["chosen"] + eos)["input_ids"], tok(prompt + pair["rejected"] + eos)["input_ids"]
    n = min(common_prefix_length(p, fc), common_prefix_length(p, fr))
    pair.update(prompt_ids=p[:n], chosen_ids=fc[n:], rejected_ids=fr[n:])
    return pair


def prep_length(work: Path, length: int) -> Path:
    """work/L{length}/: rows.json (texts + ids), rows.jsonl (sdpo's preference source), sdpo.yaml."""
    from transformers import AutoTokenizer

    d = work / f"L{length}"
    if (d / "sdpo.yaml").is_file():
        return d
    d.mkdir(parents=True, exist_ok=True)
    model_dir = work / "model"
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    uf = [json.loads(line) for line in (FIXTURES / "ultrafeedback_binarized.sample.jsonl").open()]
    uf = [r for r in uf if r["chosen"][-1]["content"] != r["rejected"][-1]["content"]]
    rows = [make_pair(tok, uf, start, length) for start in (0, len(uf) // 2)]
    for r in rows:
        seq = [len(r["prompt_ids"]) + len(r[k]) for k in ("chosen_ids", "rejected_ids")]
        if max(seq) > length or min(seq) < length - 16:
            raise SystemExit(f"L={length}: built a pair of {seq} tokens")
    write_sdpo_inputs(d, rows, model_dir, max_length=length, run_name="x", inference_batch=1,
                      train={"max_updates": UPDATES, "per_device_batch_size": 1})
    return d


def prep_worker(work: Path, lengths: list[int]) -> None:
    build_model(work)
    info = {}
    for length in lengths:
        rows = json.loads((prep_length(work, length) / "rows.json").read_text())
        info[str(length)] = [{"P": len(r["prompt_ids"]), "C": len(r["chosen_ids"]), "R": len(r["rejected_ids"])}
                             for r in rows]
    emit({"kind": "prep", "pairs": info})


# --------------------------------------------------------------------------------------------------------- workers
def trl_worker(work: Path, length: int, precompute: bool, threads: int) -> None:
    import torch

    from bench.common import run_trl

    torch.set_num_threads(threads)
    rows = json.loads((work / f"L{length}" / "rows.json").read_text())
    r = run_trl(work, [{k: x[k] for k in ("prompt", "chosen", "rejected")} for x in rows], rows, batch=1,
                max_length=length, updates=UPDATES, precompute=precompute, cuda=False)
    (w0, c0), (w1, c1) = r["stamps"][0], r["end"]
    emit({"kind": "trl", "updates": r["updates"], "train_wall_s": w1 - w0, "train_cpu_s": c1 - c0,
          "ref_cpu_s": r["ref_cpu_s"], "token_mismatch_rows": r["token_mismatch_rows"],
          "first_loss": r["first_loss"], "inner_peak_rss_mb": r["peak_rss_mb"]})


def startup_worker(work: Path, side: str) -> None:
    """The start-up baseline: what the side's command imports, and two model loads (policy + reference)."""
    from transformers import AutoModelForCausalLM

    if side == "trl":
        from trl import DPOConfig, DPOTrainer  # noqa: F401
    else:
        import sdpo_cli.cli  # noqa: F401
        import sdpo_cli.pipeline  # noqa: F401
    import datasets  # noqa: F401
    for _ in range(2):
        AutoModelForCausalLM.from_pretrained(str(work / "model"), dtype="float32")
    emit({"kind": "startup", "side": side})


# ------------------------------------------------------------------------------------------------- one command
def _tree_rss(proc) -> int:
    import psutil

    total = 0
    try:
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def measure(cmd: list[str], log: Path, *, kill_mb: float, timeout: float, extra_env: dict | None = None) -> dict:
    """Run `cmd` in its own process group (output to `log`): its CPU seconds and ru_maxrss (os.wait4), the polled
    peak RSS of its tree, and whether it was killed for passing `kill_mb` or `timeout`."""
    import psutil

    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env={**env(1), **(extra_env or {})},
                                cwd=str(ROOT), start_new_session=True)
        ps = psutil.Process(proc.pid)
        peak, killed = 0, None
        while True:
            pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            peak = max(peak, _tree_rss(ps))
            if killed is None and peak / 2**20 > kill_mb:
                killed = "memory"
            elif killed is None and time.perf_counter() - t0 > timeout:
                killed = "timeout"
            if killed:
                os.killpg(proc.pid, signal.SIGKILL)
                pid, status, ru = os.wait4(proc.pid, 0)
                break
            time.sleep(0.02)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    out = {"rc": proc.returncode, "killed": killed, "wall_s": wall, "cpu_s": ru.ru_utime + ru.ru_stime,
           "maxrss_mb": ru.ru_maxrss / 1024, "polled_peak_mb": peak / 2**20,
           "peak_rss_mb": max(ru.ru_maxrss / 1024, peak / 2**20)}
    for line in log.read_text(errors="replace").splitlines()[::-1]:
        if line.startswith(MARK):
            out["inner"] = json.loads(line[len(MARK):])
            break
    return out


class Runner:
    def __init__(self, work: Path, timeout: float, out: Path):
        self.work, self.timeout, self.out = work, timeout, out
        self.records: list[dict] = []
        self.startup: dict[str, list[float]] = {"sdpo": [], "trl": []}
        self.counter = 0

    def expected_mb(self, row: str, length: int) -> float:
        done = [r for r in self.records if r["row"] == row and not r.get("killed") and r.get("rc") == 0]
        below = [r for r in done if r["length"] <= length]
        if below:  # scale the nearest measured length linearly, 20 % margin
            r = max(below, key=lambda x: x["length"])
            return 1.2 * (r["peak_rss_mb"] * length / r["length"])
        return PRIOR_BASE_MB[row] + PRIOR_MB_PER_K[row] * length / 1024

    def room(self, need_mb: float, wait_s: float = 300) -> float | None:
        """Available MB once need_mb + 4 GB is available (waits up to wait_s), else None."""
        import psutil

        deadline = time.time() + wait_s
        while True:
            avail = psutil.virtual_memory().available / 2**20
            if avail >= need_mb + 4096:
                return avail
            if time.time() > deadline:
                return None
            print(f"    waiting for memory: {avail:,.0f} MB available, {need_mb + 4096:,.0f} needed", flush=True)
            time.sleep(30)

    def run(self, row: str, length: int, *, budget_mb: float | None = None, tag: str = "table",
            repeat: int = 0, timeout: float | None = None) -> dict | None:
        need = min(budget_mb, self.expected_mb(row, length)) if budget_mb else self.expected_mb(row, length)
        avail = self.room(need)
        if avail is None:
            print(f"  {row:<15} L={length:<6} SKIPPED: not enough free memory for ~{need:,.0f} MB + 4 GB", flush=True)
            rec = {"row": row, "length": length, "tag": tag, "repeat": repeat, "skipped": "memory"}
            self._save(rec)
            return None
        kill_mb = min(budget_mb or float("inf"), avail - 1536)  # never let a command push the machine out of memory
        d = self.work / f"L{length}"
        self.counter += 1
        log = self.work / "logs" / f"{tag}-{row}-L{length}-{self.counter}.log"
        if row.startswith("sdpo"):
            run_dir = d / "runs" / f"{row}-{self.counter}"
            shutil.rmtree(run_dir, ignore_errors=True)
            cmd = [sys.executable, "-m", "sdpo_cli", "run", str(d / "sdpo.yaml"), f"run_dir={run_dir}",
                   *SDPO_SETS[row]]
        else:
            run_dir = None
            cmd = [sys.executable, "-m", "bench.long", "--worker", "trl", "--length", str(length),
                   "--precompute", str(int(row == "trl_precompute")), "--workdir", str(self.work)]
        m = measure(cmd, log, kill_mb=kill_mb, timeout=timeout or self.timeout)
        rec = {"row": row, "length": length, "tag": tag, "repeat": repeat, "log": str(log), "kill_mb": kill_mb, **m}
        if m["rc"] != 0 and not m["killed"]:
            print(f"  ! {row} L={length} failed (rc {m['rc']}); last lines of {log}:", flush=True)
            print("\n".join("    " + x for x in log.read_text(errors="replace").splitlines()[-15:]), flush=True)
        if run_dir is not None:
            rec["train_log"] = _train_log(run_dir)
            shutil.rmtree(run_dir, ignore_errors=True)
        side = "sdpo" if row.startswith("sdpo") else "trl"
        base = statistics.median(self.startup[side]) if self.startup[side] else 0.0
        rec["startup_cpu_s"] = base
        rec["s_per_update"] = (m["cpu_s"] - base) / UPDATES if m["rc"] == 0 else None
        state = f"KILLED ({m['killed']})" if m["killed"] else ("ok" if m["rc"] == 0 else f"rc {m['rc']}")
        print(f"  {tag:<6} {row:<15} L={length:<6} peak RSS {rec['peak_rss_mb']:8,.0f} MB  cpu {m['cpu_s']:7.1f} s  "
              f"wall {m['wall_s']:7.1f} s  s/update {num(rec['s_per_update'], 1)}  {state}", flush=True)
        self._save(rec)
        return rec

    def run_startup(self, side: str) -> None:
        self.counter += 1
        m = measure([sys.executable, "-m", "bench.long", "--worker", "startup", "--side", side, "--workdir",
                     str(self.work)], self.work / "logs" / f"startup-{side}-{self.counter}.log", kill_mb=float("inf"),
                    timeout=600)
        if m["rc"] == 0:
            self.startup[side].append(m["cpu_s"])
        print(f"  start-up {side:<5} cpu {m['cpu_s']:5.1f} s  wall {m['wall_s']:5.1f} s  peak RSS "
              f"{m['peak_rss_mb']:,.0f} MB  rc {m['rc']}", flush=True)
        self._save({"row": f"startup_{side}", "tag": "startup", **m})

    def _save(self, rec: dict) -> None:
        self.records.append(rec)
        with open(self.out.with_suffix(".jsonl"), "a") as f:
            f.write(json.dumps(rec) + "\n")


def _train_log(run_dir: Path) -> list[dict] | None:
    path = run_dir / "logs" / "train-step-1.jsonl"
    if not path.is_file():
        return None
    keep = ("update", "pairs", "tokens", "tokens/s", "loss", "loss/dpo", "check")
    return [{k: v for k, v in json.loads(x).items() if k in keep} for x in path.read_text().splitlines() if x.strip()]


# ------------------------------------------------------------------------------------------------------- search
def _predict(runner: Runner, row: str) -> int | None:
    """The length (in STEPs) where the row's peak RSS reaches the budget, from a fit of peak RSS against length over
    its completed commands (quadratic with 3 or more lengths: the prefix mask and attention grow with L²)."""
    import numpy as np

    pts = {}
    for r in runner.records:
        if r.get("row") == row and r.get("rc") == 0 and not r.get("killed") and r.get("length"):
            pts.setdefault(r["length"], []).append(r["peak_rss_mb"])
    if len(pts) < 2:
        return None
    x = np.array(sorted(pts), dtype=float)
    y = np.array([statistics.median(pts[v]) for v in sorted(pts)])
    coef = np.polyfit(x, y, 2 if len(x) >= 3 else 1)
    coef[-1] -= BUDGET_MB
    roots = [z.real for z in np.roots(coef) if abs(z.imag) < 1e-9 and z.real > 0]
    return int(min(roots) // STEP) if roots else None


def longest(runner: Runner, row: str, hi_len: int, until: float | None = None) -> dict:
    """Largest multiple of STEP in [STEP, hi_len] whose command stays within BUDGET_MB (monotone assumed). Known
    results (completed commands, and ones killed over the budget) seed the bounds. The first two probes go where a fit
    of peak RSS against length predicts the budget is reached (so a good fit ends the search in two probes), the rest
    bisect. `until`: a wall-clock time (epoch seconds) after which no probe starts and a running one is stopped."""
    lo, hi = 0, hi_len // STEP + 1  # lo fits (0: nothing known), hi does not (hi_len + STEP: assumed)
    probes, unknown = [], None
    for r in runner.records:
        if r.get("row") != row or r.get("length", 0) % STEP or r.get("skipped"):
            continue
        k = r["length"] // STEP
        if r.get("rc") == 0 and r["peak_rss_mb"] <= BUDGET_MB:
            lo = max(lo, k)
        elif r.get("peak_rss_mb", 0) > BUDGET_MB and (r.get("killed") == "memory" or r.get("rc") == 0):
            hi = min(hi, k)
        else:
            continue
        if r.get("tag") == "search":  # probes of an earlier (resumed) session
            probes.append({"length": r["length"], "fits": r.get("rc") == 0 and r["peak_rss_mb"] <= BUDGET_MB,
                           "peak_rss_mb": r["peak_rss_mb"], "guess": None, "earlier": True})
    seeded = len(probes)
    while hi - lo > 1:
        guess = _predict(runner, row) if len(probes) - seeded < 2 else None
        mid = min(max(guess, lo + 1), hi - 1) if guess is not None else (lo + hi) // 2
        if until is not None and time.time() > until - 60:
            unknown = mid * STEP
            break
        timeout = runner.timeout if until is None else min(runner.timeout, until - time.time())
        r = runner.run(row, mid * STEP, budget_mb=BUDGET_MB, tag="search", timeout=timeout)
        verdict = r is not None and (r["rc"] == 0 or (r.get("killed") == "memory" and r["peak_rss_mb"] > BUDGET_MB))
        if not verdict:
            unknown = mid * STEP  # no verdict (skipped, timed out, failed): stop, report the bounds we have
            break
        fits = r["rc"] == 0 and r["peak_rss_mb"] <= BUDGET_MB
        probes.append({"length": mid * STEP, "fits": fits, "peak_rss_mb": r["peak_rss_mb"], "guess": guess})
        lo, hi = (mid, hi) if fits else (lo, mid)
    return {"row": row, "longest": lo * STEP, "first_over": hi * STEP if hi * STEP <= hi_len else None,
            "probes": probes, "no_verdict_at": unknown, "exact": unknown is None}


# ----------------------------------------------------------------------------------------------------- reporting
def summarise(runner: Runner, searches: dict) -> dict:
    table: dict[str, dict[int, dict]] = {}
    for r in runner.records:
        if r.get("tag") != "table":
            continue
        cell = table.setdefault(r["row"], {}).setdefault(r["length"], {"runs": []})
        cell["runs"].append(r)
    base = {side: statistics.median(v) if v else 0.0 for side, v in runner.startup.items()}
    for cells in table.values():
        for cell in cells.values():
            ok = [r for r in cell["runs"] if r.get("rc") == 0]
            for r in ok:  # against the median of all the start-up baselines, not those measured before the run
                r["s_per_update"] = (r["cpu_s"] - base["sdpo" if r["row"].startswith("sdpo") else "trl"]) / UPDATES
            cell["peak_rss_mb"] = statistics.median([r["peak_rss_mb"] for r in ok]) if ok else None
            peaks = [r["peak_rss_mb"] for r in ok]
            cell["peak_rss_range"] = [min(peaks), max(peaks)] if ok else None
            cell["s_per_update"] = statistics.median([r["s_per_update"] for r in ok]) if ok else None
            cell["cpu_s"] = statistics.median([r["cpu_s"] for r in ok]) if ok else None
            cell["wall_s"] = statistics.median([r["wall_s"] for r in ok]) if ok else None
            cell["n"] = len(ok)
            cell["state"] = "ok" if ok else ",".join(sorted({str(r.get("skipped") or r.get("killed") or r.get("rc"))
                                                             for r in cell["runs"]}))
            cell["runs"] = len(cell["runs"])
    return table


def _ratio(a, b):
    return a / b if a is not None and b else None


def report(runner: Runner, searches: dict, result_row: str, elapsed: float, out: Path, plot: Path | None) -> None:
    table = summarise(runner, searches)
    lengths = sorted({length for cells in table.values() for length in cells})
    print(f"\nmedians over the table's runs (peak RSS of the whole command, MB; CPU s per update after start-up "
          f"{num(statistics.median(runner.startup['sdpo']) if runner.startup['sdpo'] else None, 1)} s sdpo / "
          f"{num(statistics.median(runner.startup['trl']) if runner.startup['trl'] else None, 1)} s TRL):")
    print(f"  {'row':<15}" + "".join(f"{f'L={x}':>26}" for x in lengths) + f"{'longest ≤ 4 GiB':>18}")
    for row in ROWS:
        if row not in table and row not in searches:
            continue
        cells = table.get(row, {})
        line = f"  {row:<15}"
        for x in lengths:
            c = cells.get(x)
            if c is None:
                line += f"{'-':>26}"
            elif c["peak_rss_mb"] is None:
                line += f"{c['state']:>26}"
            else:
                line += f"{c['peak_rss_mb']:>12,.0f} MB {c['s_per_update']:>7.1f} s/u"
        s = searches.get(row)
        line += f"{(str(s['longest']) + ('' if s['exact'] else '+')) if s else '-':>18}"
        print(line)

    def cell(row, length, key):
        return (table.get(row, {}).get(length) or {}).get(key)

    s, d, p = result_row, "trl_default", "trl_precompute"
    res = {"mem_vs_trl_precompute_4k": _ratio(cell(s, 4096, "peak_rss_mb"), cell(p, 4096, "peak_rss_mb")),
           "mem_vs_trl_precompute_8k": _ratio(cell(s, 8192, "peak_rss_mb"), cell(p, 8192, "peak_rss_mb")),
           "mem_vs_trl_default_8k": _ratio(cell(s, 8192, "peak_rss_mb"), cell(d, 8192, "peak_rss_mb")),
           "time_vs_trl_default_8k": _ratio(cell(s, 8192, "s_per_update"), cell(d, 8192, "s_per_update")),
           "longest_vs_trl_default": _ratio((searches.get(s) or {}).get("longest"),
                                            (searches.get(d) or {}).get("longest"))}
    summary = {"setup": {"updates": UPDATES, "budget_mb": BUDGET_MB, "step": STEP, "result_row": result_row,
                         "sdpo_sets": SDPO_SETS, "startup_cpu_s": runner.startup},
               "table": {row: {str(k): v for k, v in cells.items()} for row, cells in table.items()},
               "searches": searches, "result": res, "elapsed_s": elapsed, "records": runner.records}
    out.write_text(json.dumps(summary, indent=1))
    if plot is not None:
        _plot(table, searches, plot)
    print(f"\nresults: {out}" + (f"; plot: {plot}" if plot else ""))
    print(f"bench-long finished in {elapsed / 60:.1f} min (RESULT row: {result_row})")
    print("RESULT " + " ".join(f"{k}={num(v, 2, 'nan')}" for k, v in res.items()), flush=True)


def _plot(table: dict, searches: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {"sdpo": "sdpo defaults (causal pieces, checkpointing auto)",
              "sdpo_nogc": "sdpo, causal pieces, no checkpointing",
              "sdpo_mask": "sdpo, L x L mask, checkpointing (before issue 16)",
              "trl_default": "TRL 1.16 defaults (checkpointing, live reference)",
              "trl_precompute": "TRL 1.16 precompute_ref_log_probs"}
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for row in ROWS:
        pts = sorted((int(k), v["peak_rss_mb"]) for k, v in table.get(row, {}).items() if v["peak_rss_mb"])
        for p in (searches.get(row) or {}).get("probes", []):
            if p["fits"]:
                pts.append((p["length"], p["peak_rss_mb"]))
        pts = sorted(set(pts))
        if pts:
            ax.plot([x for x, _ in pts], [y / 1024 for _, y in pts], marker="o", label=labels[row])
    ax.axhline(BUDGET_MB / 1024, color="grey", ls=":", lw=1)
    ax.text(ax.get_xlim()[0], BUDGET_MB / 1024, " 4 GiB budget", va="bottom", color="grey", fontsize=8)
    ax.set_xlabel("tokens per sequence (prompt + reply)")
    ax.set_ylabel("peak RSS of the whole command (GiB)")
    ax.set_title("Long pairs: 20.8M Llama, fp32, 1 pair/update, 2 updates, CPU")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", default="1024,4096,8192", help="tokens per sequence, comma-separated")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"subset of {','.join(ROWS)}")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved repeats of the table (quick: 1)")
    ap.add_argument("--repeat-max-length", type=int, default=4096,
                    help="repeats after the first run only the lengths up to this (0: all)")
    ap.add_argument("--quick", action="store_true", help="smoke run: L=512, rows sdpo + trl_default, no search")
    ap.add_argument("--no-search", action="store_true", help="skip the longest-within-4-GiB search")
    ap.add_argument("--search-rows", default="sdpo,trl_default,trl_precompute", help="rows to search")
    ap.add_argument("--search-max", type=int, default=32768, help="longest length the search tries")
    ap.add_argument("--result-row", default="sdpo", help="the sdpo row of the RESULT line")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per command")
    ap.add_argument("--workdir", default=None, help="model, pairs, logs, results (default runs/bench-long)")
    ap.add_argument("--resume", action="store_true",
                    help="keep WORKDIR/bench_long.jsonl's records: table runs done there are not rerun")
    ap.add_argument("--search-until", default=None,
                    help="UTC time HH:MM after which the search starts no probe (and stops a running one)")
    ap.add_argument("--plot", default=str(ROOT / "docs" / "img" / "bench_long_memory.png"),
                    help="the memory plot ('' for none)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--length", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--precompute", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--side", default="sdpo", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    a = ap.parse_args()
    work = Path(a.workdir) if a.workdir else ROOT / "runs" / ("bench-long-quick" if a.quick else "bench-long")

    if a.worker == "prep":
        prep_worker(work, [int(x) for x in a.lengths.split(",")])
        return
    if a.worker == "trl":
        trl_worker(work, a.length, bool(a.precompute), a.threads)
        return
    if a.worker == "startup":
        startup_worker(work, a.side)
        return

    lengths = [512] if a.quick else [int(x) for x in a.lengths.split(",")]
    repeats = 1 if a.quick else a.repeats
    rows = ["sdpo", "trl_default"] if a.quick else [x for x in a.rows.split(",") if x]
    search = not (a.no_search or a.quick)
    plot = Path(a.plot) if a.plot and not a.quick else None
    work.mkdir(parents=True, exist_ok=True)
    out = work / "bench_long.json"
    previous = []
    if a.resume and out.with_suffix(".jsonl").is_file():
        previous = [json.loads(x) for x in out.with_suffix(".jsonl").read_text().splitlines() if x.strip()]
    out.with_suffix(".jsonl").unlink(missing_ok=True)
    started = time.perf_counter()
    print(f"bench-long: lengths {lengths}, rows {rows}, {repeats} repeat(s), {UPDATES} updates of 1 pair, work dir "
          f"{work}", flush=True)
    runner = Runner(work, a.timeout, out)
    for rec in previous:
        runner._save(rec)
        if rec.get("tag") == "startup" and rec.get("rc") == 0:
            runner.startup[rec["row"].removeprefix("startup_")].append(rec["cpu_s"])
    done = {(r["row"], r["length"], r.get("repeat", 0)) for r in previous
            if r.get("tag") == "table" and (r.get("rc") == 0 or r.get("killed") or r.get("skipped"))}
    m = measure([sys.executable, "-m", "bench.long", "--worker", "prep", "--lengths", ",".join(map(str, lengths)),
                 "--workdir", str(work)], work / "logs" / "prep.log", kill_mb=float("inf"), timeout=1800)
    if m["rc"] != 0 or "inner" not in m:
        raise SystemExit(f"prep failed; see {work / 'logs' / 'prep.log'}")
    for length, pairs in m["inner"]["pairs"].items():
        print(f"  L={length}: pairs (P, C, R) = " + ", ".join(f"({x['P']}, {x['C']}, {x['R']})" for x in pairs),
              flush=True)
    sides = sorted({"sdpo" if r.startswith("sdpo") else "trl" for r in rows})
    for side in sides:
        if not runner.startup[side]:
            runner.run_startup(side)
    for rep in range(repeats):
        ran = False
        for length in lengths:
            if rep and a.repeat_max_length and length > a.repeat_max_length:
                continue
            for row in (rows if rep % 2 == 0 else rows[::-1]):
                if (row, length, rep) not in done:
                    runner.run(row, length, repeat=rep)
                    ran = True
        if ran and not a.quick:  # one more start-up baseline per side per repeat, interleaved with the table
            for side in sides:
                runner.run_startup(side)
    searches = {}
    until = None
    if a.search_until:
        import datetime as dt

        hh, mm = map(int, a.search_until.split(":"))
        now = dt.datetime.now(dt.timezone.utc)
        until = now.replace(hour=hh, minute=mm, second=0, microsecond=0).timestamp()
    if search:
        for row in [x for x in a.search_rows.split(",") if x in rows]:
            print(f"search: {row}", flush=True)
            # lengths the search needs get their pairs built on first use
            searches[row] = _search(runner, row, a.search_max, work, until)
            print(f"  {row}: longest within 4 GiB = {searches[row]['longest']}"
                  f"{'' if searches[row]['exact'] else ' (search stopped early)'}", flush=True)
    report(runner, searches, a.result_row, time.perf_counter() - started, out, plot)


def _search(runner: Runner, row: str, hi_len: int, work: Path, until: float | None) -> dict:
    original = runner.run

    def run(row_, length, **kw):
        if not (work / f"L{length}" / "sdpo.yaml").is_file():
            m = measure([sys.executable, "-m", "bench.long", "--worker", "prep", "--lengths", str(length),
                         "--workdir", str(work)], work / "logs" / f"prep-{length}.log", kill_mb=float("inf"),
                        timeout=1800)
            if m["rc"] != 0:
                print(f"  ! prep of L={length} failed", flush=True)
                return None
        return original(row_, length, **kw)

    runner.run = run
    try:
        return longest(runner, row, hi_len, until)
    finally:
        runner.run = original


if __name__ == "__main__":
    main()
