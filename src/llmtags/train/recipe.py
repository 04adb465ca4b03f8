"""`llmtags train`: a plain LoRA / QLoRA supervised fine-tuning recipe (trl SFTTrainer + peft).

The recipe, top to bottom:
1. Each labelled record becomes a prompt/completion pair built by the SAME code as inference: the prompt
   is `tagger.build_prompt` (Jinja2 template through the model's chat template, generation prompt added)
   and the completion is the template's `answer` block for the gold tags plus the end-of-turn token.
   The prompt is tokenised alone, exactly as the engine tokenises it; trl's SFTTrainer gets the ids with
   a `completion_mask` and, under `completion_only_loss`, puts the loss on the answer only (-100 labels
   on the prompt).
2. The base model is loaded frozen: 4-bit NF4 with bf16 compute on CUDA (QLoRA), fp32 on CPU (computed
   under bf16 autocast where the CPU has native bf16, `models.pick_dtype`). LoRA
   adapters go on the attention and MLP projections of the top `layers` transformer layers only, so the
   backward pass stops at the lowest adapted layer: on the 24-layer 0.5B model on CPU, a step with the
   top 8 layers takes about 0.65 of the time of one with all layers. No gradient checkpointing: it would
   force gradients down to the embeddings.
3. Every `eval_every` steps the model tags `eval_limit` dev records by greedy generation, exactly as
   `llmtags generate` would, and the adapter with the best dev micro F1 is kept (ties: the later one).
4. Checkpoints go to OUT/checkpoints every `save_every` steps; `resume=True` continues from the last one.
5. OUT receives peft's safetensors adapter (the best one by dev F1, else the last) and `llmtags.json`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..adapters.pack import (POOL_FILE, PROPOSER_CALIBRATION_FILE, PROPOSER_FEATURES_FILE, PROPOSER_FILE, VOCABULARY_FILE,
                             pack_adapter)
from ..adapters.registry import (
    CONFIG_FILE,
    METADATA_FILE,
    WEIGHTS_FILE,
    build_metadata,
    check_compatible,
    copy_adapter_files,
    quiet_bitsandbytes,
    read_metadata,
    resolve_adapter,
    weights_sha256,
    write_metadata,
)
from ..candidates import candidate_finder
from ..engines.select import pick_engine
from ..models import (
    ModelError,
    cache_root,
    load_model,
    load_tokenizer,
    pick_device,
    resolve_base_model,
    resolve_gguf_base,
    sha256_file,
    warn_if_slow_dtype,
)
from ..options import TaggingOptions
from ..prompts import PromptTemplate, template_choice
from ..proposer import CrossFitted, ProposerSettings
from ..records import Record
from ..retrieve import load_pool
from .callbacks import callback_classes
from .config import DEFAULT_LAYERS, TrainConfig, TrainError, resolve_layers
from .examples import build_examples, end_of_turn, tokenize_examples
from .fast import FastLoraTrainer, over_length

CHECKPOINTS = "checkpoints"
RUN_DTYPE_FILE = "dtype"  # in CHECKPOINTS: the dtype `--dtype auto` gave when the run started
BEST = "best"


@dataclass
class TrainResult:
    out_dir: Path
    metadata: dict[str, Any]
    global_step: int
    start_step: int  # 0, or the step of the checkpoint a resumed run continued from
    losses: list[tuple[int, float]]  # (step, training loss) as logged
    evals: list[dict[str, Any]]
    best: dict[str, Any] | None
    seconds: float
    examples: int
    truncated: int  # examples longer than max_length, cut at the end (answer partly kept)
    dropped: int  # examples whose prompt alone fills max_length: left out of training
    model: Any = field(default=None, repr=False)  # the trained PeftModel (last step), for callers and tests
    tokenizer: Any = field(default=None, repr=False)

    def summary_lines(self) -> list[str]:
        lines = [f"trained {self.global_step - self.start_step} steps"
                 + (f" (resumed at step {self.start_step})" if self.start_step else "")
                 + f" on {self.examples} examples in {self.seconds:.0f} s; adapter in {self.out_dir}"]
        if self.losses:
            lines.append(f"loss {self.losses[0][1]:.4f} (step {self.losses[0][0]}) -> "
                         f"{self.losses[-1][1]:.4f} (step {self.losses[-1][0]})")
        if self.best:
            lines.append(f"best dev micro F1 {self.best['f1']:.3f} at step {self.best['step']} (kept)")
        if self.truncated:
            lines.append(f"{self.truncated} examples were longer than max_length and cut at the end")
        if self.dropped:
            lines.append(f"{self.dropped} examples were left out: their prompts alone fill max_length")
        return lines


def data_description(
    train_records: Sequence[Record],
    dev_records: Sequence[Record],
    train_path: str | Sequence[str] | None = None,
    dev_path: str | Sequence[str] | None = None,
    licence: str | None = None,
) -> dict[str, Any]:
    def digest(path: str | Sequence[str] | None) -> str | list[str | None] | None:
        if path is not None and not isinstance(path, str):
            return [digest(p) for p in path]  # type: ignore[misc]
        return sha256_file(path) if path and path != "-" and Path(path).is_file() else None

    return {
        "train": train_path,
        "train_sha256": digest(train_path),
        "dev": dev_path,
        "dev_sha256": digest(dev_path),
        "train_records": sum(r.tags is not None for r in train_records),
        "dev_records": sum(r.tags is not None for r in dev_records),
        "licence": licence,
    }


def _run_dtype(requested: str, out: Path, device: str, resume: bool) -> str:
    """`--dtype` for this run. `auto` is resolved once, when a run starts, and recorded in its checkpoints:
    a resume keeps it, on another CPU too, because the frozen-layer cache and the optimizer state were made
    in it (and the cache would be rebuilt). A run started before the record existed began in float32 on CPU,
    which is what `auto` meant there until 2026-12-07."""
    recorded = out / CHECKPOINTS / RUN_DTYPE_FILE
    if requested != "auto" or not resume or not (out / CHECKPOINTS).is_dir():
        return requested
    if recorded.is_file():
        return recorded.read_text(encoding="utf-8").strip()
    return "float32" if device == "cpu" else requested


def _prepare_out_dir(out: Path, resume: bool, overwrite: bool) -> None:
    checkpoints = out / CHECKPOINTS
    has_checkpoints = checkpoints.is_dir() and any(checkpoints.glob("checkpoint-*"))
    if resume:
        if not has_checkpoints and (out / METADATA_FILE).exists() and not overwrite:
            raise TrainError(f"{out} holds a trained adapter but no checkpoint to resume from: "
                             "pass --overwrite to train a new one in its place")
        return
    if (out / METADATA_FILE).exists() or has_checkpoints:
        if not overwrite:
            what = "a trained adapter" if (out / METADATA_FILE).exists() else "checkpoints of an unfinished run"
            raise TrainError(f"{out} already holds {what}: pass --resume to continue from its last checkpoint, "
                             "or --overwrite to start afresh")
        for owned in (CHECKPOINTS, BEST, METADATA_FILE, WEIGHTS_FILE, "adapter_config.json", PROPOSER_FILE,
                      PROPOSER_FEATURES_FILE, PROPOSER_CALIBRATION_FILE):
            target = out / owned
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()


@dataclass
class TrainingRun:
    """Everything `train` sets up before the first step; `prepare_run` returns it (tests inspect it)."""

    trainer: Any
    config: TrainConfig
    out_dir: Path
    resolved: Any
    tokenizer: Any
    template: str | PromptTemplate
    device: str
    qlora: bool
    dtype: Any
    layers: list[int] | None
    num_layers: int
    examples: int
    truncated: int
    dropped: int
    progress: Any
    evaluation: Any
    fast: bool = False  # the fast CPU trainer, not trl's
    proposer: CrossFitted | None = None  # the span proposer and its cross-fitted folds
    stop_on_signal: Any = None  # callbacks.StopOnSignal: Ctrl-C / SIGTERM end the run after the step


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No transformers/datasets log lines, progress bars or v6 deprecation notes during a run."""
    import datasets
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars_were_disabled = datasets.is_progress_bar_enabled() is False
    hf_logging.set_verbosity_error()
    datasets.disable_progress_bars()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*deprecated and will be removed in v6.*")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if not bars_were_disabled:
            datasets.enable_progress_bars()


