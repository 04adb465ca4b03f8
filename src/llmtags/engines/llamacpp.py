"""Stage 3 on llama.cpp (`generate --engine llama.cpp`): the quantised GGUF as it ships, on CPU.

Same contract as `TransformersEngine.generate` (the `Engine` protocol of `base.py`): greedy completions in input order, each a
`Generation` with per-token log-probabilities, cut at the end-of-turn token, `max_new_tokens`, or a
repeated line; the same `constrain/` rows mask the logits. What differs is how the work is packed:

- Continuous batching: up to `batch_size` prompts (default 8, at most `max_sequences`) decode
  together, each in its own llama.cpp sequence; a finished sequence is replaced by the next prompt at once, so no row idles while the
  longest one of a batch finishes. Prompts are taken longest first.
- Shared prefix: the tokens every prompt starts with (system prompt, instructions, demonstrations)
  are evaluated once per call and copied into each sequence's KV cache.
- Adapters: peft LoRA adapters are converted once to GGUF LoRAs (`gguf_export.py`, cached by the
  adapter's hash) and switched per call without reloading the base.
- Weights (`--weights`): the embedded 0.5B runs requantised to Q8_0 (`runtime_gguf`), made once and
  cached: faster on CPU at the same answers' quality. Other bases, a .gguf file named by `--base-model`
  among them, run as they are.

Tokenisation and decoding use the transformers tokenizer, so prompts, token offsets and constraints
are the same as on the transformers engine.
"""

from __future__ import annotations

import logging
import os
import sys
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..adapters.gguf_export import lora_to_gguf
from ..adapters.registry import CONFIG_FILE, weights_sha256
from ..atomic import replacing
from ..constrain.grammar import repeats_a_line
from ..constrain.rows import allowed_bias, constraint_row
from ..constrain.tokens import token_table
from ..models import (
    ModelError,
    ResolvedModel,
    base_model_spec,
    cache_root,
    cpu_flags,
    load_tokenizer,
    resolve_gguf_base,
    sha256_file,
)
from .base import (
    DEFAULT_WEIGHTS,
    MAX_NEW_TOKENS,
    WEIGHTS,
    Generation,
    PromptEncoder,
    finish_row,
    newline_token_ids,
    stop_token_ids,
)

PREFIX_MIN_TOKENS = 8  # below this, copying a prefix saves less than it costs

# How an embedded base's weights are run. The embedded GGUFs are Q4_K_M files; in the 0.5B most tensors are
# Q5_0 (its 896-wide rows rule out K-quants), which llama.cpp multiplies slowly on x86. Requantised to
# Q8_0, every weight of 4 to 6 bits is re-rounded to 8 (13 tensors are Q8_0 already), so the model the
# adapters were trained on barely changes, and it tags 1.28x faster on 2 AVX2 cores at the same F1
# (eval/bench_weights_zh_taobao_ner.md). The 1.5B's tensors are Q4_K, which llama.cpp already multiplies
# fast: as Q8_0 it ran 0.98x (eval/bench_weights_zh_taobao_ner_1_5b.md), so it runs as shipped.
# `--weights as-is` runs the shipped file (`base.WEIGHTS`).
REQUANTISED = ("embedded",)  # the embedded bases `--weights q8_0` requantises


