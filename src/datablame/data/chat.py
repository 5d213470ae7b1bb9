"""Chat rows: conversations rendered by the model's own chat template, loss on the
assistant's turns only.

A chat fine-tune trains on `tokenizer.apply_chat_template(messages)` with the loss masked
to the assistant tokens; its gradients, and so every score, are only right when the rows
are rendered the same way. The template's Jinja text is kept in the index manifest (and
its hash compared with the model's at trace time), so a store made with another template
is refused instead of silently scoring other text.

Rows hold `messages` (`role` / `content`) or ShareGPT's `conversations` (`from` /
`value`, roles `human` / `gpt`). A query is the conversation so far plus the assistant
answer to trace (`answer`), or a conversation whose last turn is that answer.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from datablame.data.template import FormattedText
from datablame.errors import UserError

CHAT_FIELDS = ("messages", "conversations")
ANSWER_FIELD = "answer"
ASSISTANT_TURNS = ("all", "last")
ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
         "model": "assistant", "bot": "assistant", "system": "system", "tool": "tool",
         "function": "tool", "ipython": "tool"}
SPECIAL_TOKENS = ("bos_token", "eos_token", "pad_token", "unk_token")


def chat_field(columns: list[str]) -> str | None:
    """The column holding conversations, if the rows are chat rows."""
    return next((c for c in CHAT_FIELDS if c in columns), None)


def template_digest(jinja: str) -> str:
    return "sha256:" + hashlib.sha256(jinja.encode()).hexdigest()


def normalize_messages(value: object) -> list[dict[str, str]]:
    """`[{"role", "content"}]` from any of the common shapes (a JSON string of the list,
    ShareGPT's `from` / `value`); a malformed turn is refused with what was wrong."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise UserError("a conversation must be a JSON list of {role, content} turns, "
                            f"got text: {value[:60]!r}") from None
    if not isinstance(value, (list, tuple)) or not value:
        raise UserError("a conversation must be a non-empty list of {role, content} turns")
    out = []
    for n, turn in enumerate(value, start=1):
        if not isinstance(turn, dict):
            raise UserError(f"turn {n} is not an object with a role and a content")
        # keys absent or null alike: Arrow gives every turn of a column every key seen
        role = turn.get("role") if turn.get("role") is not None else turn.get("from")
        content = turn.get("content") if turn.get("content") is not None else turn.get("value")
        if role is None or str(role).lower() not in ROLES:
            raise UserError(f"turn {n} has role {role!r} (use user, assistant, system, tool; "
                            "or ShareGPT's human, gpt)")
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise UserError(f"turn {n}: content must be text, got {type(content).__name__}")
        out.append({"role": ROLES[str(role).lower()], "content": content})
    return out


