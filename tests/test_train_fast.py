"""`llmtags.train.fast`: the cached-frozen-layers LoRA loop against trl's SFTTrainer, on the tiny random model.

The tiny model has two layers; LoRA goes on the top one only, so layer 0 is frozen and its output is what the
fast trainer caches.

Tolerances. Both paths compute the same function in fp32, in a different order: trl's attention gets an
explicit padding mask where the fast path runs SDPA with `is_causal`; trl's chunked head scores every position
where the fast path projects the completion positions only; the batch is laid out differently. Float32 sums
taken in another order differ in their last bits (relative ~1e-7 each), so nothing is bit-identical. Measured
here: the losses differ by 4e-8 relative and the weights by 1.2e-7 after two steps that moved them by ~1.5e-3.
We ask for 1e-5 relative on losses and 2e-6 absolute on weights (about 0.1% of a step): 250x and 17x margins,
and far below what a real difference (the loss normalised per micro-batch, a shifted label, a missing norm)
makes. Adam amplifies noise only where a gradient element is itself near zero (update lr * g / (|g| + 1e-8)):
on the embedded model, 597 of 2.9M LoRA weights whose gradients were below 1.3e-6 (median 2.4e-4) ended up
to 2 lr apart after one update; this tiny setup has no such elements, and being seeded, stays that way.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llmtags.train.fast import (
    FastLoraTrainer,
    HiddenStateCache,
    estimate_cache_bytes,
    length_grouped_batches,
    lowest_adapted_layer,
    steps_per_epoch,
    over_length,
    truncate_examples,
    warmup_steps,
)

MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LOSS_RTOL = 1e-5
WEIGHT_ATOL = 2e-6


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny model's ops are too small to gain from a second thread, and on a machine shared with other jobs
    two threads wait on each other at every op (a run took 97 s instead of 14): one thread, restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _examples(n: int, seed: int = 0, lengths: tuple[int, ...] = (23, 40, 9, 31, 17, 28)) -> list[dict]:
    """Random token ids (from the real vocabulary's first 5000) with a prompt part and a completion part."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = lengths[i % len(lengths)]
        ids = torch.randint(0, 5000, (length,), generator=generator).tolist()
        prompt = max(2, (2 * length) // 3)
        out.append({"input_ids": ids, "completion_mask": [0] * prompt + [1] * (length - prompt)})
    return out


def _peft(tiny_model_dir: Path, dropout: float = 0.0, seed: int = 0):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    torch.manual_seed(seed)
    return get_peft_model(model, _lora_config(dropout))


def _lora_config(dropout: float = 0.0):
    from peft import LoraConfig

    # As the recipe builds it, with layers=1 on the 2-layer model: adapters on the top layer only.
    return LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=MODULES, layers_to_transform=[1],
                      layers_pattern="layers", bias="none", task_type="CAUSAL_LM")


def _lora_weights(model) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def test_first_loss_and_weights_after_two_steps_match_trl(tiny_model_dir, tmp_path):
    """One optimizer step holds every example (two micro-batches of two), so data order cannot matter: the loss
    of a step is the summed cross-entropy of all its completion tokens over their count, however they are split
    into micro-batches. The same model, data, optimizer and schedule must give trl's losses and weights."""
    from datasets import Dataset
    from peft import set_peft_model_state_dict
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, ProgressCallback
    from trl import SFTConfig, SFTTrainer

    examples = _examples(4)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    common = dict(lr=1e-3, schedule="cosine", warmup=0.0, steps=2, batch=2, accum=2, max_length=36)  # 40 tokens: cut
    # Exactly the SFTConfig of the recipe (llmtags.train._prepare_run), for this CPU run.
    args = SFTConfig(
        output_dir=str(tmp_path / "trl"), per_device_train_batch_size=common["batch"],
        gradient_accumulation_steps=common["accum"],
        learning_rate=common["lr"], lr_scheduler_type=common["schedule"], warmup_steps=common["warmup"],
        num_train_epochs=1.0, max_steps=common["steps"], max_length=common["max_length"], completion_only_loss=True,
        activation_checkpointing=False, bf16=False, fp16=False, use_cpu=True, seed=0, data_seed=0,
        logging_strategy="steps", logging_steps=1, save_strategy="no", save_total_limit=2, eval_strategy="no",
        report_to="none", eos_token="<|im_end|>", packing=False, dataloader_num_workers=0, optim="adamw_torch",
        weight_decay=0.0,
    )
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    reference = SFTTrainer(model=base, args=args, train_dataset=Dataset.from_list(examples), processing_class=tokenizer,
                           peft_config=_lora_config())
    for noisy in (ProgressCallback, PrinterCallback):
        reference.remove_callback(noisy)

    fast_model = _peft(tiny_model_dir, seed=123)  # another random LoRA A ...
    start = _lora_weights(reference.model)
    set_peft_model_state_dict(fast_model, start)  # ... replaced by trl's, so both start alike
    assert all(torch.equal(start[k], v) for k, v in _lora_weights(fast_model).items())

    reference.train()
    fast = FastLoraTrainer(fast_model, examples, lr=common["lr"], schedule=common["schedule"],
                           warmup_ratio=common["warmup"], max_steps=common["steps"], batch_size=common["batch"],
                           grad_accum=common["accum"], seed=0, log_every=1, max_length=common["max_length"])
    assert fast.first == 1 and fast.max_steps == 2 and fast.epoch_steps == 1
    fast.train()

    trl_losses = [h["loss"] for h in reference.state.log_history if "loss" in h]
    fast_losses = [h["loss"] for h in fast.state.log_history if "loss" in h]
    assert len(trl_losses) == len(fast_losses) == 2
    assert fast_losses[0] == pytest.approx(trl_losses[0], rel=LOSS_RTOL)
    assert fast_losses[1] == pytest.approx(trl_losses[1], rel=LOSS_RTOL)
    lrs = ([h["learning_rate"] for h in reference.state.log_history if "loss" in h],
           [h["learning_rate"] for h in fast.state.log_history if "loss" in h])
    assert lrs[0] == pytest.approx(lrs[1])
    assert fast.state.global_step == reference.state.global_step == 2

    trl_after, fast_after = _lora_weights(reference.model), _lora_weights(fast.model)
    assert trl_after.keys() == fast_after.keys()
    # Both steps moved the weights: B by about lr each step; A (whose gradient is zero while B is) on step 2.
    assert all((trl_after[k] - start[k]).abs().max() > 2e-4 for k in start), "a LoRA matrix did not move"
    for key in trl_after:
        torch.testing.assert_close(fast_after[key], trl_after[key], rtol=0, atol=WEIGHT_ATOL, msg=key)


def test_checkpoint_and_resume_equal_an_uninterrupted_run(tiny_model_dir, tmp_path):
    """Interrupted in step 3 (checkpoints every step, 2 kept), resumed from the last checkpoint, in the middle of
    the first epoch (3 steps of 2 micro-batches; the 4th step starts the second epoch): the same losses and
    bit-identical final weights as without the interruption, LoRA dropout included (its RNG is restored)."""
    from transformers import TrainerCallback
    from transformers.trainer_utils import get_last_checkpoint

    examples = _examples(6)

    def trainer(out: Path, callbacks=()):
        t = FastLoraTrainer(_peft(tiny_model_dir, dropout=0.1), examples, lr=5e-3, schedule="linear",
                            warmup_ratio=0.2, max_steps=4, batch_size=1, grad_accum=2, seed=7, checkpoint_dir=out,
                            save_every=1, save_total_limit=2, log_every=1)
        for callback in callbacks:
            t.add_callback(callback)
        return t

    class Interrupt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise KeyboardInterrupt

    class Evaluates(TrainerCallback):
        """Like GenerationEval: switches the model to eval mode in on_step_end; also records what it sees."""

        def __init__(self):
            self.steps, self.logged, self.began_at, self.ended_at = [], [], None, None

        def on_train_begin(self, args, state, control, **kwargs):
            self.began_at = state.global_step

        def on_step_end(self, args, state, control, model=None, **kwargs):
            assert model.training
            self.steps.append(state.global_step)
            model.eval()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if "loss" in logs:
                self.logged.append((state.global_step, logs["loss"]))

        def on_train_end(self, args, state, control, **kwargs):
            self.ended_at = state.global_step

    whole_watch = Evaluates()
    whole = trainer(tmp_path / "whole", [whole_watch])
    assert whole.epoch_steps == steps_per_epoch(6, 1, 2) == 3 and whole.num_epochs == 2
    whole.train()
    assert whole_watch.steps == [1, 2, 3, 4] and whole_watch.ended_at == 4
    assert whole.state.epoch == pytest.approx(4 / 3)
    # Beside the checkpoints, the frozen layers' hidden states, kept for a resume (in another session).
    assert sorted(p.name for p in (tmp_path / "whole").iterdir()) == ["checkpoint-3", "checkpoint-4", "frozen"]

    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        trainer(out, [Interrupt()]).train()
    last = get_last_checkpoint(str(out))
    assert Path(last).name == "checkpoint-2"  # step 3 was interrupted before its checkpoint
    assert json.loads((Path(last) / "trainer_state.json").read_text())["global_step"] == 2
    assert (Path(last) / "adapter_model.safetensors").is_file() and (Path(last) / "adapter_config.json").is_file()

    [cached] = (out / "frozen").glob("hidden-*.f32")
    assert cached.with_suffix(".done").is_file()
    written = cached.stat().st_mtime_ns
    watch = Evaluates()
    resumed = trainer(out, [watch])
    resumed.train(resume_from_checkpoint=last)
    # The resumed run mapped the states the interrupted one wrote instead of running the frozen layers again.
    assert resumed.cache.path == cached and cached.stat().st_mtime_ns == written
    assert watch.began_at == 2 and watch.steps == [3, 4] and resumed.state.global_step == 4
    assert [h["step"] for h in resumed.state.log_history if "loss" in h] == [1, 2, 3, 4]
    assert watch.logged == whole_watch.logged[2:]
    final, expected = _lora_weights(resumed.model), _lora_weights(whole.model)
    assert any(v.abs().max() > 0 for k, v in expected.items() if "lora_B" in k)
    for key in expected:
        assert torch.equal(final[key], expected[key]), key


def test_a_run_of_part_of_an_epoch_caches_only_the_examples_its_steps_train_on(tiny_model_dir, tmp_path,
                                                                                  monkeypatch):
    """3 steps of 2 over 12 examples use 6: only those go through the frozen layers, and the run trains exactly
    as one that cached all 12."""
    examples = _examples(12)

    def trainer(out: Path):
        return FastLoraTrainer(_peft(tiny_model_dir), examples, lr=5e-3, schedule="cosine", max_steps=3,
                               batch_size=2, grad_accum=1, seed=3, checkpoint_dir=out)

    part = trainer(tmp_path / "part")
    planned = sorted(i for batch in part.epoch_batches(0)[:3] for i in batch)
    assert part.planned_examples() == planned and len(planned) == 6
    part.train()
    assert [i for i, n in enumerate(part.cache.lengths) if n] == planned
    assert part.cache.store.shape[0] == sum(len(examples[i]["input_ids"]) for i in planned)
    unplanned = next(i for i in range(12) if i not in planned)
    with pytest.raises(KeyError, match="left out of the cache"):
        part.cache.batch([unplanned])

    monkeypatch.setattr(FastLoraTrainer, "planned_examples", lambda self: None)
    whole = trainer(tmp_path / "whole")
    whole.train()
    assert whole.cache.store.shape[0] == sum(len(e["input_ids"]) for e in examples)
    mine, expected = _lora_weights(part.model), _lora_weights(whole.model)
    for key in expected:
        assert torch.equal(mine[key], expected[key]), key
    # A whole epoch or more caches every example.
    monkeypatch.undo()
    assert FastLoraTrainer(_peft(tiny_model_dir), examples, lr=5e-3, max_steps=6, batch_size=2,
                           seed=3).planned_examples() is None


def test_cache_equals_the_models_hidden_states_at_the_first_adapted_layer(tiny_model_dir, tmp_path):
    """In memory and memory-mapped, the cached states are the full forward's input of the lowest adapted layer."""
    examples = _examples(6)
    model = _peft(tiny_model_dir)
    assert lowest_adapted_layer(model) == 1
    model.eval()
    with torch.no_grad():
        expected = [model(input_ids=torch.tensor([e["input_ids"]]), output_hidden_states=True).hidden_states[1][0]
                    for e in examples]
    lengths = [len(e["input_ids"]) for e in examples]
    size = estimate_cache_bytes(lengths, 64)
    assert size == sum(lengths) * 64 * 4
    messages: list[str] = []
    for budget in (size, size - 1):  # in memory; then just over budget, so memory-mapped under tmp_path
        cache = HiddenStateCache.build(model, examples, 1, memory_budget_bytes=budget, cache_dir=tmp_path,
                                       batch_tokens=64, log=messages.append)
        assert cache.nbytes == size and (cache.path is not None) == (budget < size)
        for i, hidden in enumerate(expected):
            row = cache.store[cache.offsets[i]:cache.offsets[i] + lengths[i]]
            torch.testing.assert_close(row, hidden, rtol=1e-5, atol=1e-6)
        # A padded batch holds each example's states, then zeros.
        batch = cache.batch([2, 1])
        assert batch.shape == (2, max(lengths[2], lengths[1]), 64)
        assert torch.equal(batch[0, :lengths[2]], cache.store[cache.offsets[2]:cache.offsets[2] + lengths[2]])
        assert not batch[0, lengths[2]:].any()
    assert "in memory" in messages[0] and "memory-mapped" in messages[1]
    assert not list(tmp_path.iterdir())  # the mapped file is unlinked once mapped


def test_completion_only_head_loss_equals_full_logits_cross_entropy(tiny_model_dir):
    """The loss of a padded batch through the adapted layers and the completion-only head equals the model's own
    forward (all logits, labels -100 on the prompt) per example, summed."""
    import torch.nn.functional as F

    examples = _examples(5)
    model = _peft(tiny_model_dir)
    with torch.no_grad():  # non-zero LoRA B, so the adapted layer's LoRA path counts too
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    trainer = FastLoraTrainer(model, examples, lr=1e-3, max_steps=1, batch_size=5)
    model.eval()
    with torch.no_grad():
        fast, count = trainer.loss_sum([0, 1, 2, 3, 4])
        full, full_count = 0.0, 0
        for e in examples:
            ids = torch.tensor([e["input_ids"]])
            labels = ids.clone()
            labels[0, torch.tensor(e["completion_mask"]) == 0] = -100
            logits = model(input_ids=ids).logits[0, :-1]
            full += F.cross_entropy(logits, labels[0, 1:], ignore_index=-100, reduction="sum").item()
            full_count += int((labels[0, 1:] != -100).sum())
    assert count == full_count == sum(sum(e["completion_mask"][1:]) for e in examples)
    assert float(fast) == pytest.approx(full, rel=LOSS_RTOL)
    # Under bf16 autocast (auto on a CPU with native bf16) the layers round to 8 bits of mantissa: close, but not the same loss.
    trainer.bf16 = True
    with torch.no_grad():
        rounded, _ = trainer.loss_sum([0, 1, 2, 3, 4])
    assert float(rounded) != float(fast) and float(rounded) == pytest.approx(full, rel=2e-2)


def test_batches_steps_and_truncation_follow_the_trainer():
    lengths = [5, 50, 7, 33, 12, 48, 9, 21, 40, 3, 18]
    batches = length_grouped_batches(lengths, 3, seed=1, epoch=0, megabatch=2)
    assert len(batches) == 4 and sorted(i for b in batches for i in b) == list(range(11))
    assert all(lengths[b[0]] >= lengths[b[-1]] for b in batches)  # sorted within a megabatch
    assert batches == length_grouped_batches(lengths, 3, seed=1, epoch=0, megabatch=2)
    assert batches != length_grouped_batches(lengths, 3, seed=1, epoch=1, megabatch=2)
    # transformers.Trainer: ceil(batches / grad_accum) optimizer steps per epoch.
    assert steps_per_epoch(11, 3, 1) == 4 and steps_per_epoch(11, 3, 3) == 2 and steps_per_epoch(2, 8, 4) == 1
    from transformers import TrainingArguments

    for warmup, total in ((0.3, 7), (0.03, 100), (0.0, 5), (4, 50)):
        assert warmup_steps(warmup, total) == TrainingArguments(output_dir="unused", warmup_steps=warmup,
                                                                 report_to="none").get_warmup_steps(total)
    # trl keeps the start of a long example and drops one whose completion was cut off entirely.
    cut = truncate_examples([{"input_ids": [1, 2, 3, 4], "completion_mask": [0, 0, 1, 1]},
                             {"input_ids": [1, 2, 3, 4], "completion_mask": [0, 0, 0, 1]}], 3)
    assert cut == [{"input_ids": [1, 2, 3], "completion_mask": [0, 0, 1]}]
    # What the run warns about at its start: one cut, one left out, one that fits.
    examples = [{"input_ids": [1, 2, 3, 4], "completion_mask": [0, 0, 1, 1]},
                {"input_ids": [1, 2, 3, 4], "completion_mask": [0, 0, 0, 1]},
                {"input_ids": [1, 2], "completion_mask": [0, 1]}]
    assert over_length(examples, 3) == (1, 1) and over_length(examples, 4) == (0, 0)


def test_refuses_trainable_weights_below_the_cached_layers(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32),
                           LoraConfig(r=4, target_modules=["q_proj"], layers_to_transform=[1],
                                      layers_pattern="layers", task_type="CAUSAL_LM"))
    FastLoraTrainer(model, _examples(2), lr=1e-3, max_steps=1)  # adapters on layer 1 only: fine
    model.base_model.model.model.layers[0].self_attn.q_proj.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="below layer 1"):
        FastLoraTrainer(model, _examples(2), lr=1e-3, max_steps=1)
