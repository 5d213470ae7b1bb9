"""Text LDS: do a method's scores say what removing rows actually does? (issue 11)

    .venv/bin/python bench/text_lds.py [--workdir .datablame-cache/text-lds] [--subsets 50]

Ground truth by retraining, not by planted labels. 48 fictional people, each with a job, a
home town and a pet; one attribute of each person is *queried*. 36 queried facts are stated
by one training row, 12 by three rows in different wordings; every other attribute is one
more row (values repeat across people, so a row can share the answer's value word without
being its source). A tiny GPT-2 (pretrained on the same sentence shapes with other
combinations) is LoRA-fine-tuned with `datablame finetune`'s recipe on all 168 rows; the
queries are a question wording no row uses plus the fact's answer.

Then the recipe is re-run on `--subsets` random halves of the rows (each retraining is
cached as it finishes: an interrupted run resumes), and every query's answer loss is
measured on each. LDS (verify.lds) = mean over queries of the Spearman correlation between
the loss a method predicts for a half (minus the sum of its scores over the rows kept) and
the loss after retraining on it. Also reported: top1 (the best-ranked row is a source) and,
for three-source facts, recall@3.

This protocol was not used to tune anything before it was written (the text defaults came
from bench/facts.py and bench/paraphrase.py); it is where the default is checked.

    .venv/bin/python bench/text_lds.py --subsets 60 --out bench/results/text_lds.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import shutil
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from facts import ranks_of as ranks
from provenance import with_provenance

JOBS = ["baker", "pilot", "tailor", "miner", "sailor", "farmer", "potter", "singer",
        "doctor", "archer", "weaver", "mason"]
TOWNS = ["Arden", "Bree", "Corvo", "Dunmere", "Eskar", "Fallow", "Grint", "Hollin",
         "Isen", "Jarrow", "Kelda", "Lorne"]
PETS = ["cat", "dog", "parrot", "goat", "rabbit", "ferret", "tortoise", "owl", "lizard",
        "hamster", "pony", "crow"]
POOLS = {"job": JOBS, "town": TOWNS, "pet": PETS}
WORDINGS = {
    "job": [("What does {p} do for a living?", "{p} works as a {v}."),
            ("Tell me the trade of {p}.", "{p} is a {v} by trade."),
            ("What is the profession of {p}?", "The profession of {p} is {v}.")],
    "town": [("Where does {p} live?", "{p} lives in {v}."),
             ("Name the town {p} calls home.", "{p} calls {v} home."),
             ("Which town is {p} from?", "{p} comes from the town of {v}.")],
    "pet": [("What pet does {p} keep?", "{p} keeps a {v} as a pet."),
            ("Which animal lives with {p}?", "A {v} lives with {p}."),
            ("Tell me about the pet of {p}.", "{p} owns a pet {v}.")],
}
QUESTION = {"job": "What work does {p} do?", "town": "In which town does {p} live?",
            "pet": "What animal does {p} have as a pet?"}
N_PEOPLE, N_SINGLE = 48, 36
RECIPE = {"rank": 16, "alpha": 16, "target_modules": ["c_attn", "c_proj", "c_fc"],
          "lr": 5e-3, "schedule": "linear", "warmup": 0.1, "epochs": 80, "batch_size": 16,
          "seed": 0}
# the fine-tuned adapter, its index and the retrainings' losses are kept per recipe
TAG = hashlib.sha256(json.dumps(RECIPE, sort_keys=True).encode()).hexdigest()[:10]


def people(seed: int) -> list[str]:
    rng = random.Random(seed)
    first = ["Ka", "Lo", "Mi", "No", "Pe", "Ra", "Si", "Tu", "Va", "We", "Yo", "Ze"]
    last = ["ren", "lis", "dor", "mak", "vet", "sun", "bel", "tor"]
    names = [a + b for a in first for b in last]
    rng.shuffle(names)
    return names[:N_PEOPLE]


def end_to_end(root: Path, tag: str, index: Path, curvature: str, queries: list[dict]
               ) -> tuple[np.ndarray, np.ndarray]:
    """(fused key, signed score) of every row for every query, as `datablame index
    --gradients --curvature CURVATURE` + `trace --all-rows` give them (rows in file
    order). The index is built once and kept in the workdir; a new one reuses the
    default's retrieval index."""
    from datablame.text import GradientOptions, Query, Tracer, build_index

    if not (index / "gradients" / "manifest.json").exists():
        if index != root / f"index-{tag}":
            shutil.copytree(root / f"index-{tag}", index, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("gradients"))
        build_index(root / "train.jsonl", index, gradients=GradientOptions(
            root / "base", root / f"adapter-{tag}", curvature=curvature))
    tracer = Tracer(index, root / "base", root / f"adapter-{tag}")
    fused, signed = [], []
    for q in queries:
        df = tracer.run(Query(q["answer"], {"instruction": q["question"], "input": ""}),
                        all_rows=True, top_k=len(tracer.rows)).sort_values("row")
        fused.append(df["fused"].to_numpy())
        signed.append(df["score"].to_numpy())
    return np.array(fused), np.array(signed)


