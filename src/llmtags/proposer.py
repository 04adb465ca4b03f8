"""Stage 2b: the span proposer, a linear-chain CRF trained on the catalogue's labelled records in seconds.

A CRF (python-crfsuite) labels each token of a product's text B-attribute / I-attribute / O. Its spans,
each with its attribute and the marginal probability of its labels, go into the prompt as proposals
(`proposals` in the template), so the model reads them in context, fixes their boundaries and
attributes, normalises values and adds what no span tagger can find, instead of re-learning where a
model number ends.

- `tokenize`: every CJK character is a token, a run of Latin letters and digits is one (the word rule of
  `spans.py`), any other non-space character is one.
- `bio_labels`: a labelled record's gold values located in its text (`spans.ValueIndex`, longest first,
  compared as the evaluator compares them) become the token labels. Values not in the text (implicit,
  normalised) are the model's job and label nothing.
- `Features`: what the CRF sees of each token. Version 2 (the default) adds to version 1's token, shape,
  neighbours, bigrams and affixes: trigrams, the record's category, and a gazetteer of the training values
  (cross-fitted in training, like the proposals themselves). It is saved beside the model
  (`proposer.features.json`); a model without that file is version 1 and reads as it was trained.
- `SpanProposer.train` / `SpanProposer(path)`: one crfsuite model file; `propose(record)` gives the
  Viterbi spans, each with the least marginal probability of its tokens' labels (a lower bound on the
  span's own probability), limited to the record's schema when it has one.
- Calibration: the CRF's probability of a record's whole labelling orders records well but is no
  probability of being right. `CrossFitted.calibrate` fits, on out-of-fold records, an isotonic map from it
  to the share of records whose proposals are exactly their gold tags (`proposer.calibration.json` beside
  the model); a proposer that has one reports that as its confidence, which the cascade reads.
- `CrossFitted`: training prompts must look like test prompts. A CRF applied to its own training records
  proposes almost exactly their gold tags, so a model trained on such prompts learns to copy proposals.
  `CrossFitted` cuts the training records into k folds and proposes for each record with the CRF trained
  on the other folds; records outside the training set (dev) get the CRF trained on all of them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import tempfile
import time
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pycrfsuite

from .atomic import write_text
from .baselines import DictionaryTagger
from .hygiene import name_key
from .isotonic import IsotonicMap, mean_gap
from .metrics import canonical, gold_forms, match_record, score, split_tag
from .records import Record
from .spans import ValueIndex, is_cjk, is_word_char, value_key

# The feature set new proposers are trained with; a saved model expects the features it was trained on, and
# its version is read from the file beside it (`features_path`; no such file: version 1).
# 1: the token, its shape, neighbours ±2, bigrams, affixes, spaces, title/body.
# 2: 1 + trigrams, the record's category (alone and with the token: one model serves a catalogue's categories)
#    and the gazetteer, the proposer's training values found in the text. On dev (2026-12-06,
#    eval/baseline_crf_dev.md) it lifts zh-taobao-ner and en-oa-mine + en-ae-110k by 0.01 to 0.03 F1.
FEATURES_VERSION = 2
FEATURE_VERSIONS = (1, 2)
GAZETTEER_FOLDS = 5  # a training record's gazetteer features come from the values of the other folds' records
# Bump when `tokenize`, `bio_labels` or `fold_of` change: cached fold models (`CrossFitted`) and sample
# proposers (`sample_proposer`) made before are then trained again.
FOLDS_VERSION = 1
OUTSIDE = "O"
# Folds for calibrating a catalogue sample's proposer (`sample_proposer(calibrate=True)`): on 2 cores, 3 fold
# models and the whole sample's train in two rounds, as the whole sample's alone would take one.
SAMPLE_CALIBRATION_FOLDS = 3
# Bump when what calibration fits on, or how, changes: calibrations of an earlier version are not read.
CALIBRATION_VERSION = 1


@dataclass(frozen=True)
class Proposal:
    """One span the CRF found: `tag` is `attribute:text[start:end]`, `p` its marginal probability."""

    tag: str
    attribute: str
    value: str
    start: int
    end: int
    p: float


@dataclass(frozen=True)
class ProposerSettings:
    """What shapes a trained proposer; stored beside it (an adapter's `llmtags.json`)."""

    c1: float = 0.05  # L1 regularisation: keeps the model small
    c2: float = 0.05  # L2 regularisation
    # L-BFGS iterations. 80 scores as well as 150 on zh-taobao-ner and en-wdc-pave and better on
    # en-oa-mine + en-ae-110k (stopping early regularises), in half the time (eval/baseline_crf.md).
    max_iterations: int = 80
    features: int = FEATURES_VERSION  # the feature set (FEATURE_VERSIONS) it is trained with

    def __post_init__(self) -> None:
        check_features_version(self.features)

    @classmethod
    def recorded(cls, values: Mapping[str, Any]) -> ProposerSettings:
        """The settings an adapter's `llmtags.json` records (`proposer.settings`); keys this llmtags does not
        know are left out, so an adapter packed by a later version still loads."""
        return cls(**{k: v for k, v in values.items() if k in cls.__dataclass_fields__})


def check_features_version(version: int) -> None:
    if version not in FEATURE_VERSIONS:
        raise ValueError(f"span proposer features version {version}: this llmtags computes versions "
                         f"{', '.join(map(str, FEATURE_VERSIONS))}; train the proposer again")


# --- tokens and features -----------------------------------------------------------------------------


def tokenize(text: str) -> list[tuple[int, int]]:
    """The [start, end) character spans of `text`'s tokens (see the module docstring)."""
    spans: list[tuple[int, int]] = []
    start = None
    for i, ch in enumerate(text):
        if is_word_char(ch):
            if start is None:
                start = i
            continue
        if start is not None:
            spans.append((start, i))
            start = None
        if not ch.isspace():
            spans.append((i, i + 1))
    if start is not None:
        spans.append((start, len(text)))
    return spans


def _shape(token: str) -> str:
    """'Aa0' style shape, runs collapsed: 'XER106R' → 'A0A0', '理肤泉' → 'C'."""
    out: list[str] = []
    for ch in token:
        kind = "C" if is_cjk(ch) else "A" if ch.isupper() else "a" if ch.isalpha() else "0" if ch.isdigit() else ch
        if not out or out[-1] != kind:
            out.append(kind)
    return "".join(out)


def token_words(text: str, spans: Sequence[tuple[int, int]]) -> list[str]:
    """The tokens as features name them: NFKC, case folded."""
    return [unicodedata.normalize("NFKC", text[s:e]).casefold() for s, e in spans]


def token_features(text: str, spans: Sequence[tuple[int, int]], words: Sequence[str]) -> list[list[str]]:
    """Binary features of every token (feature set 1; `words` are its `token_words`): the token and its
    shape, its neighbours ±2, bigrams, affixes of Latin words, whether space surrounds it, and whether it
    is in the first line (the title)."""
    shapes = [_shape(text[s:e]) for s, e in spans]
    title_end = text.find("\n")
    n = len(spans)

    def word(i: int) -> str:
        return words[i] if 0 <= i < n else ("<s>" if i < 0 else "</s>")

    rows: list[list[str]] = []
    for i, (start, end) in enumerate(spans):
        w = words[i]
        row = [f"w={w}", f"s={shapes[i]}", f"w-1={word(i - 1)}", f"w+1={word(i + 1)}", f"w-2={word(i - 2)}",
               f"w+2={word(i + 2)}", f"b-={word(i - 1)}|{w}", f"b+={w}|{word(i + 1)}",
               f"s-1={shapes[i - 1] if i else '<s>'}", f"s+1={shapes[i + 1] if i + 1 < n else '</s>'}",
               f"i={min(i, 4)}"]
        if len(w) > 1 and not is_cjk(w[0]):
            row += [f"p2={w[:2]}", f"p3={w[:3]}", f"x2={w[-2:]}", f"x3={w[-3:]}", f"len={min(len(w), 8)}"]
        if start > 0 and text[start - 1].isspace():
            row.append("sp-")
        if end < len(text) and text[end].isspace():
            row.append("sp+")
        if 0 <= title_end < start:
            row.append("body")
        rows.append(row)
    return rows


@dataclass
class Features:
    """The features of a proposer's version (`FEATURE_VERSIONS`); version 2 adds trigrams, the record's
    category and the `gazetteer` (value key → attribute: the values of the records it learnt from)."""

    version: int = FEATURES_VERSION
    gazetteer: Mapping[str, str] = field(default_factory=dict)
    _index: ValueIndex | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_features_version(self.version)
        self._index = ValueIndex(self.gazetteer) if self.gazetteer else None

    @classmethod
    def of_records(cls, records: Iterable[Record], version: int = FEATURES_VERSION) -> Features:
        """The features of a proposer trained on `records`: version 2's gazetteer holds their values."""
        if version == 1:
            return cls(1)
        # The dictionary baseline's value → attribute rule: any-of forms, no punctuation-only values.
        values = DictionaryTagger.from_records(records).values
        return cls(version, {key: attribute for key, attribute in values.items() if attribute})

    def rows(self, text: str, spans: Sequence[tuple[int, int]], category: str | None = None) -> list[list[str]]:
        words = token_words(text, spans)
        rows = token_features(text, spans, words)
        if self.version == 1:
            return rows
        n = len(spans)

        def word(i: int) -> str:
            return words[i] if 0 <= i < n else ("<s>" if i < 0 else "</s>")

        for i, row in enumerate(rows):
            row += [f"t-={word(i - 2)}|{word(i - 1)}|{word(i)}", f"t0={word(i - 1)}|{word(i)}|{word(i + 1)}",
                    f"t+={word(i)}|{word(i + 1)}|{word(i + 2)}"]
            if category:
                row += [f"c={category}", f"c|w={category}|{words[i]}"]
        if self._index is not None:
            # Every gazetteer value on token boundaries marks its tokens with its attribute, their place in
            # it (Single, Begin, Inside, End) and its length in tokens (up to 5).
            starts = {s: i for i, (s, _) in enumerate(spans)}
            ends = {e: i for i, (_, e) in enumerate(spans)}
            for match in self._index.matches(text):
                first, last = starts.get(match.start), ends.get(match.end)
                if first is None or last is None:
                    continue
                attribute = self.gazetteer[match.key]
                length = min(last - first + 1, 5)
                for i in range(first, last + 1):
                    place = "S" if first == last else "B" if i == first else "E" if i == last else "I"
                    rows[i] += [f"g={place}-{attribute}", f"gl={place}-{attribute}-{length}"]
        return rows

    def save(self, model_path: Path) -> None:
        """Written beside the model (`features_path`), atomically; version 1 writes nothing (and removes a
        stale file), so proposers trained before version 2 read as they did."""
        path = features_path(model_path)
        if self.version == 1:
            path.unlink(missing_ok=True)
            return
        write_text(path, json.dumps({"version": self.version, "gazetteer": dict(self.gazetteer)}, ensure_ascii=False))

    @classmethod
    def load(cls, model_path: Path) -> Features:
        path = features_path(model_path)
        if not path.is_file():
            return cls(1)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls(int(data["version"]), dict(data.get("gazetteer") or {}))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"cannot read the span proposer's features {path}: {exc}") from exc


