"""Constrained decoding (constrain.py) on the tiny random model.

The random model writes garbage, so whatever shape its output has comes from the constraint alone: ideal
for checking that the constraint holds. Where a test needs the model to "want" a particular answer, a
teacher logits processor (placed before the constraint) pushes a scripted token sequence.
"""

from __future__ import annotations

import json
import random
import time

import pytest

from llmtags.constrain.spec import ConstraintSpec
from llmtags.constrain.tokens import TokenTable, token_table
from llmtags.engines.transformers import TagConstraintProcessor
from llmtags.metrics import split_tag
from llmtags.parse import clean_tag
from llmtags.records import Record
from llmtags.options import TaggingOptions
from llmtags.tagger import build_prompt, tag_records
from llmtags.vocab import Vocabulary

# zh and en, with rare CJK characters that Qwen's tokenizer splits into byte tokens (龘 靐 齉 𠀀 𪚥).
TEXTS = [
    "理肤泉特护清盈防晒霜SPF50+ 30ml 敏感肌适用",
    "Diesel Men's Exposure High-Top Sneaker, Black/Red",
    "耐克",
    "得力deli 0.5mm 中性笔 黑色 12支装",
    "LEGO 75257 千年隼",
    "宜家 IKEA 毕利 书架 白色 80x28x202厘米",
    "兰蔻小黑瓶精华肌底液 50ml",
    "Apple iPhone 15 Pro Max 256GB 钛金属",
    "龘靐齉 乐扣乐扣 保鲜盒 3件套",
    "𠀀𪚥 Nike Air Max 270 React 男款跑鞋",
]
SCHEMA = ["品牌", "产品词", "型号"]


@pytest.fixture(scope="module")
def tok(tiny_engine):
    return tiny_engine.tokenizer


@pytest.fixture(scope="module")
def table(tok):
    return token_table(tok)


def _prompts(tok, texts=TEXTS):
    return [build_prompt(Record(str(i), t), tok, TaggingOptions()) for i, t in enumerate(texts)]


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def _processor(tok, specs, prompt_length=3):
    return TagConstraintProcessor(tok, specs, prompt_length)


def _feed(processor, row, ids):
    for i in ids:
        processor.rows[row].advance(i)


def _allowed_set(processor, row):
    """The fast path's allowed tokens for a row, as a set (None: unconstrained)."""
    import numpy as np

    allowed = processor.rows[row].allowed()
    if allowed is None:
        return None
    mask, ids = allowed
    found = set(ids)
    if mask is not None:
        found |= set(np.flatnonzero(mask).tolist())
    return found


def _complete_lines(raw):
    return [line for line in raw.split("\n") if line.strip()]


def _synthetic_vocab(n, seed=0):
    rng = random.Random(seed)
    attributes = ["品牌", "产品词", "型号", "颜色", "材质", "风格", "适用人群", "功能", "规格", "系列",
                  "Brand", "Color", "Material", "Size", "Style"]
    chars = "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种面而" \
            "方后多定行学法所民得经十三之进着等部度家电力里如水化高自二理起小物现实加量都两体制机当使点从业本去把性好"
    words = ["Pro", "Max", "Ultra", "Air", "Plus", "Mini", "Lite", "Sport", "Classic", "Neo", "Prime", "Edge"]
    units = ["ml", "g", "kg", "cm", "mm", "GB", "W", "支装", "件套"]
    vocab = Vocabulary()
    while len(vocab) < n:
        r = rng.random()
        if r < 0.4:
            value = "".join(rng.choice(chars) for _ in range(rng.randint(2, 6)))
        elif r < 0.7:
            value = " ".join(rng.choice(words) for _ in range(rng.randint(1, 3)))
            value += f" {rng.randint(1, 999)}" if rng.random() < 0.5 else ""
        else:
            value = f"{rng.randint(1, 2000)}{rng.choice(units)}"
        if rng.random() < 0.05:
            value += "(US)"  # ends in ')': its line ends in the token ')\n'
        vocab.add(f"{rng.choice(attributes)}:{value}")
    return vocab