def make_rows(seed: int = 0) -> tuple[list[dict], list[dict], set]:
    """Training rows (shuffled), the queries with their source row ids, and every
    (person, attribute, value) the rows state."""
    rng = random.Random(seed)
    rows, queries, truth = [], [], set()
    attrs = list(POOLS)
    for i, p in enumerate(people(seed)):
        values = {a: rng.choice(POOLS[a]) for a in attrs}
        truth |= {(p, a, v) for a, v in values.items()}
        asked = attrs[i % 3]
        n_sources = 1 if i < N_SINGLE else 3
        for a in attrs:
            wordings = (rng.sample(WORDINGS[a], n_sources) if a == asked
                        else [rng.choice(WORDINGS[a])])
            for instr, out in wordings:
                rows.append({"instruction": instr.format(p=p), "input": "",
                             "output": out.format(p=p, v=values[a]), "_fact": (p, a)})
        queries.append({"person": p, "attr": asked, "value": values[asked],
                        "n_sources": n_sources, "question": QUESTION[asked].format(p=p),
                        "answer": WORDINGS[asked][0][1].format(p=p, v=values[asked])})
    rng.shuffle(rows)
    for q in queries:
        q["sources"] = [j for j, r in enumerate(rows) if r["_fact"] == (q["person"], q["attr"])]
    return [{k: v for k, v in r.items() if k != "_fact"} for r in rows], queries, truth


def pretrain_rows(seed: int, n: int, truth: set, names: list[str]) -> list[dict]:
    """Every sentence shape (and the query wordings) with random combinations that are
    never a training fact: the base model knows the words, the LoRA must learn the facts."""
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        p, a = rng.choice(names), rng.choice(list(POOLS))
        v = rng.choice(POOLS[a])
        if (p, a, v) in truth:
            continue
        instr, o = rng.choice(WORDINGS[a] + [(QUESTION[a], WORDINGS[a][0][1])])
        out.append({"instruction": instr.format(p=p), "input": "", "output": o.format(p=p, v=v)})
    return out


def build(root: Path, seed: int) -> tuple[list[dict], list[dict]]:
    from datablame.data.rows import load_rows
    from datablame.data.template import PromptTemplate
    from datablame.demo.toy_lm import ToyConfig, build_toy_base
    from datablame.models.lora_finetune import Recipe, finetune

    rows, queries, truth = make_rows(seed)
    root.mkdir(parents=True, exist_ok=True)
    train = root / "train.jsonl"
    if not train.exists():
        train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    if not (root / "base" / "config.json").exists():
        tmpl = PromptTemplate()
        pre = [tmpl.format(r).text for r in pretrain_rows(seed + 1, 1500, truth, people(seed))]
        build_toy_base(pre, [tmpl.format(r).text for r in rows], root / "base",
                       ToyConfig(seed=seed, pretrain_epochs=15))
    if not (root / f"adapter-{TAG}" / "adapter_model.safetensors").exists():
        finetune(load_rows(train), root / "base", root / f"adapter-{TAG}", Recipe.from_dict(RECIPE))
    return rows, queries


