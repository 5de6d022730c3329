"""End to end through the real CLI: the exact files `sdpo run` produces, the ln 2 check, resuming by skipping
finished stages, refusing stale artifacts, gamma's reuse of reflogp, and the stage-by-stage chain."""

import json
import math

import datasets
import pytest
import torch

from sdpo_cli.collate import collate_pairs
from sdpo_cli.config import load_config
from sdpo_cli.logprobs import completion_logps
from tests.conftest import ROOT, run_cli

STEP_FILES = {"data": {"meta.json", "data-00000-of-00001.arrow", "dataset_info.json", "state.json"},
              "reflogp": {"meta.json", "data-00000-of-00001.arrow", "dataset_info.json", "state.json"}}


def files(path):
    return {p.name for p in path.iterdir()}


def read_log(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir):
    """One `sdpo run` of two steps on the tiny model, shared by the tests below."""
    import yaml

    from tests.conftest import tiny_pairs, write_jsonl

    tmp = tmp_path_factory.mktemp("e2e")
    write_jsonl(tmp / "a.jsonl", tiny_pairs(16, seed=1))
    write_jsonl(tmp / "b.jsonl", tiny_pairs(16, seed=2))
    config = tmp / "config.yaml"
    config.write_text(yaml.safe_dump({
        "run_dir": "run",  # relative to the working directory, not the config file
        "model": {"base": str(tiny_model_dir)},
        "data": {"sources": [{"name": "a", "path": "a.jsonl"}, {"name": "b", "path": "b.jsonl"}], "max_length": 64},
        "train": {"learning_rate": 1e-3, "per_device_batch_size": 4, "logging_every": 2, "warmup_ratio": 0.0},
        "inference": {"batch_size": 8},
    }))
    result = run_cli("run", str(config), cwd=tmp)
    assert result.returncode == 0, result.stderr
    return config, tmp / "run", result


@pytest.mark.slow
def test_run_produces_exactly_these_files(finished_run):
    config, run, result = finished_run
    assert result.stdout.strip() == str(run / "checkpoints" / "step-2")
    # + the marker that the folder is sdpo's and the run-directory lock (docs/reliability.md, "Lock", "Your files")
    assert files(run) == {"config.yaml", "data", "reflogp", "checkpoints", "logs", "reports", ".sdpo-run", ".sdpo-lock"}
    assert files(run / "data") == {"step-1", "step-2"}
    for stage in ("data", "reflogp"):
        for t in (1, 2):
            assert files(run / stage / f"step-{t}") == STEP_FILES[stage]
    for t in (1, 2):
        ckpt = files(run / "checkpoints" / f"step-{t}")
        assert {"meta.json", "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= ckpt
        assert not any(name.endswith((".bin", ".pt")) for name in ckpt)
    assert files(run / "logs") == {"train-step-1.jsonl", "train-step-2.jsonl"}
    assert files(run / "reports") == {"loss.png"}
    assert not list(run.rglob(".*tmp*"))  # no temporary siblings left behind


@pytest.mark.slow
def test_meta_json_records_each_stage(finished_run):
    _, run, _ = finished_run
    for t in (1, 2):
        data = json.loads((run / "data" / f"step-{t}" / "meta.json").read_text())
        assert data["stage"] == "split" and data["rows"] == 16 and data["rows_per_source"] == {"ab"[t - 1]: 16}
        ref = json.loads((run / "reflogp" / f"step-{t}" / "meta.json").read_text())
        assert ref["stage"] == "reflogp" and ref["rows"] == 16
        # sDPO: the reference of step 2 is M_1, of step 1 the base model S
        assert ref["reference"].endswith("checkpoints/step-1") if t == 2 else "tiny-llama" in ref["reference"]
        ckpt = json.loads((run / "checkpoints" / f"step-{t}" / "meta.json").read_text())
        assert ckpt["stage"] == "train" and ckpt["updates"] == 4 and ckpt["target_init"] == ref["reference"]
        for meta in (data, ref, ckpt):
            assert {"fingerprint", "seconds", "sdpo_cli", "torch", "transformers", "argv"} <= set(meta)


@pytest.mark.slow
def test_loss_is_ln2_at_update_0_of_every_step(finished_run):
    _, run, result = finished_run
    for t in (1, 2):
        log = read_log(run / "logs" / f"train-step-{t}.jsonl")
        assert [r["update"] for r in log] == [0, 1, 3]  # update 0, then every 2, and the last
        first = log[0]
        assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)
        assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-5) and first["check"] == "ok"
        # rewards/accuracies counts strict > as TRL; at update 0 the rewards are float noise (|r| < 1e-5) because
        # reflogp batches pairs differently, so it is not asserted here.
        assert abs(first["rewards/chosen"]) < 1e-5 and abs(first["rewards/rejected"]) < 1e-5
        assert set(first) >= {"loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                              "logps/chosen", "logps/rejected", "gamma/policy", "gamma/ref", "lr", "grad_norm",
                              "tokens/s"}
        assert log[-1]["loss"] < first["loss"]
    assert "ln 2 check ok" in result.stderr


