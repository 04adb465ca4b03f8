"""The frozen bottom layers of a LoRA model, run once: `HiddenStateCache` keeps the hidden states that enter
the lowest adapted layer for every training example (fp32, in memory or memory-mapped), and `run_layers`
calls decoder layers exactly as the model's own forward does, so the fast trainer (`fast.py`) can start
each step there."""

from __future__ import annotations

import inspect
import os
import tempfile
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

DEFAULT_MEMORY_BUDGET = 4 << 30  # bytes of cached hidden states kept in memory; more goes to a memory-mapped file


def estimate_cache_bytes(lengths: Sequence[int], hidden_size: int, bytes_per_value: int = 4) -> int:
    """Bytes of the cached fp32 hidden states: one `hidden_size` vector per real (unpadded) token."""
    return int(sum(lengths)) * int(hidden_size) * bytes_per_value


def decoder_parts(model: Any) -> tuple[Any, Any, Any]:
    """(the causal LM, its decoder backbone, its output head) under a peft model."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = getattr(lm, lm.base_model_prefix)
    return lm, backbone, lm.get_output_embeddings()


def _causal_masks(backbone: Any, hidden: Any, position_ids: Any) -> dict[str, Any]:
    """The per-layer-type attention masks the backbone's forward makes for an unpadded (or right-padded) batch
    without a cache: `attention_mask=None`, so SDPA runs with `is_causal` and builds no mask tensor."""
    import torch
    from transformers import masking_utils

    config = backbone.config

    def make(function: Callable) -> Any:
        params = inspect.signature(function).parameters
        kwargs: dict[str, Any] = {"config": config, "attention_mask": None, "position_ids": position_ids}
        kwargs["inputs_embeds" if "inputs_embeds" in params else "input_embeds"] = hidden
        # one of the two names: newer transformers take `cache` and warn when the deprecated one is passed too
        for name in ("cache", "past_key_values"):
            if name in params:
                kwargs[name] = None
                break
        if "cache_position" in params:  # transformers < 5
            kwargs["cache_position"] = torch.arange(hidden.shape[1], device=hidden.device)
        return function(**kwargs)

    masks = {"full_attention": make(masking_utils.create_causal_mask)}
    if "sliding_attention" in (getattr(config, "layer_types", None) or ()):
        masks["sliding_attention"] = make(masking_utils.create_sliding_window_causal_mask)
    return masks


def run_layers(backbone: Any, hidden: Any, start: int, stop: int) -> Any:
    """Decoder layers `start..stop-1` on right-padded `hidden` (batch, time, hidden), called as the backbone's
    own forward calls them: rotary position embeddings of positions 0..T-1 and the causal mask."""
    import torch

    position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
    position_embeddings = backbone.rotary_emb(hidden, position_ids)
    masks = _causal_masks(backbone, hidden, position_ids)
    layer_types = getattr(backbone.config, "layer_types", None)
    for i in range(start, stop):
        out = backbone.layers[i](
            hidden,
            attention_mask=masks[layer_types[i] if layer_types else "full_attention"],
            position_ids=position_ids,
            position_embeddings=position_embeddings,
        )
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


# --- the cache of frozen hidden states -----------------------------------------------------------------


CACHE_VERSION = 1  # bump when `run_layers` or the layout of the cache file changes


def cache_key(model: Any, examples: Sequence[dict[str, Sequence[int]]], first: int, bf16: bool,
              only: Sequence[int] | None = None) -> str:
    """What the cached states depend on: the frozen layers' weights (shapes, dtypes and a sample of their
    values: the base model), the model's config (rope, attention implementation, ...), the layer they
    enter, the autocast, this code's version, every example's tokens, and which examples are cached."""
    import hashlib

    import torch

    _, backbone, _ = decoder_parts(model)
    digest = hashlib.sha256(f"{CACHE_VERSION}:{first}:{bf16}:{backbone.config.to_json_string()}:"
                            f"{getattr(backbone.config, '_attn_implementation', None)}".encode())
    with torch.no_grad():
        frozen = [backbone.get_input_embeddings().weight, *[p for layer in backbone.layers[:first]
                                                             for p in layer.parameters()]]
        for weight in frozen:
            flat = weight.detach().reshape(-1)
            digest.update(f"{tuple(weight.shape)}:{weight.dtype}".encode())
            digest.update(flat[:: max(flat.numel() // 4096, 1)].float().cpu().numpy().tobytes())
    for example in examples:
        digest.update(b"|" + ",".join(map(str, example["input_ids"])).encode())
    if only is not None:
        digest.update(("only:" + ",".join(map(str, sorted(only)))).encode())
    return digest.hexdigest()[:16]


class HiddenStateCache:
    """The fp32 hidden states entering layer `first` for every token of every example, packed end to end in
    one (tokens, hidden) tensor: in memory, or mapped from a file. Without `persist_dir` the file is deleted
    as soon as it is mapped; with it (the recipe passes the run's checkpoints), it is kept for a resume."""

    def __init__(self, store: Any, offsets: list[int], lengths: list[int], path: Path | None = None):
        self.store, self.offsets, self.lengths, self.path = store, offsets, lengths, path

    @property
    def nbytes(self) -> int:
        return self.store.numel() * self.store.element_size()

    @classmethod
    def build(cls, model: Any, examples: Sequence[dict[str, Sequence[int]]], first: int, *,
              memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET, cache_dir: str | Path | None = None,
              batch_tokens: int = 4096, log: Callable[[str], None] | None = None, bar: bool = False,
              bf16: bool = False, persist_dir: str | Path | None = None,
              only: Sequence[int] | None = None) -> HiddenStateCache:
        """With `persist_dir` (a run's checkpoints), the states are written to a file there, named by a hash
        of the model's frozen part and the examples' tokens, and a later run of the same examples (a resume,
        in another session) maps that file instead of running the frozen layers again.
        With `only`, just those examples' states are computed and kept (a run of part of an epoch needs no
        more); `batch` then serves those indices only."""
        import torch
        from tqdm import tqdm

        _, backbone, _ = decoder_parts(model)
        hidden_size = backbone.config.hidden_size
        kept = range(len(examples)) if only is None else sorted(set(only))
        keep = set(kept)
        lengths = [len(e["input_ids"]) if i in keep else 0 for i, e in enumerate(examples)]
        offsets = [0]
        for n in lengths[:-1]:
            offsets.append(offsets[-1] + n)
        total = sum(lengths)
        nbytes = estimate_cache_bytes(lengths, hidden_size)
        path = None
        if persist_dir is not None:
            path = Path(persist_dir) / f"hidden-{cache_key(model, examples, first, bf16, only)}.f32"
            done = path.with_suffix(".done")
            if path.is_file() and done.is_file() and path.stat().st_size == nbytes:
                if log:
                    log(f"the hidden states entering layer {first} for {len(kept)} examples: mapped from {path}")
                store = torch.from_file(str(path), shared=False, size=total * hidden_size,
                                        dtype=torch.float32).view(total, hidden_size)
                return cls(store, offsets, lengths, path)
            path.parent.mkdir(parents=True, exist_ok=True)
            for stale in path.parent.glob("hidden-*"):
                stale.unlink()
            with open(path, "wb") as f:
                f.truncate(nbytes)
            store = torch.from_file(str(path), shared=True, size=total * hidden_size,
                                    dtype=torch.float32).view(total, hidden_size)
            where = f"kept in {path} for a resume"
        elif nbytes <= memory_budget_bytes:
            store = torch.empty(total, hidden_size, dtype=torch.float32)
            where = "in memory"
        else:
            directory = Path(cache_dir) if cache_dir is not None else Path(tempfile.gettempdir())
            directory.mkdir(parents=True, exist_ok=True)
            path = directory / f"llmtags-hidden-{os.getpid()}-{uuid.uuid4().hex[:8]}.f32"
            with open(path, "wb") as f:
                f.truncate(nbytes)
            store = torch.from_file(str(path), shared=True, size=total * hidden_size,
                                    dtype=torch.float32).view(total, hidden_size)
            path.unlink()  # the mapping keeps the data; the disk space is freed when it goes
            where = f"memory-mapped from {directory} (over the {memory_budget_bytes / 2**30:.1f} GiB budget)"
        if log:
            log(f"caching the hidden states entering layer {first} for {len(kept)} examples "
                f"{'' if only is None else f'(those of the planned steps, of {len(examples)}) '}"
                f"({total} tokens): {nbytes / 2**20:.0f} MiB, {where}")
        if first > 0:
            device = next(backbone.parameters()).device
            embed = backbone.get_input_embeddings()
            order = sorted(kept, key=lambda i: lengths[i])
            groups, group = [], []
            for i in order:  # similar lengths together, at most `batch_tokens` padded tokens a forward
                if group and (len(group) + 1) * lengths[i] > batch_tokens:
                    groups.append(group)
                    group = []
                group.append(i)
            if group:
                groups.append(group)
            was_training = model.training
            model.eval()
            try:
                with torch.no_grad(), tqdm(total=len(kept), desc="caching frozen layers", unit="ex",
                                           disable=not bar, leave=False) as progress:
                    for group in groups:
                        width = max(lengths[i] for i in group)
                        ids = torch.zeros(len(group), width, dtype=torch.long)
                        for row, i in enumerate(group):
                            ids[row, :lengths[i]] = torch.as_tensor(examples[i]["input_ids"])
                        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                            hidden = run_layers(backbone, embed(ids.to(device)), 0, first)
                        hidden = hidden.float().cpu()
                        for row, i in enumerate(group):
                            store[offsets[i]:offsets[i] + lengths[i]] = hidden[row, :lengths[i]]
                        progress.update(len(group))
            finally:
                model.train(was_training)
        else:  # every layer is adapted: the cache holds the embeddings
            embed = backbone.get_input_embeddings()
            with torch.no_grad():
                for i in kept:
                    ids = torch.as_tensor(examples[i]["input_ids"], device=embed.weight.device)
                    store[offsets[i]:offsets[i] + lengths[i]] = embed(ids).float().cpu()
        if persist_dir is not None and path is not None:
            path.with_suffix(".done").write_text(f"{len(kept)} examples, {total} tokens\n", encoding="utf-8")
        return cls(store, offsets, lengths, path)

    def batch(self, indices: Sequence[int], device: Any = "cpu") -> Any:
        """(len(indices), longest, hidden) right-padded with zeros."""
        import torch

        missing = [i for i in indices if not self.lengths[i]]
        if missing:
            raise KeyError(f"examples {missing[:5]} were left out of the cache (`only`)")

        width = max(self.lengths[i] for i in indices)
        out = torch.zeros(len(indices), width, self.store.shape[1], dtype=self.store.dtype)
        for row, i in enumerate(indices):
            out[row, :self.lengths[i]] = self.store[self.offsets[i]:self.offsets[i] + self.lengths[i]]
        return out.to(device)
