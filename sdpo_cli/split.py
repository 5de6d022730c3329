"""Stage `split`: read the sources, tokenise every pair once, and write the step datasets D_1..D_T.

Run as: sdpo split CONFIG [key=value ...]

Strategies (split.strategy):
  natural     each step is a list of whole sources, in order: the paper's main setting (D_1 = OrcaPairs,
              D_2 = UltraFeedback, §2.2)
  stratified  every step keeps the sources' proportions, cut by split.fractions (the paper's "sDPO Strat.",
              16.67 % / 83.33 %)
  random      all pairs pooled, shuffled, cut by split.fractions
  curriculum  pairs ordered easy -> hard by a score under the base model S (split.curriculum_score: γ, or γ of
              per-token log-probs; high: S already prefers the chosen reply), then cut by split.fractions. Ours, not
              the paper's: an easy-to-hard reading of §2.2 beyond its data-source split. γ sums log-probs over the
              reply, so it also measures the replies' length difference: the split reports the score's correlation
              with it (chosen tokens − rejected tokens)

Held-out pairs (the eval/* metrics of `train`): split.eval_fraction of each D_t, drawn with the seed, is written as
data/eval-step-t and left out of data/step-t; or data.eval, written once as data/eval, serves every step.

Token ids are stored next to the text so that reflogp, train and gamma read the very same tokens: no tokenisation
drift between stages (the ln 2 check at update 0 verifies it).
"""

from __future__ import annotations

import random
import time
from collections import Counter, defaultdict
from pathlib import Path

from rich.table import Table

from sdpo_cli.config import SdpoConfig, num_steps
from sdpo_cli.context import RunContext
from sdpo_cli.data.formats import LoadedSource, _row_ref, load_pairs, prompt_hash
from sdpo_cli.data.tokenize import TokenizeStats, tokenize_pairs
from sdpo_cli.errors import DataError
from sdpo_cli.rundir import RunDir, check_not_stale, read_meta, writing


def held_out_key(cfg: SdpoConfig, step: int) -> str | None:
    """The data/ folder of step t's held-out pairs: `eval-step-t` (split.eval_fraction), `eval` (data.eval), or None."""
    if cfg.split.eval_fraction:
        return f"eval-step-{step}"
    return "eval" if cfg.data.eval else None


def data_paths(cfg: SdpoConfig, run: RunDir) -> list[Path]:
    steps = range(1, num_steps(cfg) + 1)
    paths = [run.data(t) for t in steps]
    if cfg.split.eval_fraction:
        return paths + [run.data(f"eval-step-{t}") for t in steps]
    return paths + ([run.data("eval")] if cfg.data.eval else [])


def run_split(cfg: SdpoConfig, *, force: bool = False, ctx: RunContext | None = None) -> list[Path]:
    """Under several processes rank 0 builds the data first; the others then find it finished and current."""
    from sdpo_cli.distributed import main_process_first

    ctx = ctx or RunContext.from_env()
    with main_process_first(ctx) as state:
        return _run_split(cfg, force=force and state.is_main_process, ctx=ctx)