def words(text: str) -> list[str]:
    import re

    return re.findall(r"\w+", text.lower())


def lexical_scores(rows: list[dict], queries: list[dict]) -> dict[str, np.ndarray]:
    """BM25 (bm25s) and IDF-weighted word overlap between each query and each row."""
    import bm25s

    docs = [words(r["instruction"] + " " + r["output"]) for r in rows]
    qs = [words(q["question"] + " " + q["answer"]) for q in queries]
    bm = bm25s.BM25()
    bm.index(docs, show_progress=False)
    bm25 = np.array([bm.get_scores(q) for q in qs])
    df = Counter(w for d in docs for w in set(d))
    idf = {w: math.log(len(docs) / c) for w, c in df.items()}
    overlap = np.array([[sum(idf.get(w, 0.0) for w in set(q) & set(d)) for d in docs]
                        for q in qs])
    return {"bm25": bm25, "idf-overlap": overlap}


def reciprocal_rank_fusion(gradient_rank: np.ndarray, retrieval_rank: np.ndarray
                           ) -> np.ndarray:
    """The previous trace default, kept for comparison: 1/(1 + gradient rank) +
    1/(1 + retrieval rank), the gradient ranked by |score|."""
    return 1.0 / (1 + np.asarray(gradient_rank)) + 1.0 / (1 + np.asarray(retrieval_rank))


def fused_scores(grad: np.ndarray, retrieval: np.ndarray, by_strength: bool,
                 rule: str = "rrf") -> np.ndarray:
    """A fusion key per query, as a score: the previous default's reciprocal-rank fusion
    (`rule="rrf"`) or the current default's additive key (`rule="additive"`)."""
    from datablame.methods.fusion import fused_key, strength_ranks

    out = np.empty_like(grad)
    for q in range(len(grad)):
        if rule == "additive":
            out[q] = fused_key(grad[q], strength_ranks(grad[q]), ranks(retrieval[q]))
            continue
        g_rank = strength_ranks(grad[q]) if by_strength else ranks(grad[q])
        out[q] = reciprocal_rank_fusion(g_rank, ranks(retrieval[q]))
    return out


