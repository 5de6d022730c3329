"""Stage `eval`: benchmark scores of checkpoints through lm-evaluation-harness, the paper's Table 2 (H4).

Run as: sdpo eval CONFIG [--checkpoint base|step-N|PATH ...] [--tasks h4|NAME[:SHOTS]|PATH,...] [--limit N]
                         [--force] [--json]
        (or `eval.after_each_step: true` in the config, and `sdpo run` scores base and every M_t as it is produced)

H4 as the Open LLM Leaderboard (v1) defined it and sDPO reports it: ARC-Challenge 25-shot acc_norm, HellaSwag 10-shot
acc_norm, MMLU 5-shot acc (the plain mean over its 57 subjects; lm-eval's subject-size-weighted score is kept too)
and TruthfulQA mc2 0-shot; H4 is their mean. Scores come from lm-eval 0.4.13 (the optional extra `sdpo[eval]`), not
the leaderboard's 2023 harness, so expect small differences from published numbers.

This module is the stage: which checkpoints and tasks, the cache, reports/eval.json and the table. Everything that
touches lm-eval is in sdpo_cli/harness.py, imported on first use (lm-eval is optional).

Each checkpoint is loaded once (model.dtype, on cuda when available) and scored with one lm-eval evaluation per task
and its own shot count. Every task's data is loaded before any model, so a dataset that cannot be reached (offline,
HF_HUB_OFFLINE=1) stops the command at once. Prompts longer than the model's context are counted and reported:
lm-eval cuts them from the left. Each checkpoint × task score is cached under cache/eval/, keyed by the checkpoint's
fingerprint, the task's resolved config (and local data files), shots and limit; reports/eval.json holds the last
call's table.
"""

from __future__ import annotations

import gc
import importlib
import json
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from sdpo_cli.config import SdpoConfig, is_task_path, split_task_spec, validate_eval
from sdpo_cli.context import RunContext
from sdpo_cli.errors import ConfigError, first_line
from sdpo_cli.models import check_base, finished_checkpoints, load_model, model_identity, named_model
from sdpo_cli.rundir import RunDir, fingerprint, write_json_atomic

if TYPE_CHECKING:
    from sdpo_cli.harness import LoadedTask

LM_EVAL_VERSION = "0.4.13"
INSTALL_HINT = f"pip install 'sdpo[eval]'  # lm-eval=={LM_EVAL_VERSION}"


@dataclass(frozen=True)
class H4Task:
    task: str  # lm-eval task or group name
    column: str  # header in the paper's Table 2
    shots: int
    metric: str  # lm-eval's "<metric>,<filter>" key


H4 = (
    H4Task("arc_challenge", "ARC", 25, "acc_norm,none"),
    H4Task("hellaswag", "HellaSwag", 10, "acc_norm,none"),
    H4Task("mmlu", "MMLU", 5, "acc,none"),
    H4Task("truthfulqa_mc2", "TruthfulQA", 0, "acc,none"),  # mc2, which lm-eval 0.4 reports as acc
)
H4_BY_NAME = {t.task: t for t in H4}


@dataclass
class EvalTask:
    """One column of the table: a loaded lm-eval task or group and how it is scored."""

    loaded: LoadedTask  # harness.LoadedTask: lm-eval's object, data loaded; its leaves and identity
    spec: str  # the eval.tasks entry it came from
    shots: int | None  # num_fewshot passed to lm-eval; None: the task's own
    column: str
    metric: str | None  # None: the first metric lm-eval reports

    @property
    def name(self) -> str:  # lm-eval's task or group name: the key in results
        return self.loaded.name

    @property
    def leaves(self) -> list[str]:  # leaf task names (57 for mmlu)
        return self.loaded.leaves

    @property
    def h4(self) -> bool:
        return self.name in H4_BY_NAME and self.shots == H4_BY_NAME[self.name].shots


def run_eval(cfg: SdpoConfig, checkpoints: list[str] | None = None, tasks: list[str] | None = None,
             limit: int | None = None, *, force: bool = False, ctx: RunContext | None = None) -> dict:
    """Score checkpoints (default: base and every finished step) on the tasks; write and return reports/eval.json."""
    ctx = RunContext.from_env() if ctx is None else ctx
    if ctx.world_size > 1:
        raise ConfigError("sdpo eval runs in one process", hint="start it as `sdpo eval ...`, not with accelerate "
                          "launch or torchrun (it uses one device)")
    run = RunDir(cfg.run_dir)
    if checkpoints is None:
        checkpoints = finished_checkpoints(cfg, run)
    named = [named_model(cfg, run, name) for name in checkpoints]  # a wrong name stops before anything loads
    evaluator = Evaluator(cfg, tasks, limit, ctx=ctx)
    return evaluator.evaluate(named, force=force)


