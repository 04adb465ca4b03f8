"""Constrained decoding: the tags a model may write, enforced token by token while it generates.

The model answers one tag a line, `Attribute:value`, then `<|im_end|>`. `TagConstraintProcessor` (a
transformers logits processor, in `engines/transformers.py`) keeps one small state machine per batch
row over the BYTES that row has generated, and before every step sets the logits of the tokens that would break the row's constraint to
-inf. Three modes (`ConstraintSpec.mode`):

- `free`: values are not constrained;
- `extract`: every value (the part of a line after its first ':', leading spaces ignored) is a
  contiguous span of the record's text. Compared as UTF-8 bytes, so a rare character that the
  tokenizer splits over several byte tokens is written byte by byte;
- `closed`: every line is an entry of a vocabulary, written in the entry's canonical tokenization
  (a token trie of all entries; see `VocabTrie`).

In every mode a record's schema limits the attribute names (the part before ':'), a tag already written
in the row cannot be written again, and a repeated line ends the list (EOS is forced). A row that would
be left with no allowed token gets EOS. When `max_new_tokens` cuts a row inside a line, the engine drops
that incomplete line (`TagConstraintProcessor.finish`).

Nothing here imports torch: the logits processor lives with the engine that needs it.

The package, one module per part: `grammar` (the line format, shared with `parse.py`), `spec`
(`ConstraintSpec`), `tokens` (`TokenTable`), `trie` (`VocabTrie`), `rows` (the state machines).
This file imports none of them, so `parse.py` can import `grammar` without pulling in the rest.
"""
