"""The trainer's callbacks: a progress bar with the running loss, and dev evaluation by generation that
keeps the best adapter. transformers' `TrainerCallback` is imported when a run first needs the
classes (`callback_classes()`), so importing this module does not import torch."""

from __future__ import annotations

import functools
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..adapters.registry import WEIGHTS_FILE
from ..engines.llamacpp import LlamaCppEngine
from ..engines.transformers import TransformersEngine
from ..metrics import score
from ..tagger import tag_records


class _LossProgress:
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


DEV_ADAPTER = "dev"  # the name the adapter being trained has in a llama.cpp engine


class _GenerationEval:
    """Tag dev records by generation every `every` steps; keep the adapter with the best micro F1."""

    def __init__(self, records, tokenizer, options, every, best_dir: Path, progress, resume: bool,
                 engine: str = "transformers", base_model: str | None = None):
        self.records = list(records)
        self.tokenizer = tokenizer
        self.options = options
        self.every = every
        # "transformers": the training model itself generates; "llama.cpp": the run's base as a GGUF, with
        # the adapter as it stands converted at each evaluation (`base_model`: the run's --base-model).
        self.engine_kind = engine
        self.base_model = base_model
        self.best_dir = best_dir
        self.progress = progress
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None
        self.engine: Any = None
        self.last_step = -1
        # Seconds spent training (steps, not evaluations) before the current stretch of the run began, and
        # when it began: each evaluation records their sum, so a learning curve reads against CPU time.
        self.trained_before = 0.0
        self.stretch_start = time.perf_counter()
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
        self.trained_before = self.history[-1].get("train_seconds", 0.0) if self.history else 0.0
        self.stretch_start = time.perf_counter()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.every and state.global_step % self.every == 0:
            self.evaluate(model, state)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.last_step != state.global_step and not any(h["step"] == state.global_step for h in self.history):
            self.evaluate(model, state)

    def _engine(self, model: Any) -> Any:
        """An engine that generates with `model`'s adapter as it stands. One per run: it keeps per-tokenizer
        state (stop tokens) and, for llama.cpp, the loaded base between evaluations."""
        if self.engine_kind == "llama.cpp":
            if self.engine is None:
                self.engine = LlamaCppEngine.load(self.base_model)
            with tempfile.TemporaryDirectory(prefix="llmtags-dev-adapter-") as tmp:
                model.save_pretrained(tmp, safe_serialization=True)  # the LoRA weights only
                self.engine.add_adapter(DEV_ADAPTER, tmp, cache=False)
            self.engine.use_adapter(DEV_ADAPTER)
            return self.engine
        if self.engine is None or self.engine.model is not model:
            self.engine = TransformersEngine(model, self.tokenizer)
        return self.engine

    def evaluate(self, model: Any, state: Any) -> dict[str, Any]:
        self.last_step = state.global_step
        train_seconds = self.trained_before + time.perf_counter() - self.stretch_start
        was_training = model.training
        padding_side = self.tokenizer.padding_side
        model.eval()
        self.tokenizer.padding_side = "left"  # decoder-only batches pad on the left for generation
        start = time.perf_counter()
        try:
            results = list(tag_records(self.records, self._engine(model), self.options))
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
            "engine": self.engine_kind,
            "seconds": round(time.perf_counter() - start, 2),
            "train_seconds": round(train_seconds, 3),
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
                            f"records ({self.engine_kind}, {entry['seconds']:.0f} s); best {self.best['f1']:.3f} "
                            f"at step {self.best['step']}")
        self.trained_before, self.stretch_start = train_seconds, time.perf_counter()  # saving is not training
        return entry


class _StopOnSignal:
    """Ctrl-C (SIGINT) or SIGTERM while training: finish the step in flight, save a checkpoint, and end as
    a run that reached its last step ends (a dev evaluation, then the best adapter so far written with its
    metadata), so stopping a long run early still gives an adapter. A second signal stops at once."""

    SIGNALS = ("SIGINT", "SIGTERM")

    def __init__(self, progress: Any):
        self.progress = progress
        self.requested = False
        self._previous: dict[int, Any] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        import signal
        import threading

        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for name in self.SIGNALS:
            number = getattr(signal, name)
            current = signal.getsignal(number)
            if current in (signal.SIG_IGN, None):  # ignored (nohup), or set outside Python: left alone
                continue
            self._previous[number] = signal.signal(number, self.request)

    def request(self, signum: int, frame: Any) -> None:
        # Only a flag here: a signal can land while the progress bar writes, and writing again would raise.
        if self.requested:  # the second signal: stop now, as without this callback
            self.restore()
            raise KeyboardInterrupt
        self.requested = True

    def on_step_end(self, args, state, control, **kwargs):
        if self.requested and not control.should_training_stop:
            control.should_training_stop = True
            control.should_save = True
            self.progress.write("llmtags: stopping after this step: a checkpoint, a dev evaluation, then the best "
                                "adapter so far is written (signal again to stop at once; --resume continues the run)")

    def on_train_end(self, args, state, control, **kwargs):
        self.restore()

    def restore(self) -> None:
        """The handlers as they were before training (also after a run that raised)."""
        import signal

        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}


@functools.cache
def callback_classes() -> dict[str, type]:
    """The callbacks as transformers `TrainerCallback`s (whose no-op methods fill the other events)."""
    from transformers import TrainerCallback

    return {"LossProgress": type("LossProgress", (_LossProgress, TrainerCallback), {}),
            "GenerationEval": type("GenerationEval", (_GenerationEval, TrainerCallback), {}),
            "StopOnSignal": type("StopOnSignal", (_StopOnSignal, TrainerCallback), {})}
