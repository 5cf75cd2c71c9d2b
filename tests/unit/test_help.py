"""Every command's --help says what it does and shows at least one example (issue: docs in
the CLI itself); the top-level help lists every command."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from migrator.cli import main

COMMANDS = sorted(main.commands)


def test_the_command_list_is_complete() -> None:
    assert set(COMMANDS) >= {
        "plan",
        "run",
        "status",
        "jobs",
        "check",
        "iam-policy",
        "retry-failed",
        "report",
        "verify",
        "export-manifest",
        "import-report",
    }
    top = CliRunner().invoke(main, ["--help"], standalone_mode=False)
    assert top.exit_code == 0
    for name in COMMANDS:
        assert name in top.output


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_an_example(command: str) -> None:
    result = CliRunner().invoke(main, [command, "--help"], standalone_mode=False)
    assert result.exit_code == 0, result.output
    assert "Example" in result.output, f"`migrator {command} --help` shows no example"
    assert f"migrator {command}" in result.output.split("Example", 1)[1]
