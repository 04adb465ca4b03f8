"""Training examples: each labelled record as the exact inference prompt and its answer, tokenised."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from ..options import TaggingOptions
from ..prompts import PromptTemplate, template_choice, template_for
from ..records import Record
from ..retrieve import DemoPool
from ..tagger import prompt_parts, render_parts
from .rename import rename_parts

END_OF_TURN = "<|im_end|>"  # Qwen's (ChatML) end of an assistant turn: generation stops on it


def end_of_turn(tokenizer: Any) -> str:
    return END_OF_TURN if END_OF_TURN in tokenizer.get_vocab() else tokenizer.eos_token


def build_examples(
    records: Sequence[Record], tokenizer: Any, template: str | PromptTemplate = "auto", candidates: Any = None,
    pool: DemoPool | None = None, retrieve: int = 0, rename: float = 0.0, seed: int = 0, proposer: Any = None,
    demo_text: str = "full", text_budget: int | None = None,
) -> list[dict[str, str]]:
    """trl prompt/completion pairs: the inference prompt, and the template's answer + end of turn.

    The prompt is the one `tagger.build_prompt` makes with `training=True`: with `candidates` (a
    CandidateFinder), entries that only the record's own gold tags put in the vocabulary are left out, as
    at test time; with `pool` and `retrieve` K, the record's K nearest pool records are its
    demonstrations (never itself: `DemoPool` skips a record of the same text). A share `rename` of the
    examples get their attributes renamed consistently in demonstrations, schema, candidates and answer
    (train/rename.py). With `proposer` (a `proposer.CrossFitted`), each example shows the spans of the CRF
    trained without its record. `demo_text` and `text_budget`: the prompt budget (budget.py), as
    generate's. Unlabelled records (tags None) are skipped; a record with an empty tag list
    teaches the model to answer nothing.
    """
    options = TaggingOptions(template=template_choice(template), candidates=candidates, pool=pool, retrieve=retrieve,
                             proposer=proposer, demo_text=demo_text, text_budget=text_budget)
    eot = end_of_turn(tokenizer)
    rng = random.Random(seed)
    examples = []
    for record in records:
        if record.tags is None:
            continue
        parts = prompt_parts(record, options, training=True)
        if rename > 0 and rng.random() < rename:
            parts = rename_parts(parts, rng)
        answer = template_for(parts.record, options.template).answer(parts.record.tags or [])
        examples.append({"prompt": render_parts(parts, tokenizer, options), "completion": answer + eot})
    return examples


def tokenize_examples(examples: Sequence[dict[str, str]], tokenizer: Any) -> list[dict[str, list[int]]]:
    """Token ids of prompt + completion, and trl's `completion_mask` (1 on the completion).

    The prompt is tokenised alone, exactly as `engine.TransformersEngine` tokenises it for generation
    (no special tokens added: the chat template already holds them), so training sees the very tokens
    inference feeds the model. trl's SFTTrainer turns the mask into labels (-100 on the prompt) under
    `completion_only_loss`. (Tokenising here rather than in trl also spares trl's dataset fingerprint,
    which pickles the whole tokenizer: several seconds a run on a small CPU.)
    """
    prompts = tokenizer([e["prompt"] for e in examples], add_special_tokens=False)["input_ids"]
    completions = tokenizer([e["completion"] for e in examples], add_special_tokens=False)["input_ids"]
    return [
        {"input_ids": list(p) + list(c), "completion_mask": [0] * len(p) + [1] * len(c)}
        for p, c in zip(prompts, completions)
    ]
