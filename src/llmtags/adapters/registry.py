"""The adapter registry: LoRA adapters on disk and their provenance.

An adapter is a directory holding exactly what peft wrote (`adapter_config.json`,
`adapter_model.safetensors`) and `llmtags.json`, which says what it was trained on and for:

- the base model's identity (`ResolvedModel.identity`, a sha256 for embedded and GGUF models) and spec;
- the prompt template (name, sha256 of its source) and the tokenizer's chat template hash: an adapter
  learnt to answer one exact prompt, so another template or chat format is refused unless forced;
- the training data (paths, sizes, licence), the vocabulary if any, the hyper-parameters, dev metrics
  (and a slot for test metrics), the exact command, the date and the llmtags version.

Named adapters live under `adapters/` (or `$LLMTAGS_ADAPTERS`); a name is a plain file name
(`[A-Za-z0-9._-]`), never a path. Adapter weights are read from safetensors only.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import __version__
from ..atomic import copy_file, write_text
from ..candidates import candidate_sources, load_candidate_vocabulary
from ..models import ResolvedModel, sha256_file
from ..prompts import (
    EARLIER_SHA256,
    PACKAGED,
    PromptTemplate,
    chat_template_hash,
    load_template,
)
from ..vocab import Vocabulary

METADATA_FILE = "llmtags.json"
WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
PICKLE_WEIGHTS = ("adapter_model.bin", "adapter_model.pt", "pytorch_model.bin")
FORMAT_VERSION = 1
DEFAULT_ROOT = "adapters"

_NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,100}$")


class AdapterError(ValueError):
    """An adapter that cannot be found, read, or used with this base model and prompt."""


class AdapterMismatch(AdapterError):
    """The adapter was trained for another base model, prompt template or chat template."""


def adapters_root(root: str | Path | None = None) -> Path:
    """`root`, else $LLMTAGS_ADAPTERS, else ./adapters."""
    return Path(root if root is not None else os.environ.get("LLMTAGS_ADAPTERS") or DEFAULT_ROOT)


def validate_adapter_name(name: str) -> str:
    """A registry name: 1-100 of [A-Za-z0-9._-], not '.' or '..', not starting with '.' or '-'.

    Anything else (a '/', a '..', an absolute path, spaces, non-ASCII) is refused, so a name can never
    reach outside the registry directory.
    """
    if not isinstance(name, str) or not _NAME_RE.match(name) or name.startswith((".", "-")) or ".." in name:
        raise AdapterError(
            f"invalid adapter name {name!r}: use 1-100 letters, digits, '.', '_' or '-' "
            "(not starting with '.' or '-', no '..', no '/')"
        )
    return name


def _looks_like_path(text: str) -> bool:
    return os.sep in text or "/" in text or text.startswith(("~", ".")) or Path(text).is_absolute()


def resolve_adapter(name_or_path: str | Path, root: str | Path | None = None) -> Path:
    """The directory of an adapter: a registry name (under `root`) or an explicit directory path."""
    text = str(name_or_path)
    if _looks_like_path(text):
        path = Path(text).expanduser()
    else:
        path = adapters_root(root) / validate_adapter_name(text)
    if not path.is_dir():
        known = ", ".join(a.name for a in list_adapters(root)) if not _looks_like_path(text) else ""
        raise AdapterError(f"no adapter {text!r} (looked in {path})" + (f"; known: {known}" if known else ""))
    check_files(path)
    return path


def weights_sha256(path: str | Path) -> str:
    """The sha256 of an adapter directory's weights: what tells one trained adapter from another."""
    return sha256_file(Path(path) / WEIGHTS_FILE)


def check_files(path: Path) -> None:
    """Require peft's safetensors weights and config; refuse pickled weights outright."""
    pickled = [p for p in PICKLE_WEIGHTS if (path / p).exists()]
    if pickled:
        raise AdapterError(
            f"adapter {path} holds pickled weights ({', '.join(pickled)}): llmtags loads safetensors only; "
            "convert it with peft's save_pretrained(safe_serialization=True)"
        )
    for required in (CONFIG_FILE, WEIGHTS_FILE):
        if not (path / required).is_file():
            raise AdapterError(f"adapter {path} lacks {required}")


# --- metadata -----------------------------------------------------------------------------------------


