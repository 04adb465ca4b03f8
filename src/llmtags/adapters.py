"""The adapter registry: LoRA adapters on disk, their provenance, and several of them on one base model.

An adapter is a directory holding exactly what peft wrote (`adapter_config.json`,
`adapter_model.safetensors`) and `llmtags.json`, which says what it was trained on and for:

- the base model's identity (`ResolvedModel.identity`, a sha256 for embedded and GGUF models) and spec;
- the prompt template (name, sha256 of its source) and the tokenizer's chat template hash: an adapter
  learnt to answer one exact prompt, so another template or chat format is refused unless forced;
- the training data (paths, sizes, licence), the vocabulary if any, the hyper-parameters, dev metrics
  (and a slot for test metrics), the exact command, the date and the llmtags version.

Named adapters live under `adapters/` (or `$LLMTAGS_ADAPTERS`); a name is a plain file name
(`[A-Za-z0-9._-]`), never a path. `AdapterSet` loads a base model once and attaches several adapters
with peft, so a catalogue can be tagged with one adapter per category (`route` + `tag_chunks_routed`).
Adapter weights are read from safetensors only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import hashlib
import json
import os
import re
import shutil
import tempfile
import unicodedata
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from .models import ResolvedModel, sha256_file
from .prompts import PACKAGED, PromptTemplate, chat_template_hash, detect_lang, load_template
from .records import Record
from .tagger import TagResult

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
    from .candidates import candidate_sources

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
    from . import __version__

    vocabulary = None
    if vocab is not None or candidates is not None:
        from .candidates import load_candidate_vocabulary
        from .vocab import Vocabulary

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
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{METADATA_FILE}.", dir=path)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        json.dump(meta, out, ensure_ascii=False, indent=2)
        out.write("\n")
    os.replace(tmp, path / METADATA_FILE)
    return path / METADATA_FILE


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


def check_compatible(
    meta: dict[str, Any],
    resolved_base: ResolvedModel,
    template: str | PromptTemplate | None,
    tokenizer: Any,
    force: bool = False,
) -> list[str]:
    """Refuse an adapter trained for another base model, prompt template or chat template.

    `template` is the run's choice ('auto', a name, a path or a PromptTemplate); None skips the prompt
    checks (merging weights needs only the right base). Returns the list of differences (empty when
    compatible); with `force`, differences are warned about and returned instead of raised.
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
    if trained.get("sha256") != current.get("sha256"):
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
            "adapter does not match this run:\n  - " + "\n  - ".join(problems) + "\n(--force uses it anyway)"
        )
    for problem in problems:
        warnings.warn(f"adapter used despite a mismatch (--force): {problem}", stacklevel=2)
    return problems


def quiet_bitsandbytes() -> None:
    """bitsandbytes (imported by peft) logs a warning about an optional CPU kernel package on import."""
    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


# --- several adapters on one base model ------------------------------------------------------------------


def _peft_name(name: str, taken: Iterable[str]) -> str:
    """peft keeps adapters in ModuleDicts, whose keys may not contain '.'."""
    base = re.sub(r"[^A-Za-z0-9_]", "_", name) or "adapter"
    candidate, n = base, 1
    while candidate in taken:
        n += 1
        candidate = f"{base}_{n}"
    return candidate


