"""The training options, each through `sdpo train` (cli.main() in this process) on the tiny model for a few updates,
checked against numbers computed independently of train.py: the reference log-probs of reflogp/step-t, a plain
transformers forward of the tiny model, and the files train writes (logs/train-step-t.jsonl, checkpoints/step-t).

gradient_accumulation, the ln 2 check (ok, FAILED, skipped), dpo.nll_weight, train.shuffle, train.group_by_length,
train.report_to and train.save_optimizer. One split + reflogp of step 1 is shared; every test trains on its own copy.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import datasets
import pytest
import torch
import yaml

from tests.conftest import tiny_pairs, write_jsonl
from tests.test_errors import run_in_process

BETA = 0.1  # dpo.beta's default
TIMING = ("tokens/s",)  # the only logged fields that depend on the clock
BASE_TRAIN = {"learning_rate": 1e-3, "per_device_batch_size": 4, "logging_every": 1, "warmup_ratio": 0.0}


def write_config(folder: Path, model: Path, pairs_a: int = 16) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    a = write_jsonl(folder / "a.jsonl", tiny_pairs(pairs_a, seed=1))
    b = write_jsonl(folder / "b.jsonl", tiny_pairs(16, seed=2))
    cfg = {"run_dir": str(folder / "run"), "model": {"base": str(model)},
           "data": {"sources": [{"name": "a", "path": str(a)}, {"name": "b", "path": str(b)}], "max_length": 64},
           "split": {"strategy": "natural"}, "train": dict(BASE_TRAIN), "inference": {"batch_size": 8}}
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def sdpo(*args: str):
    result = run_in_process(*args)
    assert result.returncode == 0, result.stderr
    return result


def prepare(folder: Path, model: Path, pairs_a: int = 16) -> tuple[Path, Path]:
    """split + reflogp of step 1: (config, run dir)."""
    config = write_config(folder, model, pairs_a)
    sdpo("split", str(config))
    sdpo("reflogp", "--step", "1", str(config))
    return config, folder / "run"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_model_dir) -> tuple[Path, Path]:
    return prepare(tmp_path_factory.mktemp("prepared"), tiny_model_dir)


@pytest.fixture(scope="module")
def after_step1(prepared, tmp_path_factory) -> Path:
    """The prepared run with M_1 trained (default options): the start of the step-2 tests."""
    config, run = prepared
    copy = tmp_path_factory.mktemp("after-step1") / "run"
    shutil.copytree(run, copy)
    sdpo("train", "--step", "1", str(config), f"run_dir={copy}")
    return copy


def train(config: Path, source: Path, dest: Path, *overrides: str, step: int = 1):
    """Copy the run `source` to `dest`, run `sdpo train --step STEP` there; (log records, CompletedProcess)."""
    shutil.copytree(source, dest)
    result = sdpo("train", "--step", str(step), str(config), f"run_dir={dest}", *overrides)
    return read_log(dest / "logs" / f"train-step-{step}.jsonl"), result


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def assert_same_records(a: list[dict], b: list[dict], abs_tol: float = 1e-5) -> None:
    assert [r["update"] for r in a] == [r["update"] for r in b]
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            if key in TIMING:
                continue
            if isinstance(x[key], float):
                assert x[key] == pytest.approx(y[key], abs=abs_tol), (x["update"], key, x[key], y[key])
            else:
                assert x[key] == y[key], (x["update"], key)


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def plain_logps(model, prompt: list[int], completion: list[int]) -> float:
    """Summed log-prob of a completion: one unpadded row, full logits, log_softmax, gather (no sdpo code)."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[0, :-1].float(), -1)
    return logp.gather(-1, ids[0, 1:, None]).squeeze(-1)[len(prompt) - 1:].sum().item()


def load_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


# ---------------------------------------------------------------------------------------------------------------
# gradient_accumulation


