"""The vocabulary trie of `closed` mode: every vocabulary entry as a path of token ids."""

from __future__ import annotations

from array import array
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .grammar import BREAKS_RE, NEWLINE, attr_key

if TYPE_CHECKING:
    from .tokens import TokenTable


def _encode(tokenizer: Any, texts: list[str], chunk: int = 8192) -> list[list[int]]:
    """Token ids of many texts without special tokens, in chunks (a batch's encodings are large)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    encode = getattr(backend, "encode_batch_fast", None) or getattr(backend, "encode_batch", None)
    ids: list[list[int]] = []
    for start in range(0, len(texts), chunk):
        part = texts[start : start + chunk]
        if encode is not None:
            ids.extend(e.ids for e in encode(part, add_special_tokens=False))
        else:
            ids.extend(tokenizer(part, add_special_tokens=False)["input_ids"])
    return ids


class VocabTrie:
    """Every vocabulary entry as a path of token ids, in its canonical tokenization.

    Each entry `tag` has two paths: tokens(tag), after which EOS may follow (the last tag of a list),
    and tokens(tag + "\\n"), which ends its line (usually tokens(tag) + ['\\n'], but a tag ending in
    punctuation such as "(US)" ends in the token ')\\n'). Tokens are those of the tag alone: Qwen's
    pre-tokenizer never joins a newline to the letters after it, so a line tokenizes the same at the
    start of any line. A model may spell a tag in other tokens (greedy decoding may prefer '品'+'牌'
    to '品牌'); the trie allows only the canonical spelling, and greedy decoding follows it.

    Nodes are numbered in depth-first (sorted) order and stored as flat numpy arrays: `parent`, the
    `token` that leads to each node, and a CSR list of children sorted by token, so 100k entries take
    a few tens of MB. `total[node]` counts the entry endings below a node; a row subtracts the entries
    it has written (and those outside its schema), so it never enters a branch with nothing left.
    """

    def __init__(self, table: TokenTable, tokenizer: Any, vocab: Any):
        self.table = table
        tags: list[str] = []
        attributes: list[str | None] = []
        for entry in vocab:
            tag = entry.tag.strip()
            if tag and "\n" not in tag and not BREAKS_RE.search(tag.encode()):
                tags.append(tag)
                attributes.append(attr_key(entry.attribute))
        paths, keep, eos_counted, eos_up = _entry_paths(table, tokenizer, tags)
        self.tags = [tags[i] for i in keep]
        n_entries = len(keep)
        parent, token, depth, eos_node, line_node = _trie_nodes(paths, n_entries, eos_up)
        del paths
        self.parent = np.frombuffer(parent, dtype=np.int32).copy()
        self.token = np.frombuffer(token, dtype=np.int32).copy()
        depth_arr = np.frombuffer(depth, dtype=np.int32)
        self.eos_node = np.frombuffer(eos_node, dtype=np.int32).copy()
        self.line_node = np.frombuffer(line_node, dtype=np.int32).copy()
        self.eos_counted = np.array(eos_counted, dtype=bool)
        n_nodes = len(self.parent)
        self.eos_entry = np.full(n_nodes, -1, dtype=np.int32)
        self.eos_entry[self.eos_node] = np.arange(n_entries, dtype=np.int32)
        self.line_entry = np.full(n_nodes, -1, dtype=np.int32)
        self.line_entry[self.line_node] = np.arange(n_entries, dtype=np.int32)
        # Children in CSR form, sorted by token within a parent (nodes were made in sorted order).
        kids = (np.argsort(self.parent[1:], kind="stable") + 1).astype(np.int32)
        self.kids = kids
        self.kid_tokens = self.token[kids]
        self.start = np.searchsorted(self.parent[kids], np.arange(n_nodes + 1)).astype(np.int32)
        # Nodes grouped by depth, deepest first, to sum counts up the tree.
        order = np.argsort(depth_arr, kind="stable")
        bounds = np.searchsorted(depth_arr[order], np.arange(int(depth_arr.max(initial=0)) + 2))
        self._levels = [order[bounds[d] : bounds[d + 1]] for d in range(len(bounds) - 2, 0, -1)]
        names = sorted({a for a in attributes if a is not None})
        self._attribute_ids = {a: k for k, a in enumerate(names)}
        self.entry_attribute = np.array(
            [self._attribute_ids.get(attributes[i], -1) if attributes[i] else -1 for i in keep], dtype=np.int32
        )
        self.total = self._counts(np.ones(n_entries, dtype=bool))
        self._no_exclusion = np.zeros(n_entries, dtype=bool)
        self._schemas: OrderedDict[tuple[str, ...], tuple[Any, Any]] = OrderedDict()

    def __len__(self) -> int:
        return len(self.tags)

    @property
    def n_nodes(self) -> int:
        return len(self.parent)

    def nbytes(self) -> int:
        arrays = [self.parent, self.token, self.eos_node, self.line_node, self.eos_counted, self.eos_entry,
                  self.line_entry, self.kids, self.kid_tokens, self.start, self.total, self.entry_attribute]
        return sum(a.nbytes for a in arrays) + sum(level.nbytes for level in self._levels)

    def _counts(self, entries: Any) -> Any:
        """Per node, the entry endings below it, counting only `entries` (a bool mask)."""


        ends = np.concatenate([self.line_node[entries], self.eos_node[entries & self.eos_counted]])
        counts = np.bincount(ends, minlength=self.n_nodes).astype(np.int32)
        for level in self._levels:
            np.add.at(counts, self.parent[level], counts[level])
        return counts

    def for_schema(self, schema: Sequence[str] | None) -> tuple[Any, Any]:
        """(live counts per node, excluded entries) for a record's schema (None: every entry)."""


        if not schema:
            return self.total, self._no_exclusion
        key = tuple(sorted({k for k in (attr_key(s) for s in schema) if k}))
        cached = self._schemas.get(key)
        if cached is None:
            allowed = [self._attribute_ids[k] for k in key if k in self._attribute_ids]
            included = np.isin(self.entry_attribute, allowed) & (self.entry_attribute >= 0)
            cached = self._schemas[key] = (self._counts(included), ~included)
            while len(self._schemas) > 64:
                self._schemas.popitem(last=False)
        self._schemas.move_to_end(key)
        return cached

    def children(self, node: int) -> tuple[Any, Any]:
        s, e = self.start[node], self.start[node + 1]
        return self.kids[s:e], self.kid_tokens[s:e]

    def child(self, node: int, token: int) -> int:


        s, e = int(self.start[node]), int(self.start[node + 1])
        j = s + int(np.searchsorted(self.kid_tokens[s:e], token))
        return int(self.kids[j]) if j < e and self.kid_tokens[j] == token else -1


