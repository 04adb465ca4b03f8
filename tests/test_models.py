"""Base-model resolution and the embedded-model cache, without reading real weights."""

import hashlib
import sys
import types

import pytest

from llmtags import models
from llmtags.models import EmbeddedModel, ModelError, cache_root, embedded_gguf, resolve_base_model


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMTAGS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _fake_chunks(tmp_path, monkeypatch, parts: list[bytes], sha256: str) -> str:
    for i, data in enumerate(parts, start=1):
        path = tmp_path / f"part{i}.bin"
        path.write_bytes(data)
        module = types.ModuleType(f"fake_chunks_part{i}")
        module.get_part_path = lambda path=path: str(path)
        monkeypatch.setitem(sys.modules, f"fake_chunks_part{i}", module)
    fake = EmbeddedModel("fake", "fake_chunks_part", "fake-chunks-part", len(parts), sha256, "pip install fake")
    monkeypatch.setitem(models.EMBEDDED, "fake", fake)
    return "fake"


def test_cache_root_honours_overrides(monkeypatch, tmp_path):
    monkeypatch.delenv("LLMTAGS_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_root() == tmp_path / "llmtags"
    monkeypatch.setenv("LLMTAGS_CACHE", str(tmp_path / "x"))
    assert cache_root() == tmp_path / "x"


def test_chunks_are_joined_in_order_and_verified(tmp_path, monkeypatch, cache):
    parts = [b"first-", b"second-", b"third"]
    name = _fake_chunks(tmp_path, monkeypatch, parts, hashlib.sha256(b"".join(parts)).hexdigest())
    path = embedded_gguf(name)
    assert path.read_bytes() == b"first-second-third"
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind


def test_hash_mismatch_fails_clearly_and_leaves_no_file(tmp_path, monkeypatch, cache):
    name = _fake_chunks(tmp_path, monkeypatch, [b"tampered"], "0" * 64)
    with pytest.raises(ModelError, match="sha256 .* expected 0{64}.*reinstall"):
        embedded_gguf(name)
    assert list((cache / "gguf").iterdir()) == []


def test_missing_chunk_package_names_the_install(tmp_path, monkeypatch, cache):
    monkeypatch.setitem(models.EMBEDDED, "absent", EmbeddedModel("a", "no_such_chunk_", "no-such-chunk-", 2, "0" * 64, "pip install x"))
    with pytest.raises(ModelError, match="no-such-chunk-1 is not installed: pip install x"):
        embedded_gguf("absent")


def test_unreadable_gguf_is_a_model_error(tmp_path, cache):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelError, match="cannot read GGUF"):
        resolve_base_model(str(bad))
    assert not (cache / "models").exists() or not any((cache / "models").iterdir())


def test_resolution_rules(tmp_path, cache, monkeypatch):
    with pytest.raises(ModelError, match="unknown base model"):
        resolve_base_model("not a model")
    with pytest.raises(ModelError, match="without config.json"):
        resolve_base_model(str(tmp_path))
    hub = resolve_base_model("Qwen/Qwen2.5-0.5B-Instruct")
    assert hub.is_hub and hub.identity == "hub:Qwen/Qwen2.5-0.5B-Instruct"
    (tmp_path / "config.json").write_text("{}")
    local = resolve_base_model(str(tmp_path))
    assert not local.is_hub and local.identity.startswith("dir:")
    monkeypatch.setenv("LLMTAGS_BASE_MODEL", "Org/Model")
    assert resolve_base_model(None).location == "Org/Model"


def test_4bit_on_cpu_is_refused_with_a_reason(tiny_model_dir):
    with pytest.raises(ModelError, match="CUDA"):
        models.load_model(resolve_base_model(str(tiny_model_dir)), device="cpu", load_in_4bit=True)


