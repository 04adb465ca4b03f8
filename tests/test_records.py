import io
import sys

import pytest

from llmtags.records import Fields, ReadStats, Record, RecordError, clean_text, count_records, read_records


def _write(path, lines: list[bytes | str]) -> str:
    with open(path, "wb") as f:
        for line in lines:
            f.write(line if isinstance(line, bytes) else line.encode("utf-8"))
            f.write(b"\n")
    return str(path)


def _split(items):
    return [i for i in items if isinstance(i, Record)], [i for i in items if isinstance(i, RecordError)]


@pytest.mark.parametrize(
    "raw, clean",
    [
        ("ＡＢＣ１２３　理肤泉", "ABC123 理肤泉"),  # NFKC: full width to ASCII, ideographic space
        ("<b>Diesel</b>&nbsp;Men&#39;s", "Diesel Men's"),
        ("宾派手表&hellip", "宾派手表..."),  # truncated entity at the end of a scraped title; NFKC expands the ellipsis
        ("a&lt;b&gt;c", "a<b>c"),  # escaped markup stays visible text
        ("  line\n\tbreak\x00\x07 ctrl  ", "line\nbreak ctrl"),  # the first line break parts title and description
        ("Title \r\n\n desc\n more \n", "Title\ndesc more"),
        ("\n\n  only a title \n", "only a title"),
        ("AT&T 5G", "AT&T 5G"),
    ],
)
def test_clean_text(raw, clean):
    assert clean_text(raw) == clean


def test_bad_lines_are_reported_and_the_rest_read(tmp_path):
    path = _write(
        tmp_path / "in.jsonl",
        [
            '{"id": "a", "text": "理肤泉防晒霜"}',
            '{"id": "b", "text": "truncated',  # malformed JSON
            '{"id": "c"}',  # missing text
            b"\xff\xfe\x00garbage\x9c",  # binary garbage
            '{"id": "d", "text": 12}',  # wrong type
            '["not", "an", "object"]',
            '{"id": "e", "text": "' + "长" * 100_000 + '"}',  # 100 kB description is kept whole here
            '{"id": "f", "text": "Diesel sneaker", "tags": ["Brand:Diesel", ["Type:sneaker", "Type:sneakers"]]}',
        ],
    )
    stats = ReadStats()
    records, errors = _split(list(read_records(path, stats=stats)))
    assert [r.id for r in records] == ["a", "e", "f"]
    assert [(e.number, e.field) for e in errors] == [(2, None), (3, "text"), (4, None), (5, "text"), (6, None)]
    assert "malformed JSON" in str(errors[0]) and "record 2" in str(errors[0])
    assert "missing text" in str(errors[1]) and "'c'" in str(errors[1])
    assert "UTF-8" in errors[2].reason
    assert len(records[1].text) == 100_000
    assert records[2].tags == ["Brand:Diesel", ["Type:sneaker", "Type:sneakers"]]
    assert (stats.read, stats.errors) == (3, 5)


def test_empty_file(tmp_path):
    path = _write(tmp_path / "empty.jsonl", [])
    assert list(read_records(path)) == []
    assert count_records(path) == 0


def test_duplicates_are_dropped_and_conflicting_ids_reported(tmp_path):
    path = _write(
        tmp_path / "dup.jsonl",
        ['{"id": 1, "text": "a b"}', '{"id": 1, "text": "a  b"}', '{"id": 1, "text": "other"}', '{"text": "x"}'],
    )
    stats = ReadStats()
    records, errors = _split(list(read_records(path, stats=stats)))
    assert [(r.id, r.text) for r in records] == [("1", "a b"), ("#4", "x")]
    assert stats.duplicates == 1
    assert errors[0].reason == "duplicate id with different text"


def test_bad_tags_field(tmp_path):
    path = _write(tmp_path / "t.jsonl", ['{"id": "a", "text": "x", "tags": [1, 2]}'])
    (error,) = list(read_records(path))
    assert isinstance(error, RecordError) and error.field == "tags"


def test_custom_fields_and_csv_with_embedded_newlines(tmp_path):
    path = tmp_path / "in.csv"
    path.write_text('sku,title,cat\n1,"Diesel\nsneaker",Shoes\n2,,Shoes\n3,理肤泉,美妆\n', encoding="utf-8")
    records, errors = _split(list(read_records(path, fields=Fields(id="sku", text="title", category="cat"))))
    assert [(r.id, r.text, r.category) for r in records] == [("1", "Diesel\nsneaker", "Shoes"), ("3", "理肤泉", "美妆")]
    assert errors[0].field == "title" and errors[0].number == 2


def test_parquet_with_nulls(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": ["a", "b", None], "text": ["Diesel", None, "理肤泉"]}), path)
    records, errors = _split(list(read_records(path)))
    assert [(r.id, r.text) for r in records] == [("a", "Diesel"), ("#3", "理肤泉")]
    assert errors[0].number == 2 and errors[0].field == "text"
    assert count_records(path) == 3


def test_stdin(monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b'{"id": "a", "text": "x"}\n')))
    (record,) = list(read_records("-"))
    assert record.id == "a"


def test_unknown_format():
    with pytest.raises(ValueError, match="--format"):
        list(read_records("products.xlsx"))


def test_shared_dataset_reads_without_errors():
    from conftest import DATASETS

    path = DATASETS / "zh-taobao-ner" / "test.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    items = list(read_records(path))
    assert all(isinstance(i, Record) for i in items) and len(items) == 426
    assert all(i.tags for i in items)


def test_interleave_alternates_then_drains_the_longer():
    from llmtags.records import interleave

    assert interleave([[1, 2, 3], ["a"]]) == [1, "a", 2, 3]
    assert interleave([]) == []
