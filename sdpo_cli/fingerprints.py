"""What every stage is computed from, as one short hash per stage (recorded in its meta.json).

A finished artifact whose recorded fingerprint differs from the one below was made from another configuration or
other inputs: stages refuse to build on it (and `run` refuses to skip it) until it is redone with `--force`.

    split       data + split config, seed, tokenizer, the sources' contents (local) or names (hub)
    reflogp t   data/step-t, the reference model's identity, the numerics (dtype, attention, precision,
                quantization);
                gamma's cached log-probs use the same hash, so it reuses reflogp results
    train t     data/step-t, reflogp/step-t, the target's initial model, dpo + train config, seed, numerics
"""

from __future__ import annotations

from pathlib import Path

from sdpo_cli import integrity
from sdpo_cli.config import SdpoConfig, num_steps, section
from sdpo_cli.models import model_identity, reference_model, target_init_model, tokenizer_identity
from sdpo_cli.rundir import RunDir, file_fingerprint, fingerprint, read_meta


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


def split_fp(cfg: SdpoConfig, tok) -> str:
    sources = [source_identity(s.path, s.split, s.subset) for s in cfg.data.sources]
    eval_source = source_identity(cfg.data.eval.path, cfg.data.eval.split, cfg.data.eval.subset) \
        if cfg.data.eval else None
    curriculum = None
    if cfg.split.strategy == "curriculum":
        curriculum = [model_identity(cfg.model.base, cfg.model.revision), numerics(cfg)]
    return fingerprint("split", section(cfg, "data", "split"), cfg.seed, tokenizer_identity(tok), sources,
                       eval_source, curriculum)


def data_fp(run: RunDir, step: int | str) -> str | None:
    """Identity of one step's pairs: every data/step-t shares the split's fingerprint, so add the step."""
    meta = read_meta(run.data(step))
    return fingerprint(meta.get("fingerprint"), step) if meta else None


def logps_fp(cfg: SdpoConfig, data_identity: str | None, model: str) -> str:
    """Log-probs of one dataset under one model: the same computation whether `reflogp` or `gamma` asks for it."""
    return fingerprint("logps", data_identity, model_identity(model, cfg.model.revision), numerics(cfg))


def reflogp_fp(cfg: SdpoConfig, run: RunDir, step: int) -> str:
    return logps_fp(cfg, data_fp(run, step), reference_model(cfg, run, step))


# train.* keys that do not change the weights: editing them must not make a finished checkpoint stale.
NOT_WEIGHTS = ("logging_every", "report_to", "save_optimizer", "save_every")


def train_fp(cfg: SdpoConfig, run: RunDir, step: int) -> str:
    reflogp = read_meta(run.reflogp(step)) or {}
    config = section(cfg, "dpo", "train", "peft")
    config["train"] = {k: v for k, v in config["train"].items() if k not in NOT_WEIGHTS}
    # dpo.reference / dpo.target_init enter through the models they name (reflogp's fingerprint, the init model's
    # identity), so step 1 of `target_init=base` and of `previous` (both start from S) is the same computation.
    config["dpo"] = {k: v for k, v in config["dpo"].items() if k not in ("reference", "target_init")}
    parts = ["train", data_fp(run, step), reflogp.get("fingerprint"),
             model_identity(target_init_model(cfg, run, step), cfg.model.revision), config, cfg.seed, numerics(cfg)]
    if cfg.train.gradient_accumulation > 1:
        # since 0.1 (this session) an update's loss is the mean over the update's pairs, not the mean of its
        # micro-batches' means: that changes the weights only with accumulation, so only those runs go stale
        parts.append("loss=mean-over-update")
    return fingerprint(*parts)


def require_data(cfg: SdpoConfig, run: RunDir, step: int | str, tok) -> Path:
    """data/step-t, finished, made from the current config and intact (integrity.verify); else an error that says
    how to redo it."""
    from sdpo_cli.errors import ArtifactError

    path = run.data(step)
    meta = read_meta(path)
    if meta is None:
        raise ArtifactError(f"{path}: step data not found", hint="sdpo split CONFIG")
    if meta.get("fingerprint") != split_fp(cfg, tok):
        raise ArtifactError(f"{path} is stale: the data/split config, tokenizer or source files changed since it "
                            "was written", hint="sdpo split CONFIG --force  # then redo the later stages")
    integrity.verify(path)  # the stage reads it next: every file's size and content as written
    return path


def require_step(cfg: SdpoConfig, step: int) -> None:
    """--step T names one of the config's steps 1..T."""
    from sdpo_cli.errors import ConfigError

    if not 1 <= step <= num_steps(cfg):
        raise ConfigError(f"--step {step}: this config has steps 1..{num_steps(cfg)}", hint="pick a step in range")
