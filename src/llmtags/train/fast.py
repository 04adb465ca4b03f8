"""A fast CPU training loop for LoRA on the top layers of a decoder-only model (issue #13).

`FastLoraTrainer` trains the same adapter, with the same loss, optimizer and schedule, as trl's SFTTrainer
configured by the training recipe, and offers the small part of the `transformers.Trainer` interface the
recipe uses (`train(resume_from_checkpoint=...)`, `state`, `model`, `add_callback`), so the recipe can swap
it in. It is faster because:

1. The frozen bottom layers run once. LoRA sits on layers `first..n-1` only (peft's `layers_to_transform`),
   so the hidden states entering layer `first` do not change during training (the frozen layers have no
   dropout: Qwen2's attention_dropout is 0). They are computed once, without gradients, and kept as fp32:
   with a `checkpoint_dir`, in a memory-mapped file there (`frozen/hidden-KEY.f32`, keyed by the model and
   the examples' tokens), so a resumed run, in this session or a later one, maps it instead of computing it
   again; else in memory, or in a memory-mapped file under `cache_dir` when larger than
   `memory_budget_bytes`. Each step then runs only the adapted layers, the final norm and the head.
2. The head runs only where there is loss: the (frozen, tied) LM head projects only the positions whose next
   token is a completion token, not every position of the padded batch.
3. Batches hold examples of similar length (HF's `group_by_length` scheme: shuffled megabatches of 50
   batches, sorted by length), padded on the right to their own longest example only.

With `bf16=True` (what `--dtype auto` gives on a CPU with native bf16, `models.pick_dtype`) the decoder
layers run under bf16 autocast, in the frozen forward and in training; the head and the loss stay fp32.
That was 1.32x the tokens/s and 1.83x the caching rate on 2 AVX512-BF16 EPYC cores
(eval/bench_train_bf16_cpu.md; 1.5x and 2.4x on an AMX Xeon, eval/bench_train.md), but the losses move by
up to about 1% from the fp32 path's.

Loss normalisation is the Trainer's with `num_items_in_batch` (transformers >= 4.46, trl >= 0.20): the
summed cross-entropy of every completion token of one optimizer step (all `grad_accum` micro-batches) over
their count, so a logged loss is the mean per completion token, exactly comparable with trl's.

torch, peft and transformers are imported when used, so importing this module stays light.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from ..adapters.registry import WEIGHTS_FILE
from .frozen import (
    DEFAULT_MEMORY_BUDGET,
    HiddenStateCache,
    decoder_parts,
    estimate_cache_bytes,
    run_layers,
)

# transformers' checkpoint file names, so that `get_last_checkpoint` and a resume find what they expect
TRAINER_STATE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
RNG_FILE = "rng_state.pth"
CHECKPOINT_PREFIX = "checkpoint"
MEGABATCH = 50  # batches per length-sorted megabatch (transformers' LengthGroupedSampler uses 50 too)
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


# --- helpers -------------------------------------------------------------------------------------------


def lowest_adapted_layer(model: Any) -> int:
    """The lowest transformer layer that carries the active LoRA adapter of a peft model (0: all layers).

    Read from the adapter's config: `layers_to_transform` None means every layer, an int one layer, a list
    those layers."""
    config = model.peft_config[model.active_adapter]
    layers = getattr(config, "layers_to_transform", None)
    if layers is None:
        return 0
    if isinstance(layers, int):
        return layers
    return min(layers) if len(layers) else 0


def truncate_examples(examples: Sequence[dict[str, Sequence[int]]], max_length: int | None) -> list[dict[str, list[int]]]:
    """Cut examples to `max_length` tokens keeping the start, and drop those left without any completion token,
    as trl's SFTTrainer does (`truncation_mode="keep_start"`, then its fully-masked filter)."""
    out = []
    for example in examples:
        ids, mask = list(example["input_ids"]), list(example["completion_mask"])
        if len(ids) != len(mask):
            raise ValueError("an example's input_ids and completion_mask differ in length")
        if max_length is not None:
            ids, mask = ids[:max_length], mask[:max_length]
        if any(mask):
            out.append({"input_ids": ids, "completion_mask": mask})
    return out