@pytest.mark.parametrize("order", [["train.shuffle=false"], ["train.group_by_length=false"]],
                         ids=["file-order", "random-order"])
def test_gradient_accumulation_equals_the_same_global_batch(prepared, tmp_path, tiny_model_dir, order):
    """2 pairs x 2 micro-batches == 4 pairs x 1: the sigmoid loss is a mean per pair, accelerate divides each
    micro-batch's loss by the accumulation steps, so the gradient of each update is the same mean over 4 pairs.
    (Both orders draw the same 4 pairs per update: file order, or one permutation cut in 2s or 4s.)"""
    config, run = prepared
    one, _ = train(config, run, tmp_path / "b4", "train.per_device_batch_size=4", *order)
    accumulated, result = train(config, run, tmp_path / "b2x2", "train.per_device_batch_size=2",
                                "train.gradient_accumulation=2", *order)
    assert "4 updates of 2×2×1 = 4 pairs" in result.stderr
    assert [r["update"] for r in one] == [0, 1, 2, 3] and all(r["pairs"] == 4 for r in one + accumulated)
    assert_same_records(one, accumulated)
    w1, w2 = weights(tmp_path / "b4" / "checkpoints" / "step-1"), weights(tmp_path / "b2x2" / "checkpoints" / "step-1")
    assert max_diff(w1, w2) <= 1e-5
    assert max_diff(w1, weights(tiny_model_dir)) > 1e-3  # training did move the weights


@pytest.mark.parametrize("pairs", [14, 15])
def test_gradient_accumulation_equals_the_same_global_batch_when_the_last_batch_is_short(
        tmp_path, tiny_model_dir, pairs):
    config, run = prepare(tmp_path / "prepared", tiny_model_dir, pairs_a=pairs)
    one, _ = train(config, run, tmp_path / "b4", "train.shuffle=false")
    accumulated, _ = train(config, run, tmp_path / "b2x2", "train.shuffle=false", "train.per_device_batch_size=2",
                           "train.gradient_accumulation=2")
    assert [r["pairs"] for r in one] == [4, 4, 4, pairs - 12]
    assert_same_records(one, accumulated)
    assert max_diff(weights(tmp_path / "b4" / "checkpoints" / "step-1"),
                    weights(tmp_path / "b2x2" / "checkpoints" / "step-1")) <= 1e-5


def test_gradient_accumulation_with_nll_weight_equals_the_same_global_batch(prepared, tmp_path):
    config, run = prepared
    one, _ = train(config, run, tmp_path / "b4", "train.shuffle=false", "dpo.nll_weight=0.5")
    accumulated, _ = train(config, run, tmp_path / "b2x2", "train.shuffle=false", "dpo.nll_weight=0.5",
                           "train.per_device_batch_size=2", "train.gradient_accumulation=2")
    assert_same_records(one, accumulated)
    assert max_diff(weights(tmp_path / "b4" / "checkpoints" / "step-1"),
                    weights(tmp_path / "b2x2" / "checkpoints" / "step-1")) <= 1e-5


# ---------------------------------------------------------------------------------------------------------------
# The ln 2 check at update 0: ok (tests/test_pipeline.py), FAILED, skipped