def calibration_path(model_path: str | Path) -> Path:
    """The file of a proposer's confidence calibration (an `IsotonicMap`), beside its model:
    `proposer.crfsuite` → `proposer.calibration.json`."""
    model_path = Path(model_path)
    return model_path.with_name(f"{model_path.stem}.calibration.json")


def features_path(model_path: str | Path) -> Path:
    """The file of a proposer's feature version and gazetteer, beside its model: `proposer.crfsuite` →
    `proposer.features.json`."""
    model_path = Path(model_path)
    return model_path.with_name(f"{model_path.stem}.features.json")


def bio_labels(text: str, tags: Sequence[Any], spans: Sequence[tuple[int, int]]) -> list[str]:
    """BIO labels of `text`'s tokens from gold `tags`: every occurrence of a gold value (any accepted form),
    longest first and without overlaps, labelled with its attribute. Values that do not start and end on
    token boundaries label nothing."""
    by_key: dict[str, str] = {}
    for tag in tags:
        for form in gold_forms(tag):
            attribute, value = split_tag(form)  # ASCII or full-width colon, as the evaluator splits
            key = value_key(value)
            if attribute and key and key not in by_key:
                by_key[key] = attribute
    labels = [OUTSIDE] * len(spans)
    if not by_key:
        return labels
    starts = {s: i for i, (s, _) in enumerate(spans)}
    ends = {e: i for i, (_, e) in enumerate(spans)}
    for match in ValueIndex(by_key).longest_matches(text):
        first, last = starts.get(match.start), ends.get(match.end)
        if first is None or last is None or any(label != OUTSIDE for label in labels[first:last + 1]):
            continue
        attribute = by_key[match.key]
        labels[first] = f"B-{attribute}"
        for i in range(first + 1, last + 1):
            labels[i] = f"I-{attribute}"
    return labels