def prepare_run(
    train_records: Sequence[Record],
    dev_records: Sequence[Record],
    config: TrainConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    callbacks: Sequence[Any] = (),
) -> TrainingRun:
    """Load the base model, build the examples and the SFTTrainer; nothing is trained yet."""
    with _quiet():
        return _prepare_run(train_records, dev_records, config, out_dir, resume=resume, overwrite=overwrite,
                            progress=progress, callbacks=callbacks)


def _prepare_run(
    train_records: Sequence[Record],
    dev_records: Sequence[Record],
    config: TrainConfig,
    out_dir: str | Path,
    *,
    resume: bool,
    overwrite: bool,
    progress: bool,
    callbacks: Sequence[Any],
) -> TrainingRun:
    quiet_bitsandbytes()
    import torch
    from peft import prepare_model_for_kbit_training

    config.validate()
    out = Path(out_dir)
    if config.init_adapter and resolve_adapter(config.init_adapter).resolve() == out.resolve():
        raise TrainError(f"the warm-start adapter {config.init_adapter} is also the output: train into another "
                         "name (or --out), then replace the old adapter")
    _prepare_out_dir(out, resume, overwrite)
    out.mkdir(parents=True, exist_ok=True)

    device = pick_device(config.device)
    qlora = device.startswith("cuda") if config.qlora == "auto" else bool(config.qlora)
    fast = use_fast_path(config, device, qlora)  # before the model loads: a refused combination fails at once
    dtype = warn_if_slow_dtype(_run_dtype(config.dtype, out, device, resume), device, training=True)
    if config.dtype == "auto" and device == "cpu" and dtype == torch.bfloat16:
        print("llmtags: --dtype auto: bf16 autocast over fp32 weights, as this CPU computes bf16 natively "
              "(--dtype float32 to keep float32)", file=sys.stderr)
    (out / CHECKPOINTS).mkdir(exist_ok=True)
    (out / CHECKPOINTS / RUN_DTYPE_FILE).write_text(str(dtype).removeprefix("torch."), encoding="utf-8")
    resolved = resolve_base_model(config.base_model)
    tokenizer = load_tokenizer(resolved)
    template = template_choice(config.template)
    if config.init_adapter:  # before the proposer and the model: a mismatch fails at once
        check_compatible(read_metadata(resolve_adapter(config.init_adapter)), resolved, template, tokenizer,
                         force_flag=None)
    candidates = candidate_finder(config.candidates) if config.candidates else None
    pool = load_pool(config.demos) if config.retrieve else None
    if not any(r.tags is not None for r in train_records):
        raise TrainError("no labelled training records (records need a 'tags' field)")
    proposer = train_proposer(train_records, config, out, progress) if wants_proposer(config, template) else None
    examples = tokenize_examples(build_examples(train_records, tokenizer, template, candidates, pool, config.retrieve,
                                                config.rename, config.seed, proposer, config.demo_text,
                                                config.text_budget), tokenizer)
    if not examples:
        raise TrainError("no labelled training records (records need a 'tags' field)")
    truncated, dropped = over_length(examples, config.max_length)
    if dropped:
        # Said at once, not only in the summary: the run would learn only from the shorter products.
        print(f"llmtags: warning: {dropped} of {len(examples)} examples have prompts of {config.max_length} tokens "
              "or more (--max-length) and are left out of training; shorten prompts (--text-budget CHARS, "
              "--demo-text title, a smaller --retrieve) or raise --max-length", file=sys.stderr)
    dev = [r for r in dev_records if r.tags is not None][: config.eval_limit]

    # The fast trainer keeps fp32 weights and runs bf16 under autocast (train/fast.py).
    model = load_model(resolved, device=device, dtype="float32" if fast else config.dtype, load_in_4bit=qlora)
    if qlora:
        # Casts norms to fp32 and freezes the base; no gradient checkpointing (see the module docstring).
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    num_layers = model.config.get_text_config().num_hidden_layers
    if config.init_adapter:
        model, init = warm_start(model, config, num_layers)
        config = dataclasses.replace(config, **init)
    elif config.layers is None:
        config = dataclasses.replace(config, layers=DEFAULT_LAYERS)
    layers = resolve_layers(config.layers, num_layers)
    options = TaggingOptions(template=template, max_new_tokens=config.max_new_tokens, batch_size=config.eval_batch_size,
                             candidates=candidates, pool=pool, retrieve=config.retrieve,
                             proposer=proposer.full if proposer else None, demo_text=config.demo_text,
                             text_budget=config.text_budget)
    progress_cb, eval_cb = _callbacks(config, dev, tokenizer, options, out, progress, resume, device)
    if fast:
        trainer = _fast_trainer(model, examples, config, layers, out, progress_cb, progress,
                                bf16=dtype == torch.bfloat16)
    else:
        trainer = _trl_trainer(model, examples, config, layers, out, tokenizer,
                               bf16=dtype == torch.bfloat16 or qlora, use_cpu=device == "cpu")
    # The progress bar first (evaluation notes go on it), then evaluation, the stop on a signal, then the
    # caller's callbacks.
    stop_cb = callback_classes()["StopOnSignal"](progress_cb)
    for callback in [progress_cb, eval_cb, stop_cb, *callbacks]:
        if callback is not None:
            trainer.add_callback(callback)
    return TrainingRun(trainer, config, out, resolved, tokenizer, template, device, qlora, dtype, layers, num_layers,
                       len(examples), truncated, dropped, progress_cb, eval_cb, fast, proposer, stop_cb)


