"""Several processes through `accelerate launch` on this CPU machine (gloo): the same results as one process, every
pair scored exactly once, and an error instead of silently training alone in a world of 1."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import pytest

from tests.conftest import ROOT, run_cli

ACCELERATE = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(ACCELERATE is None, reason="accelerate CLI not found")]


def launch(*args: str, cpu: bool = True, cwd: Path = ROOT, engine: str = "ddp") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("SDPO_DEBUG", "ACCELERATE_USE_CPU")}
    env.update({"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "OMP_NUM_THREADS": "1"})
    if cpu:
        env["ACCELERATE_USE_CPU"] = "1"
    how = ["--multi_gpu"] if engine == "ddp" else ["--config_file", str(ROOT / "configs" / "accelerate" / "fsdp.yaml")]
    cmd = [ACCELERATE, "launch", *how, "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "sdpo_cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=str(cwd), env=env, timeout=900)


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("lora,engines", [(False, ("ddp", "fsdp")), (True, ("fsdp",))], ids=["full", "lora"])
def test_two_processes_equal_one_process_with_twice_the_batch(tiny_config, tmp_path, lora, engines):
    """DDP, and FSDP2 through the shipped configs/accelerate/fsdp.yaml, also with LoRA (the adapter gathered from the
    shards and merged into a reloaded M_{t-1}). 16 pairs, 3 held out (split.eval_fraction): 13 in global batches of 6,
    so the last batch of each epoch holds 1 pair, on one rank, and weight-0 copies on the other, and must still train
    exactly as one process's batch of 1. Inference batch 3: 5 batches of D_t, shared unevenly between the 2 ranks;
    the held-out pairs' eval/* records (update 0, every 2 updates, the end) equal one process's too."""
    config, _ = tiny_config(**{"inference.batch_size": 3, "peft.enabled": lora, "split.eval_fraction": 0.2,
                               "train.eval_every": 2})
    single = tmp_path / "single"
    one = run_cli("run", str(config), f"run_dir={single}", "train.per_device_batch_size=6")
    assert one.returncode == 0, one.stderr
    for engine in engines:
        multi = tmp_path / engine
        two = launch("run", str(config), f"run_dir={multi}", "train.per_device_batch_size=3", engine=engine)
        assert two.returncode == 0, two.stderr + two.stdout
        assert "3×1×2 = 6 pairs" in two.stderr  # effective batch from the world size, printed at start
        _assert_same_run(single, multi, lora)
    gamma = launch("gamma", str(config), f"run_dir={multi}", "--json")
    assert gamma.returncode == 0, gamma.stderr
    assert [r["checkpoint"] for r in json.loads(gamma.stdout)] == ["base", "step-1", "step-2"]


def _assert_same_run(single: Path, multi: Path, lora: bool) -> None:
    from safetensors.torch import load_file

    for t in (1, 2):
        meta = json.loads((multi / "checkpoints" / f"step-{t}" / "meta.json").read_text())
        assert meta["world_size"] == 2
        a = datasets.load_from_disk(str(single / "reflogp" / f"step-{t}"))
        b = datasets.load_from_disk(str(multi / "reflogp" / f"step-{t}"))
        assert a["id"] == b["id"] and len(b) == 13  # every row once, in order
        for key in ("ref_chosen_logp", "ref_rejected_logp"):
            assert b[key] == pytest.approx(a[key], abs=1e-5)
        la = read_log(single / "logs" / f"train-step-{t}.jsonl")
        lb = read_log(multi / "logs" / f"train-step-{t}.jsonl")
        assert [r["update"] for r in la] == [r["update"] for r in lb]
        assert sum("eval/loss" in r for r in lb) >= 3
        for ra, rb in zip(la, lb):
            assert set(ra) == set(rb)
            for key in ("loss", "eval/loss", "eval/rewards/margins", "eval/gamma/policy"):
                assert rb.get(key) == pytest.approx(ra.get(key), abs=1e-5)
            assert (rb.get("pairs"), rb.get("eval/pairs")) == (ra.get("pairs"), ra.get("eval/pairs"))
    files = ["model.safetensors"] + (["adapter/adapter_model.safetensors"] if lora else [])
    for name in files:
        wa = load_file(str(single / "checkpoints" / "step-2" / name))
        wb = load_file(str(multi / "checkpoints" / "step-2" / name))
        assert wa.keys() == wb.keys()
        assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-4
    if lora:  # the adapter trained
        adapter = load_file(str(multi / "checkpoints" / "step-2" / "adapter" / "adapter_model.safetensors"))
        assert max(v.abs().max().item() for k, v in adapter.items() if "lora_B" in k) > 0


def test_a_world_of_one_under_a_multi_process_launch_is_an_error(tiny_config):
    """CPU machine, no ACCELERATE_USE_CPU: torchrun starts 2 processes that would each train alone."""
    config, run = tiny_config()
    result = launch("run", str(config), cpu=False)
    assert result.returncode != 0
    assert "sees a world of 1" in result.stderr and "ACCELERATE_USE_CPU=1" in result.stderr
    assert not (run / "checkpoints").exists()
