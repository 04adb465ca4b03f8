"""A generate run killed with SIGKILL at any moment, then resumed, writes exactly the bytes of an
uninterrupted run (tiny model, greedy decoding)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

N = 24


@pytest.fixture(scope="module")
def products(tmp_path_factory):
    path = tmp_path_factory.mktemp("resume") / "in.jsonl"
    rows = [{"id": f"p{i}", "text": f"产品 {i} 理肤泉防晒霜 SPF{i} Diesel sneaker size {i}"} for i in range(N)]
    rows.insert(5, {"id": "bad", "text": None})
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows) + "{torn", encoding="utf-8")
    return path


def _command(products, model, out, errors, *extra):
    return [sys.executable, "-m", "llmtags.cli", "generate", str(products), "-o", str(out), "--errors", str(errors),
            "--base-model", str(model), "--max-new-tokens", "8", "--batch-size", "2", "--chunk-size", "2", "-q", *extra]


@pytest.fixture(scope="module")
def reference(products, tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("reference")
    out, errors = folder / "out.jsonl", folder / "errors.jsonl"
    subprocess.run(_command(products, tiny_model_dir, out, errors), check=True, capture_output=True)
    return out.read_bytes(), errors.read_bytes()


def _lines(path):
    return path.read_bytes().count(b"\n") if path.exists() else 0


@pytest.mark.parametrize("kill_after_lines", [0, 2, 9])
def test_killed_then_resumed_equals_uninterrupted(products, tiny_model_dir, reference, tmp_path, kill_after_lines):
    out, errors = tmp_path / "out.jsonl", tmp_path / "errors.jsonl"
    process = subprocess.Popen(_command(products, tiny_model_dir, out, errors), stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while _lines(out) < kill_after_lines and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert _lines(out) < N + 0, "the run finished before it could be killed"
    if kill_after_lines == 9:
        with open(out, "ab") as f:  # as if killed in the middle of a write
            f.write(b'{"id": "p9", "tags": ["half')
    subprocess.run(_command(products, tiny_model_dir, out, errors, "--resume"), check=True, capture_output=True)
    assert out.read_bytes() == reference[0]
    assert errors.read_bytes() == reference[1]
    ids = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert ids == [f"p{i}" for i in range(N)]


def test_changed_text_is_tagged_again(products, tiny_model_dir, reference, tmp_path):
    out, errors = tmp_path / "out.jsonl", tmp_path / "errors.jsonl"
    out.write_bytes(reference[0])
    changed = tmp_path / "changed.jsonl"
    lines = products.read_text(encoding="utf-8").splitlines()
    lines[0] = json.dumps({"id": "p0", "text": "a new title for p0"})
    changed.write_text("\n".join(lines), encoding="utf-8")
    result = subprocess.run(_command(changed, tiny_model_dir, out, errors, "--resume"), capture_output=True, text=True)
    assert result.returncode == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == N + 1 and rows[-1]["id"] == "p0"
    assert "resumed: 23 records were already done" in result.stderr
