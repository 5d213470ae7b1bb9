"""Which ordering should `trace` default to? Fusion rules scored by LDS against retraining.

    .venv/bin/python bench/text_fusion.py [--out bench/results/text_fusion.json]

Reads what bench/text_lds.py leaves in its workdirs: every method's score matrix
(`scores-<recipe>.npz`) and the query losses after each cached retraining
(`subset_losses-<recipe><protocol>.json`). No model is loaded and nothing is retrained, so
a new rule costs seconds to score on every protocol.

The rule is chosen on seed 0's protocols only (the `tune` rows): among rules that put a
planted source first at least as often as the previous default did (or for >= 95% of the
queries, the issue's target) on every tuning planted set (bench/facts.py seed 0, the demo's
reworded queries from bench/paraphrase.py) and on average over the tuning protocols, the
largest *worst shortfall* of the rule's LDS below the better of its
two inputs (the signed gradient cosine and the retrieval rank) over the tuning protocols,
ties broken by mean LDS. Seed 1's protocols (another model, other people, other
retrainings) and facts seed 1 (a model trained 150 epochs) are reported beside them; the
table printed every rule on them too, so they were seen while rules were added. Seed 2
(`fresh`: a new model, people and retrainings, and a new facts model) was built only
after the rule was fixed.

Second round (the whitened store, `index --gradients --curvature ekfac`): the same rule
over both families, the plain-cosine keys and the same keys on the cosine of gradients
whitened by EK-FAC, each rule's shortfall measured below the better of *its own* inputs.
Seeds 1 and 2 are held out, not fresh, for this round: the whitened cosine alone, and one
whitened key, were printed on them before. Seed 3 (`new`) printed the whitened cosine
alone, no key; seed 4 (`fresh`) was retrained before the round began and scored after the
rule was fixed (`--uses "tune,held out"` while choosing).

Third round (stop 33): a store holding both the plain and the whitened vectors. Keys on
their mix, (1 - m) plain + m whitened cosine, and "regime" keys: per query, the mix with a
small retrieval bonus where the best plain |cosine| over the rows reaches tau (a smooth
fine-tune), the default key on the plain cosine below it (a memorised answer). Chosen over
every key of every family on seed 0's tuning protocols, with these planted clauses instead
of the first round's: the tuning planted sets as before, the suite's retrieval-blind demo
prompts (tests/test_trace_end_to_end.py: gradient rank <= 3, key rank <= 5), and top-1 on
the memorising tuning protocol (80 epochs) no lower than the default's. Seeds 1-5 are
held out for it (their inputs were printed before); seed 6 was retrained after the rule
and the choice were committed (c12c6ce).

    cd bench && ../.venv/bin/python text_lds.py --seed 2 --epochs 10 --no-magic \
        --workdir ../.datablame-cache/text-lds-s2     # and without --epochs (80)
    ../.venv/bin/python facts.py --seed 2 --lora-epochs 150 \
        --workdir ../.datablame-cache/facts-s2 --out /tmp/facts-s2.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from facts import ranks_of as ranks  # noqa: E402
from provenance import with_provenance  # noqa: E402
from text_lds import make_rows, planted, reciprocal_rank_fusion  # noqa: E402

from datablame.methods.fusion import (  # noqa: E402
    RETRIEVAL_BONUS,
    RETRIEVAL_BONUS_WHITENED,
    STRENGTH_BONUS,
    STRENGTH_BONUS_WHITENED,
    fused_key,
    strength_ranks,
)
from datablame.verify import SubsetRetraining, lds  # noqa: E402

CACHE = Path(__file__).resolve().parents[1] / ".datablame-cache"
TEN, EIGHTY, SMOOTH = "b8112af981", "d2a07cd942", "039dddcb39"
FRESH, NEW = "fresh", "new"
# (name, seed, recipe tag, kept fraction, same schedule?, use)
PROTOCOLS = [
    ("seed 0, 10 epochs, halves re-batched", 0, TEN, 0.5, False, "tune"),
    ("seed 0, 80 epochs, halves re-batched", 0, EIGHTY, 0.5, False, "tune"),
    ("seed 0, 10 epochs smooth, drop 2%, same schedule", 0, SMOOTH, 0.98, True, "tune"),
    ("seed 1, 10 epochs, halves re-batched", 1, TEN, 0.5, False, "held out"),
    ("seed 1, 80 epochs, halves re-batched", 1, EIGHTY, 0.5, False, "held out"),
    ("seed 1, 10 epochs smooth, drop 2%, same schedule", 1, SMOOTH, 0.98, True, "held out"),
    ("seed 1, 10 epochs smooth, drop 10%, same schedule", 1, SMOOTH, 0.9, True, "held out"),
    ("seed 1, 10 epochs, drop 2%, same schedule", 1, TEN, 0.98, True, "held out"),
    ("seed 1, 10 epochs, drop 10%, same schedule", 1, TEN, 0.9, True, "held out"),
    # built after the plain-cosine rule was fixed (its fresh check); the whitened cosine
    # alone was then printed on it, so for the whitened rules it is held out, not fresh
    ("seed 2, 10 epochs, halves re-batched", 2, TEN, 0.5, False, "held out"),
    ("seed 2, 80 epochs, halves re-batched", 2, EIGHTY, 0.5, False, "held out"),
    # seed 3: built after EK-FAC's options were fixed; the whitened cosine alone was
    # printed on it, no fused key. Seed 4: built before the whitened rules were scored
    # anywhere this round, scored only after the choice.
    ("seed 3, 10 epochs, halves re-batched", 3, TEN, 0.5, False, NEW),
    ("seed 4, 10 epochs, halves re-batched", 4, TEN, 0.5, False, FRESH),
    # seed 5 (stop 32): retrained after a rule for the default's curvature was written
    # down (commit 7b41994), scored once; no key was chosen on it
    ("seed 5, 10 epochs, halves re-batched", 5, TEN, 0.5, False, FRESH),
    # seed 6 (stop 33): retrained after the third round's key was chosen and its rule
    # written down (commit c12c6ce), scored once
    ("seed 6, 10 epochs, halves re-batched", 6, TEN, 0.5, False, FRESH),
]
GRADIENT, RETRIEVAL = "grad-cos (lora-b)", "retrieval"
# the cosine of gradients whitened by EK-FAC, as a store built with --curvature ekfac holds
# them (LoRA-B, the curvature fitted on every row): the second family of rules
WHITENED = "ekfac cosine (whitened gradients, lora-b)"
SOURCES = {"cos": GRADIENT, "wcos": WHITENED}  # score matrix of each rule's gradient input
# planted sources (bench/facts.py's score matrices): top-1 must stay >= PLANTED_TOP1 on the
# tuning set, the target for planted culprits
PLANTED = [("facts, seed 0", "facts", "scores-lora-b-response.npz", "tune"),
           ("demo culprit, reworded (paraphrase.py)", "demo", "scores-paraphrase.npz", "tune"),
           ("facts, seed 1 (150 epochs)", "facts-s1", "scores-lora-b-response.npz",
            "held out"),
           ("facts, seed 2 (150 epochs)", "facts-s2", "scores-lora-b-response.npz",
            "held out")]
PLANTED_TOP1 = 0.95
# the demo's reworded prompts that tests/test_trace_end_to_end.py traces (retrieval ranks
# the culprit past 50): the test wants it in the gradient order's top 3, the key's top 5
BLIND, BLIND_GRADIENT_RANK, BLIND_KEY_RANK = (1, 2, 3), 3, 5
OLD = "old default: RRF, |gradient| rank + retrieval rank"
CURRENT = "trace default now (datablame.methods.fusion.fused_key)"
WHITENED_CURRENT = "whitened store's key now (fused_order(whitened=True))"
# the planted floor is the ordering a choice would replace: the RRF rule in the first
# round; in the second, the plain-cosine fused key for the default, and for a whitened
# store's own key the first key it was built with (bonuses 0.25 / 0.25)
REFERENCE = CURRENT
WHITENED_REFERENCE = ("whitened cosine + 0.25/(1 + retrieval rank) + 0.25/(1 + |whitened| "
                      "rank)")


def source_rank(key: np.ndarray, fact: dict) -> int:
    """1-based rank of the fact's first source under `key` (ties: stable order)."""
    return int(np.flatnonzero(np.argsort(-key, kind="stable") == fact["sources"][0])[0]) + 1


