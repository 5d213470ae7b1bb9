"""Prompt templates: how a training row becomes the text the model was trained on.

The same template must be used to index rows and to compute their gradients, so it is
stored in every index manifest and read back from there at trace time.
"""

from __future__ import annotations

import itertools
import re
import string
from dataclasses import dataclass

from datablame.errors import UserError

# `{input?}`: the field may be absent from the data (Alpaca sets often drop the key).
ALPACA_TEMPLATE = (
    "### Instruction:\n{instruction}\n\n### Input:\n{input?}\n\n### Response:\n{output}"
)
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*")
_ESCAPES = {"n": "\n", "t": "\t", "\\": "\\"}


def unescape(template: str) -> str:
    r"""`\n`, `\t` and `\\` typed on a command line mean what users mean by them: a shell
    passes them as two characters, and a template of literal backslash-n formats every row
    as text the model never saw."""
    return re.sub(r"\\([nt\\])", lambda m: _ESCAPES[m.group(1)], template)


@dataclass(frozen=True)
class FormattedText:
    """A formatted row: the full text and where the response (the part being traced) starts."""

    text: str
    response_start: int  # character offset of the response field in `text`
    response_end: int | None = None  # end of the traced span (None: the end of the text)
    spans: tuple[tuple[int, int], ...] | None = None  # several traced spans (chat turns)
    add_special_tokens: bool = True  # False: the text already holds BOS/EOS (chat templates)

    def traced_spans(self) -> tuple[tuple[int, int], ...]:
        """Character ranges whose tokens' loss is traced."""
        if self.spans is not None:
            return self.spans
        return ((self.response_start,
                 len(self.text) if self.response_end is None else self.response_end),)


def _text(value: object) -> str:
    """None and NaN (an empty CSV cell) are empty text, not 'None' or 'nan'."""
    if value is None or (isinstance(value, float) and value != value):
        return ""
    return str(value)


def _placeholders(template: str) -> list[str]:
    try:
        return [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise UserError(f"template is not a valid {{field}} template: {exc}") from exc


# Openings a formatted query may carry that a template without them should drop (the
# Stanford Alpaca template's two, with and without an input).
KNOWN_PREAMBLES = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.",
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.",
)