def test_nothing_but_safetensors_is_loaded(tmp_path, tiny_model_dir):
    import shutil

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, pickled)
    weights = pickled / "model.safetensors"
    import torch
    from safetensors.torch import load_file

    torch.save(load_file(weights), pickled / "pytorch_model.bin")
    weights.unlink()
    with pytest.raises(ModelError):
        models.load_model(resolve_base_model(str(pickled)), device="cpu")


def test_bf16_is_called_slow_only_on_x86_cpus_without_native_bf16():
    cpu_lacks_bf16 = models.cpu_lacks_bf16
    amd_avx2 = "processor\t: 0\nflags\t\t: fpu sse sse2 fma avx avx2\n"
    sapphire = "flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
    cooper = "flags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n"
    arm = "Features\t: fp asimd bf16\n"
    skylake = "flags\t\t: fpu sse2 avx2 avx512f avx512bw\n"  # AVX-512 without its bf16 instructions
    assert cpu_lacks_bf16(amd_avx2) and cpu_lacks_bf16(skylake)
    assert not cpu_lacks_bf16(sapphire) and not cpu_lacks_bf16(cooper)
    assert not cpu_lacks_bf16(arm) and not cpu_lacks_bf16("")  # nothing known: no claim
    # Native bf16 is claimed only where a flag says so (ARM, or no flags at all: not claimed either).
    assert models.cpu_has_bf16(sapphire) and models.cpu_has_bf16(cooper)
    assert not any(models.cpu_has_bf16(c) for c in (amd_avx2, skylake, arm, ""))


@pytest.mark.parametrize("native", [True, False])
def test_auto_trains_in_bf16_on_a_cpu_with_native_bf16_and_tags_in_fp32(monkeypatch, native):
    import torch

    monkeypatch.setattr(models, "cpu_has_bf16", lambda cpuinfo=None: native)
    assert models.pick_dtype("auto", "cpu", training=True) is (torch.bfloat16 if native else torch.float32)
    assert models.pick_dtype("auto", "cpu") is torch.float32  # tagging: as the adapters' scores were measured
    assert models.pick_dtype("auto", "cuda", training=True) is torch.bfloat16
    assert models.pick_dtype("float32", "cpu", training=True) is torch.float32  # asked for: as asked


def test_the_bf16_warning_names_the_flag_to_use(monkeypatch, capsys):
    import torch

    monkeypatch.setattr(models, "cpu_lacks_bf16", lambda cpuinfo=None: True)
    assert "--dtype float32" in models.bf16_warning(torch.bfloat16, "cpu")
    assert models.bf16_warning(torch.float32, "cpu") is None
    assert models.bf16_warning(torch.bfloat16, "cuda") is None
    # What train and the transformers engine call: the dtype, with the warning said once on stderr.
    assert models.warn_if_slow_dtype("bfloat16", "cpu") is torch.bfloat16
    assert capsys.readouterr().err.count("llmtags: warning: --dtype bfloat16: bfloat16 on this CPU") == 1
    assert models.warn_if_slow_dtype("float32", "cpu") is torch.float32 and not capsys.readouterr().err
    monkeypatch.setattr(models, "cpu_lacks_bf16", lambda cpuinfo=None: False)
    assert models.bf16_warning(torch.bfloat16, "cpu") is None
    assert models.warn_if_slow_dtype("bfloat16", "cpu") is torch.bfloat16 and not capsys.readouterr().err


def test_a_tokenizer_saved_on_its_own_loads_without_weights(qwen_tokenizer_dir, tmp_path):
    # embedded_tokenizer_dir saves only the tokenizer until the weights are first converted: a directory
    # without config.json must still give its tokenizer (it did not, on a fresh cache).
    import shutil

    alone = tmp_path / "tokenizer"
    alone.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (qwen_tokenizer_dir / name).is_file():
            shutil.copy(qwen_tokenizer_dir / name, alone / name)
    tokenizer = models.load_tokenizer_only(str(alone))
    assert tokenizer.chat_template and tokenizer.padding_side == "left"
    assert tokenizer.decode(tokenizer("品牌:耐克")["input_ids"]) == "品牌:耐克"
