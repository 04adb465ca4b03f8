"""Stage 2: render a record into chat messages with a Jinja2 template, then into the model's prompt.

A template is a `.j2` file with three blocks:
- `system`: the system message;
- `user`: the user message, which sees the record's fields as plain variables;
- `answer`: the assistant's reply for a list of `tags`, used as the training target, so training and
  inference share one format.

Product text is untrusted, so it only ever enters as a *variable* of a sandboxed environment, never as
template source. Strings that look like chat-template control tokens are neutralised before rendering,
so a product cannot close its own turn and speak as the system or the assistant.
"""

from __future__ import annotations

import functools
import hashlib
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from jinja2 import StrictUndefined, TemplateError, meta
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .budget import demo_text
from .records import GoldTag, Record

PACKAGED = ("zh", "en", "few_shot", "tuned")
DEMO_MAX_CHARS = 300  # a demonstration's text is cut here
# Earlier sources of packaged templates that render exactly as the current one for an adapter trained
# with them: `tuned` gained a block for retrieved demonstrations, then one for the span proposer's spans,
# each of which renders nothing without them (tests/test_prompts.py checks the rendering against the
# earlier sources).
EARLIER_SHA256 = {"tuned": ("1c0084270659e07cc19afb20d27d7ab4b81fbdacf37c647482ad32322e61ad39",
                            "441828caab6696230ebfc3bef8ee7714e62692dc151d0bfa99b126b152846399")}
BLOCKS = ("system", "user", "answer")

_ENV = ImmutableSandboxedEnvironment(
    undefined=StrictUndefined, keep_trailing_newline=False, trim_blocks=True, lstrip_blocks=True, autoescape=False
)

# Qwen's control tokens look like <|im_start|>; other chat formats use similar bracketed markers.
_CONTROL_TOKEN_RE = re.compile(r"<\s*\|([^|<>]{0,40})\|\s*>")


class PromptError(ValueError):
    """A template that cannot be found, parsed or rendered."""


@functools.lru_cache(maxsize=64)
def _compile(source: str) -> Any:
    return _ENV.from_string(source)


@functools.lru_cache(maxsize=64)
def _read_variables(source: str) -> frozenset[str]:
    try:
        return frozenset(meta.find_undeclared_variables(_ENV.parse(source)))
    except TemplateError as exc:
        raise PromptError(f"template: {exc}") from exc


def neutralise(text: str) -> str:
    """Make control-token look-alikes inert: `<|im_end|>` becomes `<｜im_end｜>` (full-width bars).

    The full-width bar keeps the text readable for the model while no tokenizer maps it to a special
    token. Records are NFKC-cleaned on input (which would turn it back), so this runs at render time.
    """
    return _CONTROL_TOKEN_RE.sub(lambda m: f"<｜{m.group(1)}｜>", text)


def first_form(tag: GoldTag) -> str:
    """A gold tag's first accepted form (an any-of group is a list of forms)."""
    return tag[0] if isinstance(tag, list) else tag


def detect_lang(text: str) -> str:
    """'zh' when the text holds any CJK ideograph, else 'en'."""
    return "zh" if any("CJK" in unicodedata.name(ch, "") for ch in text if ord(ch) > 0x2E7F) else "en"


@dataclass(frozen=True)
class Demo:
    """A labelled example shown to the model (few-shot)."""

    text: str
    tags: list[str]


@dataclass(frozen=True)
class PromptTemplate:
    name: str
    source: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.source.encode("utf-8")).hexdigest()

    def renders(self, variable: str) -> bool:
        """Whether the template reads `variable` (a name in a comment does not count): `demos` for retrieval,
        `proposals` for the span proposer."""
        return variable in _read_variables(self.source)

    def _render_block(self, block: str, variables: dict[str, Any]) -> str:
        try:
            template = _compile(self.source)
            if block not in template.blocks:
                raise PromptError(f"template {self.name!r} has no '{{% block {block} %}}'")
            return "".join(template.blocks[block](template.new_context(variables))).strip()
        except TemplateError as exc:
            raise PromptError(f"template {self.name!r}: {exc}") from exc

    def variables(
        self, record: Record, demos: Sequence[Demo] = (), candidates: Sequence[str] = (),
        proposals: Sequence[Any] = (),
    ) -> dict[str, Any]:
        """Everything a template may use. All product-derived strings are neutralised. `proposals`: the
        span proposer's spans (proposer.Proposal), each as `tag`, `attribute`, `value` and `p`, its
        marginal probability."""
        return {
            "text": neutralise(record.text),
            "category": neutralise(record.category) if record.category else None,
            "schema": [neutralise(s) for s in record.schema] if record.schema else None,
            "lang": record.lang or detect_lang(record.text),
            "demos": [Demo(neutralise(d.text), [neutralise(t) for t in d.tags]) for d in demos],
            "candidates": [neutralise(c) for c in candidates],
            "proposals": [{"tag": neutralise(p.tag), "attribute": neutralise(p.attribute),
                           "value": neutralise(p.value), "p": p.p} for p in proposals],
        }

    def messages(
        self, record: Record, demos: Sequence[Demo] = (), candidates: Sequence[str] = (),
        proposals: Sequence[Any] = (),
    ) -> list[dict[str, str]]:
        variables = self.variables(record, demos, candidates, proposals)
        messages = []
        system = self._render_block("system", variables)
        if system:
            messages.append({"role": "system", "content": system})
        messages.append({"role": "user", "content": self._render_block("user", variables)})
        return messages

    def answer(self, tags: Sequence[GoldTag]) -> str:
        """The assistant reply for gold `tags` (any-of groups give their first form)."""
        return self._render_block("answer", {"tags": [neutralise(first_form(t)) for t in tags]})

    def check(self) -> None:
        """Parse the template and require its blocks, so a typo fails before a long run starts."""
        try:
            template = _compile(self.source)
        except TemplateError as exc:
            raise PromptError(f"template {self.name!r}: {exc}") from exc
        missing = [b for b in BLOCKS if b not in template.blocks]
        if missing:
            raise PromptError(f"template {self.name!r} lacks block(s): {', '.join(missing)}")