def spans_of(labels: Sequence[str]) -> list[tuple[str, int, int]]:
    """(attribute, first token, last token) of each labelled span; an I- without its B- starts one."""
    found: list[tuple[str, int, int]] = []
    current: list[Any] | None = None
    for i, label in enumerate(labels):
        kind, _, attribute = label.partition("-")
        if kind == "I" and current is not None and current[0] == attribute:
            current[2] = i
            continue
        if current is not None:
            found.append(tuple(current))  # type: ignore[arg-type]
            current = None
        if kind in ("B", "I"):
            current = [attribute, i, i]
    if current is not None:
        found.append(tuple(current))  # type: ignore[arg-type]
    return found


# --- the proposer ------------------------------------------------------------------------------------


def training_sequences(records: Iterable[Record], version: int = FEATURES_VERSION
                       ) -> Iterable[tuple[list[list[str]], list[str]]]:
    """The (features, labels) of each labelled record with text. A record's gazetteer features come from the
    values of the records outside its fold (`GAZETTEER_FOLDS`): with its own values in the gazetteer, the
    feature would mark exactly its gold spans, the CRF would trust it alone, and at test time miss every
    value the gazetteer lacks (zh-taobao-ner dev F1 0.578 against 0.669 cross-fitted)."""
    labelled = [record for record in records if record.tags and tokenize(record.text)]
    by_fold = [Features.of_records([r for r in labelled if _gazetteer_fold(r) != fold], version)
               for fold in range(GAZETTEER_FOLDS)] if version > 1 else [Features(1)] * GAZETTEER_FOLDS
    for record in labelled:
        spans = tokenize(record.text)
        features = by_fold[_gazetteer_fold(record)]
        yield features.rows(record.text, spans, record.category), bio_labels(record.text, record.tags, spans)


