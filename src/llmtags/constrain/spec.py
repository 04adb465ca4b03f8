"""What one record may generate: the `ConstraintSpec` (mode, text, schema, vocabulary) and its cache key."""

from __future__ import annotations

import hashlib
import json
import weakref
from dataclasses import dataclass
from typing import Any

MODES = ("free", "extract", "closed")
# Bump when the rules change: a cached generation made under other rules must miss.
RULES_VERSION = "constrain-1"

_FINGERPRINTS: weakref.WeakKeyDictionary[Any, tuple[int, str]] = weakref.WeakKeyDictionary()


def vocab_fingerprint(vocab: Any) -> str:
    """A hash of a vocabulary's tags (computed once per vocabulary object and size)."""
    cached = _FINGERPRINTS.get(vocab)
    if cached is not None and cached[0] == len(vocab):
        return cached[1]
    digest = hashlib.sha256("\n".join(sorted(e.tag for e in vocab)).encode("utf-8")).hexdigest()[:16]
    _FINGERPRINTS[vocab] = (len(vocab), digest)
    return digest


@dataclass(frozen=True, eq=False)
class ConstraintSpec:
    """What one record may generate. `text`: the product text as the prompt shows it (extract);
    `schema`: attribute names; `vocab`: a `Vocabulary` (closed)."""

    mode: str = "free"
    text: str | None = None
    schema: tuple[str, ...] | None = None
    vocab: Any = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown constraint mode {self.mode!r}: choose one of {', '.join(MODES)}")
        if self.mode == "extract" and self.text is None:
            raise ValueError("extract mode needs the record's text")
        if self.mode == "closed" and self.vocab is None:
            raise ValueError("closed mode needs a vocabulary")
        if self.schema is not None:
            object.__setattr__(self, "schema", tuple(self.schema))

    def key(self) -> str:
        """Mode and a hash of what it depends on, for generation caches."""
        payload = [
            RULES_VERSION,
            self.mode,
            self.text if self.mode == "extract" else None,
            list(self.schema) if self.schema else None,
            vocab_fingerprint(self.vocab) if self.mode == "closed" else None,
        ]
        digest = hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode("utf-8")).hexdigest()[:16]
        return f"{self.mode}:{digest}"