def over_length(examples: Sequence[dict[str, Sequence[int]]], max_length: int) -> tuple[int, int]:
    """(cut, dropped): examples longer than `max_length` that keep part of their answer, and those whose
    prompt alone fills `max_length` (`truncate_examples` leaves them out: nothing of the answer is left)."""
    long = [e for e in examples if len(e["input_ids"]) > max_length]
    dropped = sum(not any(e["completion_mask"][:max_length]) for e in long)
    return len(long) - dropped, dropped


def batches_per_epoch(num_examples: int, batch_size: int) -> int:
    return math.ceil(num_examples / batch_size)


def steps_per_epoch(num_examples: int, batch_size: int, grad_accum: int) -> int:
    """Optimizer steps in one epoch, as `transformers.Trainer` counts them (the last one may hold fewer
    micro-batches)."""
    return max(math.ceil(batches_per_epoch(num_examples, batch_size) / grad_accum), 1)


def warmup_steps(warmup: float, total_steps: int) -> int:
    """`TrainingArguments.get_warmup_steps`: a value >= 1 is a step count, one below 1 a ratio of the total."""
    return int(warmup) if warmup >= 1 else math.ceil(total_steps * warmup)


def length_grouped_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int,
                           megabatch: int = MEGABATCH) -> list[list[int]]:
    """One epoch's batches of example indices: a seeded shuffle, cut into megabatches of `megabatch` batches,
    each sorted by length (longest first) and cut into batches; then the batch order is shuffled too, so that
    the step does not predict the length. `ceil(n / batch_size)` batches, as a DataLoader makes."""
    import torch

    generator = torch.Generator().manual_seed(int(seed) * 100_003 + int(epoch))
    order = torch.randperm(len(lengths), generator=generator).tolist()
    size = megabatch * batch_size
    batches: list[list[int]] = []
    for start in range(0, len(order), size):
        chunk = sorted(order[start:start + size], key=lambda i: -lengths[i])
        batches.extend(chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size))
    permutation = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in permutation]


# --- the trainer ---------------------------------------------------------------------------------------