def wants_proposer(config: TrainConfig, template: str | PromptTemplate) -> bool:
    """`span_proposer` auto: a proposer only where the template shows its spans (a default zh/en
    template would ship a CRF that no prompt reads)."""
    if config.span_proposer == "auto":
        return isinstance(template, PromptTemplate) and template.renders("proposals")
    return bool(config.span_proposer)


def train_proposer(records: Sequence[Record], config: TrainConfig, out: Path, progress: bool = False) -> CrossFitted:
    """The span proposer of `records` and its `proposer_folds` cross-fitted folds, kept with the checkpoints
    so that a resumed run reuses them."""
    return CrossFitted.train(records, k=config.proposer_folds, workdir=out / CHECKPOINTS / "proposer",
                             settings=ProposerSettings(max_iterations=config.proposer_iterations,
                                                      features=config.proposer_features), progress=progress)


def use_fast_path(config: TrainConfig, device: str, qlora: bool) -> bool:
    """`fast` auto: the fast trainer on CPU without QLoRA (on CUDA, QLoRA through trl stays as it is)."""
    if config.fast == "auto":
        return device == "cpu" and not qlora
    if config.fast and qlora:
        raise TrainError("the fast trainer runs plain LoRA: give --qlora false, or --fast false for QLoRA")
    return bool(config.fast)


