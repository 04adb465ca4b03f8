"""Calibration of tag confidences, the calibrate command, and eval's candidate recall."""

from __future__ import annotations

import json

import pytest

from llmtags.calibrate import Outcome, at_threshold, calibrate, pick_threshold, reliability, tag_outcomes
from llmtags.cli import main
from llmtags.options import OptionsError, Settings, min_confidence
from llmtags.plan import plan_run

GOLDS = [["品牌:理肤泉", "产品词:防晒霜"], ["Brand:Nike", ["Color:Black", "Color:黑色"]]]
PREDS = [["品牌:理肤泉", "产品词:防晒", "品牌:理肤泉"], ["Brand:Nike", "Color:黑色", "Size:42"]]
CONFS = [[0.95, 0.4, 0.95], [0.9, 0.7, 0.2]]


def test_outcomes_follow_the_evaluators_matching():
    outcomes, gold_total = tag_outcomes(GOLDS, PREDS, CONFS)
    assert gold_total == 4
    # the duplicate 品牌:理肤泉 counts once, as in the evaluator
    assert outcomes == [Outcome(0.95, True), Outcome(0.4, False), Outcome(0.9, True), Outcome(0.7, True),
                        Outcome(0.2, False)]


def test_reliability_table_and_ece():
    outcomes = [Outcome(0.95, True), Outcome(0.95, False), Outcome(0.15, False), Outcome(0.15, False),
                Outcome(None, True)]
    bins, ece = reliability(outcomes, n_bins=10)
    assert [b.count for b in bins] == [0, 2, 0, 0, 0, 0, 0, 0, 0, 2]
    assert bins[9].accuracy == 0.5 and bins[9].mean_confidence == pytest.approx(0.95)
    assert ece == pytest.approx(0.5 * 0.45 + 0.5 * 0.15)
    perfect = [Outcome(1.0, True)] * 3 + [Outcome(0.0, False)] * 3
    assert reliability(perfect)[1] == 0.0


def test_threshold_reaches_the_target_precision_with_the_most_recall():
    outcomes, gold_total = tag_outcomes(GOLDS, PREDS, CONFS)
    assert at_threshold(outcomes, gold_total, 0.0).precision == pytest.approx(3 / 5)
    chosen = pick_threshold(outcomes, gold_total, 0.99)
    assert chosen is not None and chosen.threshold == 0.7 and chosen.precision == 1.0 and chosen.recall == 0.75
    assert pick_threshold([Outcome(0.9, False)], 1, 0.5) is None
    result = calibrate(GOLDS, PREDS, CONFS, target_precision=0.99)
    assert result.threshold == 0.7 and result.best_f1.f1 == pytest.approx(6 / 7)
    assert "ECE" in result.to_markdown()


