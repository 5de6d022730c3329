"""lm-evaluation-harness behind one door: the only sdpo module that imports lm-eval (0.4.13, the optional extra
`sdpo[eval]`), and it uses lm-eval's public API only. Importing this module imports lm-eval; sdpo_cli.evaluate
imports it on first use (`evaluate.open_harness`), which turns a missing lm-eval into a ConfigError with the
install command.

    TaskLoader   lm-eval's TaskManager over its bundled tasks (when a registered name is asked for) and the task
                 folders given: loads names, task YAML files and whole folders, datasets included, as LoadedTask
    defined_names  the names that task YAML files and folders define (eval.tasks' paths, as --include_path)
    CountingLM   lm-eval's HFLM around a model already loaded, counting the prompts longer than the model's context
    run_task     one lm_eval.evaluate call for one task or group with its shots, prepared as simple_evaluate does
    quiet        lm-eval's log lines (and, off a terminal, the one progress bar it draws without a switch) silenced

Why `lm_eval.evaluate` and not `simple_evaluate`: simple_evaluate, after scoring, runs `git describe` in the working
directory (which prints `fatal: not a git repository` to stderr outside one) and collects the environment (~2 s per
call); neither lands in sdpo's reports. `run_task` prepares the tasks exactly as simple_evaluate 0.4.13 does for a
model object (its seeds, its num_fewshot rule, its few-shot seed) and then makes the same `evaluate` call.
"""

from __future__ import annotations

import importlib.metadata
import io
import logging
import os
import random
import sys
from contextlib import ExitStack, contextmanager, redirect_stderr
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import lm_eval.evaluator  # first: it fails when lm-eval is missing, even if some of its modules were imported
import numpy as np
import torch
import yaml
from lm_eval.api.group import Group
from lm_eval.defaults import DEFAULT_OTHER_SEED, DEFAULT_RANDOM_SEED
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

from sdpo_cli.config import is_task_path
from sdpo_cli.errors import ConfigError, DataError, SdpoError, first_line
from sdpo_cli.rundir import file_fingerprint, fingerprint

VERSION: str = importlib.metadata.version("lm_eval")  # what lm_eval.__version__ reports


# ------------------------------------------------------------------------------------------------------ quiet


@contextmanager
def quiet(*, bars: bool = True) -> Iterator[None]:
    """lm-eval's INFO/WARNING lines off for the call (a 'Building contexts' line per task, 57 for MMLU, and a line per
    truncated request: CountingLM counts those and sdpo reports them once per task). With `bars` false (stderr is not
    a terminal), also the document bar of Task.build_all_requests, which lm-eval draws without a switch to turn it
    off: sys.stderr is captured for the call and written back without tqdm's bar lines."""
    log = logging.getLogger("lm_eval")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with ExitStack() as stack:
            if not bars:
                stack.enter_context(_without_bar_lines())
            yield
    finally:
        log.setLevel(level)


@contextmanager
def _without_bar_lines() -> Iterator[None]:
    """sys.stderr into a buffer for the call, then every line of it but tqdm's (a tqdm bar redraws itself after a
    carriage return) to the stderr of before. Other text written meanwhile (Python warnings) comes out afterwards."""
    real, buffer = sys.stderr, io.StringIO()
    try:
        with redirect_stderr(buffer):
            yield
    finally:
        text = "\n".join(line for line in buffer.getvalue().split("\n") if "\r" not in line)
        if text:
            real.write(text)


# ------------------------------------------------------------------------------------------------------ tasks


@dataclass
class LoadedTask:
    """A top-level lm-eval task or group, its data loaded."""

    name: str  # the key of its scores in lm-eval's results (a task's task_name, a group's name)
    obj: Any  # the lm_eval Task or Group
    leaves: list[str] = field(default_factory=list)  # its leaf tasks' names (57 for mmlu; a task: itself)
    identity: str = ""  # every leaf's resolved config and the local data files it reads


