"""The HTML report and `serve`, checked in a real browser: Debian's headless Chromium
driven by Playwright (never a downloaded browser). Rows, scores and highlights must be on
the page, no request may leave the file, a screenshot must not be blank, and untrusted
row content must come out as text."""

from __future__ import annotations

import io
import json
import os
import shutil
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from datablame.demo.demo import CULPRIT
from tests.test_cli import _assert_one_line_error, run_cli

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
HOSTILE = {
    "instruction": "<script>alert('row')</script> & <b>bold</b>",
    "input": "<img src=x onerror=alert(1)> مرحبا بالعالم ‮evil‬",
    "output": "x" * 5000 + " <iframe src='https://example.com'></iframe>",
}


@pytest.fixture(scope="session")
def browser():
    """Headless Chromium, or a skip (a failure where CI asks for the browser: .ci/run
    installs it and sets DATABLAME_REQUIRE_BROWSER=1, so these tests cannot silently
    vanish there)."""
    required = os.environ.get("DATABLAME_REQUIRE_BROWSER") == "1"
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if sync_playwright is None or not Path(CHROMIUM).exists():
        message = "needs playwright and Debian's chromium (apt-get install chromium)"
        if required:
            pytest.fail(message)
        pytest.skip(message)
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield chromium
        chromium.close()


def open_page(browser, url: str):
    """A tab on `url`, with every request it makes and every dialog it opens recorded."""
    tab = browser.new_page(viewport={"width": 1200, "height": 900})
    tab.requests, tab.dialogs = [], []
    tab.on("request", lambda r: tab.requests.append(r.url))
    tab.on("dialog", lambda d: (tab.dialogs.append(d.message), d.dismiss()))
    tab.goto(url)
    return tab


def assert_not_blank(tab) -> None:
    from PIL import Image

    image = Image.open(io.BytesIO(tab.screenshot(full_page=False))).convert("RGB")
    pixels = np.asarray(image).reshape(-1, 3)
    inked = (pixels.min(axis=1) < 200).mean()
    assert inked > 0.02, f"screenshot nearly blank ({inked:.1%} inked)"
    assert len(np.unique(pixels, axis=0)) > 20


def trace_record(rows: list[dict], answer: str) -> dict:
    """A trace result as `trace --out` writes it (what `report` reads)."""
    return {"query": answer, "prompt": {"instruction": "say it"}, "focus": None,
            "method": "grad-cosine", "response_field": "output",
            "results": [{"rank": i + 1, "row": i, "score": 0.9 - 0.1 * i,
                         "reading": "strong" if i == 0 else "unrelated", "fields": r}
                        for i, r in enumerate(rows)]}


@pytest.mark.slow
def test_trace_report_shows_the_culprit_first_with_its_copied_words(demo_assets, tmp_path,
                                                                     monkeypatch, capsys,
                                                                     browser):
    root, info = demo_assets
    html, saved = tmp_path / "trace.html", tmp_path / "trace.json"
    code, printed, err = run_cli(monkeypatch, capsys, "trace", root / "index", "--model",
                                 root / "base", "--adapter", root / "adapter", "--query",
                                 CULPRIT["output"], "--field",
                                 f"instruction={CULPRIT['instruction']}", "--field",
                                 f"input={CULPRIT['input']}", "--show", "5", "--html", html,
                                 "--out", saved, "--token-scores", "--json")
    assert code in (0, None), err
    record = json.loads(saved.read_text())
    assert json.loads(printed) == record  # what --json prints: token scores included
    shares = record["token_scores"]["answer"]["shares"]
    # per-word shares of a row's score add up to that score (the loss is a mean over
    # tokens, the alignment linear in each token's gradient), both ways round
    for r in record["results"][:5]:
        assert sum(shares[str(r["row"])]) == pytest.approx(r["score"], abs=1e-5)
        own = record["token_scores"]["rows"][str(r["row"])]["shares"]
        assert sum(own) == pytest.approx(r["score"], abs=1e-5)

    tab = open_page(browser, html.as_uri())
    assert tab.requests == [html.as_uri()]  # nothing else was fetched
    rows = tab.locator("#rows0 > details.row")
    assert rows.count() == len(record["results"])
    first = rows.nth(0)
    assert first.get_attribute("data-row") == str(info["culprit_row"])
    assert first.locator(".score").inner_text() == f"{record['results'][0]['score']:.4f}"
    assert first.get_attribute("open") is not None  # the top rows are unfolded
    # the culprit's answer is marked verbatim and shaded by its share of the score
    marked = first.locator("mark").all_inner_texts()
    assert "Andromeda" in marked and len(marked) >= 10
    assert first.locator(".tok.pos").count() >= 10
    assert tab.locator("figure.plot svg").count() == 1
    assert "Sign convention" in tab.locator(".convention").inner_text()
    # the filter box hides rows that do not hold the words typed
    tab.fill("input[data-filter=rows0]", "Andromeda")
    assert tab.locator("#rows0 > details.row:visible").count() < rows.count()
    assert_not_blank(tab)
    tab.close()

    # `datablame report` makes the same page from the saved JSON
    again = tmp_path / "again.html"
    code, out, err = run_cli(monkeypatch, capsys, "report", saved, "--out", again,
                             "--show", "5")
    assert code in (0, None), err
    assert again.read_text().split("<footer>")[0] == html.read_text().split("<footer>")[0]


