"""Stage `eval`: benchmark scores of checkpoints through lm-evaluation-harness, the paper's Table 2 (H4).

Run as: sdpo eval CONFIG [--checkpoint base|step-N|PATH ...] [--tasks h4|NAME[:SHOTS]|PATH,...] [--limit N]
                         [--force] [--json]
        (or `eval.after_each_step: true` in the config, and `sdpo run` scores base and every M_t as it is produced)

H4 as the Open LLM Leaderboard (v1) defined it and sDPO reports it: ARC-Challenge 25-shot acc_norm, HellaSwag 10-shot
acc_norm, MMLU 5-shot acc (the plain mean over its 57 subjects; lm-eval's subject-size-weighted score is kept too)
and TruthfulQA mc2 0-shot; H4 is their mean. Scores come from lm-eval 0.4.13 (the optional extra `sdpo[eval]`), not
the leaderboard's 2023 harness, so expect small differences from published numbers.

Each checkpoint is loaded once (model.dtype, on cuda when available) and scored with one `simple_evaluate` call per
task and its own shot count. Every task's data is loaded before any model, so a dataset that cannot be reached
(offline, HF_HUB_OFFLINE=1) stops the command at once. Prompts longer than the model's context are counted and
reported: lm-eval cuts them from the left. Each checkpoint × task score is cached under cache/eval/, keyed by the
checkpoint's fingerprint, the task's resolved config (and local data files), shots and limit; reports/eval.json
holds the last call's table.
"""

from __future__ import annotations

import gc
import logging
import os
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Iterator

from sdpo_cli import console
from sdpo_cli.config import SdpoConfig, is_task_path, num_steps, split_task_spec, validate_eval
from sdpo_cli.errors import ConfigError, DataError, SdpoError
from sdpo_cli.models import check_base, load_model, load_tokenizer, model_identity, named_model
from sdpo_cli.rundir import RunDir, file_fingerprint, fingerprint, read_meta, write_json_atomic

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

    name: str  # lm-eval's task or group name: the key in results
    obj: Any  # lm_eval Task or Group, data already loaded
    spec: str  # the eval.tasks entry it came from
    shots: int | None  # num_fewshot passed to lm-eval; None: the task's own
    column: str
    metric: str | None  # None: the first metric lm-eval reports
    leaves: list[str] = field(default_factory=list)  # leaf task names (57 for mmlu)
    identity: str = ""  # resolved configs + local data files

    @property
    def h4(self) -> bool:
        return self.name in H4_BY_NAME and self.shots == H4_BY_NAME[self.name].shots


def import_lm_eval():
    """lm_eval, imported on first use; a one-line error with the install command when it is missing."""
    try:
        import lm_eval
        import lm_eval.evaluator  # noqa: F401
        from lm_eval.models.huggingface import HFLM  # noqa: F401
        from lm_eval.tasks import TaskManager  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"sdpo eval needs lm-evaluation-harness, which is not installed ({_first_line(e)})",
                          hint=INSTALL_HINT) from None
    if lm_eval.__version__ != LM_EVAL_VERSION:
        console.warn(f"lm-eval {lm_eval.__version__} is installed; sdpo eval is tested with {LM_EVAL_VERSION} "
                     f"(task loading changed between releases): {INSTALL_HINT}")
    return lm_eval


