"""Tabular attribution, the Python front door: rows in, ranked training rows out, and the
same scores checked against retraining.

    from datablame.tabular import attribute, verify_scores
    df = attribute(model, X_train, y_train, X_query, loss="ce", method="if-exact", l2=1e-2)

`model` is a trained `torch.nn.Module` mapping a float feature matrix to outputs (logits
for "ce", predictions for "mse"), a tree ensemble or a scikit-learn linear model. Without
`y_query`: a classifier's query target is its own predicted label (what it *said*, as in the
seed); a regression model's prediction is explained itself (each row's contribution to the
predicted value, positive = the row raised it), since the squared loss of a prediction
against itself is flat. Pass `y_query` to explain the loss of the true target instead.

The CLI (`cli/tabular.py`) reads files into the same calls; inputs are checked the same way
for both (`data/tables.py`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from datablame.data.tables import (
    as_array,
    check_feature_matrix,
    check_targets,
    class_positions,
    soft_binary_targets,
)
from datablame.errors import UserError, check_at_least
from datablame.methods.base import Method
from datablame.methods.registry import check_fits, get_method
from datablame.models import loading

# A query whose every score is at most this is not ranked (ties of zeros are no answer).
ZERO = 1e-12

# df.attrs["explains"] -> the table title's wording.
EXPLAINS = {"prediction": "the prediction", "predicted label": "the predicted label",
            "target": "the given target", "prediction as target": "the predicted value "
            "as target"}


@dataclass
class TabularTask:
    """A model and the typed tables its methods read: what every tabular method, the
    verification and both front doors share."""

    model: object
    adapter: object
    x_train: object
    y_train: np.ndarray
    x_query: object
    config: dict | None = None  # torch model files: architecture and training settings

    def __post_init__(self) -> None:
        self.classes = class_labels_checked(self.model, self.adapter, self.y_train)

    @property
    def family(self) -> str:
        return loading.family_of(self.model)

    def method(self, name: str = "auto") -> str:
        name = loading.default_method(self.model) if name == "auto" else name
        check_fits(name, loading.method_family(self.model))
        return name

    def fit(self, method: str = "auto", **params) -> Method:
        return get_method(self.method(method), **params).fit(self.adapter, self.x_train,
                                                             self.y_train)

    def predicted(self) -> np.ndarray:
        """The model's own answer for each query, typed like the training targets."""
        yq = self.adapter.predict_targets(self.x_query)
        yq = yq.numpy() if hasattr(yq, "numpy") else np.asarray(yq)
        if self.family == "torch" and self.y_train.ndim == 1 and \
                np.issubdtype(self.y_train.dtype, np.integer):
            yq = yq.astype(np.int64)
        return yq

    def query_targets(self, y_query) -> np.ndarray:
        """The user's query targets, typed like the training targets (torch: same dtype and
        trailing shape)."""
        yq = as_array(y_query)
        if len(yq) != len(self.x_query):
            raise UserError(f"{len(self.x_query)} query rows but {len(yq)} query targets")
        if self.classes is not None and not soft_binary_targets(yq, self.classes):
            class_positions(yq, self.classes, "the query targets")
        if self.family == "torch":
            yq = yq.astype(self.y_train.dtype).reshape(-1, *self.y_train.shape[1:])
        return yq

    def scores(self, est: Method, y_query=None):
        """(scores, query targets used, what was explained); see the module docstring."""
        if y_query is not None:
            yq = self.query_targets(y_query)
            return est.scores(self.x_query, yq), yq, "target"
        yq = self.predicted()
        if not self.adapter.is_regression:
            return est.scores(self.x_query, yq), yq, "predicted label"
        if est.explains_prediction:
            return est.prediction_scores(self.x_query), yq, "prediction"
        return est.scores(self.x_query, yq), yq, "prediction as target"

    def retrain(self, y_query) -> tuple[Callable[[np.ndarray, int], np.ndarray], np.ndarray]:
        """(retrain(rows, seed) -> query losses after retraining on `rows`, the trained
        model's own query losses): what verification compares scores with."""
        yq = self.query_targets(y_query)
        xt, yt, xq = self.x_train, self.y_train, self.x_query
        if self.family == "torch":
            from datablame.models.torch_files import trainer_from_config

            if not self.config or "train" not in self.config:
                raise UserError("retraining a torch model needs its training settings (the "
                                "model file's .json 'train' entry, written by "
                                "save_torch_model)")
            trainer = trainer_from_config(self.config)

            def retrain(rows, seed):
                return trainer.query_losses(xt, yt, xq, yq, rows=rows, seed=seed)

            return retrain, np.asarray(self.adapter.losses(xq, yq))
        fit = loading.retrainer(self.model)

        def take(a, rows):
            return a.iloc[rows] if hasattr(a, "iloc") else a[rows]

        def losses(model, rows):
            adapter = loading.adapter_for(model, take(xt, rows), take(yt, rows))
            return adapter.query_losses(xq, yq)

        def retrain(rows, seed):
            return losses(fit(take(xt, rows), take(yt, rows)), rows)

        return retrain, losses(self.model, np.arange(len(yt)))


