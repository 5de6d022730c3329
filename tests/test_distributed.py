"""Several processes through `accelerate launch` on this CPU machine (gloo): the same results as one process, every
pair scored exactly once, also with LoRA; a run SIGKILLed with its launcher resumes to an uninterrupted run's weights;
and an error instead of silently training alone in a world of 1."""

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pytest
import torch

from tests.conftest import ROOT, run_cli

ACCELERATE = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(ACCELERATE is None, reason="accelerate CLI not found")]


def launch_command(args: tuple[str, ...], cpu: bool = True, engine: str = "ddp") -> tuple[list[str], dict]:
    """(`accelerate launch` of `python -m sdpo_cli ARGS` in 2 processes, its environment)."""
    env = {k: v for k, v in os.environ.items() if k not in ("SDPO_DEBUG", "ACCELERATE_USE_CPU")}
    env.update({"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "OMP_NUM_THREADS": "1"})
    if cpu:
        env["ACCELERATE_USE_CPU"] = "1"
    if engine == "zero3":  # DeepSpeed's CPU accelerator (gloo) even where a GPU is visible
        env["DS_ACCELERATOR"] = "cpu"
    # ddp: torchrun; fsdp, zero3: the shipped configs/accelerate/<engine>.yaml (their mixed precision overridden
    # below); a path: that accelerate config
    config = engine if engine.endswith(".yaml") else str(ROOT / "configs" / "accelerate" / f"{engine}.yaml")
    how = ["--multi_gpu"] if engine == "ddp" else ["--config_file", config]
    # a port of its own: `make test` runs two launches at once (pytest-xdist), and torchrun's default is one port
    cmd = [ACCELERATE, "launch", *how, "--num_processes", "2", "--num_machines", "1",
           "--main_process_port", str(free_port()), "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "sdpo_cli", *args]
    return cmd, env


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(*args: str, cpu: bool = True, cwd: Path = ROOT, engine: str = "ddp") -> subprocess.CompletedProcess:
    cmd, env = launch_command(args, cpu, engine)
    return subprocess.run(cmd, capture_output=True, text=True, cwd=str(cwd), env=env, timeout=900)


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("lora,engines,tied", [(False, ("ddp", "fsdp"), False), (True, ("fsdp",), False),
                                                (False, ("fsdp",), True)], ids=["full", "lora", "tied"])
def test_two_processes_equal_one_process_with_twice_the_batch(tiny_config, tmp_path, request, lora, engines, tied):
    """DDP, and FSDP2 through the shipped configs/accelerate/fsdp.yaml, also with LoRA (the adapter gathered from the
    shards and merged into a reloaded M_{t-1}) and with tied embeddings (FSDP2's prepare must keep lm_head and
    embed_tokens one tensor; ZeRO-3: tests/test_sharded_scoring.py). 16 pairs, 3 held out (split.eval_fraction):
    13 in global batches of 6, so the last batch of each epoch holds 1 pair, on one rank, and weight-0 copies on the
    other, and must still train exactly as one process's batch of 1. Inference batch 3: 5 batches of D_t, shared
    unevenly between the 2 ranks; the held-out pairs' eval/* records (update 0, every 2 updates, the end) equal one
    process's too. The full case reports to TensorBoard as well (report_to changes no weights): accelerate's
    end_training used to destroy the process group before the checkpoint was gathered."""
    base = {"model.base": str(request.getfixturevalue("tied_model_dir"))} if tied else {}
    config, _ = tiny_config(**{"inference.batch_size": 3, "peft.enabled": lora, "split.eval_fraction": 0.2,
                               "train.eval_every": 2, **base})
    single = tmp_path / "single"
    one = run_cli("run", str(config), f"run_dir={single}", "train.per_device_batch_size=6")
    assert one.returncode == 0, one.stderr
    for engine in engines:
        multi = tmp_path / engine
        tracked = () if lora or tied else ("train.report_to=[tensorboard]",)
        two = launch("run", str(config), f"run_dir={multi}", "train.per_device_batch_size=3", *tracked,
                     engine=engine)
        assert two.returncode == 0, two.stderr + two.stdout
        assert "3×1×2 = 6 pairs" in two.stderr  # effective batch from the world size, printed at start
        _assert_same_run(single, multi, lora)
        if tracked:  # both steps' events, written by the main process alone (events.out.tfevents.TIME.HOST.PID.N)
            events = list((multi / "logs").rglob("events.out.tfevents.*"))
            assert {e.relative_to(multi / "logs").parts[0] for e in events} == {"sdpo-step-1", "sdpo-step-2"}
            assert len({e.name.split(".")[-2] for e in events}) == 1
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


@pytest.mark.parametrize("code", [0, 2])
def test_a_command_that_succeeds_leaves_its_process_group(monkeypatch, tmp_path, code):
    """cli.main destroys the process group once a command has succeeded, before the interpreter's exit, where gloo's
    threads crashed a finished rank with SIGABRT; after a failure it is left to the exit (a peer may still wait in a
    collective). A world of one over a file store stands in for the launch."""
    import torch.distributed as dist

    from sdpo_cli import cli

    def command(standalone_mode):
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
        dist.barrier()
        sys.exit(code)

    monkeypatch.setattr(cli, "app", command)
    with pytest.raises(SystemExit) as ended:
        cli.main()
    try:
        assert ended.value.code == code and dist.is_initialized() == bool(code)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# Killing a launched run: `accelerate launch` (torchrun's elastic agent) starts each worker in a session of its own
# (torch's SubprocessHandler: start_new_session=True), so neither SIGKILL of the launcher nor of its process group
# reaches the workers: they run on as orphans, rank 0 keeps the run directory's lock, and they finish the step.
# A crash of the whole job (a node lost, `kill -9` of every process) is every process SIGKILLed, which is what the
# resume test does, each process by its pid.

TIMING = {"tokens/s"}  # the only field of a train record that depends on the clock


def popen_launch(*args: str, engine: str = "ddp", stderr=subprocess.DEVNULL) -> subprocess.Popen:
    """`launch` in the background, the launcher leading a process group of its own (its workers are not in it)."""
    cmd, env = launch_command(args, engine=engine)
    return subprocess.Popen(cmd, cwd=str(ROOT), env=env, stdout=subprocess.DEVNULL, stderr=stderr,
                            start_new_session=True)


def descendants(pid: int) -> list[int]:
    """The live processes below `pid` (Linux /proc), children first."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(0), []):
            found.append(child)
            todo.append(child)
    return found


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def alive(pid: int) -> bool:
    """Some thread of `pid` has not exited yet (a SIGKILLed leader is a zombie while its other threads, gloo's,
    still exit: until the last one has, the process's files, and so its flock, stay open)."""
    for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
        try:
            if stat.read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X"):
                return True
        except (OSError, IndexError):
            continue
    return False


def wait_until(condition, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the launcher ended (code {proc.returncode}) before {what}")
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def checkpoint_tensors(run: Path, t: int, name: str = "model.safetensors") -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "checkpoints" / f"step-{t}" / name))


@pytest.fixture
def resume_config(tiny_config, tmp_path):
    """Two steps of 32 pairs, 2 processes × 1 pair: 16 updates a step, a resumable state every 2, every update
    logged."""
    from tests.conftest import tiny_pairs, write_jsonl

    config, run = tiny_config(**{"train.per_device_batch_size": 1, "train.save_every": 2, "train.logging_every": 1})
    write_jsonl(tmp_path / "a.jsonl", tiny_pairs(32, seed=1))
    write_jsonl(tmp_path / "b.jsonl", tiny_pairs(32, seed=2))
    return config, run


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="finds the launcher's workers through /proc")
@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_sigkill_of_a_two_process_run_resumes_to_the_same_weights(resume_config, tmp_path, engine):
    """The launcher and both workers SIGKILLed in step 1's training, after a resumable state was saved; the same
    command then resumes and ends with the weights (bit for bit) and the train log (all but tokens/s) of an
    uninterrupted 2-process run. Nobody keeps the lock after the kill."""
    from sdpo_cli.lock import holder

    config, run = resume_config
    reference = tmp_path / "reference"
    straight = launch("run", str(config), f"run_dir={reference}", engine=engine)
    assert straight.returncode == 0, straight.stderr + straight.stdout

    errors = tmp_path / "killed.err"
    with errors.open("w") as err:
        proc = popen_launch("run", str(config), f"run_dir={run}", engine=engine, stderr=err)
    ranks: list[int] = []
    try:
        def workers() -> list[int]:
            return [p for p in descendants(proc.pid) if b"sdpo_cli" in cmdline(p)]

        wait_until(lambda: len(workers()) == 2, 120, "both workers started", proc)
        ranks = workers()
        state = run / "checkpoints" / ".step-1.state" / "progress.json"
        log1 = run / "logs" / "train-step-1.jsonl"
        wait_until(lambda: state.is_file() and log1.is_file() and len(log1.read_text().splitlines()) >= 4, 300,
                   "a resumable state in step 1", proc)
        assert holder(run)["pid"] in ranks  # rank 0 holds the lock, not the launcher
        # the launcher's process group first: it does not hold the workers, which live on, rank 0 keeping the lock
        # (left alone they would finish the run); then the workers, at once (a worker dying while the launcher
        # lives would make it SIGTERM the other: a clean stop, not a crash)
        os.killpg(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
        assert all(alive(pid) for pid in ranks) and holder(run)["pid"] in ranks
        for pid in ranks:
            os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not any(alive(p) for p in ranks), 60, "the workers to die")
    finally:
        for pid in {proc.pid, *ranks, *descendants(proc.pid)}:  # a failed assertion above leaves nothing running
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
    # the kernel releases rank 0's flock as its last thread exits: nothing to clean up by hand
    wait_until(lambda: holder(run) is None, 30, "the lock to be released")
    assert not (run / "checkpoints" / "step-1").exists(), "the kill came after step 1 had finished"
    killed_at = json.loads(state.read_text())["update"]

    again = launch("run", str(config), f"run_dir={run}", engine=engine)
    assert again.returncode == 0, again.stderr + again.stdout
    assert f"train step 1: resuming after update {killed_at - 1}" in again.stderr
    assert "reflogp step 1: finished already" in again.stderr
    for t in (1, 2):
        resumed = read_log(run / "logs" / f"train-step-{t}.jsonl")
        expected = read_log(reference / "logs" / f"train-step-{t}.jsonl")
        assert [r["update"] for r in resumed] == [r["update"] for r in expected] == list(range(16))
        for a, b in zip(resumed, expected):
            assert {k: v for k, v in a.items() if k not in TIMING} == {k: v for k, v in b.items() if k not in TIMING}
        got, want = checkpoint_tensors(run, t), checkpoint_tensors(reference, t)
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want), f"step {t}: weights differ"
    assert not (run / "checkpoints" / ".step-1.state").exists()


@pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="peft is not installed")
def test_lora_under_ddp_equals_one_process_with_the_same_global_batch(tiny_config, tmp_path):
    """LoRA (r=4 as in tests/test_lora.py) in 2 DDP processes × 3 pairs against 1 process × 6 pairs, one sDPO step
    of 16 pairs (updates of 6, 6 and 4 pairs: the last one uneven): the same log records (all but tokens/s, 1e-5),
    the same adapter and the same merged M_1 (1e-5). Under DDP each process holds the whole model, so M_1 is
    merged in place on rank 0 (peft's merge_and_unload), not reloaded as under FSDP."""
    config, _ = tiny_config(**{"peft.enabled": True, "peft.r": 4, "peft.alpha": 8, "train.logging_every": 1,
                               "data.sources": [{"name": "a", "path": str(tmp_path / "a.jsonl")}]})
    single, multi = tmp_path / "single", tmp_path / "ddp"
    one = run_cli("run", str(config), f"run_dir={single}", "train.per_device_batch_size=6")
    assert one.returncode == 0, one.stderr
    two = launch("run", str(config), f"run_dir={multi}", "train.per_device_batch_size=3")
    assert two.returncode == 0, two.stderr + two.stdout
    assert "3×1×2 = 6 pairs" in two.stderr and "LoRA r=4 alpha=8" in two.stderr
    assert json.loads((multi / "checkpoints" / "step-1" / "meta.json").read_text())["world_size"] == 2

    la, lb = read_log(single / "logs" / "train-step-1.jsonl"), read_log(multi / "logs" / "train-step-1.jsonl")
    assert [r["update"] for r in la] == [r["update"] for r in lb] == [0, 1, 2]
    assert [r["pairs"] for r in lb] == [6, 6, 4]
    for ra, rb in zip(la, lb):
        assert set(ra) == set(rb)
        for key in set(ra) - TIMING:
            if isinstance(ra[key], float):
                assert rb[key] == pytest.approx(ra[key], abs=1e-5), key
            else:
                assert rb[key] == ra[key], key
    for name in ("model.safetensors", "adapter/adapter_model.safetensors"):
        wa, wb = checkpoint_tensors(single, 1, name), checkpoint_tensors(multi, 1, name)
        assert wa.keys() == wb.keys()
        assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5, name
    adapter = checkpoint_tensors(multi, 1, "adapter/adapter_model.safetensors")
    assert max(v.abs().max().item() for k, v in adapter.items() if "lora_B" in k) > 0  # the adapter trained
