"""A broken base model is refused before any work, a model that sdpo cannot load gets a hint that names the real
cause, and a second SIGINT / SIGTERM during training stops the process at once (docs/reliability.md §4, §5).

The base-model cases run `sdpo run` in this process, with model loading patched to fail, as tests/test_errors.py
does: each must end as one `Error:` line naming the file, one `Hint:` line, exit code 2 and no data folder."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.conftest import FAST, ROOT, run_cli
from tests.test_errors import copy_model, run_in_process, write_config
from tests.test_resume import read_log, start

RESAVE = "download the model again, or save it again with save_pretrained"
REMOTE_CODE_HINT = "model.trust_remote_code=true (if you trust the model's code)"


# ---------------------------------------------------------------------------------------------------------------
# 9. A broken base model: checked from headers and small JSON files before the split writes anything.


def weights(folder: Path) -> Path:
    return folder / "model.safetensors"


def rewrite(file: Path, change) -> None:
    file.write_bytes(change(file.read_bytes()))


def with_header(raw: bytes, change) -> bytes:
    """A safetensors file with change(header) as its header (its length field rewritten), the tensor bytes kept."""
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    change(header)
    new = json.dumps(header).encode()
    return len(new).to_bytes(8, "little") + new + raw[8 + n:]


def double_first_dimension(header: dict) -> None:
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = [2 * header[name]["shape"][0], *header[name]["shape"][1:]]


# Each case: (model folder, a copy of the tiny model or of its sharded save, to break) -> (file the Error line names,
# text of the Error line, text of the hint).
BROKEN = {
    "zero_byte_weights": (
        lambda d: rewrite(weights(d), lambda raw: b""), "model.safetensors",
        "model.base: damaged weights file: empty (0 bytes)", RESAVE),
    "truncated_weights": (
        lambda d: rewrite(weights(d), lambda raw: raw[:-100]), "model.safetensors",
        "but the file has", RESAVE),
    "header_length_beyond_the_file": (
        lambda d: rewrite(weights(d), lambda raw: (10**9).to_bytes(8, "little") + raw[8:]), "model.safetensors",
        "its header length, 1000000000 bytes, does not fit", RESAVE),
    "header_not_json": (
        lambda d: rewrite(weights(d), lambda raw: raw[:8] + b"#" + raw[9:]), "model.safetensors",
        "its header is not valid JSON", RESAVE),
    "header_offsets_do_not_match_the_shapes": (
        lambda d: rewrite(weights(d), lambda raw: with_header(raw, double_first_dimension)), "model.safetensors",
        "bytes for shape [", RESAVE),
    "unreadable_config": (
        lambda d: (d / "config.json").write_text('{"model_type": "llama",'), "config.json",
        "model.base: config.json is not valid JSON", RESAVE),
    "empty_config": (
        lambda d: (d / "config.json").write_text(""), "config.json", "model.base: config.json is empty", RESAVE),
    "missing_config": (
        lambda d: (d / "config.json").unlink(), "", "model.base: no config.json in this folder", "save_pretrained"),
    "missing_tokenizer": (
        lambda d: [p.unlink() for p in d.iterdir() if p.name.startswith(("tokenizer", "special_tokens"))], "",
        "model.base: no tokenizer in this folder", "tokenizer.save_pretrained"),
    "empty_tokenizer": (
        lambda d: (d / "tokenizer.json").write_text(""), "tokenizer.json", "model.base: tokenizer.json is empty",
        RESAVE),
}
BROKEN_SHARDS = {
    "truncated_shard": (
        lambda d: rewrite(d / "model-00002-of-00003.safetensors", lambda raw: raw[: len(raw) // 2]),
        "model-00002-of-00003.safetensors", "model.base: damaged weights file", RESAVE),
    "missing_shard": (
        lambda d: (d / "model-00003-of-00003.safetensors").unlink(), "model.safetensors.index.json",
        "shard model-00003-of-00003.safetensors is missing", RESAVE),
    "index_not_json": (
        lambda d: (d / "model.safetensors.index.json").write_text("{"), "model.safetensors.index.json",
        "model.safetensors.index.json is not valid JSON", RESAVE),
    "index_names_a_tensor_no_shard_holds": (
        lambda d: rewrite(d / "model.safetensors.index.json", lambda raw: json.dumps(
            {**json.loads(raw), "weight_map": {**json.loads(raw)["weight_map"], "lm_head.bias":
                                               "model-00001-of-00003.safetensors"}}).encode()),
        "model-00001-of-00003.safetensors", "tensors that model.safetensors.index.json maps to it are not in it",
        RESAVE),
}


@pytest.fixture(scope="module")
def sharded_model_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny model saved in three safetensors shards with their index."""
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("sharded")
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    model.save_pretrained(str(folder), max_shard_size="80KB")
    for f in tiny_model_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            (folder / f.name).write_bytes(f.read_bytes())
    assert sorted(p.name for p in folder.glob("*.safetensors")) == [
        f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    return folder


@pytest.fixture(scope="module")
def broken_outcomes(tmp_path_factory, tiny_model_dir, sharded_model_dir) -> dict:
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("broken")
    cases = {}
    for table, source in ((BROKEN, tiny_model_dir), (BROKEN_SHARDS, sharded_model_dir)):
        for name, (breaks, file, error, hint) in table.items():
            folder = copy_model(root / name, source, lambda _: True)
            breaks(folder)
            cases[name] = (write_config(root / name, folder), folder / file, error, hint)

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the broken base was reported")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(AutoModelForCausalLM, "from_pretrained", no_model)
        return {name: (run_in_process("run", str(config)), file, error, hint, config.parent)
                for name, (config, file, error, hint) in cases.items()}


@pytest.mark.parametrize("case", [*BROKEN, *BROKEN_SHARDS])
def test_a_broken_base_model_is_refused_before_the_split(broken_outcomes, case):
    result, file, error, hint, folder = broken_outcomes[case]
    lines = result.stderr.splitlines()
    errors = [line for line in lines if line.startswith("Error:")]
    hints = [line for line in lines if line.startswith("Hint:")]
    assert result.returncode == 2, result.stderr
    assert len(errors) == 1 and len(hints) == 1, result.stderr
    assert errors[0].startswith(f"Error: {file}".rstrip("/")) and error in errors[0], errors[0]
    assert hint in hints[0], hints[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert not (folder / "run" / "data").exists()  # nothing was written


def test_an_intact_sharded_base_model_passes_and_loads(sharded_model_dir):
    from sdpo_cli.config import ModelConfig
    from sdpo_cli.models import check_base, load_model

    cfg = ModelConfig(base=str(sharded_model_dir))
    check_base(cfg)
    assert load_model(cfg).num_parameters() > 0


# ---------------------------------------------------------------------------------------------------------------
# 11. Hints that name the real cause: a damaged checkpoint that sdpo wrote, a model that needs remote code.


def sdpo_checkpoint(d: Path, model: Path, step: int, keep=lambda name: True) -> Path:
    """A folder as `train` writes checkpoints/step-N: the model, its tokenizer and a meta.json with "stage": "train"
    (without the "files" list, so only the loading itself finds what is missing)."""
    folder = copy_model(d, model, keep)
    folder = folder.rename(d / f"step-{step}")
    (folder / "meta.json").write_text(json.dumps({"stage": "train", "step": step, "fingerprint": "f" * 16}))
    return folder


@pytest.mark.parametrize("damage", ["weights_missing", "weights_zero_bytes", "tokenizer_missing"])
def test_a_damaged_checkpoint_names_the_step_to_redo(tmp_path, tiny_model_dir, damage):
    from sdpo_cli.config import ModelConfig
    from sdpo_cli.errors import SdpoError
    from sdpo_cli.models import load_model, load_tokenizer

    keep = {"weights_missing": lambda name: name != "model.safetensors",
            "tokenizer_missing": lambda name: not name.startswith(("tokenizer", "special_tokens"))}.get(damage)
    checkpoint = sdpo_checkpoint(tmp_path, tiny_model_dir, 1, keep or (lambda name: True))
    if damage == "weights_zero_bytes":
        weights(checkpoint).write_bytes(b"")
    cfg = ModelConfig(base=str(tiny_model_dir))
    with pytest.raises(SdpoError) as e:
        if damage == "tokenizer_missing":
            load_tokenizer(cfg, str(checkpoint))
        else:
            load_model(cfg, checkpoint)
    assert e.value.message.startswith(str(checkpoint)), e.value.message
    assert e.value.hint.startswith("sdpo train CONFIG --step 1 --force"), e.value.hint
    assert "model.base" not in e.value.hint and "save_pretrained" not in e.value.hint


def remote_code_model(d: Path, model: Path) -> Path:
    """The tiny model, its config.json mapping the auto classes to a module of its own (transformers' `auto_map`),
    with a model_type that transformers does not know; the module leaves a marker if it is ever run."""
    folder = copy_model(d, model, lambda _: True)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="sdpo_custom_llama", architectures=["CustomForCausalLM"],
                  auto_map={"AutoConfig": "modeling_custom.CustomConfig",
                            "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_custom.py").write_text(f"open({str(d / 'code-ran')!r}, 'w').close()\n")
    return folder


def test_a_model_that_needs_remote_code_says_how_to_allow_it(tmp_path, tiny_model_dir):
    from sdpo_cli.config import ModelConfig
    from sdpo_cli.errors import SdpoError
    from sdpo_cli.models import load_model

    folder = remote_code_model(tmp_path, tiny_model_dir)
    # as model.base: refused before the split, with the hint
    config = write_config(tmp_path / "as-base", folder)
    result = run_in_process("run", str(config))
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr
    assert str(folder) in errors[0] and "model.trust_remote_code is off" in errors[0], errors[0]
    assert f"Hint: {REMOTE_CODE_HINT}" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "as-base" / "run" / "data").exists()
    # loaded as another model (dpo.reference, a checkpoint path): transformers refuses, and the hint says why
    with pytest.raises(SdpoError) as e:
        load_model(ModelConfig(base=str(tiny_model_dir)), folder)
    assert "custom code" in e.value.message and e.value.hint == REMOTE_CODE_HINT
    assert not (tmp_path / "code-ran").exists()  # and no code of the model ran


# ---------------------------------------------------------------------------------------------------------------
# 10b. A second SIGINT / SIGTERM stops at once.

STOP_TWICE = textwrap.dedent("""
    import os, signal, sys, time
    from sdpo_cli.train import StopSignals

    sig = getattr(signal, sys.argv[1])
    with StopSignals() as stop:
        os.kill(os.getpid(), sig)
        time.sleep(0.1)  # the handler runs between bytecodes
        assert stop.received == sys.argv[1]
        print("first signal: flag set", flush=True)
        os.kill(os.getpid(), sig)
        time.sleep(30)  # never reached: the second signal ends the process
    print("not stopped", flush=True)
""")


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_second_signal_stops_at_once(sig):
    started = time.time()
    result = subprocess.run([sys.executable, "-c", STOP_TWICE, sig], capture_output=True, text=True, cwd=str(ROOT),
                            timeout=120)
    assert result.returncode == 130, result.stderr
    assert result.stdout == "first signal: flag set\n"
    assert f"Stopped at once by a second {sig}" in result.stderr and "Traceback" not in result.stderr
    assert time.time() - started < 25  # not the 30 s sleep


def wait_until(proc: subprocess.Popen, condition, timeout: float = 300, alive: bool = True) -> None:
    deadline = time.time() + timeout
    while proc.poll() is None and not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.005)
    assert proc.poll() is None or not alive, "the run ended before the moment to signal it"