def _run_split(cfg: SdpoConfig, *, force: bool, ctx: RunContext) -> list[Path]:
    # Imported here, not at the top: `sdpo split` loads the config first, and a config mistake should not wait for
    # torch and transformers to import.
    from sdpo_cli.fingerprints import split_fp
    from sdpo_cli.models import check_base, warn_if_pretrained

    started = time.time()
    run = RunDir(cfg.run_dir)
    check_base(cfg.model)  # a base without weights or tokenizer stops here, not after the split
    warn_if_pretrained(cfg.model, ctx.warn)
    run.ensure()
    tok = ctx.tokenizer(cfg.model)
    fp = split_fp(cfg, tok)
    paths = data_paths(cfg, run)
    if not force and all(check_not_stale(p, fp, ctx.command("split"), ctx.command("run")) for p in paths):
        ctx.info(f"split: finished already ({run.rel(paths[0].parent)}), skipping")
        return paths

    loaded = [load_pairs(s, cfg.data.drop_ties) for s in cfg.data.sources]
    curriculum: dict = {}
    with ctx.progress() as bar:
        counts: dict[str, Counter] = {}
        pools: dict[str, list[dict]] = {}
        for src in loaded:
            stats = TokenizeStats()
            kept, dropped = tokenize_pairs(tok, src.pairs, cfg.data.max_length, cfg.data.max_prompt_length, bar,
                                           stats=stats)
            pools[src.name] = kept
            counts[src.name] = _counts(src, kept, dropped, stats, ctx)
        steps = _assign(cfg, pools, tok, bar, ctx, curriculum)
    for t, rows in enumerate(steps, start=1):
        if not rows:
            raise _empty_step(cfg, t, loaded, counts, ctx.config_path)
    held_out = [_hold_out(cfg, t, rows) for t, rows in enumerate(steps, start=1)]
    steps = [kept for kept, _ in held_out]

    overlap = _overlap(steps)
    _print_table(cfg, steps, counts, overlap, ctx, held_out=[len(rows) for _, rows in held_out],
                 curriculum=curriculum)
    for t, rows in enumerate(steps, start=1):
        meta = {"stage": "split", "step": t, "started": started, "fingerprint": fp, "strategy": cfg.split.strategy,
                "inputs": fp.inputs, "rows": len(rows),
                "rows_per_source": dict(Counter(r["source"] for r in rows)),
                "sources": {n: dict(c) for n, c in counts.items()}, "formats": {s.name: s.format for s in loaded},
                "overlap": overlap} | ({"curriculum": curriculum} if curriculum else {})
        _save(rows, run.data(t), meta)
        if cfg.split.eval_fraction:
            rows = held_out[t - 1][1]
            _save(rows, run.data(f"eval-step-{t}"), {
                "stage": "split", "step": f"eval-step-{t}", "started": started, "fingerprint": fp, "inputs": fp.inputs,
                "rows": len(rows),
                "held_out_of": f"step-{t}", "eval_fraction": cfg.split.eval_fraction,
                "rows_per_source": dict(Counter(r["source"] for r in rows))})
    if cfg.data.eval:
        _save_eval_source(cfg, tok, run.data("eval"), {"stage": "split", "step": "eval", "started": started,
                                                       "fingerprint": fp, "inputs": fp.inputs}, ctx)
    for p in paths:
        ctx.info(f"split: wrote {p} ({read_meta(p)['rows']} pairs)")
    return paths


# Counts of a source besides read / kept / truncated / dropped / skipped reasons: in meta.json only where non-zero
NOT_SKIPS = ("read", "kept", "truncated", "dropped_too_long", "prompt_cut", "prompt_not_prefix")


def _counts(src: LoadedSource, kept: list[dict], dropped: int, stats: TokenizeStats, ctx: RunContext) -> Counter:
    """A source's counts for the split report and meta.json; warns once when prompts are not token prefixes."""
    counts = Counter(read=src.rows_read, kept=len(kept), dropped_too_long=dropped,
                     truncated=sum(p["truncated"] for p in kept), **src.skipped)
    if stats.prompt_cut:
        counts["prompt_cut"] = stats.prompt_cut
    if stats.prompt_not_prefix:
        counts["prompt_not_prefix"] = stats.prompt_not_prefix
        pair_id, lost = stats.example
        row = _row_ref(src.where, int(pair_id.rsplit("-", 1)[1]))
        ctx.warn(f"split: source '{src.name}': in {stats.prompt_not_prefix} of {len(src.pairs)} pairs the tokenized "
                 f"prompt is not a prefix of the tokenized prompt + reply (first: {src.where}:{row}, whose prompt "
                 f"ends in {lost!r}); the completion starts where they diverge, so that end of the prompt is left out "
                 "and the model trains on a context that differs from the one it sees at inference (as TRL 1.16, "
                 "which warns once). Use a chat template that renders the generation prompt as a prefix of the "
                 "conversation, or end the prompts on a token boundary")
    return counts


def _empty_step(cfg: SdpoConfig, t: int, loaded: list[LoadedSource], counts: dict[str, Counter],
                where: str) -> DataError:
    """Step t got no pair: name the config file, the key, and (natural) the source files whose pairs all dropped."""
    if cfg.split.strategy != "natural":
        total = sum(c["kept"] for c in counts.values())
        return DataError(f"{where}: split.fractions: step {t} has no rows ({total} pairs cut by "
                         f"{list(cfg.split.fractions or [])})",
                         hint="use larger fractions or more data: every step needs at least one pair")
    plan = cfg.split.steps or [[s.name] for s in cfg.data.sources]
    files = {s.name: s.where for s in loaded}
    why = "; ".join(f"{files[n]}: all {counts[n]['dropped_too_long']} pairs of source '{n}' have prompts of "
                    f"data.max_length={cfg.data.max_length} tokens or more" for n in plan[t - 1])
    return DataError(f"{where}: split.steps: step {t} has no rows ({why})",
                     hint="raise data.max_length, or set data.max_prompt_length so that long prompts are cut, "
                          "not dropped")


