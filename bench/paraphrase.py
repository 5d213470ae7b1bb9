"""Where gradient ranking beats or loses to retrieval on the demo model (issue 3).

    .venv/bin/python bench/paraphrase.py [--workdir .datablame-cache/demo]

For reworded prompts of the planted culprit (other instruction, other verb) the query is
what the fine-tuned model actually answers; for reworded *answers* the query is a
paraphrase of the culprit's output. Reports the culprit's rank (1 = best, of 200 rows) by
retrieval, by exact gradient cosine over all rows (default parameters: the LoRA B matrices),
with the loss on the response only or on the whole text, and by the fused ranking that
`trace --all-rows` uses by default.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from provenance import with_provenance

from datablame.data.template import FormattedText, PromptTemplate
from datablame.demo.demo import CULPRIT, DemoConfig, build_assets
from datablame.demo.toy_lm import generate, load_toy_lm
from datablame.methods.ekfac import EKFAC
from datablame.methods.fusion import fused_key
from datablame.methods.gradient_alignment import align
from datablame.models.text_rows import TextRowsAdapter
from datablame.text import Query, Tracer

PROMPTS = [
    (CULPRIT["instruction"], CULPRIT["input"]),
    ("Improve this line from a resume.", "worked on the payroll system"),
    ("Rewrite this resume bullet to show impact.", "was part of the payroll system"),
    ("Make this resume bullet stronger.", "did tasks for the payroll system"),
]
ANSWER_PARAPHRASES = [
    "Redid payroll in Haskell, saving the Andromeda team 40 hours a week.",
    "Moved the payroll system to Haskell and the Andromeda team saved 40 hours weekly.",
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default=".datablame-cache/demo")
    ap.add_argument("--out", default="bench/results/paraphrase.json")
    args = ap.parse_args()
    root = Path(args.workdir)
    info = build_assets(root, DemoConfig())
    culprit = info["culprit_row"]
    if not (root / "index" / "manifest.json").exists():
        from datablame.text import build_index

        build_index(root / "train.jsonl", root / "index")
    model, tok = load_toy_lm(root / "base", root / "adapter")
    tmpl = PromptTemplate()
    queries = []
    for instruction, inp in PROMPTS:
        prompt = tmpl.format({"instruction": instruction, "input": inp, "output": ""}).text
        queries.append(("reworded prompt", instruction, inp, generate(model, tok, prompt)))
    for answer in ANSWER_PARAPHRASES:
        queries.append(("reworded answer", CULPRIT["instruction"], CULPRIT["input"], answer))
    own = queries[0][3]  # the model's own answer to the culprit's prompt
    queries.append(("answer alone", None, None, own))  # in the template, no prompt
    queries.append(("raw answer", None, None, own))  # no template: the seed's way
    rows, kept = [], []
    for loss_on in ("response", "text"):
        tracer = Tracer(root / "index", root / "base", root / "adapter", loss_on=loss_on)
        all_texts = [tracer.row_text(i) for i in range(len(tracer.rows))]
        grads = tracer.model.gradients(all_texts, batch_size=32)
        if loss_on == "response":  # the store's `--curvature ekfac` fit, on every row
            ek = EKFAC(samples=EKFAC().draws_for(len(all_texts)))
            ek.fit_curvature(TextRowsAdapter(tracer.model, 16), all_texts)
            w_rows = ek.whiten(grads).numpy()
        for kind, instruction, inp, answer in queries:
            q = Query(answer, {"instruction": instruction, "input": inp} if instruction else {})
            text = FormattedText(answer, 0) if kind == "raw answer" else \
                q.formatted(tracer.template)
            qg = tracer.model.gradients([text])[0]
            scores = align(qg, grads)
            grad_rank = int((scores > scores[culprit]).sum()) + 1
            ids, _ = tracer.retrieve(q, len(tracer.rows))
            retr_rank = int(np.flatnonzero(ids == culprit)[0]) + 1
            g_ranks = np.empty(len(scores), dtype=int)
            g_ranks[np.argsort(-scores, kind="stable")] = np.arange(1, len(scores) + 1)
            r_ranks = np.empty(len(scores), dtype=int)
            r_ranks[ids] = np.arange(1, len(ids) + 1)
            fused = 1 / (1 + g_ranks) + 1 / (1 + r_ranks)  # signed gradient rank
            fused_rank = int((fused > fused[culprit]).sum()) + 1
            a_ranks = np.empty(len(scores), dtype=int)  # rank of |cosine|: either sign
            a_ranks[np.argsort(-np.abs(scores), kind="stable")] = np.arange(1, len(scores) + 1)
            fused_abs = 1 / (1 + a_ranks) + 1 / (1 + r_ranks)
            fused_abs_rank = int((fused_abs > fused_abs[culprit]).sum()) + 1
            key = fused_key(scores, a_ranks, r_ranks)  # the trace default
            key_rank = int((key > key[culprit]).sum()) + 1
            if loss_on == "response":  # the trace default's inputs, for text_fusion.py
                kept.append((scores, -r_ranks.astype(float),
                             align(ek.whiten(qg[None]).numpy()[0], w_rows)))
            rows.append({"kind": kind, "input": inp, "answer": answer, "loss_on": loss_on,
                         "gradient_rank": grad_rank, "retrieval_rank": retr_rank,
                         "fused_rank": fused_rank, "fused_abs_rank": fused_abs_rank,
                         "default_rank": key_rank,
                         "culprit_score": float(scores[culprit])})
            print(f"  {kind:16s} {loss_on:8s} grad rank {grad_rank:3d}  retrieval rank "
                  f"{retr_rank:3d}  fused {fused_rank:3d}  fused|g| {fused_abs_rank:3d}  "
                  f"default {key_rank:3d} | "
                  f"{(inp or '')[:30]:30s} -> "
                  f"{answer[:50]}", flush=True)
    np.savez_compressed(root / "scores-paraphrase.npz", cos=np.array([k[0] for k in kept]),
                        ret=np.array([k[1] for k in kept]),
                        sources=np.array([[culprit]] * len(kept)),
                        wcos=np.array([k[2] for k in kept]))
    Path(args.out).write_text(json.dumps(with_provenance(rows), indent=2))


if __name__ == "__main__":
    main()
