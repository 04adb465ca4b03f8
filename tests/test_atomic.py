"""atomic: a reader sees the old file or the new one, and no temporary file is left behind."""

import pytest

from llmtags.atomic import copy_file, write_text


def test_write_text_replaces_the_file_and_makes_its_folder(tmp_path):
    target = tmp_path / "new" / "dir" / "out.json"
    assert write_text(target, "一\n") == target and target.read_text(encoding="utf-8") == "一\n"
    write_text(target, "二\n", durable=True)
    assert target.read_text(encoding="utf-8") == "二\n"
    assert [p.name for p in target.parent.iterdir()] == ["out.json"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "out.jsonl"
    target.write_text("old\n", encoding="utf-8")
    with pytest.raises(UnicodeEncodeError):
        write_text(target, "half\ud800")  # a lone surrogate cannot be written as UTF-8
    assert target.read_text(encoding="utf-8") == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


def test_copy_file(tmp_path):
    source, target = tmp_path / "a.bin", tmp_path / "b.bin"
    source.write_bytes(b"\x00\x01")
    copy_file(source, target)
    assert target.read_bytes() == b"\x00\x01" and sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.bin"]
    with pytest.raises(FileNotFoundError):
        copy_file(tmp_path / "missing", target)
    assert target.read_bytes() == b"\x00\x01" and sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.bin"]


def test_written_files_get_the_mode_a_plain_open_gives_or_keep_the_targets(tmp_path):
    import os

    mask = os.umask(0o022)
    try:
        fresh = write_text(tmp_path / "fresh.json", "{}")
        assert fresh.stat().st_mode & 0o777 == 0o644  # not mkstemp's private 0600
        os.chmod(fresh, 0o640)
        write_text(fresh, "[]")
        assert fresh.stat().st_mode & 0o777 == 0o640
        source = tmp_path / "a.bin"
        source.write_bytes(b"x")
        assert copy_file(source, tmp_path / "b.bin").stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(mask)


def test_a_read_only_target_is_replaced_and_stays_read_only(tmp_path):
    target = tmp_path / "llmtags.json"
    target.write_text("{}", encoding="utf-8")
    target.chmod(0o444)
    write_text(target, "[]")  # the folder is writable: a rename needs no write permission on the file
    assert target.read_text(encoding="utf-8") == "[]" and target.stat().st_mode & 0o777 == 0o444