def task(model, x_train, y_train, x_query, *, loss: str = "ce", l2: float = 0.0,
         config: dict | None = None) -> TabularTask:
    """Check the tables against the model family and build its adapter."""
    family = loading.family_of(model)
    if family == "torch":
        check_feature_matrix(x_train, "training rows")
        check_feature_matrix(x_query, "query rows")
    elif hasattr(x_train, "columns") and hasattr(x_query, "columns"):
        # tables with names: the model's columns, in its order (LightGBM would otherwise
        # read reordered columns by position), as the CLI does
        names = loading.feature_names(model)
        if names is not None:
            from datablame.data.tables import model_columns

            x_train, x_query = model_columns(model, list(names), x_train, x_query)
    check_targets(x_train, y_train)
    y = np.asarray(as_array(y_train))
    adapter = loading.adapter_for(model, x_train, y, loss=loss, l2=l2)
    return TabularTask(model, adapter, x_train, y, x_query, config)


def class_labels_checked(model, adapter, y_train) -> list | None:
    """A classifier's class labels, once every training target is checked to be one of
    them (a "yes"/"no" column for a model trained on 1/0 is one line, not all rows read as
    class 0); None for regression and torch models."""
    classes = loading.class_labels(model, adapter)
    if classes is not None and not soft_binary_targets(y_train, classes):
        class_positions(y_train, classes)
    return classes


def _fit_and_score(model, x_train, y_train, x_query, y_query=None, *, loss="ce",
                   method: str = "auto", l2: float = 0.0, **method_params):
    if method != "auto":
        check_fits(method, loading.method_family(model))  # before any work
    t = task(model, x_train, y_train, x_query, loss=loss, l2=l2)
    est = t.fit(method, **method_params)
    scores, yq, explains = t.scores(est, y_query)
    return est, scores, yq, explains, t.x_query  # the query table as the model reads it


def score_matrix(model, x_train, y_train, x_query, y_query=None, *, loss="ce",
                 method: str = "auto", l2: float = 0.0, **method_params) -> np.ndarray:
    """(n_query, n_train) scores; positive = the row helped produce the query's target
    (regression without `y_query`: the row raised the predicted value).

    `model`: a torch module (with `loss` and the `l2` it was trained with), a tree
    ensemble, or a scikit-learn linear model. `method="auto"` picks the measured default
    for the family (`models/loading.py` DEFAULT_METHODS, chosen against retraining)."""
    return _fit_and_score(model, x_train, y_train, x_query, y_query, loss=loss,
                          method=method, l2=l2, **method_params)[1]


def attribute(model, x_train, y_train, x_query, y_query=None, *, loss="ce",
              method: str = "auto", l2: float = 0.0, top_k: int = 10, order: str = "auto",
              **method_params) -> pd.DataFrame:
    """Top-k training rows per query: query, rank, row, score, target, the method's reason
    (e.g. "same leaf in 37/100 trees; removing it: query loss +0.012"), then the row's
    features, ranked as `order` says (`resolve_order`: by |score| for a regression's
    prediction, highest first otherwise). `df.attrs["explains"]` says what the scores are
    of; queries whose every score is zero are not ranked (listed in
    `df.attrs["all_zero_queries"]`, with a warning)."""
    check_at_least("top_k", top_k, 1)
    est, scores, y_query, explains, model_query = _fit_and_score(
        model, x_train, y_train, x_query, y_query, loss=loss, method=method, l2=l2,
        **method_params)
    df = ranked_rows(scores, x_train, y_train, top_k, est, model_query, y_query, explains,
                     order)
    if df.attrs["all_zero_queries"]:
        warnings.warn(zero_message(df.attrs["all_zero_queries"]), UserWarning, stacklevel=2)
    return df


