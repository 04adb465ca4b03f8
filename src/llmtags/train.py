"""`llmtags train`: a plain LoRA / QLoRA supervised fine-tuning recipe (trl SFTTrainer + peft).

The recipe, top to bottom:
1. Each labelled record becomes a prompt/completion pair built by the SAME code as inference: the prompt
   is `tagger.build_prompt` (Jinja2 template through the model's chat template, generation prompt added)
   and the completion is the template's `answer` block for the gold tags plus the end-of-turn token.
   The prompt is tokenised alone, exactly as the engine tokenises it; trl's SFTTrainer gets the ids with
   a `completion_mask` and, under `completion_only_loss`, puts the loss on the answer only (-100 labels
   on the prompt).
2. The base model is loaded frozen: 4-bit NF4 with bf16 compute on CUDA (QLoRA), fp32 on CPU. LoRA
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

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from .adapters import (
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
from .prompts import PromptTemplate, load_template, template_for
from .records import Record
from .tagger import TaggingOptions, build_prompt

END_OF_TURN = "<|im_end|>"  # Qwen's (ChatML) end of an assistant turn: generation stops on it
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CHECKPOINTS = "checkpoints"
BEST = "best"


class TrainError(ValueError):
    """A training run that cannot start; the message says why."""


@dataclass
class TrainConfig:
    """Hyper-parameters of one run. `from_toml` reads them; CLI flags override with `merged`."""

    base_model: str | None = None  # None: $LLMTAGS_BASE_MODEL, else 'embedded'
    template: str = "auto"  # 'auto' (zh/en per record), a packaged name, or a .j2 path
    # A vocabulary (or labelled file) whose entries found in a text are offered in the prompt, exactly as
    # `generate --candidates`; training prompts leave out entries only the record's own gold tags make.
    candidates: str | None = None
    rank: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))
    # Which transformer layers carry adapters: N = the top N layers, "all", or a list of layer indices.
    layers: int | str | list[int] = 8
    lr: float = 2e-4
    schedule: str = "cosine"  # any transformers lr_scheduler_type: cosine, linear, constant_with_warmup, ...
    warmup_ratio: float = 0.03
    epochs: float = 2.0
    max_steps: int = -1  # > 0 overrides epochs
    max_length: int = 160  # tokens of prompt + answer; longer examples are cut at the end
    batch_size: int = 4
    grad_accum: int = 4
    seed: int = 0
    eval_every: int = 50  # optimizer steps between dev evaluations; 0: only at the end
    eval_limit: int = 100  # dev records generated per evaluation
    eval_batch_size: int = 16
    max_new_tokens: int = 64
    save_every: int | None = None  # checkpoint interval in steps; None: same as eval_every (or 50)
    save_total_limit: int = 2
    log_every: int = 10
    dtype: str = "auto"  # auto: fp32 on CPU, bf16 on CUDA; or float32 / bfloat16
    qlora: bool | str = "auto"  # auto: 4-bit QLoRA on CUDA, plain LoRA on CPU
    device: str = "auto"
    # Warm start: an adapter (registry name or directory) whose weights training continues from. Its LoRA
    # shape (rank, alpha, modules, layers) replaces the values above; base and templates must match.
    init_adapter: str | None = None

    # --- reading and merging -------------------------------------------------------------------------

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> TrainConfig:
        values = {k.replace("-", "_"): v for k, v in values.items()}
        unknown = sorted(set(values) - set(cls.field_names()))
        if unknown:
            raise TrainError(f"{source}: unknown training option(s) {', '.join(unknown)}; "
                             f"known: {', '.join(cls.field_names())}")
        config = cls(**values)
        config.validate()
        return config

    @classmethod
    def from_toml(cls, path: str | Path) -> TrainConfig:
        """Read a TOML file: its `[train]` table if it has one, else its top-level keys."""
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise TrainError(f"cannot read training config {path}: {exc}") from exc
        table = data["train"] if isinstance(data.get("train"), dict) else {
            k: v for k, v in data.items() if not isinstance(v, dict)
        }
        return cls.from_dict(table, source=str(path))

    def merged(self, **overrides: Any) -> TrainConfig:
        """A copy with every override that is not None applied (so unset CLI flags keep file values)."""
        config = dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})
        config.validate()
        return config

    def validate(self) -> None:
        if isinstance(self.layers, str):
            self.layers = parse_layers(self.layers)
        if isinstance(self.target_modules, str):
            self.target_modules = [m.strip() for m in self.target_modules.split(",") if m.strip()]
        if isinstance(self.qlora, str) and self.qlora != "auto":
            if self.qlora.lower() not in ("true", "false", "yes", "no", "1", "0"):
                raise TrainError(f"qlora must be auto, true or false, not {self.qlora!r}")
            self.qlora = self.qlora.lower() in ("true", "yes", "1")
        checks = [
            (self.rank > 0, "rank must be positive"),
            (self.alpha > 0, "alpha must be positive"),
            (0 <= self.dropout < 1, "dropout must be in [0, 1)"),
            (self.lr > 0, "lr must be positive"),
            (0 <= self.warmup_ratio < 1, "warmup_ratio must be in [0, 1)"),
            (self.max_steps > 0 or self.epochs > 0, "give epochs > 0 or max_steps > 0"),
            (self.max_length > 0 and self.batch_size > 0 and self.grad_accum > 0,
             "max_length, batch_size and grad_accum must be positive"),
            (self.eval_every >= 0 and self.eval_limit >= 0, "eval_every and eval_limit must not be negative"),
            (self.dtype in ("auto", "float32", "fp32", "bfloat16", "bf16"), "dtype: auto, float32 or bfloat16"),
            (bool(self.target_modules), "target_modules is empty"),
        ]
        for ok, message in checks:
            if not ok:
                raise TrainError(message)

    @property
    def checkpoint_every(self) -> int:
        return self.save_every if self.save_every else (self.eval_every or 50)


def parse_layers(text: str | int | Sequence[int]) -> int | str | list[int]:
    """'all', 'top8' or '8' (top N layers), or '20,21,22' / '20-23' (explicit indices)."""
    if isinstance(text, int) or isinstance(text, list):
        return text
    text = str(text).strip().lower()
    if text == "all":
        return "all"
    if text.startswith("top"):
        text = text[3:].strip(":= ")
    if text.isdigit():
        return int(text)
    indices: list[int] = []
    try:
        for part in text.split(","):
            if "-" in part:
                low, high = (int(x) for x in part.split("-", 1))
                indices.extend(range(low, high + 1))
            elif part.strip():
                indices.append(int(part))
    except ValueError:
        raise TrainError(f"layers: expected 'all', a number N (top N layers) or indices like '20,21-23', "
                         f"not {text!r}") from None
    return sorted(set(indices))


def resolve_layers(layers: int | str | list[int], num_layers: int) -> list[int] | None:
    """The layer indices that get adapters; None means all of them (peft's default)."""
    if layers == "all":
        return None
    if isinstance(layers, int):
        if layers <= 0:
            raise TrainError("layers: the number of top layers must be positive")
        return None if layers >= num_layers else list(range(num_layers - layers, num_layers))
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise TrainError(f"layers: the model has layers 0..{num_layers - 1}, not {bad}")
    return list(layers)


# --- examples -----------------------------------------------------------------------------------------


def template_choice(template: str | PromptTemplate) -> str | PromptTemplate:
    """'auto' stays per record; anything else is loaded (and checked) once."""
    return template if isinstance(template, PromptTemplate) or template == "auto" else load_template(template)


def end_of_turn(tokenizer: Any) -> str:
    return END_OF_TURN if END_OF_TURN in tokenizer.get_vocab() else tokenizer.eos_token


def build_examples(
    records: Sequence[Record], tokenizer: Any, template: str | PromptTemplate = "auto", candidates: Any = None
) -> list[dict[str, str]]:
    """trl prompt/completion pairs: the inference prompt, and the template's answer + end of turn.

    The prompt is `tagger.build_prompt` with `training=True`: with `candidates` (a CandidateFinder),
    entries that only the record's own gold tags put in the vocabulary are left out, as at test time.
    Unlabelled records (tags None) are skipped; a record with an empty tag list teaches the model to
    answer nothing.
    """
    options = TaggingOptions(template=template_choice(template), candidates=candidates)
    eot = end_of_turn(tokenizer)
    examples = []
    for record in records:
        if record.tags is None:
            continue
        prompt = build_prompt(record, tokenizer, options, training=True)
        completion = template_for(record, options.template).answer(record.tags) + eot
        examples.append({"prompt": prompt, "completion": completion})
    return examples


# --- callbacks -----------------------------------------------------------------------------------------


class _Lazy:
    """Callback classes are built on first use so that importing this module does not import torch."""

    classes: dict[str, Any] = {}


def _make_callbacks() -> dict[str, Any]:
    if _Lazy.classes:
        return _Lazy.classes
    from tqdm import tqdm
    from transformers import TrainerCallback

    class LossProgress(TrainerCallback):
        """One tqdm bar with the running loss (and the last dev F1) instead of printed log dicts."""

        def __init__(self, enabled: bool = True):
            self.enabled = enabled
            self.bar: Any = None
            self.postfix: dict[str, str] = {}

        def on_train_begin(self, args, state, control, **kwargs):
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="training", unit="step",
                            disable=not self.enabled, file=sys.stderr, dynamic_ncols=True)

        def on_step_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.bar is not None and logs and "loss" in logs:
                self.postfix["loss"] = f"{logs['loss']:.4f}"
                self.bar.set_postfix(self.postfix, refresh=False)

        def note(self, key: str, value: str) -> None:
            self.postfix[key] = value
            if self.bar is not None:
                self.bar.set_postfix(self.postfix, refresh=False)

        def write(self, text: str) -> None:
            if self.enabled:
                tqdm.write(text, file=sys.stderr)

        def on_train_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    class GenerationEval(TrainerCallback):
        """Tag dev records by generation every `every` steps; keep the adapter with the best micro F1."""

        def __init__(self, records, tokenizer, options, every, best_dir: Path, progress, resume: bool):
            self.records = list(records)
            self.tokenizer = tokenizer
            self.options = options
            self.every = every
            self.best_dir = best_dir
            self.progress = progress
            self.history: list[dict[str, Any]] = []
            self.best: dict[str, Any] | None = None
            self.engine: Any = None
            self.last_step = -1
            if resume and (best_dir / "best.json").is_file() and (best_dir / WEIGHTS_FILE).is_file():
                saved = json.loads((best_dir / "best.json").read_text())
                self.best, self.history = saved["best"], saved.get("history", [])
            elif best_dir.exists():
                shutil.rmtree(best_dir)

        def on_train_begin(self, args, state, control, **kwargs):
            # A resumed run restarts at its checkpoint: evaluations made after it belong to steps that are
            # about to be trained again, and a best adapter saved after it is no longer a candidate.
            self.history = [h for h in self.history if h["step"] <= state.global_step]
            if self.best is not None and self.best["step"] > state.global_step:
                self.best = None

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if self.every and state.global_step % self.every == 0:
                self.evaluate(model, state)

        def on_train_end(self, args, state, control, model=None, **kwargs):
            if self.last_step != state.global_step and not any(h["step"] == state.global_step for h in self.history):
                self.evaluate(model, state)

        def evaluate(self, model: Any, state: Any) -> dict[str, Any]:
            from .engine import TransformersEngine
            from .metrics import score
            from .tagger import tag_records

            self.last_step = state.global_step
            was_training = model.training
            padding_side = self.tokenizer.padding_side
            model.eval()
            self.tokenizer.padding_side = "left"  # decoder-only batches pad on the left for generation
            start = time.perf_counter()
            try:
                if self.engine is None or self.engine.model is not model:
                    # One engine per run: it keeps per-tokenizer state (stop tokens) between evaluations.
                    self.engine = TransformersEngine(model, self.tokenizer)
                results = list(tag_records(self.records, self.engine, self.options))
            finally:
                self.tokenizer.padding_side = padding_side
                if was_training:
                    model.train()
            scores = score([r.tags for r in self.records], [r.tags for r in results])
            loss = next((h["loss"] for h in reversed(state.log_history) if "loss" in h), None)
            entry = {
                "step": state.global_step,
                "epoch": state.epoch,
                "loss": loss,
                "precision": scores.micro.precision,
                "recall": scores.micro.recall,
                "f1": scores.micro.f1,
                "records": len(self.records),
                "seconds": round(time.perf_counter() - start, 2),
            }
            self.history.append(entry)
            # Ties go to the later adapter: same dev F1, more training.
            if self.best is None or entry["f1"] >= self.best["f1"]:
                self.best = entry
                model.save_pretrained(str(self.best_dir), safe_serialization=True)
                state.best_metric = entry["f1"]
                state.best_global_step = entry["step"]
            (self.best_dir).mkdir(parents=True, exist_ok=True)
            (self.best_dir / "best.json").write_text(json.dumps({"best": self.best, "history": self.history}))
            self.progress.note("dev_f1", f"{entry['f1']:.3f}")
            self.progress.write(f"step {entry['step']}: dev micro F1 {entry['f1']:.3f} "
                                f"(P {entry['precision']:.3f}, R {entry['recall']:.3f}) on {len(self.records)} "
                                f"records; best {self.best['f1']:.3f} at step {self.best['step']}")
            return entry

    _Lazy.classes = {"LossProgress": LossProgress, "GenerationEval": GenerationEval}
    return _Lazy.classes