class AdapterSet:
    """One base model, loaded once, with any number of LoRA adapters attached by name.

    `engine(name)` is an engine (for `tagger.tag_records`) that generates with that adapter active, or
    with the bare base model when `name` is None.
    """

    def __init__(self, model: Any, tokenizer: Any, resolved: ResolvedModel | None = None):
        from .engine import TransformersEngine

        self.model = model
        self.tokenizer = tokenizer
        self.resolved = resolved
        self.infos: dict[str, AdapterInfo] = {}
        self._peft_names: dict[str, str] = {}
        self._base_engine = TransformersEngine(model, tokenizer, resolved)

    @classmethod
    def load(
        cls, base_model: str | None = None, device: str = "auto", dtype: str = "auto", load_in_4bit: bool = False
    ) -> AdapterSet:
        from .models import load_model, load_tokenizer, pick_device, resolve_base_model

        quiet_bitsandbytes()
        resolved = resolve_base_model(base_model)
        tokenizer = load_tokenizer(resolved)
        model = load_model(resolved, device=pick_device(device), dtype=dtype, load_in_4bit=load_in_4bit)
        return cls(model, tokenizer, resolved)

    @property
    def names(self) -> list[str]:
        return list(self.infos)

    def add(
        self,
        name_or_path: str | Path,
        *,
        template: str | PromptTemplate = "auto",
        force: bool = False,
        root: str | Path | None = None,
        name: str | None = None,
    ) -> str:
        """Attach an adapter (registry name or directory) after checking it fits; returns its name."""
        path = resolve_adapter(name_or_path, root)
        meta = read_metadata(path)
        name = name or path.name
        if name in self.infos:
            if self.infos[name].path.resolve() == path.resolve():
                return name
            raise AdapterError(f"two different adapters are both called {name!r}")
        if self.resolved is not None:
            check_compatible(meta, self.resolved, template, self.tokenizer, force=force)
        self._attach(name, path)
        self.infos[name] = AdapterInfo(name, path, meta)
        return name

    def _attach(self, name: str, path: Path) -> None:
        peft_name = _peft_name(name, self._peft_names.values())
        quiet_bitsandbytes()
        from peft import PeftModel

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*deprecated and will be removed in v6.*")
            if not isinstance(self.model, PeftModel):
                self.model = PeftModel.from_pretrained(self.model, str(path), adapter_name=peft_name,
                                                       is_trainable=False)
            else:
                self.model.load_adapter(str(path), adapter_name=peft_name, is_trainable=False)
        self.model.eval()
        self._base_engine.model = self.model
        self._peft_names[name] = peft_name

    @contextlib.contextmanager
    def active(self, name: str | None) -> Iterator[None]:
        """Within the block, the model generates with adapter `name` (None: the base model alone)."""
        from peft import PeftModel

        if name is None:
            if isinstance(self.model, PeftModel):
                with self.model.disable_adapter():
                    yield
            else:
                yield
            return
        self._check_loaded(name)
        self.model.set_adapter(self._peft_names[name], inference_mode=True)
        yield

    def identity(self, name: str | None) -> str | None:
        """A stable key for generation caches: the adapter's name and the sha256 of its weights."""
        if name is None:
            return None
        info = self.infos[name]
        return f"{name}@{weights_sha256(info.path)[:16]}"

    def engine(self, name: str | None) -> AdapterEngine:
        if name is not None:
            self._check_loaded(name)
        return AdapterEngine(self, name)

    def _check_loaded(self, name: str) -> None:
        if name not in self.infos:
            raise AdapterError(f"adapter {name!r} is not loaded (loaded: {', '.join(self.names) or 'none'})")


class LlamaCppAdapterSet(AdapterSet):
    """The same contract on the llama.cpp engine: one GGUF base, GGUF LoRAs switched per batch."""

    def __init__(self, engine: Any):
        self.model = None
        self.tokenizer = engine.tokenizer
        self.resolved = engine.resolved
        self.infos = {}
        self._base_engine = engine

    @classmethod
    def load(cls, base_model: str | None = None, **engine_kwargs: Any) -> LlamaCppAdapterSet:  # type: ignore[override]
        from .engine_llamacpp import LlamaCppEngine

        return cls(LlamaCppEngine.load(base_model, **engine_kwargs))

    def _attach(self, name: str, path: Path) -> None:
        self._base_engine.add_adapter(name, path)

    @contextlib.contextmanager
    def active(self, name: str | None) -> Iterator[None]:
        if name is not None:
            self._check_loaded(name)
        self._base_engine.use_adapter(name)
        yield


class AdapterEngine:
    """An engine view of an `AdapterSet` with one adapter active (duck-types `TransformersEngine`)."""

    def __init__(self, adapter_set: AdapterSet, name: str | None):
        self.adapter_set = adapter_set
        self.adapter = name
        self.tokenizer = adapter_set.tokenizer
        self.resolved = adapter_set.resolved

    @property
    def device(self) -> Any:
        return self.adapter_set._base_engine.device

    def count_tokens(self, prompts: Sequence[str]) -> list[int]:
        return self.adapter_set._base_engine.count_tokens(prompts)

    def generate(self, prompts: Sequence[str], max_new_tokens: int = 64, batch_size: int = 8,
                 on_batch: Callable[[int], None] | None = None,
                 constraints: Sequence[Any] | None = None) -> list[Any]:
        with self.adapter_set.active(self.adapter):
            return self.adapter_set._base_engine.generate(prompts, max_new_tokens, batch_size, on_batch,
                                                          constraints=constraints)