def _write(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def _registry(tmp_path):
    from llmtags.adapters.registry import FORMAT_VERSION

    root = tmp_path / "adapters"
    (root / "zh").mkdir(parents=True)
    (root / "zh" / "llmtags.json").write_text(json.dumps({"format": FORMAT_VERSION}))
    for name in ("adapter_config.json", "adapter_model.safetensors"):  # only their presence is checked here
        (root / "zh" / name).write_text("{}")
    return root


def test_calibrate_command_stores_the_threshold_that_generate_then_uses(tmp_path, capsys):
    from llmtags.adapters.registry import read_metadata

    gold, pred = tmp_path / "dev.jsonl", tmp_path / "pred.jsonl"
    # A gold record without a prediction (dev generated in part) is left out, not scored as empty.
    _write(gold, [{"id": str(i), "text": "x", "tags": g} for i, g in enumerate(GOLDS + [["Brand:Puma"]])])
    _write(pred, [{"id": str(i), "tags": p, "confidence": c} for i, (p, c) in enumerate(zip(PREDS, CONFS))]
           + [{"id": "9", "tags": ["a:b"]}])  # no confidences: reported, skipped
    root = _registry(tmp_path)
    assert main(["calibrate", "--gold", str(gold), "--pred", str(pred), "--target-precision", "0.99",
                 "--adapter", "zh", "--adapters-root", str(root)]) == 0
    captured = capsys.readouterr()
    assert "record 3" in captured.err and "confidence" in captured.err
    stored = read_metadata(root / "zh")["calibration"]
    assert stored["threshold"] == 0.7 and stored["records"] == 2 and stored["at_threshold"]["recall"] == 0.75
    # The run plan reads the threshold from the adapter's metadata, which it resolved once.
    assert plan_run(Settings(min_confidence="calibrated", adapter="zh", adapters_root=str(root))).options.min_confidence == 0.7
    for bad in ("1.5", "high"):
        with pytest.raises(OptionsError, match="min-confidence"):
            min_confidence(Settings(min_confidence=bad))
    with pytest.raises(OptionsError, match="needs --adapter"):
        min_confidence(Settings(min_confidence="calibrated", adapter=None))
    assert main(["calibrate", "--gold", str(gold), "--pred", str(pred), "--target-precision", "1.01"]) == 1


def test_eval_reports_candidate_recall_and_records_test_metrics(tmp_path, capsys):
    from llmtags.adapters.registry import read_metadata

    gold, pred, vocab = tmp_path / "test.jsonl", tmp_path / "pred.jsonl", tmp_path / "train.jsonl"
    _write(gold, [{"id": "1", "text": "理肤泉防晒霜", "tags": ["品牌:理肤泉", "产品词:防晒霜"]}])
    _write(pred, [{"id": "1", "tags": ["品牌:理肤泉"]}])
    _write(vocab, [{"id": "t", "text": "理肤泉", "tags": ["品牌:理肤泉"]}])
    root = _registry(tmp_path)
    assert main(["eval", "--gold", str(gold), "--pred", str(pred), "--candidates", str(vocab),
                 "--record-to-adapter", "zh", "--adapters-root", str(root), "--errors", "1"]) == 0
    out = capsys.readouterr().out
    assert "Candidate recall: 0.500" in out
    assert "[理肤泉]防晒霜" in out  # the worst-records table highlights the predicted tags' evidence
    test = read_metadata(root / "zh")["metrics"]["test"]
    assert test["f1"] == pytest.approx(2 / 3, abs=1e-4) and test["candidate_recall"] == 0.5


def test_eval_protocol_extractgpt_scores_target_attributes_and_is_stored(tmp_path, capsys):
    from llmtags.adapters.registry import read_metadata

    gold, pred = tmp_path / "test.jsonl", tmp_path / "pred.jsonl"
    _write(gold, [{"id": "1", "text": "Nike Air 9", "schema": ["Brand", "Color", "Size"], "targets": ["Brand", "Size"],
                   "tags": ["Brand:Nike", "Size:9"]},
                  {"id": "2", "text": "Adidas", "schema": ["Brand", "Color"], "tags": ["Brand:Adidas"]}])
    _write(pred, [{"id": "1", "tags": ["Brand:Nike", "Color:Red", "Size:10"]}, {"id": "2", "tags": ["Color:Blue"]}])
    root = _registry(tmp_path)
    assert main(["eval", "--gold", str(gold), "--pred", str(pred), "--protocol", "extractgpt",
                 "--record-to-adapter", "zh", "--adapters-root", str(root)]) == 0
    out = capsys.readouterr().out
    # Record 1 (targets Brand, Size): VC + VW; Color:Red is outside its targets. Record 2 (no targets:
    # its schema, Brand and Color): VN for Brand, NV for Color. VC 1, VW 1, VN 1, NV 1.
    assert "| raw | extractgpt | 0.333 | 0.333 | 0.333 |" in out
    stored = read_metadata(root / "zh")["metrics"]["test"]
    assert stored["extractgpt"]["f1"] == pytest.approx(1 / 3, abs=1e-4)
    assert stored["f1"] == pytest.approx(2 * 1 / (2 * 1 + 3 + 2), abs=1e-4)  # strict: tp 1, fp 3, fn 2
    assert main(["eval", "--gold", str(gold), "--pred", str(pred)]) == 0
    assert "| extractgpt |" not in capsys.readouterr().out  # the default stays strict


def test_isotonic_map_pools_adjacent_violators_and_interpolates_between_blocks():
    from llmtags.isotonic import IsotonicMap, mean_gap

    # Scores 0.1..0.6 with successes 0,1,0,0,1,1: (0.2, 0.3, 0.4) violate order and pool to 1/3.
    pairs = [(0.1, False), (0.2, True), (0.3, False), (0.4, False), (0.5, True), (0.6, True)]
    fitted = IsotonicMap.fit(pairs)
    assert fitted.pairs == 6
    assert [round(fitted(s), 4) for s, _ in pairs] == [0.0, 0.3333, 0.3333, 0.3333, 1.0, 1.0]
    # Linear between blocks, flat outside the scores seen.
    assert fitted(0.15) == pytest.approx(1 / 6, abs=1e-5) and fitted(0.0) == 0.0 and fitted(0.99) == 1.0
    # Its mean over the pairs it was fitted on is their success rate (what PAV preserves).
    assert sum(fitted(s) for s, _ in pairs) / 6 == pytest.approx(0.5)
    # Equal scores share one block; a constant outcome gives a constant map.
    tied = IsotonicMap.fit([(0.9, True), (0.9, False), (0.2, False)])
    assert tied(0.9) == 0.5 and tied(0.2) == 0.0
    assert IsotonicMap.from_json(json.loads(json.dumps(fitted.to_json()))) == fitted
    with pytest.raises(ValueError, match="at least one"):
        IsotonicMap.fit([])
    with pytest.raises(ValueError, match="non-decreasing"):
        IsotonicMap((0.1, 0.2), (0.5, 0.4), 2)
    # Raw scores of 0.9 that are right half the time are off by 0.4; the map's own output is not.
    raw = [(0.9, True), (0.9, False)] * 5
    assert mean_gap(raw) == pytest.approx(0.4)
    assert mean_gap([(IsotonicMap.fit(raw)(s), ok) for s, ok in raw]) == pytest.approx(0.0)


def test_isotonic_map_weighs_tied_scores_together():
    from llmtags.isotonic import IsotonicMap

    # 0.1 is right half the time, 0.2 two times in three: already in order, nothing to pool. Added one pair
    # at a time, 0.2's first (failing) pair would have pooled both into one flat 0.6.
    fitted = IsotonicMap.fit([(0.1, False), (0.1, True), (0.2, False), (0.2, True), (0.2, True)])
    assert fitted(0.1) == 0.5 and fitted(0.2) == pytest.approx(2 / 3, abs=1e-5)
    with pytest.raises(ValueError, match="shares"):
        IsotonicMap((0.1,), (1.5,), 1)
