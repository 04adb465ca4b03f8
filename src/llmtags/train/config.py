"""Training hyper-parameters: `TrainConfig` (read from TOML, overridden by flags) and the layer choice."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from ..engines.base import ENGINE_CHOICES, MAX_NEW_TOKENS
from ..options import OptionsError, check_budget
from ..proposer import FEATURE_VERSIONS, FEATURES_VERSION

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


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
    # Retrieval (retrieve.py): each example shows its `retrieve` nearest records of `demos` (labelled
    # files, usually the training files themselves: an example's own record is never shown), as
    # `generate --demos --retrieve` will. The adapter ships the pool and K (adapters/pack.py).
    demos: str | None = None
    retrieve: int = 0
    rename: float = 0.0  # share of examples whose attributes are renamed (train/rename.py)
    # The prompt budget (budget.py), as generate's --demo-text / --text-budget: neighbours shown "full" or by
    # their "title", texts over text_budget characters shown as title + windows. The adapter records both,
    # and generate --adapter prompts the same way.
    demo_text: str = "full"
    text_budget: int | None = None
    # The span proposer (proposer.py): a CRF trained on the training records, whose spans every prompt
    # shows; training examples show those of a CRF trained on the other `proposer_folds` - 1 folds. The
    # adapter ships the CRF trained on all of them, and generate --adapter uses it. auto: when the
    # template renders `proposals` (tuned does; the zh/en defaults do not).
    span_proposer: bool | str = "auto"
    proposer_folds: int = 5
    proposer_iterations: int = 80  # the CRF's L-BFGS iterations (proposer.ProposerSettings)
    # Its feature set (proposer.FEATURE_VERSIONS). A run resumed after a newer llmtags changed the default
    # gives the version it started with, or its training prompts would change under it.
    proposer_features: int = FEATURES_VERSION
    rank: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))
    # Which transformer layers carry adapters: N = the top N layers, "all", or a list of layer indices.
    # None: the top DEFAULT_LAYERS for a new adapter, a warm start's own (more than its own widen it).
    layers: int | str | list[int] | None = None
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
    # The engine dev evaluations generate with: auto picks llama.cpp where generate would (a GGUF base on CPU,
    # llama-cpp-python installed), so a run is measured on the engine and weights it will tag with rather than
    # on the float32 training model; the adapter as it stands is converted for llama.cpp at each evaluation.
    eval_engine: str = "auto"
    max_new_tokens: int = MAX_NEW_TOKENS
    save_every: int | None = None  # checkpoint interval in steps; None: same as eval_every (or 50)
    save_total_limit: int = 2
    log_every: int = 10
    dtype: str = "auto"  # auto: bf16 on CUDA, bf16 autocast on CPUs with native bf16, else fp32; or float32 / bfloat16
    qlora: bool | str = "auto"  # auto: 4-bit QLoRA on CUDA, plain LoRA on CPU
    # The fast CPU path (train/fast.py): frozen layers computed once, logits only where there is loss,
    # batches of similar length. auto: on CPU without QLoRA; false: trl's SFTTrainer everywhere.
    fast: bool | str = "auto"
    device: str = "auto"
    # Warm start: an adapter (registry name or directory) whose weights training continues from. Its LoRA
    # shape (rank, alpha, modules, layers) replaces the values above, except `layers` naming all of its
    # layers and more, which widens it (train.recipe.warm_start); base and templates must match.
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
        return cls.from_dict(cls.toml_table(path), source=str(path))

    @staticmethod
    def toml_table(path: str | Path) -> dict[str, Any]:
        """The values a TOML file sets: its `[train]` table if it has one, else its top-level keys."""
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise TrainError(f"cannot read training config {path}: {exc}") from exc
        if isinstance(data.get("train"), dict):
            return data["train"]
        return {k: v for k, v in data.items() if not isinstance(v, dict)}

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
        self.qlora = _auto_or_bool(self.qlora, "qlora")
        self.fast = _auto_or_bool(self.fast, "fast")
        self.span_proposer = _auto_or_bool(self.span_proposer, "span_proposer")
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
            (self.eval_engine in ENGINE_CHOICES, f"eval_engine: {', '.join(ENGINE_CHOICES)}"),
            (bool(self.target_modules), "target_modules is empty"),
            (self.retrieve >= 0, "retrieve must not be negative"),
            (not self.retrieve or bool(self.demos), "retrieve needs demos: the labelled records to retrieve from"),
            (0 <= self.rename < 1, "rename must be in [0, 1)"),
            (self.proposer_folds >= 2, "proposer_folds must be at least 2"),
            (self.proposer_iterations > 0, "proposer_iterations must be positive"),
            (self.proposer_features in FEATURE_VERSIONS,
             f"proposer_features must be one of {', '.join(map(str, FEATURE_VERSIONS))}"),
            # Renamed answers need the names in the prompt: demonstrations (and the schema they bring).
            (not self.rename or self.retrieve > 0, "rename needs retrieve > 0: the renamed names reach the "
             "model through its demonstrations and schema"),
        ]
        for ok, message in checks:
            if not ok:
                raise TrainError(message)
        # The prompt budget follows generate's rules (0: whole texts, recorded as unset), so an adapter's
        # recorded budget is one generate accepts.
        try:
            check_budget(self.demo_text, self.text_budget, "demo_text", "text_budget")
        except OptionsError as exc:
            raise TrainError(str(exc)) from None
        self.text_budget = self.text_budget or None

    @property
    def checkpoint_every(self) -> int:
        return self.save_every if self.save_every else (self.eval_every or 50)


def warm_start_defaults(config: TrainConfig, given: set[str], meta: dict[str, Any],
                        training_files: str) -> tuple[TrainConfig, list[str]]:
    """The prompt a warm start continues from, for every setting the run does not set (`given`: the
    TrainConfig fields set by a flag or --train-config): the init adapter's base (an embedded one), template,
    prompt budget, max length and proposer features, and, where it read them, candidates and K retrieved
    neighbours, drawn now from `training_files` (the new catalogue's sample, comma-joined): its prompts keep
    their shape, filled from the sample. Its batch (size and accumulation) carries over too: the learning
    rate it was tuned at assumed that many examples a step, and a short adaptation at train's default of
    16 takes half the optimizer steps of one at the shipped adapters' 8 in the same time. Returns the
    config and one line per inherited setting, as flags.

    `llmtags train SAMPLE --init-adapter en-products` is workflow (b) of a new catalogue; without this the
    run would train the adapter on prompts of another template and shape than it learnt."""
    def unset(name: str) -> bool:
        return name not in given

    hyper = meta.get("hyperparameters") or {}
    changes: dict[str, Any] = {}
    base = (meta.get("base_model") or {}).get("spec")
    if unset("base_model") and config.base_model is None and isinstance(base, str) and base.startswith("embedded"):
        changes["base_model"] = base
    template = (meta.get("template") or {}).get("spec")
    if unset("template") and isinstance(template, str):
        changes["template"] = template
    k = (meta.get("retrieval") or {}).get("k")
    if unset("retrieve") and isinstance(k, int) and k > 0:
        changes["retrieve"] = k
        if unset("demos"):
            changes["demos"] = training_files
    if unset("candidates") and ((meta.get("vocabulary") or {}).get("candidates")):
        changes["candidates"] = training_files
    for name in ("demo_text", "text_budget", "max_length"):
        if unset(name) and hyper.get(name) is not None:
            changes[name] = hyper[name]
    # the batch as a pair: a run that sets one of them has chosen its batch
    if unset("batch_size") and unset("grad_accum") and hyper.get("batch_size") and hyper.get("grad_accum"):
        changes.update(batch_size=hyper["batch_size"], grad_accum=hyper["grad_accum"])
    proposer = (meta.get("proposer") or {}).get("settings") or {}
    for name, key in (("proposer_features", "features"), ("proposer_iterations", "max_iterations")):
        if unset(name) and proposer.get(key) is not None:
            changes[name] = proposer[key]
    changes = {name: value for name, value in changes.items() if getattr(config, name) != value}
    lines = [f"--{name.replace('_', '-')} {'the training records' if value == training_files else value}"
             for name, value in changes.items()]
    return config.merged(**changes), lines


def _auto_or_bool(value: bool | str, name: str) -> bool | str:
    """'auto', or a boolean written as true/false/yes/no/1/0."""
    if isinstance(value, str) and value != "auto":
        if value.lower() not in ("true", "false", "yes", "no", "1", "0"):
            raise TrainError(f"{name} must be auto, true or false, not {value!r}")
        return value.lower() in ("true", "yes", "1")
    return value


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


DEFAULT_LAYERS = 8  # a new adapter's: the top 8 layers


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
