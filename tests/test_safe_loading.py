"""Safe loading, beyond test_models (pickled base weights refused) and test_adapters (path-like names,
pickled weights beside safetensors): an adapter with pickled weights only, NUL bytes in names and paths,
and remote code, which is never enabled."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from llmtags.adapters.registry import AdapterError, check_files, resolve_adapter, validate_adapter_name

SRC = Path(__file__).resolve().parents[1] / "src" / "llmtags"


@pytest.mark.parametrize("weights", ["adapter_model.bin", "adapter_model.pt", "pytorch_model.bin"])
def test_adapter_with_only_pickled_weights_is_refused(tmp_path, weights):
    adapter = tmp_path / "pickled-only"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    (adapter / weights).write_bytes(b"\x80\x04 a pickle that must never be opened")
    with pytest.raises(AdapterError, match="safetensors only"):
        resolve_adapter(str(adapter))
    with pytest.raises(AdapterError, match="safetensors only"):
        check_files(adapter)


@pytest.mark.parametrize("name", ["a\x00b", "\x00", "zh-beauty\x00/../../etc", "ok\x00.safetensors"])
def test_nul_bytes_in_adapter_names_are_refused(tmp_path, name):
    (tmp_path / "a").mkdir()
    with pytest.raises(AdapterError, match="invalid adapter name"):
        validate_adapter_name(name)
    with pytest.raises(AdapterError):
        resolve_adapter(name, tmp_path)


def test_nul_byte_in_an_adapter_path_is_an_adapter_error_not_a_crash(tmp_path):
    (tmp_path / "a").mkdir()
    for path in (f"{tmp_path}/a\x00", f"{tmp_path}\x00/a", "./a\x00b"):
        with pytest.raises(AdapterError, match="no adapter"):
            resolve_adapter(path)


def test_remote_code_is_never_enabled_in_the_source():
    """Every mention of trust_remote_code in src/ sets it to False."""
    uses = []
    for path in sorted(SRC.rglob("*.py")):
        for match in re.finditer(r"trust_remote_code\W{0,3}\s*[=:]\s*(\w+)", path.read_text(encoding="utf-8")):
            uses.append((path.name, match.group(1)))
    assert uses, "load_model should pass trust_remote_code=False explicitly"
    assert all(value == "False" for _, value in uses), uses
    # No loader is called with **kwargs that could smuggle it in from outside either.
    text = "".join(p.read_text(encoding="utf-8") for p in SRC.rglob("*.py"))
    assert "trust_remote_code=True" not in text and '"trust_remote_code": True' not in text


def test_loading_a_model_passes_no_remote_code(tiny_model_dir, monkeypatch):
    """What from_pretrained actually receives when llmtags loads a base model and its tokenizer."""
    import transformers

    from llmtags.engines.transformers import TransformersEngine

    calls = []
    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        original = cls.from_pretrained.__func__

        def spy(klass, *args, _original=original, **kwargs):
            calls.append((klass.__name__, kwargs))
            return _original(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    TransformersEngine.load(str(tiny_model_dir), device="cpu")
    assert {name for name, _ in calls} == {"AutoModelForCausalLM", "AutoTokenizer"}
    assert all(kwargs.get("trust_remote_code", False) is False for _, kwargs in calls)
    model_kwargs = next(kwargs for name, kwargs in calls if name == "AutoModelForCausalLM")
    assert model_kwargs["use_safetensors"] is True and model_kwargs["local_files_only"] is True