def cpu_has_amx(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether the CPU advertises Intel AMX tiles (Linux; elsewhere False), by the flags `cpu_flags` reads."""
    try:
        text = Path(cpuinfo).read_text(encoding="ascii", errors="replace")
    except OSError:
        return False
    return "amx_tile" in (cpu_flags(text) or ())


def model_params(default_params: Callable[[], Any]) -> Any:
    """llama.cpp's default model parameters (from `default_params`, llama_model_default_params), safe on this host."""
    params = default_params()
    if cpu_has_amx():
        # llama.cpp's AMX matmul (an "extra buffer type", built in wherever the compiler sees AMX) crashes
        # on such hosts (SIGSEGV in ggml_backend_amx_mul_mat, seen 2026-12-02 on a 2-core Xeon VM); its
        # plain CPU kernels give the same tokens.
        params.use_extra_bufts = False
    return params


def available_threads() -> int:
    """$LLMTAGS_THREADS (set per Ray worker), else the CPUs this process may run on."""
    if os.environ.get("LLMTAGS_THREADS", "").isdigit():
        return int(os.environ["LLMTAGS_THREADS"])
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def runtime_gguf(resolved: ResolvedModel, weights: str = DEFAULT_WEIGHTS) -> Path:
    """The GGUF llama.cpp loads for `resolved`, as `run_as` says: the embedded 0.5B requantised to Q8_0,
    made once and cached beside it (a few seconds), or the file as it is."""
    assert resolved.gguf is not None, "resolve_gguf_base gives the GGUF"
    if run_as(resolved.spec, weights) == "as-is":
        return resolved.gguf
    return requantised_q8_0(resolved.gguf)


def run_as(spec: str | None, weights: str = DEFAULT_WEIGHTS) -> str:
    """How llama.cpp runs base `spec`'s weights (`--weights`, one of `WEIGHTS`): as `weights` says for the
    embedded bases requantising pays for (`REQUANTISED`); any other base, a GGUF file the user names among
    them, as it is."""
    if weights not in WEIGHTS:
        raise ModelError(f"--weights {weights}: use one of {', '.join(WEIGHTS)}")
    return weights if base_model_spec(spec) in REQUANTISED else "as-is"


def requantised_q8_0(gguf: Path) -> Path:
    """`gguf` with its quantised tensors requantised to Q8_0, written once beside it (the source file's
    name, hence its hash for an embedded model, names the copy)."""
    import ctypes
    import fcntl

    target = gguf.with_name(f"{gguf.stem}-q8_0.gguf")
    if target.is_file():
        return target
    try:
        import llama_cpp
    except ImportError as exc:
        raise ModelError("--engine llama.cpp needs llama-cpp-python: pip install 'llmtags[llamacpp]'") from exc
    try:
        # Ray workers start together: one makes the copy, the others wait for it and load that one file.
        with open(target.with_name(f".{target.name}.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if target.is_file():
                return target
            print(f"llmtags: requantising {gguf.name} to Q8_0 for llama.cpp, once (faster on CPU)", file=sys.stderr)
            logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # a line per tensor otherwise
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
            params.allow_requantize = True  # the source is quantised already: that is the point
            params.nthread = available_threads()
            with replacing(target) as tmp:
                failed = llama_cpp.llama_model_quantize(str(gguf).encode(), str(tmp).encode(), ctypes.byref(params))
                if failed:
                    raise ModelError(f"llama.cpp could not requantise {gguf} to Q8_0 (error {failed}); "
                                     "--weights as-is runs it as shipped")
    except OSError as exc:
        raise ModelError(f"cannot write the Q8_0 copy of {gguf} ({exc}); --weights as-is runs it as shipped") from exc
    return target


def common_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    if not sequences:
        return 0
    shortest = min(len(s) for s in sequences)
    first = sequences[0]
    for i in range(shortest):
        if any(s[i] != first[i] for s in sequences[1:]):
            return i
    return shortest


@dataclass
class _Sequence:
    """One prompt being decoded in llama.cpp sequence `seq`."""

    index: int  # the prompt's position in the input
    seq: int
    feed: list[int]  # prompt tokens not yet evaluated
    pos: int  # position of the next token to evaluate
    constraint: Any = None  # a constrain.rows row, or None
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    end_logprob: float | None = None
    stopped: bool = False  # ended by an end-of-turn token


class LlamaCppEngine(PromptEncoder):
    """A GGUF base model in llama.cpp, its LoRA adapters, and the transformers tokenizer."""

    def __init__(
        self,
        gguf_path: str | Path,
        tokenizer: Any,
        resolved: ResolvedModel | None = None,
        n_threads: int | None = None,
        max_sequences: int = 32,
        n_ctx: int = 8192,
        n_batch: int = 512,
        prefix_cache: bool = True,
    ):
        try:
            import llama_cpp
            from llama_cpp import _internals
        except ImportError as exc:
            raise ModelError("--engine llama.cpp needs llama-cpp-python: pip install 'llmtags[llamacpp]'") from exc
        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # its load log is pages long
        self._llama = llama_cpp
        self.gguf_path = Path(gguf_path)  # the file it runs (`resolved.gguf` is the one it stands for)
        self.tokenizer = tokenizer
        self.resolved = resolved
        self.max_sequences = max_sequences
        self.n_batch = n_batch
        self.prefix_cache = prefix_cache
        self.stop_on_repeat = True
        self.stop_token_ids = stop_token_ids(tokenizer)
        self._newline_ids = newline_token_ids(tokenizer)
        self._model = _internals.LlamaModel(path_model=str(gguf_path), params=model_params(llama_cpp.llama_model_default_params), verbose=False)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = params.n_ubatch = n_batch
        params.n_seq_max = max_sequences + 1  # the last sequence holds the shared prefix
        params.kv_unified = True  # one cache for all sequences, so a prefix copy shares cells
        params.n_threads = params.n_threads_batch = n_threads or available_threads()
        params.no_perf = True
        self._ctx = _internals.LlamaContext(model=self._model, params=params, verbose=False)
        self.n_ctx = llama_cpp.llama_n_ctx(self._ctx.ctx)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self._model.model))
        self._batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        weakref.finalize(self, llama_cpp.llama_batch_free, self._batch)
        self._adapters: dict[str, Any] = {}
        self._active: tuple[str | None, float] = (None, 1.0)  # the adapter in use and its scale

    @classmethod
    def load(cls, base_model: str | None = None, weights: str = DEFAULT_WEIGHTS, **kwargs: Any) -> LlamaCppEngine:
        """The engine over `base_model` (`resolve_gguf_base`), its weights run as `weights` says (`run_as`)."""
        resolved = resolve_gguf_base(base_model)
        return cls(runtime_gguf(resolved, weights), load_tokenizer(resolved), resolved, **kwargs)

    @property
    def device(self) -> str:
        return "cpu"

    # --- adapters ---------------------------------------------------------------------------------

    def add_adapter(self, name: str, adapter_dir: str | Path, cache: bool = True) -> None:
        """Load a peft LoRA adapter as `name`, replacing an adapter of that name. It is converted to a GGUF
        LoRA once and cached by its hash; with `cache=False` (weights seen once, as a training run's dev
        evaluations see them) the conversion is read and deleted."""
        import tempfile

        adapter_dir = Path(adapter_dir)
        if cache:
            digest = weights_sha256(adapter_dir)
            config_digest = sha256_file(adapter_dir / CONFIG_FILE)
            path = cache_root() / "gguf" / f"lora-{digest[:16]}-{config_digest[:8]}.gguf"
            if not path.is_file():
                lora_to_gguf(adapter_dir, path)
            adapter = self._load_lora(path, adapter_dir)
        else:
            with tempfile.TemporaryDirectory(prefix="llmtags-lora-") as tmp:
                path = lora_to_gguf(adapter_dir, Path(tmp) / "lora.gguf")
                adapter = self._load_lora(path, adapter_dir)  # read into llama.cpp's own buffers
        if name in self._adapters:
            self.remove_adapter(name)
        self._adapters[name] = adapter

    def _load_lora(self, path: Path, adapter_dir: Path) -> Any:
        from llama_cpp._utils import suppress_stdout_stderr

        with suppress_stdout_stderr(disable=False):  # a line per tensor about buffer types
            adapter = self._llama.llama_adapter_lora_init(self._model.model, str(path).encode("utf-8"))
        if not adapter:
            raise ModelError(f"llama.cpp refused the adapter {adapter_dir} (converted to {path})")
        return adapter

    def remove_adapter(self, name: str) -> None:
        """Unload adapter `name` (the base model alone generates next, if it was in use)."""
        if self._active[0] == name:
            self.use_adapter(None)
        self._llama.llama_adapter_lora_free(self._adapters.pop(name))

    def use_adapter(self, name: str | None, scale: float = 1.0) -> None:
        """Generate with adapter `name` from now on (None: the base model alone), its LoRA update
        multiplied by `scale` (1: as trained)."""
        import ctypes

        if (name, scale) == self._active:
            return
        llama = self._llama
        if name is None:
            failed = llama.llama_set_adapters_lora(self._ctx.ctx, None, 0, None)
        else:
            adapters = (llama.llama_adapter_lora_p_ctypes * 1)(self._adapters[name])
            failed = llama.llama_set_adapters_lora(self._ctx.ctx, adapters, 1, (ctypes.c_float * 1)(scale))
        if failed:
            raise ModelError(f"llama.cpp could not switch to adapter {name!r}")
        self._active = (name, scale)

    # --- generation -------------------------------------------------------------------------------

    def generate(
        self,
        prompts: Sequence[str],
        max_new_tokens: int = MAX_NEW_TOKENS,
        batch_size: int | None = None,
        on_batch: Callable[[int], None] | None = None,
        constraints: Sequence[Any] | None = None,
    ) -> list[Generation]:
        """Greedy completions of `prompts`, in input order. `batch_size`: how many sequences decode
        together (default 8, at most `max_sequences`); `on_batch(1)` is called as each prompt finishes."""
        import numpy as np

        encoded = self.encode(prompts, constraints)
        if not encoded:
            return []
        width = max(1, min(batch_size or 8, self.max_sequences))
        prefix = common_prefix_length(encoded) if self.prefix_cache and len(encoded) > 1 else 0
        prefix = prefix if prefix >= PREFIX_MIN_TOKENS else 0
        for i, ids in enumerate(encoded):
            if len(ids) + max_new_tokens + prefix > self.n_ctx:
                raise ModelError(f"prompt {i} has {len(ids)} tokens: with {max_new_tokens} new ones it exceeds "
                                 f"the llama.cpp context of {self.n_ctx}")
        rows = self._constraint_rows(constraints, len(prompts))
        memory = self._ctx.memory
        self._llama.llama_memory_clear(memory, True)
        prefix_seq = self.max_sequences
        if prefix:
            self._evaluate([(prefix_seq, 0, encoded[0][:prefix], False)])
        waiting = deque(sorted(range(len(prompts)), key=lambda i: -len(encoded[i])))
        free_seqs = list(range(width))
        active: list[_Sequence] = []
        results: list[Generation | None] = [None] * len(prompts)
        budget = self.n_ctx - prefix  # KV cells left for the sequences' own tokens
        while waiting or active:
            while waiting and free_seqs and len(encoded[waiting[0]]) - prefix + max_new_tokens <= budget:
                index = waiting.popleft()
                seq = free_seqs.pop()
                if prefix:
                    self._llama.llama_memory_seq_cp(memory, prefix_seq, seq, 0, prefix)
                active.append(_Sequence(index, seq, list(encoded[index][prefix:]), prefix, rows[index]))
                budget -= len(encoded[index]) - prefix + max_new_tokens
            if not active:
                raise ModelError("the llama.cpp context is too small for the next prompt")
            # Decoding steps first (one token each), then prompt tokens in the room left.
            parts: list[tuple[_Sequence, list[int], bool]] = []
            room = self.n_batch
            for s in active:
                if not s.feed:
                    parts.append((s, s.tokens[-1:], True))
                    room -= 1
            for s in active:
                if s.feed and room > 0:
                    chunk, s.feed = s.feed[:room], s.feed[room:]
                    parts.append((s, chunk, not s.feed))
                    room -= len(chunk)
            logit_rows = self._evaluate([(s.seq, s.pos, chunk, wants) for s, chunk, wants in parts])
            finished = []
            for (s, chunk, wants), row in zip(parts, logit_rows):
                s.pos += len(chunk)
                if not wants:
                    continue
                logits = np.ctypeslib.as_array(self._llama.llama_get_logits_ith(self._ctx.ctx, row),
                                               shape=(self.n_vocab,))
                if self._step(s, logits, max_new_tokens):
                    finished.append(s)
            for s in finished:
                active.remove(s)
                self._llama.llama_memory_seq_rm(memory, s.seq, -1, -1)
                free_seqs.append(s.seq)
                budget += len(encoded[s.index]) - prefix + max_new_tokens
                results[s.index] = self._generation(s, len(encoded[s.index]))
                if on_batch:
                    on_batch(1)
        return [r for r in results if r is not None]

    def _constraint_rows(self, constraints: Sequence[Any] | None, n: int) -> list[Any]:
        if constraints is None:
            return [None] * n
        table = token_table(self.tokenizer)
        return [None if spec is None else constraint_row(table, self.tokenizer, spec, self.stop_token_ids)
                for spec in constraints]

    def _evaluate(self, parts: Sequence[tuple[int, int, Sequence[int], bool]]) -> list[int]:
        """One llama_decode over (sequence, first position, tokens, want logits of the last) parts;
        returns, per part, the batch row of its logits (-1 when not wanted)."""
        batch = self._batch
        n = 0
        rows = []
        for seq, pos, tokens, wants in parts:
            for j, token in enumerate(tokens):
                batch.token[n] = token
                batch.pos[n] = pos + j
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = seq
                batch.logits[n] = False
                n += 1
            batch.logits[n - 1] = wants
            rows.append(n - 1 if wants else -1)
        batch.n_tokens = n
        code = self._llama.llama_decode(self._ctx.ctx, batch)
        if code != 0:
            raise ModelError(f"llama_decode failed with code {code} ({n} tokens, {len(parts)} sequences)")
        return rows

    def _step(self, s: _Sequence, logits: Any, max_new_tokens: int) -> bool:
        """Pick sequence `s`'s next token from its logits; True when `s` is finished."""
        import numpy as np

        if s.constraint is not None:
            allowed = s.constraint.allowed()
            if allowed is not None:
                logits = logits + allowed_bias(allowed, logits.shape[0], s.constraint.table.eos_id)
        token = int(np.argmax(logits))
        peak = float(logits[token])
        logprob = -float(np.log(np.exp(logits - peak, dtype=np.float64).sum()))
        if s.constraint is not None:
            s.constraint.advance(token)
        if token in self.stop_token_ids:
            s.end_logprob, s.stopped = logprob, True
            return True
        s.tokens.append(token)
        s.logprobs.append(logprob)
        if len(s.tokens) >= max_new_tokens:
            return True
        if self.stop_on_repeat and token in self._newline_ids:
            return repeats_a_line(self.tokenizer.decode(s.tokens, skip_special_tokens=True))
        return False

    def _generation(self, s: _Sequence, prompt_tokens: int) -> Generation:
        keep = s.constraint.safe_length(len(s.tokens) + s.stopped) if s.constraint is not None else None
        return finish_row(self.tokenizer, prompt_tokens, s.tokens, s.logprobs, s.end_logprob, keep)