def test_untrusted_row_content_is_shown_as_text(tmp_path, browser, monkeypatch, capsys):
    saved = tmp_path / "hostile.json"
    saved.write_text(json.dumps(trace_record([HOSTILE, {"output": "plain row"}],
                                             "<script>alert('answer')</script>")))
    page = tmp_path / "hostile.html"
    code, _, err = run_cli(monkeypatch, capsys, "report", saved, "--out", page)
    assert code in (0, None), err
    text = page.read_text()
    assert "<script>alert" not in text and "<img src=x" not in text and "<iframe" not in text
    tab = open_page(browser, page.as_uri())
    tab.wait_for_timeout(200)
    assert tab.dialogs == [] and tab.requests == [page.as_uri()]
    body = tab.locator("body").inner_text()
    assert "<script>alert('row')</script> & <b>bold</b>" in body
    assert "<img src=x onerror=alert(1)>" in body
    assert tab.locator("b, img, iframe").count() == 0
    # right-to-left text keeps its own direction; a 5000-character field is folded
    assert tab.locator("[dir=auto]", has_text="مرحبا").count() >= 1
    folded = tab.locator("details.row[data-row='0'] .field details")
    assert folded.count() == 1
    assert f"{len(HOSTILE['output'])} characters" in folded.locator("summary").inner_text()
    tab.close()


def test_report_refuses_what_it_cannot_use_and_overwrites_only_its_own(tmp_path, monkeypatch,
                                                                      capsys):
    saved = tmp_path / "t.json"
    saved.write_text(json.dumps(trace_record([{"output": "a row"}], "a row")))
    other = tmp_path / "notes.json"
    other.write_text(json.dumps({"hello": 1}))
    code, _, err = run_cli(monkeypatch, capsys, "report", other)
    _assert_one_line_error(code, err, "not a datablame result")
    code, _, err = run_cli(monkeypatch, capsys, "report", saved, "--out", saved)
    _assert_one_line_error(code, err, "")
    mine = tmp_path / "mine.html"
    mine.write_text("<html>the user's own page</html>")
    code, _, err = run_cli(monkeypatch, capsys, "report", saved, "--out", mine)
    _assert_one_line_error(code, err, str(mine))
    assert mine.read_text() == "<html>the user's own page</html>"  # untouched
    code, _, err = run_cli(monkeypatch, capsys, "report", saved, "--data", saved)
    _assert_one_line_error(code, err, "--data shows an audit's rows")
    ours = tmp_path / "ours.html"
    for _ in range(2):  # a page of ours is replaced
        code, _, err = run_cli(monkeypatch, capsys, "report", saved, "--out", ours)
        assert code in (0, None), err


@pytest.fixture(scope="module")
def loans(tmp_path_factory):
    """A loan table with a string category and blanks, and a LightGBM model on it."""
    import lightgbm as lgb

    root = tmp_path_factory.mktemp("loans")
    rng = np.random.default_rng(0)
    n = 240
    frame = pd.DataFrame({"income": rng.normal(50, 15, n).round(1),
                          "region": rng.choice(["north", "south", "<b>east</b>"], n),
                          "debt": rng.normal(10, 4, n).round(1)})
    frame.loc[rng.choice(n, 12, replace=False), "income"] = np.nan
    approved = ((frame["income"].fillna(50) - 2 * frame["debt"]) > 28).astype(int)
    frame["approved"] = approved
    frame[:200].to_csv(root / "train.csv", index=False)
    frame[200:].to_csv(root / "eval.csv", index=False)
    frame[200:203].to_csv(root / "query.csv", index=False)
    x = frame[:200].drop(columns="approved").astype({"region": "category"})
    model = lgb.LGBMClassifier(n_estimators=30, num_leaves=8, min_child_samples=5,
                               verbose=-1).fit(x, approved[:200])
    model.booster_.save_model(str(root / "model.txt"))
    return root