def retrievals(scores: np.ndarray) -> np.ndarray:
    return np.array([ranks(s) for s in scores])


def gradient_input(rule: dict, grads: dict[str, np.ndarray]) -> np.ndarray:
    """The gradient score a rule orders by, per query and row: the plain or whitened
    cosine, their mix ((1 - m) plain + m whitened, a store holding both), or, for a
    "regime" rule, per query the mix where the best plain |cosine| reaches tau (a smooth
    fine-tune) and the plain cosine below it (a memorised answer)."""
    if rule["kind"] == "regime" or rule.get("grad") == "mix":
        mix = (1 - rule["m"]) * grads["cos"] + rule["m"] * grads["wcos"]
        if rule["kind"] != "regime":
            return mix
        return np.where(smooth_regime(rule, grads), mix, grads["cos"])
    return grads[rule.get("grad", "cos")]


def smooth_regime(rule: dict, grads: dict[str, np.ndarray]) -> np.ndarray:
    """(queries, 1): True where the query's best plain |cosine| over the rows is >= tau."""
    return np.abs(grads["cos"]).max(1, keepdims=True) >= rule["tau"]


def rule_scores(rule: dict, grads: dict[str, np.ndarray], retrieval: np.ndarray) -> np.ndarray:
    """One query's ordering key per row under a fusion rule (see `rules`); `grads` holds
    each gradient input's matrix by `SOURCES` key."""
    r_rank = retrievals(retrieval)
    grad = gradient_input(rule, grads)
    if rule["kind"] == "regime":  # the smooth regime's key, or the default's on plain
        smooth = rule_scores({**rule, "kind": "additive", "scaled": False, "grad": "mix"},
                             grads, retrieval)
        plain = rule_scores({"kind": "library", "bonus": RETRIEVAL_BONUS,
                             "strength_bonus": STRENGTH_BONUS}, grads, retrieval)
        return np.where(smooth_regime(rule, grads), smooth, plain)
    if rule["kind"] == "library":
        return np.array([fused_key(g, strength_ranks(g), rr, retrieval_bonus=rule["bonus"],
                                   strength_bonus=rule["strength_bonus"])
                         for g, rr in zip(grad, r_rank, strict=True)])
    if rule["kind"] == "rrf":
        g_rank = np.array([strength_ranks(g) if rule["strength"] else ranks(g) for g in grad])
        return reciprocal_rank_fusion(g_rank, r_rank)
    # additive: the signed gradient, scaled by its strongest row, plus a bonus for the head
    # of the retrieval list (and optionally of the |gradient| list)
    scale = (np.abs(grad).max(1, keepdims=True) + 1e-12 if rule.get("scaled", True)
             else 1.0)
    key = grad / scale + rule["alpha"] / (1.0 + r_rank)
    if rule.get("beta"):
        key += rule["beta"] / (1.0 + np.array([ranks(g) if rule.get("signed") else
                                                strength_ranks(g) for g in grad]))
    return key