def run_eval(cfg: SdpoConfig, checkpoints: list[str] | None = None, tasks: list[str] | None = None,
             limit: int | None = None, force: bool = False) -> dict:
    """Score checkpoints (default: base and every finished step) on the tasks; write and return reports/eval.json."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("sdpo eval runs in one process", hint="start it as `sdpo eval ...`, not with accelerate "
                          "launch or torchrun (it uses one device)")
    run = RunDir(cfg.run_dir)
    if checkpoints is None:
        checkpoints = default_checkpoints(cfg, run)
    named = [named_model(cfg, run, name) for name in checkpoints]  # a wrong name stops before anything loads
    evaluator = Evaluator(cfg, tasks, limit)
    return evaluator.evaluate(named, force=force)


def default_checkpoints(cfg: SdpoConfig, run: RunDir) -> list[str]:
    return ["base"] + [f"step-{t}" for t in range(1, num_steps(cfg) + 1) if read_meta(run.checkpoint(t)) is not None]


class Evaluator:
    """The tasks, loaded once (data included, so an unreachable dataset fails before any model loads), and the
    scoring of checkpoints on them. `sdpo run` keeps one across steps."""

    def __init__(self, cfg: SdpoConfig, tasks: list[str] | None = None, limit: int | None = None):
        self.cfg = cfg
        self.run = RunDir(cfg.run_dir)
        self.specs = list(tasks if tasks is not None else cfg.eval.tasks)
        self.limit = limit if limit is not None else cfg.eval.limit
        validate_eval(self.specs, self.limit, where="sdpo eval", key="--tasks" if tasks is not None else "eval.tasks")
        self.lm_eval = import_lm_eval()
        self.version = self.lm_eval.__version__
        self.fresh: set[str] = set()  # fingerprints scored by this process (never forced twice)
        self._tokenizer = None
        with _quiet_lm_eval():
            self.task_manager, self.tasks = self._load_tasks()

    # ---------------------------------------------------------------------------------------------- tasks

    def _load_tasks(self) -> tuple[Any, list[EvalTask]]:
        from lm_eval.tasks import TaskManager
        from lm_eval.tasks._index import Kind, TaskIndex

        parsed = []  # (spec, name or path, shots)
        for spec in self.specs:
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
        folders = [p for _, p, _ in parsed if isinstance(p, Path) and p.is_dir()]
        defaults = any(isinstance(p, str) for _, p, _ in parsed)
        started = time.time()
        manager = TaskManager(include_path=[str(f) for f in folders] or None, include_defaults=defaults)
        if defaults:
            console.info(f"eval: indexed lm-eval's tasks in {time.time() - started:.1f}s")

        tasks: list[EvalTask] = []
        for spec, target, shots in parsed:
            if isinstance(target, Path) and target.is_dir():
                index = TaskIndex.build([target])
                names = [n for n, e in index.items() if e.kind in (Kind.GROUP, Kind.TASK, Kind.PY_TASK)]
                if not names:
                    raise ConfigError(f"eval task folder {target}: no lm-eval task YAML in it",
                                      hint="a task YAML has a `task:` key; see docs/eval.md")
                groups = [n for n in names if index[n].kind == Kind.GROUP]
                items = self._load(manager, spec, groups)
                in_groups = {leaf for item in items for leaf in _leaves(item)}
                items += self._load(manager, spec, [n for n in names if n not in groups and n not in in_groups])
            else:
                items = self._load(manager, spec, [str(target)])
            for item in items:
                name = _name(item)
                h4 = H4_BY_NAME.get(name)
                use_h4 = h4 is not None and shots == h4.shots
                tasks.append(EvalTask(name=name, obj=item, spec=spec, shots=shots,
                                      column=h4.column if use_h4 else _column(name, shots),
                                      metric=h4.metric if use_h4 else None, leaves=_leaves(item),
                                      identity=_task_identity(item)))
        seen: dict[str, str] = {}
        for t in tasks:
            if t.name in seen:
                raise ConfigError(f"eval task {t.name!r} is named twice (by {seen[t.name]!r} and {t.spec!r})",
                                  hint="list each task once")
            seen[t.name] = t.spec
        return manager, tasks

    def _load(self, manager, spec: str, names: list[str]) -> list:
        """Top-level lm-eval objects for `names` (a tag becomes its tasks), with their datasets loaded."""
        items = []
        for name in names:
            what = f"eval task {Path(name).name if is_task_path(name) else name!r}" + \
                ("" if spec == name else f" (from {spec!r})")
            try:
                loaded = manager.load([name])
            except KeyError:
                raise ConfigError(f"{what}: lm-eval {self.version} has no task, group or tag of that name",
                                  hint="check the name (lm-eval ls tasks), or give a task YAML path") from None
            except (ConnectionError, FileNotFoundError) as e:
                raise DataError(f"{what}: its dataset cannot be loaded ({_first_line(e)})",
                                hint=_offline_hint()) from None
            except (ValueError, TypeError, OSError) as e:
                raise ConfigError(f"{what}: lm-eval cannot load it ({_first_line(e)})",
                                  hint="check the task YAML against lm-eval's task guide; see docs/eval.md") from None
            groups, leaves = loaded["groups"], loaded["tasks"]
            children = {c for g in groups.values() for c in g.child_names}
            items += [g for n, g in groups.items() if n not in children]
            in_groups = {leaf for g in groups.values() for leaf in _leaves(g)}
            items += [t for n, t in leaves.items() if n not in in_groups]
        return items

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
                console.info(f"eval: {label}: {', '.join(t.name for t, _ in todo)} on {device}"
                             + (f" (limit {self.limit})" if self.limit else ""))
                scores.update(self._score(label, source, todo, device))
            else:
                console.info(f"eval: {label}: every task already scored (cache/eval); --force to redo")
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
        if console.is_main_process():
            write_json_atomic(self.run.reports / "eval.json", report)
        return report

    def fingerprint(self, model: str, task: EvalTask) -> str:
        return fingerprint("eval", model, self.cfg.model.dtype, self.cfg.model.attn_implementation, task.name,
                           task.identity, task.shots, self.limit, self.version)

    def _cache_path(self, fp: str) -> Path:
        return self.run.cache / "eval" / f"{fp}.json"

    def _cached(self, fp: str) -> dict | None:
        import json

        path = self._cache_path(fp)
        try:
            return json.loads(path.read_text()) if path.is_file() else None
        except (OSError, json.JSONDecodeError):
            return None

    def _score(self, label: str, source: str, todo: list[tuple[EvalTask, str]], device: str) -> dict[str, dict]:
        import torch

        if source == self.cfg.model.base:
            check_base(self.cfg.model)
        if self._tokenizer is None:  # the base model's, as every stage uses (checkpoints carry a copy)
            self._tokenizer = load_tokenizer(self.cfg.model)
        tok = self._tokenizer
        # the checkpoint as users will serve it: M_t is a full-precision merge even under QLoRA (model.quantization
        # is a training-time view, sdpo_cli/lora.py), so the benchmarks score it unquantized
        model = load_model(replace(self.cfg.model, quantization=None), source).to(device)
        model.config.use_cache = True  # generation tasks; load_model turns it off for training
        with _quiet_lm_eval():  # it warns that a loaded model makes its device/dtype arguments moot: they are ours
            lm = _counting_hflm()(pretrained=model, tokenizer=tok, batch_size=self.cfg.eval.batch_size,
                                  quiet=not console.console.is_terminal)
        out = {}
        try:
            for task, fp in todo:
                lm.reset_counts()
                started = time.time()
                res = self._simple_evaluate(lm, task)
                entry = task_entry(task, res)
                entry.update(lm.counts(), seconds=round(time.time() - started, 3), fingerprint=fp,
                             created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
                score = "n/a" if entry["score"] is None else f"{entry['score']:.4f}"
                console.info(f"eval: {label}: {task.name} {entry['metric']} = {score} "
                             f"({entry['shots']}-shot, n={entry['n']}, {entry['seconds']:.1f}s)")
                if entry["truncated_requests"]:
                    console.warn(f"eval: {label}: {task.name}: {entry['truncated_prompts']} prompts "
                                 f"({entry['truncated_requests']} of {entry['requests']} requests) are longer than "
                                 f"the model's context of {lm.max_length} tokens; lm-eval cut them from the left, so "
                                 "this score is not comparable with a longer-context model's")
                if console.is_main_process():
                    write_json_atomic(self._cache_path(fp), entry)
                self.fresh.add(fp)
                out[task.name] = {**entry, "cached": False}
        finally:
            del lm, model
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
        return out

    def _simple_evaluate(self, lm, task: EvalTask) -> dict:
        try:
            with _quiet_lm_eval():
                res = self.lm_eval.simple_evaluate(
                    model=lm, tasks=[task.obj], num_fewshot=task.shots, limit=self.limit,
                    task_manager=self.task_manager, bootstrap_iters=0, log_samples=False)
        except ValueError as e:
            if "Sample larger than population" in str(e):
                raise DataError(f"eval task {task.name}: fewer few-shot examples than {task.shots} shots",
                                hint="add rows to its few-shot split (it needs shots + 1 when that split is also "
                                     "the one scored), or lower the shots: NAME:SHOTS") from None
            raise
        if res is None:
            raise SdpoError(f"eval task {task.name}: lm-eval returned no results", hint="run sdpo eval in one process")
        return res


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


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f}"


def _column(name: str, shots: int | None) -> str:
    return name if shots is None else f"{name} ({shots}-shot)"


def _name(item) -> str:
    """The results key of an lm-eval Task (task_name) or Group (name)."""
    return item.task_name if hasattr(item, "task_name") else item.name


def _leaves(item) -> list[str]:
    if hasattr(item, "get_all_tasks"):
        return [t.task_name for t in item.get_all_tasks()]
    return [item.task_name]


def _task_identity(item) -> str:
    """What a score depends on besides the model: every leaf's resolved config and the local files it reads."""
    leaves = item.get_all_tasks() if hasattr(item, "get_all_tasks") else [item]
    parts = []
    for leaf in leaves:
        config = leaf.dump_config()
        files = []
        data_files = (config.get("dataset_kwargs") or {}).get("data_files")
        for path in _flatten(data_files):
            local = Path(str(path))
            files.append(file_fingerprint(local) if local.exists() else str(path))
        parts.append([_stable(config), files])
    return fingerprint(_name(item), parts)