@pytest.mark.slow
def test_reflogp_columns_and_gamma(finished_run):
    _, run, _ = finished_run
    ref = datasets.load_from_disk(str(run / "reflogp" / "step-2"))
    data = datasets.load_from_disk(str(run / "data" / "step-2"))
    assert {"id", "ref_chosen_logp", "ref_rejected_logp", "gamma_ref", "chosen_tokens", "rejected_tokens"} <= \
        set(ref.column_names)
    assert ref["id"] == data["id"]
    for c, r, g in zip(ref["ref_chosen_logp"], ref["ref_rejected_logp"], ref["gamma_ref"]):
        assert g == pytest.approx(c - r, abs=1e-9)


@pytest.mark.slow
def test_precomputed_reference_equals_live_forward(finished_run):
    """reflogp/step-2 (sorted inference batches) == a training-layout forward of M_1 on the same pairs."""
    from transformers import AutoModelForCausalLM

    _, run, _ = finished_run
    model = AutoModelForCausalLM.from_pretrained(str(run / "checkpoints" / "step-1"), dtype=torch.float32)
    model.train()  # training mode, as the target at update 0; dropout is 0 in the tiny model
    data = datasets.load_from_disk(str(run / "data" / "step-2"))
    ref = datasets.load_from_disk(str(run / "reflogp" / "step-2"))
    rows = [data[i] for i in range(len(data))]
    with torch.no_grad():
        for start in range(0, len(rows), 4):
            chosen, rejected = completion_logps(model, collate_pairs(rows[start:start + 4], pad_id=0))
            for k in range(chosen.shape[0]):
                assert chosen[k].item() == pytest.approx(ref["ref_chosen_logp"][start + k], abs=1e-5)
                assert rejected[k].item() == pytest.approx(ref["ref_rejected_logp"][start + k], abs=1e-5)


@pytest.mark.slow
def test_rerun_skips_finished_stages(finished_run):
    config, run, _ = finished_run
    metas = {p: p.read_text() for p in run.rglob("meta.json")}
    result = run_cli("run", str(config), cwd=config.parent)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("skipping") == 5  # split, reflogp 1, train 1, reflogp 2, train 2
    assert {p: p.read_text() for p in run.rglob("meta.json")} == metas


