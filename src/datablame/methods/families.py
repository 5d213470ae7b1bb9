"""Which scoring methods fit which model family: the one place that says so.

Kept free of heavy imports (no torch, no method classes) so the CLI can print it in
`--help` and check `--method` before loading anything. `registry.check_fits` reads it
before a method is fitted, in the CLI and in the Python API alike.
"""

from __future__ import annotations

FAMILY_METHODS: dict[str, list[str]] = {
    "torch": ["if-exact", "if-cg", "if-lissa", "if-arnoldi", "grad-dot", "grad-cos", "trak",
              "tracin", "datainf", "trackstar", "simplex", "knn-shapley"],
    "boosted-trees": ["leaf-share", "boostin", "leaf-influence", "leaf-sim", "simplex",
                      "knn-shapley", "shap-neighbors"],
    "forest": ["knn-shapley", "leaf-sim", "simplex", "shap-neighbors"],
    "linear": ["linear-exact", "knn-shapley", "shap-neighbors"],
    # Hugging Face causal LMs (with or without LoRA): methods on exact per-row gradients of
    # the selected parameters (`datablame trace --method`); grad is the text default.
    "causal-lm": ["grad-dot", "grad-cos", "datainf", "ekfac", "trak", "tracin", "trackstar"],
}
TABULAR_FAMILIES = ("torch", "boosted-trees", "forest", "linear")

# How a family is named in messages ("does not fit a boosted-tree model") and in --help.
FAMILY_NOUNS = {"torch": "torch", "boosted-trees": "boosted-tree", "forest": "random-forest",
                "linear": "scikit-learn linear", "causal-lm": "causal language"}
FAMILY_LABELS = {"torch": "torch", "boosted-trees": "boosted trees", "forest": "forests",
                 "linear": "linear", "causal-lm": "language models"}


def methods_help(families: tuple[str, ...] = TABULAR_FAMILIES) -> str:
    """'torch: if-exact, ...; boosted trees: leaf-share, ...' for the CLI's --help."""
    return "; ".join(f"{FAMILY_LABELS[f]}: {', '.join(FAMILY_METHODS[f])}" for f in families)