def rules() -> list[dict]:
    out = [{"name": CURRENT, "kind": "library", "bonus": RETRIEVAL_BONUS,
            "strength_bonus": STRENGTH_BONUS},
           {"name": WHITENED_CURRENT, "kind": "library", "bonus": RETRIEVAL_BONUS_WHITENED,
            "strength_bonus": STRENGTH_BONUS_WHITENED, "grad": "wcos"},
           {"name": OLD, "kind": "rrf",
            "strength": True},
           {"name": "RRF, signed gradient rank + retrieval rank", "kind": "rrf",
            "strength": False}]
    for alpha in (0.0, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0):
        for beta in (0.0, 0.5):
            out.append({"name": f"gradient / max|gradient| + {alpha:g}/(1 + retrieval rank)"
                                + (f" + {beta:g}/(1 + |gradient| rank)" if beta else ""),
                        "kind": "additive", "alpha": alpha, "beta": beta})
    # the cosine as it is: a bounded score, so a fixed retrieval bonus weighs more where
    # the best-aligned row is weakly aligned (a memorised answer's gradient is noise)
    for alpha in (0.1, 0.25, 0.5, 0.75, 1.0, 1.5):
        for beta in (0.0, 0.25, 0.5):
            out.append({"name": f"gradient cosine + {alpha:g}/(1 + retrieval rank)"
                                + (f" + {beta:g}/(1 + |gradient| rank)" if beta else ""),
                        "kind": "additive", "alpha": alpha, "beta": beta, "scaled": False})
            if beta:  # the head of the signed gradient list instead of the |gradient| one
                out.append({"name": f"gradient cosine + {alpha:g}/(1 + retrieval rank)"
                                    f" + {beta:g}/(1 + gradient rank)", "kind": "additive",
                            "alpha": alpha, "beta": beta, "scaled": False, "signed": True})
    for alpha, beta in ((0.5, 0.5), (0.75, 0.75), (1.0, 0.75), (1.0, 1.0), (1.5, 1.0)):
        out.append({"name": f"gradient cosine + {alpha:g}/(1 + retrieval rank) + {beta:g}/(1 + "
                            "|gradient| rank)", "kind": "additive", "alpha": alpha,
                    "beta": beta, "scaled": False})
    # the same family on the whitened cosine (a store built with --curvature ekfac)
    for alpha in (0.0, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5):
        for beta in (0.0, 0.25, 0.5):
            out.append({"name": f"whitened cosine + {alpha:g}/(1 + retrieval rank)"
                                + (f" + {beta:g}/(1 + |whitened| rank)" if beta else ""),
                        "kind": "additive", "alpha": alpha, "beta": beta, "scaled": False,
                        "grad": "wcos"})
    # third round (stop 33): a store holding both vectors. The mixed cosine, and the
    # regime key: the mix with a small retrieval bonus where the gradient is strong, the
    # default key on the plain cosine where it is weak (a memorised answer)
    for m in (0.25, 0.5, 0.75):
        for alpha in (0.1, 0.25, 0.5, 1.0):
            for beta in (0.0, 0.25):
                out.append({"name": f"mix {m:g} + {alpha:g}/(1 + retrieval rank)"
                                    + (f" + {beta:g}/(1 + |mix| rank)" if beta else ""),
                            "kind": "additive", "alpha": alpha, "beta": beta,
                            "scaled": False, "grad": "mix", "m": m})
    for m in (0.25, 0.5, 0.75, 1.0):
        for alpha in (0.1, 0.25):
            for beta in (0.0, 0.25):
                for tau in (0.3, 0.4, 0.5):
                    out.append({"name": f"regime tau {tau:g}: mix {m:g} + {alpha:g}/(1 + "
                                        "retrieval rank)" + (f" + {beta:g}/(1 + |mix| rank)"
                                                             if beta else "")
                                        + "; else the default key",
                                "kind": "regime", "alpha": alpha, "beta": beta, "m": m,
                                "tau": tau})
    return out


