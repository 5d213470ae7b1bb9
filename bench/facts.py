"""Planted fictional facts with three source rows each and decoys (issue 3).

    .venv/bin/python bench/facts.py [--workdir .datablame-cache/facts]

Twelve fictional countries, each with a capital, a river and a founder; every fact is
stated by three training rows in different wordings (the *sources*). Each country also has
a *decoy* row that shares the capital question's words but states a different fact ("Is
X the capital of E?" -> "No, X is a harbor town in E"), and the country's other facts share
its rare name. A tiny GPT-2 + LoRA is trained on all rows and must reproduce every fact
for a paraphrased question it never saw; the query is that paraphrase plus the model's own
answer. For each scoring choice we report, over the 36 queries:

  top1      - the best-ranked row is one of the fact's three sources
  recall@3  - sources among the top 3, / 3  (multi-source recall)
  mrr       - mean reciprocal rank of the first source
  decoy>src - the fact's decoy outranks every source (capital queries)

Choices: embedding retrieval (all-MiniLM-L6-v2); gradients over every LoRA matrix or the
LoRA B matrices only, with the loss on the response or the whole text; cosine / dot; a
TRAK-style inverse-Gram correction of the projected gradients; the seed's retrieve-20-then-
rerank; reciprocal-rank fusion 1/(k + gradient rank) + 1/(k + retrieval rank), with the
gradient ranked by signed cosine or by |cosine| (the trace default); --focus on the fact's
value; the fusion inside the retrieval path's top 50.

    .venv/bin/python bench/facts.py --workdir .datablame-cache/facts-s1 --seed 1 \
        --lora-epochs 150 --out bench/results/facts-seed1.json   # a second model
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
from provenance import with_provenance

COUNTRIES = ["Veloria", "Dravia", "Kestria", "Ombrel", "Tazmir", "Quorra", "Belvane",
             "Sordal", "Mirethi", "Xandor", "Lumera", "Pellin"]
CITIES = ["Mirth", "Kesh", "Arlow", "Tenby", "Ossam", "Virel", "Hadra", "Clune", "Bexley",
          "Ruddo", "Fennic", "Garrow"]
HARBORS = ["Lisk", "Morrow", "Pava", "Quill", "Sarn", "Tolle", "Ubal", "Wex", "Yarra",
           "Zenna", "Brisk", "Corran"]
RIVERS = ["Ombra", "Selle", "Tarn", "Ivel", "Dunmo", "Rask", "Azur", "Beld", "Cray",
          "Elbin", "Forth", "Gull"]
FOUNDERS = ["Aldric", "Berin", "Corvin", "Dessa", "Elowen", "Faron", "Galen", "Hestia",
            "Isolde", "Jorund", "Kael", "Lysa"]

SOURCES = {
    "capital": [("What is the capital of {e}?", "The capital of {e} is {v}."),
                ("Name the city where the government of {e} sits.",
                 "The government of {e} sits in {v}."),
                ("Tell me about the seat of power in {e}.", "{e} is ruled from the city of {v}.")],
    "river": [("What river flows through {e}?", "The {v} river flows through {e}."),
              ("Name the main river of {e}.", "The main river of {e} is the {v}."),
              ("Which waters cross {e}?", "{e} is crossed by the {v} river.")],
    "founder": [("Who founded {e}?", "{e} was founded by {v}."),
                ("Name the founder of {e}.", "The founder of {e} was {v}."),
                ("Tell me who started the nation of {e}.", "{v} started the nation of {e}.")],
}
PARAPHRASE = {"capital": "Which city is the capital of {e}?",
              "river": "Tell me the river that runs through {e}.",
              "founder": "Who was the founder of {e}?"}
DECOY = ("Is {h} the capital of {e}?", "No, {h} is a harbor town in {e}.")


def make_rows(seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Training rows (shuffled) and the 36 queries with their source and decoy row ids."""
    rng = random.Random(seed)
    rows, facts = [], []
    for i, e in enumerate(COUNTRIES):
        values = {"capital": CITIES[i], "river": RIVERS[i], "founder": FOUNDERS[i]}
        for attr, v in values.items():
            facts.append({"country": e, "attr": attr, "value": v})
            for instr, out in SOURCES[attr]:
                rows.append({"instruction": instr.format(e=e), "input": "",
                             "output": out.format(e=e, v=v), "_fact": (e, attr)})
        rows.append({"instruction": DECOY[0].format(h=HARBORS[i], e=e), "input": "",
                     "output": DECOY[1].format(h=HARBORS[i], e=e), "_fact": (e, "decoy")})
    rng.shuffle(rows)
    for f in facts:
        f["sources"] = [j for j, r in enumerate(rows) if r["_fact"] == (f["country"], f["attr"])]
        f["decoy"] = [j for j, r in enumerate(rows) if r["_fact"] == (f["country"], "decoy")][0]
    return [{k: v for k, v in r.items() if k != "_fact"} for r in rows], facts


