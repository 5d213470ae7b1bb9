"""The featurization loop: every training row -> its projected loss gradient -> the store.

Rows are formatted with the index's template, batched by length (less padding), their
per-example gradients taken by the model, whitened and projected to K numbers on the
device they were computed on (only those K leave a GPU) and handed to the store writer
shard by shard. Shards are fixed row ranges computed in fixed batches, so a
resumed build is byte-identical to an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from datablame.data.rows import Rows
from datablame.data.template import PromptTemplate
from datablame.errors import UserError
from datablame.features.curvature import (
    both_vectors,
    curvature_plan,
    fit_curvature,
    holds_both,
    sample_rows,
)
from datablame.features.projection import make_projector
from datablame.models.hf_causal_lm import length_order
from datablame.store.gradient_store import (
    GradientStoreWriter,
    check_store_options,
    store_identity,
)

GRADIENT_BYTES_PER_BATCH = 1 << 30  # ~1 GB of fp32 per-example gradients per batch
MAX_AUTO_BATCH = 32


def auto_batch_size(num_params: int) -> int:
    """The largest batch (up to 32) whose per-example gradients fit in ~1 GB: batching is
    what makes featurization fast, memory is what bounds it."""
    return int(min(MAX_AUTO_BATCH, max(1, (GRADIENT_BYTES_PER_BATCH // 4) // max(1, num_params))))


def project_row_gradients(texts: list, model, projector, batch_size: int,
                          progress: Callable[[int], None] | None = None,
                          report: dict[str, list[int]] | None = None, offset: int = 0,
                          whiten: Callable | None = None, both: bool = False) -> np.ndarray:
    """(len(texts), K) float32 projected gradients (each whitened first by `whiten`, the
    store's curvature, if given; with `both`, (len(texts), 2K): the plain and the whitened
    projections side by side, each of unit length); rows the model had to cut or could
    not score are added to `report` under their global row id (offset + position)."""
    k = projector.dim_out
    out = np.empty((len(texts), k * (2 if both else 1)), dtype=np.float32)

    def project(grads: torch.Tensor) -> torch.Tensor:  # on the device the gradients are on
        if both:
            return torch.cat([projector.project_tensor(grads),
                              projector.project_tensor(whiten(grads))], dim=1)
        return projector.project_tensor(grads if whiten is None else whiten(grads))

    order = length_order(texts)
    for b in range(0, len(texts), batch_size):
        take = order[b : b + batch_size]
        projected = model.gradients([texts[i] for i in take], batch_size=batch_size,
                                    warn=False, reduce=project)
        if report is not None:
            for kind, idx in model.last_report.items():
                report.setdefault(kind, []).extend(offset + int(take[j]) for j in idx)
        out[take] = both_vectors(projected[:, :k], projected[:, k:]) if both else projected
        if progress:
            progress(len(take))
    return out


def build_gradient_store(
    index_dir: Path,
    rows: Rows,
    template: PromptTemplate,
    model,
    *,
    proj_dim: int = 2048,
    seed: int = 0,
    shard_rows: int = 4096,
    batch_size: int = 0,
    store_dtype: str = "fp16",
    projection: str = "countsketch",
    progress: Callable[[int], None] | None = None,
    stop_after_shards: int | None = None,
    shard_of: tuple[int, int] | None = None,
    commit_only: bool = False,
    shards: list[int] | None = None,
    curvature: str = "none",
) -> dict:
    """Compute, project and store every row's gradient (`model`: a `CausalLMAdapter`);
    resumes an interrupted build. batch_size 0 picks `auto_batch_size`.

    `shard_of=(i, n)`: one of n workers (a SLURM array task, a torchrun rank, ...) writes
    the shards s with s % n == i and commits nothing; returns {"written", "mine",
    "missing"}. `shards`: write exactly these (a Ray actor's task), same return.
    `commit_only`: check that every shard is there and commit them. Shards are fixed row
    ranges in fixed batches, so the store is byte-identical to one process's.

    `curvature="ekfac"`: store P H^-1/2 g (`features.curvature`), the curvature fitted
    once per build before any shard and shared by every worker; "both" (and "auto" where
    the curvature is cheap): the plain and the whitened projections side by side."""
    if batch_size <= 0:
        batch_size = auto_batch_size(model.num_params)
    check_store_options(projection, store_dtype)
    plan = {**store_identity(model.identity(), template, rows, proj_dim, seed, projection),
            "shard_rows": shard_rows, "batch_size": batch_size, "store_dtype": store_dtype}
    fit_plan = curvature_plan(curvature, len(rows), seed, model)
    if fit_plan is not None:  # absent otherwise: a plain store's plan is unchanged
        plan["curvature"] = fit_plan
    writer = GradientStoreWriter(index_dir, plan, existing_only=commit_only,
                                 worker=shard_of is not None)
    projector = make_projector(projection, model.num_params, proj_dim, seed)
    if commit_only:
        missing = writer.missing()
        if missing:
            shown = ", ".join(map(str, missing[:8])) + (" ..." if len(missing) > 8 else "")
            raise UserError(f"{len(missing)} of {writer.n_shards} gradient shards are not "
                            f"written yet (shard {shown}): rerun their --shard-of workers")
        return writer.commit(projector.to_json())
    ek = writer.curvature(lambda: fit_curvature(
        model, [template.format(rows.records[int(i)]) for i in sample_rows(len(rows))],
        fit_plan))
    whiten = None if ek is None else ek.whiten
    mine = list(shards) if shards is not None else [
        s for s in range(writer.n_shards) if shard_of is None or s % shard_of[1] == shard_of[0]]
    report: dict[str, list[int]] = {}  # rows cut to max length or with nothing to score
    built = 0
    for s in mine:
        lo, hi = writer.row_range(s)
        if writer.has(s):
            if progress:
                progress(hi - lo)
            continue
        texts = [template.format(r) for r in rows.records[lo:hi]]  # one read per shard
        writer.write(s, project_row_gradients(texts, model, projector, batch_size, progress,
                                              report, offset=lo, whiten=whiten,
                                              both=holds_both(fit_plan)))
        built += 1
        if stop_after_shards is not None and built >= stop_after_shards \
                and s + 1 < writer.n_shards:
            raise KeyboardInterrupt("stopped on request (test hook)")
    # once for the whole build, rows named by id
    model.warn_report({k: sorted(v) for k, v in report.items()}, len(rows),
                      names=range(len(rows)))
    if shard_of is not None or shards is not None:
        return {"written": built, "mine": len(mine), "missing": writer.missing()}
    return writer.commit(projector.to_json())