@pytest.mark.slow
def test_changed_config_is_refused_not_mixed(finished_run):
    config, run, _ = finished_run
    result = run_cli("run", str(config), "dpo.beta=0.2", cwd=config.parent)
    assert result.returncode == 1
    assert "checkpoints/step-1 is stale: dpo.beta 0.1 → 0.2" in result.stderr
    assert f"Hint: sdpo train {config} --step 1 dpo.beta=0.2 --force" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_gamma_json_lists_every_checkpoint_and_reuses_reflogp(finished_run):
    config, run, _ = finished_run
    result = run_cli("gamma", str(config), "--json", "--plot", str(run / "reports" / "gamma.png"), cwd=config.parent)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert [r["checkpoint"] for r in out] == ["base", "step-1", "step-2"]
    assert all(r["data"] == "step-2" and r["n"] == 16 for r in out)
    assert all(set(r) == {"checkpoint", "data", "n", "mean", "std", "median", "frac_positive", "stale"} for r in out)
    assert not any(r["stale"] for r in out)  # every checkpoint is what this config gives
    # step-1 on step-2 data is exactly reflogp step 2 (M_1 is its reference): reused, not recomputed
    ref = datasets.load_from_disk(str(run / "reflogp" / "step-2"))
    assert out[1]["mean"] == pytest.approx(sum(ref["gamma_ref"]) / 16, abs=1e-9)
    assert json.loads((run / "reports" / "gamma.json").read_text()) == out
    assert (run / "reports" / "gamma.png").stat().st_size > 10_000
    assert len(list((run / "cache" / "logps").iterdir())) == 2  # base and step-2 were computed, then cached
    again = run_cli("gamma", str(config), "--json", cwd=config.parent)
    assert json.loads(again.stdout) == out