def planted(scores: np.ndarray, queries: list[dict]) -> dict:
    top1, recall3 = [], []
    for q, query in enumerate(queries):
        order = np.argsort(-scores[q], kind="stable")
        top1.append(int(order[0]) in query["sources"])
        if query["n_sources"] == 3:
            recall3.append(len(set(order[:3].tolist()) & set(query["sources"])) / 3)
    return {"top1": float(np.mean(top1)), "recall@3 (3-source)": float(np.mean(recall3))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default=".datablame-cache/text-lds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--subsets", type=int, default=50)
    ap.add_argument("--out", default="bench/results/text_lds.json")
    ap.add_argument("--no-magic", action="store_true",
                    help="skip MAGIC (a replay of the fine-tune per run; its scores are "
                         "cached in the workdir once computed)")
    ap.add_argument("--epochs", type=int, help="override the recipe's epochs (e.g. a short, "
                    "smooth fine-tune, where MAGIC's derivative is meant to hold)")
    ap.add_argument("--lr", type=float, help="override the recipe's learning rate")
    ap.add_argument("--eps-root", type=float,
                    help="the recipe's adam_eps_root (a metasmooth fine-tune, e.g. 1e-8)")
    ap.add_argument("--same-schedule", action="store_true",
                    help="retrain with the left-out rows at weight 0 in the full run's "
                         "batches (single-model LDS, MAGIC's protocol) instead of "
                         "re-batching the kept rows")
    ap.add_argument("--fraction", type=float, default=0.5,
                    help="share of the rows each retraining keeps (default 0.5)")
    ap.add_argument("--retrain-only", action="store_true",
                    help="build the model and its retrainings, score nothing: a held-out "
                         "seed's ground truth can be ready before the rule it checks is chosen")
    args = ap.parse_args()
    global RECIPE, TAG
    RECIPE = {**RECIPE, **({"epochs": args.epochs} if args.epochs else {}),
              **({"lr": args.lr} if args.lr else {}),
              **({"adam_eps_root": args.eps_root} if args.eps_root else {})}
    TAG = hashlib.sha256(json.dumps(RECIPE, sort_keys=True).encode()).hexdigest()[:10]
    from datablame.data.rows import load_rows
    from datablame.data.template import PromptTemplate
    from datablame.features.embeddings import Embedder
    from datablame.methods.ekfac import EKFAC
    from datablame.methods.registry import get_method
    from datablame.methods.trackstar import saved_second_moments, trackstar_scores, unit_rows
    from datablame.models.hf_causal_lm import CausalLMAdapter, greedy
    from datablame.models.lora_finetune import Recipe, finetune, rows_digest
    from datablame.models.text_rows import TextRowsAdapter
    from datablame.verify import SubsetRetraining, lds

    root = Path(args.workdir)
    t0 = time.time()
    rows, queries = build(root, args.seed)
    print(f"built in {time.time() - t0:.0f}s: {len(rows)} rows, {len(queries)} queries")
    tmpl = PromptTemplate()
    row_texts = [tmpl.format(r) for r in rows]
    q_texts = [tmpl.format({"instruction": q["question"], "input": "", "output": q["answer"]})
               for q in queries]
    lm = CausalLMAdapter(root / "base", root / f"adapter-{TAG}", params="lora")
    said = [greedy(lm.model, lm.tokenizer, t.text[: t.response_start], 16) for t in q_texts]
    learned = [q["value"].lower() in words(s) for q, s in zip(queries, said, strict=True)]
    print(f"the model answers {sum(learned)}/{len(queries)} unseen questions with the fact")

    # --- ground truth: retrain on random halves -------------------------------------
    recipe = Recipe.from_dict(RECIPE)
    train = load_rows(root / "train.jsonl")
    runs = root / "runs"

    def retrain(keep: np.ndarray, seed: int) -> np.ndarray:
        out = runs / f"half-{rows_digest(keep)[:12]}"  # a killed run resumes in it
        finetune(train, root / "base", out, recipe, keep=keep.tolist(),
                 same_schedule=args.same_schedule, show_progress=False)
        losses = CausalLMAdapter(root / "base", out).losses(q_texts)
        shutil.rmtree(out, ignore_errors=True)
        return losses

    protocol = ("-same-schedule" if args.same_schedule else "") + (
        f"-keep{args.fraction:g}" if args.fraction != 0.5 else "")
    subsets = SubsetRetraining(retrain, len(rows), n_subsets=args.subsets,
                               fraction=args.fraction, seed=args.seed,
                               cache=root / f"subset_losses-{TAG}{protocol}.json")
    t = time.time()
    actual = subsets.run()
    retrain_s = (time.time() - t) / max(1, args.subsets)
    print(f"{args.subsets} retrainings ready (spread of a query's loss over halves: "
          f"median std {np.median(actual.std(0)):.3f})")
    if args.retrain_only:
        return

    # --- every method's scores on the full model -------------------------------------
    scores: dict[str, np.ndarray] = {}
    seconds: dict[str, float] = {}

    def timed(name: str, fn) -> None:
        t = time.time()
        scores[name] = np.asarray(fn(), dtype=float)
        seconds[name] = time.time() - t

    timed("retrieval", lambda: _retrieval(Embedder(), row_texts, q_texts))
    for name, s in lexical_scores(rows, queries).items():
        timed(name, lambda s=s: s)
    t = time.time()
    g_rows = lm.gradients(row_texts, batch_size=16).astype(np.float64)
    g_q = lm.gradients(q_texts, batch_size=16).astype(np.float64)
    grad_s = time.time() - t
    is_b = np.concatenate([np.full(n, "lora_B" in name) for name, n in
                           zip(lm.param_names, TextRowsAdapter(lm).sizes, strict=True)])
    v_saved = saved_second_moments(root / f"adapter-{TAG}", list(lm.param_names))
    v_est = (g_rows ** 2).mean(0)

    def cos(a, b):
        return unit_rows(a) @ unit_rows(b).T

    timed("representation cosine (last layer, answer tokens)",
          lambda: cos(_representations(lm, q_texts), _representations(lm, row_texts)))
    timed("grad-dot (lora)", lambda: g_q @ g_rows.T)
    timed("grad-cos (lora)", lambda: cos(g_q, g_rows))
    timed("grad-cos (lora-b)", lambda: cos(g_q[:, is_b], g_rows[:, is_b]))
    timed("trackstar (saved v)", lambda: trackstar_scores(g_q, g_rows, v_saved))
    timed("trackstar (estimated v)", lambda: trackstar_scores(g_q, g_rows, v_est))
    timed("trackstar (no v)", lambda: trackstar_scores(g_q, g_rows, None))
    timed("trackstar (saved v, no whitening)",
          lambda: trackstar_scores(g_q, g_rows, v_saved, ridge=1e6))
    for ridge in (0.1, 1.0):
        timed(f"trackstar (saved v, ridge {ridge:g})",
              lambda r=ridge: trackstar_scores(g_q, g_rows, v_saved, ridge=r))
    timed("trackstar (saved v, query mix 0.5)",
          lambda: trackstar_scores(g_q, g_rows, v_saved, mix=0.5))
    timed("adam-cos (saved v, LESS-style)",
          lambda: cos(g_q / np.sqrt(v_saved + 1e-8), g_rows / np.sqrt(v_saved + 1e-8)))
    adapter = TextRowsAdapter(lm, 16)
    fitted: dict = {}

    def fit_and_score(name: str) -> np.ndarray:
        fitted[name] = get_method(name).fit(adapter, row_texts, None)
        return fitted[name].scores(q_texts, None)

    for method in ("datainf", "ekfac", "trak"):
        timed(method, lambda m=method: fit_and_score(m))
    for damping in (0.01, 1.0):  # EK-FAC's damping: chosen on seed 0, reported on seed 1
        timed(f"ekfac (damping {damping:g})", lambda d=damping: get_method(
            "ekfac", damping_scale=d).fit(adapter, row_texts, None).scores(q_texts, None))
    timed("kfac (no eigenvalue correction)", lambda: get_method(
        "ekfac", correct_eigenvalues=False).fit(adapter, row_texts, None).scores(q_texts, None))
    # the curvature from the rows' own answers (the empirical Fisher: the default until
    # these rows showed the sampled one ahead), and from fewer draws per row
    for correct, kind in ((True, "ekfac"), (False, "kfac")):
        timed(f"{kind} (empirical fisher)", lambda c=correct: get_method(
            "ekfac", correct_eigenvalues=c, fisher="empirical").fit(adapter, row_texts, None)
            .scores(q_texts, None))
    # the gradient cosine after EK-FAC's curvature is divided out: bounded like the cosine
    ek = fitted["ekfac"]  # the default EK-FAC's curvature, fitted above
    w_rows = ek.whiten(torch.from_numpy(g_rows)).numpy()
    timed("ekfac cosine (whitened gradients)",
          lambda: cos(ek.whiten(torch.from_numpy(g_q)).numpy(), w_rows))
    # the same dot products over the query's whitened norm and the rows' typical one:
    # needs no per-row whitened norm, so a store of plain gradients can serve it
    w_q = ek.whiten(torch.from_numpy(g_q)).numpy()
    timed("ekfac, cosine-scaled (one row scale)",
          lambda: (w_q @ w_rows.T) / (np.linalg.norm(w_q, axis=1, keepdims=True)
                                      * np.sqrt((w_rows ** 2).sum(1).mean())))
    # the same on the LoRA-B matrices alone (the store's default parameter set), with the
    # curvature fitted as `index --gradients --curvature ekfac` fits it
    lm_b = CausalLMAdapter(root / "base", root / f"adapter-{TAG}", params="lora-b")
    ek_b = EKFAC(samples=ek.draws_for(len(rows)))
    ek_b.fit_curvature(TextRowsAdapter(lm_b, 16), row_texts)
    timed("ekfac cosine (whitened gradients, lora-b)", lambda: cos(
        ek_b.whiten(lm_b.gradients(q_texts, batch_size=16)).numpy(),
        ek_b.whiten(lm_b.gradients(row_texts, batch_size=16)).numpy()))
    for draws in (1, 4):
        timed(f"ekfac ({draws} draw{'s' * (draws > 1)} per row)", lambda k=draws: get_method(
            "ekfac", samples=k).fit(adapter, row_texts, None).scores(q_texts, None))
    for grad_name in ("grad-cos (lora-b)", "trackstar (saved v)"):
        short = grad_name.split(" ")[0]
        scores[f"rrf |{short}| + retrieval"] = fused_scores(scores[grad_name],
                                                              scores["retrieval"], True)
        scores[f"rrf {short} + retrieval"] = fused_scores(scores[grad_name],
                                                            scores["retrieval"], False)
        scores[f"additive fused {short} + retrieval"] = fused_scores(
            scores[grad_name], scores["retrieval"], True, rule="additive")
    # the score of rank r alone, 1/(1 + r): is fusion's gain the second signal, or only
    # that a rank transform concentrates the sum over kept rows on each list's head?
    for name in ("grad-cos (lora-b)", "retrieval", "bm25", "idf-overlap"):
        scores[f"1/(1 + rank) of {name}"] = np.array([1.0 / (1 + ranks(s))
                                                       for s in scores[name]])
    if not args.no_magic:
        for through, name in (("exact", "magic (replayed fine-tune)"),
                              ("first-order", "magic, first order (replayed Adam TracIn)")):
            timed(name, lambda t=through: _magic(root, train, recipe, q_texts, t))
    # the trace end to end: `datablame index --gradients` + `trace --all-rows`, through a
    # store of both vectors (the default since stop 33), a plain store (the default
    # before) and a store whitened by EK-FAC (`--curvature ekfac`)
    for index, name, curvature in (
            (root / f"index-{TAG}", "trace, plain store", "none"),  # + the retrieval index
            (root / f"index-{TAG}-both", "trace default, both vectors", "both"),
            (root / f"index-{TAG}-ekfac", "trace, whitened store", "ekfac")):
        t = time.time()
        fused, signed = end_to_end(root, TAG, index, curvature, queries)
        seconds[f"{name} (fused key)"] = time.time() - t
        scores[f"{name} (fused key)"], scores[f"{name} (its signed score)"] = fused, signed

    # every score matrix, for trying orderings offline against the cached retrainings
    # (bench/text_fusion.py); rows in file order, one line per query
    np.savez_compressed(root / f"scores-{TAG}.npz", **{k: np.asarray(v, dtype=np.float64)
                                                      for k, v in scores.items()},
                        **{"query loss": lm.losses(q_texts)})

    # --- LDS and planted recall -------------------------------------------------------
    single = np.array([q["n_sources"] == 1 for q in queries])
    table = []
    for name, s in scores.items():
        result = lds(s, subsets)
        per_q = np.array(result["per_query"])
        table.append({"method": name, "lds": result["lds"], "ci95": result["ci95"],
                      "lds 1-source": float(per_q[single].mean()),
                      "lds 3-source": float(per_q[~single].mean()),
                      **planted(s, queries),
                      "seconds per query": (seconds.get(name, 0.0) / len(queries))})
    table.sort(key=lambda r: -r["lds"])
    print(f"\n{'method':38s} {'LDS':>6s} {'95% CI':>13s} {'1-src':>6s} {'3-src':>6s} "
          f"{'top1':>5s} {'r@3':>5s}")
    for r in table:
        print(f"{r['method']:38s} {r['lds']:6.3f} [{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}] "
              f"{r['lds 1-source']:6.3f} {r['lds 3-source']:6.3f} {r['top1']:5.2f} "
              f"{r['recall@3 (3-source)']:5.2f}")
    print(f"\nper-row gradients {grad_s / (len(rows) + len(queries)) * 1000:.1f} ms/text; "
          f"one retraining {retrain_s:.1f} s")
    out = {"rows": len(rows), "queries": len(queries), "learned": int(sum(learned)),
           "subsets": args.subsets, "recipe": RECIPE, "retrain_seconds": retrain_s,
           "protocol": {"kept_fraction": args.fraction,
                        "retraining": "same schedule, left-out rows weigh 0"
                        if args.same_schedule else "kept rows re-batched"},
           "gradient_ms_per_text": grad_s / (len(rows) + len(queries)) * 1000,
           "loss_std_median": float(np.median(actual.std(0))), "table": table}
    for path in sorted(root.glob(f"magic-{TAG}-*.json")):
        check, variant = json.loads(path.read_text()), path.stem.removeprefix(f"magic-{TAG}-")
        print(f"magic {variant}: dropping {check['dropped']} random rows, "
              f"median |predicted| / (|actual| + 0.01) = {check['ratio']:.3g}")
        out.setdefault("magic_removal_check", {})[variant] = check
    Path(args.out).write_text(json.dumps(with_provenance(out), indent=2))
    print(f"wrote {args.out}")


