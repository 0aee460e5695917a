"""Run the real CLI edge (`llmforge.cli.app.main`: error mapping and exit codes) inside a test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from llmforge.cli.app import main


def run_cli(args: list[str], cwd: Path, capsys) -> tuple[int, str, str]:
    """`llmforge ARGS` in ``cwd``; returns (exit code, stdout, stderr)."""
    old = Path.cwd()
    os.chdir(cwd)
    try:
        with pytest.raises(SystemExit) as exc:
            main(args)
    finally:
        os.chdir(old)
    captured = capsys.readouterr()
    return exc.value.code, captured.out, captured.err
