"""Write GGUF files for the llama.cpp engine: a peft LoRA adapter as a GGUF LoRA, and (for tests) a
small Qwen2 transformers model as a GGUF model.

llama.cpp applies a GGUF LoRA at run time on top of the quantised base, as peft does on top of its
base: `W x + (alpha / r) * B A x`. The file holds A and B per target matrix, under llama.cpp's
tensor names, and `alpha`; llama.cpp divides by the rank it reads from the tensors.

Only the Qwen2 architecture is mapped (the embedded models are Qwen2.5). Weights stay in float32:
an adapter is a few MB and the tiny test model a few dozen.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from ..atomic import replacing

ARCH = "qwen2"
# peft/transformers module name -> llama.cpp tensor name, per decoder layer.
QWEN2_LAYER_TENSORS = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
_LORA_NAME = re.compile(r"(?:^|\.)layers\.(\d+)\.(.+)\.lora_([AB])\.weight$")


class GgufExportError(ValueError):
    pass


def lora_tensors(adapter_dir: str | Path) -> tuple[dict[str, Any], float]:
    """The adapter's A and B matrices under llama.cpp names (`blk.N.attn_q.weight.lora_a`), and the
    alpha to store so that llama.cpp's alpha / rank equals peft's scaling."""
    from safetensors.numpy import load_file

    adapter_dir = Path(adapter_dir)
    config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    if config.get("peft_type") != "LORA":
        raise GgufExportError(f"{adapter_dir}: peft_type {config.get('peft_type')!r}, only LORA converts to GGUF")
    for key in ("use_dora", "alpha_pattern", "rank_pattern", "modules_to_save", "trainable_token_indices"):
        if config.get(key):
            raise GgufExportError(f"{adapter_dir}: {key} is set; llama.cpp's LoRA cannot express it")
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    # rsLoRA scales by alpha / sqrt(r); llama.cpp always divides by r.
    stored_alpha = alpha * math.sqrt(rank) if config.get("use_rslora") else alpha
    tensors: dict[str, Any] = {}
    for name, array in load_file(str(adapter_dir / "adapter_model.safetensors")).items():
        match = _LORA_NAME.search(name)
        module = match and QWEN2_LAYER_TENSORS.get(match.group(2))
        if not match or not module:
            raise GgufExportError(f"{adapter_dir}: tensor {name} has no llama.cpp equivalent (Qwen2 layers only)")
        layer, side = match.group(1), match.group(3).lower()
        tensors[f"blk.{layer}.{module}.weight.lora_{side}"] = array.astype("float32")
    if not tensors:
        raise GgufExportError(f"{adapter_dir}: no LoRA tensors found")
    return tensors, stored_alpha


def lora_to_gguf(adapter_dir: str | Path, out: str | Path) -> Path:
    """Write `adapter_dir` (a peft LoRA of a Qwen2 model) as a GGUF LoRA at `out` (atomically)."""
    import gguf

    tensors, alpha = lora_tensors(adapter_dir)
    with replacing(out) as tmp:
        writer = gguf.GGUFWriter(str(tmp), ARCH)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        for name in sorted(tensors):
            writer.add_tensor(name, tensors[name])
        _write(writer)
    return Path(out)


def _write(writer: Any) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _copy_tokenizer(writer: Any, source_gguf: str | Path, n_tokens: int) -> None:
    """Copy the BPE tokenizer of `source_gguf` (its first `n_tokens` tokens) into `writer`."""
    import gguf

    reader = gguf.GGUFReader(str(source_gguf))

    def strings(key: str) -> list[str]:
        field = reader.fields[key]
        return [bytes(field.parts[i]).decode("utf-8") for i in field.data]

    def scalar(key: str) -> Any:
        field = reader.fields[key]
        return field.parts[field.data[0]][0]

    types = reader.fields["tokenizer.ggml.token_type"]
    writer.add_tokenizer_model(strings("tokenizer.ggml.model")[0])
    writer.add_tokenizer_pre(strings("tokenizer.ggml.pre")[0])
    writer.add_token_list(strings("tokenizer.ggml.tokens")[:n_tokens])
    writer.add_token_types([int(types.parts[i][0]) for i in types.data[:n_tokens]])
    writer.add_token_merges(strings("tokenizer.ggml.merges"))
    writer.add_eos_token_id(int(scalar("tokenizer.ggml.eos_token_id")))
    writer.add_bos_token_id(int(scalar("tokenizer.ggml.bos_token_id")))
    writer.add_pad_token_id(int(scalar("tokenizer.ggml.padding_token_id")))
    writer.add_add_bos_token(False)
    writer.add_chat_template(strings("tokenizer.chat_template")[0])


def qwen2_to_gguf(model_dir: str | Path, out: str | Path, tokenizer_gguf: str | Path) -> Path:
    """Write a transformers Qwen2 model (safetensors, float32) as a float32 GGUF, with the tokenizer
    of `tokenizer_gguf` (the embedded model's: the same Qwen vocabulary). For small models: the
    tests' tiny random Qwen2 runs on both engines from the same weights."""
    import gguf
    from safetensors.numpy import load_file

    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    if config.get("model_type") != ARCH:
        raise GgufExportError(f"{model_dir}: model_type {config.get('model_type')!r}, only qwen2 is mapped")
    weights = load_file(str(model_dir / "model.safetensors"))
    writer = gguf.GGUFWriter(str(out), ARCH)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_rope_freq_base(float(config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta", 1e6)))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    _copy_tokenizer(writer, tokenizer_gguf, config["vocab_size"])
    renames = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
               "lm_head.weight": "output.weight"}
    for name, array in sorted(weights.items()):
        match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", name)
        if match and match.group(2) in QWEN2_LAYER_TENSORS:
            target = f"blk.{match.group(1)}.{QWEN2_LAYER_TENSORS[match.group(2)]}.{match.group(3)}"
        elif name in renames:
            target = renames[name]
        else:
            raise GgufExportError(f"{model_dir}: tensor {name} has no llama.cpp equivalent")
        writer.add_tensor(target, array.astype("float32"))
    _write(writer)
    return Path(out)