@pytest.mark.slow
def test_two_sigints_in_training_stop_at_once_and_the_rerun_resumes(long_config):
    config, run, reference = long_config
    log1, log2 = run / "logs" / "train-step-1.jsonl", run / "logs" / "train-step-2.jsonl"

    # two Ctrl-C in quick succession: the first asks for a stop at the update boundary, the second ends it now
    proc, lines, reader = start(["run", str(config), *FAST])
    wait_until(proc, lambda: len(read_log(log1)) >= 8)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    second = time.time()
    code = proc.wait(timeout=60)
    stopped_in = time.time() - second
    reader.join(timeout=10)
    stderr = "".join(lines)
    assert code == 130, stderr
    assert stopped_in < 5, stopped_in  # at once (~0.05 s here), not after unwinding and the interpreter's exit
    assert "Stopped at once by a second SIGINT" in stderr and "Traceback" not in stderr
    assert not (run / "checkpoints" / "step-1").exists()

    # a second Ctrl-C while the first one's stop is under way (state saved, the error being reported) ends it too
    proc, lines, reader = start(["run", str(config), *FAST])
    wait_until(proc, lambda: len(read_log(log2)) >= 5)
    proc.send_signal(signal.SIGINT)
    wait_until(proc, lambda: any("stopped by SIGINT" in line for line in lines), timeout=60, alive=False)
    proc.send_signal(signal.SIGINT)
    code = proc.wait(timeout=60)
    reader.join(timeout=10)
    stderr = "".join(lines)
    assert code == 130 and "Traceback" not in stderr, stderr

    result = run_cli("run", str(config), *FAST)
    assert result.returncode == 0, result.stderr
    assert "train step 2: resuming after update" in result.stderr
    for t in (1, 2):
        resumed, straight = read_log(run / "logs" / f"train-step-{t}.jsonl"), read_log(
            reference / "logs" / f"train-step-{t}.jsonl")
        assert [r["update"] for r in resumed] == [r["update"] for r in straight]
        for a, b in zip(resumed, straight):
            assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    assert not list((run / "checkpoints").glob(".step-*"))
