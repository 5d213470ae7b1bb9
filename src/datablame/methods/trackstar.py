"""TrackStar (Chang et al. 2024, "Scalable influence and fact tracing for LLM pretraining").

    phi(z)   = P (grad L(z) / sqrt(v + eps))        v: Adam's second moment at the end of
                                                    training, P: a random projection
    R        = (1 - mix) Phi_train^T Phi_train / n + mix Phi_query^T Phi_query / m + ridge
    score    = cos(R^{-1/2} phi(query), R^{-1/2} phi(row))

Why each part: a raw gradient is dominated by the few parameters with large gradients
everywhere (the ones Adam divides by a large sqrt(v) when it trains), so dividing by
sqrt(v) compares rows in the units the optimizer actually moved in; whitening by R down-
weights directions that every row (or every query: `mix`) shares, such as the prompt
template; unit normalisation stops rows with a large loss from outranking every query's
real source.

v comes from the adapter's `optimizer_state.safetensors` (written by `datablame finetune`)
when there is one, else it is estimated as the mean squared per-row gradient of the
training rows (`second_moments="estimate"`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from datablame.errors import UserError
from datablame.features.projection import RandomProjector
from datablame.methods.base import Method, to_numpy
from datablame.models.base import GRADIENTS
from datablame.models.lora_finetune import OPTIMIZER_FILE

# the ridge, in units of the mean non-zero eigenvalue: chosen on bench/text_lds.py seed 0
# (10-epoch recipe) among 0.1 / 1 / 3 / 10, reported on seed 1 and the 80-epoch recipe
DEFAULT_RIDGE = 3.0


def saved_second_moments(adapter_dir: str | Path, param_names: list[str]) -> np.ndarray | None:
    """Adam's exp_avg_sq for `param_names`, flattened in that order; None when the adapter
    has no saved optimizer state. A state that lacks one of the parameters is refused: a
    partial preconditioner would silently rescale some parameters and not others."""
    from safetensors import safe_open

    path = Path(adapter_dir) / OPTIMIZER_FILE
    if not path.exists():
        return None
    with safe_open(str(path), "pt") as fh:
        keys = set(fh.keys())
        missing = [n for n in param_names if f"{n}.exp_avg_sq" not in keys]
        if missing:
            raise UserError(f"{path} has no second moment for {len(missing)} of the traced "
                            f"parameters (e.g. {missing[0]}): trace the parameters it was "
                            "trained with (--params lora) or use --second-moments estimate")
        return np.concatenate([fh.get_tensor(f"{n}.exp_avg_sq").float().reshape(-1).numpy()
                               for n in param_names])


def trackstar_features(grads: np.ndarray, second_moments: np.ndarray | None,
                       projector: RandomProjector | None, eps: float = 1e-8) -> np.ndarray:
    """phi = P (g / sqrt(v + eps)), float64 rows."""
    g = np.asarray(grads, dtype=np.float64)
    if second_moments is not None:
        g = g / np.sqrt(np.asarray(second_moments, dtype=np.float64) + eps)
    if projector is not None:
        g = np.asarray(projector.project(torch.from_numpy(g)), dtype=np.float64)
    return g


def spectrum_scale(gram: np.ndarray, n_samples: int) -> float:
    """The mean of a Gram matrix's non-zero eigenvalues: its trace over its rank bound,
    min(samples, dimension). A ridge relative to the mean over *every* dimension shrinks
    with the rows when there are fewer rows than dimensions (a few hundred rows, a
    1024-dimensional projection), and the inverse then blows up the directions the rows
    barely span; relative to this mean it stays the same size for any row count."""
    return float(np.trace(gram)) / max(1, min(n_samples, len(gram)))


def whitener(phi_train: np.ndarray, phi_query: np.ndarray | None = None, mix: float = 0.0,
             ridge: float = DEFAULT_RIDGE) -> np.ndarray:
    """R^{-1/2} for R = (1 - mix) train autocorrelation + mix query autocorrelation, with a
    ridge relative to the mean of R's non-zero eigenvalues (scale- and size-free)."""
    r = phi_train.T @ phi_train / len(phi_train)
    n = len(phi_train)
    if mix > 0 and phi_query is not None and len(phi_query):
        r = (1 - mix) * r + mix * (phi_query.T @ phi_query / len(phi_query))
        n += len(phi_query)
    lam = ridge * spectrum_scale(r, n)
    vals, vecs = np.linalg.eigh(r + lam * np.eye(len(r)))
    return (vecs / np.sqrt(np.maximum(vals, lam))) @ vecs.T


def unit_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def trackstar_scores(g_query: np.ndarray, g_train: np.ndarray,
                     second_moments: np.ndarray | None, *, proj_dim: int = 1024,
                     mix: float = 0.0, ridge: float = DEFAULT_RIDGE, seed: int = 0
                     ) -> np.ndarray:
    """(n_queries, n_train) TrackStar scores from raw per-example gradients."""
    dim = g_train.shape[1]
    projector = RandomProjector(dim, proj_dim, seed) if dim > proj_dim else None
    phi_t = trackstar_features(g_train, second_moments, projector)
    phi_q = trackstar_features(g_query, second_moments, projector)
    w = whitener(phi_t, phi_q, mix, ridge)
    return unit_rows(phi_q @ w) @ unit_rows(phi_t @ w).T


class TrackStar(Method):
    name = "trackstar"
    requires = (GRADIENTS,)

    def __init__(self, proj_dim: int = 1024, mix: float = 0.0, ridge: float = DEFAULT_RIDGE,
                 second_moments: str = "auto", seed: int = 0):
        if second_moments not in ("auto", "saved", "estimate", "none"):
            raise UserError(f"unknown second moments '{second_moments}' "
                            "(use auto, saved, estimate or none)")
        if not 0 <= mix < 1:
            raise UserError(f"the query mix must be in [0, 1), not {mix}")
        self.proj_dim, self.mix, self.ridge, self.seed = proj_dim, mix, ridge, seed
        self.second_moments = second_moments

    def fit(self, adapter, x_train, y_train):
        super().fit(adapter, x_train, y_train)
        self.g_train = to_numpy(adapter.gradients(x_train, y_train))
        self.v = self._second_moments(adapter)
        return self

    def _second_moments(self, adapter) -> np.ndarray | None:
        if self.second_moments == "none":
            self.v_source = "none"
            return None
        saved = None
        lm = getattr(adapter, "lm", None)
        if self.second_moments in ("auto", "saved") and lm is not None and \
                lm.adapter_dir is not None:
            saved = saved_second_moments(lm.adapter_dir, list(lm.param_names))
        if saved is None and self.second_moments == "saved":
            raise UserError(f"the adapter has no {OPTIMIZER_FILE} (fine-tune it with "
                            "`datablame finetune`, or use --second-moments estimate)")
        self.v_source = "saved" if saved is not None else "estimated"
        return saved if saved is not None else (self.g_train ** 2).mean(0)

    def scores(self, x_query, y_query) -> np.ndarray:
        g_q = to_numpy(self.adapter.gradients(x_query, y_query))
        return trackstar_scores(g_q, self.g_train, self.v, proj_dim=self.proj_dim,
                                mix=self.mix, ridge=self.ridge, seed=self.seed)

    def self_influence(self) -> np.ndarray:
        return np.ones(self.n_train)
