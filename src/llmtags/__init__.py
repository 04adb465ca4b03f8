"""llmtags: product tags from a small causal language model tuned per catalogue."""

__version__ = "0.1.0"