def _trl_trainer(model: Any, examples: list[dict[str, list[int]]], config: TrainConfig, layers: list[int] | None,
                 out: Path, tokenizer: Any, *, bf16: bool, use_cpu: bool) -> Any:
    """trl's SFTTrainer, with transformers' own progress and log printing removed (ours replace them)."""
    from datasets import Dataset
    from transformers import PrinterCallback, ProgressCallback
    from trl import SFTTrainer

    trainer = SFTTrainer(
        model=model,
        args=_sft_args(config, out, tokenizer, bf16=bf16, use_cpu=use_cpu),
        train_dataset=Dataset.from_list(examples),
        processing_class=tokenizer,
        peft_config=None if config.init_adapter else lora_config(config, layers),
    )
    for noisy in (ProgressCallback, PrinterCallback):
        trainer.remove_callback(noisy)
    return trainer


def _fast_trainer(model: Any, examples: list[dict[str, list[int]]], config: TrainConfig, layers: list[int] | None,
                  out: Path, progress_cb: Any, progress: bool, bf16: bool = False) -> FastLoraTrainer:
    """The fast CPU trainer on a peft model: the warm-start adapter, or a new LoRA seeded as trl seeds it."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        model = new_lora(model, config, layers)
    return FastLoraTrainer(
        model, examples, lr=config.lr, schedule=config.schedule, warmup_ratio=config.warmup_ratio,
        epochs=config.epochs, max_steps=config.max_steps, batch_size=config.batch_size, grad_accum=config.grad_accum,
        seed=config.seed, checkpoint_dir=out / CHECKPOINTS, save_every=config.checkpoint_every,
        save_total_limit=config.save_total_limit, log_every=config.log_every, max_length=config.max_length,
        cache_dir=cache_root() / "train-cache", progress=progress_cb.write, cache_bar=progress, bf16=bf16,
    )


def new_lora(model: Any, config: TrainConfig, layers: list[int] | None) -> Any:
    """`model` with a new LoRA adapter of `config`'s shape on `layers`, its lora_A drawn from `config.seed`
    as trl seeds it (lora_B starts at zero)."""
    from peft import get_peft_model
    from transformers import set_seed

    set_seed(config.seed)
    return get_peft_model(model, lora_config(config, layers))


def lora_config(config: TrainConfig, layers: list[int] | None) -> Any:
    """peft's LoraConfig for `config` on `layers` (None: every layer)."""
    from peft import LoraConfig

    return LoraConfig(
            r=config.rank,
            lora_alpha=config.alpha,
            lora_dropout=config.dropout,
            target_modules=list(config.target_modules),
            layers_to_transform=layers,
            layers_pattern="layers" if layers is not None else None,
            bias="none",
            task_type="CAUSAL_LM",
    )


