"""What every engine promises (stage 3 of the path): greedy completions of prompts, in input order.

`Engine` is the contract the tagger relies on; `TransformersEngine`, `LlamaCppEngine`, the adapter
view `AdapterEngine` and the cache front `CachedEngine` all satisfy it (checked by a test). The helpers
here are the parts the engines share: tokenising prompts, the text offsets of tokens, the batches they
sort prompts into, and finishing one generated row into a `Generation`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

# Tags are short: 64 new tokens hold a dozen of them. The one default every engine, the tagging
# options, training's dev evaluation and the CLI share.
MAX_NEW_TOKENS = 64

# `--weights`: how llama.cpp runs the embedded 0.5B (`llamacpp.run_as`): requantised to Q8_0 (faster on
# CPU, the same F1) or as shipped. Here so that the settings can check it without loading llama.cpp.
WEIGHTS = ("q8_0", "as-is")
DEFAULT_WEIGHTS = "q8_0"

# `--engine` (generate, eval, prompt compare) and `--eval-engine` (train): `select.pick_engine` resolves auto.
ENGINE_CHOICES = ("auto", "transformers", "llama.cpp")


def scaled_adapter_key(key: str, scale: float) -> str:
    """An adapter's key in the generation cache at LoRA scale `scale` (`--adapter-scale`): its generations at
    another scale are another model's."""
    return key if scale == 1.0 else f"{key}x{scale!r}"


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    new_tokens: int
    # Per kept token: its log-probability under greedy decoding (after any constraint), and the
    # character offset in `text` where it ends; `end_logprob` is that of the token that ended the
    # reply (None when max_new_tokens cut it). They give each tag a confidence (grounding.py).
    token_logprobs: list[float] | None = None
    token_ends: list[int] | None = None
    end_logprob: float | None = None


@runtime_checkable
class Engine(Protocol):
    """Greedy generation: `generate` returns one `Generation` per prompt, in input order.

    `constraints`: one `constrain.ConstraintSpec` (or None) per prompt, enforced while decoding; a row
    cut by `max_new_tokens` inside a line loses that incomplete line. `on_batch(n)` reports progress as
    `n` more prompts finish. Decoding stops at the end-of-turn token, `max_new_tokens`, or a repeated line.
    """

    tokenizer: Any

    def generate(
        self,
        prompts: Sequence[str],
        max_new_tokens: int = MAX_NEW_TOKENS,
        batch_size: int = 8,
        on_batch: Callable[[int], None] | None = None,
        constraints: Sequence[Any] | None = None,
    ) -> list[Generation]: ...


def token_end_offsets(tokenizer: Any, tokens: Sequence[int], text: str) -> list[int]:
    """Where each token's text ends in the decoded `text`: decoding prefixes, because a Chinese
    character may span two byte-level tokens (the first then ends where the character does)."""
    ends: list[int] = []
    for i in range(1, len(tokens) + 1):
        prefix = tokenizer.decode(tokens[:i], skip_special_tokens=True).rstrip("\ufffd")
        ends.append(min(max(len(prefix), ends[-1] if ends else 0), len(text)))
    return ends


def finish_row(
    tokenizer: Any,
    prompt_tokens: int,
    tokens: Sequence[int],
    logprobs: Sequence[float],
    end_logprob: float | None,
    keep: int | None,
) -> Generation:
    """The `Generation` of one finished row.

    `tokens` are the generated tokens before the stop token, `logprobs` theirs (extra entries are
    ignored), `end_logprob` the stop token's (None when `max_new_tokens` cut the row), and `keep` how
    many tokens the row's constraint lets stand (None: all). A row cut inside a line keeps only its
    complete lines, and then has no end: its reply did not end where the model ended it.
    """
    kept = list(tokens if keep is None else tokens[:keep])
    text = tokenizer.decode(kept, skip_special_tokens=True)
    return Generation(text, prompt_tokens, len(tokens), list(logprobs[: len(kept)]),
                      token_end_offsets(tokenizer, kept, text), end_logprob if keep is None else None)


def newline_token_ids(tokenizer: Any) -> set[int]:
    """The tokens whose text holds a newline: only after one of them can a line repeat."""
    return {i for token, i in tokenizer.get_vocab().items() if "\n" in tokenizer.convert_tokens_to_string([token])}


def stop_token_ids(tokenizer: Any) -> list[int]:
    """The tokens that end a reply: the tokenizer's EOS and the chat template's end of turn."""
    end_ids = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
    return sorted(i for i in end_ids if isinstance(i, int) and i >= 0)


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length, longest first (so memory peaks early)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


class PromptEncoder:
    """What every engine does with prompts before generating: token ids from the tokenizer, with no
    special tokens added (the chat template already holds them)."""

    tokenizer: Any

    def count_tokens(self, prompts: Sequence[str]) -> list[int]:
        return [len(ids) for ids in self.encode(prompts)]

    def encode(self, prompts: Sequence[str], constraints: Sequence[Any] | None = None) -> list[list[int]]:
        if constraints is not None and len(constraints) != len(prompts):
            raise ValueError(f"{len(constraints)} constraints for {len(prompts)} prompts")
        return self.tokenizer(list(prompts), add_special_tokens=False)["input_ids"] if prompts else []