def _gazetteer_fold(record: Record) -> int:
    # Salted: independent of `CrossFitted`'s folds (`fold_of` of the bare text), so no inner fold is empty.
    return fold_of(f"gazetteer:{record.text}", GAZETTEER_FOLDS)


class SpanProposer:
    """A trained CRF (one crfsuite model file) that proposes `Proposal`s for a text."""

    def __init__(self, path: str | Path, settings: ProposerSettings | None = None) -> None:
        self.path = Path(path)
        self.features = Features.load(self.path)
        self.settings = settings or ProposerSettings(features=self.features.version)
        self._tagger = pycrfsuite.Tagger()
        try:
            self._tagger.open(str(self.path))
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read the proposer model {path}: {exc}") from exc
        self.labels = list(self._tagger.labels())
        self.attributes = {canonical(label.partition("-")[2]) for label in self.labels if label != OUTSIDE}
        self.calibration = load_calibration(self.path)  # None: confidences are the raw path probability

    def calibrate(self, calibration: IsotonicMap) -> None:
        """Write `calibration` beside the model (atomically) and report confidences through it from now on."""
        write_text(calibration_path(self.path), json.dumps({**calibration.to_json(), "version": CALIBRATION_VERSION}))
        self.calibration = calibration

    @classmethod
    def train(cls, records: Iterable[Record], path: str | Path,
              settings: ProposerSettings = ProposerSettings()) -> SpanProposer:
        """Train on the labelled `records` and write the model to `path` (atomically)."""
        records = list(records)
        trainer = pycrfsuite.Trainer(verbose=False)
        count = 0
        for features, labels in training_sequences(records, settings.features):
            trainer.append(features, labels)
            count += 1
        if not count:
            raise ValueError("the span proposer needs labelled records with text to train on")
        trainer.set_params({"c1": settings.c1, "c2": settings.c2, "max_iterations": settings.max_iterations,
                            "feature.possible_transitions": True})
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            trainer.train(str(tmp))
            # At test time the gazetteer holds every training value.
            Features.of_records([r for r in records if r.tags], settings.features).save(path)
            calibration_path(path).unlink(missing_ok=True)  # a new model: an earlier one's calibration is not its
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return cls(path, settings)

    def propose_text(self, text: str, attributes: Sequence[str] | None = None,
                     category: str | None = None) -> list[Proposal]:
        """The Viterbi spans of `text` (a product of `category`, where known), in text order, one per tag (the
        likelier where a tag repeats); with `attributes`, only spans of those attributes."""
        return self.read_text(text, attributes, category)[0]

    def read_text(self, text: str, attributes: Sequence[str] | None = None,
                  category: str | None = None, raw: bool = False) -> tuple[list[Proposal], float | None]:
        """`propose_text`, and the proposer's confidence in the record: the CRF's probability of its whole
        labelling (the Viterbi path's), mapped through the proposer's calibration where it has one (and not
        `raw`) to the share of such records whose proposals are exactly right. The cascade (`--cascade P`)
        lets the proposer alone tag a record it is at least that sure of. None where the CRF cannot vouch
        for the record: a text without tokens, or `attributes` naming one it never learnt (its "nothing
        here" means nothing there)."""
        spans = tokenize(text)
        if not spans:
            return [], None
        self._tagger.set(self.features.rows(text, spans, category))
        labels = self._tagger.tag()
        allowed = {canonical(a) for a in attributes} if attributes else None
        known = allowed is None or allowed <= self.attributes
        confidence = round(float(self._tagger.probability(labels)), 4) if known else None
        if confidence is not None and self.calibration is not None and not raw:
            confidence = round(self.calibration(confidence), 4)  # mapped as rounded, as it was fitted
        best: dict[str, Proposal] = {}
        for attribute, first, last in spans_of(labels):
            if allowed is not None and canonical(attribute) not in allowed:
                continue
            start, end = spans[first][0], spans[last][1]
            value = " ".join(text[start:end].split())  # one line, as tags are compared (offsets stay exact)
            p = min(self._tagger.marginal(labels[i], i) for i in range(first, last + 1))
            proposal = Proposal(f"{attribute}:{value}", attribute, value, start, end, round(float(p), 4))
            key = canonical(proposal.tag)
            if key not in best or best[key].p < proposal.p:
                best[key] = proposal
        return sorted(best.values(), key=lambda p: p.start), confidence

    def propose(self, record: Record, original: Record | None = None) -> list[Proposal]:
        """The spans of `record` (as prompts see it: its text may be cut). `original` (the record before
        it was cut) matters only to `CrossFitted`, which picks the fold by it."""
        return self.propose_text(record.text, record.schema, record.category)

    def read(self, record: Record, raw: bool = False) -> tuple[list[Proposal], float | None]:
        """`propose` and the confidence of `read_text`, for tagging (not training: no folds here)."""
        return self.read_text(record.text, record.schema, record.category, raw)


