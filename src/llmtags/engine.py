"""Stage 3: batched greedy generation with a transformers causal LM.

Prompts are sorted by token length before batching, so each batch pads little, and results are put
back in input order. Decoding is greedy and bounded by `max_new_tokens`; it stops at the chat
template's end-of-turn token. Per-prompt constraints (`constrain.py`) mask the tokens a row may take.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .models import ResolvedModel, load_model, load_tokenizer, pick_device, resolve_base_model


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


def token_end_offsets(tokenizer: Any, tokens: Sequence[int], text: str) -> list[int]:
    """Where each token's text ends in the decoded `text`: decoding prefixes, because a Chinese
    character may span two byte-level tokens (the first then ends where the character does)."""
    ends: list[int] = []
    for i in range(1, len(tokens) + 1):
        prefix = tokenizer.decode(tokens[:i], skip_special_tokens=True).rstrip("\ufffd")
        ends.append(min(max(len(prefix), ends[-1] if ends else 0), len(text)))
    return ends


def repeats_a_line(text: str) -> bool:
    """True when the last complete line of `text` already appeared above it: the model is looping.

    Tags come one per line, so a repeated line can only add a duplicate tag (which the parser drops
    anyway) and is the usual start of a loop that would run to `max_new_tokens`.
    """
    lines = [line.strip() for line in text.split("\n")]
    complete = [line for line in lines[:-1] if line]
    return len(complete) >= 2 and complete[-1] in complete[:-1]


def newline_token_ids(tokenizer: Any) -> set[int]:
    """The tokens whose text holds a newline: only after one of them can a line repeat."""
    return {i for token, i in tokenizer.get_vocab().items() if "\n" in tokenizer.convert_tokens_to_string([token])}


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


class TransformersEngine(PromptEncoder):
    """One base model (optionally with peft adapters) and its tokenizer."""

    def __init__(self, model: Any, tokenizer: Any, resolved: ResolvedModel | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.resolved = resolved
        end_ids = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
        self.stop_token_ids = sorted(i for i in end_ids if isinstance(i, int) and i >= 0)
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
        model = load_model(resolved, device=pick_device(device), dtype=dtype, load_in_4bit=load_in_4bit)
        return cls(model, tokenizer, resolved)

    @property
    def device(self) -> Any:
        return self.model.device

    def generate(
        self,
        prompts: Sequence[str],
        max_new_tokens: int = 64,
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
                from .constrain import TagConstraintProcessor

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
                kept = tokens if keep[row] is None else tokens[: keep[row]]
                text = self.tokenizer.decode(kept, skip_special_tokens=True)
                logprobs = recorder.row(row, len(tokens) + 1)
                end = logprobs[len(tokens)] if stopped and keep[row] is None else None
                results[index] = Generation(text, len(encoded[index]), len(tokens), logprobs[: len(kept)],
                                            token_end_offsets(self.tokenizer, kept, text), end)
            if on_batch:
                on_batch(len(batch))
        return [r for r in results if r is not None]


ENGINE_CHOICES = ("auto", "transformers", "llama.cpp")


def pick_engine(choice: str = "auto", base_model: str | None = None, device: str = "auto", dtype: str = "auto") -> str:
    """`--engine auto`: llama.cpp where it is faster (measured in eval/bench_generate.md): a GGUF base
    (the embedded models, a .gguf file) on CPU, with llama-cpp-python installed and no --dtype asked
    for. Everything else runs on transformers."""
    import importlib.util
    import os

    from .models import DEFAULT_BASE_MODEL, EMBEDDED, ModelError

    spec = base_model or os.environ.get("LLMTAGS_BASE_MODEL") or DEFAULT_BASE_MODEL
    is_gguf = spec in EMBEDDED or spec.lower().endswith(".gguf")
    if choice == "llama.cpp":
        if dtype != "auto":
            raise ModelError("--dtype applies to the transformers engine; llama.cpp runs the GGUF's own weights")
        if device not in ("auto", "cpu"):
            raise ModelError(f"--engine llama.cpp runs on CPU here, not {device}")
        return choice
    if choice != "auto":
        return choice
    if (is_gguf and dtype == "auto" and pick_device(device) == "cpu"
            and importlib.util.find_spec("llama_cpp") is not None):
        return "llama.cpp"
    return "transformers"


def load_engine(choice: str = "auto", base_model: str | None = None, device: str = "auto", dtype: str = "auto") -> Any:
    """The generation engine `--engine choice` names, loaded."""
    if pick_engine(choice, base_model, device, dtype) == "llama.cpp":
        from .engine_llamacpp import LlamaCppEngine

        return LlamaCppEngine.load(base_model)
    return TransformersEngine.load(base_model, device=device, dtype=dtype)
