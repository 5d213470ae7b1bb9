"""Audits over the whole training set (issue 13): suspected label errors, ranked, and the
proof by retraining without them.

    from datablame.audit import label_audit
    result = label_audit(task, x_eval, y_eval, top_k=20)

Three suspicion scores for each row, all "higher = more likely mislabelled":

- `oof-loss`: the loss of the row's given label under a model retrained without the row's
  fold (k-fold, the model's own recipe): confident learning's out-of-sample
  self-confidence, -log p(given label). A wrong label is surprising to a model that never
  saw it; a hard but right one is surprising too, which is why it is proven below.
- `loss`: the in-sample training loss (free, but a model that memorised its labels
  hides the wrong ones).
- `self-influence`: how much the row supports its own prediction (the method's
  `self_influence`, where the family has one).

Which to trust is measured, not assumed (`bench/label_audit.py`); the proof is the
user's own: retrain without the top-k suspects and without k random rows (several
seeds), and compare the evaluation loss and accuracy.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from contextvars import ContextVar
from pathlib import Path

import numpy as np

from datablame import progress
from datablame.errors import UserError, check_at_least
from datablame.tabular import TabularTask, plain

SCORERS = ("oof-loss", "loss", "self-influence")
# "auto": self-influence where the model's method has one, else the out-of-fold loss:
# chosen on breast cancer alone, reported on wine and digits (bench/label_audit.py)
DEFAULT_SCORER = "auto"


def _take(a, rows):
    return a.iloc[rows] if hasattr(a, "iloc") else a[rows]


def fitted_adapter(t: TabularTask, rows: np.ndarray, seed: int, labels=None):
    """The model's family retrained on `rows` with its own settings, as an adapter
    (`labels`: every training row's label to train with instead of the given ones)."""
    from datablame.models import loading

    rows = np.sort(np.asarray(rows))
    x, y = _take(t.x_train, rows), _take(t.y_train if labels is None else labels, rows)
    if t.family == "torch":
        from datablame.models.torch_files import trainer_from_config

        if not t.config or "train" not in t.config:
            raise UserError("retraining a torch model needs its training settings (the model "
                            "file's .json 'train' entry, written by save_torch_model)")
        trainer = trainer_from_config(t.config)
        return trainer.adapter(trainer.fit(x, y, seed=seed))
    return loading.adapter_for(loading.retrainer(t.model)(x, y), x, y)


class RetrainCache:
    """The numbers measured on each retraining, written to one JSON file as each
    finishes, so an interrupted audit resumes where it stopped. Entries are keyed by
    what was retrained (rows kept, labels, seed) and what was measured; the file by the
    task (model and tables, by content), so a cache directory can serve several."""

    def __init__(self, directory: str | Path, task_key: str):
        from datablame.outputs import check_output_dir

        self.path = check_output_dir(directory, "--cache") / f"audit-{task_key[:16]}.json"
        self.entries: dict = {}
        if self.path.exists():
            try:
                saved = json.loads(self.path.read_text())
            except ValueError:
                raise UserError(f"{self.path} is damaged (not JSON): remove it to start "
                                "over") from None
            if saved.get("task") != task_key:
                raise UserError(f"{self.path} belongs to another task")
            self.entries = saved["entries"]
        self.task_key = task_key

    def get(self, key: str, compute):
        if key in self.entries:
            return self.entries[key]
        value = compute()
        self.entries[key] = value
        from datablame.store.atomic import write_json_atomic

        write_json_atomic(self.path, {"task": self.task_key, "entries": self.entries})
        return value


_CACHE: ContextVar[RetrainCache | None] = ContextVar("audit_retrain_cache", default=None)


@contextlib.contextmanager
def retrain_cache(cache: RetrainCache | None):
    """Retrainings inside the block are looked up in / saved to `cache` (None: none)."""
    token = _CACHE.set(cache)
    try:
        yield cache
    finally:
        _CACHE.reset(token)


def digest(*parts) -> str:
    """A short content key of arrays / tables / plain values."""
    h = hashlib.sha256()
    for part in parts:
        if hasattr(part, "detach"):  # a torch tensor
            part = part.detach().cpu().numpy()
        if hasattr(part, "to_numpy"):  # a pandas table or column
            import pandas as pd

            part = pd.util.hash_pandas_object(part, index=False).to_numpy()
        if isinstance(part, np.ndarray):
            h.update(np.ascontiguousarray(part if part.dtype != object else
                                          part.astype(str)).tobytes())
        else:
            h.update(repr(part).encode())
        h.update(b"|")
    return h.hexdigest()[:20]


def measured(t: TabularTask, rows: np.ndarray, seed: int, measure, what: str,
             labels=None):
    """`measure` of the model retrained on `rows` (with `labels`), from the active
    retrain cache when it has it. `what` names the measure and what it was measured on."""
    cache = _CACHE.get()

    def compute():
        return measure(fitted_adapter(t, rows, seed, labels))

    if cache is None:
        return compute()
    key = f"{what}|{digest(np.sort(np.asarray(rows)))}|" \
          f"{'' if labels is None else digest(np.asarray(labels))}|{seed}"
    return cache.get(key, compute)


def suspicion_scores(t: TabularTask, *, folds: int = 5, seed: int = 0,
                     method: str = "auto", suggested: dict | None = None
                     ) -> dict[str, np.ndarray]:
    """Every scorer that applies to this model, one value per training row; `suggested`
    (a dict) gets "label": each row's out-of-fold predicted label, the label to relabel
    it with (confident learning's suggestion)."""
    check_at_least("--folds", folds, 2)
    n = len(t.y_train)
    if n < 2 * folds:
        raise UserError(f"{n} rows are too few for {folds}-fold out-of-sample losses")
    out = {"loss": np.asarray(t.adapter.query_losses(t.x_train, t.y_train), dtype=float)}
    oof = np.empty(n)
    labels = np.empty(n, dtype=object)
    perm = np.random.default_rng(seed).permutation(n)
    with progress.task("out-of-fold retraining", folds) as advance:
        _out_of_fold(t, perm, folds, seed, oof, labels, advance)
    out["oof-loss"] = oof
    if suggested is not None:
        suggested["label"] = labels
    with contextlib.suppress(NotImplementedError, UserError):  # no self-influence here
        out["self-influence"] = np.asarray(t.fit(method).self_influence(), dtype=float)
    return out


def _out_of_fold(t: TabularTask, perm, folds: int, seed: int, oof, labels, advance) -> None:
    """Each fold's losses and predicted labels from the model retrained without it."""
    for k, fold in enumerate(np.array_split(perm, folds)):
        rest = np.setdiff1d(perm, fold)

        def on_fold(adapter, fold=fold):
            predicted = adapter.predict_targets(_take(t.x_train, fold))
            predicted = predicted.numpy() if hasattr(predicted, "numpy") else predicted
            return {"loss": np.asarray(adapter.query_losses(_take(t.x_train, fold),
                                                            t.y_train[fold])).tolist(),
                    "label": [plain(v) for v in
                              np.asarray(predicted).reshape(len(fold), -1)[:, 0]]}

        got = measured(t, rest, seed + k, on_fold, f"oof-fold:{digest(fold)}")
        oof[fold] = got["loss"]
        labels[fold] = got["label"]
        advance(1)


def evaluate(adapter, x_eval, y_eval) -> dict:
    losses = np.asarray(adapter.query_losses(x_eval, y_eval), dtype=float)
    result = {"loss": float(losses.mean())}
    if not adapter.is_regression:
        predicted = np.asarray(adapter.predict_targets(x_eval)).reshape(-1)
        result["accuracy"] = float((predicted == np.asarray(y_eval).reshape(-1)).mean())
    return result


def compare_removal(t: TabularTask, removed: np.ndarray, measure, key: str, *,
                    n_random: int = 3, seed: int = 0, what: str = ""
                    ) -> tuple[dict, dict, dict, dict, bool]:
    """Retrain on every row, without `removed`, and without as many random rows (`n_random`
    seeds); `measure(adapter)` -> numbers of each model (`what` names it for the retrain
    cache: the measure and the rows it is taken on). Returns (every row, without them,
    the random removals' mean, their spread, confirmed): confirmed when removing them
    lowers `key` by more than the random removals' spread and not above every row's."""
    check_at_least("--random", n_random, 1)
    n = len(t.y_train)
    removed = np.asarray(removed)
    if 2 * len(removed) > n:
        raise UserError(f"removing {len(removed)} of {n} rows leaves too few to compare")
    everything = np.arange(n)
    rng = np.random.default_rng(seed)
    plans = [everything, np.setdiff1d(everything, removed)] + [
        np.setdiff1d(everything, rng.choice(n, len(removed), replace=False))
        for _ in range(n_random)]
    done = []
    with progress.task("retraining", len(plans)) as advance:
        for rows in plans:
            done.append(measured(t, rows, seed, measure, what))
            advance(1)
    base, cut, randoms = done[0], done[1], done[2:]
    mean = {k: float(np.mean([r[k] for r in randoms])) for k in randoms[0]}
    spread = {k: float(np.std([r[k] for r in randoms])) for k in randoms[0]}
    confirmed = cut[key] < mean[key] - spread[key] and cut[key] <= base[key]
    return base, cut, mean, spread, confirmed


def prove(t: TabularTask, suspects: np.ndarray, x_eval, y_eval, *, n_random: int = 3,
          seed: int = 0) -> dict:
    """Retrain without the suspects and without as many random rows (`n_random` seeds);
    the evaluation loss and accuracy of each, next to the model trained on every row."""
    base, cut, mean, spread, confirmed = compare_removal(
        t, suspects, lambda adapter: evaluate(adapter, x_eval, y_eval), "loss",
        n_random=n_random, seed=seed, what=f"eval:{digest(x_eval, y_eval)}")
    runs = {"all rows": base, "without suspects": cut,
            "without random rows": {**mean, "spread": spread}}
    return {"runs": runs, "removed": [int(r) for r in suspects],
            "verdict": "confirmed" if confirmed else "not confirmed"}


def relabelled(t: TabularTask, suspects, suggested) -> np.ndarray:
    """The training labels with each suspect's replaced by its suggested label."""
    labels = np.array(t.y_train, copy=True)
    for r in suspects:
        labels[r] = np.asarray(suggested[r]).astype(labels.dtype)
    return labels


def prove_relabel(t: TabularTask, suspects, suggested, x_eval, y_eval, proof: dict, *,
                  seed: int = 0) -> dict:
    """Add to a removal proof the model retrained on every row with the suspects
    relabelled to their suggested labels: keeping the rows with a corrected label may
    beat dropping them. Confirmed when it beats the random removals by more than their
    spread and is no worse than every row as given."""
    labels = relabelled(t, suspects, suggested)
    changed = int(sum(labels[r] != t.y_train[r] for r in suspects))
    run = measured(t, np.arange(len(t.y_train)), seed,
                   lambda adapter: evaluate(adapter, x_eval, y_eval),
                   f"eval:{digest(x_eval, y_eval)}", labels=labels)
    rand, base = proof["runs"]["without random rows"], proof["runs"]["all rows"]
    ok = run["loss"] < rand["loss"] - rand["spread"]["loss"] and run["loss"] <= base["loss"]
    proof["runs"]["suspects relabelled"] = {**run, "relabelled": changed}
    proof["relabel_verdict"] = "confirmed" if ok else "not confirmed"
    return proof


def label_audit(t: TabularTask, x_eval=None, y_eval=None, *, scorer: str = DEFAULT_SCORER,
                top_k: int = 20, folds: int = 5, n_random: int = 3, seed: int = 0,
                method: str = "auto") -> dict:
    """Rows ranked by suspicion (`scorer`), every scorer's values, and, with an
    evaluation set, the proof by retraining without the top `top_k`."""
    if scorer not in (*SCORERS, "auto"):
        raise UserError(f"unknown scorer '{scorer}' (use auto, {', '.join(SCORERS)})")
    check_at_least("--top-k", top_k, 1)
    if t.adapter.is_regression:
        raise UserError("label audits need a classifier: a regression target has no wrong "
                        "label, only a far one (trace it with 'tabular')")
    suggested: dict = {}
    scores = suspicion_scores(t, folds=folds, seed=seed, method=method, suggested=suggested)
    if scorer == "auto":
        scorer = "self-influence" if "self-influence" in scores else "oof-loss"
    if scorer not in scores:
        raise UserError(f"{scorer} does not apply to this model (available: "
                        f"{', '.join(scores)})")
    order = np.argsort(-scores[scorer], kind="stable")
    result = {"scorer": scorer, "n_train": int(len(t.y_train)),
              "ranked": [{"row": int(r), "label": plain(t.y_train[r]),
                          "suggested": plain(suggested["label"][r]),
                          **{k: float(v[r]) for k, v in scores.items()}}
                         for r in order[:top_k]]}
    if x_eval is not None:
        result["proof"] = prove(t, order[:top_k], x_eval, y_eval, n_random=n_random,
                                seed=seed)
        prove_relabel(t, order[:top_k], suggested["label"], x_eval, y_eval,
                      result["proof"], seed=seed)
    return result


PRUNE_SCORERS = ("influence", "loss-easy", "loss-hard")


def contribution_scores(t: TabularTask, x_eval, y_eval, *, scorer: str = "influence",
                        method: str = "auto") -> np.ndarray:
    """Each training row's value to the evaluation set, higher = worth keeping.

    `influence`: the sum over evaluation rows of the method's score (positive = training
    on the row lowers that row's loss); `loss-easy`: minus the training loss (the EL2N
    rule for abundant data: easy rows teach little, drop them first); `loss-hard`: the
    training loss (hard rows first out: the rule for small, noisy data)."""
    if scorer not in PRUNE_SCORERS:
        raise UserError(f"unknown scorer '{scorer}' (use {', '.join(PRUNE_SCORERS)})")
    if scorer != "influence":
        loss = np.asarray(t.adapter.query_losses(t.x_train, t.y_train), dtype=float)
        return loss if scorer == "loss-easy" else -loss
    est = t.fit(method)
    evaluation = TabularTask(t.model, t.adapter, t.x_train, t.y_train, x_eval, t.config)
    scores, _, _ = evaluation.scores(est, y_eval)
    return np.asarray(scores, dtype=float).sum(0)


def prune_audit(t: TabularTask, x_eval, y_eval, *, fraction: float = 0.1,
                scorer: str = "loss-easy", n_random: int = 3, seed: int = 0,
                method: str = "auto") -> dict:
    """The `fraction` of rows worth least to the evaluation set, and the proof: retrain
    without them vs without as many random rows vs with every row."""
    if not 0 < fraction < 0.5:
        raise UserError(f"--fraction must be in (0, 0.5), got {fraction}")
    m = len(y_eval)
    choose = judge = np.arange(m)
    if scorer == "influence":  # rows chosen on one half of the evaluation set, judged on
        if m < 4:              # the other: judged on the rows they were chosen for, any
            raise UserError("--scorer influence needs at least 4 evaluation rows")
        perm = np.random.default_rng(seed).permutation(m)  # choice would look good
        choose, judge = np.sort(perm[: m // 2]), np.sort(perm[m // 2:])
    value = contribution_scores(t, _take(x_eval, choose), np.asarray(y_eval)[choose],
                                scorer=scorer, method=method)
    n = len(t.y_train)
    k = max(1, round(fraction * n))
    order = np.argsort(value, kind="stable")  # least valuable first
    result = prove(t, order[:k], _take(x_eval, judge), np.asarray(y_eval)[judge],
                   n_random=n_random, seed=seed)
    result.update(scorer=scorer, fraction=fraction, n_train=n, judged_on=int(len(judge)),
                  pruned=[{"row": int(r), "value": float(value[r])} for r in order[:k]])
    return result


FAIRNESS_METRICS = ("dp-gap", "eq-opportunity")


def favorable_rate(adapter, x, favorable) -> np.ndarray:
    """Each row's probability of the favourable label: exp(-loss of that label)."""
    labels = np.full(len(x), favorable)
    return np.exp(-np.asarray(adapter.query_losses(x, labels), dtype=float))


def group_gap(adapter, x_eval, y_eval, groups: np.ndarray, *, metric: str, favorable,
              advantaged, disadvantaged) -> dict:
    """The metric's gap (advantaged minus disadvantaged) in mean favourable probability
    and in the rate of favourable decisions; eq-opportunity counts only rows whose true
    label is the favourable one."""
    scope = np.ones(len(groups), dtype=bool) if metric == "dp-gap" else \
        np.asarray(y_eval).reshape(-1) == favorable
    p = favorable_rate(adapter, x_eval, favorable)
    decided = np.asarray(adapter.predict_targets(x_eval)).reshape(-1) == favorable
    a, b = scope & (groups == advantaged), scope & (groups == disadvantaged)
    if not a.any() or not b.any():
        missing = advantaged if not a.any() else disadvantaged
        which = " with the favourable label" if metric != "dp-gap" else ""
        raise UserError(f"no evaluation rows of group '{missing}'{which}")
    accuracy = float((np.asarray(adapter.predict_targets(x_eval)).reshape(-1) ==
                      np.asarray(y_eval).reshape(-1)).mean())
    return {"gap": float(p[a].mean() - p[b].mean()),
            "decision_gap": float(decided[a].mean() - decided[b].mean()),
            "accuracy": accuracy}


def readable_patterns(frame, flagged: np.ndarray, max_depth: int = 3, top: int = 3
                      ) -> list[dict]:
    """Predicates over the training columns that describe the flagged rows: the leaves of
    a shallow decision tree separating them from the others, most flagged rows first."""
    import pandas as pd
    from sklearn.tree import DecisionTreeClassifier

    table = pd.get_dummies(frame, prefix_sep="=", dtype=float).fillna(-1e9)
    tree = DecisionTreeClassifier(max_depth=max_depth, min_samples_leaf=5, random_state=0)
    tree.fit(table.to_numpy(), flagged.astype(int))
    t, names = tree.tree_, list(table.columns)
    leaves = tree.apply(table.to_numpy())
    out = []

    def walk(node: int, path: list[str]) -> None:
        if t.children_left[node] < 0:
            rows = leaves == node
            hit = int(flagged[rows].sum())
            if hit:
                out.append({"pattern": " and ".join(path) or "every row",
                            "rows": int(rows.sum()), "flagged": hit,
                            "share": hit / int(rows.sum())})
            return
        name, cut = names[t.feature[node]], t.threshold[node]
        if "=" in name and name.split("=", 1)[0] in frame.columns:
            yes, no = name, name.replace("=", "≠", 1)
            walk(t.children_left[node], [*path, no])
            walk(t.children_right[node], [*path, yes])
        else:
            walk(t.children_left[node], [*path, f"{name} <= {cut:.4g}"])
            walk(t.children_right[node], [*path, f"{name} > {cut:.4g}"])

    walk(0, [])
    for item in out:
        item["pattern"] = _simplify(item["pattern"], frame)
    return sorted(out, key=lambda p: (-p["flagged"], -p["share"]))[:top]


def _simplify(pattern: str, frame) -> str:
    """'income > 52.5 and income > 54.15 and approved <= 0.5' -> 'income > 54.15 and
    approved=0': the tightest bound per column, a 0/1 column as its value."""
    if pattern == "every row":
        return pattern
    low: dict[str, float] = {}
    high: dict[str, float] = {}
    other: list[str] = []
    for part in pattern.split(" and "):
        for op in (" <= ", " > "):
            if op in part:
                name, value = part.split(op)
                bound = float(value)
                if op == " > ":
                    low[name] = max(low.get(name, -np.inf), bound)
                else:
                    high[name] = min(high.get(name, np.inf), bound)
                break
        else:
            other.append(part)
    terms = list(other)
    for name in dict.fromkeys([*low, *high]):
        values = set(frame[name].dropna().unique()) if name in frame.columns else set()
        if values <= {0, 1} and values:
            terms.append(f"{name}={1 if name in low else 0}")
            continue
        if name in low and name in high:
            terms.append(f"{low[name]:.4g} < {name} <= {high[name]:.4g}")
        elif name in low:
            terms.append(f"{name} > {low[name]:.4g}")
        else:
            terms.append(f"{name} <= {high[name]:.4g}")
    return " and ".join(terms)


def fairness_audit(t: TabularTask, x_eval, y_eval, groups_eval, frame, *, metric: str =
                   "dp-gap", favorable=1, top_k: int = 20, n_random: int = 3, seed: int = 0,
                   method: str = "auto") -> dict:
    """The training rows that most widen the gap between the groups on the evaluation set
    (their influence on the favourable-label probability of the advantaged group's rows
    minus the disadvantaged group's), the patterns that describe them, and the proof: the
    gap after retraining without them vs without as many random rows."""
    if metric not in FAIRNESS_METRICS:
        raise UserError(f"unknown metric '{metric}' (use {', '.join(FAIRNESS_METRICS)})")
    if t.adapter.is_regression:
        raise UserError("fairness audits need a classifier (a favourable label)")
    check_at_least("--top-k", top_k, 1)
    groups_eval = np.asarray(groups_eval).astype(str)
    kinds = sorted(set(groups_eval))
    if len(kinds) < 2:
        raise UserError("the group column has one value in the evaluation rows: no gap")
    rates = {g: float(favorable_rate(t.adapter, _take(x_eval, np.flatnonzero(groups_eval == g)),
                                     favorable).mean()) for g in kinds}  # noqa: E501
    advantaged, disadvantaged = max(rates, key=rates.get), min(rates, key=rates.get)
    scope = np.ones(len(groups_eval), dtype=bool) if metric == "dp-gap" else \
        np.asarray(y_eval).reshape(-1) == favorable
    a = np.flatnonzero(scope & (groups_eval == advantaged))
    b = np.flatnonzero(scope & (groups_eval == disadvantaged))
    est = t.fit(method)
    both = np.concatenate([a, b])
    scores = np.asarray(est.scores(_take(x_eval, both), np.full(len(both), favorable,
                                                                dtype=t.y_train.dtype)))
    widen = scores[: len(a)].mean(0) - scores[len(a):].mean(0)  # + : raises the gap
    order = np.argsort(-widen, kind="stable")
    flagged = np.zeros(len(widen), dtype=bool)
    flagged[order[:top_k]] = True

    def gap_of(adapter):
        return group_gap(adapter, x_eval, y_eval, groups_eval, metric=metric,
                         favorable=favorable, advantaged=advantaged,
                         disadvantaged=disadvantaged)

    base, cut, rand, spread, confirmed = compare_removal(
        t, order[:top_k], gap_of, "gap", n_random=n_random, seed=seed,
        what=f"gap:{metric}:{favorable!r}:{advantaged!r}:{disadvantaged!r}:"
             f"{digest(x_eval, y_eval, np.asarray(groups_eval).astype(str))}")
    n = len(t.y_train)
    return {"metric": metric, "favorable": favorable, "advantaged": advantaged,
            "disadvantaged": disadvantaged, "n_train": n,
            "ranked": [{"row": int(r), "widens_gap": float(widen[r])} for r in order[:top_k]],
            "patterns": readable_patterns(frame, flagged),
            "proof": {"all rows": base, "without flagged": cut, "without random rows":
                      {**rand, "gap_spread": spread["gap"]},
                      "verdict": "confirmed" if confirmed else "not confirmed"}}