def _save_eval_source(cfg: SdpoConfig, tok, path: Path, meta: dict, ctx: RunContext) -> None:
    """data.eval, tokenised as the steps' pairs and written whole to data/eval: every step's held-out pairs."""
    src: LoadedSource = load_pairs(cfg.data.eval, cfg.data.drop_ties)
    stats = TokenizeStats()
    kept, dropped = tokenize_pairs(tok, src.pairs, cfg.data.max_length, cfg.data.max_prompt_length, stats=stats)
    if not kept:
        raise DataError(f"{src.where}: no eval pair fits data.max_length", hint="raise data.max_length")
    ctx.info(f"  held out for eval/* (data.eval, {src.name}): read {src.rows_read}, kept {len(kept)}, dropped "
             f"(too long) {dropped}" + (f", skipped {dict(src.skipped)}" if any(src.skipped.values()) else ""))
    counts = _counts(src, kept, dropped, stats, ctx)
    del counts["truncated"]  # as before: data/eval's meta.json never counted truncated pairs
    _save(kept, path, meta | {"rows": len(kept), "sources": {src.name: dict(counts)}})


def _hold_out(cfg: SdpoConfig, step: int, rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """(kept, held out): split.eval_fraction of D_t's pairs, at least one and never all, drawn by a generator of
    their own (seed and step), so that holding pairs out leaves every other draw of the split unchanged. Both parts
    keep D_t's order."""
    if not cfg.split.eval_fraction:
        return rows, []
    if len(rows) < 2:
        raise DataError(f"split.eval_fraction: step {step} has {len(rows)} pair, none to hold out",
                        hint="use more data, or split.eval_fraction=0")
    n = min(len(rows) - 1, max(1, round(cfg.split.eval_fraction * len(rows))))
    chosen = set(random.Random(f"sdpo-eval-{cfg.seed}-{step}").sample(range(len(rows)), n))
    return ([r for i, r in enumerate(rows) if i not in chosen], [r for i, r in enumerate(rows) if i in chosen])


def _save(rows: list[dict], path: Path, meta: dict) -> None:
    import datasets

    with writing(path, meta) as tmp:
        datasets.Dataset.from_list(rows).save_to_disk(str(tmp))


def _cut(items: list, fractions: list[float]) -> list[list]:
    n, bounds, acc = len(items), [0], 0.0
    for f in fractions:
        acc += f
        bounds.append(round(acc * n))
    bounds[-1] = n
    return [items[a:b] for a, b in zip(bounds, bounds[1:])]


def _assign(cfg: SdpoConfig, pools: dict[str, list[dict]], tok, bar, ctx: RunContext,
            curriculum: dict) -> list[list[dict]]:
    rng = random.Random(cfg.seed)
    strategy, fractions = cfg.split.strategy, cfg.split.fractions
    if strategy == "natural":
        plan = cfg.split.steps or [[s.name] for s in cfg.data.sources]
        unused = [n for n in pools if not any(n in step for step in plan)]
        if unused:
            ctx.warn(f"split: source(s) {unused} are not in any step of split.steps")
        return [[row for name in step for row in pools[name]] for step in plan]
    if strategy == "stratified":
        steps: list[list[dict]] = [[] for _ in fractions]
        for name in pools:  # each source is cut by the same fractions, so each step keeps the proportions
            rows = pools[name][:]
            rng.shuffle(rows)
            for t, part in enumerate(_cut(rows, fractions)):
                steps[t].extend(part)
        for rows in steps:
            rng.shuffle(rows)
        return steps
    pooled = [row for name in pools for row in pools[name]]
    if strategy == "random":
        rng.shuffle(pooled)
        return _cut(pooled, fractions)
    # curriculum: a score under the base model S, easy (high score) first
    chosen, rejected = _base_logps(cfg, pooled, tok, bar, ctx)
    scores = curriculum_scores(chosen, rejected, pooled)
    for row, g, gt in zip(pooled, scores["gamma"], scores["gamma_per_token"]):
        row["gamma_base"] = g
        if cfg.split.curriculum_score == "gamma_per_token":
            row["gamma_base_per_token"] = gt
    length_diff = [len(r["chosen_ids"]) - len(r["rejected_ids"]) for r in pooled]
    curriculum.update(score=str(cfg.split.curriculum_score), pairs=len(pooled),
                      length_correlation={name: pearson(values, length_diff) for name, values in scores.items()})
    key = scores[str(cfg.split.curriculum_score)]
    order = sorted(range(len(pooled)), key=lambda i: -key[i])
    return _cut([pooled[i] for i in order], fractions)


def curriculum_scores(chosen: list[float], rejected: list[float], pairs: list[dict]) -> dict[str, list[float]]:
    """Each split.curriculum_score per pair: `gamma` = log π_S(y_w|x) − log π_S(y_l|x) (sums over the completion
    tokens), `gamma_per_token` = the same with each sum divided by its completion's token count."""
    per_token = [c / len(p["chosen_ids"]) - r / len(p["rejected_ids"]) for c, r, p in zip(chosen, rejected, pairs)]
    return {"gamma": [c - r for c, r in zip(chosen, rejected)], "gamma_per_token": per_token}


def pearson(x: list[float], y: list[float]) -> float | None:
    """Pearson's correlation of x and y; None when either is constant or there are fewer than 2 values."""
    n = len(x)
    if n < 2:
        return None
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx, syy = sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)
    return sxy / (sxx * syy) ** 0.5 if sxx > 0 and syy > 0 else None


