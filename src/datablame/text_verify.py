"""Verify a text attribution by retraining: the seed's "data perturbation".

Re-fine-tune the base model with the adapter's recipe (a) on every row (the control: does
the recipe reproduce what the model says?), (b) without the rows a trace blamed, and (c)
without as many random rows, several times; then compare, for each model, the query's
loss and what it generates greedily from the query's prompt. An attribution is confirmed
when removing the blamed rows makes the model stop saying it while removing random rows
does not: "after removing rows 42, 97 the model no longer says '...'".

Every retraining is a complete adapter in the cache directory, named by the rows it kept
and the recipe, so an interrupted run resumes and a second query reuses them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np

from datablame import progress
from datablame.data.rows import load_rows
from datablame.errors import UserError
from datablame.models.hf_causal_lm import greedy  # noqa: F401  (old import path)
from datablame.models.lora_finetune import (
    RECIPE_FILE,
    Recipe,
    check_recipe_fits_adapter,
    finetune,
    recipe_of_adapter,
    rows_digest,
)
from datablame.tabular import checked_removal

SAME_SCHEDULE = "same schedule: left-out rows weigh 0 in the full run's batches"
REBATCHED = "re-batched: the kept rows in a new order"


def _words(text: str) -> list[str]:
    return re.findall(r"\w+|[^\w\s]", text.lower())


def says(generation: str, answer: str) -> bool:
    """Does the generation contain the answer, word for word (case and spacing aside)?"""
    gen, ans = _words(generation), _words(answer)
    if not ans:
        return False
    return any(gen[i:i + len(ans)] == ans for i in range(len(gen) - len(ans) + 1))


def resolve_recipe(adapter_dir, recipe_file=None) -> tuple[Recipe, bool]:
    """(recipe, whether it came from the adapter itself); refuse one that does not fit."""
    if recipe_file is not None:
        recipe = Recipe.from_file(recipe_file)
        own = False
    else:
        recipe = recipe_of_adapter(adapter_dir)
        own = True
        if recipe is None:
            raise UserError(f"{adapter_dir} has no {RECIPE_FILE} (it was not fine-tuned by "
                            "datablame): pass --recipe describing how it was trained")
    check_recipe_fits_adapter(recipe, adapter_dir)
    return recipe, own


def _evaluate(base_dir, adapter_dir, query, prompt: str, answer: str, recipe: Recipe,
              max_new_tokens: int) -> dict:
    from datablame.models.hf_causal_lm import CausalLMAdapter

    lm = CausalLMAdapter(base_dir, adapter_dir, max_length=recipe.max_length,
                         loss_on=recipe.loss_on)
    loss = float(lm.losses([query])[0])
    generation = greedy(lm.model, lm.tokenizer, prompt, max_new_tokens,
                        add_special_tokens=query.add_special_tokens)
    return {"loss": loss, "generation": generation, "says": says(generation, answer)}


def _run_dir(cache: Path, name: str, keep: list[int], recipe: Recipe,
             same_schedule: bool = False) -> Path:
    import hashlib

    key = hashlib.sha256((rows_digest(keep) + json.dumps(recipe.to_json(), sort_keys=True))
                         .encode()).hexdigest()[:12]
    return cache / f"{name}{'-same-schedule' if same_schedule else ''}-{key}"


def verify_text(train_file, base_dir, adapter_dir, query, *, remove: list[int],
                n_random: int = 3, recipe_file=None, cache=None, max_new_tokens: int | None = None,
                seed: int = 0, same_schedule: bool = False) -> dict:
    """Retrain without `remove` (the rows a trace blamed) and without `n_random` random sets
    of as many rows; `query` is a `datablame.text.Query` (prompt fields + answer, or the
    whole formatted text). Returns JSON-able results with a verdict."""
    rows, recipe, recorded = _rows_and_recipe(train_file, adapter_dir, recipe_file)
    n = len(rows)
    remove = checked_removal(remove, n)
    if len(remove) * 2 > n:
        raise UserError(f"removing {len(remove)} of {n} rows leaves too few to compare with "
                        "random removals of the same size")
    if n_random < 1:
        raise UserError("--random needs at least 1 random removal to compare with")
    q, prompt, answer, budget = _query_parts(query, recipe, base_dir, rows, max_new_tokens)

    rng = np.random.default_rng(seed)
    blamed = set(remove)
    others = np.array([i for i in range(n) if i not in blamed])
    plan = [("all-rows", []), ("without-blamed", remove)]
    for s in range(n_random):
        plan.append((f"without-random-{s}",
                     sorted(rng.choice(others, len(remove), replace=False).tolist())))
    tmp = None
    if cache is None:
        tmp = Path(tempfile.mkdtemp(prefix="datablame-verify-"))
    cache_dir = Path(cache) if cache is not None else tmp
    try:
        result: dict = {"query": {"prompt": prompt, "answer": answer}, "n_train": n,
                        "removed": remove, "recipe": recipe.to_json(), "runs": {},
                        "retraining": SAME_SCHEDULE if same_schedule else REBATCHED}
        result["original"] = _evaluate(base_dir, adapter_dir, q, prompt, answer, recipe,
                                       budget)
        if is_all_rows_run(recorded, base_dir, recipe, n):
            # the adapter is this recipe on every row of this base: it is the control
            result["runs"]["all-rows"] = {"removed": [], "is_the_adapter": True,
                                          **result["original"]}
            plan = plan[1:]
        with progress.task("re-fine-tuning", len(plan)) as advance:
            for name, removed in plan:
                dropped = set(removed)
                keep = [i for i in range(n) if i not in dropped]
                out = _run_dir(cache_dir, name, keep, recipe, same_schedule)
                if not (out / RECIPE_FILE).exists():
                    finetune(rows, base_dir, out, recipe, keep=keep,
                             same_schedule=same_schedule, show_progress=False)
                result["runs"][name] = {"removed": removed, **_evaluate(
                    base_dir, out, q, prompt, answer, recipe, budget)}
                advance(1)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    result["verdict"], result["summary"] = _verdict(result)
    return result


def _query_parts(query, recipe: Recipe, base_dir, rows, max_new_tokens: int | None):
    """(the query as the recipe's template formats it, its prompt text, the answer's
    words without a chat's end-of-turn, a generation budget)."""
    template = recipe.prompt_template(base_dir, rows.columns)
    q = query.formatted(template)
    resolved = query.resolved(template)
    answer = resolved.focus or resolved.output
    return q, q.text[:q.response_start], answer, max_new_tokens or len(_words(answer)) + 8


def _rows_and_recipe(train_file, adapter_dir, recipe_file):
    """(rows, recipe, what finetune recorded or {}): the rows must be the adapter's own."""
    rows = load_rows(train_file)
    recipe, own = resolve_recipe(adapter_dir, recipe_file)
    recorded: dict = {}
    if own:
        recorded = json.loads((Path(adapter_dir) / RECIPE_FILE).read_text())
        fingerprint = recorded.get("data_fingerprint")
        if fingerprint and fingerprint != rows.fingerprint():
            raise UserError(f"the adapter {adapter_dir} was fine-tuned on other rows than "
                            f"{train_file} (data fingerprints differ)")
    return rows, recipe, recorded


def check_recipe_rows(rows, base_dir, adapter_dir, recipe_file=None) -> Recipe:
    """The recipe that replays `adapter_dir` on every row of `rows` from `base_dir`; refused
    when what finetune recorded says it was trained on other rows, a subset, or another
    base (a hand-written recipe is taken at its word: the replay's check catches it)."""
    from datablame.store.content_digest import dir_digest

    recipe, own = resolve_recipe(adapter_dir, recipe_file)
    if own:
        recorded = json.loads((Path(adapter_dir) / RECIPE_FILE).read_text())
        if recorded.get("data_fingerprint") not in (None, rows.fingerprint()):
            raise UserError(f"the adapter {adapter_dir} was fine-tuned on other rows than "
                            "the index's (data fingerprints differ)")
        if recorded.get("rows_kept", len(rows)) != len(rows):
            raise UserError(f"the adapter {adapter_dir} was fine-tuned on "
                            f"{recorded['rows_kept']} of the {len(rows)} rows: replay needs "
                            "an adapter trained on all of them")
        if recorded.get("base_digest") not in (None, dir_digest(base_dir)):
            raise UserError(f"the adapter {adapter_dir} was fine-tuned from another base "
                            f"model than {base_dir} (content differs)")
    return recipe


def lds_text(train_file, base_dir, adapter_dir, query, scores: np.ndarray, *,
             n_subsets: int, recipe_file=None, cache=None, seed: int = 0,
             keep_fraction: float = 0.5, same_schedule: bool = False,
             also: dict[str, np.ndarray] | None = None) -> dict:
    """Linear datamodeling score of one query's row scores: re-fine-tune with the recipe on
    `n_subsets` random subsets of the rows (`keep_fraction` of them: halves by default),
    and correlate (Spearman) the query loss each gives with the loss the scores predict
    for it (minus their sum over the rows kept). Each subset's adapter is kept in `cache`,
    so an interrupted run resumes and a second query costs no fine-tune. `same_schedule`:
    the single-model protocol (left-out rows weigh 0 in the full run's batches). `also`:
    other score columns scored on the same retrainings (`by_column`: their LDS and CI)."""
    from datablame.verify import SubsetRetraining

    rows, recipe, _ = _rows_and_recipe(train_file, adapter_dir, recipe_file)
    n = len(rows)
    scores = np.asarray(scores, dtype=float)
    if scores.shape != (n,):
        raise UserError(f"LDS needs one score per training row ({n}), got {scores.shape}")
    if n_subsets < 5:
        raise UserError(f"--lds-subsets {n_subsets}: a rank correlation needs at least 5 "
                        "retrainings (20 or more to read it)")
    if not 0 < keep_fraction < 1 or round(keep_fraction * n) in (0, n):
        raise UserError(f"--lds-keep {keep_fraction:g}: each retraining must keep some but "
                        f"not all of the {n} rows")
    q = query.formatted(recipe.prompt_template(base_dir, rows.columns))
    tmp = Path(tempfile.mkdtemp(prefix="datablame-lds-")) if cache is None else None
    cache_dir = Path(cache) if cache is not None else tmp

    def retrain(keep: np.ndarray, _seed: int) -> np.ndarray:
        from datablame.models.hf_causal_lm import CausalLMAdapter

        keep_ids = keep.tolist()
        name = "half" if keep_fraction == 0.5 else f"keep{keep_fraction:g}"  # old caches
        out = _run_dir(cache_dir, name, keep_ids, recipe, same_schedule)
        if not (out / RECIPE_FILE).exists():
            finetune(rows, base_dir, out, recipe, keep=keep_ids, same_schedule=same_schedule,
                     show_progress=False)
        lm = CausalLMAdapter(base_dir, out, max_length=recipe.max_length,
                             loss_on=recipe.loss_on)
        return lm.losses([q])

    try:
        halves = SubsetRetraining(retrain, n, n_subsets=n_subsets, fraction=keep_fraction,
                                  seed=seed)
        actual = halves.run()[:, 0]
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    predicted = -(halves.masks.astype(float) @ scores)
    rho, ci = _rank_correlation(predicted, actual, seed)
    by_column = {name: dict(zip(("lds", "ci95"), _rank_correlation(
        -(halves.masks.astype(float) @ np.asarray(other, dtype=float)), actual, seed),
        strict=True)) for name, other in (also or {}).items()}
    return {"lds": rho, "ci95": ci, **({"by_column": by_column} if by_column else {}),
            "subsets": n_subsets, "kept_fraction": keep_fraction,
            "retraining": SAME_SCHEDULE if same_schedule else REBATCHED,
            "query_loss": {"min": float(actual.min()),
                                                 "max": float(actual.max())},
            "points": [{"query": 0, "predicted": predicted.tolist(),
                        "actual": actual.tolist()}]}


def _rank_correlation(predicted: np.ndarray, actual: np.ndarray, seed: int
                      ) -> tuple[float, list[float]]:
    """Spearman correlation and its 95% bootstrap interval over the retrainings."""
    from datablame.verify import spearman

    rng = np.random.default_rng(seed)
    boots = [spearman(predicted[i], actual[i]) for i in
             (rng.integers(0, len(actual), len(actual)) for _ in range(1000))]
    return spearman(predicted, actual), [float(np.percentile(boots, 2.5)),
                                         float(np.percentile(boots, 97.5))]


def signed_scores_from_trace(path: str | os.PathLike, n: int) -> np.ndarray | None:
    """The `score` column (the signed estimate) when a trace's ordering key is another
    column (`fused`): the two answer different questions, so verify scores both."""
    _, key, _ = scores_from_trace(path, n)
    return None if key == "score" else scores_from_trace(path, n, "score")[0]


def scores_from_trace(path: str | os.PathLike, n: int, column: str | None = None
                      ) -> tuple[np.ndarray, str, int]:
    """(one score per row, which column, how many rows the trace listed) from a `trace
    --out` file: `column`, else the ordering key ("fused" when the trace fused, else
    "score"); rows the trace did not list count as 0."""
    results = _trace_results(Path(path))
    key = column or ("fused" if all("fused" in r for r in results) else "score")
    scores = np.zeros(n)
    for r in results:
        row = int(r["row"])
        if not 0 <= row < n:
            raise UserError(f"{path}: row {row} is not a row of the training file (0..{n - 1})")
        scores[row] = float(r[key])
    return scores, key, len(results)


def made_by_recipe(adapter_dir, base_dir, recipe: Recipe, n: int) -> bool:
    """Did `finetune` record making this adapter with this recipe, all n rows and base?"""
    path = Path(adapter_dir) / RECIPE_FILE
    return path.exists() and is_all_rows_run(json.loads(path.read_text()), base_dir, recipe, n)


def is_all_rows_run(recorded: dict, base_dir, recipe: Recipe, n: int) -> bool:
    """Did `finetune` make the adapter with this recipe, every row, and this base (by
    content)? Then retraining on all rows would reproduce it exactly (tested)."""
    from datablame.store.content_digest import dir_digest

    return bool(recorded) and recorded.get("recipe") == recipe.to_json() and \
        recorded.get("rows_digest") == rows_digest(range(n)) and \
        recorded.get("base_digest") == dir_digest(base_dir)


def _verdict(result: dict) -> tuple[str, str]:
    runs = result["runs"]
    control, blamed = runs["all-rows"], runs["without-blamed"]
    randoms = [r for name, r in runs.items() if name.startswith("without-random")]
    answer = result["query"]["answer"].strip()
    shown = answer if len(answer) <= 60 else answer[:57] + "..."
    k = len(result["removed"])
    rows = ("row " if k == 1 else "rows ") + ", ".join(map(str, result["removed"]))
    random_rows = "1 random row" if k == 1 else f"{k} random rows"
    still = sum(r["says"] for r in randoms)
    rise = blamed["loss"] - control["loss"]
    rand_rise = float(np.mean([r["loss"] - control["loss"] for r in randoms]))
    losses = (f"query loss {control['loss']:.3f} -> {blamed['loss']:.3f} without them "
              f"({rise:+.3f}) vs {rand_rise:+.3f} without random rows")
    if not control["says"]:
        return "inconclusive", (f"retrained on every row with the recipe, the model does not "
                                f"say '{shown}' (it says '{control['generation']}'): the "
                                f"recipe does not reproduce the answer, so removal cannot "
                                f"test it; {losses}")
    if not blamed["says"] and still == len(randoms):
        return "confirmed", (f"CONFIRMED: after removing {rows} the model no longer says "
                             f"'{shown}' (it says '{blamed['generation']}'); without "
                             f"{random_rows} it still does "
                             f"({still}/{len(randoms)}); {losses}")
    if not blamed["says"]:
        return "partly", (f"PARTLY: after removing {rows} the model no longer says "
                          f"'{shown}', but removing random rows also changed it "
                          f"({len(randoms) - still}/{len(randoms)} runs); {losses}")
    verdict = "loss-only" if rise > max(rand_rise, 0) * 2 and rise > 0 else "not-confirmed"
    head = "LOSS ONLY" if verdict == "loss-only" else "NOT CONFIRMED"
    return verdict, (f"{head}: without {rows} the model still says '{shown}'; "
                     f"{losses}")


def rows_from_trace(path: str | os.PathLike, top_k: int) -> list[int]:
    """The top-k rows of a `trace --out` results file."""
    ranked = sorted(_trace_results(Path(path)), key=lambda r: r.get("rank", 0))
    return [int(r["row"]) for r in ranked[:top_k]]


def _trace_results(path: Path) -> list[dict]:
    if not path.is_file():
        raise UserError(f"trace results not found: {path}")
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None
    results = data.get("results") if isinstance(data, dict) else data
    if not isinstance(results, list) or not all(isinstance(r, dict) and "row" in r
                                                for r in results):
        raise UserError(f"{path}: not a trace results file (no ranked rows with a 'row')")
    return results


def fix_text(train_file, base_dir, adapter_dir, query, *, remove: list[int], out_dir,
             recipe_file=None, max_new_tokens: int | None = None) -> dict:
    """Wrong facts, fixed: re-fine-tune with the adapter's recipe without `remove` into
    `out_dir` (a new adapter the user keeps) and say what the model answers to the
    query's prompt before and after. No random controls: `verify` is the proof that the
    change is the rows' and not any removal's."""
    rows, recipe, recorded = _rows_and_recipe(train_file, adapter_dir, recipe_file)
    n = len(rows)
    remove = checked_removal(remove, n)
    if len(remove) >= n:
        raise UserError(f"removing {len(remove)} of {n} rows leaves nothing to train on")
    q, prompt, answer, budget = _query_parts(query, recipe, base_dir, rows, max_new_tokens)
    before = _evaluate(base_dir, adapter_dir, q, prompt, answer, recipe, budget)
    dropped = set(remove)
    summary = finetune(rows, base_dir, out_dir, recipe,
                       keep=[i for i in range(n) if i not in dropped])
    after = _evaluate(base_dir, out_dir, q, prompt, answer, recipe, budget)
    shown = answer if len(answer) <= 60 else answer[:57] + "..."
    which = ("row " if len(remove) == 1 else "rows ") + ", ".join(map(str, remove))
    if not before["says"]:
        verdict, text = "nothing-to-fix", (f"the model does not say '{shown}' to begin with "
                                           f"(it says '{before['generation']}')")
    elif not after["says"]:
        verdict, text = "fixed", (f"FIXED: without {which} the model no longer says "
                                  f"'{shown}'; it says '{after['generation']}'")
    else:
        verdict, text = "not-fixed", (f"NOT FIXED: without {which} the model still says "
                                      f"'{shown}'")
    text += f" (query loss {before['loss']:.3f} -> {after['loss']:.3f})"
    same_recipe = is_all_rows_run(recorded, base_dir, recipe, n)
    if not same_recipe:
        text += ("; note: the adapter was not made by this recipe on every row, so part of "
                 "the change may be the recipe's ('verify' compares with a retrain on every "
                 "row)")
    return {"kind": "fix-text", "query": {"prompt": prompt, "answer": answer}, "n_train": n,
            "removed": remove, "adapter": str(adapter_dir), "fixed_adapter": str(out_dir),
            "recipe": recipe.to_json(), "steps": summary["steps"], "before": before,
            "after": after, "adapter_is_the_recipe": same_recipe, "verdict": verdict,
            "summary": text}
