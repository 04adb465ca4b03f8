"""A tiny random Qwen2 model for tests and soak runs: two layers, the real Qwen tokenizer.

It runs the real generate path in about a second, and being random, its outputs differ from record
to record. Shared by `tests/conftest.py` and `eval/soak.py`; `random_adapter` puts a LoRA adapter on it.
"""

from __future__ import annotations

from pathlib import Path

from .adapters.registry import build_metadata, write_metadata
from .models import embedded_tokenizer_dir, load_tokenizer, resolve_base_model


def tiny_qwen2(out: str | Path, tokenizer_dir: str | Path | None = None, seed: int = 0) -> Path:
    """Write a random 2-layer Qwen2 (safetensors) with the embedded model's tokenizer into `out`."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    if tokenizer_dir is None:
        tokenizer_dir = embedded_tokenizer_dir()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = Qwen2Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    out = Path(out)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def random_adapter(base_dir: str | Path, out: str | Path, seed: int, template: str = "auto") -> Path:
    """A peft LoRA adapter on the model in `base_dir` with random, non-zero weights (made, not trained:
    that is sure to change every output) and its `llmtags.json`, written into `out`."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False,
                        task_type="CAUSAL_LM")
    get_peft_model(model, config).save_pretrained(out, safe_serialization=True)
    resolved = resolve_base_model(str(base_dir))
    write_metadata(out, build_metadata(resolved=resolved, template=template, tokenizer=load_tokenizer(resolved),
                                       hyperparameters={"seed": seed}, command=f"test seed {seed}"))
    return Path(out)
