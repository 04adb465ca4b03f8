"""Packaged prompt templates (installed as ``llmtags.templates``); see README, "Prompt templates"."""
