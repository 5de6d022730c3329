"""What every stage is computed from: one short hash per stage (meta.json's "fingerprint") and the inputs it hashed,
by name (meta.json's "inputs"), so that a stale artifact can say what changed.

    split       data + split config, seed, tokenizer, the sources' contents (local) or names (hub)
    reflogp t   data/step-t, the reference model's identity, the numerics (dtype, attention, precision,
                quantization);
                gamma's cached log-probs use the same hash, so it reuses reflogp results
    train t     data/step-t, reflogp/step-t, the target's initial model, dpo + train config, seed, numerics

A finished artifact whose recorded fingerprint differs from the one below was made from another configuration or
other inputs: stages refuse to build on it (and `run` refuses to skip it) until it is redone (`--force`, or
`sdpo run --redo-stale` for every stale stage at once); `sdpo status` lists them.

Each stage's function hashes the same parts, in the same order, as sdpo always has (a finished run must not turn
stale because sdpo changed), and returns the hash as a `Fingerprint`: the 16-hex-digit str, carrying `inputs`, the
same parts named in the user's terms:

    {"config":    {"dpo.beta": 0.1, "seed": 42, ...},       the config keys hashed, flattened (data.sources.0.path)
     "files":     {"/data/orca.jsonl": "3f2a..."},          each source: its content hash (local) or its name's (hub)
     "models":    {"reference": {"model": "checkpoints/step-1", "identity": "..."}},   run-relative inside the run
     "artifacts": {"data/step-1": "..."},                   the run's artifacts it is computed from
     "rules":     ["loss=mean-over-update"]}                changes of sdpo itself that made older artifacts stale

`explain(meta, expected)` compares a recorded meta.json with an expected fingerprint and says why they differ:
`dpo.beta 0.1 → 0.2`, `the input file /data/orca.jsonl changed`, `its input data/step-1 was redone`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sdpo_cli import integrity
from sdpo_cli.config import SdpoConfig, num_steps, section
from sdpo_cli.models import model_identity, reference_model, target_init_model, tokenizer_identity
from sdpo_cli.rundir import RunDir, file_fingerprint, fingerprint, read_meta, redo_hint

# the reason of an artifact whose meta.json records no inputs (written before sdpo recorded them)
NO_INPUTS = "made by an earlier sdpo or another configuration (no recorded inputs)"


class Fingerprint(str):
    """A stage's fingerprint: this str is the hash, stored and compared as always; `inputs` names what it hashed."""

    inputs: dict

    def __new__(cls, value: str, inputs: dict | None = None, name: str | None = None):
        self = super().__new__(cls, value)
        self.inputs = inputs or {}
        self.name: str | None = name  # the run-relative artifact it identifies (data_fp: data/step-1), if any
        return self


def source_identity(path: str, split: str, subset: str | None) -> str:
    local = Path(path)
    if local.exists():
        return file_fingerprint(local)
    return fingerprint(path, split, subset)  # a hub dataset: its name and split


def numerics(cfg: SdpoConfig) -> list:
    values = [cfg.model.dtype, cfg.model.attn_implementation, cfg.train.mixed_precision, cfg.train.layout]
    # model.quantization changes every log-prob (reflogp, gamma, curriculum scores, the target); appended only when
    # set, so that the fingerprints of unquantized runs stay what they were
    return (values + [f"quantization={cfg.model.quantization}"]) if cfg.model.quantization else values


def numeric_keys(cfg: SdpoConfig) -> dict:
    """numerics(cfg) by key."""
    keys = {"model.dtype": cfg.model.dtype, "model.attn_implementation": cfg.model.attn_implementation,
            "train.mixed_precision": cfg.train.mixed_precision, "train.layout": cfg.train.layout}
    return keys | ({"model.quantization": cfg.model.quantization} if cfg.model.quantization else {})


def flat(tree: Any, prefix: str = "") -> dict:
    """Config sections as dotted keys: {"dpo": {"beta": 0.1}} -> {"dpo.beta": 0.1}; a list of mappings by index
    (data.sources.0.path), any other list as one value (split.fractions)."""
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in flat(value, f"{prefix}{key}.").items()}
    if isinstance(tree, list) and tree and all(isinstance(v, dict) for v in tree):
        return {k: v for i, value in enumerate(tree) for k, v in flat(value, f"{prefix}{i}.").items()}
    return {prefix[:-1]: tree}