class ChatTemplate:
    """A model's chat template, with the same interface as `PromptTemplate` (`fields`,
    `format`, `parse`, `to_json`): `format` renders a conversation and marks the assistant
    turns (all, or the last) as the text whose loss is traced."""

    response_field = ANSWER_FIELD
    add_special_tokens = False  # the template writes BOS/EOS itself, as apply_chat_template

    def __init__(self, jinja: str, *, special_tokens: dict[str, str | None] | None = None,
                 messages_field: str = "messages", assistant_turns: str = "all",
                 source: str = "tokenizer"):
        if assistant_turns not in ASSISTANT_TURNS:
            raise UserError(f"unknown assistant turns '{assistant_turns}' (use all or last)")
        if not jinja.strip():
            raise UserError("the chat template is empty")
        import jinja2
        from transformers.utils.chat_template_utils import _compile_jinja_template

        try:  # a syntax error now, named as one, not as a refused conversation later
            _compile_jinja_template(jinja)  # the environment apply_chat_template uses
        except jinja2.TemplateSyntaxError as exc:
            raise UserError(f"the chat template is not valid Jinja (line {exc.lineno}: "
                            f"{exc.message})") from None
        self.jinja = jinja
        self.special_tokens = dict(special_tokens or {})
        self.messages_field = messages_field
        self.assistant_turns = assistant_turns
        self.source = source  # "tokenizer": must equal the model's own at trace time
        self.fields = [messages_field, ANSWER_FIELD]
        self.optional = frozenset({ANSWER_FIELD})
        self.digest = template_digest(jinja)

    @classmethod
    def from_model(cls, path: str | os.PathLike, *, messages_field: str = "messages",
                   assistant_turns: str = "all") -> ChatTemplate:
        """The chat template of a model directory's tokenizer, or of a Jinja file."""
        path = Path(path)
        if path.is_file():
            return cls(path.read_text(encoding="utf-8"), messages_field=messages_field,
                       assistant_turns=assistant_turns, source=f"file:{path.name}")
        tokenizer = load_tokenizer(path)
        jinja = tokenizer_template(tokenizer)
        if jinja is None:
            raise UserError(f"the tokenizer in {path} has no chat template: pass one with "
                            "--chat-template FILE.jinja (or format rows with --template)")
        special = {k: getattr(tokenizer, k, None) for k in SPECIAL_TOKENS}
        return cls(jinja, special_tokens=special, messages_field=messages_field,
                   assistant_turns=assistant_turns)

    # -- rendering -------------------------------------------------------------------------
    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = False
               ) -> str:
        from transformers.utils.chat_template_utils import render_jinja_template

        try:
            rendered, _ = render_jinja_template(
                [messages], chat_template=self.jinja, add_generation_prompt=add_generation_prompt,
                **{k: v for k, v in self.special_tokens.items() if v is not None})
        except Exception as exc:  # raise_exception() in the template, or a bad variable
            raise UserError(f"the chat template refused the conversation "
                            f"({_first_line(exc)})") from None
        return rendered[0]

    def _messages(self, row: dict) -> tuple[list[dict[str, str]], bool]:
        """The conversation to render and whether its last turn is a traced answer."""
        answer = row.get(ANSWER_FIELD)
        if row.get(self.messages_field) in (None, "", []) and answer not in (None, ""):
            raise UserError(f"an answer without its conversation ('{self.messages_field}' "
                            "is empty)")
        messages = normalize_messages(row.get(self.messages_field))
        if answer is not None and str(answer) != "":
            return [*messages, {"role": "assistant", "content": str(answer)}], True
        return messages, False

    def format(self, row: dict) -> FormattedText:
        """The conversation as the model saw it, with a span per traced assistant turn."""
        messages, is_query = self._messages(row)
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if not turns:
            raise UserError("the conversation has no assistant turn: nothing was trained on "
                            "or can be traced")
        if is_query or self.assistant_turns == "last":
            turns = turns[-1:]
        full = self.render(messages)
        spans = []
        for i in turns:
            before = self.render(messages[:i], add_generation_prompt=True) if i else ""
            through = self.render(messages[: i + 1])
            if not (full.startswith(through) and through.startswith(before)):
                raise UserError(f"the chat template renders turn {i + 1} differently once "
                                "later turns follow, so its tokens cannot be located; use "
                                "--chat-turns last")
            spans.append((len(before), len(through.rstrip())))
        return FormattedText(full, spans[0][0], spans[-1][1] if is_query else None,
                             spans=tuple(spans), add_special_tokens=False)

    def trained_texts(self, row: dict) -> list[str]:
        """The words of the traced assistant turns, without the template's markup: what a
        verbatim copy is compared with."""
        messages, is_query = self._messages(row)
        said = [m["content"] for m in messages if m["role"] == "assistant"]
        return said[-1:] if is_query or self.assistant_turns == "last" else said

    def generation_prompt(self, prompt: dict) -> str:
        """What the model is given to answer: the conversation plus the assistant header."""
        messages = normalize_messages(prompt.get(self.messages_field))
        if messages[-1]["role"] == "assistant":
            raise UserError("the conversation to answer ends with an assistant turn: end it "
                            "with the user's turn the model should answer")
        return self.render(messages, add_generation_prompt=True)

    def split_answer(self, fields: dict) -> dict:
        """A query conversation whose last turn is the assistant's: that turn is the answer."""
        if fields.get(ANSWER_FIELD) not in (None, "") or self.messages_field not in fields:
            return fields
        messages = normalize_messages(fields[self.messages_field])
        if messages[-1]["role"] != "assistant":
            return fields
        return {**fields, self.messages_field: messages[:-1],
                ANSWER_FIELD: messages[-1]["content"]}

    def parse(self, text: str) -> dict | None:
        """A query pasted as the conversation's JSON (the chat form of the seed's "whole
        formatted text"), or as a chat template's rendered text (ChatML, Llama 3, Gemma,
        Phi-3, Llama 2 / Mistral `[INST]`): its last assistant turn is the answer."""
        try:
            value = json.loads(text)
        except (json.JSONDecodeError, TypeError):
            value = self._rendered_turns(text) if isinstance(text, str) else None
        if isinstance(value, dict):
            value = value.get(self.messages_field, value.get("conversations"))
        if not isinstance(value, list):
            return None
        try:
            split = self.split_answer({self.messages_field: value})
        except UserError:
            return None
        return split if ANSWER_FIELD in split else None

    def _rendered_turns(self, text: str) -> list[dict[str, str]] | None:
        """`parse_rendered_chat`'s turns, if this template renders them back to `text`
        (whitespace aside); a system turn the template writes by itself (a default system
        prompt, Llama 3.1's date header) is left to it. Else None: traced as written."""
        turns = parse_rendered_chat(text)
        if not turns:
            return None
        tries = [turns] + ([turns[1:]] if turns[0]["role"] == "system" else [])
        for candidate in tries:
            try:
                if candidate and _same_text(self.render(candidate), text):
                    return candidate
            except UserError:
                continue
        return None

    def check_rows(self, rows) -> None:
        """Every row is a conversation the template renders, with an assistant turn."""
        if self.messages_field not in rows.columns:
            raise UserError(f"{rows.path}: field '{self.messages_field}' is missing "
                            f"({rows.where(0)} has {', '.join(rows.columns) or 'no fields'})")
        for i, rec in enumerate(rows.records):
            try:
                self.format(rec)
            except UserError as exc:
                raise UserError(f"{rows.path}: {rows.where(i)}: {exc}") from None

    def check_tokenizer(self, tokenizer, model_dir: object) -> None:
        """Refuse a model whose chat template is not the one the index was built with."""
        if self.source != "tokenizer":
            return
        theirs = tokenizer_template(tokenizer)
        if theirs is None or template_digest(theirs) != self.digest:
            raise UserError(f"the index was built with another chat template than the one of "
                            f"{model_dir}'s tokenizer: rebuild the index with this model")

    def to_json(self) -> dict:
        return {"chat": self.digest, "jinja": self.jinja, "special_tokens": self.special_tokens,
                "messages_field": self.messages_field, "assistant_turns": self.assistant_turns,
                "source": self.source, "response_field": ANSWER_FIELD}

    @classmethod
    def from_json(cls, data: dict) -> ChatTemplate:
        return cls(data["jinja"], special_tokens=data.get("special_tokens"),
                   messages_field=data.get("messages_field", "messages"),
                   assistant_turns=data.get("assistant_turns", "all"),
                   source=data.get("source", "tokenizer"))


