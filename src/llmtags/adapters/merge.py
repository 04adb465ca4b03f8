"""`llmtags merge`: fold an adapter into its base model's weights, a standalone model directory."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from ..models import load_model, load_tokenizer, resolve_base_model
from .registry import (
    AdapterError,
    check_compatible,
    check_files,
    quiet_bitsandbytes,
    read_metadata,
    resolve_adapter,
    weights_sha256,
)


def merge_adapter(
    base: str | None,
    adapter: str | Path,
    out_dir: str | Path,
    *,
    device: str = "cpu",
    dtype: str = "auto",
    load_in_4bit: bool = False,
    force: bool = False,
    root: str | Path | None = None,
) -> Path:
    """Fold an adapter into its base model's weights and save a standalone safetensors model + tokenizer.

    The result is a plain transformers directory usable as `--base-model DIR`. Its identity is its own
    (`dir:...`), not the base model's, so adapters trained on the base are not silently applied to it.
    Merging into a 4-bit base rounds the merged weights to 4 bits: load the base in full precision.
    """
    quiet_bitsandbytes()
    path = resolve_adapter(adapter, root)
    meta = read_metadata(path)
    resolved = resolve_base_model(base or meta.get("base_model", {}).get("spec"))
    tokenizer = load_tokenizer(resolved)
    # Merging needs the right base weights; the prompt is the merged model's user's business (recorded below).
    check_compatible(meta, resolved, None, tokenizer, force=force, force_flag="--force")
    model = load_model(resolved, device=device, dtype=dtype, load_in_4bit=load_in_4bit)
    if load_in_4bit or getattr(model, "is_loaded_in_4bit", False):
        warnings.warn(
            "merging into a 4-bit base model: the merged weights are re-quantised to 4 bits and lose the "
            "adapter's fine detail; merge into the full-precision base instead (no --load-in-4bit)",
            stacklevel=2,
        )
    quiet_bitsandbytes()
    from peft import PeftModel

    check_files(path)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*deprecated and will be removed in v6.*")
        model = PeftModel.from_pretrained(model, str(path), is_trainable=False)
    merged = model.merge_and_unload()
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise AdapterError(f"{out} exists and is not empty")
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "llmtags-merged.json").write_text(json.dumps({
        "base_model": meta.get("base_model"),
        "adapter": {"path": str(path), "sha256": weights_sha256(path)},
        "template": meta.get("template"),
        "merged_4bit": bool(load_in_4bit),
    }, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    # peft or transformers may leave pickled extras behind on some versions; a merged model is safetensors only.
    for leftover in out.glob("*.bin"):
        leftover.unlink()
    return out