def load_calibration(model_path: Path) -> IsotonicMap | None:
    """The calibration beside the model; None where there is none, or one of an earlier `CALIBRATION_VERSION`
    (a sample's is then fitted again on its next --cascade run)."""
    path = calibration_path(model_path)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return IsotonicMap.from_json(data) if data.get("version") == CALIBRATION_VERSION else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"cannot read the span proposer's calibration {path}: {exc}") from exc


def exactly_right(model: SpanProposer, record: Record) -> tuple[float, bool] | None:
    """(`model`'s raw confidence in labelled `record`, whether its proposals are exactly the gold tags), the
    pair calibration learns from; None where the model cannot vouch for the record."""
    proposals, confidence = model.read(record, raw=True)
    if confidence is None:
        return None
    counts = match_record(record.tags or [], [p.tag for p in proposals])
    return confidence, counts.fp == 0 and counts.fn == 0


def sample_proposer(records: Sequence[Record], cache_dir: str | Path,
                    settings: ProposerSettings = ProposerSettings(), log: Any = None,
                    calibrate: bool = False) -> SpanProposer:
    """The proposer of a catalogue's labelled sample (`generate --demos SAMPLE`): trained on first use and
    kept in `cache_dir` under the hash of the sample's texts and tags and the settings, so the next run
    of the same sample loads it in milliseconds. With `calibrate` (the cascade reads its confidence), it
    is calibrated on first use too, on the out-of-fold records of `SAMPLE_CALIBRATION_FOLDS` fold models."""
    labelled = [r for r in records if r.tags]
    key = hashlib.sha256(f"{sha256_texts(labelled)}:{json.dumps(asdict(settings), sort_keys=True)}:"
                         f"{FOLDS_VERSION}".encode())
    path = Path(cache_dir) / f"{key.hexdigest()[:24]}.crfsuite"
    if path.is_file() and (not calibrate or load_calibration(path) is not None):
        return SpanProposer(path, settings)
    started = time.perf_counter()
    what = "trained"
    if not calibrate:
        proposer = SpanProposer.train(labelled, path, settings)
    else:
        # The fold models are needed once: trained in a scratch directory, only the calibration is kept.
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="llmtags-calibration-", dir=path.parent) as work:
            fitted = CrossFitted.train(labelled, k=SAMPLE_CALIBRATION_FOLDS, settings=settings, workdir=work,
                                       progress=log is not None)
            if fitted.calibrate(labelled)["records"]:
                what = "trained and calibrated"
            else:  # it is tagged uncalibrated (load_proposer warns), and tried again on the next run
                what = "trained (not calibrated: it can vouch for none of its records)"
            # The features file and the calibration first: the model's presence marks a complete proposer.
            for beside in (features_path, calibration_path):
                if beside(fitted.full.path).is_file():
                    os.replace(beside(fitted.full.path), beside(path))
            os.replace(fitted.full.path, path)
        proposer = SpanProposer(path, settings)
    if log is not None:
        log(f"{what} the span proposer on {len(labelled)} labelled records in {time.perf_counter() - started:.0f} s "
            f"(kept in {path})")
    return proposer