@pytest.mark.slow
def test_checkpoint_loads_with_plain_transformers(finished_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, run, _ = finished_run
    path = run / "checkpoints" / "step-2"
    model = AutoModelForCausalLM.from_pretrained(str(path))
    tok = AutoTokenizer.from_pretrained(str(path))
    assert model.config.use_cache is True and tok.chat_template
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 2 plus 3?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 3


@pytest.mark.slow
def test_stages_chained_by_hand_equal_run(tiny_config):
    """split -> reflogp 1 -> train 1 -> reflogp 2 -> train 2 by hand gives the same artifacts as `run` in another run
    dir: the same data and reference log-probs, every log record but its timing, the same weights and fingerprints;
    `run` loads M_{t-1} once per step (reflogp hands it to train), the commands by hand twice."""
    config, run = tiny_config()
    for args in (["split"], ["reflogp", "--step", "1"], ["train", "--step", "1"], ["reflogp", "--step", "2"]):
        result = run_cli(*args, str(config))
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip().startswith(str(run))
    early = run_cli("train", str(config), "--step", "3")
    assert early.returncode == 2 and "Error: --step 3: this config has steps 1..2" in early.stderr
    result = run_cli("train", str(config), "--step", "2")
    assert result.stdout.strip() == str(run / "checkpoints" / "step-2")
    meta = json.loads((run / "checkpoints" / "step-2" / "meta.json").read_text())
    assert meta["first"]["check"] == "ok"
    cfg = load_config(config)
    assert cfg.run_dir == str(run)

    whole = run.with_name("whole")
    result = run_cli("run", str(config), f"run_dir={whole}")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(whole / "checkpoints" / "step-2")
    # `run` hands reflogp(t)'s model (M_{t-1}) to train(t) instead of loading it again; the numbers stay the same
    said = " ".join(result.stderr.split())
    for t in (1, 2):
        assert f"train step {t}: starting from the reference reflogp scored with (loaded once)" in said
    for t in (1, 2):
        for stage in ("data", "reflogp", "checkpoints"):
            by_hand, in_run = (json.loads((r / stage / f"step-{t}" / "meta.json").read_text()) for r in (run, whole))
            assert by_hand["fingerprint"] == in_run["fingerprint"], (stage, t)
        assert same_table(run / "data" / f"step-{t}", whole / "data" / f"step-{t}", tol=0)
        assert same_table(run / "reflogp" / f"step-{t}", whole / "reflogp" / f"step-{t}", tol=1e-6)
        by_hand, in_run = (read_log(r / "logs" / f"train-step-{t}.jsonl") for r in (run, whole))
        assert [r["update"] for r in by_hand] == [r["update"] for r in in_run] == [0, 1, 3]
        for a, b in zip(by_hand, in_run):
            assert a.keys() == b.keys()
            for key in set(a) - {"tokens/s"}:  # the only field that depends on the clock
                assert a[key] == (pytest.approx(b[key], abs=1e-6) if isinstance(b[key], float) else b[key]), key
        assert max_weight_diff(run / "checkpoints" / f"step-{t}", whole / "checkpoints" / f"step-{t}") <= 1e-6


def same_table(a, b, tol: float) -> bool:
    """Two saved datasets: the same columns and rows, floats equal to `tol`."""
    x, y = datasets.load_from_disk(str(a)).to_dict(), datasets.load_from_disk(str(b)).to_dict()
    assert x.keys() == y.keys() and len(x["id"]) == len(y["id"]) > 0
    for column in x:
        if x[column] and isinstance(x[column][0], float):
            assert x[column] == pytest.approx(y[column], abs=tol), column
        else:
            assert x[column] == y[column], column
    return True


def max_weight_diff(a, b) -> float:
    from safetensors.torch import load_file

    x, y = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert x.keys() == y.keys()
    return max((x[k].float() - y[k].float()).abs().max().item() for k in x)


@pytest.mark.slow
def test_packed_layout_and_compiled_blocks_through_the_cli(tiny_config):
    """The GPU-oriented switches end to end: reflogp and train both in the packed layout, the target's blocks
    compiled; update 0 of each step still sees target == reference (ln 2), so the two paths agree."""
    config, run = tiny_config()
    result = run_cli("run", str(config), "train.layout=packed", "train.compile=true")
    assert result.returncode == 0, result.stderr
    assert "torch.compile of 2 transformer blocks" in result.stderr
    for t in (1, 2):
        first = read_log(run / "logs" / f"train-step-{t}.jsonl")[0]
        assert first["check"] == "ok" and first["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert json.loads((run / "reflogp" / "step-1" / "meta.json").read_text())["layout"] == "packed"


def test_train_before_reflogp_says_what_to_run(tiny_config):
    from tests.test_errors import run_in_process

    config, run = tiny_config()
    assert run_in_process("split", str(config)).returncode == 0
    result = run_in_process("train", str(config), "--step", "1")
    assert result.returncode == 1
    assert "reference log-probs not found" in result.stderr
    assert f"Hint: sdpo reflogp {config} --step 1" in result.stderr  # the user's own arguments


@pytest.mark.slow
def test_fixtures_config_acceptance(tmp_path, shared_fixtures):
    """The issue's acceptance run: configs/fixtures.yaml on the real stories260K and real orca/UltraFeedback rows."""
    result = run_cli("run", str(ROOT / "configs" / "fixtures.yaml"), f"run_dir={tmp_path / 'run'}")
    assert result.returncode == 0, result.stderr
    run = tmp_path / "run"
    for stage in ("data", "reflogp", "checkpoints"):
        for t in (1, 2):
            assert (run / stage / f"step-{t}" / "meta.json").is_file()
    for t in (1, 2):
        first = read_log(run / "logs" / f"train-step-{t}.jsonl")[0]
        assert first["update"] == 0 and first["loss"] == pytest.approx(math.log(2), abs=1e-4)
    gamma = run_cli("gamma", str(ROOT / "configs" / "fixtures.yaml"), f"run_dir={run}", "--json")
    assert gamma.returncode == 0, gamma.stderr
    out = json.loads(gamma.stdout)
    assert [r["checkpoint"] for r in out] == ["base", "step-1", "step-2"]
    assert all(r["data"] == "step-2" and r["n"] == 299 for r in out)


def test_a_kept_model_goes_only_to_the_stage_that_loads_the_same_source_once():
    """RunContext.keep_model / take_model: only with hand_over (set by `run`), only for the same source, and a take of
    anything empties it, so a model no stage takes does not stay in memory beside the next one."""
    from sdpo_cli.context import RunContext

    model = object()
    ctx = RunContext()
    ctx.keep_model("runs/x/checkpoints/step-1", model)
    assert ctx.take_model("runs/x/checkpoints/step-1") is None  # not in `run`: nothing kept
    ctx.hand_over = True
    ctx.keep_model("runs/x/checkpoints/step-1", model)
    assert ctx.take_model("base") is None and ctx.kept is None  # another source: dropped
    ctx.keep_model("runs/x/checkpoints/step-1", model)
    assert ctx.take_model("runs/x/checkpoints/step-1") is model
    assert ctx.take_model("runs/x/checkpoints/step-1") is None