class Evaluator:
    """The tasks, loaded once (data included, so an unreachable dataset fails before any model loads), and the
    scoring of checkpoints on them. `sdpo run` keeps one across steps."""

    def __init__(self, cfg: SdpoConfig, tasks: list[str] | None = None, limit: int | None = None, *,
                 ctx: RunContext | None = None):
        self.cfg = cfg
        self.ctx = RunContext.from_env() if ctx is None else ctx
        self.run = RunDir(cfg.run_dir)
        self.specs = list(tasks if tasks is not None else cfg.eval.tasks)
        self.limit = limit if limit is not None else cfg.eval.limit
        validate_eval(self.specs, self.limit, where="sdpo eval", key="--tasks" if tasks is not None else "eval.tasks")
        self.harness = open_harness(self.ctx)
        self.version = self.harness.VERSION
        self.fresh: set[str] = set()  # fingerprints scored by this process (never forced twice)
        self.loader, self.tasks = self._load_tasks()

    # ---------------------------------------------------------------------------------------------- tasks

    def _load_tasks(self):
        """lm-eval's task loader and a column per loaded task or group, in the order of the specs."""
        parsed = resolve_specs(self.specs)
        parsed, include = self._include_paths(parsed)
        folders = [target for _, target, _ in parsed if isinstance(target, Path) and target.is_dir()]
        folders += [f for f in include.values() if f not in folders]
        defaults = any(isinstance(target, str) and target not in include for _, target, _ in parsed)
        started = time.time()
        loader = self.harness.TaskLoader(folders, defaults=defaults)
        if defaults:
            self.ctx.info(f"eval: indexed lm-eval's tasks in {time.time() - started:.1f}s")
        tasks: list[EvalTask] = []
        for spec, target, shots in parsed:
            if isinstance(target, Path) and target.is_dir():
                items = loader.load_folder(spec, target)
            else:
                items = loader.load(spec, [str(target)])
            for item in items:
                h4 = H4_BY_NAME.get(item.name)
                use_h4 = h4 is not None and shots == h4.shots
                tasks.append(EvalTask(loaded=item, spec=spec, shots=shots,
                                      column=h4.column if use_h4 else _column(item.name, shots),
                                      metric=h4.metric if use_h4 else None))
        seen: dict[str, str] = {}
        for t in tasks:
            if t.name in seen:
                raise ConfigError(f"eval task {t.name!r} is named twice (by {seen[t.name]!r} and {t.spec!r})",
                                  hint="list each task once")
            seen[t.name] = t.spec
        return loader, tasks

    def _include_paths(self, parsed):
        """The task YAML files and folders listed in eval.tasks (and in the specs) are include paths, as lm-eval's
        `--include_path` makes them: a name that one of them defines means that task (before lm-eval's bundled ones,
        as include_path overrides them), so `eval.tasks=[my/pets.yaml]` then `--tasks pets_task` scores the task of
        my/pets.yaml. A name defined in a file becomes that file (loaded by path, as the path itself would be);
        returns (the specs so resolved, {name: folder} for the names defined in a folder, which the task index
        must then include)."""
        if not any(isinstance(target, str) for _, target, _ in parsed):
            return parsed, {}
        listed = [target for _, target, _ in parsed if isinstance(target, Path)]
        for spec in self.cfg.eval.tasks if isinstance(self.cfg.eval.tasks, (list, tuple)) else []:
            task, _ = split_task_spec(str(spec))
            path = Path(task).expanduser().resolve()
            if is_task_path(task) and path.exists() and path not in listed:
                listed.append(path)  # one that does not exist is reported when it is itself evaluated
        defined = self.harness.defined_names([p for p in listed if p.is_file()], [p for p in listed if p.is_dir()])
        resolved, in_folders = [], {}
        for spec, target, shots in parsed:
            where = defined.get(target) if isinstance(target, str) else None
            if where is not None and where.is_file():
                target = where
            elif where is not None:
                in_folders[target] = where
            resolved.append((spec, target, shots))
        return resolved, in_folders

    # ---------------------------------------------------------------------------------------------- scoring

    def evaluate(self, named: list[tuple[str, str]], force: bool = False) -> dict:
        """Score each (label, source) on every task, from the cache where possible; write reports/eval.json."""
        device = _device()
        rows = []
        for label, source in named:
            identity = model_identity(source, self.cfg.model.revision)
            scores: dict[str, dict] = {}
            todo = []
            for task in self.tasks:
                fp = self.fingerprint(identity, task)
                cached = None if force and fp not in self.fresh else self._cached(fp)
                if cached is not None:
                    scores[task.name] = {**cached, "cached": True}
                else:
                    todo.append((task, fp))
            if todo:
                self.ctx.info(f"eval: {label}: {', '.join(t.name for t, _ in todo)} on {device}"
                              + (f" (limit {self.limit})" if self.limit else ""))
                scores.update(self._score(label, source, todo, device=device))
            else:
                self.ctx.info(f"eval: {label}: every task already scored (cache/eval); --force to redo")
            row = {"checkpoint": label, "model": source, "model_fingerprint": identity,
                   "tasks": {t.name: scores[t.name] for t in self.tasks}}
            row["h4"] = h4_score(row["tasks"])
            rows.append(row)
        report = {
            "lm_eval": self.version,
            "limit": self.limit,
            "device": device,
            "dtype": self.cfg.model.dtype,
            "batch_size": self.cfg.eval.batch_size,
            "tasks": [{"task": t.name, "spec": t.spec, "column": t.column, "shots": t.shots, "metric": t.metric,
                       "h4": t.h4} for t in self.tasks],
            "checkpoints": rows,
        }
        if self.ctx.is_main:
            write_json_atomic(self.run.reports / "eval.json", report)
        return report

    def fingerprint(self, model: str, task: EvalTask) -> str:
        return fingerprint("eval", model, self.cfg.model.dtype, self.cfg.model.attn_implementation, task.name,
                           task.loaded.identity, task.shots, self.limit, self.version)

    def _cache_path(self, fp: str) -> Path:
        return self.run.cache / "eval" / f"{fp}.json"

    def _cached(self, fp: str) -> dict | None:
        path = self._cache_path(fp)
        try:
            return json.loads(path.read_text()) if path.is_file() else None
        except (OSError, json.JSONDecodeError):
            return None

    def _score(self, label: str, source: str, todo: list[tuple[EvalTask, str]], *, device: str) -> dict[str, dict]:
        """Load the checkpoint once and score it on the tasks in `todo`; each score is cached as it is made."""
        import torch

        if source == self.cfg.model.base:
            check_base(self.cfg.model)
        tok = self.ctx.tokenizer(self.cfg.model)  # the base model's, as every stage uses (checkpoints carry a copy)
        # the checkpoint as users will serve it: M_t is a full-precision merge even under QLoRA (model.quantization
        # is a training-time view, sdpo_cli/lora.py), so the benchmarks score it unquantized
        model = load_model(replace(self.cfg.model, quantization=None), source).to(device)
        model.config.use_cache = True  # generation tasks; load_model turns it off for training
        lm = self.harness.CountingLM(model, tokenizer=tok, batch_size=self.cfg.eval.batch_size,
                                     bars=self.ctx.err.is_terminal)
        out = {}
        try:
            for task, fp in todo:
                entry = self._score_task(label, lm, task)
                entry["fingerprint"] = fp
                entry["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
                if self.ctx.is_main:
                    write_json_atomic(self._cache_path(fp), entry)
                self.fresh.add(fp)
                out[task.name] = {**entry, "cached": False}
        finally:
            del lm, model
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
        return out

    def _score_task(self, label: str, lm, task: EvalTask) -> dict:
        """One cell: lm-eval's scores of `task` with the request counts; one line on stderr, a warning if cut."""
        lm.reset_counts()
        started = time.time()
        res = self.harness.run_task(lm, task.loaded, loader=self.loader, shots=task.shots, limit=self.limit)
        entry = task_entry(task, res)
        entry.update(lm.counts(), seconds=round(time.time() - started, 3))
        score = "n/a" if entry["score"] is None else f"{entry['score']:.4f}"
        self.ctx.info(f"eval: {label}: {task.name} {entry['metric']} = {score} "
                      f"({entry['shots']}-shot, n={entry['n']}, {entry['seconds']:.1f}s)")
        if entry["truncated_requests"]:
            self.ctx.warn(f"eval: {label}: {task.name}: {entry['truncated_prompts']} prompts "
                          f"({entry['truncated_requests']} of {entry['requests']} requests) are longer than "
                          f"the model's context of {lm.max_length} tokens; lm-eval cut them from the left, so "
                          "this score is not comparable with a longer-context model's")
        return entry


def task_entry(task: EvalTask, res: dict) -> dict:
    """One checkpoint × task cell of reports/eval.json, from lm-eval's results dict."""
    results = res["results"].get(task.name, {})
    metrics = {k: v for k, v in results.items() if "," in k and "_stderr," not in k and isinstance(v, (int, float))}
    metric = task.metric or next(iter(metrics), None)
    shots = sorted({res["n-shot"].get(leaf) for leaf in task.leaves if leaf in res["n-shot"]})
    entry = {
        "task": task.name,
        "metric": metric,
        "score": metrics.get(metric) if metric else None,
        "shots": shots[0] if len(shots) == 1 else shots,
        "version": res["versions"].get(task.name),
        "n": sum(res["n-samples"].get(leaf, {}).get("effective", 0) for leaf in task.leaves),
        "metrics": metrics,
    }
    if task.leaves != [task.name]:  # a group: its tasks' own metrics too
        entry["subtasks"] = {leaf: {**{k: v for k, v in res["results"][leaf].items() if k in metrics},
                                    "n": res["n-samples"].get(leaf, {}).get("effective")}
                             for leaf in task.leaves if leaf in res["results"]}
    if task.name == "mmlu" and task.h4:
        # The Open LLM Leaderboard (v1) averaged the 57 subjects; lm-eval 0.4's group score weights them by size.
        subjects = [cell["acc,none"] for cell in entry["subtasks"].values() if "acc,none" in cell]
        entry["acc_weighted"] = entry["score"]
        entry["acc_subject_mean"] = statistics.fmean(subjects) if subjects else None
        entry["score"] = entry["acc_subject_mean"]
        entry["metric"] = "acc,none (mean over subjects)"
    return entry


def h4_score(cells: dict[str, dict]) -> float | None:
    """The mean of the four H4 scores, or None unless all four were scored with their H4 shots."""
    scores = []
    for t in H4:
        cell = cells.get(t.task)
        if cell is None or cell.get("score") is None or cell.get("shots") != t.shots:
            return None
        scores.append(cell["score"])
    return statistics.fmean(scores)


def eval_table(report: dict):
    """A rich table laid out like the paper's Table 2: a row per checkpoint; H4, ARC, HellaSwag, MMLU, TruthfulQA
    (then any other task); scores in percent. A * marks scores with prompts cut to the model's context."""
    from rich.table import Table

    has_h4 = any(row["h4"] is not None for row in report["checkpoints"])
    title = f"lm-eval {report['lm_eval']}" + (f", limit {report['limit']}" if report["limit"] else "")
    table = Table(title=("H4 benchmark" if has_h4 else "Benchmark") + f" ({title})", title_justify="left")
    table.add_column("checkpoint", justify="left")
    if has_h4:
        table.add_column("H4", justify="right")
    for task in report["tasks"]:
        table.add_column(task["column"], justify="right")
    cut = False
    for row in report["checkpoints"]:
        cells = [row["checkpoint"]]
        if has_h4:
            cells.append(_percent(row["h4"]))
        for task in report["tasks"]:
            cell = row["tasks"][task["task"]]
            mark = "*" if cell.get("truncated_requests") else ""
            cut = cut or bool(mark)
            cells.append(_percent(cell["score"]) + mark)
        table.add_row(*cells)
    if cut:
        table.caption = "* some prompts were longer than the model's context and cut (see reports/eval.json)"
        table.caption_justify = "left"
    return table


# -------------------------------------------------------------------------------------------------- helpers


def resolve_specs(specs: list[str]) -> list[tuple[str, str | Path, int | None]]:
    """(spec, lm-eval name or task path, shots) per task: h4 becomes its four tasks with their shots, a named H4 task
    without shots gets its H4 shots, a path must exist."""
    parsed: list[tuple[str, str | Path, int | None]] = []
    for spec in specs:
        task, shots = split_task_spec(spec)
        if task.lower() == "h4":
            parsed += [(spec, t.task, t.shots) for t in H4]
        elif is_task_path(task):
            path = Path(task).expanduser().resolve()
            if not path.exists():
                raise ConfigError(f"eval task {spec!r}: no such task file or folder ({path})",
                                  hint="task paths in the config are relative to its folder; see docs/eval.md")
            parsed.append((spec, path, shots))
        else:
            parsed.append((spec, task, shots if shots is not None or task not in H4_BY_NAME
                           else H4_BY_NAME[task].shots))
    return parsed


def open_harness(ctx: RunContext) -> ModuleType:
    """sdpo_cli.harness, which imports lm-eval: a one-line error with the install command when lm-eval is missing,
    a warning when another version is installed."""
    try:
        harness = importlib.import_module("sdpo_cli.harness")
    except ImportError as e:
        raise ConfigError(f"sdpo eval needs lm-evaluation-harness, which is not installed ({first_line(e)})",
                          hint=INSTALL_HINT) from None
    if harness.VERSION != LM_EVAL_VERSION:
        ctx.warn(f"lm-eval {harness.VERSION} is installed; sdpo eval is tested with {LM_EVAL_VERSION} "
                 f"(task loading changed between releases): {INSTALL_HINT}")
    return harness


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f}"


def _column(name: str, shots: int | None) -> str:
    return name if shots is None else f"{name} ({shots}-shot)"


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