# --- routing --------------------------------------------------------------------------------------------


@dataclass
class AdapterMap:
    """Category → adapter name, then language → adapter name; records matching neither use `default`
    (None: the base model). A record's language is its `lang` field, else detected from its text."""

    categories: dict[str, str] = field(default_factory=dict)
    default: str | None = None
    languages: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for adapter in [*self.categories.values(), *self.languages.values(), *([self.default] if self.default else [])]:
            validate_adapter_name(adapter)
        self._folded = {_fold(k): v for k, v in self.categories.items()}

    @property
    def adapter_names(self) -> list[str]:
        names = list(dict.fromkeys([*self.categories.values(), *self.languages.values()]))
        if self.default and self.default not in names:
            names.append(self.default)
        return names

    def adapter_for(self, category: str | None, lang: str | None = None) -> str | None:
        if category is not None:
            if category in self.categories:
                return self.categories[category]
            if _fold(category) in self._folded:
                return self._folded[_fold(category)]
        if lang is not None and lang in self.languages:
            return self.languages[lang]
        return self.default

    def adapter_for_record(self, record: Record) -> str | None:
        lang = record.lang or (detect_lang(record.text) if self.languages else None)
        return self.adapter_for(record.category, lang)


def _fold(text: str) -> str:
    return unicodedata.normalize("NFKC", text).casefold().strip()


def load_adapter_map(path: str | Path) -> AdapterMap:
    """Read a TOML adapter map: `[categories]` of `"category" = "adapter"`, `[languages]` of
    `zh = "adapter"`, and an optional `default`."""
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise AdapterError(f"cannot read adapter map {path}: {exc}") from exc
    unknown = set(data) - {"categories", "languages", "default"}
    if unknown:
        raise AdapterError(f"adapter map {path}: unknown key(s) {', '.join(sorted(unknown))}; "
                           "expected [categories], [languages] and default")
    tables = {}
    for key in ("categories", "languages"):
        table = data.get(key, {})
        if not isinstance(table, dict) or not all(isinstance(v, str) for v in table.values()):
            raise AdapterError(f"adapter map {path}: [{key}] must map names to adapter names")
        tables[key] = {str(k): v for k, v in table.items()}
    default = data.get("default")
    if default is not None and not isinstance(default, str):
        raise AdapterError(f"adapter map {path}: default must be an adapter name")
    return AdapterMap(tables["categories"], default or None, tables["languages"])


def route(
    records: Sequence[Record], adapter: str | None = None, adapter_map: AdapterMap | None = None
) -> dict[str | None, list[int]]:
    """Group record indices by the adapter that tags them (None: the base model), in input order."""
    if adapter is not None and adapter_map is not None:
        raise AdapterError("give either one adapter or an adapter map, not both")
    groups: dict[str | None, list[int]] = {}
    for i, record in enumerate(records):
        name = adapter_map.adapter_for_record(record) if adapter_map is not None else adapter
        groups.setdefault(name, []).append(i)
    return groups