def shift_reference(reflogp: Path, column: str, by: float) -> None:
    """Rewrite reflogp/step-t's arrow data with `column` shifted; meta.json keeps its fingerprint, and its record of
    the files (sdpo_cli/integrity.py) is brought up to date, as if reflogp had written these numbers."""
    from sdpo_cli import integrity

    ref = datasets.load_from_disk(str(reflogp))
    shifted = ref.map(lambda row: {column: row[column] + by})
    staging = reflogp.with_name(reflogp.name + "-rewritten")
    shifted.save_to_disk(str(staging))
    del ref, shifted
    for f in staging.iterdir():
        assert f.name != "meta.json"
        os.replace(f, reflogp / f.name)  # a new file under the old name: any mapped copy of the old one stays valid
    staging.rmdir()
    meta = json.loads((reflogp / "meta.json").read_text())
    meta["files"] = integrity.manifest(reflogp)
    (reflogp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def test_ln2_check_fails_loudly_on_wrong_reference_logps(prepared, tmp_path):
    config, run = prepared
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    fingerprint = json.loads((copy / "reflogp" / "step-1" / "meta.json").read_text())["fingerprint"]
    shift_reference(copy / "reflogp" / "step-1", "ref_chosen_logp", 1.0)
    assert json.loads((copy / "reflogp" / "step-1" / "meta.json").read_text())["fingerprint"] == fingerprint
    result = sdpo("train", "--step", "1", str(config), f"run_dir={copy}")  # a warning, not an error
    first = read_log(copy / "logs" / "train-step-1.jsonl")[0]
    # every pair: δ = (π_c − (ref_c + 1)) − (π_r − ref_r) = −1 at update 0, so the loss is −log σ(−β) = softplus(β)
    expected = softplus(BETA)
    assert first["check"] == "FAILED"
    assert first["loss/dpo"] == pytest.approx(expected, abs=1e-5) and first["loss"] == first["loss/dpo"]
    assert first["rewards/margins"] == pytest.approx(-BETA, abs=1e-5)
    assert first["rewards/chosen"] == pytest.approx(-BETA, abs=1e-5)
    assert first["gamma/policy"] - first["gamma/ref"] == pytest.approx(-1.0, abs=1e-4)
    warning = f"WARNING: step 1 update 0 loss {expected:.6f} != {math.log(2):.6f}"
    assert warning in result.stderr, result.stderr
    assert "ln 2 check ok" not in result.stderr
    assert json.loads((copy / "checkpoints" / "step-1" / "meta.json").read_text())["first"]["check"] == "FAILED"
    assert first["check/max_logp_diff"] == pytest.approx(1.0, abs=1e-4)  # every chosen reply is 1 off


def test_update_0_check_sees_a_pair_whose_margin_hides_it(prepared, tmp_path):
    """Both replies of every pair 0.5 off in the reference log-probs: every margin, and so the loss, is still exactly
    as at target == reference (ln 2), but the per-reply |log π − log π_ref| (0.5) is far above float noise: FAILED."""
    config, run = prepared
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    shift_reference(copy / "reflogp" / "step-1", "ref_chosen_logp", 0.5)
    shift_reference(copy / "reflogp" / "step-1", "ref_rejected_logp", 0.5)
    result = sdpo("train", "--step", "1", str(config), f"run_dir={copy}", "train.max_updates=1")
    first = read_log(copy / "logs" / "train-step-1.jsonl")[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5) and first["check/expected_loss"] == math.log(2)
    assert first["check/max_logp_diff"] == pytest.approx(0.5, abs=1e-4)
    assert first["check"] == "FAILED"
    assert "max |log π − log π_ref| per reply 5.00e-01" in result.stderr and "WARNING" in result.stderr


def test_ln2_check_is_skipped_when_target_init_is_not_the_reference(prepared, after_step1, tmp_path):
    """Step 2 with dpo.reference=base (target M_1, reference S) and with dpo.target_init=base (target S, reference
    M_1): no ln 2 check, and the update-0 loss is the sigmoid of the M_1-vs-S margin, from the two reflogp tables."""
    config, _ = prepared
    runs = {}
    for name, override in (("reference-base", "dpo.reference=base"), ("target-init-base", "dpo.target_init=base")):
        copy = tmp_path / name
        shutil.copytree(after_step1, copy)
        sdpo("reflogp", "--step", "2", str(config), f"run_dir={copy}", override)
        log, result = train(config, copy, tmp_path / f"{name}-trained", "train.shuffle=false", override, step=2)
        first = log[0]
        assert first["check"] == "skipped"
        assert f"train step 2: update 0 loss {first['loss']:.6f} (target init != reference: no ln 2 check)" \
            in result.stderr
        assert "ln 2 check ok" not in result.stderr and "WARNING" not in result.stderr
        runs[name] = first, datasets.load_from_disk(str(copy / "reflogp" / "step-2"))
    (ref_base, gamma_s), (init_base, gamma_m1) = runs["reference-base"], runs["target-init-base"]
    # the first batch is rows 0..3 (file order); δ_i = γ_{M_1} − γ_S on each
    delta = [gamma_m1["gamma_ref"][i] - gamma_s["gamma_ref"][i] for i in range(4)]
    assert max(abs(d) for d in delta) > 0.1  # M_1 differs from S: the check has something to see
    # target M_1, reference S: the loss of a margin +δ; target S, reference M_1: of −δ
    assert ref_base["loss"] == pytest.approx(sum(softplus(-BETA * d) for d in delta) / 4, abs=1e-4)
    assert init_base["loss"] == pytest.approx(sum(softplus(BETA * d) for d in delta) / 4, abs=1e-4)
    assert ref_base["rewards/margins"] == pytest.approx(BETA * sum(delta) / 4, abs=1e-4)
    assert init_base["rewards/margins"] == pytest.approx(-BETA * sum(delta) / 4, abs=1e-4)
    # and each one's policy at update 0 is the other one's reference
    assert ref_base["gamma/policy"] == pytest.approx(init_base["gamma/ref"], abs=1e-4)
    assert init_base["gamma/policy"] == pytest.approx(ref_base["gamma/ref"], abs=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# dpo.nll_weight


def test_nll_weight_adds_the_chosen_nll_per_token(prepared, tmp_path, tiny_model_dir):
    config, run = prepared
    nll, _ = train(config, run, tmp_path / "nll", "train.shuffle=false", "dpo.nll_weight=0.5")
    plain, _ = train(config, run, tmp_path / "plain", "train.shuffle=false")
    data = datasets.load_from_disk(str(run / "data" / "step-1"))
    first = nll[0]
    assert first["check"] == "ok" and first["loss/dpo"] == pytest.approx(math.log(2), abs=1e-5)  # the check reads DPO
    tokens = sum(len(data["chosen_ids"][i]) for i in range(4))  # the first update's pairs: rows 0..3
    from_log = -first["logps/chosen"] * first["pairs"] / tokens  # NLL per chosen token, from the logged mean
    assert first["loss"] == pytest.approx(first["loss/dpo"] + 0.5 * from_log, abs=1e-5)
    model = load_model(tiny_model_dir)  # M_0 = the target at update 0
    by_hand = -sum(plain_logps(model, data["prompt_ids"][i], data["chosen_ids"][i]) for i in range(4)) / tokens
    assert from_log == pytest.approx(by_hand, abs=1e-4) and by_hand > 1.0
    # without the term: loss == loss/dpo, and the NLL changes the gradient and so the training
    assert all(r["loss"] == r["loss/dpo"] for r in plain)
    assert plain[0]["logps/chosen"] == pytest.approx(first["logps/chosen"], abs=1e-5)
    assert abs(plain[0]["grad_norm"] - first["grad_norm"]) > 0.1
    assert abs(plain[1]["loss/dpo"] - nll[1]["loss/dpo"]) > 1e-4
    assert nll[-1]["logps/chosen"] - plain[-1]["logps/chosen"] > 0  # the NLL term pushes the chosen log-probs up
    assert max_diff(weights(tmp_path / "nll" / "checkpoints" / "step-1"),
                    weights(tmp_path / "plain" / "checkpoints" / "step-1")) > 1e-4


# ---------------------------------------------------------------------------------------------------------------
# train.shuffle and train.group_by_length


def test_shuffle_false_takes_the_batches_in_file_order(prepared, tmp_path, tiny_model_dir):
    config, run = prepared
    log, _ = train(config, run, tmp_path / "run", "train.shuffle=false")
    ref = datasets.load_from_disk(str(run / "reflogp" / "step-1"))
    data = datasets.load_from_disk(str(run / "data" / "step-1"))
    assert [r["update"] for r in log] == [0, 1, 2, 3] and [r["pairs"] for r in log] == [4, 4, 4, 4]
    for k, record in enumerate(log):  # update k trains on rows 4k..4k+3: γ_ref is a function of the pairs only
        assert record["gamma/ref"] == pytest.approx(sum(ref["gamma_ref"][4 * k:4 * k + 4]) / 4, abs=1e-5)
    first = log[0]
    assert first["logps/chosen"] == pytest.approx(sum(ref["ref_chosen_logp"][:4]) / 4, abs=1e-4)
    assert first["logps/rejected"] == pytest.approx(sum(ref["ref_rejected_logp"][:4]) / 4, abs=1e-4)
    model = load_model(tiny_model_dir)  # the target at update 0, by hand on the first 4 rows of data/step-1
    gamma = [plain_logps(model, data["prompt_ids"][i], data["chosen_ids"][i])
             - plain_logps(model, data["prompt_ids"][i], data["rejected_ids"][i]) for i in range(4)]
    assert first["gamma/policy"] == pytest.approx(sum(gamma) / 4, abs=1e-4)


def row_order(log: list[dict], gamma_ref: list[float]) -> dict[int, list[int]]:
    """With one pair per update, each record's γ_ref names its row: {epoch: [row of each update]}."""
    order: dict[int, list[int]] = {}
    for record in log:
        assert record["pairs"] == 1
        i = min(range(len(gamma_ref)), key=lambda j: abs(gamma_ref[j] - record["gamma/ref"]))
        assert abs(gamma_ref[i] - record["gamma/ref"]) < 1e-4
        order.setdefault(record["epoch"], []).append(i)
    return order


def test_group_by_length_false_covers_every_pair_once_per_epoch(prepared, tmp_path):
    config, run = prepared
    gamma_ref = datasets.load_from_disk(str(run / "reflogp" / "step-1"))["gamma_ref"]
    gaps = sorted(gamma_ref)
    assert min(b - a for a, b in zip(gaps, gaps[1:])) > 1e-3  # distinct: γ_ref identifies a row
    one_pair = ["train.per_device_batch_size=1", "train.epochs=2"]
    random_log, _ = train(config, run, tmp_path / "random", "train.group_by_length=false", *one_pair)
    grouped_log, _ = train(config, run, tmp_path / "grouped", *one_pair)  # group_by_length=true, the default
    assert len(random_log) == len(grouped_log) == 32
    rows = list(range(16))
    random, grouped = row_order(random_log, gamma_ref), row_order(grouped_log, gamma_ref)
    for order in (random, grouped):
        assert sorted(order) == [0, 1] and all(sorted(order[e]) == rows for e in (0, 1))  # each pair once per epoch
        assert order[0] != order[1] and order[0] != rows  # reshuffled each epoch, not file order
    assert random[0] != grouped[0] and random[1] != grouped[1]


# ---------------------------------------------------------------------------------------------------------------
# train.report_to


def tensorboard_available() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.filterwarnings("ignore:`log_with=:UserWarning")  # accelerate's note where tensorboard is not installed
def test_report_to_tensorboard_keeps_the_json_log(prepared, tmp_path):
    """report_to is passed to accelerate, changes nothing in training (NOT_WEIGHTS) and the JSON log is written."""
    config, run = prepared
    plain, _ = train(config, run, tmp_path / "plain")
    tracked, _ = train(config, run, tmp_path / "tracked", "train.report_to=[tensorboard]")
    assert_same_records(plain, tracked, abs_tol=0)
    assert json.loads((tmp_path / "tracked" / "checkpoints" / "step-1" / "meta.json").read_text())["fingerprint"] == \
        json.loads((tmp_path / "plain" / "checkpoints" / "step-1" / "meta.json").read_text())["fingerprint"]


@pytest.mark.skipif(not tensorboard_available(),
                    reason="tensorboard is not installed in this environment (pip install tensorboard)")
def test_report_to_tensorboard_writes_the_logged_scalars(prepared, tmp_path):
    """The event files under logs/ hold every logged scalar at its update (the config reaches add_hparams flat:
    nested dicts, lists and None made it raise before update 0)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config, run = prepared
    log, _ = train(config, run, tmp_path / "run", "train.report_to=[tensorboard]")
    events = sorted((tmp_path / "run" / "logs").rglob("events.out.tfevents.*"))
    assert events, list((tmp_path / "run" / "logs").rglob("*"))
    scalars = {}
    for folder in {e.parent for e in events}:
        acc = EventAccumulator(str(folder))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars[tag] = {e.step: e.value for e in acc.Scalars(tag)}
    for key in ("loss", "loss/dpo", "rewards/margins", "logps/chosen", "lr", "grad_norm"):
        assert scalars[key] == pytest.approx({r["update"]: r[key] for r in log}, rel=1e-5, abs=1e-6), key


def flatten(values: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_report_to_passes_every_logged_scalar_to_the_tracker(prepared, tmp_path, monkeypatch):
    """A tracker registered with accelerate (as tensorboard or wandb are) gets the dpo and train config, every float
    of every JSON log record at its update, and is finished once."""
    import accelerate.tracking as tracking

    calls: dict = {"init": [], "config": [], "log": [], "finish": 0}

    class Recorder(tracking.GeneralTracker):
        name = "sdpo-test-recorder"
        requires_logging_directory = True

        def __init__(self, run_name, logging_dir, **kwargs):
            super().__init__()
            calls["init"].append((run_name, str(logging_dir)))

        @property
        def tracker(self):
            return calls

        def store_init_configuration(self, values):
            calls["config"].append(values)

        def log(self, values, step=None, **kwargs):
            calls["log"].append((dict(values), step))

        def finish(self):
            calls["finish"] += 1

    monkeypatch.setitem(tracking.LOGGER_TYPE_TO_CLASS, Recorder.name, Recorder)
    config, run = prepared
    log, _ = train(config, run, tmp_path / "run", f"train.report_to=[{Recorder.name}]")
    assert calls["init"] == [("sdpo-step-1", str(tmp_path / "run" / "logs"))]
    assert len(calls["config"]) == 1
    config_seen = flatten(calls["config"][0])  # nested or already dotted: the values are what count
    assert config_seen["dpo.beta"] == BETA and config_seen["train.learning_rate"] == 1e-3
    assert Recorder.name in str(config_seen["train.report_to"])
    assert calls["log"] == [({k: v for k, v in r.items() if isinstance(v, float)}, r["update"]) for r in log]
    assert {"loss", "loss/dpo", "rewards/margins", "lr", "grad_norm"} <= set(calls["log"][0][0])
    assert calls["finish"] == 1


# ---------------------------------------------------------------------------------------------------------------
# train.save_optimizer


def test_save_optimizer_writes_a_loadable_optimizer_state(prepared, tmp_path):
    config, run = prepared
    train(config, run, tmp_path / "saved", "train.save_optimizer=true")
    train(config, run, tmp_path / "default")
    ckpt = tmp_path / "saved" / "checkpoints" / "step-1"
    state = torch.load(ckpt / "optimizer.pt", weights_only=True)  # plain tensors and numbers: no pickle needed
    w = weights(ckpt)
    assert len(state["state"]) == len(w) == 21  # one AdamW state per parameter of the tiny Llama
    assert sorted(tuple(s["exp_avg"].shape) for s in state["state"].values()) == sorted(tuple(t.shape)
                                                                                       for t in w.values())
    assert all(float(s["step"]) == 4 for s in state["state"].values())  # the step's 4 updates
    assert all(s["exp_avg_sq"].min() >= 0 and s["exp_avg"].abs().max() > 0 for s in state["state"].values())
    groups = state["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.0, 0.0] and all(g["initial_lr"] == 1e-3 for g in groups)
    assert all(g["lr"] == pytest.approx(0.0, abs=1e-12) for g in groups)  # linear decay to 0 over the 4 updates
    assert not (tmp_path / "default" / "checkpoints" / "step-1" / "optimizer.pt").exists()
    assert not list((tmp_path / "default" / "checkpoints" / "step-1").glob("*.pt"))
    assert max_diff(w, weights(tmp_path / "default" / "checkpoints" / "step-1")) == 0  # saving changes no weight


# ---------------------------------------------------------------------------------------------------------------
# dpo.ld_alpha on reference log-probs of an older sdpo


def test_ld_alpha_needs_the_shared_columns_of_reflogp(prepared, tmp_path):
    """reflogp/step-t written before the shared columns existed: train with dpo.ld_alpha stops with an error that
    names the command adding them (reflogp --force); without ld_alpha it trains as before."""
    from sdpo_cli import integrity

    config, run = prepared
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    reflogp = copy / "reflogp" / "step-1"
    old = datasets.load_from_disk(str(reflogp)).remove_columns(["ref_chosen_logp_shared", "ref_rejected_logp_shared"])
    staging = reflogp.with_name("step-1-rewritten")
    old.save_to_disk(str(staging))
    del old
    for f in staging.iterdir():
        os.replace(f, reflogp / f.name)
    staging.rmdir()
    meta = json.loads((reflogp / "meta.json").read_text())
    meta["files"] = integrity.manifest(reflogp)
    (reflogp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    result = run_in_process("train", "--step", "1", str(config), f"run_dir={copy}", "dpo.ld_alpha=0.5")
    assert result.returncode != 0
    assert "Error:" in result.stderr and "ref_chosen_logp_shared" in result.stderr and "dpo.ld_alpha" in result.stderr
    assert "reflogp" in result.stderr and "--step 1 --force" in result.stderr
    assert not (copy / "checkpoints" / "step-1" / "meta.json").exists()
    result = sdpo("train", "--step", "1", str(config), f"run_dir={copy}", "train.max_updates=1")
    assert read_log(copy / "logs" / "train-step-1.jsonl")[0]["check"] == "ok", result.stderr


# ---------------------------------------------------------------------------------------------------------------
# memory: train.gradient_checkpointing auto, runtime.prefix_attention, runtime.head_chunk_mb (issue 16)


def test_auto_checkpointing_decides_by_budget_and_trains_the_same_weights(prepared, tmp_path):
    """`auto` compares the longest micro-batch's estimated activations with train.activation_budget_gb: the tiny
    model's activations (1.0 MiB for 236 positions) stay under the default budget (its training state, at least
    0.5 GB), so it does not checkpoint; a budget of 0.7 MB turns it on for 1 layer in 2 (transformers 5). The
    decision is logged and in meta.json, and weights and log equal the plain run's bit for bit (recomputation changes
    no number). The prefix attention's `mask` and a small LM-head chunk train the same weights too."""
    config, run = prepared
    plain, result = train(config, run, tmp_path / "auto")
    said = " ".join((result.stderr + result.stdout).split())
    assert "gradient checkpointing off (auto: ~1.0 MiB of activations for the longest micro-batch (236 positions) " \
           "<= 0.50 GB (the default's 0.5 GB floor))" in said
    auto, result_on = train(config, run, tmp_path / "budget", "train.activation_budget_gb=7e-4")
    said = " ".join((result_on.stderr + result_on.stdout).split())
    assert "gradient checkpointing on (auto: ~1.0 MiB of activations for the longest micro-batch (236 positions) " \
           "> 0.7 MiB (train.activation_budget_gb); 1 layer in 2)" in said

    def meta(name):
        return json.loads((tmp_path / name / "checkpoints" / "step-1" / "meta.json").read_text())

    assert meta("auto")["gradient_checkpointing"] is False and meta("budget")["gradient_checkpointing"] is True
    reference = weights(tmp_path / "auto" / "checkpoints" / "step-1")
    assert max_diff(reference, weights(tmp_path / "budget" / "checkpoints" / "step-1")) == 0.0
    assert_same_records(plain, auto, abs_tol=0.0)
    # auto hashes as the old default, false: a run made with `false` (before auto existed) is not stale
    again = sdpo("train", "--step", "1", str(config), f"run_dir={tmp_path / 'auto'}",
                 "train.gradient_checkpointing=false")
    assert "finished already" in again.stderr + again.stdout
    for name, overrides in (("mask", ["runtime.prefix_attention=mask"]), ("chunk", ["runtime.head_chunk_mb=0.1"])):
        records, _ = train(config, run, tmp_path / name, *overrides)
        # fp32 rounding only (other summation orders: chunked weight gradient, attention pieces), which AdamW's
        # normalised steps of lr 1e-3 carry into the weights: 2.2e-6 seen with head chunks of 3 tokens
        assert max_diff(reference, weights(tmp_path / name / "checkpoints" / "step-1")) < 1e-5, name
        assert_same_records(plain, records, abs_tol=1e-5)