def _model(source: str, identity: str, run: RunDir | None) -> dict:
    """A model input: where it is (run-relative when it is one of the run's checkpoints) and its identity."""
    where = source
    if run is not None:
        try:
            where = str(Path(source).resolve().relative_to(run.root.resolve()))
        except (ValueError, OSError):
            pass
    return {"model": where, "identity": identity}


# (section, key, default) of split-fingerprint keys added after runs existed: left out of the hash at their default
ADDED_AT_DEFAULT = (("data", "drop_ties", False), ("split", "curriculum_score", "gamma"))
PROMPT_CUT = "max_prompt_length=content-cut"  # how data.max_prompt_length cuts (tokenize.cut_prompt)


def split_fp(cfg: SdpoConfig, tok) -> Fingerprint:
    files = {}
    sources = []
    for s in cfg.data.sources:
        sources.append(files.setdefault(s.path, source_identity(s.path, s.split, s.subset)))
    eval_source = None
    if cfg.data.eval:
        e = cfg.data.eval
        eval_source = files.setdefault(e.path, source_identity(e.path, e.split, e.subset))
    tokenizer = tokenizer_identity(tok)
    models = {"tokenizer": _model(cfg.model.base, tokenizer, None)}
    config = section(cfg, "data", "split")
    if not config["split"]["eval_fraction"]:  # added after 0.1.0: runs without held-out pairs keep their fingerprint
        del config["split"]["eval_fraction"]
    for sect, key, default in ADDED_AT_DEFAULT:  # keys added later: at their defaults the fingerprint is as before
        if config[sect].get(key, default) == default:
            config[sect].pop(key, None)
    keys = flat(config) | {"seed": cfg.seed}
    # data.max_prompt_length cuts the prompt's content, no longer its ids from the left (which lost BOS and the
    # template's framing): a split made with a prompt cap under the old rule is stale. Without a cap nothing changed.
    rules = [PROMPT_CUT] if cfg.data.max_prompt_length is not None else []
    curriculum = None
    if cfg.split.strategy == "curriculum":
        base = model_identity(cfg.model.base, cfg.model.revision)
        curriculum = [base, numerics(cfg)]
        models["base model"] = _model(cfg.model.base, base, None)
        keys |= numeric_keys(cfg)
    parts = ["split", config, cfg.seed, tokenizer, sources, eval_source, curriculum] + rules
    return Fingerprint(fingerprint(*parts), {"config": keys, "files": files, "models": models, "rules": rules})


def data_fp(run: RunDir, step: int | str) -> Fingerprint | None:
    """Identity of one step's pairs: every data/step-t shares the split's fingerprint, so add the step."""
    meta = read_meta(run.data(step))
    return Fingerprint(fingerprint(meta.get("fingerprint"), step), name=run.rel(run.data(step))) if meta else None


def logps_fp(cfg: SdpoConfig, data_identity: str | None, model: str, run: RunDir | None = None,
             data_name: str | None = None) -> Fingerprint:
    """Log-probs of one dataset under one model: the same computation whether `reflogp` or `gamma` asks for it.
    `run`: the run directory, to name the run's checkpoints by their place in it; `data_name`: the data's name when
    `data_identity` (a data_fp) does not carry it."""
    identity = model_identity(model, cfg.model.revision)
    name = getattr(data_identity, "name", None) or data_name or "data"
    return Fingerprint(fingerprint("logps", data_identity, identity, numerics(cfg)),
                       {"config": numeric_keys(cfg), "models": {"reference": _model(model, identity, run)},
                        "artifacts": {name: data_identity}})


def reflogp_fp(cfg: SdpoConfig, run: RunDir, step: int) -> Fingerprint:
    return logps_fp(cfg, data_fp(run, step), reference_model(cfg, run, step), run, run.rel(run.data(step)))


# train.* keys that do not change the weights: editing them must not make a finished checkpoint stale.
NOT_WEIGHTS = ("logging_every", "report_to", "save_optimizer", "save_every", "eval_every", "activation_budget_gb")


# dpo.* keys added after 0.1 (TRL's losses and modifiers, docs/losses.md) with their defaults: left out of the hash at
# these values, so that the checkpoints of runs made before they existed stay current
DPO_ADDED = {"loss_weights": None, "ld_alpha": None, "use_weighting": False, "f_divergence_type": "reverse_kl",
             "f_alpha_divergence_coef": 0.5, "discopop_tau": 0.05}


