"""The reference pass sharded like training (issue 15): under an FSDP2 or a DeepSpeed ZeRO-3 launch `reflogp` and
`gamma` wrap the scoring model in PairLogps and `accelerator.prepare` it, so each process holds half the weights of 2,
every process scores its share of the pairs (dummy forwards where a process has fewer batches: the all-gathers are
collectives), and the numbers equal one process's; `train` of the same step still passes its update-0 ln 2 check; and
`inference.shard` chooses (auto: follow the launch's engine). The ZeRO-3 tests run where deepspeed is installed
(pip install 'sdpo[deepspeed]'), on this CPU machine through DeepSpeed's CPU accelerator over gloo
(distributed._deepspeed_on_cpu)."""

import json
import os
import shutil
import time
from pathlib import Path

import datasets
import pytest
import torch
from safetensors import safe_open

from tests.conftest import run_cli
from tests.test_distributed import ACCELERATE, launch


def test_inference_shard_takes_auto_true_false(tiny_config):
    from sdpo_cli.config import inference_shard, load_config

    config, _ = tiny_config()
    assert inference_shard(load_config(config)) is None  # auto, the default
    assert inference_shard(load_config(config, ["inference.shard=true"])) is True
    assert inference_shard(load_config(config, ["inference.shard=false"])) is False
    result = run_cli("reflogp", str(config), "--step", "1", "inference.shard=sometimes")
    assert result.returncode != 0 and "inference.shard" in result.stderr and "auto, true or false" in result.stderr


def test_inference_shard_true_needs_a_sharding_launch(tiny_config):
    config, run = tiny_config(**{"inference.shard": True})
    assert run_cli("split", str(config)).returncode == 0
    result = run_cli("reflogp", str(config), "--step", "1")
    assert result.returncode != 0
    assert "inference.shard=true" in result.stderr and "configs/accelerate/fsdp.yaml" in result.stderr
    assert not (run / "reflogp" / "step-1").exists()


def test_inference_shard_is_in_no_fingerprint(tiny_config):
    """Sharded or not, the same numbers (to float rounding): a reflogp made with inference.shard=false is current
    for the default (auto), and so is everything after it."""
    config, run = tiny_config()
    assert run_cli("split", str(config)).returncode == 0
    assert run_cli("reflogp", str(config), "--step", "1", "inference.shard=false").returncode == 0
    again = run_cli("reflogp", str(config), "--step", "1")
    assert again.returncode == 0 and "reflogp step 1: finished already" in again.stderr


@pytest.mark.parametrize("which", ["tiny", "stories"])
def test_a_model_built_around_handed_over_weights_is_the_loaded_model(which, request):
    """models.model_from_weights (train(t) of `sdpo run` under FSDP2): the tensors of the state dict, each tied
    weight once (as scoring.gathered_weights gives them) and upcast as FSDP2's mixed precision leaves them, give
    the model load_model reads from disk: same tensors, same dtypes, embeddings tied again where the model ties them
    (stories260K does), the same logits. A tensor too many or too few is a one-line error."""
    from sdpo_cli.config import ModelConfig
    from sdpo_cli.errors import SdpoError
    from sdpo_cli.models import load_model, model_from_weights, tied_aliases

    path = request.getfixturevalue("tiny_model_dir" if which == "tiny" else "stories_dir")
    cfg = ModelConfig(base=str(path))
    loaded = load_model(cfg, train=True)
    aliases = tied_aliases(loaded)
    # not the model's dtype: cast back on the way in
    weights = {k: v.detach().to(torch.float64) for k, v in loaded.state_dict().items() if k not in aliases}
    tied = loaded.config.tie_word_embeddings
    assert aliases == ({"lm_head.weight"} if which == "stories" else set()) and tied == (which == "stories")
    built = model_from_weights(cfg, path, weights, train=True)
    assert built.training and built.config.use_cache is False
    want, got = loaded.state_dict(), built.state_dict()
    assert want.keys() == got.keys()
    assert all(got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]) for k in want)
    if tied:
        assert built.get_output_embeddings().weight is built.get_input_embeddings().weight
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        assert torch.equal(built(ids).logits, loaded(ids).logits)
    # an earlier sdpo saved a tied model trained under FSDP2 with both copies, apart: from_pretrained keeps them
    # apart, and so must this
    head = weights["model.embed_tokens.weight"] + 1
    apart = model_from_weights(cfg, path, weights | {"lm_head.weight": head})
    assert apart.get_output_embeddings().weight is not apart.get_input_embeddings().weight
    assert torch.equal(apart.get_output_embeddings().weight, head.float())
    with pytest.raises(SdpoError, match="a tensor the model does not"):
        model_from_weights(cfg, path, weights | {"extra.weight": torch.zeros(1)})
    first = next(iter(weights))
    with pytest.raises(SdpoError, match=f"lack {first}"):
        model_from_weights(cfg, path, {k: v for k, v in weights.items() if k != first})