# --- the run -------------------------------------------------------------------------------------------


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
    truncated: int  # examples longer than max_length, cut at the end
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
        return lines


def data_description(
    train_records: Sequence[Record],
    dev_records: Sequence[Record],
    train_path: str | Sequence[str] | None = None,
    dev_path: str | Sequence[str] | None = None,
    licence: str | None = None,
) -> dict[str, Any]:
    from .models import sha256_file

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
        for owned in (CHECKPOINTS, BEST, METADATA_FILE, WEIGHTS_FILE, "adapter_config.json"):
            target = out / owned
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()


def tokenize_examples(examples: Sequence[dict[str, str]], tokenizer: Any) -> list[dict[str, list[int]]]:
    """Token ids of prompt + completion, and trl's `completion_mask` (1 on the completion).

    The prompt is tokenised alone, exactly as `engine.TransformersEngine` tokenises it for generation
    (no special tokens added: the chat template already holds them), so training sees the very tokens
    inference feeds the model. trl's SFTTrainer turns the mask into labels (-100 on the prompt) under
    `completion_only_loss`. (Tokenising here rather than in trl also spares trl's dataset fingerprint,
    which pickles the whole tokenizer: several seconds a run on a small CPU.)
    """
    prompts = tokenizer([e["prompt"] for e in examples], add_special_tokens=False)["input_ids"]
    completions = tokenizer([e["completion"] for e in examples], add_special_tokens=False)["input_ids"]
    return [
        {"input_ids": list(p) + list(c), "completion_mask": [0] * len(p) + [1] * len(c)}
        for p, c in zip(prompts, completions)
    ]


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
    progress: Any
    evaluation: Any


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
    from datasets import Dataset
    from peft import LoraConfig, prepare_model_for_kbit_training
    from transformers import PrinterCallback, ProgressCallback
    from trl import SFTConfig, SFTTrainer

    from .models import load_model, load_tokenizer, pick_device, pick_dtype, resolve_base_model

    config.validate()
    out = Path(out_dir)
    if config.init_adapter and resolve_adapter(config.init_adapter).resolve() == out.resolve():
        raise TrainError(f"the warm-start adapter {config.init_adapter} is also the output: train into another "
                         "name (or --out), then replace the old adapter")
    _prepare_out_dir(out, resume, overwrite)
    out.mkdir(parents=True, exist_ok=True)

    device = pick_device(config.device)
    qlora = device.startswith("cuda") if config.qlora == "auto" else bool(config.qlora)
    dtype = pick_dtype(config.dtype, device)
    resolved = resolve_base_model(config.base_model)
    tokenizer = load_tokenizer(resolved)
    template = template_choice(config.template)
    candidates = None
    if config.candidates:
        from .candidates import CandidateFinder, load_candidate_vocabulary

        candidates = CandidateFinder(load_candidate_vocabulary(config.candidates))

    examples = tokenize_examples(build_examples(train_records, tokenizer, template, candidates), tokenizer)
    if not examples:
        raise TrainError("no labelled training records (records need a 'tags' field)")
    truncated = sum(len(e["input_ids"]) > config.max_length for e in examples)
    dev = [r for r in dev_records if r.tags is not None][: config.eval_limit]

    model = load_model(resolved, device=device, dtype=config.dtype, load_in_4bit=qlora)
    if qlora:
        # Casts norms to fp32 and freezes the base; no gradient checkpointing (see the module docstring).
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    num_layers = model.config.get_text_config().num_hidden_layers
    if config.init_adapter:
        model, init = warm_start(model, config, resolved, template, tokenizer)
        config = dataclasses.replace(config, **init)
    layers = resolve_layers(config.layers, num_layers)
    peft_config = None if config.init_adapter else LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=list(config.target_modules),
        layers_to_transform=layers,
        layers_pattern="layers" if layers is not None else None,
        bias="none",
        task_type="CAUSAL_LM",
    )
    args = SFTConfig(
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
        bf16=dtype == torch.bfloat16 or qlora,
        fp16=False,
        use_cpu=device == "cpu",
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
    classes = _make_callbacks()
    progress_cb = classes["LossProgress"](enabled=progress)
    options = TaggingOptions(template=template, max_new_tokens=config.max_new_tokens, batch_size=config.eval_batch_size,
                             candidates=candidates)
    eval_cb = (classes["GenerationEval"](dev, tokenizer, options, config.eval_every, out / BEST, progress_cb, resume)
               if dev and config.eval_limit else None)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(examples),
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    for noisy in (ProgressCallback, PrinterCallback):
        trainer.remove_callback(noisy)
    # The progress bar first (evaluation notes go on it), then evaluation, then the caller's callbacks.
    for callback in [progress_cb, eval_cb, *callbacks]:
        if callback is not None:
            trainer.add_callback(callback)
    return TrainingRun(trainer, config, out, resolved, tokenizer, template, device, qlora, dtype, layers, num_layers,
                       len(examples), truncated, progress_cb, eval_cb)


def warm_start(model: Any, config: TrainConfig, resolved: Any, template: Any, tokenizer: Any) -> tuple[Any, dict]:
    """Wrap `model` with the trainable weights of `config.init_adapter`, after checking that it was
    trained on this base with these templates. Returns the model and the LoRA shape it brings."""
    from peft import PeftModel

    path = resolve_adapter(config.init_adapter)
    check_compatible(read_metadata(path), resolved, template, tokenizer)
    lora = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    shape = {
        "rank": lora["r"],
        "alpha": lora["lora_alpha"],
        "dropout": lora.get("lora_dropout", 0.0),
        "target_modules": sorted(lora["target_modules"]),
        "layers": lora.get("layers_to_transform") or "all",
    }
    return PeftModel.from_pretrained(model, str(path), is_trainable=True), shape


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
        run.trainer.train(resume_from_checkpoint=resume_from)
    state = run.trainer.state
    config = run.config  # with a warm start, the LoRA shape is the starting adapter's

    # The final adapter: the best by dev F1 when there was a dev set, else the last.
    best = run.evaluation.best if run.evaluation is not None else None
    if best is not None and (out / BEST / WEIGHTS_FILE).is_file():
        copy_adapter_files(out / BEST, out)
    else:
        tmp = out / ".last"
        run.trainer.model.save_pretrained(str(tmp), safe_serialization=True)
        copy_adapter_files(tmp, out)
        shutil.rmtree(tmp, ignore_errors=True)
    losses = [(h["step"], float(h["loss"])) for h in state.log_history if "loss" in h]
    hyperparameters = {
        **{k: v for k, v in dataclasses.asdict(config).items()
           if k not in ("base_model", "template", "device", "candidates")},
        "layers_to_transform": run.layers,
        "num_hidden_layers": run.num_layers,
        "qlora": run.qlora,
        "device": run.device,
        "compute_dtype": "bfloat16" if run.qlora else str(run.dtype).replace("torch.", ""),
        "effective_batch_size": config.batch_size * config.grad_accum,
        "steps": state.global_step,
        "trainable_parameters": sum(p.numel() for p in run.trainer.model.parameters() if p.requires_grad),
    }
    if config.init_adapter:
        start = resolve_adapter(config.init_adapter)
        hyperparameters["init_adapter"] = {"spec": config.init_adapter, "sha256": weights_sha256(start)}
    dev_metrics = None
    if best is not None:
        dev_metrics = {**{k: best[k] for k in ("precision", "recall", "f1", "step", "records")},
                       "history": run.evaluation.history}
    meta = build_metadata(
        resolved=run.resolved,
        template=run.template,
        template_spec=config.template if isinstance(config.template, str) else None,
        tokenizer=run.tokenizer,
        hyperparameters=hyperparameters,
        data=data if data is not None else data_description(train_records, dev_records),
        vocab=vocab,
        candidates=config.candidates,
        dev_metrics=dev_metrics,
        command=command,
    )
    write_metadata(out, meta)
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
        model=run.trainer.model,
        tokenizer=run.tokenizer,
    )