def sha256_texts(records: Iterable[Record]) -> str:
    digest = hashlib.sha256()
    for record in records:
        digest.update(json.dumps([record.text, record.tags], ensure_ascii=False).encode("utf-8"))
    return digest.hexdigest()


def fold_of(text: str, folds: int) -> int:
    """A record's fold, from its text: the same record lands in the same fold in every run."""
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:8], 16) % folds


@dataclass
class CrossFitted:
    """Proposals for training prompts: each training record's from the CRF that did not see it (k folds by
    `fold_of`); other records' from the CRF trained on all (`full`)."""

    full: SpanProposer
    folds: list[SpanProposer | None]  # None: no labelled record outside that fold
    seconds: float = 0.0  # training all k + 1 models (0 where reused)
    full_seconds: float = 0.0  # training `full` alone
    _texts: dict[str, int] = field(default_factory=dict)

    @classmethod
    def train(cls, records: Sequence[Record], k: int = 5, settings: ProposerSettings = ProposerSettings(),
              workdir: str | Path | None = None, progress: bool = False) -> CrossFitted:
        """The CRF of all `records` (`full`) and its k fold models, in `workdir`. Models of the same records
        and settings that an earlier run left there (a resumed training) are reused, not trained again.
        `progress`: a bar over the models being trained."""
        if k < 2:
            raise ValueError(f"cross-fitting needs k >= 2 folds, not {k}")
        started = time.perf_counter()
        labelled = [r for r in records if r.tags]
        if not labelled:
            raise ValueError("the span proposer needs labelled records to train on")
        texts = {r.text: fold_of(r.text, k) for r in labelled}
        directory = Path(workdir or tempfile.mkdtemp(prefix="llmtags-folds-"))
        directory.mkdir(parents=True, exist_ok=True)
        # Everything the models depend on: the records, the fold of each, the settings, the code's version.
        key = {"records": sha256_texts(labelled), "folds": hashlib.sha256(json.dumps(sorted(texts.values())).encode())
               .hexdigest(), "k": k, "settings": asdict(settings), "version": FOLDS_VERSION}
        key_file = directory / "folds.json"
        try:
            reuse = json.loads(key_file.read_text(encoding="utf-8")) == key
        except (OSError, ValueError):
            reuse = False
        if not reuse:  # a run of other records may have died half-way: none of its models may be reused
            key_file.unlink(missing_ok=True)

        outside = [[r for r in labelled if texts[r.text] != fold] for fold in range(k)]
        paths = [directory / "all.crfsuite", *(directory / f"fold-{fold}.crfsuite" for fold in range(k))]
        subsets = [labelled, *outside]
        todo = [i for i, (path, subset) in enumerate(zip(paths, subsets)) if subset and not (reuse and path.is_file())]
        seconds = train_in_parallel([paths[i] for i in todo], [subsets[i] for i in todo], settings,
                                    progress=progress)
        full_seconds = seconds[0] if todo and todo[0] == 0 else 0.0
        full = SpanProposer(paths[0], settings)
        folds = [SpanProposer(path, settings) if rest else None for path, rest in zip(paths[1:], outside)]
        write_text(key_file, json.dumps(key))
        return cls(full, folds, time.perf_counter() - started, full_seconds, texts)

    def quality(self, records: Sequence[Record]) -> dict[str, dict[str, float]]:
        """Proposal quality on `records` (the training records) in-fold and out-of-fold: the gap between
        the two is what cross-fitting keeps out of the training prompts."""
        labelled = [r for r in records if r.tags]
        return {"in_fold": proposal_quality(labelled, [self.in_fold(r) for r in labelled]),
                "out_of_fold": proposal_quality(labelled, [self.propose(r) for r in labelled])}

    def propose(self, record: Record, original: Record | None = None) -> list[Proposal]:
        """`record`'s spans from the CRF of the other folds when it is a training record (found by the text
        of `original`, the record before prompts cut its text; else by its own), else from `full`. A
        fold whose complement held no labelled record has no CRF: its records get no proposals."""
        fold = self._texts.get((original or record).text)
        if fold is None:
            return self.full.propose(record)
        model = self.folds[fold]
        return model.propose(record) if model is not None else []

    def calibrate(self, records: Sequence[Record]) -> dict[str, Any]:
        """Calibrate `full`'s confidence on the training `records`, each read by the fold model that did
        not see it (so the map learns how sure the CRF is of texts it never saw), and write the map beside
        `full`. Returns what the adapter records of it: the records fitted on, the share of them exactly
        right, and the expected calibration error of the raw confidence there."""
        pairs = []
        for record in records:
            fold = self._texts.get(record.text)
            model = self.folds[fold] if fold is not None else None
            pair = exactly_right(model, record) if model is not None and record.tags is not None else None
            if pair is not None:
                pairs.append(pair)
        if not pairs:
            return {"records": 0}
        self.full.calibrate(IsotonicMap.fit(pairs))
        return {"records": len(pairs), "exactly_right": round(sum(ok for _, ok in pairs) / len(pairs), 4),
                "raw_ece": round(mean_gap(pairs), 4)}

    def shipped(self, records: Sequence[Record]) -> dict[str, Any]:
        """What an adapter records about its proposer (`adapters.pack.pack_adapter(proposer=...)`): the model
        file to ship (calibrated here), its settings, the records and folds it was trained on, the
        cross-fitting gap and the calibration."""
        # train_seconds: None where a resumed run reused the model it had trained before.
        return {"model": self.full.path, "settings": asdict(self.full.settings), "texts": len(self._texts),
                "folds": len(self.folds), "train_seconds": round(self.full_seconds, 1) if self.full_seconds else None,
                **self.quality(records), "calibration": self.calibrate(records)}

    def in_fold(self, record: Record) -> list[Proposal]:
        """What the CRF trained on every record proposes: the leak cross-fitting avoids (for the report)."""
        return self.full.propose(record)