def template_identity(choice: str | PromptTemplate, spec: str | None = None) -> dict[str, Any]:
    """Name and sha256 of the prompt a choice renders. 'auto' stands for the zh and en pair.

    `spec` is what to pass as `--template` to get it again (a packaged name or a file path); a file
    path is stored absolute.
    """
    if spec is not None and spec not in PACKAGED and spec != "auto" and Path(spec).is_file():
        spec = str(Path(spec).resolve())
    if isinstance(choice, PromptTemplate):
        return {"name": choice.name, "spec": spec or choice.name, "sha256": choice.sha256}
    if choice == "auto":
        parts = {lang: load_template(lang).sha256 for lang in ("zh", "en")}
        digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode("utf-8")).hexdigest()
        return {"name": "auto", "spec": "auto", "sha256": digest, "parts": parts}
    template = load_template(choice)
    return template_identity(template, spec or str(choice))


def _sources_sha256(spec: str) -> str | list[str]:
    """The hash of a candidates file, or the list of hashes of comma-joined sources."""
    sources = candidate_sources(spec)
    return sha256_file(sources[0]) if len(sources) == 1 else [sha256_file(p) for p in sources]


def build_metadata(
    *,
    resolved: ResolvedModel,
    template: str | PromptTemplate,
    tokenizer: Any,
    hyperparameters: dict[str, Any],
    template_spec: str | None = None,
    data: dict[str, Any] | None = None,
    vocab: str | Path | None = None,
    candidates: str | Path | None = None,
    dev_metrics: dict[str, Any] | None = None,
    command: str = "",
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    vocabulary = None
    if vocab is not None or candidates is not None:
        vocabulary = {
            # Offered in the prompts (`--candidates`): generate must use the same one.
            "candidates": None if candidates is None else {
                "path": str(candidates), "size": len(load_candidate_vocabulary(str(candidates))),
                "sha256": _sources_sha256(str(candidates))},
            # The normaliser's vocabulary the adapter is meant to go with (`--vocab`).
            "normalisation": None if vocab is None else {
                "path": str(vocab), "size": len(Vocabulary.load(vocab)), "sha256": sha256_file(vocab)},
        }
    meta = {
        "format": FORMAT_VERSION,
        "kind": "lora",
        "base_model": {"identity": resolved.identity, "spec": resolved.spec},
        "template": template_identity(template, template_spec),
        "chat_template_sha256": chat_template_hash(tokenizer),
        "vocabulary": vocabulary,
        "data": data or {},
        "hyperparameters": hyperparameters,
        "metrics": {"dev": dev_metrics, "test": None},
        "command": command,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "llmtags_version": __version__,
    }
    if extra:
        meta.update(extra)
    return meta


def write_metadata(path: str | Path, meta: dict[str, Any]) -> Path:
    """Write `llmtags.json` atomically (temporary file, then rename)."""
    return write_text(Path(path) / METADATA_FILE, json.dumps(meta, ensure_ascii=False, indent=2) + "\n")


def read_metadata(path: str | Path) -> dict[str, Any]:
    file = Path(path) / METADATA_FILE
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AdapterError(f"{path} has no {METADATA_FILE}: not an llmtags adapter") from None
    except json.JSONDecodeError as exc:
        raise AdapterError(f"{file}: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
        found = meta.get("format") if isinstance(meta, dict) else meta
        raise AdapterError(f"{file}: unknown metadata format {found!r}")
    return meta


def set_metadata_entry(name_or_path: str | Path, keys: Sequence[str], value: Any, root: str | Path | None = None) -> Path:
    """Store `value` at `keys` in an adapter's llmtags.json (`("metrics", "test")` from `llmtags eval
    --record-to-adapter`, `("calibration",)` from `llmtags calibrate`); returns the adapter's path."""
    path = resolve_adapter(name_or_path, root)
    meta = read_metadata(path)
    slot = meta
    for key in keys[:-1]:
        slot = slot.setdefault(key, {})
    slot[keys[-1]] = value
    write_metadata(path, meta)
    return path


@dataclass
class AdapterInfo:
    name: str
    path: Path
    meta: dict[str, Any]

    def summary(self) -> dict[str, Any]:
        """One row of `llmtags adapters list`."""
        dev = (self.meta.get("metrics") or {}).get("dev") or {}
        data = self.meta.get("data") or {}
        return {
            "name": self.name,
            "base": self.meta.get("base_model", {}).get("spec"),
            "template": self.meta.get("template", {}).get("name"),
            "train_records": data.get("train_records"),
            "dev_f1": dev.get("f1"),
            "created": self.meta.get("created"),
        }


def list_adapters(root: str | Path | None = None) -> list[AdapterInfo]:
    """Every adapter directory under the registry root (with a readable `llmtags.json`), by name."""
    base = adapters_root(root)
    if not base.is_dir():
        return []
    found = []
    for child in sorted(base.iterdir()):
        if not child.is_dir() or not _NAME_RE.match(child.name) or child.name.startswith("."):
            continue
        try:
            found.append(AdapterInfo(child.name, child, read_metadata(child)))
        except AdapterError:
            continue
    return found


def show_adapter(name_or_path: str | Path, root: str | Path | None = None) -> dict[str, Any]:
    """The full metadata of one adapter, plus where it is and the size of its weights."""
    path = resolve_adapter(name_or_path, root)
    meta = read_metadata(path)
    return {**meta, "path": str(path), "weights_bytes": (path / WEIGHTS_FILE).stat().st_size}


def same_rendering(trained: dict[str, Any], current: dict[str, Any]) -> bool:
    """A packaged template changed since the adapter was trained, but only by adding variables that render
    nothing when unused (see prompts.EARLIER_SHA256): the adapter's prompts are unchanged."""
    return trained.get("name") == current.get("name") and trained.get("sha256") in EARLIER_SHA256.get(
        str(current.get("name")), ())


def check_compatible(
    meta: dict[str, Any],
    resolved_base: ResolvedModel,
    template: str | PromptTemplate | None,
    tokenizer: Any,
    force: bool = False,
    force_flag: str | None = "--force-adapter",
) -> list[str]:
    """Refuse an adapter trained for another base model, prompt template or chat template.

    `template` is the run's choice ('auto', a name, a path or a PromptTemplate); None skips the prompt
    checks (merging weights needs only the right base). Returns the list of differences (empty when
    compatible); with `force`, differences are warned about and returned instead of raised. `force_flag` is
    the command's flag for that, named in the error (None: the command has none).
    """
    problems = []
    base = meta.get("base_model") or {}
    if base.get("identity") != resolved_base.identity:
        problems.append(
            f"base model: the adapter was trained on {base.get('spec')!r} ({base.get('identity')}), "
            f"this run uses {resolved_base.spec!r} ({resolved_base.identity})"
        )
    trained = meta.get("template") or {}
    current = template_identity(template) if template is not None else trained
    if trained.get("sha256") != current.get("sha256") and not same_rendering(trained, current):
        problems.append(
            f"prompt template: the adapter was trained with {trained.get('name')!r} "
            f"(sha256 {str(trained.get('sha256'))[:12]}), this run uses {current['name']!r} "
            f"(sha256 {current['sha256'][:12]}); pass --template {trained.get('spec', trained.get('name'))}"
        )
    if template is not None and meta.get("chat_template_sha256") != chat_template_hash(tokenizer):
        problems.append(
            f"chat template: the adapter was trained with chat template sha256 "
            f"{str(meta.get('chat_template_sha256'))[:12]}, this tokenizer has {chat_template_hash(tokenizer)[:12]}"
        )
    if problems and not force:
        raise AdapterMismatch(
            "adapter does not match this run:\n  - " + "\n  - ".join(problems)
            + (f"\n({force_flag} uses it anyway)" if force_flag else "")
        )
    for problem in problems:
        warnings.warn(f"adapter used despite a mismatch ({force_flag}): {problem}", stacklevel=2)
    return problems


def quiet_bitsandbytes() -> None:
    """bitsandbytes (imported by peft) logs a warning about an optional CPU kernel package on import."""
    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def copy_adapter_files(src: str | Path, dst: str | Path) -> None:
    """Copy peft's safetensors weights and config (nothing else) from one directory to another."""
    src, dst = Path(src), Path(dst)
    check_files(src)
    dst.mkdir(parents=True, exist_ok=True)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        copy_file(src / name, dst / name)