class Teacher:
    """A logits processor that makes the model want `script` (token ids), then EOS."""

    def __init__(self, script, prompt_length, eos):
        self.script = list(script) + [eos]
        self.prompt_length = prompt_length

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1] - self.prompt_length
        if step < len(self.script):
            scores = scores.clone()
            scores[:, self.script[step]] += 1e4
        return scores


def _generate(engine, prompt, processors, max_new_tokens=40):
    import torch
    from transformers import LogitsProcessorList

    tok = engine.tokenizer
    enc = tok(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        out = engine.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                    eos_token_id=engine.stop_token_ids, pad_token_id=tok.pad_token_id,
                                    logits_processor=LogitsProcessorList(processors))
    tokens = out[0, enc["input_ids"].shape[1]:].tolist()
    for n, t in enumerate(tokens):
        if t in engine.stop_token_ids:
            return tokens[:n]
    return tokens


# --- the token table ------------------------------------------------------------------------------------


def test_token_table_holds_the_exact_bytes_of_every_token(tok):
    started = time.perf_counter()
    table = TokenTable(tok)
    seconds = time.perf_counter() - started
    print(f"\ntoken table: {seconds:.2f} s for {table.size} ids")
    for text in TEXTS + ["品牌:兰蔻\n型号:50ml\n", "  spaces\t and tabs"]:
        assert b"".join(table.token_bytes[i] for i in _ids(tok, text)) == text.encode()
    # Rare characters are split into byte tokens that are not valid UTF-8 alone.
    pieces = [table.token_bytes[i] for i in _ids(tok, "龘")]
    assert len(pieces) > 1 and b"".join(pieces) == "龘".encode()
    for special in ("<|im_end|>", "<|im_start|>", "<|endoftext|>"):
        assert table.token_bytes[tok.convert_tokens_to_ids(special)] is None
    assert table.eos_id == tok.convert_tokens_to_ids("<|im_end|>")
    assert token_table(tok) is token_table(tok)  # built once per tokenizer
    assert seconds < 10


# --- the fast path against the reference rule -------------------------------------------------------------


def test_fast_path_agrees_with_the_reference_rule(tok, table):
    """At many states, the allowed set (precomputed lookups and masks) equals the per-token rule."""
    text = "兰蔻小黑瓶 50ml 龘靐 Black, Red"
    vocab = Vocabulary.loads("品牌:兰蔻\n品牌:兰芝\n颜色:红(US)\n型号:50ml\n产品词:小黑瓶精华\n")
    cases = [
        (ConstraintSpec("extract", text=text), ["", "品", "品牌", "品牌:", "品牌: ", "品牌:兰", "品牌:兰蔻",
                                                 "颜色: Black", "a b", "品牌:兰蔻\n"]),
        (ConstraintSpec("extract", text=text, schema=("品牌", "型号")), ["", "品", "品牌:", "型号:5", "型号:50ml\n"]),
        (ConstraintSpec("free", schema=("品牌", "颜色")), ["", "颜", "品牌:", "品牌:anything"]),
        (ConstraintSpec("closed", vocab=vocab), ["", "品牌", "品牌:兰", "颜色:红(US", "品牌:兰蔻\n"]),
        (ConstraintSpec("closed", vocab=vocab, schema=("品牌",)), ["", "品牌:兰蔻\n"]),
    ]
    rng = random.Random(0)
    sample = rng.sample(range(table.size), 6000)
    checked = 0
    for spec, prefixes in cases:
        for prefix in prefixes:
            processor = _processor(tok, [spec])
            _feed(processor, 0, _ids(tok, prefix))
            fast = _allowed_set(processor, 0)
            assert fast is not None and fast, (spec.mode, prefix)
            for token in fast:
                assert processor.token_ok(0, token), (spec.mode, prefix, token, table.token_bytes[token])
            for token in sample:
                assert (token in fast) == processor.token_ok(0, token), (spec.mode, prefix, table.token_bytes[token])
            checked += 1
    # Mid-character states: the first byte token of a rare character, in a value and in an attribute.
    first_byte = _ids(tok, "龘")[0]
    for spec, prefix in [(ConstraintSpec("extract", text=text), "品牌:"), (ConstraintSpec("extract", text=text), "")]:
        processor = _processor(tok, [spec])
        _feed(processor, 0, _ids(tok, prefix) + [first_byte])
        fast = _allowed_set(processor, 0)
        assert table.eos_id not in fast  # no list ends inside a character
        assert {t for t in range(table.size) if processor.token_ok(0, t)} == fast
        checked += 1
    assert checked == 28