def verify_scores(t: TabularTask, scores: np.ndarray, y_query, *, method: str,
                  lds_subsets: int = 50, remove_k: int = 10, loo_rows=(),
                  cache=None) -> dict:
    """Retrain with the model's own settings and compare with `scores` (n_query, n_train):
    LDS over random halves, remove-top-k vs random-k, leave-one-out. JSON-able numbers
    with their readings; `cache` (a directory) keeps retrainings so a rerun resumes."""
    from pathlib import Path

    from datablame import verify

    n = len(t.y_train)
    if lds_subsets == 1:
        raise UserError("LDS needs at least 2 subsets (a correlation), got 1")
    check_removals(n, loo_rows, remove_k)
    retrain, base_loss = t.retrain(y_query)
    result: dict = {"method": method, "n_train": n, "n_query": len(scores),
                    "query_loss": np.asarray(base_loss).tolist()}
    cache_dir = Path(cache) if cache else None
    if lds_subsets > 0:
        subsets = verify.SubsetRetraining(
            retrain, n, n_subsets=lds_subsets,
            cache=cache_dir / f"subsets-{lds_subsets}.json" if cache_dir else None)
        result["lds"] = verify.lds(scores, subsets)
        result["lds"]["reading"] = verify.lds_reading(result["lds"]["lds"],
                                                      result["lds"]["ci95"])
    if remove_k > 0:
        q = int(np.argmax(result["query_loss"]))
        r = verify.remove_top_k(retrain, n, scores[q], q, remove_k)
        r["verdict"], r["summary"] = verify.remove_top_k_verdict(r)
        result["remove_top_k"] = r
    if len(loo_rows):
        loo = verify.leave_one_out(retrain, n, list(loo_rows))
        loo["predicted"] = {str(r): scores[:, r].tolist() for r in loo_rows}
        result["leave_one_out"] = loo
    return result


def checked_removal(remove, n: int) -> list[int]:
    """Rows to remove (fix, verify), sorted and unique, inside the `n` training rows."""
    remove = sorted(set(int(r) for r in remove))
    if not remove:
        raise UserError("nothing to remove: give the rows with --remove or --trace")
    bad = [r for r in remove if not 0 <= r < n]
    if bad:
        raise UserError(f"rows out of range (0..{n - 1}): {bad}")
    return remove


def check_removals(n: int, loo_rows, remove_k: int, option: str = "remove-top-k") -> None:
    """Leave-one-out rows inside the table, and a remove-top-k that leaves rows to train."""
    bad = [r for r in loo_rows if not 0 <= r < n]
    if bad:
        raise UserError(f"leave-one-out rows out of range (0..{n - 1}): {bad}")
    if remove_k >= n:
        raise UserError(f"{option} {remove_k} would remove every training row ({n})")


def zero_message(queries: list[int]) -> str:
    rows = ", ".join(map(str, queries))
    return (f"query row(s) {rows}: every score is zero, so no training row is ranked (nothing "
            "moves what is explained; e.g. a target equal to the prediction has a flat loss)")


ORDERS = ("auto", "highest", "lowest", "magnitude")


def resolve_order(order: str, explains: str) -> str:
    """"auto": by |score| where a regression's prediction is explained (a row that lowered
    it matters as much as one that raised it: "why so low?"), else highest first (the rows
    that helped produce what is explained)."""
    if order not in ORDERS:
        raise UserError(f"unknown order '{order}' (use {', '.join(ORDERS)})")
    if order != "auto":
        return order
    return "magnitude" if explains == "prediction" else "highest"


