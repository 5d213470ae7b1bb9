"""Which plotting library draws the HTML report's plots (issue 14): the report must stay
small and open fast, offline. Prints a table, writes JSON.

    .venv/bin/python bench/report_plots.py [--out bench/results/report_plots.json]

The same three plots a verification page carries (a 50-row score distribution, a
remove-top-k curve, a 50-point LDS scatter) are drawn by each candidate and put on one
self-contained page each:

- matplotlib as inline SVG (text kept as text),
- matplotlib as inline PNG (base64, 100 dpi),
- plotly with plotly.js inlined (the page must not load anything from a CDN).

Measured: bytes of the page, seconds to draw the plots in Python, and milliseconds until
headless Chromium (Debian's, driven by Playwright) has fired `load` on the page, median of
5 loads. Ratios hold across machines; absolute times do not.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from provenance import with_provenance

RNG = np.random.default_rng(0)
SCORES = np.sort(RNG.standard_normal(50))[::-1] * 0.1
CURVE = [{"k": k, "top_k": list(RNG.normal(0.3 * k, 0.05, 3)),
          "random_k": list(RNG.normal(0.01 * k, 0.02, 3))} for k in (1, 2, 5, 10)]
PREDICTED = RNG.standard_normal(50)
ACTUAL = PREDICTED * 0.7 + RNG.standard_normal(50) * 0.5


def matplotlib_svg() -> list[str]:
    from datablame.report import plots

    return [plots.score_distribution(list(SCORES), 10), plots.removal_curve(CURVE),
            plots.lds_scatter(list(PREDICTED), list(ACTUAL), 0.7)]


def matplotlib_png() -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    for draw in ("dist", "curve", "lds"):
        fig, ax = plt.subplots(figsize=(6.4, 2.6), layout="constrained")
        if draw == "dist":
            ax.scatter(np.arange(1, 51), SCORES, s=12)
        elif draw == "curve":
            ax.errorbar([c["k"] for c in CURVE], [np.mean(c["top_k"]) for c in CURVE],
                        yerr=[np.std(c["top_k"]) for c in CURVE], fmt="o-")
            ax.plot([c["k"] for c in CURVE], [np.mean(c["random_k"]) for c in CURVE], "o-")
        else:
            ax.scatter(PREDICTED, ACTUAL, s=12)
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100)
        plt.close(fig)
        out.append('<img alt="plot" src="data:image/png;base64,'
                   + base64.b64encode(buffer.getvalue()).decode() + '">')
    return out


def plotly_inline() -> list[str]:
    import plotly.graph_objects as go
    import plotly.io as pio

    figs = [go.Figure(go.Scatter(x=list(range(1, 51)), y=list(SCORES), mode="markers")),
            go.Figure(go.Scatter(x=[c["k"] for c in CURVE],
                                 y=[float(np.mean(c["top_k"])) for c in CURVE],
                                 error_y={"array": [float(np.std(c["top_k"])) for c in CURVE]})),
            go.Figure(go.Scatter(x=list(PREDICTED), y=list(ACTUAL), mode="markers"))]
    # plotly.js once on the page (inline, no CDN), then each figure's div
    return [pio.to_html(f, full_html=False, include_plotlyjs="inline" if i == 0 else False)
            for i, f in enumerate(figs)]


CANDIDATES = {"matplotlib-svg": matplotlib_svg, "matplotlib-png": matplotlib_png,
              "plotly-inline": plotly_inline}


def page(parts: list[str]) -> str:
    return ("<!doctype html><html><head><meta charset='utf-8'><title>plots</title></head>"
            "<body>" + "".join(f"<figure>{p}</figure>" for p in parts) + "</body></html>")


def load_ms(path: Path, loads: int = 5) -> float:
    from playwright.sync_api import sync_playwright

    times = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium",
                                     args=["--no-sandbox", "--disable-gpu",
                                           "--disable-background-networking"])
        for _ in range(loads):
            tab = browser.new_page()
            start = time.perf_counter()
            tab.goto(path.as_uri(), wait_until="load")
            tab.evaluate("() => new Promise(r => requestAnimationFrame(() => r()))")
            times.append((time.perf_counter() - start) * 1000)
            tab.close()
        browser.close()
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench/results/report_plots.json")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, draw in CANDIDATES.items():
            draw()  # imports and font caches warm
            start = time.perf_counter()
            parts = draw()
            seconds = time.perf_counter() - start
            path = Path(tmp) / f"{name}.html"
            path.write_text(page(parts), encoding="utf-8")
            rows.append({"library": name, "page_kb": round(path.stat().st_size / 1024, 1),
                         "draw_s": round(seconds, 3), "load_ms": round(load_ms(path), 1)})
    base = rows[0]
    print(f"{'library':<16} {'page KB':>9} {'x svg':>6} {'draw s':>7} {'load ms':>8} "
          f"{'x svg':>6}")
    for r in rows:
        print(f"{r['library']:<16} {r['page_kb']:>9} {r['page_kb'] / base['page_kb']:>6.1f} "
              f"{r['draw_s']:>7} {r['load_ms']:>8} {r['load_ms'] / base['load_ms']:>6.1f}")
    Path(args.out).write_text(json.dumps(with_provenance({"rows": rows}), indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