def _sft_args(config: TrainConfig, out: Path, tokenizer: Any, *, bf16: bool, use_cpu: bool) -> Any:
    """trl's SFTConfig for `config`: completion-only loss, checkpoints in OUT/checkpoints."""
    from trl import SFTConfig

    return SFTConfig(
            output_dir=str(out / CHECKPOINTS),
            per_device_train_batch_size=config.batch_size,
            gradient_accumulation_steps=config.grad_accum,
            learning_rate=config.lr,
            lr_scheduler_type=config.schedule,
            warmup_steps=config.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
            num_train_epochs=config.epochs,
            max_steps=config.max_steps if config.max_steps > 0 else -1,
            max_length=config.max_length,
            completion_only_loss=True,
            # Checkpointing would make the embeddings' output require grad, so the backward would run through
            # every layer; adapters on the top layers only need the backward of those layers.
            activation_checkpointing=False,
            bf16=bf16,
            fp16=False,
            use_cpu=use_cpu,
            seed=config.seed,
            data_seed=config.seed,
            logging_strategy="steps",
            logging_steps=config.log_every,
            save_strategy="steps",
            save_steps=config.checkpoint_every,
            save_total_limit=config.save_total_limit,
            eval_strategy="no",
            report_to="none",
            eos_token=end_of_turn(tokenizer),
            packing=False,
            dataloader_num_workers=0,
            optim="adamw_torch",
            weight_decay=0.0,
    )


def _callbacks(config: TrainConfig, dev: Sequence[Record], tokenizer: Any, options: TaggingOptions, out: Path,
               progress: bool, resume: bool, device: str) -> tuple[Any, Any]:
    """The progress bar, and the dev evaluation (None without dev records) with the prompts of `options`,
    on the engine `config.eval_engine` picks for this base and device."""
    classes = callback_classes()
    progress_cb = classes["LossProgress"](enabled=progress)
    if not (dev and config.eval_limit):
        return progress_cb, None
    try:
        engine = pick_engine(config.eval_engine, config.base_model, device)
        if engine == "llama.cpp":
            resolve_gguf_base(config.base_model)  # a base llama.cpp cannot read fails now, not at the first evaluation
    except ModelError as exc:
        raise TrainError(f"--eval-engine {config.eval_engine}: {exc}") from None
    eval_cb = classes["GenerationEval"](dev, tokenizer, options, config.eval_every, out / BEST, progress_cb, resume,
                                        engine=engine, base_model=config.base_model)
    return progress_cb, eval_cb


