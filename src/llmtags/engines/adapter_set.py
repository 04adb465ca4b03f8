"""Several adapters on one base model, loaded once: the runtime side of the adapter registry.

`AdapterSet` (transformers, peft multi-adapter) and `LlamaCppAdapterSet` (GGUF LoRAs on llama.cpp)
share one contract: `add` an adapter after checking it fits, `active(name)` switches to it, and
`engine(name)` is an `Engine` that generates with that adapter (None: the bare base model).
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ..adapters.registry import (
    AdapterError,
    AdapterInfo,
    check_compatible,
    quiet_bitsandbytes,
    read_metadata,
    resolve_adapter,
)
from ..models import (
    ResolvedModel,
    load_model,
    load_tokenizer,
    pick_device,
    resolve_base_model,
)
from ..prompts import PromptTemplate
from .base import MAX_NEW_TOKENS, Generation
from .llamacpp import LlamaCppEngine
from .transformers import TransformersEngine


def _peft_name(name: str, taken: Iterable[str]) -> str:
    """peft keeps adapters in ModuleDicts, whose keys may not contain '.'."""
    base = re.sub(r"[^A-Za-z0-9_]", "_", name) or "adapter"
    candidate, n = base, 1
    while candidate in taken:
        n += 1
        candidate = f"{base}_{n}"
    return candidate


class BaseAdapterSet:
    """The contract both adapter sets share: a base engine, loaded once, and adapters attached by name.

    Subclasses say how an adapter is attached (`_attach`) and switched to (`active`).
    """

    def __init__(self, base_engine: Any, resolved: ResolvedModel | None = None):
        self.base_engine = base_engine
        self.tokenizer = base_engine.tokenizer
        self.resolved = resolved
        self.infos: dict[str, AdapterInfo] = {}
        self.scales: dict[str, float] = {}

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
        scale: float = 1.0,
        meta: dict[str, Any] | None = None,
    ) -> str:
        """Attach an adapter (registry name or directory) after checking it fits; returns its name.
        `scale` multiplies its LoRA update whenever it is active (1: as trained; 0: the base model).
        `meta`: its llmtags.json as the caller read it, `name_or_path` then the directory it resolved (the
        run plan resolves each adapter once); else both are done here."""
        if meta is None:
            path = resolve_adapter(name_or_path, root)
            meta = read_metadata(path)
        else:
            path = Path(name_or_path)
        name = name or path.name
        if name in self.infos:
            if self.infos[name].path.resolve() == path.resolve() and self.scales[name] == scale:
                return name
            raise AdapterError(f"two different adapters (or scales) are both called {name!r}")
        if self.resolved is not None:
            check_compatible(meta, self.resolved, template, self.tokenizer, force=force)
        self._attach(name, path, scale)
        self.infos[name] = AdapterInfo(name, path, meta)
        self.scales[name] = scale
        return name

    def _attach(self, name: str, path: Path, scale: float) -> None:
        raise NotImplementedError

    def active(self, name: str | None) -> contextlib.AbstractContextManager[None]:
        """Within the block, the model generates with adapter `name` (None: the base model alone)."""
        raise NotImplementedError

    def engine(self, name: str | None) -> AdapterEngine:
        """An `Engine` that generates with adapter `name` active (None: the bare base model)."""
        if name is not None:
            self._check_loaded(name)
        return AdapterEngine(self, name)

    def _check_loaded(self, name: str) -> None:
        if name not in self.infos:
            raise AdapterError(f"adapter {name!r} is not loaded (loaded: {', '.join(self.names) or 'none'})")


class AdapterSet(BaseAdapterSet):
    """A transformers base model with peft LoRA adapters (peft multi-adapter)."""

    def __init__(self, model: Any, tokenizer: Any, resolved: ResolvedModel | None = None):
        super().__init__(TransformersEngine(model, tokenizer, resolved), resolved)
        self.model = model
        self._peft_names: dict[str, str] = {}

    @classmethod
    def load(
        cls, base_model: str | None = None, device: str = "auto", dtype: str = "auto", load_in_4bit: bool = False
    ) -> AdapterSet:
        quiet_bitsandbytes()
        resolved = resolve_base_model(base_model)
        tokenizer = load_tokenizer(resolved)
        model = load_model(resolved, device=pick_device(device), dtype=dtype, load_in_4bit=load_in_4bit)
        return cls(model, tokenizer, resolved)

    def _attach(self, name: str, path: Path, scale: float) -> None:
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
        if scale != 1.0:
            from peft.tuners.lora import LoraLayer

            for module in self.model.modules():
                if isinstance(module, LoraLayer):
                    module.set_scale(peft_name, scale)  # its scaling, alpha / r, times `scale`
        self.base_engine.model = self.model
        self._peft_names[name] = peft_name

    @contextlib.contextmanager
    def active(self, name: str | None) -> Iterator[None]:
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


class LlamaCppAdapterSet(BaseAdapterSet):
    """The same contract on the llama.cpp engine: one GGUF base, GGUF LoRAs switched per batch."""

    def __init__(self, engine: LlamaCppEngine):
        super().__init__(engine, engine.resolved)
        self.model = None

    @classmethod
    def load(cls, base_model: str | None = None, **engine_kwargs: Any) -> LlamaCppAdapterSet:
        return cls(LlamaCppEngine.load(base_model, **engine_kwargs))

    def _attach(self, name: str, path: Path, scale: float) -> None:
        self.base_engine.add_adapter(name, path)

    @contextlib.contextmanager
    def active(self, name: str | None) -> Iterator[None]:
        if name is not None:
            self._check_loaded(name)
        self.base_engine.use_adapter(name, self.scales[name] if name is not None else 1.0)
        yield


class AdapterEngine:
    """An `Engine` view of an adapter set with one adapter active."""

    def __init__(self, adapter_set: BaseAdapterSet, name: str | None):
        self.adapter_set = adapter_set
        self.adapter = name
        self.tokenizer = adapter_set.tokenizer
        self.resolved = adapter_set.resolved

    @property
    def device(self) -> Any:
        return self.adapter_set.base_engine.device

    def count_tokens(self, prompts: Sequence[str]) -> list[int]:
        return self.adapter_set.base_engine.count_tokens(prompts)

    def generate(self, prompts: Sequence[str], max_new_tokens: int = MAX_NEW_TOKENS, batch_size: int = 8,
                 on_batch: Callable[[int], None] | None = None,
                 constraints: Sequence[Any] | None = None) -> list[Generation]:
        with self.adapter_set.active(self.adapter):
            return self.adapter_set.base_engine.generate(prompts, max_new_tokens, batch_size, on_batch,
                                                         constraints=constraints)