def _base_logps(cfg: SdpoConfig, pairs: list[dict], tok, bar, ctx: RunContext) -> tuple[list[float], list[float]]:
    from accelerate import Accelerator

    from sdpo_cli.scoring import load_scoring_model, score_pairs

    accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision)
    # the main process alone (the others wait for data/): the whole base model, whatever inference.shard says
    model, layout = load_scoring_model(cfg, accelerator, warn=ctx.warn, alone=True)
    chosen, rejected = score_pairs(model, pairs, pad_id=tok.pad_token_id, batch_size=cfg.inference.batch_size,
                                   device=accelerator.device, autocast=accelerator.autocast, progress=bar,
                                   description="curriculum: γ under base", layout=layout)
    return chosen, rejected


def _overlap(steps: list[list[dict]]) -> dict:
    """Pairs and prompts that occur in more than one step (the paper warns about reference/data overlap)."""
    pair_steps, prompt_steps = defaultdict(set), defaultdict(set)
    for t, rows in enumerate(steps, start=1):
        for row in rows:
            pair_steps[row["pair_hash"]].add(t)
            prompt_steps[prompt_hash(row["prompt"])].add(t)
    return {"pairs_in_several_steps": sum(len(s) > 1 for s in pair_steps.values()),
            "prompts_in_several_steps": sum(len(s) > 1 for s in prompt_steps.values())}


def _print_table(cfg: SdpoConfig, steps: list[list[dict]], counts: dict[str, Counter], overlap: dict,
                 ctx: RunContext, held_out: list[int], curriculum: dict) -> None:
    names = list(counts)
    table = Table(title=f"sDPO steps ({cfg.split.strategy})", title_justify="left")
    table.add_column("step")
    for name in names:
        table.add_column(name, justify="right")
    table.add_column("total", justify="right")
    if cfg.split.eval_fraction:
        table.add_column("held out", justify="right")
    for t, rows in enumerate(steps, start=1):
        per = Counter(r["source"] for r in rows)
        table.add_row(f"D_{t}", *[str(per.get(n, 0)) for n in names], str(len(rows)),
                      *([str(held_out[t - 1])] if cfg.split.eval_fraction else []))
    ctx.err.print(table)
    if cfg.split.eval_fraction:
        ctx.info(f"  held out for eval/* (split.eval_fraction={cfg.split.eval_fraction:g}): "
                 + ", ".join(f"data/eval-step-{t} {n}" for t, n in enumerate(held_out, start=1)))
    for name, c in counts.items():
        skipped = {k: v for k, v in c.items() if k not in NOT_SKIPS and v}
        extra = "".join(f", {label} {c[key]}" for key, label in (("prompt_cut", "prompts cut"),
                                                                 ("prompt_not_prefix", "prompts not a token prefix"))
                        if c.get(key))
        ctx.info(f"  {name}: read {c['read']}, kept {c['kept']}, truncated {c['truncated']}, "
                 f"dropped (too long) {c['dropped_too_long']}" + (f", skipped {skipped}" if skipped else "") + extra)
    if curriculum:
        r = curriculum["length_correlation"]
        ctx.info(f"  curriculum: sorted by {curriculum['score']}; correlation with the length difference (chosen − "
                 f"rejected tokens) over {curriculum['pairs']} pairs: "
                 + ", ".join(f"{name} {_r(v)}" for name, v in r.items()))
    ctx.info(f"  pairs in more than one step: {overlap['pairs_in_several_steps']}; "
                 f"prompts in more than one step: {overlap['prompts_in_several_steps']}")


def _r(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.2f}"