class FastLoraTrainer:
    """Train a peft LoRA model's adapted top layers on cached frozen hidden states (see the module docstring).

    `model`: a peft PeftModel with its trainable LoRA adapter attached (`get_peft_model`, or a warm start
    `PeftModel.from_pretrained(..., is_trainable=True)`). `examples`: `{"input_ids", "completion_mask"}` dicts
    (1 on the completion: the loss is on the completion only); cut to `max_length` like trl, if given.
    `progress`: a callable taking messages (e.g. the recipe's LossProgress.write), or None.
    `cache_bar`: a tqdm bar while the frozen layers run. `verify`: check one example's loss against the model's
    own forward before training. `bf16`: bf16 autocast in the layers (see the module docstring). The other
    arguments mean what the recipe's
    TrainConfig fields of the same names mean; `schedule` is a transformers scheduler name.
    """

    def __init__(self, model: Any, examples: Sequence[dict[str, Sequence[int]]], *, lr: float,
                 schedule: str = "cosine", warmup_ratio: float = 0.0, epochs: float = 1.0, max_steps: int = -1,
                 batch_size: int = 8, grad_accum: int = 1, seed: int = 0, checkpoint_dir: str | Path | None = None,
                 save_every: int = 0, save_total_limit: int | None = None, log_every: int = 10,
                 first_adapted_layer: int | None = None, max_length: int | None = None,
                 cache_dir: str | Path | None = None, memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET,
                 max_grad_norm: float = 1.0, progress: Callable[[str], None] | None = None, cache_bar: bool = False,
                 verify: bool = True, bf16: bool = False):
        from transformers import TrainerControl, TrainerState

        if batch_size <= 0 or grad_accum <= 0:
            raise ValueError("batch_size and grad_accum must be positive")
        if not (max_steps > 0 or epochs > 0):
            raise ValueError("give epochs > 0 or max_steps > 0")
        self.model = model
        self.examples = truncate_examples(examples, max_length)
        if not self.examples:
            raise ValueError("no example has a completion token (after truncation)")
        self.lengths = [len(e["input_ids"]) for e in self.examples]
        self.lr, self.schedule, self.warmup_ratio = lr, schedule, warmup_ratio
        self.batch_size, self.grad_accum, self.seed = batch_size, grad_accum, seed
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.save_every, self.save_total_limit, self.log_every = save_every or 0, save_total_limit, log_every
        self.max_grad_norm, self.cache_dir, self.memory_budget_bytes = max_grad_norm, cache_dir, memory_budget_bytes
        self.progress, self.cache_bar, self.verify, self.bf16 = progress, cache_bar, verify, bf16
        self.callbacks: list[Any] = []
        self.cache: HiddenStateCache | None = None
        self.optimizer: Any = None
        self.lr_scheduler: Any = None

        _, backbone, _ = decoder_parts(model)
        self.num_layers = len(backbone.layers)
        self.first = lowest_adapted_layer(model) if first_adapted_layer is None else int(first_adapted_layer)
        self._check_trainable(backbone)
        if getattr(backbone.config, "attention_dropout", 0.0) and self.first > 0:
            self._say(f"warning: attention_dropout is {backbone.config.attention_dropout}; the cached frozen layers "
                      "run without it")

        self.epoch_steps = steps_per_epoch(len(self.examples), batch_size, grad_accum)
        if max_steps > 0:
            self.max_steps = int(max_steps)
            self.num_epochs = math.ceil(self.max_steps / self.epoch_steps)
        else:
            self.max_steps = math.ceil(epochs * self.epoch_steps)
            self.num_epochs = math.ceil(epochs)
        self.warmup_steps = warmup_steps(warmup_ratio, self.max_steps)
        self.args = SimpleNamespace(
            output_dir=str(self.checkpoint_dir) if self.checkpoint_dir else None, learning_rate=lr,
            lr_scheduler_type=schedule, per_device_train_batch_size=batch_size, train_batch_size=batch_size,
            gradient_accumulation_steps=grad_accum, num_train_epochs=epochs, max_steps=self.max_steps,
            warmup_steps=self.warmup_steps, logging_steps=log_every, save_steps=save_every,
            save_total_limit=save_total_limit, seed=seed, max_grad_norm=max_grad_norm, eval_strategy="no",
            should_save=True, should_log=True, world_size=1, process_index=0, local_process_index=0,
            disable_tqdm=True, report_to=[],
        )
        self.state = TrainerState(max_steps=self.max_steps, num_train_epochs=self.num_epochs, logging_steps=log_every,
                                  save_steps=save_every or 0, train_batch_size=batch_size)
        self.control = TrainerControl()

    # --- public --------------------------------------------------------------------------------------

    def add_callback(self, callback: Any) -> None:
        self.callbacks.append(callback() if isinstance(callback, type) else callback)

    def remove_callback(self, callback: Any) -> None:
        self.callbacks = [c for c in self.callbacks if c is not callback and type(c) is not callback]

    def estimated_cache_bytes(self) -> int:
        _, backbone, _ = decoder_parts(self.model)
        return estimate_cache_bytes(self.lengths, backbone.config.hidden_size)

    def build_cache(self) -> HiddenStateCache:
        if self.cache is None:
            started = time.perf_counter()
            self.cache = HiddenStateCache.build(
                self.model, self.examples, self.first, memory_budget_bytes=self.memory_budget_bytes,
                cache_dir=self.cache_dir, log=self.progress, bar=self.cache_bar, bf16=self.bf16,
                persist_dir=self.checkpoint_dir / "frozen" if self.checkpoint_dir is not None else None,
                only=self.planned_examples())
            self.cache_seconds = time.perf_counter() - started
            if self.verify:
                self._verify()
        return self.cache

    def planned_examples(self) -> list[int] | None:
        """The examples that the planned steps train on (None: every one). A run of part of an epoch (a short
        adaptation) then runs the frozen layers over just those, not over the whole epoch's."""
        used: set[int] = set()
        for epoch in range(self.num_epochs):
            steps = min(self.epoch_steps, self.max_steps - epoch * self.epoch_steps)
            for batch in self.epoch_batches(epoch)[:steps * self.grad_accum]:
                used.update(batch)
        return None if len(used) == len(self.examples) else sorted(used)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        return length_grouped_batches(self.lengths, self.batch_size, self.seed, epoch)

    def loss_sum(self, indices: Sequence[int]) -> tuple[Any, int]:
        """Summed cross-entropy over the completion tokens of the examples `indices`, and their count."""
        import torch
        import torch.nn.functional as F

        _, backbone, head = decoder_parts(self.model)
        device = head.weight.device
        hidden = self.build_cache().batch(indices, device)
        width = hidden.shape[1]
        select = torch.zeros(len(indices), width, dtype=torch.bool)
        targets = []
        for row, i in enumerate(indices):
            ids, mask = self.examples[i]["input_ids"], self.examples[i]["completion_mask"]
            # position p predicts token p + 1: it carries loss when token p + 1 is a completion token
            positions = [p for p in range(len(ids) - 1) if mask[p + 1]]
            select[row, positions] = True
            targets.extend(ids[p + 1] for p in positions)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.bf16):
            hidden = run_layers(backbone, hidden, self.first, self.num_layers)
        hidden = backbone.norm(hidden[select.to(device)].float())  # per position: select first, then norm
        logits = head(hidden)
        loss = F.cross_entropy(logits.float(), torch.tensor(targets, device=device), reduction="sum")
        return loss, len(targets)

    def train(self, resume_from_checkpoint: str | Path | None = None) -> Any:
        import torch
        from transformers import TrainerControl, get_scheduler
        from transformers.trainer_utils import TrainOutput

        started = time.perf_counter()
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=self.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
        self.lr_scheduler = get_scheduler(self.schedule, self.optimizer, num_warmup_steps=self.warmup_steps,
                                          num_training_steps=self.max_steps)
        self.control = TrainerControl()
        self.state.global_step, self.state.epoch, self.state.log_history = 0, 0.0, []
        self.state.num_input_tokens_seen = 0
        torch.manual_seed(self.seed)  # LoRA dropout's draws, as the Trainer seeds them; a resume restores them
        if resume_from_checkpoint:
            self._load_checkpoint(Path(resume_from_checkpoint))
        start_step = self.state.global_step
        self.build_cache()

        self.model.train()
        self._call("on_train_begin")
        tr_loss, last_logged, total_loss = 0.0, self.state.global_step, 0.0
        epochs_done, steps_done_in_epoch = divmod(self.state.global_step, self.epoch_steps)
        for epoch in range(epochs_done, self.num_epochs):
            if self.state.global_step >= self.max_steps or self.control.should_training_stop:
                break
            batches = self.epoch_batches(epoch)
            self._call("on_epoch_begin")
            first_step = steps_done_in_epoch if epoch == epochs_done else 0
            for update in range(first_step, self.epoch_steps):
                if self.state.global_step >= self.max_steps:
                    break
                micro = batches[update * self.grad_accum:(update + 1) * self.grad_accum]
                self._call("on_step_begin")
                step_loss, grad_norm, learning_rate = self._optimizer_step(micro, params)
                tr_loss += step_loss
                self.state.global_step += 1
                step = self.state.global_step
                self.state.epoch = epoch + min((update + 1) * self.grad_accum, len(batches)) / len(batches)

                self.control.should_log = bool(self.log_every) and step % self.log_every == 0
                self.control.should_save = bool(self.checkpoint_dir) and (
                    (self.save_every > 0 and step % self.save_every == 0) or step >= self.max_steps)
                if step >= self.max_steps:
                    self.control.should_training_stop = True
                self._call("on_step_end")
                self.model.train()  # an evaluation callback may have switched to eval mode
                if self.control.should_log and step > last_logged:
                    logs = {"loss": tr_loss / (step - last_logged), "grad_norm": grad_norm,
                            "learning_rate": learning_rate}
                    total_loss += tr_loss
                    tr_loss, last_logged = 0.0, step
                    self._log(logs)
                if self.control.should_save:
                    self._save_checkpoint()
                    self._call("on_save")
                self.control.should_log = self.control.should_save = False
                if self.control.should_training_stop:
                    break
            self._call("on_epoch_end")
            if self.control.should_training_stop:
                break
        total_loss += tr_loss
        steps = self.state.global_step - start_step
        metrics = {"train_runtime": round(time.perf_counter() - started, 4), "train_loss": total_loss / max(steps, 1),
                   "train_steps": steps, "epoch": self.state.epoch}
        self._log(metrics)
        self._call("on_train_end")
        return TrainOutput(self.state.global_step, metrics["train_loss"], metrics)

    # --- internals -----------------------------------------------------------------------------------

    def _optimizer_step(self, micro: Sequence[Sequence[int]], params: Sequence[Any]) -> tuple[float, Any, float]:
        """One optimizer step over the micro-batches `micro`: the loss of every completion token of the step
        over their count (the Trainer's `num_items_in_batch` normalisation), clipped gradients, the step.
        Returns (loss, gradient norm or None, learning rate used)."""
        import torch

        count = sum(sum(self.examples[i]["completion_mask"][1:]) for batch in micro for i in batch)
        step_loss = 0.0
        for batch in micro:
            loss_sum, _ = self.loss_sum(batch)
            loss = loss_sum / max(count, 1)
            loss.backward()
            step_loss += loss.item()
            self.state.num_input_tokens_seen += sum(self.lengths[i] for i in batch)
        grad_norm = None
        if self.max_grad_norm and self.max_grad_norm > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm))
        self.optimizer.step()
        learning_rate = self.lr_scheduler.get_last_lr()[0]
        self.lr_scheduler.step()
        self.model.zero_grad(set_to_none=True)
        return step_loss, grad_norm, learning_rate

    def _say(self, message: str) -> None:
        if self.progress is not None:
            self.progress(message)

    def _check_trainable(self, backbone: Any) -> None:
        if not 0 <= self.first < self.num_layers:
            raise ValueError(f"first_adapted_layer {self.first} is outside the model's layers 0..{self.num_layers - 1}")
        embedding = {id(p) for p in backbone.get_input_embeddings().parameters()}
        trainable = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        if not trainable:
            raise ValueError("the model has no trainable parameter: attach a LoRA adapter (is_trainable=True)")
        for name, param in trainable:
            match = _LAYER_RE.search(name)
            if id(param) in embedding or (match and int(match.group(1)) < self.first):
                raise ValueError(f"{name} is trainable but sits below layer {self.first}, whose input is cached: "
                                 "the fast trainer needs every trainable weight in the top layers, norm or head")

    def _verify(self) -> None:
        """Check one short example's loss against the model's own full forward: a model whose forward this module
        does not mirror (embedding scaling, logit soft-capping, ...) fails here instead of training wrongly."""
        import torch
        import torch.nn.functional as F

        cached = [i for i, n in enumerate(self.cache.lengths) if n]
        index = min(cached, key=lambda i: self.lengths[i])
        example = self.examples[index]
        lm, _, head = decoder_parts(self.model)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                fast, count = self.loss_sum([index])
                ids = torch.tensor([example["input_ids"]], device=head.weight.device)
                logits = lm(input_ids=ids).logits[0, :-1].float()
                labels = ids[0, 1:].clone()
                labels[torch.tensor(example["completion_mask"][1:], device=ids.device) == 0] = -100
                full = F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
        finally:
            self.model.train(was_training)
        tolerance = 3e-2 if self.bf16 else 1e-3
        if count and not math.isclose(float(fast) / count, float(full) / count, rel_tol=tolerance, abs_tol=tolerance):
            raise RuntimeError(f"the fast training path disagrees with the model's forward ({float(fast) / count:.5f} "
                               f"vs {float(full) / count:.5f} per token): this architecture is not supported")

    def _call(self, event: str, **extra: Any) -> None:
        kwargs = {"model": self.model, "optimizer": self.optimizer, "lr_scheduler": self.lr_scheduler,
                  "processing_class": None, "train_dataloader": None, "eval_dataloader": None, **extra}
        for callback in self.callbacks:
            method = getattr(callback, event, None)
            if method is None:
                continue
            result = method(self.args, self.state, self.control, **kwargs)
            if result is not None:
                self.control = result

    def _log(self, logs: dict[str, Any]) -> None:
        logs = {k: v for k, v in logs.items() if v is not None}
        if self.state.epoch is not None:
            logs["epoch"] = self.state.epoch
        self.state.log_history.append({**logs, "step": self.state.global_step})
        self._call("on_log", logs=logs)

    def _save_checkpoint(self) -> Path:
        import torch

        final = self.checkpoint_dir / f"{CHECKPOINT_PREFIX}-{self.state.global_step}"
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=self.checkpoint_dir))
        try:
            self.model.save_pretrained(str(tmp), safe_serialization=True)
            torch.save(self.optimizer.state_dict(), tmp / OPTIMIZER_FILE)
            torch.save(self.lr_scheduler.state_dict(), tmp / SCHEDULER_FILE)
            rng = {"cpu": torch.get_rng_state()}
            if torch.cuda.is_available():
                rng["cuda"] = torch.cuda.get_rng_state_all()
            torch.save(rng, tmp / RNG_FILE)
            self.state.save_to_json(str(tmp / TRAINER_STATE))
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self._rotate_checkpoints()
        return final

    def _rotate_checkpoints(self) -> None:
        if not self.save_total_limit or self.save_total_limit <= 0:
            return
        found = []
        for path in self.checkpoint_dir.glob(f"{CHECKPOINT_PREFIX}-*"):
            match = re.fullmatch(rf"{CHECKPOINT_PREFIX}-(\d+)", path.name)
            if match and path.is_dir():
                found.append((int(match.group(1)), path))
        for _, path in sorted(found)[:-self.save_total_limit]:
            shutil.rmtree(path, ignore_errors=True)

    def _load_checkpoint(self, path: Path) -> None:
        import torch
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        saved = json.loads((path / TRAINER_STATE).read_text(encoding="utf-8"))
        weights = load_file(str(path / WEIGHTS_FILE), device=str(next(self.model.parameters()).device))
        result = set_peft_model_state_dict(self.model, weights, adapter_name=self.model.active_adapter)
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise ValueError(f"{path}: adapter weights that the model lacks: {unexpected[:3]}")
        self.optimizer.load_state_dict(torch.load(path / OPTIMIZER_FILE, weights_only=True))
        self.lr_scheduler.load_state_dict(torch.load(path / SCHEDULER_FILE, weights_only=True))
        rng_file = path / RNG_FILE
        if rng_file.is_file():
            rng = torch.load(rng_file, weights_only=True)
            torch.set_rng_state(rng["cpu"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
        self.state.global_step = int(saved["global_step"])
        self.state.epoch = saved.get("epoch", 0.0)
        self.state.log_history = list(saved.get("log_history", []))
        self.state.num_input_tokens_seen = saved.get("num_input_tokens_seen", 0)
        for key in ("best_metric", "best_global_step", "best_model_checkpoint"):
            setattr(self.state, key, saved.get(key))