# A rendered turn of the common chat formats: (role, content) up to the turn's end marker
# or the end of the text (a pasted answer often lacks its closing token).
RENDERED_TURNS = (
    re.compile(r"<\|im_start\|>(\w+)\n(.*?)(?:<\|im_end\|>|(?=<\|im_start\|>)|\Z)", re.S),
    re.compile(r"<\|start_header_id\|>(\w+)<\|end_header_id\|>(.*?)(?:<\|eot_id\|>|"
               r"(?=<\|start_header_id\|>)|\Z)", re.S),
    re.compile(r"<start_of_turn>(\w+)\n(.*?)(?:<end_of_turn>|(?=<start_of_turn>)|\Z)", re.S),
    re.compile(r"<\|(system|user|assistant)\|>(.*?)(?:<\|end\|>|"
               r"(?=<\|(?:system|user|assistant)\|>)|\Z)", re.S),
)
INST_TURN = re.compile(r"\[INST\](.*?)\[/INST\](.*?)(?=\[INST\]|\Z)", re.S)
SYS_BLOCK = re.compile(r"<<SYS>>(.*?)<</SYS>>", re.S)
EDGE_TOKENS = r"(?:\s|</s>|<s>|<eos>|<bos>|<\|endoftext\|>|<\|end_of_text\|>|<\|begin_of_text\|>)"
LEADING, TRAILING = re.compile(rf"^{EDGE_TOKENS}+"), re.compile(rf"{EDGE_TOKENS}+$")


