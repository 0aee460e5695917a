"""Review: usage mistakes at the CLI edge exit 2 with a message, never a traceback."""

from __future__ import annotations

import pytest

from llmforge.cli import common
from tests.cli import run_cli as run_main


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
    monkeypatch.setattr(common.state, "debug", False)  # another test's --debug sticks to this process


@pytest.mark.parametrize(
    "args",
    [
        ["run", "--no-such-option"],
        ["status", "-m"],
        ["no-such-command"],
        ["--progress", "fancy", "validate"],
        ["train", "pretrain", "--nproc", "two"],
    ],
)
def test_usage_errors_exit_2_without_traceback(dummy, capsys, args):
    code, _, err = run_main(args, dummy, capsys)
    assert code == 2, err
    assert "Traceback" not in err
    assert err.strip()


def test_force_outside_the_plan_is_a_clean_error(dummy, capsys):
    code, _, err = run_main(["run", "a", "--force", "c"], dummy, capsys)
    assert code == 2 and "--force c" in err and "Traceback" not in err


def test_ctrl_c_exits_130_with_the_resume_hint(dummy, capsys, monkeypatch):
    from llmforge import pipeline

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "run", interrupted)
    code, _, err = run_main(["run"], dummy, capsys)
    assert code == 130
    assert "interrupted" in err and "Traceback" not in err
