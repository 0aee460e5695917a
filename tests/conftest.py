"""Test-wide setup: hermetic (no hub, no network), deterministic, quiet."""

import logging
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")


@pytest.fixture(autouse=True)
def _reset_llmforge_logging():
    """CLI tests configure the `llmforge` logger (handler on a captured stream, propagate off); undo that so
    later tests' caplog sees library logs and nothing writes to a closed stream."""
    yield
    from llmforge import console

    logger = logging.getLogger("llmforge")
    for h in list(logger.handlers):
        logger.removeHandler(h)
    logger.propagate = True
    logger.setLevel(logging.NOTSET)
    console._state.configured = False
    console._state.console = None