class TaskLoader:
    """lm-eval's TaskManager: its bundled tasks when `defaults` (indexing them takes a few seconds), and the task YAMLs
    of `folders`. Task YAML files are loaded by path and need no index."""

    def __init__(self, folders: list[Path], *, defaults: bool):
        with quiet():
            self.manager = TaskManager(include_path=[str(f) for f in folders] or None, include_defaults=defaults)

    def load_folder(self, spec: str, folder: Path) -> list[LoadedTask]:
        """Every group and task the folder's YAMLs define; a task in one of the folder's groups is scored in it."""
        groups, tasks = folder_names(folder)
        if not groups and not tasks:
            raise ConfigError(f"eval task folder {folder}: no lm-eval task YAML in it",
                              hint="a task YAML has a `task:` key; see docs/eval.md")
        items = self.load(spec, groups)
        in_groups = {leaf for item in items for leaf in item.leaves}
        return items + self.load(spec, [n for n in tasks if n not in in_groups])

    def load(self, spec: str, names: list[str]) -> list[LoadedTask]:
        """The top-level lm-eval objects for `names` (a tag becomes its tasks), with their datasets loaded."""
        items = []
        for name in names:
            loaded = self._load_one(spec, name)
            groups, leaves = loaded["groups"], loaded["tasks"]
            children = {c for g in groups.values() for c in g.child_names}
            top = [g for n, g in groups.items() if n not in children]
            in_groups = {leaf for g in groups.values() for leaf in _leaves(g)}
            top += [t for n, t in leaves.items() if n not in in_groups]
            items += [LoadedTask(name=_name(obj), obj=obj, leaves=_leaves(obj), identity=_identity(obj)) for obj in top]
        return items

    def _load_one(self, spec: str, name: str) -> dict:
        what = f"eval task {Path(name).name if is_task_path(name) else name!r}" + \
            ("" if spec == name else f" (from {spec!r})")
        try:
            with quiet():
                return self.manager.load([name])
        except KeyError:
            raise ConfigError(f"{what}: lm-eval {VERSION} has no task, group or tag of that name",
                              hint="check the name (lm-eval ls tasks); a task of your own: give its YAML file or "
                                   "folder, or list it in eval.tasks and name it") from None
        except (ConnectionError, FileNotFoundError) as e:
            raise DataError(f"{what}: its dataset cannot be loaded ({first_line(e)})", hint=offline_hint()) from None
        except (ValueError, TypeError, OSError) as e:
            raise ConfigError(f"{what}: lm-eval cannot load it ({first_line(e)})",
                              hint="check the task YAML against lm-eval's task guide; see docs/eval.md") from e


def folder_names(folder: Path) -> tuple[list[str], list[str]]:
    """The groups and the tasks (YAML or Python-class ones; tags left out) that a folder's YAMLs define, each in the
    order lm-eval indexes them (by path)."""
    with quiet():
        index = TaskManager(include_path=[str(folder)], include_defaults=False)
    groups, tasks = set(index.all_groups), set(index.all_subtasks)
    return [n for n in index.task_index if n in groups], [n for n in index.task_index if n in tasks]


def defined_names(files: list[Path], folders: list[Path]) -> dict[str, Path]:
    """The task, group and tag names that task YAML files and folders define, each -> the file or folder: what
    lm-eval's `--include_path` makes addressable by name. A folder is indexed as include_path indexes it; a file
    (which include_path does not index) by the name its YAML gives (`defined_name`). The first path that defines a
    name wins; a path that cannot be read defines nothing (it is checked when it is itself evaluated)."""
    names: dict[str, Path] = {}
    for path in files:
        name = defined_name(path)
        if name is not None:
            names.setdefault(name, path)
    for folder in folders:
        with quiet():
            index = TaskManager(include_path=[str(folder)], include_defaults=False)
        for name in index.all_tasks:
            names.setdefault(name, folder)
    return names


class _TaskYaml(yaml.SafeLoader):
    """A task YAML read for its name only: lm-eval's tags (`!function utils.process_docs`) are left unresolved."""


_TaskYaml.add_multi_constructor("!", lambda loader, suffix, node: None)


def defined_name(path: Path, seen: tuple[Path, ...] = ()) -> str | None:
    """The name a task YAML file defines: a group's `group:`, else its `task:`; from the file it `include:`s (a path
    relative to it, as lm-eval resolves it) when it sets neither. None when it is not a task YAML."""
    try:
        spec = yaml.load(path.read_text(), Loader=_TaskYaml)  # a SafeLoader
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    if not isinstance(spec, dict):
        return None
    for key in ("group", "task"):  # a group's `task:` is the list of its tasks
        if isinstance(spec.get(key), str):
            return spec[key]
    include = spec.get("include")
    if isinstance(include, str) and path not in seen:
        target = Path(include).expanduser()
        return defined_name((target if target.is_absolute() else path.parent / target).resolve(), (*seen, path))
    return None


def offline_hint() -> str:
    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("HF_DATASETS_OFFLINE", ""))
    if any(flag.lower() in ("1", "true", "yes") for flag in flags):
        where = "HF_HUB_OFFLINE is set and the dataset is not in the Hugging Face cache (HF_HOME)"
    else:
        where = ("the Hub cannot be reached and the dataset is not in the Hugging Face cache (HF_HOME; with "
                 "HF_HUB_OFFLINE=1 this fails at once, without retries)")
    return (f"{where}: fill the cache once on a machine with network access, or evaluate local task YAMLs "
            "(eval.tasks=[path/to/task.yaml]; docs/eval.md)")


def _name(item: Any) -> str:
    return item.name if isinstance(item, Group) else item.task_name


def _leaves(item: Any) -> list[str]:
    return [t.task_name for t in item.get_all_tasks()] if isinstance(item, Group) else [item.task_name]


def _identity(item: Any) -> str:
    """What a score depends on besides the model: every leaf's resolved config and the local files it reads."""
    parts = []
    for leaf in item.get_all_tasks() if isinstance(item, Group) else [item]:
        config = leaf.dump_config()
        data_files = (config.get("dataset_kwargs") or {}).get("data_files")
        files = [file_fingerprint(Path(str(p))) if Path(str(p)).exists() else str(p) for p in _flatten(data_files)]
        parts.append([_stable(config), files])
    return fingerprint(_name(item), parts)


