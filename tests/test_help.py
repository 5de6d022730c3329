"""`--help` of the app and of every command, through typer's CliRunner in this process (no subprocess): each shows
its usage and the Example line of its docstring (docs/cli.md shows the same)."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from sdpo_cli.cli import app

COMMANDS = ["split", "reflogp", "train", "run", "gamma", "eval", "status"]


def invoke(*args: str):
    result = CliRunner().invoke(app, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result


def one_line(text: str) -> str:
    """Help is wrapped to the terminal's width: compare texts with their whitespace collapsed."""
    return " ".join(text.split())


def example_of(command: str) -> str:
    callback = next(c.callback for c in app.registered_commands if (c.name or c.callback.__name__) == command)
    examples = [line.strip() for line in callback.__doc__.splitlines() if line.strip().startswith("Example:")]
    assert len(examples) == 1, callback.__doc__
    return examples[0]


def test_every_command_is_listed_here():
    # init takes no CONFIG: its help is tested in tests/test_start.py
    assert sorted(c.name or c.callback.__name__ for c in app.registered_commands) == sorted([*COMMANDS, "init"])


@pytest.mark.parametrize("command", COMMANDS)
def test_command_help_has_an_example(command):
    result = invoke(command, "--help")
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output and "CONFIG" in result.output.upper()
    assert f"Example: sdpo {command} configs/fixtures.yaml" in result.output
    example = example_of(command)
    assert example.startswith(f"Example: sdpo {command} configs/fixtures.yaml ")
    assert example in one_line(result.output)  # the whole line, as the docstring has it


def test_app_help_lists_the_commands():
    result = invoke("--help")
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output
    for command in COMMANDS:
        assert f"│ {command} " in result.output


def test_app_help_has_an_example():
    result = invoke("--help")
    assert "Example: sdpo run configs/fixtures.yaml" in result.output
    assert ("Example: sdpo run configs/fixtures.yaml run_dir=runs/fixtures && sdpo gamma configs/fixtures.yaml "
            "run_dir=runs/fixtures") in one_line(result.output)


def test_version_prints_the_package_version():
    from sdpo_cli import __version__

    result = invoke("--version")
    assert result.exit_code == 0, result.output
    assert result.output == f"sdpo {__version__}\n"
    assert "--version" in invoke("--help").output


@pytest.mark.parametrize(("command", "flags"), [("split", ["--force"]), ("reflogp", ["--force"]),
                                                ("train", ["--force"]), ("run", ["--force", "--redo-stale"]),
                                                ("gamma", ["--json"]), ("eval", ["--force", "--json"]),
                                                ("status", ["--json"]),
                                                ("", ["--version"])])
def test_flags_are_shown_without_a_value(command, flags):
    """A flag takes no value: its help row names no type (typer's default would be `--force <bool>`); -h / --help
    too. Options that take a value still show it."""
    result = invoke(*([command] if command else []), "--help")
    assert result.exit_code == 0, result.output
    assert "<bool>" not in result.output
    rows = {m[1]: m[0] for m in re.finditer(r"^│\s+(?:\*\s+)?(--[a-z-]+)[^\n]*", result.output, re.MULTILINE)}
    for flag in [*flags, "--help"]:
        assert "<" not in rows[flag], rows[flag]
    if command in ("reflogp", "train"):
        assert "<int range>" in rows["--step"]
    if command in ("gamma", "eval"):
        assert "<list[str]>" in rows["--checkpoint"]