def tag_chunks_routed(
    records: Iterable[Record],
    adapter_set: AdapterSet,
    options: Any = None,
    *,
    adapter: str | None = None,
    adapter_map: AdapterMap | None = None,
    normaliser: Any = None,
    on_batch: Callable[[int], None] | None = None,
    options_by_adapter: Mapping[str | None, Any] | None = None,
) -> Iterator[list[Any]]:
    """Like `tagger.tag_chunks`, but each record is generated with its own adapter (and that adapter's
    entry of `options_by_adapter`, else `options`: adapters may differ in template and candidates).

    Records are taken in chunks of `options.chunk_size`; within a chunk they are grouped by adapter so
    every batch runs with one adapter active, and each chunk's results come back in input order, as
    `RoutedTagResult`s that know their adapter (and, with a map, name it in their JSON line).
    """
    from .tagger import TaggingOptions, chunked, tag_chunks

    options = options or TaggingOptions()
    for chunk in chunked(records, options.chunk_size, first=options.batch_size):
        results: list[Any] = [None] * len(chunk)
        for name, indices in route(chunk, adapter, adapter_map).items():
            group = [chunk[i] for i in indices]
            # One tag_chunks call per group: a group is never larger than a chunk.
            group_options = (options_by_adapter or {}).get(name, options)
            group_results = [r for part in tag_chunks(group, adapter_set.engine(name), group_options, normaliser,
                                                      on_batch) for r in part]
            for i, result in zip(indices, group_results):
                results[i] = RoutedTagResult.of(result, name, show=adapter_map is not None)
        yield results


@dataclass
class RoutedTagResult(TagResult):
    """A TagResult and the adapter that produced it (None: the base model)."""

    adapter: str | None = None
    show_adapter: bool = False  # put "adapter" in the JSON line (when a category map routes)

    @classmethod
    def of(cls, result: TagResult, adapter: str | None, show: bool = False) -> RoutedTagResult:
        values = {f.name: getattr(result, f.name) for f in dataclasses.fields(TagResult)}
        return cls(**values, adapter=adapter, show_adapter=show)

    def to_json(self) -> dict[str, Any]:
        out = super().to_json()
        if self.show_adapter:
            out["adapter"] = self.adapter
        return out


# --- merging -----------------------------------------------------------------------------------------------


def merge_adapter(
    base: str | None,
    adapter: str | Path,
    out_dir: str | Path,
    *,
    device: str = "cpu",
    dtype: str = "auto",
    load_in_4bit: bool = False,
    force: bool = False,
    root: str | Path | None = None,
) -> Path:
    """Fold an adapter into its base model's weights and save a standalone safetensors model + tokenizer.

    The result is a plain transformers directory usable as `--base-model DIR`. Its identity is its own
    (`dir:...`), not the base model's, so adapters trained on the base are not silently applied to it.
    Merging into a 4-bit base rounds the merged weights to 4 bits: load the base in full precision.
    """
    from .models import load_model, load_tokenizer, resolve_base_model

    quiet_bitsandbytes()
    path = resolve_adapter(adapter, root)
    meta = read_metadata(path)
    resolved = resolve_base_model(base or meta.get("base_model", {}).get("spec"))
    tokenizer = load_tokenizer(resolved)
    # Merging needs the right base weights; the prompt is the merged model's user's business (recorded below).
    check_compatible(meta, resolved, None, tokenizer, force=force)
    model = load_model(resolved, device=device, dtype=dtype, load_in_4bit=load_in_4bit)
    if load_in_4bit or getattr(model, "is_loaded_in_4bit", False):
        warnings.warn(
            "merging into a 4-bit base model: the merged weights are re-quantised to 4 bits and lose the "
            "adapter's fine detail; merge into the full-precision base instead (no --load-in-4bit)",
            stacklevel=2,
        )
    quiet_bitsandbytes()
    from peft import PeftModel

    check_files(path)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*deprecated and will be removed in v6.*")
        model = PeftModel.from_pretrained(model, str(path), is_trainable=False)
    merged = model.merge_and_unload()
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise AdapterError(f"{out} exists and is not empty")
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "llmtags-merged.json").write_text(json.dumps({
        "base_model": meta.get("base_model"),
        "adapter": {"path": str(path), "sha256": weights_sha256(path)},
        "template": meta.get("template"),
        "merged_4bit": bool(load_in_4bit),
    }, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    # peft or transformers may leave pickled extras behind on some versions; a merged model is safetensors only.
    for leftover in out.glob("*.bin"):
        leftover.unlink()
    return out


def copy_adapter_files(src: str | Path, dst: str | Path) -> None:
    """Copy peft's safetensors weights and config (nothing else) from one directory to another."""
    src, dst = Path(src), Path(dst)
    check_files(src)
    dst.mkdir(parents=True, exist_ok=True)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        tmp = dst / f".{name}.tmp"
        shutil.copyfile(src / name, tmp)
        os.replace(tmp, dst / name)