def _entry_paths(table: TokenTable, tokenizer: Any, tags: list[str]) -> tuple[list, list[int], list[bool], dict]:
    """Each writable tag's token paths, sorted: (tokens, 1, entry) for the tag and its newline, and
    (tokens, 0, entry) for the tag alone where that is not a prefix of the first. Returns the paths, the
    indices of the tags kept, whether each entry's EOS end is counted apart, and, for the others, how
    many steps up from its line's end its EOS end lies."""
    token_bytes = table.token_bytes
    newline = table.by_bytes.get(NEWLINE)
    lined = _encode(tokenizer, [t + "\n" for t in tags])
    # tokens(tag) is tokens(tag + "\n") without its last token when that token is a lone "\n" (BPE
    # never merged it into the tag). Otherwise ("(US)" ends in ')\n') the tag is tokenized alone.
    divergent = [i for i, ids in enumerate(lined) if not ids or ids[-1] != newline]
    plain_of = dict(zip(divergent, _encode(tokenizer, [tags[i] for i in divergent])))
    paths: list[tuple[tuple[int, ...], int, int]] = []
    keep: list[int] = []
    eos_counted: list[bool] = []
    eos_up: dict[int, int] = {}  # entry -> steps up from its line's end to its EOS end
    for i, b in enumerate(lined):
        a = plain_of.get(i)
        a_len = len(b) - 1 if a is None else len(a)
        if a_len < 1 or any(token_bytes[t] is None for t in b):
            continue  # empty, or spelled with added/special tokens: cannot be written
        entry = len(keep)
        keep.append(i)
        paths.append((tuple(b), 1, entry))
        if a is None or b[:a_len] == a:
            eos_counted.append(False)  # the EOS end lies on the line's path
            eos_up[entry] = len(b) - a_len
        else:
            eos_counted.append(True)
            paths.append((tuple(a), 0, entry))
    del lined, plain_of
    paths.sort()
    return paths, keep, eos_counted, eos_up


def _trie_nodes(paths: list, n_entries: int, eos_up: dict[int, int]) -> tuple[array, array, array, array, array]:
    """The trie of sorted `paths`, as flat arrays: parent, token and depth per node, and the node where
    each entry's EOS end and line end lie."""
    parent = array("i", [-1])
    token = array("i", [-1])
    depth = array("i", [0])
    eos_node = array("i", [0]) * n_entries
    line_node = array("i", [0]) * n_entries
    path = [0]
    previous: tuple[int, ...] = ()
    for seq, kind, entry in paths:
        common = 0
        limit = min(len(seq), len(previous))
        while common < limit and seq[common] == previous[common]:
            common += 1
        del path[common + 1 :]
        for t in seq[common:]:
            node = len(parent)
            parent.append(path[-1])
            token.append(t)
            depth.append(len(path))
            path.append(node)
        (line_node if kind else eos_node)[entry] = path[len(seq)]
        previous = seq
    for entry, up in eos_up.items():
        node = line_node[entry]
        for _ in range(up):
            node = parent[node]
        eos_node[entry] = node
    return parent, token, depth, eos_node, line_node
