"""A generate run killed with SIGKILL at any moment, then resumed, writes exactly the bytes of an
uninterrupted run (tiny model, greedy decoding)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

N = 150  # enough that an unloaded machine is still tagging when the test interrupts it


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
    assert f"resumed: {N - 1} records were already done" in result.stderr


def test_ctrl_c_stops_with_whole_lines_and_resume_completes(products, tiny_model_dir, reference, tmp_path):
    out, errors = tmp_path / "out.jsonl", tmp_path / "errors.jsonl"
    # A background job of a non-interactive shell inherits SIGINT ignored; give the child the default.
    process = subprocess.Popen(_command(products, tiny_model_dir, out, errors), stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.default_int_handler))
    deadline = time.time() + 120
    while _lines(out) < 2 and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "interrupted" in stderr and "--resume" in stderr
    partial = out.read_bytes()
    assert partial.endswith(b"\n") and 2 <= partial.count(b"\n") < N, "interrupted after whole chunks only"
    assert reference[0].startswith(partial)
    subprocess.run(_command(products, tiny_model_dir, out, errors, "--resume"), check=True, capture_output=True)
    assert out.read_bytes() == reference[0]
    assert errors.read_bytes() == reference[1]


@pytest.mark.parametrize("torn", [b'{"record": 1, "id": "a", "fie', '{"record": 1, "id": "理'.encode()[:-1]])
def test_torn_errors_file_is_repaired_on_resume(tmp_path, torn):
    """A kill can cut the errors file mid-line (even mid-character): resume cuts that line off and
    reports the record again on a line of its own, once."""
    from llmtags.run import tag_file
    from llmtags.tagger import TagResult

    source, out, errors = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "errors.jsonl"
    source.write_text('{"id": "a", "text": null}\n{"id": "b", "text": "ok"}\n{"id": "c", "text": 1}\n')
    errors.write_bytes(torn)
    summary = tag_file(str(source), str(out), lambda records, on_batch: ([TagResult(r, [], "")] for r in records),
                       errors=str(errors), resume=True, progress=False)
    assert summary.tagged == 1 and summary.errors == 2
    rows = [json.loads(line) for line in errors.read_text(encoding="utf-8").splitlines()]
    assert [(r["record"], r["id"]) for r in rows] == [(1, "a"), (3, "c")]


def test_settings_are_recorded_and_a_resume_with_other_settings_is_refused(tmp_path):
    from llmtags.run import SettingsMismatch, check_run_settings

    out = tmp_path / "out.jsonl"
    recorded = check_run_settings(out, {"template": "zh", "adapter x sha256": "aa"}, resume=False)
    assert json.loads(recorded.read_text()) == {"adapter x sha256": "aa", "template": "zh"}
    check_run_settings(out, {"adapter x sha256": "aa", "template": "zh"}, resume=True)  # same: fine
    with pytest.raises(SettingsMismatch, match=r"adapter x sha256: 'aa' then, 'bb' now") as caught:
        check_run_settings(out, {"template": "zh", "adapter x sha256": "bb"}, resume=True)
    assert "template" not in str(caught.value)
    check_run_settings(out, {"template": "en"}, resume=False)  # a fresh run starts over and records anew
    assert json.loads(recorded.read_text()) == {"template": "en"}
    recorded.write_text('{"template": "en"')  # damaged by hand: named, not a bare JSON error
    with pytest.raises(SettingsMismatch, match=r"settings file .*out\.jsonl\.settings\.json is unreadable"):
        check_run_settings(out, {"template": "en"}, resume=True)
    (tmp_path / "old.jsonl").write_text("")
    check_run_settings(tmp_path / "old.jsonl", {"template": "en"}, resume=True)  # from before settings: as is
    # A settings file from before an option existed resumes when the option is left off, not when it is set.
    check_run_settings(out, {"template": "en"}, resume=False)
    check_run_settings(out, {"template": "en", "no_proposer": False, "proposer": None}, resume=True)
    with pytest.raises(SettingsMismatch, match="proposer: None then, 'p.crfsuite' now"):
        check_run_settings(out, {"template": "en", "proposer": "p.crfsuite"}, resume=True)
    with pytest.raises(SettingsMismatch, match="adapter_scale: None then, 0.0 now"):  # 0.0 == False, yet not off
        check_run_settings(out, {"template": "en", "adapter_scale": 0.0}, resume=True)
    # An output in a folder that does not exist yet (`-o runs/new/out.jsonl`): the folder is made.
    assert check_run_settings(tmp_path / "new" / "out.jsonl", {"template": "en"}, resume=True).is_file()


def test_each_start_of_a_run_records_its_engine_and_weights_without_refusing_a_change(tmp_path):
    from llmtags.run import SettingsMismatch, check_run_settings

    out = tmp_path / "out.jsonl"
    first = {"started": "2026-12-07 03:00:00 UTC", "engine": "llama.cpp", "weights": "as-is"}
    then = {"started": "2026-12-07 04:00:00 UTC", "engine": "llama.cpp", "weights": "q8_0"}
    recorded = check_run_settings(out, {"template": "zh"}, resume=False, run_only=first)
    assert json.loads(recorded.read_text()) == {"template": "zh", "runs": [first]}
    check_run_settings(out, {"template": "zh"}, resume=True, run_only=then)  # other weights: resumed, and said
    assert json.loads(recorded.read_text()) == {"template": "zh", "runs": [first, then]}
    with pytest.raises(SettingsMismatch, match="template: 'zh' then, 'en' now") as caught:
        check_run_settings(out, {"template": "en"}, resume=True, run_only=then)
    assert "runs" not in str(caught.value)
    check_run_settings(out, {"template": "en"}, resume=False, run_only=then)  # a fresh run: its own history
    assert json.loads(recorded.read_text()) == {"template": "en", "runs": [then]}


def test_generate_refuses_to_resume_with_another_prompt_but_not_another_batch_size(products, tiny_model_dir,
                                                                                  tmp_path, capsys):
    from llmtags.cli import main

    out, errors = tmp_path / "out.jsonl", tmp_path / "errors.jsonl"
    command = _command(products, tiny_model_dir, out, errors, "--limit", "4")[3:]
    assert main(command) == 0
    first = out.read_bytes()
    assert main([*command, "--resume", "--max-new-tokens", "4"]) == 2
    assert "max_new_tokens: 8 then, 4 now" in capsys.readouterr().err
    assert main([*command, "--resume", "--batch-size", "1", "--limit", "6"]) == 0
    assert out.read_bytes().startswith(first) and _lines(out) == 6  # --limit counts valid records