@pytest.mark.slow
def test_tabular_verify_and_audit_reports_in_a_browser(loans, tmp_path, browser, monkeypatch,
                                                        capsys):
    t = loans
    pages = {}
    for name, args in (
            ("tabular", ["tabular", t / "train.csv", "--target", "approved", "--model",
                         t / "model.txt", "--query", t / "query.csv", "--top-k", "5"]),
            ("verify", ["verify", t / "train.csv", "--target", "approved", "--model",
                        t / "model.txt", "--query", t / "query.csv", "--lds-subsets", "8",
                        "--remove-top-k", "8", "--out", tmp_path / "verify.json"]),
            ("labels", ["audit", "labels", t / "train.csv", "--target", "approved",
                        "--model", t / "model.txt", "--eval", t / "eval.csv",
                        "--top-k", "10"]),
            ("fairness", ["audit", "fairness", t / "train.csv", "--target", "approved",
                          "--model", t / "model.txt", "--eval", t / "eval.csv", "--group",
                          "region"]),
            ("prune", ["audit", "prune", t / "train.csv", "--target", "approved", "--model",
                       t / "model.txt", "--eval", t / "eval.csv"])):
        pages[name] = tmp_path / f"{name}.html"
        code, _, err = run_cli(monkeypatch, capsys, *args, "--html", pages[name])
        assert code in (0, None), f"{name}: {err}"

    tab = open_page(browser, pages["tabular"].as_uri())
    assert tab.requests == [pages["tabular"].as_uri()]
    assert tab.locator("h2", has_text="Query row 0").count() == 1
    # every feature of the top rows beside the query's, differences marked
    table = tab.locator("section", has_text="Query row 0").locator("table").first
    assert table.locator("th", has_text="query").count() == 1
    assert table.locator("td", has_text="region").count() == 1
    assert table.locator("td.diff").count() >= 1
    assert "<b>east</b>" in tab.locator("body").inner_text()  # a category shown as text
    assert tab.locator("b").count() == 0
    assert_not_blank(tab)
    tab.close()

    tab = open_page(browser, pages["verify"].as_uri())
    assert tab.requests == [pages["verify"].as_uri()]
    assert tab.locator("h2", has_text="Linear datamodeling score").count() == 1
    assert tab.locator("h2", has_text="Remove the top 8").count() == 1
    # LDS scatter per query, the remove-top-k curve over k, the bars: real plots
    assert tab.locator("figure.plot svg").count() >= 3
    assert tab.locator("svg[aria-label*='top-k rows vs k random']").count() == 1
    tab.close()

    tab = open_page(browser, pages["labels"].as_uri())
    assert tab.requests == [pages["labels"].as_uri()]
    suspects = tab.locator("section", has_text="Suspected label errors").locator("tbody tr")
    assert suspects.count() == 10
    # the rows' content from the training table, next to their scores
    assert tab.locator("th", has_text="income").count() == 1
    tab.close()

    tab = open_page(browser, pages["fairness"].as_uri())
    assert tab.requests == [pages["fairness"].as_uri()]
    # the gap and accuracy before / after removal, and the patterns found
    gap = tab.locator("section", has_text="The gap before and after removal")
    assert gap.locator("svg").count() == 2
    assert "without flagged" in gap.inner_text()
    patterns = tab.locator("section", has_text="Readable patterns").locator("tbody tr")
    assert patterns.count() >= 1
    assert any(op in patterns.first.inner_text() for op in ("<=", ">", "="))
    assert tab.locator("section", has_text="Rows that widen").locator("tbody tr").count() == 20
    tab.close()

    tab = open_page(browser, pages["prune"].as_uri())
    pruned = tab.locator("section", has_text="Pruned rows").locator("tbody tr")
    assert pruned.count() == 20  # 10% of 200
    assert tab.locator("section", has_text="Retrained without").locator("svg").count() == 2
    tab.close()


# ---------------------------------------------------------------- serve


