"""Training examples: each labelled record as the exact inference prompt and its answer, tokenised."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from ..options import TaggingOptions
from ..prompts import Demo, PromptTemplate, render_prompt, template_choice, template_for
from ..records import GoldTag, Record
from ..retrieve import DemoPool
from ..tagger import prompt_candidates, prompt_demos, prompt_record
from .rename import pick_renames, rename_tag

END_OF_TURN = "<|im_end|>"  # Qwen's (ChatML) end of an assistant turn: generation stops on it


def end_of_turn(tokenizer: Any) -> str:
    return END_OF_TURN if END_OF_TURN in tokenizer.get_vocab() else tokenizer.eos_token


def build_examples(
    records: Sequence[Record], tokenizer: Any, template: str | PromptTemplate = "auto", candidates: Any = None,
    pool: DemoPool | None = None, retrieve: int = 0, rename: float = 0.0, seed: int = 0,
) -> list[dict[str, str]]:
    """trl prompt/completion pairs: the inference prompt, and the template's answer + end of turn.

    The prompt is the one `tagger.build_prompt` makes with `training=True`: with `candidates` (a
    CandidateFinder), entries that only the record's own gold tags put in the vocabulary are left out, as
    at test time; with `pool` and `retrieve` K, the record's K nearest pool records are its
    demonstrations (never itself: `DemoPool` skips a record of the same text). A share `rename` of the
    examples get their attributes renamed consistently in demonstrations, schema, candidates and answer
    (train/rename.py). Unlabelled records (tags None) are skipped; a record with an empty tag list teaches
    the model to answer nothing.
    """
    options = TaggingOptions(template=template_choice(template), candidates=candidates, pool=pool, retrieve=retrieve)
    eot = end_of_turn(tokenizer)
    rng = random.Random(seed)
    examples = []
    for record in records:
        if record.tags is None:
            continue
        ready = prompt_record(record, options)
        demos = list(prompt_demos(ready, options))
        offered = prompt_candidates(ready, options, training=True)
        if rename > 0 and rng.random() < rename:
            attributes = [t.partition(":")[0] for t in [*offered, *_first_forms(ready.tags)]
                          + [tag for demo in demos for tag in demo.tags]] + list(ready.schema or ())
            mapping = pick_renames(attributes, rng)
            ready = replace(ready, schema=[mapping.get(a, a) for a in ready.schema] if ready.schema else None,
                            tags=[rename_tag(t, mapping) for t in _first_forms(ready.tags)])
            demos = [Demo(d.text, [rename_tag(t, mapping) for t in d.tags]) for d in demos]
            offered = [rename_tag(t, mapping) for t in offered]
        template_used = template_for(ready, options.template)
        prompt = render_prompt(tokenizer, template_used.messages(ready, demos, offered))
        examples.append({"prompt": prompt, "completion": template_used.answer(ready.tags) + eot})
    return examples


def _first_forms(tags: Sequence[GoldTag] | None) -> list[str]:
    return [t[0] if isinstance(t, list) else t for t in tags or ()]


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