# --- extract ------------------------------------------------------------------------------------------------


def test_extract_values_are_spans_of_the_text(tiny_engine):
    records = [Record(str(i), t, schema=SCHEMA if i % 3 == 0 else None) for i, t in enumerate(TEXTS)]
    options = TaggingOptions(max_new_tokens=40, batch_size=5, constrain="extract")
    results = list(tag_records(records, tiny_engine, options))
    n_tags = 0
    for result in results:
        text = result.record.text
        for tag in result.tags:
            assert split_tag(tag)[1] in text, (text, result.raw)
            n_tags += 1
        for line in _complete_lines(result.raw):
            attribute, _, value = line.partition(":")
            assert attribute.strip() and value.lstrip(" ") in text, (text, line)
    assert n_tags >= len(TEXTS)  # the constraint shaped real tags out of garbage


def test_extract_writes_a_rare_character_byte_by_byte(tok, table):
    text = "龘靐齉 保鲜盒"
    processor = _processor(tok, [ConstraintSpec("extract", text=text)])
    _feed(processor, 0, _ids(tok, "产品词:"))
    pieces = _ids(tok, "龘")
    for piece in pieces:
        allowed = _allowed_set(processor, 0)
        assert piece in allowed and table.eos_id not in allowed  # no value is empty or ends mid-character
        processor.rows[0].advance(piece)
    assert table.eos_id in _allowed_set(processor, 0)  # "龘" is a whole span now
    assert _ids(tok, "鱻")[0] not in _allowed_set(processor, 0)  # not in the text
    # A continuation byte that would make "龘" + something absent from the text is refused.
    processor = _processor(tok, [ConstraintSpec("extract", text=text)])
    _feed(processor, 0, _ids(tok, "产品词:") + pieces[:1])
    wrong = [t for t in table.cont_start if table.token_bytes[t] != table.token_bytes[pieces[1]]][:50]
    assert not any(processor.token_ok(0, t) for t in wrong)


# --- closed ---------------------------------------------------------------------------------------------------


def test_closed_lines_are_vocabulary_entries_with_100k_entries(tiny_engine, tok, table):
    vocab = _synthetic_vocab(100_000)
    started = time.perf_counter()
    trie = table.trie(tok, vocab)
    build = time.perf_counter() - started
    records = [Record(str(i), t, schema=["品牌", "颜色", "Brand"] if i % 2 else None) for i, t in enumerate(TEXTS)]
    options = TaggingOptions(max_new_tokens=40, batch_size=5, constrain="closed", constrain_vocab=vocab)
    started = time.perf_counter()
    results = list(tag_records(records, tiny_engine, options))
    generate = time.perf_counter() - started
    tokens = sum(r.new_tokens for r in results)
    print(f"\nclosed, {len(trie)} entries: trie {trie.n_nodes} nodes, {trie.nbytes() / 1e6:.1f} MB of arrays, built in "
          f"{build:.1f} s; "
          f"{len(records)} records, {tokens} tokens generated in {generate:.2f} s")
    lines = 0
    for result in results:
        for line in _complete_lines(result.raw):
            assert line in vocab, line
            lines += 1
        assert all(tag in vocab for tag in result.tags)
        if result.record.schema:
            assert all(split_tag(tag)[0] in result.record.schema for tag in result.tags)
    assert lines >= 3
    assert build < 60 and trie.nbytes() < 100e6