def load_template(name_or_path: str | Path) -> PromptTemplate:
    """A packaged template by name ('zh', 'en', 'few_shot') or a `.j2` file path."""
    name = str(name_or_path)
    if name in PACKAGED:
        source = resources.files("llmtags.templates").joinpath(f"{name}.j2").read_text(encoding="utf-8")
    else:
        path = Path(name)
        if not path.is_file():
            raise PromptError(f"no template {name!r}: give one of {', '.join(PACKAGED)} or a .j2 file path")
        source = path.read_text(encoding="utf-8")
        name = path.stem
    template = PromptTemplate(name, source)
    template.check()
    return template


def template_choice(choice: str | PromptTemplate) -> str | PromptTemplate:
    """A `--template` value as tagging uses it: 'auto' stays per record (see `template_for`); anything
    else is loaded, and checked, once."""
    return choice if isinstance(choice, PromptTemplate) or choice == "auto" else load_template(choice)


def template_for(record: Record, choice: str | PromptTemplate) -> PromptTemplate:
    """Resolve 'auto' per record: the Chinese default for Chinese text, the English one otherwise."""
    if isinstance(choice, PromptTemplate):
        return choice
    if choice == "auto":
        return load_template(record.lang or detect_lang(record.text))
    return load_template(choice)


def demo_of(record: Record, max_chars: int = DEMO_MAX_CHARS, view: str = "full") -> Demo:
    """`record` as a demonstration: its text (its title alone with `view="title"`, budget.demo_text) cut
    to `max_chars` (k long descriptions would otherwise crowd the prompt), its gold tags in their first form."""
    return Demo(demo_text(record.text, view, max_chars), [first_form(t) for t in record.tags or ()])


def demos_from(records: Sequence[Record], k: int, lang: str | None = None,
               max_chars: int = DEMO_MAX_CHARS) -> list[Demo]:
    """The first k labelled records (of `lang`, when given) as demonstrations (`demo_of`), in file order.
    """
    demos = []
    for record in records:
        if not record.tags or (lang and (record.lang or detect_lang(record.text)) != lang):
            continue
        demos.append(demo_of(record, max_chars))
        if len(demos) == k:
            break
    return demos


def _fullwidth(ch: str) -> str:
    """The full-width look-alike of an ASCII punctuation mark ('<' becomes '＜')."""
    return chr(ord(ch) + 0xFEE0) if "!" <= ch <= "~" else ch


def _added_token_re(tokenizer: Any) -> re.Pattern[str] | None:
    """A pattern for the tokenizer's markup-like added tokens (`<tool_call>`, `<s>`, `[INST]`, ...).

    Tokens that are plain words (some tokenizers add vocabulary) are left alone: only those that
    start and end with ASCII punctuation read as markup. Cached on the tokenizer.
    """
    cached = getattr(tokenizer, "_llmtags_added_token_re", False)
    if cached is not False:
        return cached
    tokens = [t for t in getattr(tokenizer, "added_tokens_encoder", {}) or {}
              if len(t) >= 3 and not t[0].isalnum() and not t[-1].isalnum() and t.isascii() and t.strip() == t]
    pattern = re.compile("|".join(map(re.escape, sorted(tokens, key=len, reverse=True)))) if tokens else None
    try:
        tokenizer._llmtags_added_token_re = pattern
    except AttributeError:
        pass
    return pattern


def defuse_added_tokens(tokenizer: Any, text: str) -> str:
    """Give every string the tokenizer would read as one of its added tokens full-width ends
    (`<tool_call>` becomes `＜tool_call＞`), so it tokenises as plain text.

    `neutralise` already handled the `<|...|>` shape in product fields; this catches the tokenizer's
    other markup, e.g. Qwen's `<tool_call>` spelled `&lt;tool_call&gt;` in a scraped title.
    """
    pattern = _added_token_re(tokenizer)
    if pattern is None:
        return text
    return pattern.sub(lambda m: _fullwidth(m.group(0)[0]) + m.group(0)[1:-1] + _fullwidth(m.group(0)[-1]), text)


def render_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The exact string the model sees: the messages through the model's own chat template.

    The messages cannot hold the tokenizer's own added tokens: only the chat template adds those.
    """
    messages = [dict(m, content=defuse_added_tokens(tokenizer, m["content"])) for m in messages]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def chat_template_hash(tokenizer: Any) -> str:
    return hashlib.sha256((tokenizer.chat_template or "").encode("utf-8")).hexdigest()
