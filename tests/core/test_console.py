"""Progress reporting: plain periodic lines under CI / non-TTY, silent when unconfigured."""

from __future__ import annotations

import logging

import pytest

from llmforge import console


def test_plain_mode_under_ci(monkeypatch, capsys):
    monkeypatch.setenv("CI", "true")
    assert console.resolve_mode("auto") == "plain"
    console.configure("auto", plain_interval=0.0)
    with console.progress("tokenize", total=4, unit="docs") as bar:
        for _ in range(4):
            bar.advance(1, loss=2.5)
    err = capsys.readouterr().err
    assert "tokenize: 1/4 docs (25%)" in err
    assert "loss=2.5" in err
    assert "tokenize: 4/4 docs (100%)" in err and err.rstrip().endswith("done")


def test_plain_lines_are_rate_limited(monkeypatch, capsys):
    console.configure("plain", plain_interval=3600)
    with console.progress("work", total=1000) as bar:
        for _ in range(1000):
            bar.advance()
    lines = [line for line in capsys.readouterr().err.splitlines() if "work:" in line]
    assert len(lines) == 1 and "done" in lines[0]  # only the closing line


def test_quiet_suppresses_progress(capsys):
    console.configure("plain", quiet=True, plain_interval=0)
    with console.progress("x", total=2) as bar:
        bar.advance(2)
    assert "x:" not in capsys.readouterr().err


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (None, ""),
        (-3, "0.0s"),
        (0, "0.0s"),
        (2.34, "2.3s"),
        (59.94, "59.9s"),
        (59.97, "1m00s"),  # never "60.0s"
        (60, "1m00s"),
        (62.4, "1m02s"),
        (3599, "59m59s"),
        (3600, "1h00m"),
        (7505, "2h05m"),
        (90061, "25h01m"),
    ],
)
def test_format_duration(seconds, text):
    assert console.format_duration(seconds) == text


def test_progress_line_uses_the_duration_format(capsys):
    console.configure("plain", plain_interval=0.0)
    with console.progress("work", total=2, unit="steps") as bar:
        bar.start -= 62.2  # as if the first step took 62.2 s
        bar.advance(1)
    err = capsys.readouterr().err
    assert "work: 1/2 steps (50%) eta 1m02s" in err and "elapsed 1m02s" in err, err


def test_library_logger_is_namespaced():
    assert console.get_logger("llmforge.data.crawl").name == "llmforge.data.crawl"
    assert console.get_logger("thirdparty").name == "llmforge.thirdparty"


def teardown_module(_):
    logging.getLogger("llmforge").handlers.clear()
    console._state.configured = False
