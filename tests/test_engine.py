"""The generate path on the tiny random model: batching, padding and order."""

from llmtags.engines.base import length_sorted_batches
from llmtags.records import Record
from llmtags.options import TaggingOptions
from llmtags.tagger import build_prompt, tag_records

TEXTS = [
    "理肤泉特护清盈防晒霜SPF50+ 30ml 敏感肌适用",
    "Diesel Men's Exposure High-Top Sneaker",
    "耐克",
    "KitchenAid Artisan 5-Quart Tilt-Head Stand Mixer KSM150PSER, Empire Red, with a much longer tail of words",
    "得力deli 0.5mm 中性笔 黑色 12支装",
    "LEGO 75257",
    "宜家 IKEA 毕利 书架 白色 80x28x202厘米 实木贴面 很长很长的描述文字",
]


def test_length_sorted_batches_cover_every_index_once():
    batches = length_sorted_batches([5, 1, 9, 3, 7], 2)
    assert batches == [[2, 4], [0, 3], [1]]
    assert length_sorted_batches([], 4) == []


def test_batched_generation_equals_one_at_a_time_in_input_order(tiny_engine):
    prompts = [build_prompt(Record(str(i), t), tiny_engine.tokenizer, TaggingOptions()) for i, t in enumerate(TEXTS)]
    single = [tiny_engine.generate([p], max_new_tokens=12, batch_size=1)[0] for p in prompts]
    batched = tiny_engine.generate(prompts, max_new_tokens=12, batch_size=3)
    assert [g.text for g in batched] == [g.text for g in single]
    assert [g.prompt_tokens for g in batched] == [g.prompt_tokens for g in single]
    # A random model's outputs differ between prompts, so equality above really checks the order.
    assert len({g.text for g in single}) > 1
    assert all(g.new_tokens <= 12 for g in batched)


def test_padding_is_on_the_left(tiny_engine):
    assert tiny_engine.tokenizer.padding_side == "left"


def test_tag_records_streams_in_order_across_chunks(tiny_engine):
    records = [Record(f"r{i}", t) for i, t in enumerate(TEXTS * 2)]
    options = TaggingOptions(max_new_tokens=8, batch_size=4, chunk_size=3)
    results = list(tag_records(records, tiny_engine, options))
    assert [r.record.id for r in results] == [r.id for r in records]
    # Identical texts get identical outputs, wherever batching put them.
    assert [r.raw for r in results[: len(TEXTS)]] == [r.raw for r in results[len(TEXTS) :]]


def test_first_chunk_is_one_batch():
    from llmtags.tagger import chunked

    assert [len(c) for c in chunked(range(20), 8, first=3)] == [3, 8, 8, 1]
    assert [len(c) for c in chunked(range(20), 8)] == [8, 8, 4]
    assert [len(c) for c in chunked(range(2), 8, first=3)] == [2]


def test_long_text_is_truncated_before_prompting(tiny_engine):
    options = TaggingOptions(max_new_tokens=4, max_text_chars=50)
    long_record = Record("long", "长" * 100_000)
    prompt = build_prompt(long_record, tiny_engine.tokenizer, options)
    assert prompt.count("长") == 50
    (result,) = list(tag_records([long_record], tiny_engine, options))
    assert result.truncated and result.prompt_tokens < 200


def test_repeats_a_line():
    from llmtags.constrain.grammar import repeats_a_line

    assert repeats_a_line("品牌:A\n产品词:B\n品牌:A\n")
    assert not repeats_a_line("品牌:A\n产品词:B\n品牌:A")  # the last line is not complete yet
    assert not repeats_a_line("品牌:A\n产品词:B\n")
    assert not repeats_a_line("品牌:A\n\n产品词:B\n")


def test_loop_stop_ends_only_the_looping_row(tiny_engine):
    import torch

    from llmtags.engines.transformers import LoopStop

    tokenizer = tiny_engine.tokenizer
    prompt = tokenizer("prompt", add_special_tokens=False)["input_ids"]
    looping = tokenizer("A:1\nB:2\nA:1\n", add_special_tokens=False)["input_ids"]
    fine = tokenizer("A:1\nB:2\nC:1\n", add_special_tokens=False)["input_ids"]
    assert len(looping) == len(fine)
    rows = [prompt + r for r in (looping, fine)]
    stop = LoopStop(tokenizer, prompt_length=len(prompt))
    done = stop(torch.tensor(rows), None)
    assert done.tolist() == [True, False]
