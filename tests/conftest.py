"""Shared fixtures. The tiny model is a random 2-layer Qwen2 with the real Qwen tokenizer: it runs the
real generate path in about a second, and being random, its outputs differ from record to record."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATASETS = REPO.parent / "shared" / "datasets"


@pytest.fixture(scope="session")
def qwen_tokenizer_dir() -> Path:
    from llmtags.models import embedded_tokenizer_dir

    return embedded_tokenizer_dir()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, qwen_tokenizer_dir: Path) -> Path:
    from llmtags.testing import tiny_qwen2

    return tiny_qwen2(tmp_path_factory.mktemp("tiny-qwen2"), qwen_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_engine(tiny_model_dir: Path):
    from llmtags.engines.transformers import TransformersEngine

    return TransformersEngine.load(str(tiny_model_dir), device="cpu")