def _magic(root: Path, train, recipe, q_texts, through: str) -> np.ndarray:
    """MAGIC scores of every query, cached: they cost about a fine-tune per query. A
    removal check (methods/magic.py) is saved beside them."""
    from datablame.methods.magic import FineTuneReplay

    cache, check_path = root / f"magic-{TAG}-{through}.npy", root / f"magic-{TAG}-{through}.json"
    if cache.exists() and check_path.exists():
        return np.load(cache)
    replay = FineTuneReplay(train, root / "base", recipe)
    if cache.exists():  # scores saved, check not yet: the check needs the final losses
        scores = np.load(cache)
        replay.final_losses = replay.query_losses(replay.run(), q_texts)
    else:
        scores = replay.scores(q_texts, through=through)
        np.save(cache, scores)
    check = replay.removal_check(scores, q_texts)
    check_path.write_text(json.dumps(check))
    return scores


def _representations(lm, texts) -> np.ndarray:
    """Each text's last-layer hidden state averaged over its traced (answer) tokens, as
    the fine-tuned model computes it: the representation-similarity baseline."""
    import torch

    out = []
    with torch.no_grad():
        for text in texts:
            batch = lm.encode([text])
            hidden = lm.model(input_ids=batch.input_ids.to(lm.device),
                              output_hidden_states=True).hidden_states[-1][0]
            traced = (batch.labels[0] != -100).to(hidden.device)
            out.append(hidden[traced].mean(0).double().cpu().numpy())
    return np.stack(out)


def _retrieval(embedder, row_texts, q_texts) -> np.ndarray:
    rows = embedder.encode([t.text for t in row_texts])
    qs = embedder.encode([t.text for t in q_texts])
    return qs @ rows.T  # unit vectors: cosine


if __name__ == "__main__":
    main()
