"""Training examples: each labelled record as the exact inference prompt and its answer, tokenised."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..options import TaggingOptions
from ..prompts import PromptTemplate, template_choice, template_for
from ..records import Record
from ..tagger import build_prompt

END_OF_TURN = "<|im_end|>"  # Qwen's (ChatML) end of an assistant turn: generation stops on it


def end_of_turn(tokenizer: Any) -> str:
    return END_OF_TURN if END_OF_TURN in tokenizer.get_vocab() else tokenizer.eos_token


def build_examples(
    records: Sequence[Record], tokenizer: Any, template: str | PromptTemplate = "auto", candidates: Any = None
) -> list[dict[str, str]]:
    """trl prompt/completion pairs: the inference prompt, and the template's answer + end of turn.

    The prompt is `tagger.build_prompt` with `training=True`: with `candidates` (a CandidateFinder),
    entries that only the record's own gold tags put in the vocabulary are left out, as at test time.
    Unlabelled records (tags None) are skipped; a record with an empty tag list teaches the model to
    answer nothing.
    """
    options = TaggingOptions(template=template_choice(template), candidates=candidates)
    eot = end_of_turn(tokenizer)
    examples = []
    for record in records:
        if record.tags is None:
            continue
        prompt = build_prompt(record, tokenizer, options, training=True)
        completion = template_for(record, options.template).answer(record.tags) + eot
        examples.append({"prompt": prompt, "completion": completion})
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
