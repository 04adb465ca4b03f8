"""The adversarial corpus in tests/data (see make_adversarial.py): every record of every file is either a
cleaned Record or a RecordError naming its number and field, and no valid record is lost, in reading
and through `llmtags generate`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmtags.records import ReadStats, Record, RecordError, read_records

DATA = Path(__file__).resolve().parent / "data"


def ok(record_id: str, text: str | None = None) -> tuple:
    """A valid record with this id (and, when given, exactly this cleaned text)."""
    return ("ok", record_id, text)


def error(field: str | None) -> tuple:
    """A RecordError on this field (None: the whole line, e.g. malformed JSON or not an object)."""
    return ("error", field)


DUPLICATE = ("duplicate",)  # same id and same cleaned text as an earlier record: dropped, counted
BLANK = ("blank",)  # an empty or whitespace-only line: not a record

EXPECTED: dict[str, dict[int, tuple]] = {
    "adversarial.jsonl": {
        1: ok("bom-first", "理肤泉防晒霜 SPF50+ 50ml"),
        2: error("text"),  # Latin-1
        3: error("text"),  # GBK inside UTF-8
        4: error("text"),  # Windows-1252
        5: error("id"),  # Latin-1 in the id
        6: error(None),  # truncated
        7: error(None),
        8: error(None),
        9: error("text"),  # number
        10: error("text"),  # list
        11: error("text"),  # dict
        12: error("text"),  # bool
        13: ok("1", "whole float id"),
        14: error("id"),  # 2.5
        15: error("id"),  # true
        16: error("id"),  # list
        17: error("id"),  # dict
        18: ok("#18", "no id at all"),
        19: ok("#19", "null id"),
        20: error("id"),  # empty
        21: ok("dup-same", "Nike Air Max 90"),
        22: DUPLICATE,
        23: ok("dup-diff", "Adidas Samba OG"),
        24: error("id"),  # same id, other text
        25: ok("long-1mb"),
        26: error("text"),  # ""
        27: error("text"),  # only spaces and zero-width
        28: ok("emoji", "🔥限时特惠 Nike 👟 Air Max 💯"),
        29: ok("rtl", "عطر فرنسي فاخر LIVE perfume 100ml"),
        30: ok("zero-width", "Nike Air Max 90"),
        31: ok("control", "Diesel red [31m sneaker"),
        32: ok("raw-tab", "Diesel red sneaker"),
        33: ok("nul-text", "Nike Air Max"),
        34: error("id"),  # NUL in the id
        35: error(None),  # NUL block
        36: ok("surrogate", "lone surrogate"),
        37: error(None),  # array
        38: error(None),  # null
        39: error(None),  # string
        40: error(None),  # number
        41: error(None),  # nested 100,000 deep
        42: error(None),  # 5,000-digit number
        43: ok("#43", "NaN id"),
        44: ok("html", "alert(1) Diesel & Co <b>"),
        45: ok("fullwidth", "ABC123 理肤泉"),
        46: error("tags"),
        47: ok("tags-string", "Nike Air"),
        48: ok("7", "integer id"),
        49: BLANK,
        50: BLANK,
        51: ok("bom-mid", "a second file concatenated"),
        52: ok("ok-last", "宜家 IKEA 毕利 书架 白色"),
        53: error(None),  # torn last line
    },
    "adversarial.csv": {
        1: ok("1", "Diesel\nsneaker, black"),  # the first line break stays: it parts title and description
        2: ok("2", 'She said "wow" — 理肤泉'),
        3: error("text"),
        4: error(None),  # one cell too many
        5: ok("5", "short row"),
        6: error("text"),
        7: error("text"),  # Latin-1
        8: ok("8"),  # 168 kB cell
        9: error("id"),
        10: ok("10", "NUL inside"),
        11: error("text"),
        12: ok("12", "emoji 👟 andzero-width"),
        13: DUPLICATE,
        14: ok("13", "tab inside"),
        15: ok("14", "last row"),
    },
    "adversarial.parquet": {
        1: ok("1", "Diesel sneaker"),
        2: error("id"),
        3: ok("#3", "null id"),
        4: error("text"),
        5: error("text"),
        6: error("text"),
        7: ok("#7", "nan id"),
        8: ok("8", "NUL byte 理肤泉"),
        9: DUPLICATE,
        10: ok("10", "NikeAir"),
    },
    "adversarial_binary.parquet": {1: ok("b1", "理肤泉"), 2: error("text"), 3: error("id"), 4: error("text")},
    "adversarial_numbers.parquet": {1: error("text"), 2: error("text"), 3: error("text")},
}


def _record_count(path: Path) -> int:
    """How many records the file holds, counted independently of the reader under test."""
    if path.suffix == ".jsonl":
        return path.read_bytes().count(b"\n") + (not path.read_bytes().endswith(b"\n"))
    if path.suffix == ".csv":
        import csv
        import io

        csv.field_size_limit(1 << 26)
        return sum(1 for _ in csv.DictReader(io.StringIO(path.read_bytes().decode("utf-8", "replace"), newline="")))
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_record_is_a_record_or_a_named_error(name):
    path, expected = DATA / name, EXPECTED[name]
    assert sorted(expected) == list(range(1, _record_count(path) + 1)), "the expected list covers every record"
    stats = ReadStats()
    items = list(read_records(path, stats=stats))
    # One item per record that is not blank or a duplicate, in input order.
    wanted = [n for n, e in expected.items() if e[0] in ("ok", "error")]
    assert [i.number for i in items] == wanted
    for item in items:
        want = expected[item.number]
        if want[0] == "ok":
            assert isinstance(item, Record), f"{name} record {item.number}: {item}"
            assert item.id == want[1]
            if want[2] is not None:
                assert item.text == want[2]
        else:
            assert isinstance(item, RecordError), f"{name} record {item.number} should be an error: {item}"
            assert item.field == want[1], str(item)
            assert str(item).startswith(f"record {item.number}")
            if item.field:
                assert f"field {item.field!r}" in str(item)
            assert json.dumps(item.to_json(), ensure_ascii=False)  # reportable as JSONL
    # No valid record lost: exactly the expected ones, in order; duplicates were valid, only repeated.
    assert [i.id for i in items if isinstance(i, Record)] == [e[1] for e in expected.values() if e[0] == "ok"]
    duplicates = [n for n, e in expected.items() if e == DUPLICATE]
    assert stats.duplicates == len(duplicates)
    undeduplicated = {i.number: i for i in read_records(path, dedupe=False)}
    assert all(isinstance(undeduplicated[n], Record) for n in duplicates)
    assert (stats.read, stats.errors) == (len([e for e in expected.values() if e[0] == "ok"]),
                                          len([e for e in expected.values() if e[0] == "error"]))


def test_long_texts_are_read_whole():
    (long,) = [r for r in read_records(DATA / "adversarial.jsonl") if isinstance(r, Record) and r.id == "long-1mb"]
    assert len(long.text) > 700_000 and len(long.text.encode("utf-8")) > 1_000_000
    (cell,) = [r for r in read_records(DATA / "adversarial.csv") if isinstance(r, Record) and r.id == "8"]
    assert len(cell.text) > 131_072  # over the csv module's default field limit


def test_generate_over_the_adversarial_corpus(tiny_model_dir, tmp_path, capsys):
    from llmtags.cli import main

    out, errors = tmp_path / "out.jsonl", tmp_path / "errors.jsonl"
    code = main(["generate", str(DATA / "adversarial.jsonl"), "-o", str(out), "--errors", str(errors),
                 "--base-model", str(tiny_model_dir), "--max-new-tokens", "4", "-q"])
    stderr = capsys.readouterr().err
    assert code == 0, stderr
    expected = EXPECTED["adversarial.jsonl"]
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in rows] == [e[1] for e in expected.values() if e[0] == "ok"]
    assert all(set(r) - {"dropped"} == {"id", "text_hash", "tags", "confidence", "evidence", "raw"} for r in rows)
    reported = [json.loads(line) for line in errors.read_text(encoding="utf-8").splitlines()]
    assert [(r["record"], r["field"]) for r in reported] == [(n, e[1]) for n, e in expected.items() if e[0] == "error"]
    n_ok = sum(e[0] == "ok" for e in expected.values())
    n_errors = sum(e[0] == "error" for e in expected.values())
    assert f"tagged {n_ok} of {n_ok} records" in stderr
    assert f"skipped {n_errors} bad records and 1 exact duplicates" in stderr
    assert "1 long texts were truncated" in stderr
