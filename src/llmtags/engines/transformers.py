"""Stage 3 on transformers (`--engine transformers`): batched greedy generation with a causal LM.

Prompts are sorted by token length before batching, so each batch pads little, and results are put
back in input order. Decoding is greedy and bounded by `max_new_tokens`; it stops at the chat
template's end-of-turn token or a repeated line. Per-prompt constraints (`constrain/`) mask the tokens
a row may take, through `TagConstraintProcessor`, the logits processor that lives here because only
this engine runs torch's generate loop.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from ..constrain.grammar import repeats_a_line
from ..constrain.rows import allowed_bias, constraint_row
from ..constrain.spec import ConstraintSpec
from ..constrain.tokens import token_table
from ..models import (
    ResolvedModel,
    load_model,
    load_tokenizer,
    pick_device,
    resolve_base_model,
    warn_if_slow_dtype,
)
from .base import (
    MAX_NEW_TOKENS,
    Generation,
    PromptEncoder,
    finish_row,
    length_sorted_batches,
    newline_token_ids,
    stop_token_ids,
)


class GreedyLogprobs:
    """A logits processor placed last: records, per row and step, the log-probability of the token
    greedy decoding picks (the arg-max of the final scores). It changes no score."""

    def __init__(self) -> None:
        self.steps: list[Any] = []

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        logits = scores.float()
        self.steps.append((logits.max(dim=-1).values - torch.logsumexp(logits, dim=-1)).cpu())
        return scores

    def row(self, row: int, n: int) -> list[float]:
        return [float(step[row]) for step in self.steps[:n]]


class LoopStop:
    """A transformers stopping criterion: ends each row whose newest line repeats an earlier one.

    Only rows whose last token holds a newline are decoded, so the check costs little per step."""

    def __init__(self, tokenizer: Any, prompt_length: int):
        self.tokenizer = tokenizer
        self.prompt_length = prompt_length
        self._newline_ids = newline_token_ids(tokenizer)

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for row in range(input_ids.shape[0]):
            if int(input_ids[row, -1]) in self._newline_ids:
                text = self.tokenizer.decode(input_ids[row, self.prompt_length :], skip_special_tokens=True)
                done[row] = repeats_a_line(text)
        return done



class TransformersEngine(PromptEncoder):
    """One base model (optionally with peft adapters) and its tokenizer."""

    def __init__(self, model: Any, tokenizer: Any, resolved: ResolvedModel | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.resolved = resolved
        self.stop_token_ids = stop_token_ids(tokenizer)
        self.stop_on_repeat = True
        self._loop_stop: LoopStop | None = None
        # Extra keyword arguments for `model.generate` (e.g. prompt_lookup_num_tokens, at batch 1).
        self.generate_kwargs: dict[str, Any] = {}

    @classmethod
    def load(
        cls, base_model: str | None = None, device: str = "auto", dtype: str = "auto", load_in_4bit: bool = False
    ) -> TransformersEngine:
        resolved = resolve_base_model(base_model)
        tokenizer = load_tokenizer(resolved)
        device = pick_device(device)
        warn_if_slow_dtype(dtype, device)
        model = load_model(resolved, device=device, dtype=dtype, load_in_4bit=load_in_4bit)
        return cls(model, tokenizer, resolved)

    @property
    def device(self) -> Any:
        return self.model.device

    def generate(
        self,
        prompts: Sequence[str],
        max_new_tokens: int = MAX_NEW_TOKENS,
        batch_size: int = 8,
        on_batch: Callable[[int], None] | None = None,
        constraints: Sequence[Any] | None = None,
    ) -> list[Generation]:
        """Greedy completions of `prompts`, in input order. `on_batch(n)` is called after each batch.

        `constraints`: one `constrain.ConstraintSpec` (or None) per prompt; a batch holding any is
        decoded through a `constrain.TagConstraintProcessor`, and a row cut by `max_new_tokens` inside
        a line loses that incomplete line."""
        import torch
        from transformers import LogitsProcessorList, StoppingCriteriaList

        encoded = self.encode(prompts, constraints)
        if not encoded:
            return []
        results: list[Generation | None] = [None] * len(prompts)
        pad_id = self.tokenizer.pad_token_id
        for batch in length_sorted_batches([len(ids) for ids in encoded], batch_size):
            inputs = self.tokenizer.pad({"input_ids": [encoded[i] for i in batch]}, return_tensors="pt")
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
            stopping = StoppingCriteriaList()
            if self.stop_on_repeat:
                if self._loop_stop is None:
                    self._loop_stop = LoopStop(self.tokenizer, 0)
                self._loop_stop.prompt_length = inputs["input_ids"].shape[1]
                stopping = StoppingCriteriaList([self._loop_stop])
            processor = None
            if constraints is not None and any(constraints[i] is not None for i in batch):
                processor = TagConstraintProcessor(
                    self.tokenizer, [constraints[i] for i in batch], inputs["input_ids"].shape[1], self.stop_token_ids
                )
            recorder = GreedyLogprobs()
            processors = LogitsProcessorList([processor] if processor is not None else [])
            processors.append(recorder)
            with torch.inference_mode():
                output = self.model.generate(
                    **inputs,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    num_beams=1,
                    eos_token_id=self.stop_token_ids,
                    pad_token_id=pad_id,
                    stopping_criteria=stopping,
                    logits_processor=processors,
                    **self.generate_kwargs,
                )
            new = output[:, inputs["input_ids"].shape[1] :].tolist()
            keep = processor.finish(new) if processor is not None else [None] * len(batch)
            for row, index in enumerate(batch):
                tokens, stopped = new[row], False
                for n, token in enumerate(tokens):
                    if token in self.stop_token_ids:
                        tokens, stopped = tokens[:n], True
                        break
                logprobs = recorder.row(row, len(tokens) + 1)
                results[index] = finish_row(self.tokenizer, len(encoded[index]), tokens, logprobs,
                                            logprobs[len(tokens)] if stopped else None, keep[row])
            if on_batch:
                on_batch(len(batch))
        return [r for r in results if r is not None]


class TagConstraintProcessor:
    """A transformers logits processor (duck-typed, so importing this module does not import torch):
    one constraint state per batch row. `constraints[i]` is row i's `ConstraintSpec` (None: no
    constraint). Prompts are left-padded, so every row's generated tokens start at `prompt_length`.

    One processor serves one `generate` call; it follows each row by reading the tokens appended
    since its last call.
    """

    def __init__(
        self,
        tokenizer: Any,
        constraints: Sequence[ConstraintSpec | None],
        prompt_length: int,
        stop_ids: Iterable[int] = (),
    ):
        self.table = token_table(tokenizer)
        self.prompt_length = prompt_length
        self._seen = prompt_length
        self.rows = [None if spec is None else constraint_row(self.table, tokenizer, spec, stop_ids)
                     for spec in constraints]

    def _catch_up(self, new_tokens: Sequence[Sequence[int]], offset: int) -> None:
        for row, tokens in zip(self.rows, new_tokens):
            if row is not None:
                for token in tokens[offset:]:
                    row.advance(int(token))

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        length = input_ids.shape[1]
        if length > self._seen:
            self._catch_up(input_ids[:, self._seen : length].tolist(), 0)
            self._seen = length
        allowed = [row.allowed() if row is not None else None for row in self.rows]
        if all(a is None for a in allowed):
            return scores
        out = scores.clone()
        for r, a in enumerate(allowed):
            if a is not None:
                bias = allowed_bias(a, scores.shape[1], self.table.eos_id)
                out[r] += torch.from_numpy(bias).to(device=scores.device, dtype=scores.dtype)
        return out

    def finish(self, new_tokens: Sequence[Sequence[int]]) -> list[int | None]:
        """Follow the last generated tokens; per row, how many generated tokens to keep (None: all).
        A row that `max_new_tokens` cut inside a line keeps only its complete lines."""
        self._catch_up(new_tokens, self._seen - self.prompt_length)
        length = len(new_tokens[0]) if new_tokens else 0
        self._seen = max(self._seen, self.prompt_length + length)
        return [row.safe_length(length) if row is not None else None for row in self.rows]

    def token_ok(self, row: int, token: int) -> bool:
        """The slow reference rule for one token of one row (for tests)."""
        state = self.rows[row]
        return True if state is None else state.token_ok(token)
