"""Verbatim spans: which stretches of an output occur word for word in a training row.

The answer to "did the model copy this?" is a string match, not an influence estimate:
every maximal span of the output, at least `min_words` words long, that occurs verbatim in
some row, with the rows that hold it (OLMoTrace's question, at datablame's scale). The rows'
trained text (the response field, or a chat's assistant turns: what the loss was on) is
cut into words, mapped to integer ids and laid end to end with a separator between rows
and between a row's turns, so no match crosses them; a suffix array over that array
(`pydivsufsort`) finds the longest match at each position of the output with a binary
search, reading a few pages of memory-mapped files, so a query costs milliseconds however
many rows there are. Words, not model tokens: a copy is a copy whatever tokenizer the
model has, and spacing or tokenization artefacts ("Haskell ," vs "Haskell,") do not hide it.

Files in `INDEX/spans/` (written atomically, checked against the index manifest's data
fingerprint and template): tokens.npy (uint32 word ids, 0 = separator), suffixes.npy
(the suffix array), row_starts.npy (where each row begins), counts.npy (corpus count per
word id, for rarity), vocab.json (the words), manifest.json.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from datablame.errors import UserError
from datablame.store.atomic import atomic_dir, write_json_atomic

SPAN_DIR = "spans"
FORMAT = "datablame.span-index"
FORMAT_VERSION = 1
SEPARATOR, UNKNOWN = 0, 1  # never a word id: a match stops at either
_WORD = re.compile(r"\w+|[^\w\s]+")


def words(text: str) -> list[tuple[str, int, int]]:
    """(word, start, end) for every word and punctuation run: the unit of a verbatim match."""
    return [(m.group(0), m.start(), m.end()) for m in _WORD.finditer(text)]


def traced_texts(template, record: dict) -> list[str]:
    """What a row trained the model to say: the text of its traced spans (a chat's
    assistant turns without the template's end-of-turn markup)."""
    if hasattr(template, "trained_texts"):
        return template.trained_texts(record)
    formatted = template.format(record)
    return [formatted.text[a:b] for a, b in formatted.traced_spans()]


def build_span_index(index_dir: Path, rows, template, fingerprint: str) -> dict:
    """Write `index_dir/spans/` for `rows` formatted with `template`."""
    from pydivsufsort import divsufsort

    vocab: dict[str, int] = {}
    ids: list[int] = []
    row_starts = np.empty(len(rows), dtype=np.int64)
    for r, record in enumerate(rows.records):
        row_starts[r] = len(ids)
        for text in traced_texts(template, record):
            for w, _, _ in words(text):
                ids.append(vocab.setdefault(w, len(vocab) + 2))
            ids.append(SEPARATOR)
    if not ids:
        ids.append(SEPARATOR)
    tokens = np.asarray(ids, dtype=np.uint32)
    suffixes = divsufsort(tokens)
    counts = np.bincount(tokens, minlength=len(vocab) + 2).astype(np.int64)
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION,
                "data_fingerprint": fingerprint, "template": template.to_json(),
                "rows": len(rows), "tokens": int(len(tokens)), "words": len(vocab),
                "unit": "word"}
    with atomic_dir(Path(index_dir) / SPAN_DIR) as tmp:
        np.save(tmp / "tokens.npy", tokens)
        np.save(tmp / "suffixes.npy", suffixes)
        np.save(tmp / "row_starts.npy", row_starts)
        np.save(tmp / "counts.npy", counts)
        (tmp / "vocab.json").write_text(json.dumps(sorted(vocab, key=vocab.get),
                                                   ensure_ascii=False), encoding="utf-8")
        write_json_atomic(tmp / "manifest.json", manifest)  # written last
    return manifest


def span_index_is_current(index_dir: Path, fingerprint: str, template) -> bool:
    path = Path(index_dir) / SPAN_DIR / "manifest.json"
    if not path.exists():
        return False
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return False
    return m.get("data_fingerprint") == fingerprint and m.get("template") == template.to_json() \
        and m.get("format_version") == FORMAT_VERSION


@dataclass(frozen=True)
class Span:
    start: int  # character offsets in the queried text
    end: int
    text: str
    words: int
    surprisal: float  # sum of -log2 unigram probability of its words: long and rare is high
    occurrences: int  # times it occurs in the training rows' text
    rows: list[int]  # the rows holding it (at most `max_rows`, in row order)