def warm_start(model: Any, config: TrainConfig, num_layers: int) -> tuple[Any, dict]:
    """Wrap `model` with the trainable weights of `config.init_adapter` (`_prepare_run` has checked that it
    was trained on this base with these templates). Returns the model and the LoRA shape it brings.

    Where `config.layers` is set and names more layers than the adapter has, all of the adapter's among them,
    the adapter is widened: its layers keep their weights and the others start as LoRA starts (B = 0,
    so the model's answers are unchanged at step 0). More layers are how a warm-started adapter gets
    more capacity without losing what it learnt."""
    from peft import PeftModel, set_peft_model_state_dict
    from safetensors.torch import load_file

    path = resolve_adapter(config.init_adapter)
    lora = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    shape = {
        "rank": lora["r"],
        "alpha": lora["lora_alpha"],
        "dropout": lora.get("lora_dropout", 0.0),
        "target_modules": sorted(lora["target_modules"]),
        "layers": lora.get("layers_to_transform") or "all",
    }
    wider = widened_layers(shape["layers"], config.layers, num_layers)
    if wider is None:
        return PeftModel.from_pretrained(model, str(path), is_trainable=True), shape
    shape["layers"] = wider
    print(f"llmtags: widening the warm start {config.init_adapter} from layers {lora['layers_to_transform']} "
          f"to {wider}; the new layers start at zero", file=sys.stderr)
    model = new_lora(model, dataclasses.replace(config, **shape), wider)  # the new layers' lora_A, seeded
    loaded = set_peft_model_state_dict(model, load_file(str(path / WEIGHTS_FILE)))
    if loaded.unexpected_keys:
        raise TrainError(f"{path / WEIGHTS_FILE}: weights that the widened adapter has no place for: "
                         f"{loaded.unexpected_keys[:3]}")
    return model, shape


def widened_layers(adapter_layers: list[int] | str, requested: int | str | list[int] | None,
                   num_layers: int) -> list[int] | None:
    """The layers of a widened warm start: `requested` where it holds all of the adapter's layers and more
    (None otherwise: the adapter's own layers stand, as they always did)."""
    if adapter_layers == "all" or requested is None:
        return None
    wanted = resolve_layers(requested, num_layers)
    wanted = list(range(num_layers)) if wanted is None else wanted
    if set(adapter_layers) < set(wanted):
        return sorted(wanted)
    return None


