"""Many queries in one file: one JSON value per line, traced with the model loaded once.

A line is either a JSON object — the template's prompt fields plus its answer field
(`{"instruction": ..., "input": ..., "output": ...}`), the answer alone, or the answer
field holding the whole formatted text (the seed's form, split back like `--query`) —
or a JSON string (an answer, or a whole formatted text). Objects may also carry `id`
(echoed in the results) and `focus` (trace one span of the answer), unless the template
uses those names itself. With `generate`, the answer may be left out: the model writes it.
Every line is checked before a model is loaded, and a bad one is named by its number.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from datablame.data.template import PromptTemplate
from datablame.errors import UserError

EXTRA_KEYS = ("id", "focus")


@dataclass(frozen=True)
class QueryLine:
    line: int  # 1-based line number in the file
    answer: str | None  # None: to be generated
    prompt: dict[str, str]
    id: object = None
    focus: str | None = None


def _text(value: object) -> str:
    return "" if value is None else str(value)


def _value(value: object) -> object:
    """A prompt field's value: text, or a chat conversation kept as its list of turns."""
    return value if isinstance(value, list) else _text(value)


def read_queries(path: Path, template: PromptTemplate, *, generate: bool | None = False
                 ) -> list[QueryLine]:
    """Every query of a JSONL file, checked against the index's template. `generate`
    True: every line's answer is generated; None: a line without an answer's."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"queries file not found: {path}")
    answer_field = template.response_field
    extras = [k for k in EXTRA_KEYS if k not in template.fields]
    out: list[QueryLine] = []
    with path.open(encoding="utf-8") as fh:
        for n, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            where = f"{path}, line {n}"
            try:
                value = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise UserError(f"{where}: not valid JSON ({exc.msg})") from None
            if isinstance(value, str):
                value = {answer_field: value}
            if not isinstance(value, dict):
                raise UserError(f"{where}: expected a JSON object (prompt fields and "
                                f"'{answer_field}') or a string")
            obj = dict(value)
            meta = {k: obj.pop(k) for k in extras if k in obj}
            unknown = sorted(set(obj) - set(template.fields))
            if unknown:
                raise UserError(f"{where}: field(s) {', '.join(unknown)} are not in the "
                                f"index's template (fields: {', '.join(template.fields)}"
                                f"; also allowed: {', '.join(extras)})")
            if not generate:
                try:
                    obj = template.split_answer(obj)  # a chat ending with the answer
                except UserError as exc:
                    if generate is not None:
                        raise UserError(f"{where}: {exc}") from None
            answer = obj.pop(answer_field, None)
            if generate or (generate is None and not _text(answer).strip()):
                if not any(v if isinstance(v, list) else _text(v).strip()
                           for v in obj.values()):
                    asked = ", ".join(f for f in template.fields if f != answer_field)
                    raise UserError(f"{where}: --generate needs the prompt fields the model "
                                    f"answers ({asked})")
                answer = None
            elif not _text(answer).strip():
                chat = getattr(template, "messages_field", None)
                if chat in obj:  # a conversation: its answer is its last assistant turn
                    raise UserError(f"{where}: the conversation does not end with an "
                                    "assistant turn to trace (add the answer as its last "
                                    "turn, or pass --generate to trace what the model "
                                    "answers)")
                raise UserError(f"{where}: no '{answer_field}' to trace (or pass --generate "
                                "to trace what the model answers)")
            focus = meta.get("focus")
            out.append(QueryLine(n, None if answer is None else _text(answer),
                                 {k: _value(v) for k, v in obj.items()}, meta.get("id"),
                                 None if focus is None else _text(focus)))
    if not out:
        raise UserError(f"{path} holds no queries")
    return out
