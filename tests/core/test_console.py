"""Progress reporting: plain periodic lines under CI / non-TTY, silent when unconfigured."""

from __future__ import annotations

import logging

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


def test_library_logger_is_namespaced():
    assert console.get_logger("llmforge.data.crawl").name == "llmforge.data.crawl"
    assert console.get_logger("thirdparty").name == "llmforge.thirdparty"


def teardown_module(_):
    logging.getLogger("llmforge").handlers.clear()
    console._state.configured = False