def calibrate_trained(proposer: SpanProposer, records: Sequence[Record], k: int = 5,
                      workdir: str | Path | None = None, progress: bool = False) -> dict[str, Any]:
    """Calibrate an already trained `proposer` (an adapter's, shipped before calibration existed) on the
    labelled `records` it was trained on, with k fold models trained here as `CrossFitted.train` trains
    them (reused from `workdir` where a training run left them; none: trained in a scratch directory and
    removed after). Returns `CrossFitted.calibrate`'s summary."""
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="llmtags-calibration-") as work:
            return calibrate_trained(proposer, records, k, work, progress)
    fitted = CrossFitted.train(records, k=k, settings=proposer.settings, workdir=workdir, progress=progress)
    return dataclasses.replace(fitted, full=proposer).calibrate(records)


def _train_one(path: Path, records: list[Record], settings: ProposerSettings) -> float:
    started = time.perf_counter()
    SpanProposer.train(records, path, settings)
    return time.perf_counter() - started


def train_in_parallel(paths: Sequence[Path], subsets: Sequence[list[Record]], settings: ProposerSettings,
                      workers: int | None = None, progress: bool = False) -> list[float]:
    """Train one CRF per (path, records) pair, as many at once as there are cores (crfsuite trains on one
    core); returns each one's training seconds. Workers are spawned, not forked: the caller may be a
    training process whose torch thread pools must not be copied. `progress`: a bar over the models
    (minutes on a catalogue with descriptions)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    from tqdm import tqdm

    if not paths:
        return []
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = min(len(paths), workers or cores)
    desc = f"span proposer: {len(paths)} CRFs, {workers} at a time"
    with tqdm(total=len(paths), unit="CRF", desc=desc, disable=not progress, file=sys.stderr) as bar:
        if workers > 1 and not multiprocessing.current_process().daemon:  # a daemonic process may not have children
            try:
                with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
                    futures = [pool.submit(_train_one, path, subset, settings) for path, subset in zip(paths, subsets)]
                    for _ in as_completed(futures):
                        bar.update(1)
                    return [future.result() for future in futures]
            except (BrokenProcessPool, RuntimeError, OSError):
                pass  # e.g. a script without a __main__ guard, which spawn cannot start: train one after another
        seconds = []
        for path, subset in zip(paths, subsets):
            seconds.append(_train_one(path, subset, settings))
            bar.update(1)
        return seconds


def unanswered(proposals: Sequence[Proposal], tags: Sequence[str], min_p: float) -> list[Proposal]:
    """The proposals at least `min_p` likely that the model's answer (`tags`) leaves out: no tag's value
    overlaps theirs (one holds the other, compared as the evaluator compares values). A tag over the same
    words is the model's reading of that span (it may have fixed the boundary or the attribute) and
    stands; `--fill P` adds back only the spans the model was silent on."""
    written = [value_key(split_tag(tag)[1]) for tag in tags]
    left = []
    for proposal in proposals:
        if proposal.p < min_p:
            continue
        key = value_key(proposal.value)
        if key and not any(w and (holds(key, w) or holds(w, key)) for w in written):
            left.append(proposal)
    return left


def holds(outer: str, inner: str) -> bool:
    """`inner` is part of `outer` (both `value_key`s): as whole words, so that `S` is not found in `shoes`
    nor `1` in `16GB`; a value with CJK characters, written without spaces, may sit anywhere."""
    if any(is_cjk(ch) for ch in inner):
        return inner in outer
    return f" {inner} " in f" {outer} "


def decide(tags: Sequence[str], proposals: Sequence[Proposal], attributes: Iterable[str]) -> tuple[list[str], list[Proposal]]:
    """`--proposer-decides`: for `attributes` (chosen on dev records, where the CRF's spans score higher
    than the model's tags), the answer's tags give way to the proposer's spans. Returns (the answer's tags
    for the other attributes, the proposals that replace the rest). Names compare as the schema compares them."""
    decided = {name_key(name) for name in attributes}
    if not decided:
        return list(tags), []
    kept = [tag for tag in tags if name_key(split_tag(tag)[0] or "") not in decided]
    return kept, [p for p in proposals if name_key(p.attribute) in decided]


def confirmed(tags: Sequence[str], confidences: Sequence[float | None], proposals: Sequence[Proposal],
              below: float | None, known: bool = True) -> list[str]:
    """`--confirm-below C`: the answer's `tags`, less those the model wrote with a confidence (parallel to
    `tags`; None: unknown, kept) under `below` that no proposal confirms (the same tag, compared as the
    evaluator compares tags). Two taggers that err differently agree mostly where both are right: on dev,
    the model's unsure tags that the CRF also found are right far more often than those it found alone.

    Not for a product of a category the proposer's catalogue does not know (not `known`): there its
    silence says nothing (`fuse`), and a phone's unsure `Model Number:S24 Ultra` would be lost."""
    if below is None or not known:
        return list(tags)
    proposed = {canonical(p.tag) for p in proposals}
    # Compared as written in the output (3 decimals), so that eval/fill.py, which reads a run's output,
    # drops what generate drops.
    return [tag for tag, confidence in zip(tags, confidences)
            if confidence is None or round(confidence, 3) >= below or canonical(tag) in proposed]


