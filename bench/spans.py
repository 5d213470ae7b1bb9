"""Verbatim spans (issue 13): how long must a shared span be to mean a copy, and how fast
is the search at a million rows. Prints tables, writes JSON.

    .venv/bin/python bench/spans.py [--rows 1000000] [--out bench/results/spans.json]

1. Chance matches on real English that nobody copied: the docstrings of one half of the
   Python standard library's modules are the "training rows", paragraphs of the other
   half are "outputs" (held out: disjoint modules, no text in common by construction).
   For each minimum length N, the share of outputs with a span of N+ words found in the
   rows (false copies), and the share of planted copies found (an output that embeds 10
   to 30 consecutive words of a row between held-out words). Chance matches fall off
   fast with N, text the halves really share (docstrings copied between modules) does
   not; the default `--min-words` is the knee, the smallest N after which one more word
   removes less than one point of matches.
2. Speed: a synthetic corpus of `--rows` rows (Zipf-distributed word ids, 30 words each):
   build seconds, index bytes per word, and per-query milliseconds for 100-word outputs,
   with and without a planted 20-word copy.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import pkgutil
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from provenance import with_provenance

from datablame.data.rows import Rows
from datablame.data.template import PromptTemplate
from datablame.store.span_index import SpanIndex, build_span_index, words

TEMPLATE = PromptTemplate("{output}")


def docstring_paragraphs(module_names: list[str]) -> list[str]:
    """Paragraphs (15+ words) of the docstrings of these modules and their members."""
    out: list[str] = []
    for name in module_names:
        try:
            module = importlib.import_module(name)
        except Exception:  # noqa: BLE001  (some stdlib modules need a platform)
            continue
        docs = [inspect.getdoc(module) or ""]
        for _, member in inspect.getmembers(module):
            if getattr(member, "__module__", None) == name:
                docs.append(inspect.getdoc(member) or "")
        for doc in docs:
            for para in doc.split("\n\n"):
                para = " ".join(para.split())
                if len(words(para)) >= 15 and ">>>" not in para:
                    out.append(para)
    return list(dict.fromkeys(out))


def stdlib_split() -> tuple[list[str], list[str]]:
    names = sorted(m.name for m in pkgutil.iter_modules() if m.name in sys.stdlib_module_names
                   and not m.name.startswith("_") and m.name not in ("antigravity", "this",
                                                                     "idlelib", "turtledemo"))
    return docstring_paragraphs(names[0::2]), docstring_paragraphs(names[1::2])


def chance_matches(lengths: list[int], seed: int) -> list[dict]:
    train, held = stdlib_split()
    rng = random.Random(seed)
    held_words = [w for p in held for w, _, _ in words(p)]
    with tempfile.TemporaryDirectory() as tmp:
        build_span_index(Path(tmp), Rows(Path("stdlib"), [{"output": p} for p in train]),
                         TEMPLATE, "bench")
        index = SpanIndex(tmp)
        outputs = rng.sample(held, min(1000, len(held)))
        planted = []
        for _ in range(300):
            row = rng.choice(train)
            ws = [w for w, _, _ in words(row)]
            k = rng.randint(10, min(30, len(ws)))
            at = rng.randrange(0, len(ws) - k + 1)
            pad = lambda: " ".join(rng.choice(held_words) for _ in range(12))  # noqa: E731
            planted.append((f"{pad()} {' '.join(ws[at:at + k])} {pad()}", k))
        longest = [max((s.words for s in index.find(o, min_words=1)), default=0)
                   for o in outputs]
        found = [(max((s.words for s in index.find(o, min_words=1)), default=0), k)
                 for o, k in planted]
    table = []
    for n in lengths:
        false = float(np.mean([m >= n for m in longest]))
        recall = float(np.mean([m >= n for m, k in found if k >= n]))
        table.append({"min_words": n, "false_copies": false, "planted_found": recall})
    return table, {"train_paragraphs": len(train), "held_out_outputs": len(outputs)}


def speed(n_rows: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    vocab = np.array([f"w{i}" for i in range(50_000)])
    ranks = np.minimum(rng.zipf(1.2, size=(n_rows, 30)), len(vocab)) - 1
    records = [{"output": " ".join(vocab[r])} for r in ranks]
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        build_span_index(Path(tmp), Rows(Path("synthetic"), records), TEMPLATE, "bench")
        build_s = time.perf_counter() - start
        size = sum(f.stat().st_size for f in (Path(tmp) / "spans").iterdir())
        index = SpanIndex(tmp)
        queries = [" ".join(vocab[np.minimum(rng.zipf(1.2, 100), len(vocab)) - 1])
                   for _ in range(50)]
        copies = []
        for q in queries:
            ws = q.split()
            ws[40:60] = records[int(rng.integers(n_rows))]["output"].split()[:20]
            copies.append(" ".join(ws))
        timings = {}
        for name, batch in (("no copy", queries), ("a 20-word copy", copies)):
            index.find(batch[0])  # warm the page cache
            start = time.perf_counter()
            hits = [index.find(q) for q in batch]
            timings[name] = {"ms_per_query": (time.perf_counter() - start) / len(batch) * 1e3,
                             "queries_with_a_span": float(np.mean([bool(h) for h in hits]))}
        tokens = index.manifest["tokens"]
    return {"rows": n_rows, "words": tokens, "build_seconds": build_s,
            "bytes_per_word": size / tokens, "queries": timings}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench/results/spans.json")
    args = ap.parse_args()
    lengths = [3, 4, 5, 6, 7, 8, 10, 12, 15, 20]
    table, sizes = chance_matches(lengths, args.seed)
    print(f"held-out stdlib docstrings: {sizes['train_paragraphs']} row paragraphs, "
          f"{sizes['held_out_outputs']} outputs nobody copied")
    print(f"{'min words':>9} {'false copies':>13} {'planted found':>14}")
    for row in table:
        print(f"{row['min_words']:>9} {row['false_copies']:>13.3f} {row['planted_found']:>14.3f}")
    # Chance matches fall off fast with length; text the halves really share (docstrings
    # copied between modules) does not. The default is the knee: the smallest length
    # after which one more word removes less than one point of matches.
    default = next(a["min_words"] for a, b in zip(table, table[1:], strict=False)
                   if b["min_words"] == a["min_words"] + 1
                   and a["false_copies"] - b["false_copies"] < 0.01)
    print(f"knee (one more word removes < 1 point of matches): {default}")
    fast = speed(args.rows, args.seed)
    print(f"{fast['rows']:,} rows, {fast['words']:,} words: built in {fast['build_seconds']:.1f}"
          f" s, {fast['bytes_per_word']:.1f} bytes/word")
    for name, t in fast["queries"].items():
        print(f"  100-word output, {name}: {t['ms_per_query']:.2f} ms/query "
              f"(spans found in {t['queries_with_a_span']:.0%})")
    out = {"chance": table, "sizes": sizes, "default_min_words": default, "speed": fast}
    Path(args.out).write_text(json.dumps(with_provenance(out), indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