def _trim(text: str) -> str:
    """Whitespace and begin / end-of-text tokens off the edges (not inside)."""
    return TRAILING.sub("", LEADING.sub("", text))


def parse_rendered_chat(text: str) -> list[dict[str, str]] | None:
    """The turns of a conversation pasted as a chat template renders it, or None unless
    the text is made of one known format's turns from its start to its end (an answer
    that mentions a marker is an answer). `ChatTemplate.parse` then keeps the turns only
    if the index's template renders them back to this text."""
    body = _trim(text)
    for pattern in RENDERED_TURNS:
        found = list(pattern.finditer(body))
        if found and found[0].start() == 0 and _covers(body, found):
            return [{"role": ROLES.get(m.group(1).lower(), m.group(1).lower()),
                     "content": _trim(m.group(2))} for m in found]
    found = list(INST_TURN.finditer(body))
    if not found or found[0].start() != 0 or not _covers(body, found):
        return None
    turns: list[dict[str, str]] = []
    for m in found:
        asked, answered = m.group(1), _trim(m.group(2))
        system = SYS_BLOCK.search(asked)
        if system and not turns:
            turns.append({"role": "system", "content": _trim(system.group(1))})
        turns.append({"role": "user", "content": _trim(SYS_BLOCK.sub("", asked))})
        if answered:
            turns.append({"role": "assistant", "content": answered})
    return turns


def _covers(text: str, found: list[re.Match]) -> bool:
    """Only whitespace and end tokens between and after the matched turns."""
    edges = [m.end() for m in found[:-1]], [m.start() for m in found[1:]]
    gaps = [text[a:b] for a, b in zip(*edges, strict=True)] + [text[found[-1].end():]]
    return all(not _trim(gap) for gap in gaps)


def _same_text(a: str, b: str) -> bool:
    return "".join(_trim(a).split()) == "".join(_trim(b).split())


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    if not path.is_dir():
        raise UserError(f"model directory not found: {path}")
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:
        raise UserError(f"could not load a tokenizer from {path} ({_first_line(exc)})") \
            from None


def tokenizer_template(tokenizer) -> str | None:
    jinja = getattr(tokenizer, "chat_template", None)
    if isinstance(jinja, dict):  # several named templates: the default is the chat one
        jinja = jinja.get("default")
    return jinja or None


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


@dataclass(frozen=True)
class ChatOptions:
    """Where a chat index's template comes from: a model directory (its tokenizer's own
    template) or a Jinja file, and which assistant turns carry the loss."""

    source: str | os.PathLike | None = None
    assistant_turns: str = "all"

    def check(self) -> None:
        if self.assistant_turns not in ASSISTANT_TURNS:
            raise UserError(f"unknown --chat-turns '{self.assistant_turns}' (use all or last)")