def test_closed_follows_the_canonical_tokenization_across_lines(tiny_engine, tok, table):
    """A model that wants a list of vocabulary tags gets exactly it; one tag outside the vocabulary is
    replaced by entries, and the list never leaves the vocabulary."""
    prompt = _prompts(tok)[0]
    length = len(_ids(tok, prompt))
    answer = "颜色:红(US)\n品牌:兰蔻\n型号:50ml"  # ')\n' is one token: the trie's line end
    script = _ids(tok, answer)
    vocab = Vocabulary.loads("品牌:兰蔻\n品牌:兰蔻精华\n型号:50ml\n型号:50\n颜色:红(US)\n颜色:红\n")
    teacher = lambda: Teacher(script, length, table.eos_id)  # noqa: E731
    unconstrained = _generate(tiny_engine, prompt, [teacher()])
    assert tok.decode(unconstrained) == answer
    closed = _processor(tok, [ConstraintSpec("closed", vocab=vocab)], length)
    assert _generate(tiny_engine, prompt, [teacher(), closed]) == unconstrained
    extract = _processor(tok, [ConstraintSpec("extract", text="兰蔻 50ml 红(US)", schema=("颜色", "品牌", "型号"))],
                         length)
    assert _generate(tiny_engine, prompt, [teacher(), extract]) == unconstrained
    # Without 型号:50ml in the vocabulary, the model's wish is bent onto entries.
    smaller = Vocabulary.loads("品牌:兰蔻\n型号:50\n颜色:红(US)\n")
    closed = _processor(tok, [ConstraintSpec("closed", vocab=smaller)], length)
    text = tok.decode(_generate(tiny_engine, prompt, [teacher(), closed]))
    assert text != answer and all(line in smaller for line in _complete_lines(text))


# --- constrained greedy = unconstrained greedy when the latter already obeys ---------------------------------


def _greedy(engine, prompt, n):
    return _generate(engine, prompt, [], max_new_tokens=n)