def _flatten(value) -> Iterator:
    if isinstance(value, dict):
        for v in value.values():
            yield from _flatten(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _flatten(v)
    elif value is not None:
        yield value


def _stable(value):
    """JSON-able, without memory addresses (a callable becomes its qualified name)."""
    if isinstance(value, dict):
        return {str(k): _stable(v) for k, v in value.items() if k != "metadata"}
    if isinstance(value, (list, tuple)):
        return [_stable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if callable(value):
        return f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', type(value).__name__)}"
    return type(value).__name__


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _offline_hint() -> str:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes") or \
            os.environ.get("HF_DATASETS_OFFLINE", "").lower() in ("1", "true", "yes"):
        where = "HF_HUB_OFFLINE is set and the dataset is not in the Hugging Face cache (HF_HOME)"
    else:
        where = ("the Hub cannot be reached and the dataset is not in the Hugging Face cache (HF_HOME; with "
                 "HF_HUB_OFFLINE=1 this fails at once, without retries)")
    return (f"{where}: fill the cache once on a machine with network access, or evaluate local task YAMLs "
            "(eval.tasks=[path/to/task.yaml]; docs/eval.md)")


def _first_line(e: BaseException) -> str:
    return " ".join(str(e).strip().split("\n")[0].split())[:300]


@contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    """lm-eval's per-task INFO/WARNING lines (57 'Overwriting num_fewshot' for MMLU, one per truncated request),
    the `git describe` it runs in the working directory, and its document bar off a terminal: silenced for the
    call. Truncation is counted by _CountingHFLM and reported once per task instead."""
    from unittest import mock

    import lm_eval.api.task as task_module
    import lm_eval.evaluator as evaluator_module

    log = logging.getLogger("lm_eval")
    level = log.level
    log.setLevel(logging.ERROR)
    patches = [mock.patch.object(evaluator_module, "get_git_commit_hash", lambda: None)]
    if not console.console.is_terminal:
        patches.append(mock.patch.object(task_module, "tqdm", partial(task_module.tqdm, disable=True)))
    try:
        for p in patches:
            p.start()
        yield
    finally:
        for p in reversed(patches):
            p.stop()
        log.setLevel(level)


_COUNTING_HFLM = None


def _counting_hflm():
    """HFLM that counts the requests whose prompt does not fit the model's context (lm-eval truncates them from the
    left with a log line per request) and draws its bars only on a terminal. Built on first use: lm_eval is an
    optional import."""
    global _COUNTING_HFLM
    if _COUNTING_HFLM is not None:
        return _COUNTING_HFLM
    from lm_eval.models.huggingface import HFLM

    class CountingHFLM(HFLM):
        def __init__(self, *args, quiet: bool = False, **kwargs):
            super().__init__(*args, **kwargs)
            self.quiet = quiet
            self.reset_counts()

        def reset_counts(self) -> None:
            self.n_requests, self.n_truncated, self.truncated_contexts = 0, 0, set()

        def counts(self) -> dict:
            return {"requests": self.n_requests, "truncated_requests": self.n_truncated,
                    "truncated_prompts": len(self.truncated_contexts), "max_length": self.max_length}

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            self.n_requests += len(requests)
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm or self.quiet)

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
            for (context, _), context_enc, continuation_enc in requests:
                if len(context_enc) + len(continuation_enc) > self.max_length + 1:
                    self.n_truncated += 1
                    self.truncated_contexts.add(context)
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm or self.quiet,
                                                 override_bs=override_bs)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            self.n_requests += len(requests)  # long documents are scored in windows: nothing is cut
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm or self.quiet)

        def generate_until(self, requests, disable_tqdm: bool = False):
            self.n_requests += len(requests)
            for request in requests:
                context, gen_kwargs = request.args[0], request.args[1] if len(request.args) > 1 else {}
                budget = self.max_length - int((gen_kwargs or {}).get("max_gen_toks", self.max_gen_toks))
                if len(self.tok_encode(context)) > budget:
                    self.n_truncated += 1
                    self.truncated_contexts.add(context)
            return super().generate_until(requests, disable_tqdm=disable_tqdm or self.quiet)

    _COUNTING_HFLM = CountingHFLM
    return CountingHFLM