def ranking(scores: np.ndarray, order: str) -> np.ndarray:
    """Row indices in `order` (along the last axis)."""
    key = {"highest": -scores, "lowest": scores, "magnitude": -np.abs(scores)}[order]
    return np.argsort(key, axis=-1, kind="stable")


def ranked_rows(scores: np.ndarray, x_train, y_train, top_k: int, est, x_query, y_query,
                explains: str = "target", order: str = "highest") -> pd.DataFrame:
    """query, rank, row, score, target, the method's reason, then the row's features.

    A query whose scores are all (numerically) zero has no ranking: its rows are left out
    and it is listed in attrs["all_zero_queries"] (ties of zeros would list rows 0, 1, 2)."""
    if not isinstance(x_train, pd.DataFrame):
        arr = np.asarray(x_train)
        x_train = pd.DataFrame(arr, columns=[f"x{j}" for j in range(arr.shape[1])])
    target = as_array(y_train).reshape(len(x_train), -1)[:, 0]
    k = min(top_k, scores.shape[1])
    order = resolve_order(order, explains)
    tops = ranking(scores, order)[:, :k]
    reasons = est.reasons(x_query, y_query, tops, scores)
    zero = [q for q in range(len(scores)) if np.abs(scores[q]).max(initial=0.0) <= ZERO]
    frames = []
    for q, top in enumerate(tops):
        if q in zero:
            continue
        frame = pd.DataFrame({"query": q, "rank": np.arange(1, k + 1), "row": top,
                              "score": scores[q, top], "target": target[top],
                              "reason": reasons[q]})
        frames.append(pd.concat([frame, x_train.iloc[top].reset_index(drop=True)], axis=1))
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        columns=["query", "rank", "row", "score", "target", "reason", *x_train.columns])
    df.attrs.update(method=est.name, explains=explains, all_zero_queries=zero,
                    n_queries=len(scores), order=order)
    return df


def group_rows(scores: np.ndarray, x_train, y_train, top_k: int, queries=None,
               order: str = "highest") -> pd.DataFrame:
    """The training rows behind a set of query rows together (a group question, e.g.
    every row the model got wrong): the mean of each row's scores over the queries,
    ranked; `helps` counts the queries a row pushes toward what is explained and
    `opposes` those it pushes away from, `strongest_query` is where it weighs most."""
    check_at_least("top_k", top_k, 1)
    queries = np.arange(len(scores)) if queries is None else np.asarray(queries, dtype=int)
    if len(queries) == 0:
        raise UserError("no query rows to aggregate over")
    part = np.asarray(scores, dtype=float)[queries]
    mean = part.mean(axis=0)
    if not isinstance(x_train, pd.DataFrame):
        arr = np.asarray(x_train)
        x_train = pd.DataFrame(arr, columns=[f"x{j}" for j in range(arr.shape[1])])
    target = as_array(y_train).reshape(len(x_train), -1)[:, 0]
    top = ranking(mean, order)[:min(top_k, len(mean))]
    frame = pd.DataFrame({
        "rank": np.arange(1, len(top) + 1), "row": top, "score": mean[top],
        "helps": (part[:, top] > ZERO).sum(axis=0), "opposes": (part[:, top] < -ZERO).sum(axis=0),
        "strongest_query": queries[np.argmax(np.abs(part[:, top]), axis=0)],
        "target": target[top]})
    df = pd.concat([frame, x_train.iloc[top].reset_index(drop=True)], axis=1)
    df.attrs.update(group=[int(q) for q in queries], n_queries=len(scores), order=order)
    return df


def wrong_queries(task: TabularTask, y_query) -> np.ndarray:
    """Indices of the query rows the model gets wrong (a classifier's predicted label is
    not the query's own)."""
    if task.adapter.is_regression:
        raise UserError("--only-wrong needs a classifier: a regression prediction is never "
                        "simply wrong (pick the query rows with the largest error yourself)")
    if y_query is None:
        raise UserError("--only-wrong needs the target column in the query rows")
    truth = task.query_targets(y_query).reshape(len(task.x_query), -1)[:, 0]
    predicted = np.asarray(task.predicted()).reshape(len(task.x_query), -1)[:, 0]
    return np.flatnonzero(predicted != truth)


