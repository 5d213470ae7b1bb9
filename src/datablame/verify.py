"""Verify attribution scores against what retraining actually does.

Influence is an approximation and sometimes wrong; these measure how wrong on the user's
own model and data. Every function takes a `retrain(rows, seed) -> query losses` callable
(e.g. `TorchTrainer.query_losses` with the data bound), so any model family can be checked.

- leave_one_out:  retrain without each chosen row; actual change of every query's loss.
- remove_top_k:   retrain without the k best-scored rows vs k random rows (several seeds).
- lds:            linear datamodeling score (Ilyas et al. 2022; Park et al. 2023): Spearman
                  correlation, over M random subsets, between the loss predicted by summing
                  the scores of the rows kept and the loss after retraining on them.
- mislabel_auc:   AUC of ranking rows by self-influence when some labels are known flipped.

Long runs show progress and, given `cache`, save each retraining as it finishes so an
interrupted run resumes; results are plain JSON-able dicts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from datablame import progress
from datablame.store.atomic import write_json_atomic

Retrain = Callable[[np.ndarray, int], np.ndarray]  # (row ids kept, seed) -> query losses


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra = np.argsort(np.argsort(a, kind="stable"), kind="stable").astype(float)
    rb = np.argsort(np.argsort(b, kind="stable"), kind="stable").astype(float)
    ra -= ra.mean()
    rb -= rb.mean()
    denom = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / denom) if denom > 0 else 0.0


class SubsetRetraining:
    """M random subsets of the training rows and the query losses after retraining on
    each: the expensive half of LDS, shared by every method scored against it."""

    def __init__(self, retrain: Retrain, n_train: int, n_subsets: int = 100,
                 fraction: float = 0.5, seed: int = 0, cache: str | os.PathLike | None = None):
        rng = np.random.default_rng(seed)
        size = max(1, int(round(fraction * n_train)))
        self.masks = np.zeros((n_subsets, n_train), dtype=bool)
        for m in range(n_subsets):
            self.masks[m, rng.choice(n_train, size, replace=False)] = True
        self.retrain, self.seed = retrain, seed
        self.cache = Path(cache) if cache else None
        self.losses: dict[int, list[float]] = {}
        if self.cache and self.cache.exists():
            saved = json.loads(self.cache.read_text())
            if saved.get("masks_checksum") == self._checksum():
                self.losses = {int(k): v for k, v in saved["losses"].items()}

    def _checksum(self) -> str:
        import hashlib

        return hashlib.sha256(np.packbits(self.masks).tobytes()).hexdigest()

    def run(self) -> np.ndarray:
        """(M, n_queries) losses; resumes from the cache."""
        todo = [m for m in range(len(self.masks)) if m not in self.losses]
        with progress.task("retraining on subsets", len(todo)) as advance:
            for m in todo:
                rows = np.flatnonzero(self.masks[m])
                self.losses[m] = [float(v) for v in self.retrain(rows, self.seed)]
                if self.cache:
                    write_json_atomic(self.cache, {"masks_checksum": self._checksum(),
                                                   "losses": self.losses})
                advance(1)
        return np.array([self.losses[m] for m in range(len(self.masks))])


def lds(scores: np.ndarray, subsets: SubsetRetraining) -> dict:
    """Mean Spearman correlation over queries, with a 95% bootstrap interval over queries.

    Predicted loss of subset S for query q = -sum_{i in S} score(q, i) (positive scores
    help, i.e. lower the loss); compared with the actual loss after retraining on S.
    """
    actual = subsets.run()  # (M, Q)
    predicted = -(subsets.masks.astype(float) @ np.asarray(scores, dtype=float).T)  # (M, Q)
    per_query = np.array([spearman(predicted[:, q], actual[:, q])
                          for q in range(actual.shape[1])])
    rng = np.random.default_rng(0)
    boots = [per_query[rng.integers(0, len(per_query), len(per_query))].mean()
             for _ in range(1000)]
    return {"lds": float(per_query.mean()), "ci95": [float(np.percentile(boots, 2.5)),
                                                     float(np.percentile(boots, 97.5))],
            "per_query": per_query.tolist(), "subsets": int(len(subsets.masks)),
            "points": [{"query": q, "predicted": predicted[:, q].tolist(),
                        "actual": actual[:, q].tolist()}
                       for q in range(min(actual.shape[1], POINTS_QUERIES))]}


def leave_one_out(retrain: Retrain, n_train: int, rows, seed: int = 0) -> dict:
    """Actual change of each query's loss when each of `rows` is removed (new - full)."""
    everything = np.arange(n_train)
    base = retrain(everything, seed)
    out = {}
    with progress.task("leave-one-out", len(rows)) as advance:
        for r in rows:
            out[int(r)] = (retrain(np.delete(everything, r), seed) - base).tolist()
            advance(1)
    return {"base_loss": base.tolist(), "delta": out}


