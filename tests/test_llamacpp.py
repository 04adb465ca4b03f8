"""The llama.cpp engine gives the transformers engine's outputs, from the same tiny weights.

The tiny random Qwen2 is written as a float32 GGUF (`gguf_export.qwen2_to_gguf`), so both engines
run the same numbers; only summation order differs, so texts must match and log-probabilities agree
to 1e-3 (absolute or relative). The embedded Q4_K_M model is not compared here: transformers dequantises it to float32 and
llama.cpp does not, so their tags differ within quantisation noise (F1 of both in
eval/bench_generate.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install 'llmtags[llamacpp]')")

from llmtags.constrain.spec import ConstraintSpec  # noqa: E402
from llmtags.records import Record  # noqa: E402
from llmtags.options import TaggingOptions  # noqa: E402
from llmtags.tagger import build_prompt  # noqa: E402

RECORDS = [
    Record("r1", "理肤泉特护清盈防晒霜SPF50 30ml", "美妆"),
    Record("r2", "耐克男子跑步鞋 黑色 42码", "运动"),
    Record("r3", "得力中性笔0.5mm 12支装 办公用品", "文具"),
    Record("r4", "Nike Air Zoom Pegasus running shoe, men's, black", "运动"),
    Record("r5", "雅诗兰黛小棕瓶眼霜15ml", "美妆"),
    Record("r6", "Apple iPhone 15 Pro Max 256GB titanium", "手机"),
    Record("r7", "李宁篮球鞋", "运动"),
]
MAX_NEW = 24


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    from llmtags.adapters.gguf_export import qwen2_to_gguf
    from llmtags.models import embedded_gguf

    return qwen2_to_gguf(tiny_model_dir, tmp_path_factory.mktemp("gguf") / "tiny.gguf", embedded_gguf())


@pytest.fixture(scope="module")
def llama_engine(tiny_gguf: Path, tiny_engine):
    from llmtags.engines.llamacpp import LlamaCppEngine

    return LlamaCppEngine(tiny_gguf, tiny_engine.tokenizer, n_ctx=2048)


@pytest.fixture(scope="module")
def prompts(tiny_engine) -> list[str]:
    return [build_prompt(r, tiny_engine.tokenizer, TaggingOptions(template="auto")) for r in RECORDS]


def _assert_same(expected, got) -> None:
    assert [g.text for g in got] == [e.text for e in expected]
    for e, g in zip(expected, got):
        assert g.new_tokens == e.new_tokens
        assert g.token_ends == e.token_ends
        assert g.token_logprobs == pytest.approx(e.token_logprobs, rel=1e-3, abs=1e-3)
        assert (g.end_logprob is None) == (e.end_logprob is None)


def test_same_outputs_as_transformers(llama_engine, tiny_engine, prompts):
    expected = tiny_engine.generate(prompts, max_new_tokens=MAX_NEW, batch_size=3)
    assert any(e.text for e in expected)
    _assert_same(expected, llama_engine.generate(prompts, max_new_tokens=MAX_NEW))


def test_prefix_cache_and_batch_width_change_nothing(llama_engine, tiny_engine):
    from llmtags.engines.llamacpp import PREFIX_MIN_TOKENS, common_prefix_length

    # One template, as when prompts are routed by language: they share the system prompt.
    prompts = [build_prompt(r, tiny_engine.tokenizer, TaggingOptions(template="zh")) for r in RECORDS]
    encoded = llama_engine.tokenizer(prompts, add_special_tokens=False)["input_ids"]
    assert common_prefix_length(encoded) >= PREFIX_MIN_TOKENS  # so the cached run really shares one
    cached = llama_engine.generate(prompts, max_new_tokens=MAX_NEW)
    llama_engine.prefix_cache = False
    try:
        uncached = llama_engine.generate(prompts, max_new_tokens=MAX_NEW)
    finally:
        llama_engine.prefix_cache = True
    _assert_same(uncached, cached)
    _assert_same(uncached, llama_engine.generate(prompts, max_new_tokens=MAX_NEW, batch_size=1))
    _assert_same(uncached, llama_engine.generate(prompts, max_new_tokens=MAX_NEW, batch_size=2))


def test_progress_counts_every_prompt(llama_engine, prompts):
    seen: list[int] = []
    assert len(llama_engine.generate(prompts, max_new_tokens=4, on_batch=seen.append)) == len(prompts)
    assert sum(seen) == len(prompts)
    assert llama_engine.generate([], max_new_tokens=4) == []


def test_common_prefix_length():
    from llmtags.engines.llamacpp import common_prefix_length

    assert common_prefix_length([[1, 2, 3], [1, 2, 4], [1, 2]]) == 2
    assert common_prefix_length([[5, 6]]) == 2
    assert common_prefix_length([[1], [2]]) == 0
    assert common_prefix_length([]) == 0


def test_constraints_match_transformers(llama_engine, tiny_engine, prompts):
    specs = [ConstraintSpec("extract", text=r.text) for r in RECORDS]
    expected = tiny_engine.generate(prompts, max_new_tokens=MAX_NEW, batch_size=4, constraints=specs)
    got = llama_engine.generate(prompts, max_new_tokens=MAX_NEW, constraints=specs)
    _assert_same(expected, got)
    from llmtags.parse import parse_tags

    for record, generation in zip(RECORDS, got):
        for tag in parse_tags(generation.text):
            assert tag.split(":", 1)[1] in record.text


def _tiny_lora(base_dir: Path, out: Path, seed: int, **config_kwargs) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                              "up_proj", "down_proj"],
                        init_lora_weights=False, task_type="CAUSAL_LM", **config_kwargs)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():  # large enough to change the greedy outputs
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    peft_model.save_pretrained(out, safe_serialization=True)
    return out


@pytest.mark.parametrize("rslora", [False, True])
def test_converted_lora_matches_peft(tmp_path, tiny_model_dir, tiny_engine, llama_engine, prompts, rslora):
    from peft import PeftModel

    from llmtags.engines.transformers import TransformersEngine

    adapter = _tiny_lora(tiny_model_dir, tmp_path / "lora", seed=3, use_rslora=rslora)
    peft_engine = TransformersEngine.load(str(tiny_model_dir), device="cpu")  # peft changes the model it wraps
    peft_engine.model = PeftModel.from_pretrained(peft_engine.model, str(adapter)).eval()
    expected = peft_engine.generate(prompts, max_new_tokens=MAX_NEW, batch_size=4)
    base = tiny_engine.generate(prompts, max_new_tokens=MAX_NEW, batch_size=4)
    assert [e.text for e in expected] != [b.text for b in base]  # the adapter matters
    name = f"lora-{rslora}"
    llama_engine.add_adapter(name, adapter)
    try:
        llama_engine.use_adapter(name)
        _assert_same(expected, llama_engine.generate(prompts, max_new_tokens=MAX_NEW))
    finally:
        llama_engine.use_adapter(None)
    _assert_same(base, llama_engine.generate(prompts, max_new_tokens=MAX_NEW))


def test_a_scaled_lora_matches_peft_at_that_scale_and_scale_zero_is_the_base(tmp_path, tiny_model_dir, tiny_engine,
                                                                            llama_engine, prompts):
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    from llmtags.engines.transformers import TransformersEngine

    adapter = _tiny_lora(tiny_model_dir, tmp_path / "lora", seed=5)
    # A random model's near-tied logits part greedy paths after a few dozen tokens under float noise.
    short = 12
    peft_engine = TransformersEngine.load(str(tiny_model_dir), device="cpu")
    peft_engine.model = PeftModel.from_pretrained(peft_engine.model, str(adapter)).eval()
    full = peft_engine.generate(prompts, max_new_tokens=short, batch_size=4)
    for module in peft_engine.model.modules():
        if isinstance(module, LoraLayer):
            module.set_scale("default", 0.5)
    half = peft_engine.generate(prompts, max_new_tokens=short, batch_size=4)
    base = tiny_engine.generate(prompts, max_new_tokens=short, batch_size=4)
    assert len({tuple(g.text for g in run) for run in (full, half, base)}) == 3  # the scale matters
    llama_engine.add_adapter("scaled", adapter)
    try:
        llama_engine.use_adapter("scaled", 0.5)
        _assert_same(half, llama_engine.generate(prompts, max_new_tokens=short))
        llama_engine.use_adapter("scaled", 0.0)
        _assert_same(base, llama_engine.generate(prompts, max_new_tokens=short))
        llama_engine.use_adapter("scaled")
        _assert_same(full, llama_engine.generate(prompts, max_new_tokens=short))
    finally:
        llama_engine.use_adapter(None)


def test_an_adapter_added_again_under_its_name_replaces_it_and_an_uncached_one_leaves_no_file(
        tmp_path, tiny_model_dir, tiny_engine, llama_engine, prompts, monkeypatch):
    monkeypatch.setenv("LLMTAGS_CACHE", str(tmp_path / "cache"))
    first = _tiny_lora(tiny_model_dir, tmp_path / "first", seed=6)
    second = _tiny_lora(tiny_model_dir, tmp_path / "second", seed=7)
    llama_engine.add_adapter("second-cached", second)  # the reference: converted and cached as generate does
    cached = sorted((tmp_path / "cache").rglob("*.gguf"))
    assert len(cached) == 1
    try:
        llama_engine.use_adapter("second-cached")
        expected_second = llama_engine.generate(prompts, max_new_tokens=MAX_NEW)
        llama_engine.add_adapter("dev", first, cache=False)
        llama_engine.use_adapter("dev")
        got_first = llama_engine.generate(prompts, max_new_tokens=MAX_NEW)
        assert [g.text for g in got_first] != [e.text for e in expected_second]  # the two adapters differ
        llama_engine.add_adapter("dev", second, cache=False)  # replaces the one in use
        llama_engine.use_adapter("dev")
        _assert_same(expected_second, llama_engine.generate(prompts, max_new_tokens=MAX_NEW))
        llama_engine.remove_adapter("dev")
        _assert_same(tiny_engine.generate(prompts, max_new_tokens=MAX_NEW, batch_size=4),
                     llama_engine.generate(prompts, max_new_tokens=MAX_NEW))
    finally:
        llama_engine.use_adapter(None)
        llama_engine.remove_adapter("second-cached")
    assert sorted((tmp_path / "cache").rglob("*.gguf")) == cached  # the uncached conversions are gone


def test_a_training_runs_dev_evaluation_on_llama_cpp_tags_as_the_transformers_engine_does(tmp_path, tiny_model_dir,
                                                                                         tiny_gguf):
    """The trained adapter as it stands at each evaluation, converted for llama.cpp, answers as the training
    model itself does (same float32 weights), and a later evaluation sees the weights as they are then."""
    from types import SimpleNamespace

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from llmtags.tagger import tag_records
    from llmtags.train.callbacks import callback_classes
    from llmtags.train.recipe import _callbacks
    from llmtags.train.config import TrainConfig
    from llmtags.models import load_tokenizer, resolve_base_model

    tokenizer = load_tokenizer(resolve_base_model(str(tiny_model_dir)))
    torch.manual_seed(8)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                           LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"],
                                      init_lora_weights=False, task_type="CAUSAL_LM"))
    records = [Record(r.id, r.text, r.category, tags=["品牌:理肤泉"]) for r in RECORDS[:4]]
    options = TaggingOptions(template="auto", max_new_tokens=MAX_NEW, batch_size=4)
    evals = {kind: callback_classes()["GenerationEval"](records, tokenizer, options, 1, tmp_path / kind,
                                                        callback_classes()["LossProgress"](enabled=False), False,
                                                        engine=kind, base_model=str(tiny_gguf))
             for kind in ("transformers", "llama.cpp")}

    def answers(kind):
        model.eval()
        return [r.raw for r in tag_records(records, evals[kind]._engine(model), options)]

    for step in (1, 2):
        with torch.no_grad():  # the weights a step would have changed, large enough to change the answers
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.5)
        expected = answers("transformers")
        assert answers("llama.cpp") == expected
        entry = evals["llama.cpp"].evaluate(model, SimpleNamespace(global_step=step, epoch=0.1 * step, log_history=[]))
        assert entry["engine"] == "llama.cpp" and entry["step"] == step
        if step == 1:
            first = expected
    assert first != expected  # the second evaluation saw the new weights

    def pick(base: str, engine: str = "auto") -> str:  # the recipe's choice of engine for a run's evaluations
        config = TrainConfig(base_model=base, eval_engine=engine)
        return _callbacks(config, records, tokenizer, options, tmp_path / "run", False, False, "cpu")[1].engine_kind

    # auto: llama.cpp for a GGUF base on CPU (as generate picks), transformers for a model directory
    assert pick(str(tiny_gguf)) == "llama.cpp"
    assert pick(str(tiny_model_dir)) == "transformers"
    assert pick(str(tiny_gguf), "transformers") == "transformers"
    with pytest.raises(ValueError, match="--eval-engine llama.cpp"):
        pick(str(tiny_model_dir), "llama.cpp")


def test_unconvertible_adapters_are_refused(tmp_path, tiny_model_dir):
    from llmtags.adapters.gguf_export import GgufExportError, lora_to_gguf

    adapter = _tiny_lora(tiny_model_dir, tmp_path / "lora", seed=4)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(GgufExportError, match="use_dora"):
        lora_to_gguf(adapter, tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()


def test_pick_engine(tiny_model_dir, tiny_gguf):
    from llmtags.engines.select import pick_engine
    from llmtags.models import ModelError

    assert pick_engine("auto", str(tiny_gguf), "cpu") == "llama.cpp"
    assert pick_engine("auto", "embedded", "cpu") == "llama.cpp"
    assert pick_engine("auto", str(tiny_model_dir), "cpu") == "transformers"
    assert pick_engine("auto", str(tiny_gguf), "cpu", dtype="bfloat16") == "transformers"
    assert pick_engine("transformers", str(tiny_gguf), "cpu") == "transformers"
    with pytest.raises(ModelError, match="dtype"):
        pick_engine("llama.cpp", str(tiny_gguf), "cpu", dtype="float32")


def test_llama_cpp_needs_a_gguf(tiny_model_dir):
    from llmtags.models import ModelError, resolve_gguf_base

    with pytest.raises(ModelError, match="GGUF"):
        resolve_gguf_base(str(tiny_model_dir))


def test_cli_engines_agree(tmp_path, tiny_model_dir, tiny_gguf):
    """`generate --engine llama.cpp` on the GGUF writes what `--engine transformers` writes on the
    same weights in a model directory."""
    from llmtags.cli import main

    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"id": r.id, "text": r.text}, ensure_ascii=False) + "\n" for r in RECORDS))
    outputs = {}
    for engine, base in (("transformers", tiny_model_dir), ("llama.cpp", tiny_gguf)):
        out = tmp_path / f"{engine}.jsonl"
        assert main(["generate", str(source), "-o", str(out), "--engine", engine, "--base-model", str(base),
                     "--max-new-tokens", str(MAX_NEW), "-q"]) == 0
        outputs[engine] = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(outputs["llama.cpp"]) == len(RECORDS)
    for a, b in zip(outputs["transformers"], outputs["llama.cpp"]):
        assert (a["id"], a["tags"], a["raw"], a["evidence"]) == (b["id"], b["tags"], b["raw"], b["evidence"])
        assert a["confidence"] == pytest.approx(b["confidence"], abs=2e-3)


def test_amx_is_read_off_the_cpu_flags(tmp_path):
    # llama.cpp's AMX matmul crashed the process on an AMX host, so the engine turns it off there.
    from llmtags.engines.llamacpp import cpu_has_amx

    with_amx = tmp_path / "amx"
    with_amx.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f amx_bf16 amx_tile amx_int8\n\n")
    without = tmp_path / "plain"
    without.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f\nbugs\t\t: amx_tile_is_not_a_flag_here\n")
    assert cpu_has_amx(str(with_amx)) and not cpu_has_amx(str(without))
    assert not cpu_has_amx(str(tmp_path / "absent"))


def test_model_params_turn_the_amx_buffers_off_only_on_amx_hosts(monkeypatch):
    import llama_cpp

    from llmtags.engines import llamacpp

    for has_amx in (True, False):
        monkeypatch.setattr(llamacpp, "cpu_has_amx", lambda has_amx=has_amx: has_amx)
        params = llamacpp.model_params(llama_cpp.llama_model_default_params)
        assert params.use_extra_bufts is (not has_amx)


def test_the_embedded_base_runs_requantised_to_q8_0_once(tmp_path, tiny_gguf, tiny_engine, prompts, monkeypatch):
    # The embedded 0.5B (Q4_K_M, mostly Q5_0) runs as Q8_0 (faster on CPU, eval/bench_weights_*.md): made once
    # beside the source, its quantised tensors requantised; `--weights as-is` and other bases run as they are.
    import ctypes

    import gguf
    import llama_cpp

    from llmtags.engines import llamacpp
    from llmtags.engines.llamacpp import LlamaCppEngine, requantised_q8_0, run_as, runtime_gguf
    from llmtags.models import ModelError, ResolvedModel

    # A quantised source, as the shipped file is (Q5_0 from the float32 tiny model), so that requantising
    # an already quantised file is what is exercised.
    source = tmp_path / "base.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_0, 1
    assert llama_cpp.llama_model_quantize(str(tiny_gguf).encode(), str(source).encode(), ctypes.byref(params)) == 0
    embedded = ResolvedModel("embedded", str(tmp_path), "sha256:x", gguf=source)
    copy = runtime_gguf(embedded)
    assert copy == tmp_path / "base-q8_0.gguf"
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(copy)).tensors}
    assert types["blk.0.ffn_up.weight"] == types["blk.1.attn_q.weight"] == "Q8_0"
    assert {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(source)).tensors}["blk.0.ffn_up.weight"] == "Q5_0"
    made = copy.stat().st_mtime_ns
    assert runtime_gguf(embedded, "q8_0") == copy and copy.stat().st_mtime_ns == made  # not made again

    assert runtime_gguf(embedded, "as-is") == source
    with pytest.raises(ModelError, match="--weights q4"):
        run_as("embedded", "q4")
    for other in (str(source), "embedded-1.5b"):  # a named GGUF, and the 1.5B (Q4_K: no faster as Q8_0)
        assert run_as(other) == "as-is"
        assert runtime_gguf(ResolvedModel(other, str(tmp_path), "sha256:x", gguf=source), "q8_0") == source

    # LlamaCppEngine.load runs the file run_as names.
    monkeypatch.setattr(llamacpp, "resolve_gguf_base", lambda spec=None: ResolvedModel(spec or "embedded", str(tmp_path), "sha256:x", gguf=source))
    monkeypatch.setattr(llamacpp, "load_tokenizer", lambda resolved: tiny_engine.tokenizer)
    assert LlamaCppEngine.load("embedded", n_ctx=2048).gguf_path == copy
    assert LlamaCppEngine.load("embedded", "as-is", n_ctx=2048).gguf_path == source

    # The copy is the same model to within 8-bit rounding: the first token of every prompt agrees with the
    # source's, at nearly its log-probability (this random model's later tokens are near ties).
    exact = LlamaCppEngine(source, tiny_engine.tokenizer, n_ctx=2048).generate(prompts, max_new_tokens=1)
    rounded = LlamaCppEngine(copy, tiny_engine.tokenizer, n_ctx=2048).generate(prompts, max_new_tokens=1)
    assert [g.text for g in rounded] == [g.text for g in exact]
    for e, r in zip(exact, rounded):
        assert r.token_logprobs == pytest.approx(e.token_logprobs, abs=0.05)

    # A failed requantisation is a clear error and leaves no copy behind.
    monkeypatch.setattr(llama_cpp, "llama_model_quantize", lambda *args: 1)
    other = tmp_path / "other.gguf"
    other.write_bytes(source.read_bytes())
    with pytest.raises(ModelError, match="could not requantise"):
        requantised_q8_0(other)
    assert sorted(p.name for p in tmp_path.iterdir() if "other" in p.name) == [".other-q8_0.gguf.lock", "other.gguf"]


def test_generations_of_the_requantised_base_are_cached_apart(tmp_path, monkeypatch):
    # A cached answer of the shipped Q4_K_M file must not stand in for the Q8_0 copy's, nor the other way.
    from llmtags.engines.base import DEFAULT_WEIGHTS
    from llmtags.evaluate import plan_engine
    from llmtags.models import EMBEDDED
    from llmtags.options import OptionsError, Settings, tagging_options
    from llmtags.plan import RunPlan

    monkeypatch.delenv("LLMTAGS_BASE_MODEL", raising=False)
    assert Settings().weights == DEFAULT_WEIGHTS == "q8_0"
    with pytest.raises(OptionsError, match="--weights Q8_0"):  # as a config file may spell it
        tagging_options(Settings(weights="Q8_0"))

    def identity(**settings):
        plan = RunPlan(Settings(**settings), TaggingOptions())
        return plan_engine(plan, cache_path=tmp_path / "c.sqlite").model_identity

    shipped = f"sha256:{EMBEDDED['embedded'].sha256}"
    assert identity(engine="llama.cpp") == identity(engine="llama.cpp", weights="q8_0") == f"{shipped}+llama.cpp+q8_0"
    assert identity(engine="llama.cpp", weights="as-is") == f"{shipped}+llama.cpp"
    assert identity(engine="transformers") == identity(engine="transformers", weights="as-is") == shipped