def test_checkpointing_decision_by_hand(tiny_model_dir, monkeypatch):
    """memory.decide on the tiny model (hidden 32, MLP 64, 2 layers, fp32): activations are positions × layers ×
    (4 × 64 + 10 × 32) values × 4 bytes = 4,608 bytes a position; the budget here is the training state, weights +
    gradients + 2 AdamW moments = 4 × the weights' bytes (a shard of it under FSDP / ZeRO-3), which the default
    raises to 0.5 GB for so small a model."""
    from sdpo_cli import memory
    from sdpo_cli.memory import activation_bytes, decide, state_bytes

    model = load_model(tiny_model_dir)
    assert activation_bytes(model.config, 10, 4) == 10 * 2 * (4 * 64 + 10 * 32) * 4
    weights_bytes = sum(p.numel() * 4 for p in model.parameters())
    assert state_bytes(model) == 4 * weights_bytes and state_bytes(model, shards=2) == 2 * weights_bytes
    assert not decide("auto", model, positions=10**5, value_bytes=4, budget_gb=None).on  # 0.46 GB < the floor
    assert decide("auto", model, positions=2 * 10**5, value_bytes=4, budget_gb=None).on
    monkeypatch.setattr(memory, "MIN_BUDGET_GB", 0.0)  # the state alone
    break_even = 4 * weights_bytes // 4608  # positions whose activations equal the state
    assert not decide("auto", model, positions=break_even, value_bytes=4, budget_gb=None).on
    assert decide("auto", model, positions=break_even + 1, value_bytes=4, budget_gb=None).on
    assert decide("auto", model, positions=break_even // 2 + 1, value_bytes=4, budget_gb=None, shards=2).on
    assert not decide("auto", model, positions=break_even + 1, value_bytes=4, budget_gb=1.0).on
    # activations of 1.4× the budget: checkpoint every 3rd layer (a third ≥ 1 − 1/1.4), 4×: all layers
    assert decide("auto", model, positions=break_even * 7 // 5, value_bytes=4, budget_gb=None).every_n_layers == 3
    assert decide("auto", model, positions=break_even * 4, value_bytes=4, budget_gb=None).every_n_layers == 1
    assert decide(True, model, positions=1, value_bytes=4, budget_gb=None).on
    assert not decide(False, model, positions=10**9, value_bytes=4, budget_gb=None).on