def third_round(rule: dict) -> bool:
    return rule["kind"] == "regime" or rule.get("grad") == "mix"


def load(seed: int, tag: str, fraction: float, same: bool):
    root = CACHE / f"text-lds-s{seed}"
    protocol = ("-same-schedule" if same else "") + (f"-keep{fraction:g}"
                                                     if fraction != 0.5 else "")
    npz, losses = root / f"scores-{tag}.npz", root / f"subset_losses-{tag}{protocol}.json"
    if not npz.exists() or not losses.exists():
        return None
    scores = dict(np.load(npz))
    n_subsets = len(json.loads(losses.read_text())["losses"])

    def refuse(*_):
        raise SystemExit(f"{losses} does not hold every retraining: run bench/text_lds.py")

    subsets = SubsetRetraining(refuse, scores[GRADIENT].shape[1], n_subsets=n_subsets,
                               fraction=fraction, seed=seed, cache=losses)
    return scores, subsets


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/text_fusion.json")
    ap.add_argument("--uses", default="tune,held out,new,fresh",
                    help="which protocols to load and print (comma-separated): leave the "
                         "fresh ones out until the rule is fixed")
    args = ap.parse_args()
    uses = set(args.uses.split(","))
    table = []
    for name, seed, tag, fraction, same, use in PROTOCOLS:
        if use not in uses:
            continue
        loaded = load(seed, tag, fraction, same)
        if loaded is None:
            print(f"skipped (not built yet): {name}")
            continue
        scores, subsets = loaded
        if WHITENED not in scores:
            print(f"skipped (scores before the whitened store; rerun text_lds.py): {name}")
            continue
        queries = make_rows(seed)[1]
        grads, retrieval = {k: scores[v] for k, v in SOURCES.items()}, scores[RETRIEVAL]
        ret_lds = lds(1.0 / (1 + retrievals(retrieval)), subsets)["lds"]
        grad_lds = {k: lds(g, subsets)["lds"] for k, g in grads.items()}
        inputs = {"gradient cosine (signed)": grad_lds["cos"],
                  "whitened cosine (signed)": grad_lds["wcos"],
                  "retrieval, 1/(1 + rank)": ret_lds}
        row = {"protocol": name, "use": use, "inputs": inputs, "rules": {}}
        for rule in rules():
            key = rule_scores(rule, grads, retrieval)
            result = lds(key, subsets)
            # below the better of *its own* two inputs
            own = grad_lds.get(rule.get("grad", "cos")) if not third_round(rule) else \
                lds(gradient_input(rule, grads), subsets)["lds"]
            better = max(own, ret_lds)
            row["rules"][rule["name"]] = {"lds": result["lds"], "ci95": result["ci95"],
                                          "shortfall": result["lds"] - better,
                                          **planted(key, queries)}
        table.append(row)

    planted_sets = []
    for name, workdir, file, use in PLANTED:
        path = CACHE / workdir / file
        if not path.exists():
            print(f"skipped (run bench/facts.py / bench/paraphrase.py first): {name}")
            continue
        m = np.load(path)
        if "wcos" not in m:
            print(f"skipped (scores before the whitened store; rerun it): {name}")
            continue
        facts = [{"sources": s.tolist(), "n_sources": len(s)} for s in m["sources"]]
        by_rule = {}
        for rule in rules():
            grads = {"cos": m["cos"], "wcos": m["wcos"]}
            key = rule_scores(rule, grads, m["ret"])
            by_rule[rule["name"]] = planted(key, facts)
            if workdir == "demo":  # the suite's retrieval-blind prompts (queries 1-3)
                by_rule[rule["name"]]["blind"] = {
                    "gradient rank": [source_rank(gradient_input(rule, grads)[q],
                                                  facts[q]) for q in BLIND],
                    "key rank": [source_rank(key[q], facts[q]) for q in BLIND]}
        planted_sets.append({"planted": name, "use": use, "rules": by_rule})

    tune = [r for r in table if r["use"] == "tune"]
    names = [rule["name"] for rule in rules()]

    def planted_ok(rule: str, reference: str) -> bool:
        """Sources first no less often than `reference` (or >= PLANTED_TOP1) on every
        tuning planted set, and on average over the tuning protocols."""
        return (all(p["rules"][rule]["top1"] >= min(PLANTED_TOP1,
                                                     p["rules"][reference]["top1"])
                    for p in planted_sets if p["use"] == "tune")
                and mean(rule, tune, "top1") >= mean(reference, tune, "top1"))

    def worst(rule: str, rows: list[dict]) -> float:
        return min(r["rules"][rule]["shortfall"] for r in rows)

    def mean(rule: str, rows: list[dict], what: str = "lds") -> float:
        return float(np.mean([r["rules"][rule][what] for r in rows]))

    def choose(candidates: list[str], reference: str) -> str:
        return max(candidates, key=lambda n: (planted_ok(n, reference),
                                              round(worst(n, tune), 2), mean(n, tune)))

    def planted_ok_both(rule: str) -> bool:
        """The third round's planted clauses (module docstring): the tuning planted sets
        as `planted_ok`, the suite's retrieval-blind prompts, and sources first no less
        often than the default where the model memorised its rows (80 epochs)."""
        demo = [p["rules"][rule]["blind"] for p in planted_sets if "blind" in p["rules"][rule]]
        memorised = [r for r in tune if "80 epochs" in r["protocol"]]
        return (all(p["rules"][rule]["top1"] >= min(PLANTED_TOP1,
                                                     p["rules"][REFERENCE]["top1"])
                    for p in planted_sets if p["use"] == "tune")
                and bool(demo) and all(max(b["gradient rank"]) <= BLIND_GRADIENT_RANK and
                                       max(b["key rank"]) <= BLIND_KEY_RANK for b in demo)
                and bool(memorised) and mean(rule, memorised, "top1") >=
                mean(REFERENCE, memorised, "top1"))

    if not any(p["planted"].startswith("demo") for p in planted_sets):
        print("no demo planted set (bench/paraphrase.py): no third-round key can pass")
    earlier = [rule["name"] for rule in rules() if not third_round(rule)]
    chosen = choose(earlier, REFERENCE)  # the default (a plain store)
    # a whitened store's own key, among the keys on the whitened cosine
    chosen_whitened = choose([rule["name"] for rule in rules()
                              if rule.get("grad") == "wcos"], WHITENED_REFERENCE)
    # third round: a store holding plain and whitened vectors, every key of every family
    chosen_both = max(names, key=lambda n: (planted_ok_both(n), round(worst(n, tune), 2),
                                            mean(n, tune)))
    for use in ("tune", "held out", NEW, FRESH):
        rows = [r for r in table if r["use"] == use]
        if not rows:
            continue
        print(f"\n== {use}: " + " | ".join(r["protocol"] for r in rows))
        print("inputs: " + " | ".join(", ".join(f"{k} {v:.3f}" for k, v in r["inputs"].items())
                                      for r in rows))
        sets = [p for p in planted_sets if p["use"] == use]
        print(f"{'rule':84s} {'worst':>6s} {'mean':>6s} {'top1':>5s}  LDS per protocol"
              + "".join(f" | {p['planted']}: top1 r@3" for p in sets))
        for n in sorted(names, key=lambda n: -worst(n, rows)):
            mark = "*" if n == chosen else "w" if n == chosen_whitened else \
                "b" if n == chosen_both else " "
            print(f"{mark}{n:83s} {worst(n, rows):6.3f} {mean(n, rows):6.3f} "
                  f"{mean(n, rows, 'top1'):5.2f}  "
                  + " ".join(f"{r['rules'][n]['lds']:6.3f}" for r in rows)
                  + "".join(f" | {p['rules'][n]['top1']:.2f} "
                            f"{p['rules'][n]['recall@3 (3-source)']:.2f}" for p in sets))
    print(f"\nchosen on the tuning protocols (*): {chosen}")
    print(f"chosen for a whitened store (w): {chosen_whitened}")
    print(f"chosen for a store of both vectors (b): {chosen_both}")
    for p in planted_sets:
        if "blind" in p["rules"][chosen_both]:
            print(f"  retrieval-blind prompts, (b) vs default (*): "
                  f"{p['rules'][chosen_both]['blind']} vs {p['rules'][chosen]['blind']}")
    Path(args.out).write_text(json.dumps(with_provenance(
        {"criterion": f"among rules with top-1 >= min({PLANTED_TOP1}, the previous "
                      "default's) on every tuning planted set and mean top-1 on the tuning "
                      "protocols >= the previous default's, max of the worst (LDS - better "
                      "input's LDS) on the tuning protocols; ties (2 decimals) by mean LDS",
         "criterion_whitened": "the same among the rules on the whitened cosine, the "
                               f"planted floor set by '{WHITENED_REFERENCE}'",
         "planted": planted_sets,
         "criterion_both": "over every rule: top-1 >= min(0.95, the default's) on every "
                           "tuning planted set, the suite's retrieval-blind demo prompts at "
                           f"gradient rank <= {BLIND_GRADIENT_RANK} and key rank <= "
                           f"{BLIND_KEY_RANK}, top-1 on the memorising tuning protocol (80 "
                           "epochs) >= the default's; then as the criterion",
         "chosen": chosen, "chosen_whitened": chosen_whitened, "chosen_both": chosen_both,
         "table": table}), indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
