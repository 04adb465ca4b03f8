from llmtags.candidates import CandidateFinder, candidate_recall, candidate_sources, load_candidate_vocabulary
from llmtags.prompts import load_template
from llmtags.records import Record
from llmtags.options import TaggingOptions
from llmtags.tagger import build_prompt
from llmtags.vocab import Vocabulary, VocabEntry

VOCAB = Vocabulary([
    VocabEntry("品牌:理肤泉", ["La Roche-Posay"], 5),
    VocabEntry("产品词:防晒霜", [], 3),
    VocabEntry("产品词:霜", [], 9),  # one character: not looked up
    VocabEntry("其他:法国", [], 2),
    VocabEntry("品牌:法国", [], 1),
    VocabEntry("Brand:Ka", [], 1),
    VocabEntry("型号:spf50", [], 1),
])


def test_candidates_are_vocabulary_entries_found_in_the_text_with_spans():
    finder = CandidateFinder(VOCAB)
    text = "法国La Roche-Posay理肤泉ka防晒霜SPF50"
    found = finder.find(text)
    tags = [c.tag for c in found]
    assert tags == ["其他:法国", "品牌:法国", "品牌:理肤泉", "Brand:Ka", "产品词:防晒霜", "型号:spf50"]
    for c in found:
        assert text[c.start:c.end].casefold() in {"法国", "la roche-posay", "理肤泉", "ka", "防晒霜", "spf50"}
    assert "产品词:霜" not in tags


def test_own_tags_seen_once_are_left_out_for_training():
    finder = CandidateFinder(VOCAB)
    own = ["型号:SPF50", "品牌:理肤泉"]
    tags = finder.tags("理肤泉 spf50", own_tags=own)
    assert tags == ["品牌:理肤泉"]  # count 5: known from other records; spf50 only from this one


def test_cap_prefers_longer_spans():
    finder = CandidateFinder(VOCAB, max_candidates=2)
    assert finder.tags("法国理肤泉防晒霜") == ["品牌:理肤泉", "产品词:防晒霜"]


def test_candidate_recall_counts_any_of_groups_once():
    golds = [["品牌:理肤泉", ["产品词:防晒霜", "产品词:霜"], "型号:x"], []]
    assert candidate_recall(golds, [["品牌:理肤泉", "产品词:霜"], ["其他:法国"]]) == 2 / 3


def test_candidates_reach_the_prompt(qwen_tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(qwen_tokenizer_dir)
    options = TaggingOptions(template=load_template("zh"), candidates=CandidateFinder(VOCAB))
    record = Record("1", "理肤泉防晒霜 spf50", tags=["型号:spf50"])
    assert "候选标签：品牌:理肤泉、产品词:防晒霜、型号:spf50" in build_prompt(record, tokenizer, options)
    assert "候选标签：品牌:理肤泉、产品词:防晒霜\n" in build_prompt(record, tokenizer, options, training=True)


def test_labelled_file_or_vocabulary_file(tmp_path):
    labelled = tmp_path / "train.jsonl"
    labelled.write_text('{"id": "1", "text": "理肤泉", "tags": ["品牌:理肤泉"]}\n', encoding="utf-8")
    vocab_file = tmp_path / "vocab.jsonl"
    VOCAB.save(vocab_file)
    assert [e.tag for e in load_candidate_vocabulary(str(labelled))] == ["品牌:理肤泉"]
    assert len(load_candidate_vocabulary(str(vocab_file))) == len(VOCAB)
    both = load_candidate_vocabulary(f"{labelled},{vocab_file}")
    assert len(both) == len(VOCAB)
    assert both.get("品牌:理肤泉").count == 1 + 5


def test_a_file_name_with_a_comma_is_one_source(tmp_path):
    odd = tmp_path / "a,b.jsonl"
    odd.write_text('{"id": "1", "text": "理肤泉", "tags": ["品牌:理肤泉"]}\n', encoding="utf-8")
    assert candidate_sources(str(odd)) == [str(odd)]
    assert candidate_sources("x.jsonl, y.jsonl") == ["x.jsonl", "y.jsonl"]


def test_schema_limits_candidate_attributes():
    finder = CandidateFinder(VOCAB)
    assert finder.tags("法国理肤泉防晒霜", attributes=["品牌"]) == ["品牌:法国", "品牌:理肤泉"]
