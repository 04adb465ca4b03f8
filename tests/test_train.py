"""`llmtags train` on the tiny random model: examples, masking, loss, saving, reloading, resuming, QLoRA.

Training steps on the tiny model are dominated by its 151k-token output layer, so these tests use a
short prompt template (`SHORT_TEMPLATE`) and few steps to stay well under a minute on two cores.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from llmtags.records import Record, load_labelled
from llmtags.options import TaggingOptions
from llmtags.prompts import load_template
from llmtags.tagger import build_prompt, tag_records
from llmtags.train.config import TrainConfig, TrainError, parse_layers, resolve_layers, warm_start_defaults
from llmtags.train.examples import build_examples
from llmtags.train.recipe import prepare_run, train, widened_layers

from conftest import DATASETS

SHORT_TEMPLATE = """{% block system %}
抽取标签。
{% endblock %}
{% block user %}
{{ text }}
{% endblock %}
{% block answer %}
{% for tag in tags %}
{{ tag }}
{% endfor %}
{% endblock %}
"""

RECORDS = [
    Record("r1", "兰蔻小黑瓶精华肌底液50ml", "美妆",
           tags=["品牌:兰蔻", "产品词:精华肌底液", "型号:50ml"]),
    Record("r2", "耐克男子跑步鞋 黑色", "运动", tags=["品牌:耐克", "产品词:跑步鞋"]),
    Record("r3", "得力中性笔0.5mm 12支", "文具", tags=["品牌:得力", "产品词:中性笔", "型号:0.5mm"]),
    Record("r4", "雅诗兰黛眼霜15ml", "美妆", tags=["品牌:雅诗兰黛", "产品词:眼霜", "型号:15ml"]),
    Record("r5", "李宁篮球鞋 白色", "运动", tags=["品牌:李宁", "产品词:篮球鞋"]),
    Record("r6", "晨光橡皮擦 4块装", "文具", tags=["品牌:晨光", "产品词:橡皮擦"]),
    Record("r7", "无标签的商品", None, tags=None),  # unlabelled: not a training example
]


@pytest.fixture(scope="module")
def short_template(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("templates") / "short.j2"
    path.write_text(SHORT_TEMPLATE, encoding="utf-8")
    return str(path)


def _config(tiny_model_dir: Path, template: str, trainer: str = "trl", **overrides) -> TrainConfig:
    """A tiny run; `trainer` "trl" (trl's SFTTrainer) or "fast" (the fast CPU trainer, train/fast.py)."""
    values = dict(base_model=str(tiny_model_dir), template=template, rank=8, alpha=16, dropout=0.0, lr=2e-2,
                  warmup_ratio=0.0, schedule="constant", batch_size=3, grad_accum=1, log_every=1, eval_every=0,
                  eval_limit=3, max_new_tokens=12, device="cpu", fast=trainer == "fast", dtype="float32")
    values.update(overrides)  # float32 unless a test says otherwise: `auto` depends on the CPU
    return TrainConfig(**values)


def test_config_from_toml_and_overrides(tmp_path):
    path = tmp_path / "train.toml"
    path.write_text('[train]\nrank = 8\nlayers = "top4"\nlr = 1e-4\ntarget-modules = ["q_proj", "v_proj"]\n')
    config = TrainConfig.from_toml(path)
    assert (config.rank, config.layers, config.lr, config.target_modules) == (8, 4, 1e-4, ["q_proj", "v_proj"])
    merged = config.merged(rank=32, lr=None, layers="all")
    assert (merged.rank, merged.lr, merged.layers) == (32, 1e-4, "all")
    path.write_text("rank = 8\nlearning_rat = 1\n")
    with pytest.raises(TrainError, match="learning_rat"):
        TrainConfig.from_toml(path)
    assert parse_layers("20,22-23") == [20, 22, 23]
    assert resolve_layers(8, 24) == list(range(16, 24))
    assert resolve_layers(8, 2) is None and resolve_layers("all", 24) is None
    with pytest.raises(TrainError):
        resolve_layers([30], 24)
    for bad in ({"demo_text": "spans"}, {"text_budget": 10}):
        with pytest.raises(TrainError, match=next(iter(bad))):
            TrainConfig(**bad).validate()
    whole = TrainConfig(text_budget=0)  # as generate's --text-budget 0: whole texts, recorded as unset
    whole.validate()
    assert whole.text_budget is None


def test_training_prompts_keep_the_prompt_budget_generate_uses(tiny_engine):
    """--demo-text title --text-budget N in training: the prompts are those generate makes with the same flags."""
    from llmtags.retrieve import DemoPool

    description = "Bright and warm. " * 30 + "Colour: Black. " + "Fits every room. " * 30
    records = [Record(f"r{i}", f"Acme desk lamp {i}\n{description}", tags=["Brand:Acme", "Color:Black"])
               for i in range(3)]
    pool = DemoPool(records)
    examples = build_examples(records[:1], tiny_engine.tokenizer, "tuned", pool=pool, retrieve=1,
                              demo_text="title", text_budget=200)
    options = TaggingOptions(template=load_template("tuned"), pool=pool, retrieve=1, demo_text="title",
                             text_budget=200)
    assert examples[0]["prompt"] == build_prompt(records[0], tiny_engine.tokenizer, options, training=True)
    whole = build_examples(records[:1], tiny_engine.tokenizer, "tuned", pool=pool, retrieve=1)
    assert len(examples[0]["prompt"]) < len(whole[0]["prompt"]) - 500


def test_examples_are_the_inference_prompt_and_the_prompt_is_masked(tiny_model_dir, tmp_path):
    """The prompt trained on is token for token what generation sees; only the answer carries loss."""
    records = RECORDS[:3] + [Record("en1", "Nike Air Zoom running shoe, black", tags=["Brand:Nike"])]
    if (DATASETS / "zh-taobao-ner" / "train.jsonl").is_file():
        records += load_labelled(DATASETS / "zh-taobao-ner" / "train.jsonl")[:2]
    config = _config(tiny_model_dir, "auto", max_steps=1, max_length=400)
    run = prepare_run(records, [], config, tmp_path / "out", progress=False)
    tokenizer = run.tokenizer
    examples = build_examples(records, tokenizer, "auto")
    assert len(examples) == len(records)
    dataset = run.trainer.train_dataset
    assert len(dataset) == len(records)
    for record, example, row in zip(records, examples, dataset):
        assert example["prompt"] == build_prompt(record, tokenizer, TaggingOptions())
        assert example["completion"].endswith("<|im_end|>")
        prompt_ids = tokenizer(example["prompt"], add_special_tokens=False)["input_ids"]
        n = len(prompt_ids)
        assert row["input_ids"][:n] == prompt_ids
        assert row["labels"][:n] == [-100] * n
        assert row["labels"][n:] == row["input_ids"][n:]
        assert tokenizer.decode(row["input_ids"][n:]) == example["completion"]
    # After collation, padding carries no loss either.
    batch = next(iter(run.trainer.get_train_dataloader()))
    assert ((batch["labels"] == -100) | (batch["attention_mask"] == 1)).all()
    assert (batch["labels"] != -100).any()


def test_training_prompts_offer_candidates_but_not_a_records_own_unseen_tags(tiny_engine, tmp_path):
    from llmtags.candidates import CandidateFinder, load_candidate_vocabulary

    labelled = tmp_path / "labelled.jsonl"
    extra = Record("x", "兰蔻粉水", tags=["品牌:兰蔻"])  # 品牌:兰蔻 is seen twice, 产品词:精华肌底液 once
    labelled.write_text("".join(json.dumps({"id": r.id, "text": r.text, "tags": r.tags}, ensure_ascii=False) + "\n"
                                for r in RECORDS[:1] + [extra]), encoding="utf-8")
    finder = CandidateFinder(load_candidate_vocabulary(str(labelled)))
    (example,) = build_examples(RECORDS[:1], tiny_engine.tokenizer, "zh", finder)
    assert "品牌:兰蔻" in example["prompt"] and "精华肌底液" not in example["prompt"].split("商品")[0]
    inference = build_prompt(RECORDS[0], tiny_engine.tokenizer, TaggingOptions(template="zh", candidates=finder))
    assert "产品词:精华肌底液" in inference  # at inference every vocabulary entry found is offered


@pytest.mark.parametrize("trainer", ["trl", "fast"])
def test_training_lowers_the_loss_saves_an_adapter_and_reloads_it_identically(tiny_model_dir, short_template,
                                                                             tmp_path, trainer):
    from llmtags.adapters.registry import read_metadata
    from llmtags.engines.adapter_set import AdapterSet
    from llmtags.engines.transformers import TransformersEngine

    out = tmp_path / "adapter"
    # One batch holds all six examples, so every step's loss is measured on the same data.
    # The span proposer: asked for with the fast trainer; with trl, `auto` leaves it out, since the short
    # template does not render `proposals`.
    config = _config(tiny_model_dir, short_template, trainer, max_steps=6, layers="all", lr=5e-2, batch_size=6,
                     span_proposer=True if trainer == "fast" else "auto")
    result = train(RECORDS, [], config, out, "llmtags train test", data={"train": "RECORDS", "licence": "test"},
                   progress=False)
    losses = [loss for _, loss in result.losses]
    assert len(losses) == 6 and result.global_step == 6
    # A random 64-wide model over a 151k vocabulary can gain little more than a nat: ask for a clear drop.
    assert losses[-1] < losses[0] - 0.2 and losses[-1] == min(losses), losses

    files = sorted(p.name for p in out.iterdir() if p.is_file())
    meta = read_metadata(out)
    if trainer == "fast":  # trained on the 6 labelled records, cross-fitted in 5 folds, shipped
        assert files == ["adapter_config.json", "adapter_model.safetensors", "llmtags.json",
                         "proposer.calibration.json", "proposer.crfsuite", "proposer.features.json"]
        assert meta["proposer"]["texts"] == 6 and meta["proposer"]["folds"] == 5
        # Its confidence calibrated on the records its fold models read, the file's sha256 recorded.
        assert meta["proposer"]["calibration"]["records"] > 0 and meta["proposer"]["calibration_sha256"]
        assert set(meta["proposer"]["out_of_fold"]) == {"precision", "recall", "f1"}
    else:
        assert files == ["adapter_config.json", "adapter_model.safetensors", "llmtags.json"] and "proposer" not in meta
    assert meta["base_model"]["spec"] == str(tiny_model_dir)
    assert meta["template"]["name"] == "short" and len(meta["template"]["sha256"]) == 64
    assert meta["command"] == "llmtags train test" and meta["data"]["licence"] == "test"
    assert meta["hyperparameters"]["layers_to_transform"] is None and meta["hyperparameters"]["qlora"] is False

    options = TaggingOptions(template=meta["template"]["spec"], max_new_tokens=12, batch_size=4)
    result.model.eval()
    trained = [r.raw for r in tag_records(RECORDS, TransformersEngine(result.model, result.tokenizer), options)]
    reloaded_set = AdapterSet.load(str(tiny_model_dir), device="cpu")
    reloaded_set.add(out, template=short_template)
    reloaded = [r.raw for r in tag_records(RECORDS, reloaded_set.engine("adapter"), options)]
    assert reloaded == trained
    base = [r.raw for r in tag_records(RECORDS, reloaded_set.engine(None), options)]
    assert base != trained  # the adapter changed the model


@pytest.mark.parametrize("trainer", ["trl", "fast"])
def test_resume_continues_from_the_last_checkpoint_and_keeps_the_best_adapter(tiny_model_dir, short_template,
                                                                              tmp_path, trainer):
    from transformers import TrainerCallback

    class Interrupt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise KeyboardInterrupt

    class CountSteps(TrainerCallback):
        steps: list[int] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.steps.append(state.global_step)

    out = tmp_path / "resumable"
    config = _config(tiny_model_dir, short_template, trainer, max_steps=4, save_every=2, eval_every=1, layers=1)
    dev = RECORDS[:2]
    with pytest.raises(KeyboardInterrupt):
        train(RECORDS, dev, config, out, progress=False, callbacks=[Interrupt()])
    assert sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*")) == ["checkpoint-2"]
    assert not (out / "llmtags.json").exists()
    with pytest.raises(TrainError, match="--resume"):
        train(RECORDS, dev, config, out, progress=False)

    counter = CountSteps()
    result = train(RECORDS, dev, config, out, progress=False, resume=True, callbacks=[counter])
    assert result.start_step == 2 and result.global_step == 4
    assert counter.steps == [3, 4]
    # Evaluation by generation ran every step across the interruption; step 3's first evaluation, made after
    # the checkpoint, was dropped when step 3 was trained again. The final adapter is the best one.
    assert [e["step"] for e in result.evals] == [1, 2, 3, 4]
    assert all(0.0 <= e["f1"] <= 1.0 and e["records"] == 2 for e in result.evals)
    # Each evaluation records the seconds of training so far, carried across the resume: a learning curve
    # against CPU time.
    seconds = [e["train_seconds"] for e in result.evals]
    # (A tiny model's step takes milliseconds: the sum only has to grow, and be above zero by the end.)
    assert seconds == sorted(seconds) and seconds[-1] > 0
    meta = json.loads((out / "llmtags.json").read_text())
    assert meta["metrics"]["dev"]["f1"] == result.best["f1"] and meta["metrics"]["test"] is None
    assert (out / "adapter_model.safetensors").read_bytes() == (out / "best" / "adapter_model.safetensors").read_bytes()
    # Adapters sit on the top layer only (layers=1 of the tiny model's 2).
    assert meta["hyperparameters"]["layers_to_transform"] == [1]
    assert json.loads((out / "adapter_config.json").read_text())["layers_to_transform"] == [1]


def test_auto_dtype_is_chosen_when_a_run_starts_and_kept_when_it_resumes(tiny_model_dir, short_template, tmp_path,
                                                                         monkeypatch, capsys):
    from transformers import TrainerCallback

    from llmtags import models
    from llmtags.train import recipe

    class Interrupt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                raise KeyboardInterrupt

    monkeypatch.setattr(models, "cpu_has_bf16", lambda cpuinfo=None: True)
    out = tmp_path / "auto"
    config = _config(tiny_model_dir, short_template, "fast", max_steps=3, save_every=1, layers=1, dtype="auto")
    with pytest.raises(KeyboardInterrupt):
        train(RECORDS, RECORDS[:2], config, out, progress=False, callbacks=[Interrupt()])
    assert (out / "checkpoints" / "dtype").read_text() == "bfloat16"
    assert "--dtype auto: bf16 autocast over fp32 weights" in capsys.readouterr().err
    # Resumed where `auto` means float32 (another machine): the run keeps the dtype its cache was made in.
    monkeypatch.setattr(models, "cpu_has_bf16", lambda cpuinfo=None: False)
    result = train(RECORDS, RECORDS[:2], config, out, progress=False, resume=True)
    assert result.start_step == 1 and result.metadata["hyperparameters"]["compute_dtype"] == "bfloat16"
    # A run whose checkpoints hold no record began before `auto` chose bf16 on a CPU: it stays float32.
    legacy = tmp_path / "legacy"
    (legacy / "checkpoints" / "checkpoint-5").mkdir(parents=True)
    monkeypatch.setattr(models, "cpu_has_bf16", lambda cpuinfo=None: True)
    assert recipe._run_dtype("auto", legacy, "cpu", resume=True) == "float32"
    assert recipe._run_dtype("auto", legacy, "cpu", resume=False) == "auto"
    assert recipe._run_dtype("bfloat16", legacy, "cpu", resume=True) == "bfloat16"


@pytest.mark.parametrize("trainer", ["trl", "fast"])
def test_a_signal_stops_after_the_step_and_still_writes_the_best_adapter(tiny_model_dir, short_template, tmp_path,
                                                                         trainer):
    import os
    import signal

    from transformers import TrainerCallback

    class Terminate(TrainerCallback):  # as `kill PID` or Ctrl-C would, in the middle of step 2
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 1:
                os.kill(os.getpid(), signal.SIGTERM)

    def harmless(signum, frame):  # if the run left SIGTERM to this, the test fails instead of killing pytest
        raise AssertionError("SIGTERM reached the handler set before training")

    out = tmp_path / "stopped"
    config = _config(tiny_model_dir, short_template, trainer, max_steps=6, save_every=4, eval_every=0, layers=1)
    before = signal.signal(signal.SIGTERM, harmless)
    try:
        result = train(RECORDS, RECORDS[:2], config, out, progress=False, callbacks=[Terminate()])
        assert result.global_step == 2 and signal.getsignal(signal.SIGTERM) is harmless
    finally:
        signal.signal(signal.SIGTERM, before)
    assert [e["step"] for e in result.evals] == [2] and (out / "checkpoints" / "checkpoint-2").is_dir()
    meta = json.loads((out / "llmtags.json").read_text())
    assert meta["metrics"]["dev"]["step"] == 2 and (out / "adapter_model.safetensors").is_file()
    # The run can go on from where it stopped.
    assert train(RECORDS, RECORDS[:2], config, out, progress=False, resume=True).global_step == 6


def test_qlora_trains_a_4bit_base_on_cuda(tiny_model_dir, short_template, tmp_path):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: QLoRA loads the base in 4 bits with bitsandbytes, which needs a GPU")
    pytest.importorskip("bitsandbytes")
    from llmtags.engines.adapter_set import AdapterSet

    out = tmp_path / "qlora"
    config = _config(tiny_model_dir, short_template, max_steps=3, device="cuda", qlora="auto")
    result = train(RECORDS, RECORDS[:2], config, out, progress=False)
    assert result.metadata["hyperparameters"]["qlora"] is True
    assert result.metadata["hyperparameters"]["compute_dtype"] == "bfloat16"
    adapter_set = AdapterSet.load(str(tiny_model_dir), device="cuda", load_in_4bit=True)
    adapter_set.add(out, template=short_template)
    options = TaggingOptions(template=short_template, max_new_tokens=8)
    assert len(list(tag_records(RECORDS[:2], adapter_set.engine("qlora"), options))) == 2


def test_data_description_records_every_training_file(tmp_path):
    from llmtags.train.recipe import data_description

    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("a\n")
    b.write_text("b\n")
    data = data_description(RECORDS, [], [str(a), str(b)], None, "test")
    assert data["train"] == [str(a), str(b)]
    assert len(data["train_sha256"]) == 2 and data["train_sha256"][0] != data["train_sha256"][1]


def test_train_command_interleaves_several_files(tiny_model_dir, short_template, tmp_path):
    from llmtags.adapters.registry import read_metadata
    from llmtags.cli import main

    def write(path, records):
        path.write_text("".join(json.dumps({"id": r.id, "text": r.text, "tags": r.tags}, ensure_ascii=False) + "\n"
                                for r in records), encoding="utf-8")
        return str(path)

    first, second = write(tmp_path / "a.jsonl", RECORDS[:3]), write(tmp_path / "b.jsonl", RECORDS[3:6])
    dev = write(tmp_path / "dev.jsonl", RECORDS[:2])
    assert main(["train", first, second, "--dev", dev, "--out", str(tmp_path / "ad"), "--base-model",
                 str(tiny_model_dir), "--template", short_template, "--max-steps", "1", "--batch-size", "4",
                 "--grad-accum", "1", "--limit", "4", "--eval-every", "0", "--eval-limit", "1",
                 "--max-new-tokens", "4", "--layers", "1", "-q"]) == 0
    data = read_metadata(tmp_path / "ad")["data"]
    assert data["train"] == [first, second] and data["dev"] == dev
    assert data["train_records"] == 4 and len(data["train_sha256"]) == 2  # r1, r4, r2, r5: both files


@pytest.mark.parametrize("trainer", ["trl", "fast"])
def test_warm_start_continues_an_adapters_weights_with_its_shape(tiny_model_dir, short_template, tmp_path, trainer):
    from safetensors.torch import load_file

    from llmtags.adapters.registry import read_metadata
    from llmtags.cli import main
    from llmtags.models import sha256_file

    first = tmp_path / "first"
    train(RECORDS, [], _config(tiny_model_dir, short_template, trainer, max_steps=2, rank=4, layers=1), first,
          progress=False)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"id": r.id, "text": r.text, "tags": r.tags}, ensure_ascii=False) + "\n"
                            for r in RECORDS), encoding="utf-8")
    common = ["--base-model", str(tiny_model_dir), "--template", short_template, "--max-steps", "1",
              "--batch-size", "2", "--grad-accum", "1", "--eval-every", "0", "--eval-limit", "0", "-q",
              "--fast", "true" if trainer == "fast" else "false"]
    # A learning rate of 1e-9 leaves the weights where the warm start put them.
    assert main(["train", str(data), "--out", str(tmp_path / "second"), "--init-adapter", str(first),
                 "--rank", "16", "--skip", "2", "--lr", "1e-9", "--schedule", "constant", *common]) == 0

    config = json.loads((tmp_path / "second" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["layers_to_transform"] == [1]  # the first adapter's shape, not --rank
    before = load_file(first / "adapter_model.safetensors")
    after = load_file(tmp_path / "second" / "adapter_model.safetensors")
    assert before.keys() == after.keys()
    assert any(t.abs().max() > 0 for k, t in before.items() if "lora_B" in k)  # not a fresh (zero) lora_B
    for key in before:
        assert torch.allclose(before[key], after[key], atol=1e-6), key
    meta = read_metadata(tmp_path / "second")
    assert meta["hyperparameters"]["init_adapter"]["sha256"] == sha256_file(first / "adapter_model.safetensors")
    assert meta["hyperparameters"]["rank"] == 4 and meta["data"]["train_records"] == 4  # 6 labelled, 2 skipped
    assert meta["hyperparameters"]["trainer"] == trainer

    with pytest.raises(TrainError, match="also the output"):
        train(RECORDS, [], _config(tiny_model_dir, short_template, max_steps=1, init_adapter=str(first)), first,
              overwrite=True, progress=False)
    other_template = tmp_path / "other.j2"
    other_template.write_text(SHORT_TEMPLATE.replace("抽取标签。", "抽取全部标签。"), encoding="utf-8")
    with pytest.raises(ValueError, match="prompt template") as refused:
        train(RECORDS, [], _config(tiny_model_dir, str(other_template), max_steps=1, init_adapter=str(first)),
              tmp_path / "third", progress=False)
    assert "uses it anyway" not in str(refused.value)  # train has no flag that forces a mismatched warm start


def test_a_warm_start_takes_the_adapters_prompt_where_the_run_sets_none(tmp_path):
    """Workflow (b): `train SAMPLE --init-adapter en-products` trains on en-products' prompt (template, budget,
    length, proposer features), its candidates and neighbours drawn from the sample; what the run sets stays."""
    from llmtags.adapters.registry import read_metadata
    from llmtags.cli.train import given_settings

    meta = read_metadata(Path(__file__).parents[1] / "adapters" / "en-products")
    config, lines = warm_start_defaults(TrainConfig(), set(), meta, "sample.jsonl")
    assert (config.base_model, config.template, config.retrieve, config.demos, config.candidates) == (
        "embedded", "tuned", 2, "sample.jsonl", "sample.jsonl")
    assert (config.max_length, config.proposer_features, config.batch_size, config.grad_accum) == (512, 2, 8, 1)
    assert {"--template tuned", "--candidates the training records", "--batch-size 8", "--grad-accum 1"} <= set(lines)

    toml = tmp_path / "run.toml"
    toml.write_text("[train]\nretrieve = 0\n", encoding="utf-8")
    given = given_settings(argparse.Namespace(train_config=str(toml), template="zh", max_length=None, batch_size=4))
    assert given >= {"retrieve", "template", "batch_size"} and "max_length" not in given
    kept, lines = warm_start_defaults(TrainConfig(template="zh", batch_size=4), given, meta, "sample.jsonl")
    assert (kept.template, kept.retrieve, kept.demos, kept.candidates) == ("zh", 0, None, "sample.jsonl")
    assert (kept.batch_size, kept.grad_accum) == (4, 4)  # one of the pair set: the run chose its batch
    assert not any(line.startswith(("--template", "--retrieve", "--demos")) for line in lines)


def test_a_warm_start_widens_to_more_layers_keeping_its_weights_and_starting_the_new_ones_at_zero(
        tiny_model_dir, short_template, tmp_path):
    from safetensors.torch import load_file

    first = tmp_path / "first"
    train(RECORDS, [], _config(tiny_model_dir, short_template, "fast", max_steps=2, rank=4, layers=1), first,
          progress=False)
    # layers=2 names both of the tiny model's layers: the adapter's layer 1 and a new layer 0.
    wide = tmp_path / "wide"
    train(RECORDS, [], _config(tiny_model_dir, short_template, "fast", max_steps=1, layers=2, lr=1e-9,
                               schedule="constant", init_adapter=str(first)), wide, progress=False)
    config = json.loads((wide / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["layers_to_transform"] == [0, 1]
    before, after = load_file(first / "adapter_model.safetensors"), load_file(wide / "adapter_model.safetensors")
    assert set(before) < set(after)
    for key in before:
        assert torch.allclose(before[key], after[key], atol=1e-6), key
    new = [k for k in after if k not in before]
    assert new and all(".layers.0." in k for k in new)
    assert all(after[k].abs().max() < 1e-6 for k in new if "lora_B" in k)  # a new layer changes nothing yet
    assert any(after[k].abs().max() > 0 for k in new if "lora_A" in k)

    # Layers that do not hold all of the adapter's, and more, keep the adapter's shape, as before.
    assert widened_layers([1], 1, 2) is None and widened_layers([1], [0], 2) is None
    assert widened_layers("all", 1, 2) is None and widened_layers([20, 21], "all", 24) == list(range(24))