@pytest.fixture(scope="module")
def served(demo_assets, tmp_path_factory):
    """`serve` on the demo index and model, in this process, on a free loopback port."""
    from datablame.data.queries import read_queries
    from datablame.report.server import TraceSession, make_server
    from datablame.text import Tracer

    root, info = demo_assets
    queries = tmp_path_factory.mktemp("serve") / "q.jsonl"
    queries.write_text(json.dumps({"id": "copy", **CULPRIT}) + "\n"
                       + json.dumps({"instruction": CULPRIT["instruction"],
                                     "input": CULPRIT["input"]}) + "\n")
    tracer = Tracer(root / "index", root / "base", root / "adapter")
    session = TraceSession(tracer, methods=["grad", "datainf"],
                           queries=read_queries(queries, tracer.template, generate=None),
                           show=5)
    server = make_server(session)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", info
    server.shutdown()
    server.server_close()


def fetch(url: str, host: str | None = None, headers: dict | None = None,
          data: bytes | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, data=data, headers={
        **({"Host": host} if host else {}), **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.mark.slow
def test_serve_traces_a_typed_output_and_shows_the_culprit_first(served, browser):
    url, info = served
    tab = open_page(browser, url + "/")
    tab.fill("textarea[name='field.instruction']", CULPRIT["instruction"])
    tab.fill("textarea[name='field.input']", CULPRIT["input"])
    tab.fill("textarea[name=answer]", CULPRIT["output"])
    tab.click("#trace")
    tab.wait_for_selector("details.row")
    first = tab.locator("details.row").first
    assert first.get_attribute("data-row") == str(info["culprit_row"])
    assert first.locator("mark").count() >= 1
    # flip the method: the same output, scored by DataInf, the culprit still first
    tab.select_option("#method", "datainf")
    tab.click("#trace")
    tab.wait_for_selector("details.row")
    assert "datainf" in tab.locator(".sub").inner_text().lower()
    assert tab.locator("details.row").first.get_attribute("data-row") == \
        str(info["culprit_row"])
    # the page downloads as a self-contained report
    with tab.expect_download() as download:
        tab.click("#download")
    saved = Path(download.value.path()).read_text()
    assert '<meta name="generator" content="datablame' in saved and "<form" not in saved
    assert f'data-row="{info["culprit_row"]}"' in saved
    # pick the queries file's second line: the model's own answer to the culprit's prompt
    tab.select_option("#pick", "1")
    tab.wait_for_selector("details.row")
    assert tab.locator("input[name=generate]").is_checked()
    assert tab.locator("details.row").first.get_attribute("data-row") == \
        str(info["culprit_row"])
    assert all(r.startswith(url) for r in tab.requests)  # nothing beyond the server
    tab.close()


@pytest.mark.slow
def test_serve_reads_no_path_and_answers_only_its_own_host(served):
    url, _ = served
    for path in ("/../../etc/passwd", "/download/../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd",
                 "/index/manifest.json", "/download/r999.html", "/static/page.html"):
        status, body = fetch(url + path)
        assert status == 404 and "root:" not in body, path
    status, _ = fetch(url + "/", host="attacker.example:80")
    assert status == 403  # DNS rebinding: another site's name for this address
    status, body = fetch(url + "/api/trace?answer=")
    assert status == 400 and "give the output to trace" in json.loads(body)["error"]
    status, body = fetch(url + "/api/trace?pick=7")
    assert status == 400 and "no query number" in body
    # another site's page cannot make it trace (an <img> or a form pointing here)
    for headers in ({"Sec-Fetch-Site": "cross-site"}, {"Origin": "http://evil.example"}):
        status, body = fetch(url + "/trace?answer=x", headers=headers)
        assert status == 403 and "other sites" in body, headers
    status, _ = fetch(url + "/api/trace?pick=0", headers={"Sec-Fetch-Site": "same-origin",
                                                          "Origin": url})
    assert status == 200
    # malformed requests get an answer, not a dropped connection
    status, _ = fetch(url + "/api/trace?" + "&".join(f"f{i}=1" for i in range(300)))
    assert status == 400
    status, _ = fetch(url + "/api/trace", data=b"answer=x",
                      headers={"Content-Length": "abc"})
    assert status == 400


def test_serve_binds_loopback_unless_told(tmp_path, monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, "serve", tmp_path, "--model", tmp_path,
                           "--host", "0.0.0.0")
    _assert_one_line_error(code, err, "--allow-remote")
