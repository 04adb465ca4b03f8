"""Write the adversarial input corpus next to this file: bad bytes, bad JSON, bad types, odd text.

    python tests/data/make_adversarial.py

The generated files are committed, so tests never need to run this; it documents how each byte came
about and rebuilds them exactly (the output is deterministic). What each record must become is listed
in tests/test_adversarial.py, line by line.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
BOM = b"\xef\xbb\xbf"

# A product description of about 1 MB (UTF-8), far over the 2,000 characters the tagger keeps.
LONG_UNIT = "高端防晒霜 SPF50+ PA++++ 清爽不油腻 sunscreen lotion for sensitive skin, 50ml. "
LONG_TEXT = LONG_UNIT * (1_000_000 // len(LONG_UNIT.encode("utf-8")) + 1)


def j(obj: object) -> bytes:
    """One JSON line as UTF-8 (non-ASCII kept as is, like most real exports)."""
    return json.dumps(obj, ensure_ascii=False).encode("utf-8")


def jsonl_lines() -> list[bytes]:
    """Line n of adversarial.jsonl is item n-1 (1-based line numbers, as in the error reports)."""
    return [
        BOM + j({"id": "bom-first", "text": "理肤泉防晒霜 SPF50+ 50ml"}),  # 1: UTF-8 BOM opens the file
        b'{"id": "latin1-text", "text": "Caf\xe9 cr\xe8me br\xfbl\xe9e"}',  # 2: Latin-1 bytes
        b'{"id": "gbk-mixed", "text": "' + "理肤泉".encode("gbk") + " 防晒霜".encode() + b'"}',  # 3: GBK + UTF-8
        b'{"id": "cp1252", "text": "\x93Smart\x94 quotes"}',  # 4: Windows-1252 quotes
        b'{"id": "caf\xe9-id", "text": "summer dress"}',  # 5: Latin-1 byte in the id
        b'{"id": "truncated", "text": "Diesel sne',  # 6: cut mid-string
        b'{"id": "cut-at-key", "te',  # 7
        b"{",  # 8
        j({"id": "text-number", "text": 12345}),  # 9
        j({"id": "text-list", "text": ["Nike", "Air Max"]}),  # 10
        j({"id": "text-dict", "text": {"zh": "理肤泉"}}),  # 11
        j({"id": "text-bool", "text": True}),  # 12
        j({"id": 1.0, "text": "whole float id"}),  # 13: becomes "1"
        j({"id": 2.5, "text": "fractional float id"}),  # 14
        j({"id": True, "text": "bool id"}),  # 15
        j({"id": ["a"], "text": "list id"}),  # 16
        j({"id": {"sku": 1}, "text": "dict id"}),  # 17
        j({"text": "no id at all"}),  # 18: becomes "#18"
        j({"id": None, "text": "null id"}),  # 19: becomes "#19"
        j({"id": "", "text": "empty id"}),  # 20
        j({"id": "dup-same", "text": "Nike Air Max 90"}),  # 21
        j({"id": "dup-same", "text": "Nike  Air   Max 90 "}),  # 22: same text once cleaned: dropped
        j({"id": "dup-diff", "text": "Adidas Samba OG"}),  # 23
        j({"id": "dup-diff", "text": "Adidas Gazelle"}),  # 24: same id, other text
        j({"id": "long-1mb", "text": LONG_TEXT}),  # 25
        j({"id": "empty-text", "text": ""}),  # 26
        j({"id": "whitespace-text", "text": " \t\u3000\u00a0\u200b "}),  # 27
        j({"id": "emoji", "text": "🔥限时特惠 Nike 👟 Air Max 💯"}),  # 28
        j({"id": "rtl", "text": "عطر فرنسي فاخر \u202eLIVE\u202c perfume 100ml"}),  # 29: bidi override
        j({"id": "zero-width", "text": "Ni\u200bke Air\u00ad Max\ufeff 90\u2060"}),  # 30
        j({"id": "control", "text": "Diesel\u0001\u0007 red\u001b[31m sneaker\u007f"}),  # 31: escaped controls
        b'{"id": "raw-tab", "text": "Diesel\tred\x01sneaker"}',  # 32: raw controls inside a string
        b'{"id": "nul-text", "text": "Nike\x00Air\\u0000Max"}',  # 33: raw and escaped NUL
        b'{"id": "nul\\u0000id", "text": "id with a NUL"}',  # 34
        b"\x00" * 64,  # 35: a block of NULs, as a crash can leave on some file systems
        b'{"id": "surrogate", "text": "lone \\ud800 surrogate"}',  # 36
        j(["not", "an", "object"]),  # 37
        b"null",  # 38
        b'"just a string"',  # 39
        b"42",  # 40
        b"[" * 100_000,  # 41: deeper than any JSON parser recurses
        b'{"id": ' + b"7" * 5000 + b', "text": "huge number"}',  # 42: over Python's int-string limit
        b'{"id": NaN, "text": "NaN id"}',  # 43: becomes "#43" (NaN is how pandas writes missing)
        j({"id": "html", "text": "<script>alert(1)</script><b>Diesel</b> &amp; Co &lt;b&gt;"}),  # 44
        j({"id": "fullwidth", "text": "ＡＢＣ１２３　理肤泉"}),  # 45
        j({"id": "bad-tags", "text": "Nike", "tags": 5}),  # 46
        j({"id": "tags-string", "text": "Nike Air", "tags": "Brand:Nike|Type:sneaker"}),  # 47
        j({"id": 7, "text": "integer id", "category": 3}),  # 48
        b"",  # 49: blank line, skipped
        b"   \t  ",  # 50: whitespace-only line, skipped
        BOM + j({"id": "bom-mid", "text": "a second file concatenated"}),  # 51
        j({"id": "ok-last", "text": "宜家 IKEA 毕利 书架 白色"}),  # 52
    ]


def write_jsonl(path: Path) -> None:
    # 53: a last line cut off mid-write, without its newline.
    path.write_bytes(b"\n".join(jsonl_lines()) + b'\n{"id": "torn-last", "text": "no newline at the e')


def write_csv(path: Path) -> None:
    rows = [
        b"id,text,category",
        b'1,"Diesel\nsneaker, black",Shoes',  # 1: embedded newline and comma
        '2,"She said ""wow"" — 理肤泉",美妆'.encode(),  # 2: escaped quotes
        b"3,,Shoes",  # 3: empty text
        b"4,Nike, Air Max,Shoes",  # 4: unquoted comma: one cell too many
        b"5,short row",  # 5: no category cell: fine
        b"6",  # 6: no text cell
        b'7,"Caf\xe9 latin-1",Food',  # 7
        b'8,"' + ("Long description of a book. " * 6000).encode() + b'",Books',  # 8: 168 kB, over csv's limit
        b',empty id,Misc',  # 9
        b'10,"NUL\x00 inside",Misc',  # 10
        b'11,"  ",Misc',  # 11
        "12,emoji 👟 and\u200bzero-width,Misc".encode(),  # 12
        b'1,"Diesel\nsneaker, black",Shoes',  # 13: exact duplicate of 1
        b'13,"tab\tinside",Misc',  # 14
        b"14,last row,Misc",  # 15: no final newline
    ]
    path.write_bytes(BOM + b"\r\n".join(rows))


def write_parquet(folder: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    nan = float("nan")
    table = pa.table({
        "id": pa.array([1.0, 2.5, None, 4.0, 5.0, 6.0, nan, 8.0, 1.0, 10.0], pa.float64()),
        "text": pa.array(["Diesel sneaker", "fractional id", "null id", None, "", "  \u3000", "nan id",
                          "NUL\x00byte 理肤泉", "Diesel sneaker", "Nike\u200bAir"], pa.string()),
        "category": pa.array([3, None, None, 1, None, None, None, None, 3, 2], pa.int64()),
        "tags": pa.array([["Brand:Diesel"], None, None, None, None, None, None, None, ["Brand:Diesel"], []],
                         pa.list_(pa.string())),
    })
    pq.write_table(table, folder / "adversarial.parquet", row_group_size=4)
    # Binary columns where strings belong (Spark writes them when the UTF-8 annotation is missing).
    pq.write_table(pa.table({
        "id": pa.array([b"b1", b"b2", b"\xff", b"b4"], pa.binary()),
        "text": pa.array(["理肤泉".encode(), b"Caf\xe9", b"ok", None], pa.binary()),
    }), folder / "adversarial_binary.parquet")
    # Numbers where the text belongs.
    pq.write_table(pa.table({
        "id": pa.array([1, 2, None], pa.int64()),
        "text": pa.array([10, None, 30], pa.int64()),
    }), folder / "adversarial_numbers.parquet")


def main() -> None:
    write_jsonl(HERE / "adversarial.jsonl")
    write_csv(HERE / "adversarial.csv")
    write_parquet(HERE)


if __name__ == "__main__":
    main()
