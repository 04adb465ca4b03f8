"""Engines: greedy generation behind one contract (`base.Engine`), on transformers (`transformers`) or
llama.cpp (`llamacpp`), with adapters (`adapter_set`), a generation cache (`cache`), and the choice
between them (`select`).

This file imports none of its modules: `base` stays importable without torch or llama.cpp.
"""