def _flatten(value: Any) -> Iterator:
    if isinstance(value, dict):
        for v in value.values():
            yield from _flatten(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _flatten(v)
    elif value is not None:
        yield value


def _stable(value: Any) -> Any:
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


# ------------------------------------------------------------------------------------------------------ scoring


class CountingLM(HFLM):
    """lm-eval's HFLM around a loaded model and tokenizer. It counts requests, and the requests whose prompt does not
    fit the model's context (lm-eval cuts those from the left, with a log line each), in its public request methods;
    it draws lm-eval's bars only when `bars`."""

    def __init__(self, model: Any, *, tokenizer: Any, batch_size: int, bars: bool):
        with quiet():  # lm-eval warns that a loaded model makes its device/dtype arguments moot: they are ours
            super().__init__(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        self.show_bars = bars
        self.reset_counts()

    def reset_counts(self) -> None:
        self.n_requests, self.n_truncated, self.truncated_contexts = 0, 0, set()

    def counts(self) -> dict:
        return {"requests": self.n_requests, "truncated_requests": self.n_truncated,
                "truncated_prompts": len(self.truncated_contexts), "max_length": self.max_length}

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        self.n_requests += len(requests)
        context_lengths: dict[str, int] = {}  # the choices of a multiple-choice question share its context
        for request in requests:
            context, continuation = request.args
            if pair_length(self, context, continuation, context_lengths=context_lengths) > self.max_length + 1:
                self.n_truncated += 1
                self.truncated_contexts.add(context)
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not self.show_bars)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        self.n_requests += len(requests)  # long documents are scored in windows: nothing is cut
        return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm or not self.show_bars)

    def generate_until(self, requests, disable_tqdm: bool = False):
        self.n_requests += len(requests)
        for request in requests:
            context, gen_kwargs = request.args[0], request.args[1] if len(request.args) > 1 else {}
            budget = self.max_length - int((gen_kwargs or {}).get("max_gen_toks", self.max_gen_toks))
            if len(self.tok_encode(context)) > budget:
                self.n_truncated += 1
                self.truncated_contexts.add(context)
        return super().generate_until(requests, disable_tqdm=disable_tqdm or not self.show_bars)


def pair_length(lm: HFLM, context: str, continuation: str, *, context_lengths: dict[str, int]) -> int:
    """len(context tokens) + len(continuation tokens) of a loglikelihood request, encoded as lm-eval 0.4.13's
    TemplateLM.loglikelihood encodes it (through the public tok_encode): an empty context is the prefix token;
    trailing spaces of the context move to the continuation; a causal model's continuation is what the whole text
    adds to the context's tokens. lm-eval cuts a request from the left when this exceeds max_length + 1."""
    if context == "":
        tokens = lm.tok_encode(continuation, add_special_tokens=False)
        return len(tokens) + int(not tokens or tokens[0] != lm.prefix_token_id)
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    if context not in context_lengths:
        context_lengths[context] = len(lm.tok_encode(context))
    if lm.backend == "causal":
        return max(context_lengths[context], len(lm.tok_encode(context + continuation)))
    return context_lengths[context] + len(lm.tok_encode(continuation, add_special_tokens=False))


def run_task(lm: CountingLM, task: LoadedTask, *, loader: TaskLoader, shots: int | None,
             limit: int | None) -> dict:
    """lm-eval's results for one task or group: one `lm_eval.evaluate` call, prepared as simple_evaluate 0.4.13
    prepares it for a model object: random/numpy/torch seeds, `shots` on every leaf unless its YAML sets 0 (None:
    the YAML's, else 0), the few-shot sampler's seed; no stderr bootstrap, no per-sample log."""
    random.seed(DEFAULT_RANDOM_SEED)
    np.random.seed(DEFAULT_OTHER_SEED)
    torch.manual_seed(DEFAULT_OTHER_SEED)
    loaded = loader.manager.load([task.obj])
    for leaf in loaded["tasks"].values():
        if shots is not None and leaf.get_config("num_fewshot") != 0:
            leaf.set_config(key="num_fewshot", value=shots)
        elif shots is None and leaf.get_config("num_fewshot") is None:
            leaf.set_config(key="num_fewshot", value=0)
        leaf.set_fewshot_seed(seed=DEFAULT_OTHER_SEED)
    try:
        with quiet(bars=lm.show_bars):
            res = lm_eval.evaluator.evaluate(lm=lm, task_dict=loaded, limit=limit, bootstrap_iters=0,
                                             log_samples=False, fewshot_as_multiturn=True)
    except ValueError as e:
        if "Sample larger than population" in str(e):
            raise DataError(f"eval task {task.name}: fewer few-shot examples than {shots} shots",
                            hint="add rows to its few-shot split (it needs shots + 1 when that split is also "
                                 "the one scored), or lower the shots: NAME:SHOTS") from None
        raise
    if res is None:
        raise SdpoError(f"eval task {task.name}: lm-eval returned no results", hint="run sdpo eval in one process")
    return res