def fuse(tags: Sequence[str], proposals: Sequence[Proposal], fill: float | None,
         decides: Iterable[str] = (), known: bool = True) -> tuple[list[str], list[Proposal]]:
    """Model fusion: (the answer's tags that stand, the proposals that join them). The attributes the
    proposer `decides` take its spans instead of the model's tags (`decide`); with `fill`, the spans of at
    least that marginal the answer is silent on are added (`unanswered`).

    For a product of a category the proposer's catalogue does not know (not `known`), it decides nothing:
    it was chosen as the better judge on that catalogue's products only, and elsewhere it reads other
    products' patterns into the text (a LEGO set's number as `Color:75257`) or, silent, would drop what the
    model found (a phone's `Model Number:S24 Ultra`). Only `fill` adds its surest spans there."""
    kept, taken = decide(tags, proposals, decides if known else ())
    if fill is not None:
        taken += unanswered(proposals, kept + [p.tag for p in taken], fill)
    return kept, taken


def proposal_quality(records: Sequence[Record], proposals: Sequence[Sequence[Proposal]]) -> dict[str, float]:
    """Micro precision, recall and F1 of proposals as tags against gold, scored as the evaluator scores tags
    (`metrics.score`: an any-of group counts once)."""
    micro = score([r.tags or [] for r in records], [[p.tag for p in found] for found in proposals]).micro
    precision, recall, f1 = micro.precision, micro.recall, micro.f1
    return {"precision": round(precision, 4), "recall": round(recall, 4), "f1": round(f1, 4)}