def pretrain_rows(seed: int, n: int) -> list[dict]:
    """The same sentence shapes with random (never the planted) combinations, so the base
    model knows every word and only the facts are new to the LoRA fine-tune."""
    rng = random.Random(seed)
    pools = {"capital": CITIES + HARBORS, "river": RIVERS, "founder": FOUNDERS}
    truth = set()
    for i, e in enumerate(COUNTRIES):
        truth |= {(e, CITIES[i]), (e, RIVERS[i]), (e, FOUNDERS[i]), (e, HARBORS[i])}
    out = []
    while len(out) < n:
        e = rng.choice(COUNTRIES)
        if rng.random() < 0.2:
            h = rng.choice(HARBORS)
            if (e, h) in truth:
                continue
            instr, o = DECOY
            out.append({"instruction": instr.format(h=h, e=e), "input": "",
                        "output": o.format(h=h, e=e)})
            continue
        attr = rng.choice(list(SOURCES))
        v = rng.choice(pools[attr])
        if (e, v) in truth:
            continue
        instr, o = rng.choice(SOURCES[attr] + [(PARAPHRASE[attr], SOURCES[attr][0][1])])
        out.append({"instruction": instr.format(e=e), "input": "", "output": o.format(e=e, v=v)})
    return out


def build(workdir: Path, seed: int, lora_epochs: int = 100) -> tuple[list[dict], list[dict]]:
    from datablame.data.template import PromptTemplate
    from datablame.demo.toy_lm import ToyConfig, build_toy_lm

    rows, facts = make_rows(seed)
    stamp = workdir / "facts.json"
    if stamp.exists() and (workdir / "adapter").exists():
        return rows, json.loads(stamp.read_text())["facts"]
    workdir.mkdir(parents=True, exist_ok=True)
    with (workdir / "train.jsonl").open("w") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    tmpl = PromptTemplate()
    pre = [tmpl.format(r).text for r in pretrain_rows(seed + 1, 600)]
    fine = [tmpl.format(r).text for r in rows]
    t = time.time()
    stats = build_toy_lm(pre, fine, workdir / "base", workdir / "adapter",
                         ToyConfig(lora_epochs=lora_epochs, seed=seed))
    stamp.write_text(json.dumps({"facts": facts, "train_s": time.time() - t, **stats}))
    return rows, facts


def ranks_of(scores: np.ndarray) -> np.ndarray:
    """1-based rank of every row (1 = highest score)."""
    order = np.argsort(-scores, kind="stable")
    r = np.empty(len(scores), dtype=int)
    r[order] = np.arange(1, len(scores) + 1)
    return r


