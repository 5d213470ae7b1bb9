"""The curvature a gradient store divides out of every row's gradient before projecting it.

With `index --gradients --curvature ekfac`, each row's gradient g is stored as P H^-1/2 g
(P: the projection, H: a true-Fisher EK-FAC of the LoRA weights), and each query's the
same way, so the store's cosine is the alignment of two gradients *after* the curvature:
directions every row moves in count less, directions few rows move in count more. That
needs the row's whitened norm, which only a store of whitened vectors has; a store of
plain gradients cannot serve it.

With `--curvature both` (what `auto`, the default, builds where the curvature is cheap),
each row keeps both vectors, side by side and each of unit length: [Pg/|Pg| ; PWg/|PWg|]
(W = H^-1/2). A query then weighs the halves: its dot with a row is (1 - m) x the plain
cosine + m x the whitened one, so one pass over the store gives the plain, the whitened or
any mixed score (`methods.fusion.mix_weight` picks m per query; why in the README).

The curvature is fitted once per build, before any shard, on evenly spaced rows (at most
`SAMPLE_ROWS`), saved as `curvature.npz` inside the build and named by its sha256 in every
shard's sidecar: every worker of a sharded build (`--shard-of`, `--workers`, `--ray`)
whitens with the same bytes, and the commit refuses shards whitened with another fit.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from datablame.errors import UserError

CURVATURES = ("auto", "none", "ekfac", "both")  # auto: both where the weights allow it
SAMPLE_ROWS = 4096  # rows the curvature is fitted on; EK-FAC draws enough labels per row
CURVATURE_FILE = "curvature.npz"
AUTO_LIMIT_BYTES = 1 << 30  # "auto" whitens while the curvature stays this small (below)


def check_curvature(kind: str) -> None:
    if kind not in CURVATURES:
        raise UserError(f"unknown curvature '{kind}' (use {', '.join(CURVATURES)})")


def sample_rows(n_rows: int, limit: int = SAMPLE_ROWS) -> np.ndarray:
    """Evenly spaced row ids, all of them when there are at most `limit`: the same rows in
    every process, and spread over a file that may be sorted by source or date."""
    if n_rows <= limit:
        return np.arange(n_rows)
    return np.unique(np.linspace(0, n_rows - 1, limit).round().astype(np.int64))


def curvature_plan(kind: str, n_rows: int, seed: int, model) -> dict | None:
    """What the fit depends on besides the model and rows (which the store's plan names);
    None for a plain store. "auto" is "both" where the selected weights have Kronecker
    factors (linear / LoRA layers) and the curvature is cheap, plain gradients elsewhere
    (e.g. --params all, whose embeddings have none); "ekfac" and "both" refuse such
    weights. A store of both vectors says so in its plan ("vectors")."""
    check_curvature(kind)
    if kind == "none":
        return None
    if kind == "auto" and not model._hooks_ok:
        from datablame import progress

        progress.note("--curvature auto: the selected weights have no Kronecker factors "
                      "(not all LoRA / linear layers); building a plain store")
        return None
    if kind == "auto":
        size, flops = curvature_cost(model)
        if size > AUTO_LIMIT_BYTES:
            from datablame import progress

            progress.note(f"--curvature auto: this model's curvature would take "
                          f"{size / 2**30:.1f} GB and whitening ~{flops / 1e9:.0f} GFLOP "
                          "per row; building a plain store (pass --curvature "
                          "both or ekfac to whiten anyway)")
            return None
    if not model._hooks_ok:
        raise UserError(f"--curvature {kind} needs LoRA weights (Kronecker factors of "
                        "linear layers): pass an adapter with --params lora or lora-b, or "
                        "--curvature none")
    from datablame.methods.ekfac import EKFAC

    sampled = len(sample_rows(n_rows))
    ek = EKFAC(seed=seed)
    return {"kind": "ekfac", "fisher": ek.fisher, "rows": sampled,
            "draws_per_row": ek.draws_for(sampled), "damping_scale": ek.damping_scale,
            "seed": seed, **({"vectors": "both"} if kind != "ekfac" else {})}


def holds_both(curvature: dict | None) -> bool:
    """Whether a store's plan / manifest curvature entry keeps plain and whitened vectors."""
    return isinstance(curvature, dict) and curvature.get("vectors") == "both"


def stored_width(proj_dim: int, curvature: dict | None) -> int:
    """Columns per stored row: K, or 2K for a store of both vectors."""
    return proj_dim * (2 if holds_both(curvature) else 1)


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Each row divided by its length (a zero row stays zero), float32."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def both_vectors(plain: np.ndarray, whitened: np.ndarray) -> np.ndarray:
    """(n, 2K) stored rows of a store of both vectors, from the (n, K) projections of the
    plain and the whitened gradients."""
    return np.hstack([unit_rows(plain), unit_rows(whitened)])


def query_vector(plain: np.ndarray, whitened: np.ndarray, m: float) -> np.ndarray:
    """(n, 2K) query rows whose dot with a stored row is (1 - m) x the plain cosine +
    m x the whitened cosine (of the projections)."""
    return np.hstack([(1.0 - m) * unit_rows(plain), m * unit_rows(whitened)])


def curvature_cost(model) -> tuple[int, int]:
    """(bytes of curvature.npz, FLOPs of whitening one row) for the model's selected
    weights: per (out, in) weight, EK-FAC keeps an in x in and an out x out eigenbasis and
    out x in eigenvalues (float32), and whitening rotates the gradient into the eigenbasis
    and back (4 matrix products)."""
    params = dict(model.model.named_parameters())
    size = flops = 0
    for name in model.param_names:
        weight = params[name]
        if weight.dim() != 2:  # biases: no Kronecker factor
            continue
        out, inp = weight.shape
        size += 4 * (inp * inp + out * out + out * inp)
        flops += 4 * out * inp * (out + inp)
    return size, flops


def fit_curvature(model, texts: list, plan: dict):
    """A true-Fisher EK-FAC of `model`'s selected weights on `texts` (the sampled rows,
    formatted), as `plan` says."""
    from datablame import progress
    from datablame.methods.ekfac import EKFAC
    from datablame.models.text_rows import TextRowsAdapter

    ek = EKFAC(damping_scale=plan["damping_scale"], fisher=plan["fisher"],
               samples=plan["draws_per_row"], seed=plan["seed"])
    progress.note(f"fitting the curvature (EK-FAC, true Fisher) on {len(texts)} rows x "
                  f"{plan['draws_per_row']} drawn answer(s) each, once for this build")
    ek.fit_curvature(TextRowsAdapter(model, batch_size=8), texts)
    return ek


def save_curvature(ek, path: Path) -> None:
    """Write atomically: the workers of a build read it while others may be starting."""
    from datablame.store.atomic import write_bytes_atomic

    buffer = io.BytesIO()
    np.savez(buffer, **ek.curvature_arrays())
    write_bytes_atomic(path, buffer.getvalue())


def load_curvature(path: Path):
    """The store's EK-FAC (curvature only: `whiten` and `_solve`, no training rows)."""
    from datablame.methods.ekfac import EKFAC

    with np.load(path, allow_pickle=False) as arrays:
        return EKFAC.from_curvature_arrays(arrays)