def train(
    train_records: Sequence[Record],
    dev_records: Sequence[Record],
    config: TrainConfig,
    out_dir: str | Path,
    command: str = "",
    *,
    data: dict[str, Any] | None = None,
    vocab: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    callbacks: Sequence[Any] = (),
) -> TrainResult:
    """Fine-tune a LoRA adapter on `train_records`, choose it by dev F1, and write it to `out_dir`.

    `command` is stored verbatim in `llmtags.json` (pass the shell command line). `data` describes the
    training data (see `data_description`); `vocab` is the normalisation vocabulary the adapter goes with,
    if any (recorded only; `config.candidates` is the one that shapes the prompts).
    With `resume`, training continues from the last checkpoint in OUT/checkpoints, if there is one.
    `out_dir` must not already hold an adapter or checkpoints unless `resume` or `overwrite`.
    """
    quiet_bitsandbytes()
    from transformers.trainer_utils import get_last_checkpoint

    started = time.perf_counter()
    with _quiet():
        run = prepare_run(train_records, dev_records, config, out_dir, resume=resume, overwrite=overwrite,
                          progress=progress, callbacks=callbacks)
        out, checkpoints = run.out_dir, run.out_dir / CHECKPOINTS
        resume_from = get_last_checkpoint(str(checkpoints)) if resume and checkpoints.is_dir() else None
        start_step = 0
        if resume_from:
            start_step = json.loads((Path(resume_from) / "trainer_state.json").read_text())["global_step"]
            run.progress.write(f"resuming from {resume_from} (step {start_step})")
        elif resume:
            run.progress.write(f"no checkpoint in {checkpoints}: starting from scratch")
        try:
            run.trainer.train(resume_from_checkpoint=resume_from)
        finally:
            run.stop_on_signal.restore()
    state = run.trainer.state
    config = run.config  # with a warm start, the LoRA shape is the starting adapter's

    best = _save_final_adapter(run)
    frozen = sorted((out / CHECKPOINTS / "frozen").glob("hidden-*.f32"))
    if frozen:
        run.progress.write(f"the frozen layers' hidden states ({sum(f.stat().st_size for f in frozen) / 2**30:.1f} GiB) "
                           f"stay in {frozen[0].parent} for a --resume; delete {out / CHECKPOINTS} once you no longer "
                           "need one")
    losses = [(h["step"], float(h["loss"])) for h in state.log_history if "loss" in h]
    meta = build_metadata(
        resolved=run.resolved,
        template=run.template,
        template_spec=config.template if isinstance(config.template, str) else None,
        tokenizer=run.tokenizer,
        hyperparameters=_hyperparameters(run, config, state),
        data=data if data is not None else data_description(train_records, dev_records),
        vocab=vocab,
        candidates=config.candidates,
        dev_metrics=_dev_metrics(run, best),
        command=command,
    )
    write_metadata(out, meta)
    # The adapter carries what its prompts need: its vocabulary and its demo pool (adapters/pack.py).
    proposer = run.proposer.shipped(train_records) if run.proposer is not None else None
    meta = pack_adapter(out, candidates=config.candidates, pool=config.demos if config.retrieve else None,
                        k=config.retrieve, licence=(data or {}).get("licence"), proposer=proposer)
    shipped = [name for name in (VOCABULARY_FILE, POOL_FILE, PROPOSER_FILE) if (out / name).is_file()]
    if shipped:
        run.progress.write(f"the adapter ships {' and '.join(shipped)} (derived from the training data): state "
                           "their licence in its model card before you publish it")
    return TrainResult(
        out_dir=out,
        metadata=meta,
        global_step=state.global_step,
        start_step=start_step,
        losses=losses,
        evals=list(run.evaluation.history) if run.evaluation is not None else [],
        best=best,
        seconds=time.perf_counter() - started,
        examples=run.examples,
        truncated=run.truncated,
        dropped=run.dropped,
        model=run.trainer.model,
        tokenizer=run.tokenizer,
    )


def _save_final_adapter(run: TrainingRun) -> dict[str, Any] | None:
    """Write the final adapter into OUT: the best by dev F1 when there was a dev set, else the last.
    Returns the best evaluation, if any."""
    out = run.out_dir
    best = run.evaluation.best if run.evaluation is not None else None
    if best is not None and (out / BEST / WEIGHTS_FILE).is_file():
        copy_adapter_files(out / BEST, out)
    else:
        tmp = out / ".last"
        run.trainer.model.save_pretrained(str(tmp), safe_serialization=True)
        copy_adapter_files(tmp, out)
        shutil.rmtree(tmp, ignore_errors=True)
    return best


def _hyperparameters(run: TrainingRun, config: TrainConfig, state: Any) -> dict[str, Any]:
    hyperparameters = {
        **{k: v for k, v in dataclasses.asdict(config).items()
           if k not in ("base_model", "template", "device", "candidates", "demos", "span_proposer", "proposer_folds",
                         "proposer_iterations", "proposer_features")},
        "layers_to_transform": run.layers,
        "num_hidden_layers": run.num_layers,
        "qlora": run.qlora,
        "device": run.device,
        "compute_dtype": "bfloat16" if run.qlora else str(run.dtype).replace("torch.", ""),
        "effective_batch_size": config.batch_size * config.grad_accum,
        "trainer": "fast" if run.fast else "trl",
        "steps": state.global_step,
        "trainable_parameters": sum(p.numel() for p in run.trainer.model.parameters() if p.requires_grad),
    }
    if config.init_adapter:
        start = resolve_adapter(config.init_adapter)
        hyperparameters["init_adapter"] = {"spec": config.init_adapter, "sha256": weights_sha256(start)}
    return hyperparameters


def _dev_metrics(run: TrainingRun, best: dict[str, Any] | None) -> dict[str, Any] | None:
    if best is None:
        return None
    return {**{k: best[k] for k in ("precision", "recall", "f1", "step", "records")},
            "history": run.evaluation.history}
