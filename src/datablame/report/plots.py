"""The report's plots: matplotlib figures as inline SVG (text kept as text, so they stay
small and searchable; bench/report_plots.py compares this with PNG and plotly)."""

from __future__ import annotations

import hashlib
import io
import re

import numpy as np

HIGHLIGHT = "#d9480f"
MUTED = "#868e96"
GOOD = "#2b8a3e"


def _figure(width: float = 6.4, height: float = 2.6):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    plt.rcParams.update({"text.parse_math": False,  # a "$" in a run's name is text
                         "svg.fonttype": "none", "font.size": 9, "axes.spines.top": False,
                         "axes.spines.right": False, "svg.hashsalt": "datablame"})
    return plt.subplots(figsize=(width, height), layout="constrained")


def _svg(fig, title: str) -> str:
    """The figure as an <svg> element with an accessible title (no XML prolog, no fixed
    ids that collide when several plots share a page)."""
    import matplotlib.pyplot as plt

    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", metadata={"Date": None, "Creator": None})
    plt.close(fig)
    text = buffer.getvalue()
    text = text[text.index("<svg"):]
    text = re.sub(r"<metadata>.*?</metadata>", "", text, flags=re.S)
    # ids unique per plot (several share a page) yet the same on every run
    prefix = "p" + hashlib.sha1(text.encode()).hexdigest()[:8]
    text = re.sub(r'id="([^"]+)"', lambda m: f'id="{prefix}{m.group(1)}"', text)
    text = re.sub(r"#([A-Za-z_][\w.-]*)\)", lambda m: f"#{prefix}{m.group(1)})", text)
    text = re.sub(r'href="#([^"]+)"', lambda m: f'href="#{prefix}{m.group(1)}"', text)
    from html import escape

    return text.replace(">", f' role="img" aria-label="{escape(title)}"><title>'
                        f"{escape(title)}</title>", 1)


def score_distribution(scores: list[float], shown: int, label: str = "score") -> str:
    """Every listed row's score by rank, the shown rows marked: is rank 1 far ahead, or one
    of fifty near-ties?"""
    y = np.asarray(scores, dtype=float)
    x = np.arange(1, len(y) + 1)
    fig, ax = _figure()
    ax.axhline(0.0, color=MUTED, lw=0.6)
    ax.plot(x, y, color=MUTED, lw=0.8, zorder=1)
    ax.scatter(x[shown:], y[shown:], s=10, color=MUTED, zorder=2, label="listed")
    ax.scatter(x[:shown], y[:shown], s=22, color=HIGHLIGHT, zorder=3, label="shown")
    ax.set_xlabel("rank")
    ax.set_ylabel(label)
    ax.legend(frameon=False, loc="upper right")
    return _svg(fig, f"{label} of the {len(y)} listed rows by rank; the {shown} shown in "
                     "orange")


def removal_curve(curve: list[dict]) -> str:
    """Query-loss change after removing the top-k rows vs k random rows, each k; the band
    is the random removals' spread (min to max), the bars the top-k's."""
    ks = np.array([c["k"] for c in curve])
    top = [np.asarray(c["top_k"], dtype=float) for c in curve]
    rand = [np.asarray(c["random_k"], dtype=float) for c in curve]
    fig, ax = _figure()
    ax.axhline(0.0, color=MUTED, lw=0.6)
    ax.fill_between(ks, [r.min() for r in rand], [r.max() for r in rand], color=MUTED,
                    alpha=0.25, lw=0)
    ax.plot(ks, [r.mean() for r in rand], "o-", color=MUTED, label="random k rows")
    ax.errorbar(ks, [t.mean() for t in top], yerr=[t.std() for t in top], fmt="o-",
                color=HIGHLIGHT, label="top-k rows", capsize=3)
    ax.set_xlabel("rows removed (k)")
    ax.set_ylabel("query loss change")
    ax.legend(frameon=False)
    return _svg(fig, "query loss change after removing the top-k rows vs k random rows")


def lds_scatter(predicted: list[float], actual: list[float], rho: float) -> str:
    """Each retraining on a random subset: the loss the scores predict vs the real one."""
    fig, ax = _figure(4.2, 3.2)
    ax.scatter(predicted, actual, s=14, color=HIGHLIGHT, alpha=0.8)
    ax.set_xlabel("predicted (minus the kept rows' summed scores)")
    ax.set_ylabel("query loss after retraining")
    ax.set_title(f"Spearman {rho:.2f}", fontsize=9)
    return _svg(fig, f"LDS scatter: predicted vs actual query loss, Spearman {rho:.2f}")


def bars(values: dict[str, float], label: str, spread: dict[str, float] | None = None,
         highlight: str | None = None) -> str:
    """One number per run (loss, gap, accuracy) side by side: before vs after removal."""
    names = list(values)
    fig, ax = _figure(5.2, 0.5 + 0.42 * len(names))
    colors = [HIGHLIGHT if n == highlight else GOOD if i == 0 else MUTED
              for i, n in enumerate(names)]
    err = [(spread or {}).get(n, 0.0) for n in names]
    ax.barh(names, [values[n] for n in names], xerr=err, color=colors, capsize=3)
    ax.invert_yaxis()
    ax.axvline(0.0, color=MUTED, lw=0.6)
    ax.set_xlabel(label)
    for i, n in enumerate(names):
        ax.annotate(f"{values[n]:.3g}", (values[n], i), xytext=(4, 0),
                    textcoords="offset points", va="center", fontsize=8)
    return _svg(fig, f"{label} for each run: " + ", ".join(names))
