"""llmforge: from raw web pages to a served, aligned, quantized chat model with one tool and one manifest."""

__version__ = "0.1.0"
