"""LoRA adapters: the registry on disk (`registry`), routing records to adapters (`routing`), folding an
adapter into its base (`merge`) and converting it for llama.cpp (`gguf_export`). Adapters at run time,
attached to a loaded base model, are `engines.adapter_set`.

This file imports none of its modules, so the engines can use the registry without a loop.
"""
