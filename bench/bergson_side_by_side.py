"""EleutherAI's bergson on the *same* fine-tuned model, rows, queries and retrained halves
as bench/text_lds.py, for a side-by-side LDS (and top1 on the planted sources).

bergson is a bench-only dependency in its own venv (it pins transformers/torch of its
own; its torchvision/torchaudio wheels do not match a CPU torch, and it never imports
them, so they are removed):

    python3 -m venv /tmp/bergson-venv
    /tmp/bergson-venv/bin/pip install torch==2.13.0
    echo torch==2.13.0 > /tmp/c.txt && /tmp/bergson-venv/bin/pip install -c /tmp/c.txt bergson
    /tmp/bergson-venv/bin/pip uninstall -y torchvision torchaudio
    cd bench && ../.venv/bin/python bergson_side_by_side.py --seed 1 --epochs 10 \
        --workdir ../.datablame-cache/text-lds-s1 --out results/bergson_side_by_side.json

The workdir must already hold text_lds.py's base, adapter and complete retraining cache
for the recipe (nothing is retrained here: the retrain function raises). Rows and queries
are tokenized by datablame (the same ids and response-only labels as its own methods) and
handed to bergson as a pre-tokenized JSONL; bergson loads the base + LoRA adapter itself
and runs its CLI pipelines (`bergson build/score/trackstar/ekfac/trak`, see METHODS for
the flags: the settings of bergson's own LDS comparison, examples/compare_wikitext, and
otherwise the CLI's defaults; token_batch_size is the tiny model's 96 positions). Each
pipeline is timed end to end (its process start-up and model loads included). Each
method's (n_rows, n_queries) score store is read back with bergson's `load_scores` in
bergson's venv, saved as .npy, and scored here with datablame.verify.lds.
Bergson's scores are "higher = proponent" (removing the row raises the query's loss),
datablame's convention; the planted sources' top1 checks it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import text_lds
from provenance import with_provenance

# name -> (bergson subcommand, its extra CLI flags). "{q}" is the query JSONL, "{qindex}"
# the query gradient index that `bergson build` writes for `score`, "{adam}" the
# fine-tune's Adam second moments as an optimizer.pt (export()). TrackStar and EK-FAC
# follow bergson's examples/compare_wikitext/{trackstar,ekfac}.yaml (its LDS comparison):
# projection_dim 32 + unit_normalize for TrackStar; kfac + ev_correction, damping 0.1,
# one score column per query for EK-FAC. Everything else is the CLI's default.
TRACKSTAR = ["--query.dataset", "{q}", "--projection_dim", "32", "--unit_normalize", "true"]
METHODS = {
    "bergson grad-dot": ("score", ["--query_path", "{qindex}"]),
    "bergson grad-cos": ("score", ["--query_path", "{qindex}", "--unit_normalize", "true"]),
    "bergson trackstar": ("trackstar", TRACKSTAR),
    "bergson trackstar (no mix)": ("trackstar", [*TRACKSTAR, "--mix_hessians", "false"]),
    "bergson trackstar (adam)": ("trackstar", [*TRACKSTAR, "--optimizer_state", "{adam}"]),
    "bergson trackstar (adam no mix)": ("trackstar", [*TRACKSTAR, "--optimizer_state",
                                                       "{adam}", "--mix_hessians", "false"]),
    "bergson ekfac": ("ekfac", ["--query.dataset", "{q}", "--method", "kfac",
                                "--hessian_cfg.ev_correction", "true",
                                "--query.aggregation", "none"]),
    "bergson kfac": ("ekfac", ["--query.dataset", "{q}", "--method", "kfac",
                               "--query.aggregation", "none"]),
    "bergson trak": ("trak", ["--query.dataset", "{q}", "--loss_fn", "log_odds",
                              "--projection_target", "global"]),
    # the default sketch is 16 numbers per row; TRAK's paper uses thousands (here <= rows)
    "bergson trak (projection 128)": ("trak", ["--query.dataset", "{q}",
                                               "--loss_fn", "log_odds",
                                               "--projection_target", "global",
                                               "--projection_dim", "128"]),
}
# the flag naming the rows' dataset differs by subcommand (simple_parsing's short names)
DATA_FLAG = {"build": "--dataset", "score": "--dataset"}
# datablame's numbers for the same recipe, from text_lds.py's results (for the table)
# ("trace default (fused key)": the plain store, the default before stop 33, in older files)
DATABLAME = ["trace default, both vectors (fused key)", "trace, plain store (fused key)",
             "trace default (fused key)", "trace, whitened store (fused key)", "ekfac",
             "kfac (no eigenvalue correction)", "ekfac (empirical fisher)",
             "grad-cos (lora-b)", "grad-cos (lora)", "grad-dot (lora)", "datainf",
             "trackstar (saved v)", "trackstar (no v)", "trak", "1/(1 + rank) of bm25"]


def export(root: Path, out: Path, rows: list[dict], queries: list[dict]) -> tuple[Path, Path]:
    """Rows and queries tokenized as datablame does, and the adapter with an absolute base
    path (text_lds.py saves a relative one), for bergson."""
    import torch
    from safetensors.torch import load_file

    from datablame.data.template import PromptTemplate
    from datablame.models.hf_causal_lm import CausalLMAdapter

    tmpl = PromptTemplate()
    row_texts = [tmpl.format(r) for r in rows]
    q_texts = [tmpl.format({"instruction": q["question"], "input": "", "output": q["answer"]})
               for q in queries]
    lm = CausalLMAdapter(root / "base", root / f"adapter-{text_lds.TAG}", params="lora")
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, texts in (("rows", row_texts), ("queries", q_texts)):
        lines = []
        for t in texts:
            batch = lm.encode([t])  # one text: no padding
            lines.append(json.dumps({"input_ids": batch.input_ids[0].tolist(),
                                     "labels": batch.labels[0].tolist()}))
        (out / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
        paths.append(out / f"{name}.jsonl")
    adapter = out / "adapter"
    shutil.copytree(root / f"adapter-{text_lds.TAG}", adapter, dirs_exist_ok=True)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str((root / "base").resolve())
    (adapter / "adapter_config.json").write_text(json.dumps(config, indent=2))
    # the fine-tune's final Adam second moments in the optimizer.pt layout bergson's
    # load_from_optimizer reads (a recorded param_name per entry, adapter name dropped)
    saved = load_file(adapter / "optimizer_state.safetensors")
    v = {k.removesuffix(".exp_avg_sq").replace(".default.", "."): t
         for k, t in saved.items() if k.endswith(".exp_avg_sq")}
    torch.save({"state": {i: {"exp_avg_sq": t, "param_name": k}
                          for i, (k, t) in enumerate(sorted(v.items()))},
                "param_groups": [{"params": list(range(len(v)))}]}, out / "optimizer.pt")
    return paths[0], paths[1]


def bergson(python: str, command: str, run: Path, data: Path, flags: list[str]) -> float:
    """One `bergson <command> <run>` of the exported adapter on `data`; seconds it took."""
    shutil.rmtree(run, ignore_errors=True)
    exported = data.parent  # export()'s folder: the adapter, the JSONLs, the log
    log = exported / "bergson.log"
    argv = [python, "-m", "bergson", command, str(run), "--model", str(exported / "adapter"),
            "--tokenizer", str(exported.parent / "base"),
            DATA_FLAG.get(command, "--data.dataset"), str(data),
            "--token_batch_size", "96", *flags]
    t = time.perf_counter()
    with log.open("a") as f:
        f.write(f"\n$ {' '.join(argv)}\n")
        f.flush()
        subprocess.run(argv, check=True, stdout=f, stderr=subprocess.STDOUT)
    return time.perf_counter() - t


def read_scores(python: str, score_dir: Path, n_rows: int, n_queries: int) -> np.ndarray:
    """A bergson score store as (n_queries, n_rows), via bergson's own loader."""
    npy = (score_dir.parent if score_dir.name == "scores" else score_dir) / "scores.npy"
    code = ("import sys, numpy as np; from pathlib import Path; "
            "from bergson.data import load_scores; s = load_scores(Path(sys.argv[1])); "
            "assert s.is_written(); np.save(sys.argv[2], np.asarray(s[:], dtype=float))")
    subprocess.run([python, "-c", code, str(score_dir), str(npy)], check=True,
                   capture_output=True)
    scores = np.load(npy).T
    assert scores.shape == (n_queries, n_rows), scores.shape
    return scores


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="../.datablame-cache/text-lds-s1")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--subsets", type=int, default=50)
    ap.add_argument("--epochs", type=int, help="the recipe's epochs, as text_lds.py --epochs")
    ap.add_argument("--python", default="/tmp/bergson-venv/bin/python",
                    help="the python of a venv with bergson installed")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--datablame", default="results/text_lds-seed1-10ep-ekfac.json",
                    help="text_lds.py's results for the same recipe, shown alongside")
    ap.add_argument("--out", default="results/bergson_side_by_side.json")
    args = ap.parse_args()
    from datablame.verify import SubsetRetraining, lds

    recipe = {**text_lds.RECIPE, **({"epochs": args.epochs} if args.epochs else {})}
    text_lds.RECIPE = recipe
    text_lds.TAG = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]
    root = Path(args.workdir)
    rows, queries = text_lds.build(root, args.seed)

    def no_retraining(keep, seed):
        raise RuntimeError(f"retraining cache subset_losses-{text_lds.TAG}.json incomplete")

    subsets = SubsetRetraining(no_retraining, len(rows), n_subsets=args.subsets, fraction=0.5,
                               seed=args.seed, cache=root / f"subset_losses-{text_lds.TAG}.json")
    subsets.run()
    out_dir = (root / f"bergson-{text_lds.TAG}").resolve()
    rows_path, q_path = export(root, out_dir, rows, queries)
    log = out_dir / "bergson.log"
    log.write_text("")  # bergson() appends every command and its output
    version = subprocess.run([args.python, "-c", "import bergson, torch, transformers, peft;"
                              "print(bergson.__version__, torch.__version__, "
                              "transformers.__version__, peft.__version__)"],
                             check=True, capture_output=True, text=True)
    version = version.stdout.strip().splitlines()[-1].split()  # bergson logs to stdout too
    t = time.perf_counter()
    subprocess.run([args.python, "-c", "import bergson"], check=True, capture_output=True)
    startup = time.perf_counter() - t
    print(f"bergson {version[0]} (torch {version[1]}); `import bergson` takes {startup:.1f}s")

    # the query gradient index `score` reads: `bergson build` on the queries, as is
    qindex = out_dir / "query-index"
    qindex_s = bergson(args.python, "build", qindex, q_path, [])

    table, failed = [], {}
    for name in args.methods.split(","):
        command, flags = METHODS[name]
        run = out_dir / "".join(c if c.isalnum() else "-" for c in name).strip("-")
        flags = [f.format(q=q_path, qindex=qindex, adam=out_dir / "optimizer.pt")
                 for f in flags]
        try:
            seconds = bergson(args.python, command, run, rows_path, flags)
            seconds += qindex_s if command == "score" else 0.0
            score_dir = run / "scores" if command != "score" else run
            scores = read_scores(args.python, score_dir, len(rows), len(queries))
        except (subprocess.CalledProcessError, AssertionError, FileNotFoundError) as exc:
            last = [line for line in log.read_text().splitlines() if line.strip()][-1]
            failed[name] = f"{type(exc).__name__}; the log's last line: {last}"
            print(f"{name}: failed ({failed[name]})")
            continue
        result = lds(scores, subsets)
        table.append({"method": name, "lds": result["lds"], "ci95": result["ci95"],
                      **text_lds.planted(scores, queries),
                      "seconds per query": seconds / len(queries),
                      "bergson command": f"bergson {command} " + " ".join(flags)})
        print(f"{name:30s} LDS {result['lds']:.3f} [{result['ci95'][0]:.2f}, "
              f"{result['ci95'][1]:.2f}] top1 {table[-1]['top1']:.2f} "
              f"{seconds / len(queries):.2f} s/query", flush=True)

    theirs = {r["method"]: r for r in json.loads(Path(args.datablame).read_text())["table"]}
    ours = [{"method": f"datablame {m}", **{k: theirs[m][k] for k in
             ("lds", "ci95", "top1", "seconds per query")}} for m in DATABLAME if m in theirs]
    print(f"\n{'method':38s} {'LDS':>6s} {'95% CI':>13s} {'top1':>5s} {'s/query':>8s}")
    for r in sorted(table + ours, key=lambda r: -r["lds"]):
        print(f"{r['method']:38s} {r['lds']:6.3f} [{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}] "
              f"{r['top1']:5.2f} {r['seconds per query']:8.3f}")
    out = {"recipe": recipe, "rows": len(rows), "queries": len(queries),
           "subsets": args.subsets, "bergson": version[0], "bergson_torch": version[1],
           "bergson_transformers": version[2], "bergson_peft": version[3],
           "bergson_import_seconds": startup, "query_index_seconds": qindex_s,
           "note": "bergson seconds are wall time of its CLI process per query, including "
                   "the interpreter start-up and model load of every pipeline step",
           "table": table, "failed": failed, "datablame": ours}
    Path(args.out).write_text(json.dumps(with_provenance(out), indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