class PromptTemplate:
    """A `{field}` template; `{field?}` marks a field the data may lack.

    Blocks (separated by a blank line) whose placeholders are all empty are dropped, which
    is what Alpaca users expect: a row with an empty `input` is formatted without the
    `### Input:` block. Empty and null values are empty. The response field is the last
    placeholder unless named.
    """

    add_special_tokens = True  # the tokenizer adds its BOS, as in training

    def __init__(self, template: str = ALPACA_TEMPLATE, response_field: str | None = None):
        raw = _placeholders(template)
        if not raw:
            raise UserError("template has no {field} placeholder")
        optional = {f[:-1] for f in raw if f.endswith("?")}
        fields = [f.removesuffix("?") for f in raw]
        for f in fields:
            if not _NAME.fullmatch(f):
                raise UserError(f"template placeholder {{{f}}} is not a plain field name")
        self.template = template
        self._skeleton = template.replace("?}", "}")
        self.fields: list[str] = list(dict.fromkeys(fields))
        self.response_field = response_field or fields[-1]
        if self.response_field not in self.fields:
            raise UserError(f"response field '{self.response_field}' is not in the template")
        if self.response_field in optional:
            raise UserError(f"the response field '{self.response_field}' cannot be optional")
        self.optional: frozenset[str] = frozenset(optional)
        self.blocks = self._skeleton.split("\n\n")

    @property
    def required(self) -> list[str]:
        return [f for f in self.fields if f not in self.optional]

    def _block_fields(self, block: str) -> list[str]:
        return [f for f in _placeholders(block) if f]

    def format(self, row: dict[str, object]) -> FormattedText:
        """Format one row and remember where the response starts (for response-only loss)."""
        values = {f: _text(row.get(f)) for f in self.fields}
        marker = "\x00DATABLAME_RESPONSE\x00"
        blocks = []
        for block in self.blocks:
            names = self._block_fields(block)
            droppable = self.response_field not in names
            if names and droppable and all(values[n].strip() == "" for n in names):
                continue
            blocks.append(block)
        skeleton = "\n\n".join(blocks)
        with_marker = {**values, self.response_field: marker}
        rendered = skeleton.format(**with_marker)
        start = rendered.find(marker)
        text = rendered.replace(marker, values[self.response_field], 1)
        if marker in text:  # response field used twice: keep the first as the traced span
            text = text.replace(marker, values[self.response_field])
        return FormattedText(text=text, response_start=start if start >= 0 else 0)

    def check_rows(self, rows) -> None:
        """Every field the template needs is in the data (see `Rows.require_fields`); with
        the default template, a row of other fields is told to give its own."""
        from datablame.errors import UserError

        try:
            rows.require_fields(self.fields, self.response_field, self.optional)
        except UserError as exc:
            if self.template != ALPACA_TEMPLATE or \
                    any(f in rows.columns for f in self.fields):
                raise
            raise UserError(f"{rows.path}: the rows have {', '.join(rows.columns)}, not the "
                            f"default Alpaca template's {', '.join(self.fields)}: give the "
                            "template the model was trained with, e.g. --template "
                            "'### Question:\\n{question}\\n\\n### Answer:\\n{answer}'"
                            ) from exc

    def generation_prompt(self, prompt: dict[str, str]) -> str:
        """The text the model continues to answer `prompt`: everything before the answer."""
        shell = self.format({**prompt, self.response_field: ""})
        return shell.text[: shell.response_start]

    def split_answer(self, fields: dict) -> dict:
        return fields

    def parse(self, text: str) -> dict[str, str] | None:
        """Split a text formatted with this template back into its fields, or None.

        A user who pastes the whole formatted text (the seed's own query form) means the
        prompt and the answer, not an answer that contains a prompt. Whitespace between the
        template's literal parts is matched loosely (one line or many); optional blocks may
        be absent. A template with no literal text before its response cannot be told
        apart from a plain answer and never parses.
        """
        head = self._skeleton.split("{" + self.response_field + "}", 1)[0]
        literal_head = re.sub(r"\{[^{}]*\}", "", head)
        if not literal_head.strip():
            return None
        droppable = [i for i, b in enumerate(self.blocks)
                     if self._block_fields(b) and self.response_field not in
                     self._block_fields(b)]
        for n_drop in range(min(len(droppable), 6) + 1):
            for drop in itertools.combinations(droppable, n_drop):
                pattern, names = self._regex([b for i, b in enumerate(self.blocks)
                                              if i not in drop])
                m = pattern.fullmatch(text.strip())
                if m:
                    return {name: m.group(f"f{i}").strip() for i, name in enumerate(names)
                            if name in self.fields}
        return None

    def parse_after_lead_in(self, text: str) -> tuple[dict[str, str], str] | None:
        """(fields, the opening dropped) for a formatted text that opens with a known
        preamble the template does not have: the Alpaca template's "Below is an
        instruction that describes a task..." where the index's template starts at "###
        Instruction:". Only known preambles, followed by a blank line: an answer that
        merely quotes a prompt format is an answer, not a prompt."""
        flat = " ".join(text.split())
        for preamble in KNOWN_PREAMBLES:
            if not flat.startswith(preamble):
                continue
            match = re.match(r"\s*" + r"\s+".join(map(re.escape, preamble.split())) +
                             r"[ \t]*\r?\n[ \t]*\r?\n", text)
            if match is None:
                return None
            fields = self.parse(text[match.end():])
            return None if fields is None else (fields, preamble)
        return None

    def _regex(self, blocks: list[str]) -> tuple[re.Pattern, list[str]]:
        parts, names, seen = [], [], set()
        for literal, name, _, _ in string.Formatter().parse("\n\n".join(blocks)):
            for token in re.split(r"(\s+)", literal):
                if token:
                    parts.append(r"\s*" if token.isspace() else re.escape(token))
            if name is None:
                continue
            if name in seen:
                parts.append(f"(?P=f{names.index(name)})")
                continue
            seen.add(name)
            parts.append(f"(?P<f{len(names)}>.*?)")
            names.append(name)
        return re.compile("".join(parts), re.DOTALL), names

    def to_json(self) -> dict[str, str]:
        return {"template": self.template, "response_field": self.response_field}

    @classmethod
    def from_json(cls, data: dict[str, str]) -> PromptTemplate:
        return cls(data["template"], data.get("response_field"))


def template_from_json(data: dict):
    """The template a manifest recorded: a `{field}` prompt template or a chat template."""
    if "chat" in data:
        from datablame.data.chat import ChatTemplate

        return ChatTemplate.from_json(data)
    return PromptTemplate.from_json(data)