def split_tie(folder: Path, tied_model_dir: Path) -> Path:
    """A copy of the tied tiny model whose checkpoint holds the LM head apart from the embeddings, with other values
    (what sdpo saved under FSDP2 before it kept the tie)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(tied_model_dir, folder)
    weights = load_file(str(folder / "model.safetensors"))
    save_file(weights | {"lm_head.weight": weights["model.embed_tokens.weight"] + 0.01},
              str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def test_a_split_tie_is_found(tmp_path, tied_model_dir):
    """models.refuse_split_tie: a model whose embeddings are tied, or not tied by its config, passes; one whose
    config ties them but whose checkpoint holds two tensors is a one-line error naming the folder."""
    from sdpo_cli.config import ModelConfig
    from sdpo_cli.errors import SdpoError
    from sdpo_cli.models import load_model, refuse_split_tie, tied_aliases

    tied = load_model(ModelConfig(base=str(tied_model_dir)))
    assert tied_aliases(tied) == {"lm_head.weight"}
    refuse_split_tie(tied, tied_model_dir)
    folder = split_tie(tmp_path / "split", tied_model_dir)
    split = load_model(ModelConfig(base=str(folder)))
    assert tied_aliases(split) == set()
    with pytest.raises(SdpoError, match="split: its config.json ties the LM head"):
        refuse_split_tie(split, folder)
    split.config.tie_word_embeddings = False
    refuse_split_tie(split, folder)


@pytest.mark.slow
@pytest.mark.skipif(ACCELERATE is None, reason="accelerate CLI not found")
def test_fsdp2_refuses_a_split_tie_in_one_line_and_runs_it_without_ram_efficient_loading(tiny_config, tmp_path,
                                                                                        tied_model_dir):
    """A tied model's checkpoint with two different tensors: accelerate's RAM-efficient FSDP2 prepare would tie them
    again and fail with a KeyError; reflogp and train refuse it first, in one line with the way out, which works."""
    from tests.conftest import ROOT

    base = split_tie(tmp_path / "split", tied_model_dir)
    config, run = tiny_config(**{"model.base": str(base)})
    assert run_cli("split", str(config)).returncode == 0
    refused = launch("reflogp", str(config), "--step", "1", engine="fsdp")
    assert refused.returncode != 0 and "KeyError" not in refused.stderr
    assert f"Error: {base}: its config.json ties the LM head to the embeddings" in refused.stderr
    assert "Hint: launch with fsdp_cpu_ram_efficient_loading: false" in refused.stderr
    plain = tmp_path / "fsdp-no-ram-efficient.yaml"
    plain.write_text((ROOT / "configs" / "accelerate" / "fsdp.yaml").read_text().replace(
        "fsdp_cpu_ram_efficient_loading: true", "fsdp_cpu_ram_efficient_loading: false"))
    scored = launch("reflogp", str(config), "--step", "1", engine=str(plain))
    assert scored.returncode == 0, scored.stderr + scored.stdout
    refused = launch("train", str(config), "--step", "1", engine="fsdp")
    assert refused.returncode != 0 and f"Error: {base}: its config.json ties" in refused.stderr
    assert not (run / "checkpoints" / "step-1").exists()


ENGINES = ["fsdp", "zero3"]


def needs(engine: str) -> None:
    if engine == "zero3":
        pytest.importorskip("deepspeed")


def test_deepspeed_writes_nothing_to_stdout():
    """stdout carries results (`gamma --json`), but accelerate imports DeepSpeed wherever it is installed (behind
    every prepare and unwrap, under any engine) and DeepSpeed logs to the stdout of its import ("Setting accelerator to
    CPU" on a machine without a GPU). distributed.quiet_deepspeed, called before accelerate's process state is made,
    imports it first and points its logger at stderr, for the whole process. (Found with `gamma --json` under
    FSDP2.)"""
    import subprocess
    import sys

    pytest.importorskip("deepspeed")
    code = ("import torch; from sdpo_cli.distributed import quiet_deepspeed; quiet_deepspeed(); "
            "from accelerate.utils import extract_model_from_parallel; "
            "extract_model_from_parallel(torch.nn.Linear(1, 1)); "
            "from deepspeed.utils import logger; logger.warning('a note from deepspeed')")
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "" and "a note from deepspeed" in out.stderr


@pytest.mark.slow
@pytest.mark.skipif(ACCELERATE is None, reason="accelerate CLI not found")
@pytest.mark.parametrize("engine", ENGINES)
def test_sharded_reflogp_and_gamma_equal_one_process(tiny_config, tmp_path, engine):
    """13 pairs of D_1 in inference batches of 3 (5 batches: rank 1 runs a dummy forward) and 3 held-out pairs (1
    batch: rank 1 has none and runs a dummy), gamma of M_1 in one batch of 13. Rows equal one process's to 1e-5; each
    rank holds at most 0.55 of the weights; train step 1 under the same engine passes its ln 2 check on these
    log-probs."""
    needs(engine)
    config, _ = tiny_config(**{"inference.batch_size": 3, "split.eval_fraction": 0.2})
    single, multi = tmp_path / "single", tmp_path / "multi"
    for run in (single, multi):
        assert run_cli("split", str(config), f"run_dir={run}").returncode == 0
    one = run_cli("reflogp", str(config), "--step", "1", f"run_dir={single}")
    assert one.returncode == 0, one.stderr
    started = time.time()
    two = launch("reflogp", str(config), "--step", "1", f"run_dir={multi}", engine=engine)
    assert two.returncode == 0, two.stderr + two.stdout
    print(f"2-process {engine} reflogp: {time.time() - started:.1f} s")
    worst = 0.0
    for name in ("step-1", "eval-step-1"):
        a = datasets.load_from_disk(str(single / "reflogp" / name))
        b = datasets.load_from_disk(str(multi / "reflogp" / name))
        assert a["id"] == b["id"]  # every row once, in order
        for key in ("ref_chosen_logp", "ref_rejected_logp", "ref_chosen_logp_shared", "ref_rejected_logp_shared"):
            assert b[key] == pytest.approx(a[key], abs=1e-5), (name, key)
            worst = max(worst, max(abs(x - y) for x, y in zip(a[key], b[key])))
        held = json.loads((multi / "reflogp" / name / "meta.json").read_text())["engine"]
        assert held["processes"] == 2 and held["sharded"]
        ratios = [b / held["param_bytes"] for b in held["shard_param_bytes"]]
        assert len(ratios) == 2 and max(ratios) <= 0.55, ratios
        alone = json.loads((single / "reflogp" / name / "meta.json").read_text())["engine"]
        assert not alone["sharded"] and alone["shard_param_bytes"] == [alone["param_bytes"]]
        print(f"reflogp {name}: max |Δ| {worst:.2e}; shard/full bytes per rank {[f'{r:.3f}' for r in ratios]}; "
              f"peak RSS per rank {[f'{r / 2**20:.0f} MiB' for r in held['peak_rss_bytes']]} "
              f"(one process: {alone['peak_rss_bytes'][0] / 2**20:.0f} MiB)")

    trained = launch("train", str(config), "--step", "1", f"run_dir={multi}", engine=engine)
    assert trained.returncode == 0, trained.stderr + trained.stdout
    assert "ln 2 check ok" in trained.stderr
    assert json.loads((multi / "checkpoints" / "step-1" / "meta.json").read_text())["first"]["check"] == "ok"

    # M_1 on D_1 was computed by no reflogp: gamma scores it, in 2 sharded processes and then in one
    args = ("gamma", str(config), f"run_dir={multi}", "--checkpoint", "step-1", "--data", "step-1", "--json",
            "inference.batch_size=64")
    cache = multi / "cache" / "logps" / "step-1--step-1"
    two = launch(*args, engine=engine)
    assert two.returncode == 0, two.stderr + two.stdout
    sharded = datasets.load_from_disk(str(cache))["gamma"]
    engine = json.loads((cache / "meta.json").read_text())["engine"]  # gamma's cache records the shards too
    assert engine["sharded"] and max(engine["shard_param_bytes"]) <= 0.55 * engine["param_bytes"], engine
    shutil.rmtree(cache)
    one = run_cli(*args)
    assert one.returncode == 0, one.stderr
    alone = datasets.load_from_disk(str(cache))["gamma"]
    assert not json.loads((cache / "meta.json").read_text())["engine"]["sharded"]
    assert len(sharded) == len(alone) == 13
    assert sharded == pytest.approx(alone, abs=1e-5)
    assert json.loads(two.stdout)[0]["mean"] == pytest.approx(json.loads(one.stdout)[0]["mean"], abs=1e-5)
    print(f"gamma: max |Δ| {max(abs(x - y) for x, y in zip(sharded, alone)):.2e}")


@pytest.mark.slow
@pytest.mark.skipif(ACCELERATE is None, reason="accelerate CLI not found")
@pytest.mark.parametrize("engine", ENGINES)
def test_sharded_reflogp_of_one_pair_over_two_processes(tiny_config, tmp_path, engine):
    """One pair and two processes: rank 1 has no batch and must still join every all-gather (no deadlock)."""
    from tests.conftest import tiny_pairs, write_jsonl

    needs(engine)
    config, run = tiny_config(**{"data.sources": [{"name": "a", "path": str(tmp_path / "one.jsonl")}]})
    write_jsonl(tmp_path / "one.jsonl", tiny_pairs(1))
    assert run_cli("split", str(config)).returncode == 0
    two = launch("reflogp", str(config), "--step", "1", engine=engine)
    assert two.returncode == 0, two.stderr + two.stdout
    assert len(datasets.load_from_disk(str(run / "reflogp" / "step-1"))) == 1
    assert json.loads((run / "reflogp" / "step-1" / "meta.json").read_text())["engine"]["sharded"]


@pytest.mark.slow
@pytest.mark.skipif(ACCELERATE is None, reason="accelerate CLI not found")
def test_zero3_in_bf16_saves_the_fp32_master_weights(tiny_config, tmp_path):
    """Under DeepSpeed bf16 the module's weights are bf16 copies of fp32 masters. M_1 must hold the masters, in the
    base's dtype (fp32 here), as one process with bf16 autocast saves it: at lr 1e-5 every update is far below bf16's
    resolution (~1.2e-4 at the tiny model's weights of ~0.02), so the bf16 copies that accelerate gathers keep almost
    nothing of the step. DeepSpeed starts its masters from the base rounded to bf16 (ZeRO-3 loads it in bf16): the
    step's change is measured from there, and must match one process's change from the base."""
    from safetensors.torch import load_file

    from sdpo_cli.config import load_config

    pytest.importorskip("deepspeed")
    config, _ = tiny_config(**{"train.mixed_precision": "bf16", "train.learning_rate": 1e-5})
    single, multi = tmp_path / "single", tmp_path / "multi"
    one = run_cli("run", str(config), f"run_dir={single}", "train.per_device_batch_size=4")
    assert one.returncode == 0, one.stderr
    two = launch("run", str(config), f"run_dir={multi}", "train.per_device_batch_size=2", engine="zero3")
    assert two.returncode == 0, two.stderr + two.stdout
    base = load_file(str(Path(load_config(config).model.base) / "model.safetensors"))
    m1_one = load_file(str(single / "checkpoints" / "step-1" / "model.safetensors"))
    m1_ds = load_file(str(multi / "checkpoints" / "step-1" / "model.safetensors"))
    assert m1_ds.keys() == base.keys() and {t.dtype for t in m1_ds.values()} == {torch.float32}
    assert json.loads((multi / "checkpoints" / "step-1" / "meta.json").read_text())["first"]["check"] == "ok"
    agree = moved = total = 0
    for name, weight in base.items():
        if weight.dim() < 2:
            continue  # the matrices: norms start at 1.0, where bf16 is exact
        change_ds = m1_ds[name] - weight.to(torch.bfloat16).float()
        change_one = m1_one[name] - weight
        assert change_one.abs().max() < 1.2e-4  # the step's change is below bf16's resolution at these weights
        trained = change_one != 0  # not the embeddings of tokens the pairs never use
        moved += int((change_ds[trained] != 0).sum())
        agree += int((torch.sign(change_ds[trained]) == torch.sign(change_one[trained])).sum())
        total += int(trained.sum())
    # the bf16 copies that were saved before moved 28 % of them (8,944 of 32,222); the masters move nearly all, in
    # the same direction
    print(f"{total} weights trained in one process; under ZeRO-3 bf16 M_1 moved {moved}, {agree} the same way")
    assert total > 10_000 and moved > 0.95 * total and agree > 0.9 * total, (moved, agree, total)


@pytest.mark.slow
@pytest.mark.skipif(ACCELERATE is None, reason="accelerate CLI not found")
def test_zero3_run_equals_one_process(tiny_config, tmp_path, tied_model_dir):
    """`sdpo run` (curriculum split on the main process alone, then reflogp, train, reflogp, train) in one 2-process
    ZeRO-3 launch equals one process with twice the micro-batch. The DeepSpeed config is process-wide and accelerate
    fills its "auto" batch entries at the first prepare (reflogp's: inference batch 3, accumulation 1); train's engine
    (micro-batch 2, accumulation 2) must not inherit them (distributed.deepspeed_batch). The model ties its LM head to
    its embeddings: one tensor trained and saved, as in one process."""
    from safetensors.torch import load_file

    from tests.test_distributed import read_log

    pytest.importorskip("deepspeed")
    config, _ = tiny_config(**{"inference.batch_size": 3, "split.eval_fraction": 0.2, "split.strategy": "curriculum",
                               "split.fractions": [0.5, 0.5], "train.gradient_accumulation": 2,
                               "model.base": str(tied_model_dir)})
    single, multi = tmp_path / "single", tmp_path / "multi"
    one = run_cli("run", str(config), f"run_dir={single}", "train.per_device_batch_size=4")
    assert one.returncode == 0, one.stderr
    started = time.time()
    two = launch("run", str(config), f"run_dir={multi}", "train.per_device_batch_size=2", engine="zero3")
    assert two.returncode == 0, two.stderr + two.stdout
    print(f"2-process ZeRO-3 run: {time.time() - started:.1f} s")
    assert "2×2×2 = 8 pairs" in two.stderr and "mismatch" not in two.stderr
    for t in (1, 2):
        for name in (f"step-{t}", f"eval-step-{t}"):
            assert (datasets.load_from_disk(str(single / "data" / name))["id"]
                    == datasets.load_from_disk(str(multi / "data" / name))["id"])  # the same curriculum
            a = datasets.load_from_disk(str(single / "reflogp" / name))
            b = datasets.load_from_disk(str(multi / "reflogp" / name))
            for key in ("ref_chosen_logp", "ref_rejected_logp"):
                assert b[key] == pytest.approx(a[key], abs=1e-5), (name, key)
            held = json.loads((multi / "reflogp" / name / "meta.json").read_text())["engine"]
            assert held["sharded"] and max(held["shard_param_bytes"]) <= 0.55 * held["param_bytes"]
        meta = json.loads((multi / "checkpoints" / f"step-{t}" / "meta.json").read_text())
        assert meta["world_size"] == 2 and meta["first"]["check"] == "ok"
        la = read_log(single / "logs" / f"train-step-{t}.jsonl")
        lb = read_log(multi / "logs" / f"train-step-{t}.jsonl")
        assert [r["update"] for r in la] == [r["update"] for r in lb]
        for ra, rb in zip(la, lb):
            assert rb.get("loss") == pytest.approx(ra.get("loss"), abs=1e-5)
        wa = load_file(str(single / "checkpoints" / f"step-{t}" / "model.safetensors"))
        wb = load_file(str(multi / "checkpoints" / f"step-{t}" / "model.safetensors"))
        assert wa.keys() == wb.keys() and "lm_head.weight" not in wb
        assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-4


@pytest.mark.slow
@pytest.mark.skipif(ACCELERATE is None, reason="accelerate CLI not found")
@pytest.mark.parametrize("engine", ENGINES)
def test_the_fixtures_run_end_to_end_under_two_process_sharding(shared_fixtures, tmp_path, engine):
    """`sdpo run configs/fixtures.yaml` (the real stories260K model and orca / ultrafeedback rows, 2 steps) under a
    2-process FSDP2 or ZeRO-3 launch: the reference passes sharded, both steps trained and passing their update-0
    check."""
    from tests.conftest import ROOT

    needs(engine)
    run = tmp_path / "fixtures"
    started = time.time()
    result = launch("run", str(ROOT / "configs" / "fixtures.yaml"), f"run_dir={run}", engine=engine)
    assert result.returncode == 0, result.stderr + result.stdout
    print(f"fixtures run, 2-process {engine}: {time.time() - started:.0f} s")
    for t in (1, 2):
        held = json.loads((run / "reflogp" / f"step-{t}" / "meta.json").read_text())["engine"]
        assert held["sharded"] and max(held["shard_param_bytes"]) <= 0.55 * held["param_bytes"]
        meta = json.loads((run / "checkpoints" / f"step-{t}" / "meta.json").read_text())
        assert meta["world_size"] == 2 and meta["first"]["check"] == "ok"
        # stories260K ties its LM head to its embeddings: one tensor trained and saved, as in one process
        with safe_open(str(run / "checkpoints" / f"step-{t}" / "model.safetensors"), "pt") as f:
            assert "model.embed_tokens.weight" in f.keys() and "lm_head.weight" not in f.keys()


@pytest.mark.slow
@pytest.mark.skipif(ACCELERATE is None, reason="accelerate CLI not found")
def test_run_under_fsdp_hands_the_gathered_reference_to_train(tiny_config, tmp_path):
    """`sdpo run` under a 2-process FSDP2 launch: train(t) starts from the weights reflogp(t) scored with, gathered
    from their shards onto rank 0 (M_{t-1} is not read from disk again), and step 1 ends as the stages launched by
    hand end (reflogp, then train loading M_0 itself): M_1 bit for bit, the same log but tokens/s."""
    from tests.test_distributed import TIMING, checkpoint_tensors, read_log

    config, _ = tiny_config(**{"split.eval_fraction": 0.2, "train.eval_every": 2})
    whole, by_hand = tmp_path / "run", tmp_path / "by-hand"
    result = launch("run", str(config), f"run_dir={whole}", engine="fsdp")
    assert result.returncode == 0, result.stderr + result.stdout
    for t in (1, 2):
        assert (f"train step {t}: starting from the reference reflogp scored with (gathered from its shards, not "
                "read again)") in result.stderr
    assert run_cli("split", str(config), f"run_dir={by_hand}").returncode == 0
    for stage in ("reflogp", "train"):
        alone = launch(stage, str(config), "--step", "1", f"run_dir={by_hand}", engine="fsdp")
        assert alone.returncode == 0, alone.stderr + alone.stdout
        assert "not read again" not in alone.stderr
    got, want = checkpoint_tensors(whole, 1), checkpoint_tensors(by_hand, 1)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    handed, loaded = (read_log(r / "logs" / "train-step-1.jsonl") for r in (whole, by_hand))
    assert [r["update"] for r in handed] == [r["update"] for r in loaded]
    for a, b in zip(handed, loaded):
        assert {k: v for k, v in a.items() if k not in TIMING} == {k: v for k, v in b.items() if k not in TIMING}
