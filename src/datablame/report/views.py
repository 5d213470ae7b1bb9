"""What each kind of result shows: sections of blocks (paragraphs, key/value tables,
plots, ranked rows, tables) that report/page.html lays out. Plain data in, plain data out:
escaping is the template's job, so nothing here builds HTML from row content."""

from __future__ import annotations

import math
from collections.abc import Callable

from markupsafe import Markup

from datablame.report import plots

SIGN = ("Sign convention: a positive score means the row helped the model produce this "
        "output (removing it would raise the output's loss); a negative score means it "
        "pushed against it.")
LISTED = 200  # rows an audit's page lists
SHARED_RUN = 3  # words: a run this long shared with the answer is marked in a row


# ---------------------------------------------------------------- small pieces

def _num(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e-3 and value else f"{value:.{digits}f}"
    return str(value)


def _plot(svg: str, caption: str = "") -> dict:
    return {"type": "plot", "svg": Markup(svg), "caption": caption}


def _p(text: str, cls: str = "") -> dict:
    return {"type": "p", "text": text, "cls": cls}


def _kv(items: list[tuple[str, object]]) -> dict:
    return {"type": "kv", "pairs": [(k, v) for k, v in items if v not in (None, "", {})]}


def _table(headers: list[str], rows: list[list], numeric=(), table_id: str = "") -> dict:
    return {"type": "table", "headers": headers, "rows": rows, "numeric": set(numeric),
            "id": table_id}


def _value(value):
    """A field's value for the page: a chat conversation as turns, the rest as text."""
    if isinstance(value, list) and value and all(isinstance(t, dict) for t in value):
        from datablame.data.chat import normalize_messages
        from datablame.errors import UserError

        try:
            return {"turns": normalize_messages(value)}
        except UserError:
            pass
    if isinstance(value, (dict, list)):
        import json

        return json.dumps(value, ensure_ascii=False, indent=1)
    return "" if value is None else value


def _preview(value, width: int = 90) -> str:
    if isinstance(value, list):
        from datablame.cli.render import _preview as table_preview

        return table_preview(value, width)
    text = " ".join(str("" if value is None else value).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _reading(value) -> str:
    return value if value in ("strong", "related", "unrelated", "opposing") else ""


# ---------------------------------------------------------------- words and marks

def _words(text: str):
    from datablame.store.span_index import words

    return words(text)


def _grams(tokens: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)}


def _marked(tokens: list[str], other: set[tuple[str, ...]], n: int) -> list[bool]:
    """Which of `tokens` lie in a run of `n`+ words that `other` (n-grams) also has."""
    mark = [False] * len(tokens)
    for i in range(len(tokens) - n + 1):
        if tuple(tokens[i:i + n]) in other:
            for j in range(i, i + n):
                mark[j] = True
    return mark


def token_view(text: str, marks: list[bool] | None = None,
               weights: list[float] | None = None, titles: list[str] | None = None) -> dict:
    """`text` cut into words (whitespace kept between), each optionally marked (verbatim
    shared) and shaded by a weight in [-1, 1] (its share of the score)."""
    out, at = [], 0
    for i, (_, start, end) in enumerate(_words(text)):
        if start > at:
            out.append({"text": text[at:start], "w": None, "mark": False, "title": "",
                        "space": True})
        w = None if weights is None else float(weights[i])
        out.append({"text": text[start:end], "w": w, "mark": bool(marks and marks[i]),
                    "title": titles[i] if titles else ""})
        at = end
    if at < len(text):
        out.append({"text": text[at:], "w": None, "mark": False, "title": ""})
    for i in range(1, len(out) - 1):  # one highlight over a marked run, gaps included
        if out[i].get("space") and out[i - 1]["mark"] and out[i + 1]["mark"]:
            out[i]["mark"] = True
    return {"tokens": out, "length": len(text), "preview": text}


def shared_marks(answer: str, row_text: str, n: int = SHARED_RUN) -> tuple[list, list]:
    """(answer marks, row marks): words in a run of n+ words both texts hold verbatim."""
    a = [w for w, _, _ in _words(answer)]
    b = [w for w, _, _ in _words(row_text)]
    return _marked(a, _grams(b, n), n), _marked(b, _grams(a, n), n)


# ---------------------------------------------------------------- ranked rows

def token_peak(tokens: dict | None) -> float:
    """The largest |share| of any word on the page: one scale for every row, so a row
    with a tiny score is shaded faintly, not as strongly as rank 1."""
    values = [abs(v) for shares in (tokens or {}).get("answer", {}).get("shares", {}).values()
              for v in shares]
    values += [abs(v) for row in (tokens or {}).get("rows", {}).values()
               for v in row["shares"]]
    return max(values, default=0.0) or 1.0


def _shaded(shares: list[float] | None, what: str, peak: float | None = None):
    """(weights in [-1, 1], hover titles) for per-word shares of a score."""
    if not shares:
        return None, None
    peak = peak or max(abs(v) for v in shares) or 1.0
    return [v / peak for v in shares], [f"{what}: {v:+.4f}" for v in shares]


def _row_fields(fields: dict, answer: str | None, answer_field: str | None,
                tokens: dict | None = None, row: int | None = None) -> list:
    """A row's fields for the page; its answer field with the words it shares verbatim
    with the traced answer marked and, with per-token scores, each word shaded by its
    share of the row's score."""
    own = (tokens or {}).get("rows", {}).get(str(row))
    peak = token_peak(tokens)
    shown = []
    for name, value in fields.items():
        if answer and isinstance(value, str) and name == answer_field:
            weights, titles = _shaded(own["shares"], "this word's share of the score", peak) \
                if own and own["text"] == value else (None, None)
            shown.append((name, token_view(value, shared_marks(answer, value)[1], weights,
                                           titles)))
        else:
            shown.append((name, _value(value)))
    if own and not (answer_field in fields and own["text"] == fields[answer_field]):
        weights, titles = _shaded(own["shares"], "this word's share of the score", peak)
        shown.append(("its trained words, by their share of the score",
                      token_view(own["text"], None, weights, titles)))
    by_row = (tokens or {}).get("answer", {}).get("shares", {}).get(str(row))
    if by_row:
        weights, titles = _shaded(by_row, "share of this row's score", peak)
        shown.append(("the traced answer, by this row's share in each word",
                      token_view(tokens["answer"]["text"], None, weights, titles)))
    return shown


def _trained_text(fields: dict, answer_field: str | None) -> str:
    if answer_field and isinstance(fields.get(answer_field), str):
        return fields[answer_field]
    for key in ("messages", "conversations"):
        if isinstance(fields.get(key), list):
            from datablame.data.chat import normalize_messages
            from datablame.errors import UserError

            try:
                turns = normalize_messages(fields[key])
            except UserError:
                continue
            return "\n".join(t["content"] for t in turns if t["role"] == "assistant")
    return ""


def ranked_rows(results: list[dict], *, answer: str | None, answer_field: str | None,
                show: int, block_id: str, legend: str = "", tokens: dict | None = None
                ) -> dict:
    rows = []
    for r in results:
        fields = r.get("fields", {})
        badges = [(name, _num(max(r[key], 0.0) if key == "distance" else r[key], 3))
                  for key, name in
                  (("gradient_rank", "grad rank"), ("retrieval_rank", "retr rank"),
                   ("distance", "distance"), ("copied", "copied words"))
                  if r.get(key) is not None]
        preview_field = answer_field if answer_field in fields else next(iter(fields), None)
        rows.append({
            "rank": r.get("rank", len(rows) + 1), "row": r["row"],
            "score": _num(r.get("score")) if r.get("score") is not None else None,
            "reading": _reading(r.get("reading")), "badges": badges,
            "preview": _preview(fields.get(preview_field)) if preview_field else "",
            "reason": r.get("reason", ""), "open": len(rows) < min(show, 3),
            "fields": _row_fields(fields, answer, answer_field, tokens, r["row"]),
        })
    return {"type": "rows", "rows": rows, "id": block_id, "legend": legend}


# ---------------------------------------------------------------- one kind each

def _trace_sections(result: dict, show: int, prefix: str = "", key: int = 0) -> list[dict]:
    answer = result.get("focus") or result.get("query") or ""
    results = result.get("results", [])
    answer_field = result.get("response_field") or _answer_field(results)
    top = [_trained_text(r.get("fields", {}), answer_field) for r in results[:show]]
    marks = [False] * len(_words(answer))
    for text in top:
        for i, m in enumerate(shared_marks(answer, text)[0]):
            marks[i] = marks[i] or m
    weights, titles = None, None
    tokens = result.get("token_scores") or {}
    first = str(results[0]["row"]) if results else None
    shares = tokens.get("answer", {}).get("shares", {}).get(first)
    shaded_text = answer
    if shares:
        weights, titles = _shaded(shares, f"share of row {first}'s score", token_peak(tokens))
        shaded_text = tokens["answer"]["text"]
        marks = marks if shaded_text == answer else None
    prompt = result.get("prompt") or {}
    asked = [(f"prompt: {k}", _value(v)) for k, v in prompt.items() if v not in ("", None)]
    what = "the model's own (greedy) answer" if result.get("generated") else "the answer"
    legend = ("marked: runs of 3+ words the answer shares verbatim with a shown row"
              + ("; shaded: each word's share of rank 1's score (orange helps, blue "
                 "opposes)" if weights else ""))
    sections = [{"title": f"{prefix}The output traced", "blocks": [
        _kv([*asked, (f"{what}{' (focus)' if result.get('focus') else ''}",
                      token_view(shaded_text, marks, weights, titles)),
             ("method", result.get("method")), ("model", result.get("model")),
             ("adapter", result.get("adapter")), ("index", result.get("index")),
             ("training rows", result.get("rows")),
             ("loss on", result.get("loss_on")),
             ("parameters", f"{result['params']} ({result['num_params']:,} values)"
              if result.get("num_params") else result.get("params"))]),
        _p(legend, "legend")]}]
    if results:
        scores = [r.get("score") or 0.0 for r in results]
        sections.append({"title": f"{prefix}Scores of the {len(results)} rows listed",
                         "blocks": [_plot(plots.score_distribution(scores, min(show,
                                                                          len(scores))))]})
        block = ranked_rows(results, answer=answer, answer_field=answer_field, show=show,
                            block_id=f"rows{key}",
                            legend="marked: words shared verbatim with the answer"
                            + ("; shaded: each word's share of the row's score" if tokens
                               else ""), tokens=tokens)
        sections.append({"title": f"{prefix}Ranked rows", "blocks": [block]})
    return sections


def trace_page(result: dict, show: int) -> dict:
    return {"title": "datablame trace", "convention": SIGN,
            "subtitle": f"training rows behind one output · {result.get('method', '')}",
            "sections": _trace_sections(result, show)}


def traces_page(results: list[dict], show: int) -> dict:
    sections = []
    for i, r in enumerate(results):
        tag = f"query {r.get('id', r.get('line', i + 1))} · "
        sections += _trace_sections(r, show, prefix=tag, key=i)
    return {"title": "datablame trace (many queries)", "convention": SIGN,
            "subtitle": f"{len(results)} outputs traced", "sections": sections}


def trace_group_page(result: dict, show: int) -> dict:
    """The rows behind many outputs together: the outputs, then the rows by mean cosine
    with how many of the outputs each agrees / disagrees with."""
    queries = result.get("queries", [])
    results = result.get("results", [])
    n = len(queries)
    listed = [[q["name"], q["answer"]] for q in queries]
    sections = [{"title": f"The {n} outputs traced together", "blocks": [
        _kv([("method", result.get("method")), ("model", result.get("model")),
             ("adapter", result.get("adapter")), ("index", result.get("index")),
             ("candidates", f"{result.get('candidates')} rows from "
                            f"{result.get('candidates_from')}")]),
        _table(["query", "answer"], listed)]}]
    if results:
        for r in results:
            r.setdefault("reason", f"agrees with {r.get('helps')} of the {n} outputs, "
                                   f"opposes {r.get('opposes')}; weighs most on query "
                                   f"{r.get('strongest_query')}")
        sections.append({"title": "Mean score of the rows listed", "blocks": [_plot(
            plots.score_distribution([r["score"] for r in results], min(show, len(results)),
                                     "mean score"))]})
        answer_field = result.get("response_field") or _answer_field(results)
        sections.append({"title": "Ranked rows", "blocks": [ranked_rows(
            results, answer=None, answer_field=answer_field, show=show, block_id="rows0",
            legend="score: the row's gradient cosine averaged over the outputs")]})
    return {"title": "datablame trace (a group of outputs)", "convention": SIGN,
            "subtitle": "training rows behind many outputs together", "sections": sections}


def _feature(value) -> str:
    return f"{value:.6g}" if isinstance(value, float) else _num(value)


def _differs(a, b, spread: float | None) -> bool:
    """Strings differ when unequal; numbers when more than half the feature's standard
    deviation over the training rows apart (5% of the larger value without one)."""
    try:
        x, y = float(a), float(b)
    except (TypeError, ValueError):
        return str(a) != str(b)
    if math.isnan(x) or math.isnan(y):
        return math.isnan(x) != math.isnan(y)
    if spread:
        return abs(x - y) > 0.5 * spread
    return not math.isclose(x, y, rel_tol=0.05, abs_tol=1e-12)


def tabular_page(result, show: int) -> dict:
    if isinstance(result, list):
        result = {"results": result}
    fixed = {"query", "rank", "row", "score", "target", "reason"}
    queries = result.get("queries", {})
    by_query: dict = {}
    for r in result["results"]:
        by_query.setdefault(r["query"], []).append(r)
    sections = []
    for q, rows in by_query.items():
        info = queries.get(str(q), {})
        features = list(info.get("features") or
                        {k: None for k in rows[0] if k not in fixed})
        blocks = []
        if info.get("distribution"):
            blocks.append(_plot(plots.score_distribution(info["distribution"],
                                                         min(show, len(rows)))))
        top = rows[:show]
        head = ["feature", *(["query"] if info.get("features") else []),
                *[f"#{r['rank']} row {r['row']}" for r in top]]
        table_rows = [["score", *([""] if info.get("features") else []),
                       *[_num(r["score"]) for r in top]],
                      ["target", *([_num(info.get("target"))] if info.get("features")
                                   else []), *[_num(r.get("target")) for r in top]]]
        for f in features:
            line: list = [f]
            if info.get("features"):
                line.append(_feature(info["features"][f]))
            for r in top:
                v = r.get(f)
                differs = info.get("features") is not None and _differs(
                    v, info["features"][f], (result.get("spread") or {}).get(f))
                line.append({"v": _feature(v), "cls": "num diff" if differs else "num",
                             "title": "differs from the query" if differs else ""})
            table_rows.append(line)
        blocks.append(_table(head, table_rows, numeric=head[1:]))
        if info.get("features"):
            blocks.append(_p("highlighted: a feature that differs from the query's by more "
                             "than half its standard deviation over the training rows (a "
                             "category: any difference)", "legend"))
        reasons = [[str(r["rank"]), str(r["row"]), _num(r["score"]), r.get("reason", "")]
                   for r in rows]
        blocks.append(_table(["rank", "row", "score", "reason"], reasons,
                             numeric=("rank", "row", "score")))
        sections.append({"title": f"Query row {q}", "blocks": blocks})
    explains = result.get("explains")
    return {"title": "datablame tabular", "convention": SIGN,
            "subtitle": " · ".join(x for x in (result.get("method"), explains and
                                               f"explains {explains}") if x),
            "sections": sections}


def tabular_group_page(result: dict, show: int) -> dict:
    """The rows behind a group of query rows together: mean score, how many of the
    queries each helps or opposes, the rows' features."""
    rows = result["results"]
    n = len(result["group"])
    fixed = ("rank", "row", "score", "helps", "opposes", "strongest_query", "target")
    features = [k for k in (rows[0] if rows else {}) if k not in fixed]
    table = [[str(r["rank"]), str(r["row"]), _num(r["score"]), f"{r['helps']}/{n}",
              f"{r['opposes']}/{n}", str(r["strongest_query"]), _num(r.get("target")),
              *[_feature(r.get(f)) for f in features]] for r in rows]
    heads = ["rank", "row", "mean score", "helps", "opposes", "strongest query", "target"]
    which = "every query row" if n == result.get("n_queries") else \
        f"{n} of {result.get('n_queries')} query rows: " + ", ".join(map(str, result["group"]))
    blocks = [_kv([("query rows", which), ("method", result.get("method")),
                   ("explains", result.get("explains"))])]
    if rows:
        blocks.append(_plot(plots.score_distribution([r["score"] for r in rows],
                                                     min(show, len(rows)), "mean score")))
    blocks.append(_table([*heads, *features], table, numeric=heads[:-1]))
    return {"title": "datablame tabular (a group of queries)", "convention": SIGN,
            "subtitle": "training rows behind the query rows together",
            "sections": [{"title": "Rows behind the group", "blocks": blocks}]}


def _lds_blocks(lds: dict) -> list[dict]:
    low, high = lds["ci95"]
    blocks = [_kv([("LDS (Spearman, 1 = perfect)", f"{lds['lds']:.3f}"),
                   ("95% interval", f"{low:.3f} to {high:.3f}"),
                   ("reading", lds.get("reading")), ("random subsets", lds.get("subsets")),
                   ("scored by", lds.get("scored_by"))])]
    for q, pts in enumerate(lds.get("points", [])):
        rho = (lds.get("per_query") or [lds["lds"]])[q]
        blocks.append(_plot(plots.lds_scatter(pts["predicted"], pts["actual"], rho),
                            f"query {pts.get('query', q)}: each dot one retraining on a "
                            "random half of the rows"))
    return blocks


def verify_page(result: dict, show: int) -> dict:
    sections = [{"title": "What was checked", "blocks": [_kv([
        ("method", result.get("method")), ("training rows", result.get("n_train")),
        ("query rows", result.get("n_query"))])]}]
    if "lds" in result:
        sections.append({"title": "Linear datamodeling score", "blocks":
                         _lds_blocks(result["lds"])})
    if "remove_top_k" in result:
        r = result["remove_top_k"]
        curve = r.get("curve") or [{"k": r["k"], "top_k": r["top_k"],
                                    "random_k": r["random_k"]}]
        blocks = [_p(r.get("summary", ""), "verdict " + ("pass" if r.get("verdict") ==
                                                         "pass" else "fail"))]
        if len(curve) > 1:
            blocks.append(_plot(plots.removal_curve(curve), "bars: spread over retraining "
                                "seeds; band: the random removals' range"))
        blocks.append(_plot(plots.bars({f"top-{r['k']}": r["top_k_mean"],
                                        f"random {r['k']}": r["random_k_mean"]},
                                       f"query {r['query']} loss change",
                                       {f"top-{r['k']}": r["top_k_std"],
                                        f"random {r['k']}": r["random_k_std"]},
                                       highlight=f"top-{r['k']}")))
        sections.append({"title": f"Remove the top {r['k']} vs {r['k']} random rows",
                         "blocks": blocks})
    if "leave_one_out" in result:
        loo = result["leave_one_out"]
        rows = [[str(row), *[_num(d) for d in deltas]] for row, deltas in
                loo.get("delta", {}).items()]
        n_q = len(next(iter(loo.get("delta", {}).values()), []))
        sections.append({"title": "Leave one out", "blocks": [
            _table(["row removed", *[f"query {q} loss change" for q in range(n_q)]], rows,
                   numeric=["row removed", *[f"query {q} loss change" for q in range(n_q)]])]})
    return {"title": "datablame verify", "convention": SIGN,
            "subtitle": "scores checked against retraining", "sections": sections}


def verify_text_page(result: dict, show: int) -> dict:
    q = result.get("query", {})
    runs = {"original adapter": result["original"], **result["runs"]}
    table = [[name, ", ".join(map(str, run.get("removed", [])[:12])) +
              (" …" if len(run.get("removed", [])) > 12 else ""), _num(run["loss"]),
              "yes" if run["says"] else "no", run["generation"]]
             for name, run in runs.items()]
    blocks = [_p(result.get("summary", ""), "verdict " + ("pass" if result.get("verdict") in
                                                          ("confirmed", "pass") else "fail")),
              _kv([*_prompt_pairs(q.get("prompt")),
                   ("answer traced", q.get("answer")),
                   ("rows removed", ", ".join(map(str, result.get("removed", []))))]),
              _plot(plots.bars({n: r["loss"] for n, r in runs.items()}, "query loss after "
                               "re-fine-tuning", highlight="without-blamed")),
              _table(["run", "rows removed", "loss", "says it", "the model's answer"], table,
                     numeric=("loss",))]
    sections = [{"title": "Re-fine-tuned without the blamed rows", "blocks": blocks}]
    if "lds" in result:
        sections.append({"title": "Linear datamodeling score", "blocks":
                         _lds_blocks(result["lds"])})
    return {"title": "datablame verify (language model)", "convention": SIGN,
            "subtitle": "does the model still say it without the rows?", "sections": sections}


def _prompt_pairs(prompt) -> list[tuple[str, object]]:
    """A query's prompt for the page: its fields, or the formatted text as one."""
    if isinstance(prompt, dict):
        return [(f"prompt: {k}", _value(v)) for k, v in prompt.items()]
    return [("prompt (as the model saw it)", prompt)] if prompt else []


def spans_page(result: dict, show: int) -> dict:
    text = result["query"]
    found = result["spans"]
    covered = [False] * len(_words(text))
    for i, (_, start, end) in enumerate(_words(text)):
        covered[i] = any(s["start"] <= start and end <= s["end"] for s in found)
    grads = {str(k): v for k, v in result.get("gradient", {}).items()}

    def row_cell(r) -> str:
        g = grads.get(str(r))
        return f"{r} ({g['reading']} {g['score']:.2f})" if g else str(r)

    table = [[str(s["words"]), f"{s['surprisal']:.0f}", str(s["occurrences"]),
              ", ".join(row_cell(r) for r in s["rows"][:12]), s["text"]] for s in found]
    sections = [{"title": "The output", "blocks": [
        _kv([("output", token_view(text, covered)),
             ("copied", f"{result['copied_fraction']:.0%} of the output lies in spans of "
                        f"{result['min_words']}+ words found verbatim in the "
                        f"{result['rows']} rows")]),
        _p("marked: the spans found verbatim. A string match, not a causal claim"
           + ("; the rows' gradient reading says whether they also taught it." if grads
              else ": `trace` (or spans --model) scores the rows."), "legend")]},
        {"title": f"Spans ({len(found)}, rarest first)", "blocks": [
            _table(["words", "rarity (bits)", "times", "rows", "span"], table,
                   numeric=("words", "rarity (bits)", "times"))]}]
    content = result.get("row_fields") or {}
    if content:
        listed = [{"rank": i + 1, "row": int(r), "fields": fields,
                   **({"score": grads[str(r)]["score"], "reading": grads[str(r)]["reading"]}
                      if str(r) in grads else {})}
                  for i, (r, fields) in enumerate(content.items())]
        sections.append({"title": "Rows holding the spans", "blocks": [ranked_rows(
            listed, answer=text, answer_field=_answer_field(listed), show=show,
            block_id="spanrows")]})
    return {"title": "datablame spans", "convention": "",
            "subtitle": "verbatim copies of an output in the training rows",
            "sections": sections}


def _answer_field(listed: list[dict]) -> str | None:
    """The answer field of rows from a result that does not name it (an older file)."""
    fields = listed[0].get("fields", {}) if listed else {}
    for name in ("output", "response", "answer", "completion", "messages", "conversations"):
        if name in fields:
            return name
    return None


def _runs_plot(runs: dict, key: str, label: str, highlight: str) -> dict:
    values = {n: r[key] for n, r in runs.items() if isinstance(r, dict) and key in r}
    spread = {n: (r.get("spread") or {}).get(key, r.get(f"{key}_spread", 0.0))
              for n, r in runs.items() if isinstance(r, dict)}
    return _plot(plots.bars(values, label, spread, highlight=highlight))


def audit_labels_page(result: dict, show: int) -> dict:
    proof = result.get("proof")
    sections = [{"title": "What was audited", "blocks": [_kv([
        ("scorer", result["scorer"]), ("training rows", result.get("n_train")),
        ("suspects listed", len(result["ranked"]))])]}]
    if proof:
        sections.append({"title": "Retrained without the suspects", "blocks": [
            _p(f"verdict: {proof['verdict']}", "verdict " + ("pass" if proof["verdict"] ==
                                                              "confirmed" else "fail")),
            *([_p(f"relabelled instead of removed: {proof['relabel_verdict']}",
                  "verdict " + ("pass" if proof["relabel_verdict"] == "confirmed"
                                else "fail"))] if "relabel_verdict" in proof else []),
            _runs_plot(proof["runs"], "loss", "held-out loss", "without suspects"),
            _runs_plot(proof["runs"], "accuracy", "held-out accuracy", "without suspects")]})
    sections.append(_audit_rows(result, result["ranked"], result["scorer"],
                                "Suspected label errors", show))
    return {"title": "datablame audit labels", "convention": "",
            "subtitle": "rows whose label looks wrong", "sections": sections}


def _audit_rows(result: dict, ranked: list[dict], key: str, title: str, show: int) -> dict:
    """The listed rows, one line each: their scores, then their content where the page
    was given the training table (report --data, or --html on the audit)."""
    content = {str(k): v for k, v in (result.get("row_content") or {}).items()}
    keys = list(ranked[0]) if ranked else ["row"]
    columns = list(next(iter(content.values()), {}))
    rows = [[str(i), *[_num(r.get(k), 4) for k in keys],
             *[_feature(content.get(str(r["row"]), {}).get(c)) for c in columns]]
            for i, r in enumerate(ranked[:LISTED], start=1)]
    blocks = [_table(["rank", *keys, *columns], rows, numeric=["rank", *keys])]
    if len(ranked) > LISTED:
        blocks.append(_p(f"the first {LISTED} of {len(ranked)} rows (the JSON has them all)",
                         "legend"))
    if not content:
        blocks.append(_p("row content: datablame report RESULT.json --data TRAIN.csv",
                         "legend"))
    return {"title": title, "blocks": blocks}


def audit_prune_page(result: dict, show: int) -> dict:
    sections = [{"title": "What was pruned", "blocks": [_kv([
        ("scorer", result["scorer"]), ("fraction", f"{result['fraction']:.0%}"),
        ("training rows", result.get("n_train")), ("judged on", result.get("judged_on")),
        ("verdict", result.get("verdict"))])]},
        {"title": "Retrained without the pruned rows", "blocks": [
            _runs_plot(result["runs"], "loss", "held-out loss", "without suspects"),
            _runs_plot(result["runs"], "accuracy", "held-out accuracy", "without suspects")]},
        _audit_rows(result, result["pruned"], "value", "Pruned rows", show)]
    return {"title": "datablame audit prune", "convention": "",
            "subtitle": "dead weight in the data", "sections": sections}


def audit_fairness_page(result: dict, show: int) -> dict:
    proof = result.get("proof", {})
    runs = {k: v for k, v in proof.items() if isinstance(v, dict)}
    patterns = [[p["pattern"], str(p["rows"]), str(p["flagged"]), f"{p['share']:.0%}"]
                for p in result.get("patterns", [])]
    sections = [{"title": "What was audited", "blocks": [_kv([
        ("metric", result["metric"]), ("favourable outcome", result.get("favorable")),
        ("advantaged group", result.get("advantaged")),
        ("disadvantaged group", result.get("disadvantaged")),
        ("training rows", result.get("n_train")), ("verdict", proof.get("verdict"))])]}]
    if runs:
        sections.append({"title": "The gap before and after removal", "blocks": [
            _runs_plot(runs, "gap", f"{result['metric']} (advantaged minus disadvantaged)",
                       "without flagged"),
            _runs_plot(runs, "accuracy", "held-out accuracy", "without flagged")]})
    sections.append({"title": "Readable patterns of the flagged rows", "blocks": [
        _table(["pattern", "rows", "flagged", "share flagged"], patterns,
               numeric=("rows", "flagged", "share flagged"))]})
    sections.append(_audit_rows(result, result["ranked"], "widens_gap",
                                "Rows that widen the gap most", show))
    return {"title": "datablame audit fairness", "convention": "",
            "subtitle": "rows behind a gap between groups", "sections": sections}


def fix_text_page(result: dict, show: int) -> dict:
    """The wrong answer before and after re-fine-tuning without the rows."""
    q = result.get("query", {})
    runs = {"before (the adapter)": result["before"], "after (the fixed adapter)":
            result["after"]}
    table = [[name, _num(run["loss"]), "yes" if run["says"] else "no", run["generation"]]
             for name, run in runs.items()]
    blocks = [_p(result.get("summary", ""), "verdict " + ("pass" if result.get("verdict")
                                                          == "fixed" else "fail")),
              _kv([*_prompt_pairs(q.get("prompt")), ("the wrong answer", q.get("answer")),
                   ("rows removed", ", ".join(map(str, result.get("removed", [])))),
                   ("adapter", result.get("adapter")),
                   ("fixed adapter", result.get("fixed_adapter")),
                   ("training rows", result.get("n_train"))]),
              _table(["model", "query loss", "says it", "its answer"], table,
                     numeric=("query loss",))]
    return {"title": "datablame fix", "convention": "",
            "subtitle": "re-fine-tuned without the rows: what does the model say now?",
            "sections": [{"title": "Before and after", "blocks": blocks}]}


def fix_tabular_page(result: dict, show: int) -> dict:
    """Each query row's prediction before and after retraining without the rows, beside
    retraining on every row and without random rows."""
    classify = not result.get("regression")
    moved = [q for i, q in enumerate(result["queries"])
             if result["changed"][i] > 0 or result["changed_by_random"][i] > 0]
    truth = bool(moved) and "true" in moved[0]
    heads = ["query", *(["true"] if truth else []), "before", "after",
             *(["p(before label), before", "p(before label), after"] if classify else []),
             "moved by random rows"]
    rows = [[str(q["query"]), *([_num(q["true"])] if truth else []), _num(q["before"]),
             _num(q["after"]),
             *([_num(q["p_before_label"]["before"], 3), _num(q["p_before_label"]["after"], 3)]
               if classify else []),
             _num(result["changed_by_random"][q["query"]], 3)] for q in moved]
    blocks = [_p(result.get("summary", ""), "legend")]
    if "wrong" in result:
        blocks.append(_plot(plots.bars({k: float(v) for k, v in result["wrong"].items()},
                                       "wrong answers on the query rows",
                                       highlight="retrained without them")))
    blocks.append(_table(heads, rows, numeric=heads))
    blocks.append(_p(f"{len(result['queries']) - len(moved)} query rows moved in no run",
                     "legend"))
    return {"title": "datablame fix", "convention": "",
            "subtitle": f"predictions before and after removing {len(result['removed'])} "
                        "rows", "sections": [{"title": "Query rows that moved",
                                              "blocks": blocks}]}


PAGES: dict[str, Callable] = {
    "trace": trace_page, "traces": traces_page, "trace-group": trace_group_page,
    "tabular": tabular_page,
    "tabular-group": tabular_group_page,
    "verify": verify_page, "verify-text": verify_text_page, "spans": spans_page,
    "audit-labels": audit_labels_page, "audit-prune": audit_prune_page,
    "audit-fairness": audit_fairness_page, "fix-text": fix_text_page,
    "fix-tabular": fix_tabular_page,
}


def build(kind: str, result, *, show: int = 10) -> dict:
    page = PAGES[kind](result, show)
    page.setdefault("convention", "")
    return page
