"""What made a bench result: the commit (and whether src/ or bench/ had uncommitted
changes), the command, and the versions of the libraries that computed it. Every bench
writes this into its JSON, so a committed number says where it came from."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

MODULES = ("datablame", "numpy", "torch", "transformers", "peft", "sentence_transformers",
           "faiss", "sklearn", "lightgbm", "xgboost", "catboost", "shap", "dattri")


def versions(modules: tuple[str, ...] = MODULES) -> dict:
    out = {"python": platform.python_version()}
    for mod in modules:
        if mod not in sys.modules:
            continue  # only what this bench imported
        out[mod] = getattr(sys.modules[mod], "__version__", "unknown")
    return out


def provenance() -> dict:
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True,
                              text=True).stdout.strip()

    return {"commit": git("rev-parse", "HEAD"),
            "dirty": bool(git("status", "--porcelain", "--", "src", "bench",
                              ":!bench/results")),
            "command": " ".join([Path(sys.executable).name] + sys.argv),
            "versions": versions()}


def with_provenance(result) -> dict:
    """`result` (a dict, or a list of rows) with the provenance alongside."""
    body = result if isinstance(result, dict) else {"rows": result}
    return {"provenance": provenance(), **body}
