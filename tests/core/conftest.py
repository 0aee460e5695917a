"""Fixtures shared by the core tests."""

from __future__ import annotations

import pytest

from llmforge import pipeline
from tests.core import dummy_stages


@pytest.fixture
def dummy(tmp_path, monkeypatch):
    """A project whose pipeline is the dummy stages a → b → c (and unbuilt d)."""
    (tmp_path / "llmforge.yaml").write_text(dummy_stages.MANIFEST)
    monkeypatch.setattr(pipeline, "STAGES", dummy_stages.STAGES)
    monkeypatch.setenv("COLUMNS", "200")
    return tmp_path
