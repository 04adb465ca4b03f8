"""Which engine runs a model: `--engine auto|transformers|llama.cpp`, picked and loaded."""

from __future__ import annotations

import importlib.util
from typing import Any

from ..models import EMBEDDED, ModelError, base_model_spec, pick_device
from .base import DEFAULT_WEIGHTS, ENGINE_CHOICES
from .llamacpp import LlamaCppEngine
from .transformers import TransformersEngine

__all__ = ["ENGINE_CHOICES", "load_engine", "pick_engine"]


def pick_engine(choice: str = "auto", base_model: str | None = None, device: str = "auto", dtype: str = "auto") -> str:
    """`--engine auto`: llama.cpp where it is faster (measured in eval/bench_generate.md): a GGUF base
    (the embedded models, a .gguf file) on CPU, with llama-cpp-python installed and no --dtype asked
    for. Everything else runs on transformers."""
    spec = base_model_spec(base_model)
    is_gguf = spec in EMBEDDED or spec.lower().endswith(".gguf")
    if choice == "llama.cpp":
        if dtype != "auto":
            raise ModelError("--dtype applies to the transformers engine; llama.cpp runs the GGUF's own weights")
        if device not in ("auto", "cpu"):
            raise ModelError(f"--engine llama.cpp runs on CPU here, not {device}")
        return choice
    if choice != "auto":
        return choice
    if (is_gguf and dtype == "auto" and pick_device(device) == "cpu"
            and importlib.util.find_spec("llama_cpp") is not None):
        return "llama.cpp"
    return "transformers"


def load_engine(choice: str = "auto", base_model: str | None = None, device: str = "auto", dtype: str = "auto",
                weights: str = DEFAULT_WEIGHTS) -> Any:
    """The generation engine `--engine choice` names, loaded (`weights`: how llama.cpp runs the base)."""
    if pick_engine(choice, base_model, device, dtype) == "llama.cpp":
        return LlamaCppEngine.load(base_model, weights)
    return TransformersEngine.load(base_model, device=device, dtype=dtype)