def fix_tabular(t: TabularTask, remove, y_query=None, *, n_random: int = 3,
                seed: int = 0) -> dict:
    """Retrain with the model's own settings without `remove` and show each query row's
    prediction before and after (and, for a classifier, the probability of the label it
    predicted before), next to retraining on every row and without as many random rows:
    a prediction that flips only without the chosen rows was theirs."""
    from datablame.audit import fitted_adapter

    n = len(t.y_train)
    remove = np.array(checked_removal(remove, n), dtype=int)
    if 2 * len(remove) > n:
        raise UserError(f"removing {len(remove)} of {n} rows leaves too few to compare with "
                        "random removals of the same size")
    check_at_least("--random", n_random, 1)
    regression = t.adapter.is_regression

    def flat(values) -> np.ndarray:
        values = values.numpy() if hasattr(values, "numpy") else np.asarray(values)
        return values.reshape(len(t.x_query), -1)[:, 0]

    label = t.predicted()
    before = flat(label)

    def look(adapter) -> dict:
        out = {"prediction": flat(adapter.predict_targets(t.x_query)).tolist()}
        if not regression:
            out["p_before_label"] = np.exp(-np.asarray(adapter.query_losses(
                t.x_query, label), dtype=float)).tolist()
        return out

    everything = np.arange(n)
    runs = {"original model": look(t.adapter),
            "retrained on every row": look(fitted_adapter(t, everything, seed)),
            "retrained without them": look(fitted_adapter(t, np.setdiff1d(everything, remove),
                                                          seed))}
    rng = np.random.default_rng(seed)
    for s in range(n_random):
        rand = rng.choice(n, len(remove), replace=False)
        runs[f"without random rows {s}"] = look(fitted_adapter(
            t, np.setdiff1d(everything, rand), seed))

    def moved(run: dict) -> np.ndarray:
        after = np.asarray(run["prediction"], dtype=float if regression else object)
        if regression:
            return np.abs(after - before.astype(float))
        return (after != before).astype(float)

    control = moved(runs["retrained on every row"])
    queries = []
    for q in range(len(t.x_query)):
        item = {"query": q, "before": plain(before[q]),
                "after": plain(runs["retrained without them"]["prediction"][q])}
        if not regression:
            item["p_before_label"] = {"before": runs["original model"]["p_before_label"][q],
                                      "after": runs["retrained without them"]
                                      ["p_before_label"][q]}
        queries.append(item)
    random_moves = [moved(r) for name, r in runs.items() if name.startswith("without random")]
    changed = moved(runs["retrained without them"])
    result = {"kind": "fix-tabular", "n_train": n, "removed": remove.tolist(),
              "regression": regression,
              "queries": queries, "runs": runs,
              "changed": changed.tolist(), "changed_by_random": np.mean(random_moves, 0).tolist(),
              "control_changed": control.tolist()}
    if y_query is not None and not regression:
        truth = t.query_targets(y_query).reshape(len(t.x_query), -1)[:, 0]

        def wrong(run: dict) -> int:
            return int((np.asarray(run["prediction"], dtype=object) != truth).sum())

        result["wrong"] = {name: wrong(run) for name, run in runs.items()}
        for item, right in zip(queries, truth, strict=True):
            item["true"] = plain(right)
    what = "mean |change| of the prediction" if regression else "predictions changed"
    total = float(changed.sum()) if not regression else float(changed.mean())
    by_random = float(np.mean([m.sum() if not regression else m.mean()
                               for m in random_moves]))
    by_control = float(control.sum() if not regression else control.mean())
    result["summary"] = (f"{what}: {total:.4g} without the {len(remove)} rows, "
                         f"{by_random:.4g} on average without {len(remove)} random rows, "
                         f"{by_control:.4g} retrained on every row")
    if "wrong" in result:
        w = result["wrong"]
        rand = float(np.mean([v for k, v in w.items() if k.startswith("without random")]))
        result["summary"] += (f"; wrong answers: {w['original model']} before, "
                              f"{w['retrained without them']} without the rows, "
                              f"{rand:.3g} without random rows")
    return result


def plain(value):
    """A NumPy scalar as the Python value JSON writes."""
    return value.item() if hasattr(value, "item") else value