def dpo_hashed(dpo: dict) -> dict:
    """The dpo section as train_fp hashes it: without the DPO_ADDED keys at their defaults, nor the ones that do not
    apply (f_alpha_divergence_coef without alpha_divergence, discopop_tau without the discopop loss)."""
    names = dpo.get("loss")
    names = [names] if isinstance(names, str) else list(names or [])
    unused = set()
    if dpo.get("f_divergence_type", "reverse_kl") != "alpha_divergence":
        unused.add("f_alpha_divergence_coef")
    if "discopop" not in names:
        unused.add("discopop_tau")
    return {k: v for k, v in dpo.items() if k not in unused and not (k in DPO_ADDED and v == DPO_ADDED[k])}


def train_fp(cfg: SdpoConfig, run: RunDir, step: int) -> Fingerprint:
    reflogp = read_meta(run.reflogp(step)) or {}
    config = section(cfg, "dpo", "train", "peft")
    config["train"] = {k: v for k, v in config["train"].items() if k not in NOT_WEIGHTS}
    # checkpointing does not change the weights either, but it was hashed before `auto` existed: `auto` hashes as
    # false (the old default), so that the checkpoints of earlier runs stay current
    config["train"]["gradient_checkpointing"] = config["train"]["gradient_checkpointing"] is True
    # dpo.reference / dpo.target_init enter through the models they name (reflogp's fingerprint, the init model's
    # identity), so step 1 of `target_init=base` and of `previous` (both start from S) is the same computation.
    config["dpo"] = {k: v for k, v in config["dpo"].items() if k not in ("reference", "target_init")}
    config["dpo"] = dpo_hashed(config["dpo"])
    data, init = data_fp(run, step), target_init_model(cfg, run, step)
    start = model_identity(init, cfg.model.revision)
    parts = ["train", data, reflogp.get("fingerprint"), start, config, cfg.seed, numerics(cfg)]
    rules = []
    if cfg.train.gradient_accumulation > 1:
        # since 0.1 (this session) an update's loss is the mean over the update's pairs, not the mean of its
        # micro-batches' means: that changes the weights only with accumulation, so only those runs go stale
        parts.append("loss=mean-over-update")
        rules.append("loss=mean-over-update")
    inputs = {"config": flat(config) | {"seed": cfg.seed} | numeric_keys(cfg),
              "models": {"starting model": _model(init, start, run)},
              "artifacts": {run.rel(run.data(step)): data, run.rel(run.reflogp(step)): reflogp.get("fingerprint")},
              "rules": rules}
    return Fingerprint(fingerprint(*parts), inputs)


# ---------------------------------------------------------------------------------------------------------------
# Why a finished artifact is stale, in the user's terms

_UNSET = object()
RUN_ARTIFACTS = ("data/", "reflogp/", "checkpoints/")  # how the run's own artifacts start, run-relative
MAX_KEYS = 8  # config keys named in one reason; more are counted


def explain(meta: dict | None, expected: Fingerprint, root: Path | None = None) -> list[str]:
    """Why the artifact whose meta.json is `meta` is not what `expected` describes: the changed config keys
    (`dpo.beta 0.1 → 0.2`), input files, models and upstream artifacts; NO_INPUTS when meta.json records no inputs.
    `root`: the run directory (to tell its own checkpoints from other models)."""
    old = (meta or {}).get("inputs")
    if not isinstance(old, dict):
        return [NO_INPUTS]
    new = getattr(expected, "inputs", None) or {}
    reasons = _config_changes(old.get("config") or {}, new.get("config") or {})
    explained = bool(reasons)
    reasons += _file_changes(old.get("files") or {}, new.get("files") or {}, explained)
    reasons += _model_changes(old.get("models") or {}, new.get("models") or {}, root, explained)
    reasons += _artifact_changes(old.get("artifacts") or {}, new.get("artifacts") or {})
    if (old.get("rules") or []) != (new.get("rules") or []):
        reasons.append("made by an earlier sdpo, which computed it another way ("
                       + ", ".join(new.get("rules") or ["its rules"]) + ")")
    return reasons or ["made by another version of sdpo (the same inputs, another fingerprint)"]


def show(value: Any) -> str:
    """A config value as a user writes it: 0.2, sigmoid, null, [0.5, 0.5]."""
    if value is _UNSET:
        return "(unset)"
    if isinstance(value, str):
        return value if value else '""'
    return json.dumps(value)


