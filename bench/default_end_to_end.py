"""The trace default end to end on every cached text_lds.py model: `index --gradients`
(a store of both vectors, the default since stop 33, and the plain store it replaced) +
`trace --all-rows` for each query, scored by LDS against the cached retrainings. Table +
JSON; nothing is retrained.

    .venv/bin/python bench/default_end_to_end.py [--out bench/results/default_end_to_end.json]

Reads the workdirs bench/text_lds.py leaves (base, adapter, retrieval index and the
retraining losses of each protocol bench/text_fusion.py lists) and builds the stores it
lacks there. bergson's best post-hoc method on the same model and retrainings is shown
from bench/results/bergson_side_by_side*.json where it was run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from provenance import with_provenance  # noqa: E402
from text_fusion import CACHE, EIGHTY, PROTOCOLS, TEN, load  # noqa: E402
from text_lds import end_to_end, make_rows, planted  # noqa: E402

from datablame.verify import lds  # noqa: E402

BERGSON = {(1, TEN): "bergson_side_by_side.json", (2, TEN): "bergson_side_by_side-seed2.json",
           (3, TEN): "bergson_side_by_side-seed3.json",
           (4, TEN): "bergson_side_by_side-seed4.json",
           (5, TEN): "bergson_side_by_side-seed5.json",
           (6, TEN): "bergson_side_by_side-seed6.json",
           (1, EIGHTY): "bergson_side_by_side-80ep.json",
           (2, EIGHTY): "bergson_side_by_side-seed2-80ep.json"}
STORES = (("both vectors (default)", "both", "-both"), ("plain (default before)", "none", ""))


def bergson_best(seed: int, tag: str) -> tuple[str, float] | None:
    name = BERGSON.get((seed, tag))
    path = ROOT / "bench" / "results" / (name or "")
    if not name or not path.exists():
        return None
    rows = [r for r in json.loads(path.read_text())["table"]
            if r["method"].startswith("bergson")]
    best = max(rows, key=lambda r: r["lds"])
    return best["method"], best["lds"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/default_end_to_end.json")
    args = ap.parse_args()
    keys: dict[tuple[int, str], dict] = {}
    table = []
    for name, seed, tag, fraction, same, use in PROTOCOLS:
        loaded = load(seed, tag, fraction, same)
        root = CACHE / f"text-lds-s{seed}"
        if loaded is None or not (root / f"adapter-{tag}").exists():
            print(f"skipped (not built): {name}")
            continue
        _, subsets = loaded
        queries = make_rows(seed)[1]
        if (seed, tag) not in keys:
            keys[(seed, tag)] = {label: end_to_end(root, tag, root / f"index-{tag}{suffix}",
                                                   curvature, queries)[0]
                                 for label, curvature, suffix in STORES}
        row = {"protocol": name, "use": use}
        for label, key in keys[(seed, tag)].items():
            result = lds(key, subsets)
            row[label] = {"lds": result["lds"], "ci95": result["ci95"],
                          "top1": planted(key, queries)["top1"]}
        best = bergson_best(seed, tag) if fraction == 0.5 and not same else None
        row["bergson best"] = {"method": best[0], "lds": best[1]} if best else None
        table.append(row)
        print(f"{name:52s} {use:9s} " + "  ".join(
            f"{label.split(' (')[0]} {row[label]['lds']:.3f} [{row[label]['ci95'][0]:.2f}, "
            f"{row[label]['ci95'][1]:.2f}] top1 {row[label]['top1']:.2f}"
            for label, _, _ in STORES)
            + (f"  | {best[0]} {best[1]:.3f}" if best else ""), flush=True)
    Path(args.out).write_text(json.dumps(with_provenance({"table": table}), indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
