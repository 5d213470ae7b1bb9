"""Prompt templates: how a training row becomes the text the model was trained on.

The same template must be used to index rows and to compute their gradients, so it is
stored in every index manifest and read back from there at trace time.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass

from datablame.errors import UserError

ALPACA_TEMPLATE = (
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n{output}"
)


@dataclass(frozen=True)
class FormattedText:
    """A formatted row: the full text and where the response (the part being traced) starts."""

    text: str
    response_start: int  # character offset of the response field in `text`
    response_end: int | None = None  # end of the traced span (None: the end of the text)


class PromptTemplate:
    """A `{field}` template.

    Blocks (separated by a blank line) whose placeholders are all empty are dropped, which
    is what Alpaca users expect: a row with an empty `input` is formatted without the
    `### Input:` block. The response field is the last placeholder unless named.
    """

    def __init__(self, template: str = ALPACA_TEMPLATE, response_field: str | None = None):
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
        except ValueError as exc:
            raise UserError(f"template is not a valid {{field}} template: {exc}") from exc
        if not fields:
            raise UserError("template has no {field} placeholder")
        for f in fields:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_\-]*", f):
                raise UserError(f"template placeholder {{{f}}} is not a plain field name")
        self.template = template
        self.fields: list[str] = list(dict.fromkeys(fields))
        self.response_field = response_field or fields[-1]
        if self.response_field not in self.fields:
            raise UserError(f"response field '{self.response_field}' is not in the template")

    def format(self, row: dict[str, object]) -> FormattedText:
        """Format one row and remember where the response starts (for response-only loss)."""
        values = {f: "" if row.get(f) is None else str(row.get(f)) for f in self.fields}
        marker = "\x00DATABLAME_RESPONSE\x00"
        blocks = []
        for block in self.template.split("\n\n"):
            names = [f for _, f, _, _ in string.Formatter().parse(block) if f]
            optional = self.response_field not in names
            if names and optional and all(values[n].strip() == "" for n in names):
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

    def to_json(self) -> dict[str, str]:
        return {"template": self.template, "response_field": self.response_field}

    @classmethod
    def from_json(cls, data: dict[str, str]) -> PromptTemplate:
        return cls(data["template"], data.get("response_field"))