def _config_changes(old: dict, new: dict) -> list[str]:
    keys = list(new) + [k for k in old if k not in new]
    changed = [k for k in keys if old.get(k, _UNSET) != new.get(k, _UNSET)]
    lines = [f"{k} {show(old.get(k, _UNSET))} → {show(new.get(k, _UNSET))}" for k in changed[:MAX_KEYS]]
    if len(changed) > MAX_KEYS:
        lines.append(f"and {len(changed) - MAX_KEYS} more config keys")
    return lines


def _file_changes(old: dict, new: dict, explained: bool) -> list[str]:
    lines = []
    for path, identity in new.items():
        if path in old and old[path] != identity:
            lines.append(f"the input file {path} changed" if Path(path).exists() else f"the dataset {path} changed")
        elif path not in old and not explained:  # a new source path is a config change, named above
            lines.append(f"a new input {path}")
    return lines


def _model_changes(old: dict, new: dict, root: Path | None, explained: bool) -> list[str]:
    lines = []
    for role, model in new.items():
        before = old.get(role)
        if not isinstance(before, dict) or not isinstance(model, dict):
            if before is None and not explained:
                lines.append(f"a new input: the {role} {model.get('model') if isinstance(model, dict) else ''}")
            continue
        if before.get("identity") == model.get("identity"):
            continue
        where, was = model.get("model"), before.get("model")
        if was != where:
            lines.append(f"{role} {was} → {where}")
        elif role == "tokenizer":
            lines.append(f"the tokenizer of {where} changed (vocabulary, chat template, BOS/EOS or pad token)")
        elif _in_run(where, root):
            lines.append(f"its input {where} was redone" if (root / where / "meta.json").is_file()
                         else f"its input {where} is missing")
        else:
            lines.append(f"the {role} {where} changed (its files, config.json or model.revision)")
    return lines


def _in_run(where: str | None, root: Path | None) -> bool:
    """One of the run's own artifacts, as `_model` names them (run-relative)."""
    return root is not None and isinstance(where, str) and where.startswith(RUN_ARTIFACTS)


def _artifact_changes(old: dict, new: dict) -> list[str]:
    lines = []
    for name, identity in new.items():
        if old.get(name, _UNSET) == identity:
            continue
        if identity is None:
            lines.append(f"its input {name} is missing")
        elif name in old:
            lines.append(f"its input {name} was redone")
        else:
            lines.append(f"a new input {name}")
    return lines


def stale_reason(path: Path, meta: dict | None, expected: str) -> str:
    """`explain` as one line, for errors: `dpo.beta 0.1 → 0.2; its input data/step-1 was redone`."""
    if not isinstance(expected, Fingerprint):
        return NO_INPUTS if not (meta or {}).get("inputs") else f"another fingerprint ({expected})"
    return "; ".join(explain(meta, expected, root=path.parent.parent))


def depends_on(expected: Fingerprint) -> list[str]:
    """The run's artifacts an expected fingerprint is computed from (their run-relative paths): its upstream
    artifacts and the run's checkpoints among its models. A change of one of them changes this fingerprint, so
    redoing them makes this artifact stale in turn."""
    inputs = getattr(expected, "inputs", None) or {}
    names = [name for name in inputs.get("artifacts") or {}]
    names += [m["model"] for m in (inputs.get("models") or {}).values()
              if isinstance(m, dict) and isinstance(m.get("model"), str) and m["model"].startswith(RUN_ARTIFACTS)]
    return names


def require_data(cfg: SdpoConfig, run: RunDir, step: int | str, tok, ctx=None) -> Path:
    """data/step-t, finished, made from the current config and intact (integrity.verify); else an error that says
    why and how to redo it, with the command line of `ctx` (a RunContext; `CONFIG` without one)."""
    from sdpo_cli.errors import ArtifactError

    split = ctx.command("split") if ctx is not None else "sdpo split CONFIG"
    path = run.data(step)
    meta = read_meta(path)
    if meta is None:
        raise ArtifactError(f"{path}: step data not found", hint=split)
    expected = split_fp(cfg, tok)
    if meta.get("fingerprint") != expected:
        raise ArtifactError(f"{path} is stale: {stale_reason(path, meta, expected)}",
                            hint=redo_hint(split, ctx.command("run") if ctx is not None else None))
    integrity.verify(path)  # the stage reads it next: every file's size and content as written
    return path


def require_step(cfg: SdpoConfig, step: int) -> None:
    """--step T names one of the config's steps 1..T."""
    from sdpo_cli.errors import ConfigError

    if not 1 <= step <= num_steps(cfg):
        raise ConfigError(f"--step {step}: this config has steps 1..{num_steps(cfg)}", hint="pick a step in range")