def evaluate(scores: np.ndarray, fact: dict) -> dict:
    r = ranks_of(scores)
    src = r[fact["sources"]]
    return {"top1": float(src.min() == 1), "recall@3": float((src <= 3).sum() / 3),
            "mrr": 1.0 / src.min(),
            "decoy>src": float(fact["attr"] == "capital" and r[fact["decoy"]] < src.min())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default=".datablame-cache/facts")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lora-epochs", type=int, default=100)
    ap.add_argument("--out", default="bench/results/facts.json")
    args = ap.parse_args()
    from datablame.data.template import PromptTemplate
    from datablame.demo.toy_lm import generate, load_toy_lm, normalize
    from datablame.features.projection import make_projector
    from datablame.methods.ekfac import EKFAC
    from datablame.methods.fusion import fused_key
    from datablame.methods.gradient_alignment import align
    from datablame.models.text_rows import TextRowsAdapter
    from datablame.text import Query, Tracer, build_index

    root = Path(args.workdir)
    rows, facts = build(root, args.seed, args.lora_epochs)
    if not (root / "index" / "manifest.json").exists():
        build_index(root / "train.jsonl", root / "index")
    lm, tok = load_toy_lm(root / "base", root / "adapter")
    tmpl = PromptTemplate()
    learned = 0
    for f in facts:
        q = PARAPHRASE[f["attr"]].format(e=f["country"])
        f["question"] = q
        f["answer"] = generate(lm, tok, tmpl.format({"instruction": q, "input": "",
                                                     "output": ""}).text)
        f["learned"] = normalize(f["value"]) in normalize(f["answer"]).split()
        learned += f["learned"]
    print(f"model reproduces {learned}/{len(facts)} facts for the paraphrased questions")

    results: dict[str, list[dict]] = {}

    def record(name: str, f: dict, scores: np.ndarray) -> None:
        results.setdefault(name, []).append(evaluate(scores, f))

    n = len(rows)
    retrieval = {}
    kept: list[tuple] = []
    for params in ("lora", "lora-b"):
        for loss_on in ("response", "text"):
            tag = f"{params}/{loss_on}"
            tracer = Tracer(root / "index", root / "base", root / "adapter", loss_on=loss_on,
                            params=params)
            texts = [tracer.row_text(i) for i in range(n)]
            g = tracer.model.gradients(texts, batch_size=32)
            proj = make_projector("countsketch", g.shape[1], 2048, seed=0)
            pg = proj.project(g)
            unit = pg / np.linalg.norm(pg, axis=1, keepdims=True)
            # TRAK-style correction: scores through the inverse (damped) Gram of the
            # training gradients, which down-weights directions every row shares.
            gram = unit.T @ unit
            lam = 0.1 * np.trace(gram) / gram.shape[0]
            inv = np.linalg.inv(gram + lam * np.eye(gram.shape[0]))
            whiten = None
            if tag == "lora-b/response":  # the store's `--curvature ekfac` fit, all rows
                ek = EKFAC(samples=EKFAC().draws_for(n))
                ek.fit_curvature(TextRowsAdapter(tracer.model, 16), texts)
                w_rows = ek.whiten(g).numpy()

                def whiten(v, ek=ek):
                    return ek.whiten(v[None]).numpy()[0]
            for f in facts:
                if not f["learned"]:
                    continue
                query = Query(f["answer"], {"instruction": f["question"], "input": ""})
                qg = tracer.model.gradients([query.formatted(tracer.template)])[0]
                cos = align(qg, g)
                if id(f) not in retrieval:
                    ids, dist = tracer.retrieve(query, n)  # cosine distance, best first
                    ret = np.empty(n)
                    ret[ids] = -dist
                    retrieval[id(f)] = ret
                    record("retrieval", f, ret)
                ret = retrieval[id(f)]
                record(f"grad-cos {tag}", f, cos)
                if whiten is not None:  # the trace default's inputs, for text_fusion.py
                    wcos = align(whiten(qg), w_rows)
                    kept.append((cos, ret, f["sources"], wcos))
                    record(f"ekfac cosine (whitened) {tag}", f, wcos)
                record(f"grad-dot {tag}", f, align(qg, g, "dot"))
                qp = proj.project(qg[None])[0]
                record(f"trak-style {tag}", f, unit @ (inv @ (qp / np.linalg.norm(qp))))
                top = np.argsort(-ret)[:20]  # the seed: retrieve 20, re-rank by gradient
                seed = np.full(n, -np.inf)
                seed[top] = cos[top]
                record(f"retrieve20+grad-cos {tag}", f, seed)
                for k in (1, 60):  # reciprocal-rank fusion of signed gradient rank
                    record(f"fused(k={k}) {tag}", f,
                           1 / (k + ranks_of(ret)) + 1 / (k + ranks_of(cos)))
                record(f"|grad-cos| {tag}", f, np.abs(cos))  # strength, either sign
                record(f"trace default (fused key) {tag}", f,
                       fused_key(cos, ranks_of(np.abs(cos)), ranks_of(ret)))
                record(f"fused(k=1, |grad|) {tag}", f,
                       1 / (1 + ranks_of(ret)) + 1 / (1 + ranks_of(np.abs(cos))))
                if loss_on == "response":  # --focus on the fact's value in the answer
                    focused = Query(f["answer"], query.prompt, focus=f["value"])
                    fcos = align(tracer.model.gradients([focused.formatted(tracer.template)])[0],
                                 g)
                    record(f"grad-cos focus=value {tag}", f, fcos)
                    record(f"fused(k=1) focus=value {tag}", f,
                           1 / (1 + ranks_of(ret)) + 1 / (1 + ranks_of(fcos)))
                    record(f"fused(k=1, |grad|) focus=value {tag}", f,
                           1 / (1 + ranks_of(ret)) + 1 / (1 + ranks_of(np.abs(fcos))))
                    top = np.argsort(-ret)[:50]  # the retrieval path: fusion in its top 50
                    inside = np.full(n, -np.inf)
                    inside[top] = 1 / (1 + ranks_of(ret[top])) + \
                        1 / (1 + ranks_of(np.abs(cos[top])))
                    record(f"retrieve50 + fused(|grad|) {tag}", f, inside)
                    inside[top] = fused_key(cos[top], ranks_of(np.abs(cos[top])),
                                            ranks_of(ret[top]))
                    record(f"trace default within retrieval's top 50 {tag}", f, inside)
                    record(f"trace default (fused key) focus=value {tag}", f,
                           fused_key(fcos, ranks_of(np.abs(fcos)), ranks_of(ret)))

    np.savez_compressed(root / "scores-lora-b-response.npz",
                        cos=np.array([k[0] for k in kept]), ret=np.array([k[1] for k in kept]),
                        sources=np.array([k[2] for k in kept]),
                        wcos=np.array([k[3] for k in kept]))
    table = []
    print(f"\n{'method':42s} {'top1':>6s} {'recall@3':>9s} {'mrr':>6s} {'decoy>src':>10s}")
    for name, evs in results.items():
        row = {"method": name, "queries": len(evs),
               **{k: float(np.mean([e[k] for e in evs])) for k in evs[0]}}
        row["decoy>src"] = float(np.sum([e["decoy>src"] for e in evs]))
        table.append(row)
        print(f"{name:42s} {row['top1']:6.2f} {row['recall@3']:9.2f} {row['mrr']:6.2f} "
              f"{row['decoy>src']:10.0f}")
    Path(args.out).write_text(json.dumps(with_provenance({"facts": facts, "results": table}),
                                         indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
