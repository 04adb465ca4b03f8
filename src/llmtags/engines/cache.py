"""A persistent cache of generations, so re-running one changed prompt template regenerates only it.

The key is the exact prompt string (which already holds the template, the record, the demonstrations
and the chat template), plus the model's identity, the adapter and the decoding settings. The store is
one SQLite file in the llmtags cache directory.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .base import MAX_NEW_TOKENS, Generation

# Bump when the decoding rule changes (it changes what a prompt generates), so stale entries miss.
DECODING = "greedy, stop at end of turn or a repeated line"


def generation_key(
    prompt: str, model_identity: str, adapter: str | None, max_new_tokens: int, extra: str | None = None
) -> str:
    """`extra`: anything else that changes what the prompt generates (a constraint's `key()`); keys
    without it are those of earlier versions, so unconstrained entries stay valid."""
    fields: list[Any] = [DECODING, model_identity, adapter, max_new_tokens, prompt]
    if extra is not None:
        fields.append(extra)
    payload = json.dumps(fields, ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def _constraint_key(constraint: Any) -> str | None:
    return constraint.key() if constraint is not None else None


class GenerationCache:
    def __init__(self, path: str | Path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(path))
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS generations (key TEXT PRIMARY KEY, text TEXT, prompt_tokens INT,"
            " new_tokens INT, seconds REAL, token_info TEXT)"
        )
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(generations)")}
        if "token_info" not in columns:  # a cache written before tags had confidences
            self.db.execute("ALTER TABLE generations ADD COLUMN token_info TEXT")

    def get(self, key: str) -> tuple[Generation, float] | None:
        """The stored generation; entries without token log-probabilities (older versions) miss, so
        every cached result can give its tags a confidence."""
        row = self.db.execute(
            "SELECT text, prompt_tokens, new_tokens, seconds, token_info FROM generations WHERE key = ?", (key,)
        ).fetchone()
        if not row or row[4] is None:
            return None
        info = json.loads(row[4])
        return Generation(row[0], row[1], row[2], info["logprobs"], info["ends"], info["end"]), row[3]

    def put(self, key: str, generation: Generation, seconds: float) -> None:
        info = {"logprobs": generation.token_logprobs, "ends": generation.token_ends, "end": generation.end_logprob}
        self.db.execute(
            "INSERT OR REPLACE INTO generations (key, text, prompt_tokens, new_tokens, seconds, token_info)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (key, generation.text, generation.prompt_tokens, generation.new_tokens, seconds, json.dumps(info)),
        )
        self.db.commit()


class CachedEngine:
    """An engine front that answers from the cache and loads the real engine only on a miss.

    `seconds` records, per prompt, the generation time it cost when it was generated (its batch's
    time shared evenly), so reports of time per product stay true on cached re-runs.
    """

    def __init__(
        self,
        tokenizer: Any,
        load_engine: Callable[[], Any],
        cache: GenerationCache,
        model_identity: str,
        adapter: str | None = None,
    ):
        self.tokenizer = tokenizer
        self._load_engine = load_engine
        self._engine: Any = None
        self.cache = cache
        self.model_identity = model_identity
        self.adapter = adapter
        self.seconds: dict[str, float] = {}
        self.misses = 0

    def generate(
        self,
        prompts: Sequence[str],
        max_new_tokens: int = MAX_NEW_TOKENS,
        batch_size: int = 8,
        on_batch: Callable[[int], None] | None = None,
        constraints: Sequence[Any] | None = None,
    ) -> list[Generation]:
        """Like `TransformersEngine.generate`; a prompt's constraint (mode and a hash of what it
        depends on) is part of its cache key."""
        extras = [_constraint_key(c) for c in constraints] if constraints is not None else [None] * len(prompts)
        keys = [generation_key(p, self.model_identity, self.adapter, max_new_tokens, extra)
                for p, extra in zip(prompts, extras)]
        results: list[Generation | None] = []
        for key in keys:
            hit = self.cache.get(key)
            results.append(hit[0] if hit else None)
            if hit:
                self.seconds[key] = hit[1]
        if on_batch and any(r is not None for r in results):
            on_batch(sum(r is not None for r in results))
        missing = [i for i, r in enumerate(results) if r is None]
        if missing and self._engine is None:
            self._engine = self._load_engine()
        # Misses go to the engine one batch at a time, longest first as the engine would order them,
        # and each batch is stored at once: a run killed midway keeps all it finished.
        missing.sort(key=lambda i: -len(prompts[i]))
        for start in range(0, len(missing), batch_size):
            batch = missing[start : start + batch_size]
            began = time.perf_counter()
            kwargs: dict[str, Any] = {}
            if constraints is not None and any(constraints[i] is not None for i in batch):
                kwargs["constraints"] = [constraints[i] for i in batch]
            generated = self._engine.generate(
                [prompts[i] for i in batch], max_new_tokens=max_new_tokens, batch_size=batch_size, on_batch=on_batch,
                **kwargs,
            )
            per_prompt = (time.perf_counter() - began) / len(batch)
            self.misses += len(batch)
            for i, generation in zip(batch, generated):
                results[i] = generation
                self.seconds[keys[i]] = per_prompt
                self.cache.put(keys[i], generation, per_prompt)
        return [r for r in results if r is not None]

    def seconds_for(self, prompt: str, max_new_tokens: int, constraint: Any = None) -> float:
        key = generation_key(prompt, self.model_identity, self.adapter, max_new_tokens, _constraint_key(constraint))
        return self.seconds.get(key, 0.0)