def curve_ks(k: int) -> list[int]:
    """The removal sizes of a remove-top-k curve, up to k: 1, a quarter, a half, all."""
    return sorted({max(1, k // 4), max(1, k // 2), k} | ({1} if k >= 4 else set()))


def remove_top_k(retrain: Retrain, n_train: int, query_scores: np.ndarray, query: int, k: int,
                 seeds=(0, 1, 2), curve: bool = True) -> dict:
    """Loss change of query `query` after removing its top-k rows vs k random rows, and
    (`curve`) the same at smaller k: does the loss rise with each blamed row removed?"""
    everything = np.arange(n_train)
    order = np.argsort(-np.asarray(query_scores))
    ks = curve_ks(k) if curve else [k]
    points = {size: {"k": size, "top_k": [], "random_k": []} for size in ks}
    with progress.task("remove-top-k", len(seeds) * (1 + 2 * len(ks))) as advance:
        for s in seeds:
            base = retrain(everything, s)[query]
            advance(1)
            for size in ks:
                top = order[:size]
                points[size]["top_k"].append(float(
                    retrain(np.setdiff1d(everything, top), s)[query] - base))
                rand = np.random.default_rng(1000 + s).choice(n_train, size, replace=False)
                points[size]["random_k"].append(float(
                    retrain(np.setdiff1d(everything, rand), s)[query] - base))
                advance(2)
    results = {**points[k], "query": int(query), "removed": [int(r) for r in order[:k]]}
    for key in ("top_k", "random_k"):
        results[f"{key}_mean"] = float(np.mean(results[key]))
        results[f"{key}_std"] = float(np.std(results[key]))
    if curve:
        results["curve"] = [points[size] for size in ks]
    return results


def remove_top_k_verdict(result: dict) -> tuple[str, str]:
    """("pass" | "fail", one line): the check passes when removing the top-k rows raised
    the query's loss, and raised it more than removing k random rows did."""
    k, top, rand = result["k"], result["top_k_mean"], result["random_k_mean"]
    numbers = f"({top:+.4f} vs {rand:+.4f})"
    if top > max(rand, 0.0):
        return "pass", (f"PASS: removing the top-{k} raised the query loss more than removing "
                        f"{k} random rows {numbers}")
    tail = "" if top > 0 else "; it did not raise it at all"
    return "fail", (f"FAIL: removing the top-{k} did not raise the query loss more than "
                    f"removing {k} random rows {numbers}{tail}: these scores do not find the "
                    "rows this query rests on")


POINTS_QUERIES = 20  # queries whose (predicted, actual) pairs the result keeps, for plots

# LDS (Spearman, 1 = perfect) -> a word: below 0.1 none, then weak, moderate, strong.
LDS_READINGS = ((0.6, "strong"), (0.3, "moderate"), (0.1, "weak"))


def lds_reading(value: float, ci95) -> str:
    """none / weak / moderate / strong; an interval reaching 0 or below reads as none."""
    if ci95[0] <= 0:
        return "none"
    for threshold, word in LDS_READINGS:
        if value >= threshold:
            return word
    return "none"


def mislabel_auc(self_influence: np.ndarray, flipped: np.ndarray) -> float:
    """ROC AUC of 'higher self-influence = more likely mislabelled' (ties count half)."""
    s = np.asarray(self_influence, dtype=float)
    f = np.asarray(flipped, dtype=bool)
    pos, neg = s[f], s[~f]
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("need both flipped and clean rows")
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def save(result: dict, path: str | os.PathLike) -> None:
    from datablame.outputs import write_json_output

    write_json_output(path, result)