def test_closed_greedy_equals_unconstrained_greedy_when_it_obeys(tiny_engine, tok):
    """The raw random model's own output, made a vocabulary entry (with distractors sharing its
    prefixes), is reproduced token for token under the closed constraint."""
    found = 0
    for prompt in _prompts(tok):
        tokens = _greedy(tiny_engine, prompt, 12)
        for k in range(len(tokens), 2, -1):
            line = tok.decode(tokens[:k])
            if line == line.strip() and "\n" not in line and "\ufffd" not in line and _ids(tok, line) == tokens[:k]:
                break
        else:
            continue
        vocab = Vocabulary([])
        for tag in [line, line[:-1] + "X", line[: len(line) // 2], line[: len(line) // 2] + "品牌", "品牌:兰蔻"]:
            if tag.strip():
                vocab.add(tag)
        (constrained,) = tiny_engine.generate([prompt], max_new_tokens=k,
                                              constraints=[ConstraintSpec("closed", vocab=vocab)])
        assert constrained.text == line
        found += 1
    assert found >= 3


def _attr_value_prefix(tok, tokens):
    """The longest prefix of `tokens` that is complete `attribute:value` lines (attributes trimmed, no
    duplicates), or a last line cut after a non-empty value: (k, attributes, values) or None."""
    for k in range(len(tokens), 1, -1):
        text = tok.decode(tokens[:k])
        if "\ufffd" in text or any(ch in text for ch in "\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"):
            continue
        lines = text.split("\n")
        if any(not line for line in lines[:-1]):
            continue
        pairs = [line.partition(":") for line in lines if line]
        if not pairs or any(not sep or a != a.strip() or not a or not v.lstrip(" ") for a, sep, v in pairs):
            continue
        keys = [clean_tag(line).casefold() for line in lines if line]
        if len(set(keys)) != len(keys):
            continue
        return k, [a for a, _, _ in pairs], [v.lstrip(" ") for _, _, v in pairs]
    return None


def test_extract_greedy_equals_unconstrained_greedy_when_it_obeys(tiny_engine, tok):
    """Where the raw model happens to write `attribute:value` lines, a record whose text holds those
    values (and whose schema holds those attributes) reproduces them exactly under extract and free."""
    found = 0
    for prompt in _prompts(tok):
        tokens = _greedy(tiny_engine, prompt, 48)
        hit = _attr_value_prefix(tok, tokens)
        if hit is None:
            continue
        k, attributes, values = hit
        expected = tok.decode(tokens[:k])
        text = " | ".join(values)
        for spec in (ConstraintSpec("extract", text=text, schema=tuple(attributes)),
                     ConstraintSpec("free", schema=tuple(attributes))):
            (constrained,) = tiny_engine.generate([prompt], max_new_tokens=k, constraints=[spec])
            assert constrained.text == expected, spec.mode
        found += 1
    assert found >= 1


# --- schema, repetition, no dead ends -------------------------------------------------------------------------


def test_a_schema_limits_attribute_names_in_every_mode(tiny_engine):
    vocab = Vocabulary.loads("品牌:耐克\n品牌:Nike\n产品词:跑鞋\n颜色:黑色\n型号:75257\nColor:Black\n")
    for constrain in ("free", "extract", "closed"):
        records = [Record(str(i), t, schema=SCHEMA) for i, t in enumerate(TEXTS)]
        options = TaggingOptions(max_new_tokens=24, batch_size=5, constrain=constrain, constrain_vocab=vocab)
        lines = [line for r in tag_records(records, tiny_engine, options) for line in _complete_lines(r.raw)]
        assert lines, constrain
        assert all(line.partition(":")[0] in SCHEMA for line in lines), (constrain, lines)


def test_a_repeated_tag_forces_eos(tok, table):
    import torch

    eos = {table.eos_id}
    free, extract = ConstraintSpec("free"), ConstraintSpec("extract", text="1 2 3")
    closed = ConstraintSpec("closed", vocab=Vocabulary.loads("A:1\nA:2\nB:2\n"))
    prompt = _ids(tok, "prompt")

    def finite_after(spec, answer):
        processor = _processor(tok, [spec], len(prompt))
        scores = processor(torch.tensor([prompt + _ids(tok, answer)]), torch.zeros((1, len(tok))))
        return set(torch.isfinite(scores[0]).nonzero().flatten().tolist())

    assert finite_after(free, "A:1\nB:2\nA:1\n") == eos  # a repeated line ends the list
    assert len(finite_after(free, "A:1\nB:2\nC:1\n")) > 100_000  # a free row without a schema is not constrained
    assert finite_after(extract, "A:1\nB:2\nA: 1\n") == eos  # the same tag spelled differently is a repeat too
    others = finite_after(extract, "A:1\nB:2\nC: 3\n")
    assert others != eos and table.eos_id in others
    # closed: the path to a tag already written is closed, the others stay open.
    processor = _processor(tok, [closed])
    _feed(processor, 0, _ids(tok, "A:1\n"))
    assert processor.token_ok(0, _ids(tok, "A")[0])  # A:2 is still open
    _feed(processor, 0, _ids(tok, "A:"))
    assert not processor.token_ok(0, _ids(tok, "1")[0]) and processor.token_ok(0, _ids(tok, "2")[0])
    processor = _processor(tok, [closed])
    _feed(processor, 0, _ids(tok, "A:1\nA:2\n"))
    assert _allowed_set(processor, 0) == set(_ids(tok, "B")[:1]) | eos
    _feed(processor, 0, _ids(tok, "B:2\n"))
    assert _allowed_set(processor, 0) == eos  # the vocabulary is used up


def test_no_row_is_ever_left_without_an_allowed_token(tok, table):
    """Random walks through the allowed tokens, including hopeless specs: every step keeps at least
    one token, and every finished list obeys its constraint."""
    import torch

    vocab = Vocabulary.loads("品牌:兰蔻\n品牌:兰芝\n颜色:红(US)\n型号:50ml\nfoo\n")
    specs = [
        ConstraintSpec("extract", text=TEXTS[8]),
        ConstraintSpec("extract", text=TEXTS[1], schema=("Brand", "Color")),
        ConstraintSpec("extract", text=""),  # nothing to extract
        ConstraintSpec("closed", vocab=vocab),
        ConstraintSpec("closed", vocab=vocab, schema=("材质",)),  # no entry of this attribute
        ConstraintSpec("closed", vocab=Vocabulary([])),
        ConstraintSpec("free", schema=("品牌",)),
        ConstraintSpec("free", schema=(":",)),  # no usable name: unconstrained
    ]
    rng = random.Random(1)
    for trial in range(2):
        processor = _processor(tok, specs, prompt_length=1)
        ids = torch.zeros((len(specs), 1), dtype=torch.long)
        done = [False] * len(specs)
        for _ in range(40):
            scores = processor(ids, torch.zeros((len(specs), len(tok))))
            step = []
            for r in range(len(specs)):
                allowed = torch.isfinite(scores[r]).nonzero().flatten().tolist()
                assert allowed, (specs[r].mode, trial)
                choice = table.eos_id if done[r] else rng.choice(allowed)
                if rng.random() < 0.1 and table.eos_id in allowed:
                    choice = table.eos_id
                done[r] = done[r] or choice == table.eos_id
                step.append(choice)
            ids = torch.cat([ids, torch.tensor(step)[:, None]], dim=1)
        keep = processor.finish(ids[:, 1:].tolist())
        for r, spec in enumerate(specs):
            tokens = ids[r, 1:].tolist()
            if table.eos_id in tokens:
                tokens = tokens[: tokens.index(table.eos_id)]
            raw = tok.decode(tokens if keep[r] is None else tokens[: keep[r]])
            for line in _complete_lines(raw):
                if spec.mode == "extract":
                    assert line.partition(":")[2].lstrip(" ") in spec.text, (line, spec.text)
                elif spec.mode == "closed":
                    assert line in spec.vocab
                if spec.schema and spec.schema != (":",):
                    assert line.partition(":")[0] in spec.schema
            assert spec.text != "" or raw == ""
            if spec.mode == "closed" and spec.schema == ("材质",):
                assert raw == ""


def test_a_line_cut_by_max_new_tokens_is_dropped(tiny_engine, tok):
    vocab = Vocabulary.loads("品牌:兰蔻小黑瓶精华肌底液\n")
    prompts = _prompts(tok)[:2]
    specs = [ConstraintSpec("closed", vocab=vocab), ConstraintSpec("extract", text=TEXTS[6])]
    generations = tiny_engine.generate(prompts, max_new_tokens=3, constraints=specs)
    assert generations[0].text == ""  # the only entry needs more than three tokens
    assert all(g.new_tokens <= 3 for g in generations)
    assert all(":" in line for line in _complete_lines(generations[1].text))


# --- integration: per-step cost, cache keys, CLI --------------------------------------------------------------


def test_processor_cost_per_step_at_batch_8(tiny_engine, tok):
    prompts = _prompts(tok)[:8]
    vocab = _synthetic_vocab(2000, seed=1)
    calls: list[float] = []
    original = TagConstraintProcessor.__call__

    def timed(self, input_ids, scores):
        started = time.perf_counter()
        out = original(self, input_ids, scores)
        calls.append(time.perf_counter() - started)
        return out

    figures = []
    TagConstraintProcessor.__call__ = timed
    try:
        for name, specs in [("extract", [ConstraintSpec("extract", text=t) for t in TEXTS[:8]]),
                            ("closed", [ConstraintSpec("closed", vocab=vocab) for _ in range(8)]),
                            ("free+schema", [ConstraintSpec("free", schema=tuple(SCHEMA)) for _ in range(8)])]:
            calls.clear()
            tiny_engine.generate(prompts, max_new_tokens=24, batch_size=8, constraints=specs)
            figures.append(f"{name} {1000 * sum(calls) / len(calls):.2f} ms/step over {len(calls)} steps")
    finally:
        TagConstraintProcessor.__call__ = original
    print("\nprocessor cost at batch 8: " + "; ".join(figures))


def test_cache_keys_hold_the_constraint(tmp_path):
    from llmtags.engines.cache import CachedEngine, GenerationCache, generation_key
    from llmtags.engines.base import Generation

    payload = json.dumps(["greedy, stop at end of turn or a repeated line", "m", None, 8, "p"], ensure_ascii=False)
    import hashlib

    assert generation_key("p", "m", None, 8) == hashlib.sha256(payload.encode()).hexdigest()  # old keys stay valid
    seen = []

    class Inner:
        def generate(self, prompts, max_new_tokens=64, batch_size=8, on_batch=None, **kwargs):
            seen.append(kwargs.get("constraints"))
            return [Generation(f"{p}:{kwargs.get('constraints')}", 1, 1) for p in prompts]

    engine = CachedEngine(None, Inner, GenerationCache(tmp_path / "g.sqlite"), "m")
    a, b = ConstraintSpec("extract", text="x"), ConstraintSpec("extract", text="y")
    assert a.key() != b.key() and a.key() == ConstraintSpec("extract", text="x").key()
    assert a.key() != ConstraintSpec("extract", text="x", schema=("品牌",)).key()
    engine.generate(["p", "p"], max_new_tokens=8, constraints=[a, None])
    assert seen[-1] == [a, None]
    engine.generate(["p", "p"], max_new_tokens=8, constraints=[b, None])
    assert seen[-1] == [b]  # only the new constraint missed
    engine.generate(["p"], max_new_tokens=8)
    assert len(seen) == 2  # the unconstrained prompt is the same entry as before
    assert generation_key("p", "m", None, 8, a.key()) in engine.seconds and engine.seconds_for("p", 8, a) >= 0


def test_cli_constrain_options(tmp_path, tiny_model_dir, capsys):
    from llmtags.cli import main

    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"id": str(i), "text": t}, ensure_ascii=False) + "\n"
                              for i, t in enumerate(TEXTS[:4])), encoding="utf-8")
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("品牌:理肤泉\nBrand:Diesel\n产品词:中性笔\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    base = ["generate", str(source), "-o", str(out), "--base-model", str(tiny_model_dir),
            "--max-new-tokens", "16", "-q"]
    assert main(base + ["--constrain", "closed"]) == 2
    assert "--constrain-vocab" in capsys.readouterr().err
    assert main(base + ["--constrain", "closed", "--vocab", str(vocab)]) == 0  # falls back to --vocab
    known = Vocabulary.load(vocab)
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert all(line in known for row in rows for line in _complete_lines(row["raw"]))
    assert main(base + ["--constrain", "extract"]) == 0
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert all(split_tag(tag)[1] in TEXTS[int(row["id"])] for row in rows for tag in row["tags"])


def test_free_mode_without_a_schema_changes_nothing(tiny_engine):
    records = [Record(str(i), t) for i, t in enumerate(TEXTS[:4])]
    plain = [r.raw for r in tag_records(records, tiny_engine, TaggingOptions(max_new_tokens=12))]
    free = [r.raw for r in tag_records(records, tiny_engine, TaggingOptions(max_new_tokens=12, constrain="free"))]
    assert plain == free