class SpanIndex:
    """A built span index, memory-mapped: `find(text)` -> maximal verbatim spans."""

    def __init__(self, index_dir: str | Path, fingerprint: str | None = None, template=None):
        path = Path(index_dir) / SPAN_DIR
        if not (path / "manifest.json").exists():
            raise UserError(f"{index_dir} has no span index (built by 'datablame index' since "
                            "version 0.1 with spans): rebuild the index")
        self.manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
        if fingerprint is not None and self.manifest["data_fingerprint"] != fingerprint:
            raise UserError(f"{path} was built from other rows than the index: rebuild the "
                            "index")
        if template is not None and self.manifest["template"] != template.to_json():
            raise UserError(f"{path} was built with another template than the index: "
                            "rebuild the index")
        try:
            self.tokens = np.load(path / "tokens.npy", mmap_mode="r")
            self.suffixes = np.load(path / "suffixes.npy", mmap_mode="r")
            self.row_starts = np.load(path / "row_starts.npy")
            self.counts = np.load(path / "counts.npy")
            vocab = json.loads((path / "vocab.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise UserError(f"{path} is missing a file or corrupted ({exc}); rebuild the "
                            "index") from None
        if len(self.tokens) != self.manifest["tokens"] or \
                len(self.suffixes) != len(self.tokens) or len(vocab) != self.manifest["words"]:
            raise UserError(f"{path} does not match its manifest; rebuild the index")
        self.vocab = {w: i + 2 for i, w in enumerate(vocab)}
        self.total = max(1, int(self.counts[2:].sum()))

    # -- suffix-array search ---------------------------------------------------------------
    def _compare(self, query: np.ndarray, position: int) -> tuple[int, int]:
        """(sign of suffix - query over the query's length, length of their common prefix)."""
        piece = np.asarray(self.tokens[position: position + len(query)])
        n = len(piece)
        diff = np.nonzero(piece != query[:n])[0]
        if len(diff):
            j = int(diff[0])
            return (1 if piece[j] > query[j] else -1), j
        return (0 if n == len(query) else -1), n

    def _lower_bound(self, query: np.ndarray) -> int:
        """First suffix not below `query` in the suffix array's order."""
        lo, hi = 0, len(self.suffixes)
        while lo < hi:
            mid = (lo + hi) // 2
            if self._compare(query, int(self.suffixes[mid]))[0] < 0:
                lo = mid + 1
            else:
                hi = mid
        return lo

    def _upper_bound(self, query: np.ndarray) -> int:
        """First suffix that does not start with `query` after those that do."""
        lo, hi = 0, len(self.suffixes)
        while lo < hi:
            mid = (lo + hi) // 2
            sign, common = self._compare(query, int(self.suffixes[mid]))
            if sign < 0 or common == len(query):
                lo = mid + 1
            else:
                hi = mid
        return lo

    def longest_match(self, query: np.ndarray) -> int:
        """Words of the longest prefix of `query` found anywhere in the rows."""
        if len(query) == 0 or query[0] <= UNKNOWN:
            return 0
        at = self._lower_bound(query)  # the longest match is one of its two neighbours
        return max((self._compare(query, int(self.suffixes[k]))[1]
                    for k in (at - 1, at) if 0 <= k < len(self.suffixes)), default=0)

    def occurrences(self, span: np.ndarray) -> np.ndarray:
        lo, hi = self._lower_bound(span), self._upper_bound(span)
        return np.asarray(self.suffixes[lo:max(lo, hi)], dtype=np.int64)

    # -- the question ----------------------------------------------------------------------
    def encode(self, text: str) -> tuple[np.ndarray, list[tuple[str, int, int]]]:
        found = words(text)
        return np.asarray([self.vocab.get(w, UNKNOWN) for w, _, _ in found],
                          dtype=np.uint32), found

    def find(self, text: str, min_words: int = 7, max_rows: int = 20) -> list[Span]:
        """Every maximal span of `text` of at least `min_words` words that occurs verbatim
        in a training row, rarest (highest total surprisal) first."""
        ids, found = self.encode(text)
        lengths = [self.longest_match(ids[i:]) for i in range(len(ids))]
        spans = []
        reach = 0  # end of the last span kept: a span inside it is not maximal
        for i, n in enumerate(lengths):
            if n < min_words or i + n <= reach:
                continue
            reach = i + n
            piece = ids[i:i + n]
            where = self.occurrences(piece)
            rows = np.unique(np.searchsorted(self.row_starts, where, side="right") - 1)
            surprisal = float(sum(-math.log2(max(int(self.counts[t]), 1) / self.total)
                                  for t in piece))
            start, end = found[i][1], found[i + n - 1][2]
            spans.append(Span(start, end, text[start:end], n, surprisal, int(len(where)),
                              [int(r) for r in rows[:max_rows]]))
        return sorted(spans, key=lambda s: (-s.surprisal, s.start))


def longest_common_run(a: str, b: str) -> int:
    """Words of the longest stretch `a` and `b` share verbatim (a trace's `copied` column)."""
    wa, wb = [w for w, _, _ in words(a)], [w for w, _, _ in words(b)]
    if not wa or not wb:
        return 0
    best, prev = 0, [0] * (len(wb) + 1)
    for x in wa:
        cur = [0] * (len(wb) + 1)
        for j, y in enumerate(wb, start=1):
            if x == y:
                cur[j] = prev[j - 1] + 1
                best = max(best, cur[j])
        prev = cur
    return best
