"""The gradient store: every training row's projected loss gradient, in shards on disk.

Layout of INDEX_DIR/gradients/:
  manifest.json        model identity, parameter set, loss scope, projection (seed, K),
                       template, data fingerprint, shard list with row ranges and sha256
  shard-00000.npy ...  (rows, K) float16 or float32, memory-mapped at query time
  norms.npy            (n,) float32 norms of the stored vectors (for cosine)

Building happens in INDEX_DIR/gradients.partial/: each shard is written to a temporary
name and renamed, so a shard that exists is complete. `plan.json` records what is being
built; a rerun with the same plan keeps the finished shards and continues (shards are
computed in fixed row ranges and fixed batches, so a resumed build is byte-identical to
an uninterrupted one). The directory is renamed to `gradients/` only when complete.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from datablame import __version__
from datablame.adapters.hf_causal_lm import length_order
from datablame.errors import UserError
from datablame.features.projection import PROJECTIONS, make_projector, projector_from_json
from datablame.rows import Rows
from datablame.store.atomic import write_json_atomic
from datablame.template import PromptTemplate

FORMAT = "datablame.gradient-store"
STORE_DTYPES = {"fp16": np.float16, "fp32": np.float32}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _normalised(dots: np.ndarray, norms, query_norm: float, kind: str) -> np.ndarray:
    """Dot products -> cosines when `kind` is cosine; rows with a zero gradient score 0."""
    if kind != "cosine":
        return dots
    n = np.asarray(norms)
    return np.where(n > 0, dots / (np.where(n > 0, n, 1) * query_norm), 0.0)


def _save_npy_atomic(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as fh:
        np.save(fh, array)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _identity(adapter, template: PromptTemplate, rows: Rows, proj_dim: int, seed: int,
              projection: str) -> dict:
    """Everything a stored gradient depends on; a mismatch means the store is unusable."""
    ident = adapter.identity()
    return {
        "model_dir": ident["model_dir"],
        "adapter_dir": ident["adapter_dir"],
        "params": ident["params"],
        "num_params": ident["num_params"],
        "loss_on": ident["loss_on"],
        "max_length": ident["max_length"],
        "template": template.to_json(),
        "data_fingerprint": rows.fingerprint(),
        "rows": len(rows),
        "proj_dim": proj_dim,
        "proj_seed": seed,
        "proj_kind": projection,
    }


def check_store_options(projection: str, store_dtype: str) -> None:
    if store_dtype not in STORE_DTYPES:
        raise UserError(f"unknown store dtype '{store_dtype}' (use fp16 or fp32)")
    if projection not in PROJECTIONS:
        raise UserError(f"unknown projection '{projection}' (use {', '.join(PROJECTIONS)})")


def build_gradient_store(
    index_dir: Path,
    rows: Rows,
    template: PromptTemplate,
    adapter,
    *,
    proj_dim: int = 2048,
    seed: int = 0,
    shard_rows: int = 4096,
    batch_size: int = 0,
    store_dtype: str = "fp16",
    projection: str = "countsketch",
    progress: Callable[[int], None] | None = None,
    stop_after_shards: int | None = None,
) -> dict:
    """Compute, project and store every row's gradient; resumes an interrupted build.

    batch_size 0 picks the largest batch (up to 32) whose per-example gradients fit in
    ~1 GB: batching is what makes featurization fast, memory is what bounds it.
    """
    if batch_size <= 0:
        batch_size = int(min(32, max(1, (1 << 28) // max(1, adapter.num_params))))
    check_store_options(projection, store_dtype)
    final = Path(index_dir) / "gradients"
    partial = Path(index_dir) / "gradients.partial"
    plan = {**_identity(adapter, template, rows, proj_dim, seed, projection),
            "shard_rows": shard_rows, "batch_size": batch_size, "store_dtype": store_dtype}
    if partial.exists():
        old = partial / "plan.json"
        if not old.exists() or json.loads(old.read_text()) != plan:
            shutil.rmtree(partial)  # a different build was interrupted: start over
    partial.mkdir(parents=True, exist_ok=True)
    write_json_atomic(partial / "plan.json", plan)

    projector = make_projector(projection, adapter.num_params, proj_dim, seed)
    n_shards = (len(rows) + shard_rows - 1) // shard_rows
    built = 0
    for s in range(n_shards):
        path = partial / f"shard-{s:05d}.npy"
        lo, hi = s * shard_rows, min(len(rows), (s + 1) * shard_rows)
        if path.exists():
            if progress:
                progress(hi - lo)
            continue
        texts = [template.format(rows.records[i]) for i in range(lo, hi)]
        out = np.empty((hi - lo, proj_dim), dtype=np.float32)
        order = length_order(texts)
        for b in range(0, len(texts), batch_size):
            take = order[b : b + batch_size]
            grads = adapter.gradients([texts[i] for i in take], batch_size=batch_size)
            out[take] = projector.project(grads)
            if progress:
                progress(len(take))
        _save_npy_atomic(path, out.astype(STORE_DTYPES[store_dtype]))
        built += 1
        if stop_after_shards is not None and built >= stop_after_shards and s + 1 < n_shards:
            raise KeyboardInterrupt("stopped on request (test hook)")

    shards, norms = [], []
    for s in range(n_shards):
        path = partial / f"shard-{s:05d}.npy"
        arr = np.load(path, mmap_mode="r")
        norms.append(np.linalg.norm(np.asarray(arr, dtype=np.float32), axis=1))
        shards.append({"file": path.name, "rows": [s * shard_rows, s * shard_rows + len(arr)],
                       "bytes": path.stat().st_size, "sha256": _sha256(path)})
    _save_npy_atomic(partial / "norms.npy", np.concatenate(norms).astype(np.float32))
    manifest = {"format": FORMAT, "format_version": 1, "tool_version": __version__,
                **plan, "projection": projector.to_json(), "shards": shards}
    write_json_atomic(partial / "manifest.json", manifest)
    (partial / "plan.json").unlink()
    if final.exists():
        shutil.rmtree(final)
    os.replace(partial, final)
    return manifest


@dataclass
class GradientStore:
    path: Path
    manifest: dict

    @classmethod
    def load(cls, index_dir: Path, verify: bool = True) -> GradientStore:
        path = Path(index_dir) / "gradients"
        if not (path / "manifest.json").exists():
            hint = " (an interrupted build can be resumed)" if \
                (Path(index_dir) / "gradients.partial").exists() else ""
            raise UserError(
                f"{index_dir} has no gradient store{hint}: run 'datablame index ... "
                "--model ... --gradients'"
            )
        manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
        store = cls(path, manifest)
        store.check_files(verify)
        return store

    def check_files(self, verify: bool) -> None:
        """Truncation is caught by size always; corruption by sha256 when `verify`."""
        for shard in self.manifest["shards"]:
            f = self.path / shard["file"]
            if not f.exists():
                raise UserError(f"gradient store {self.path}: {shard['file']} is missing")
            if f.stat().st_size != shard["bytes"]:
                raise UserError(f"gradient store {self.path}: {shard['file']} is truncated "
                                "or altered (size differs); rebuild it")
            if verify and _sha256(f) != shard["sha256"]:
                raise UserError(f"gradient store {self.path}: {shard['file']} is corrupted "
                                "(checksum differs); rebuild it")

    def check_compatible(self, adapter, template: PromptTemplate, rows: Rows) -> None:
        """Refuse a store made for another model, adapter, parameter set, template or data."""
        want = _identity(adapter, template, rows, self.manifest["proj_dim"],
                         self.manifest["proj_seed"], self.projector.kind)
        labels = {"model_dir": "model", "adapter_dir": "adapter", "params": "parameter set",
                  "num_params": "parameter set", "loss_on": "loss scope",
                  "max_length": "max length", "template": "template",
                  "data_fingerprint": "training data", "rows": "training data"}
        for key, label in labels.items():
            if self.manifest.get(key) != want[key]:
                raise UserError(
                    f"gradient store {self.path} was built for a different {label} "
                    f"({key}: {self.manifest.get(key)!r} vs {want[key]!r}); rebuild it"
                )

    @property
    def projector(self):
        return projector_from_json(self.manifest["projection"])

    def top_k(self, query: np.ndarray, k: int, kind: str = "cosine", absolute: bool = False
              ) -> tuple[np.ndarray, np.ndarray]:
        """Exact scores of every stored row; returns (row ids, scores) of the best k, by
        score or, with `absolute`, by |score| (strongly aligned or strongly opposed).

        Streams shard by shard from memory-mapped files: memory holds one shard's scores
        and a k-sized heap, whatever the number of rows.
        """
        q = np.asarray(query, dtype=np.float32).ravel()
        norms = np.load(self.path / "norms.npy", mmap_mode="r")
        qn = float(np.linalg.norm(q)) or 1.0
        heap: list[tuple[float, int]] = []
        for shard in self.manifest["shards"]:
            lo, hi = shard["rows"]
            block = np.load(self.path / shard["file"], mmap_mode="r")
            scores = _normalised(np.asarray(block, dtype=np.float32) @ q, norms[lo:hi], qn,
                                 kind)
            key = np.abs(scores) if absolute else scores
            take = min(k, len(scores))
            idx = np.argpartition(-key, take - 1)[:take]
            for i in idx:
                item = (float(key[i]), -(lo + int(i)), float(scores[i]))
                if len(heap) < k:
                    heapq.heappush(heap, item)
                elif item > heap[0]:
                    heapq.heapreplace(heap, item)
        best = sorted(heap, reverse=True)
        return (np.array([-r for _, r, _ in best], dtype=np.int64),
                np.array([s for _, _, s in best], dtype=np.float64))

    def score_rows(self, query: np.ndarray, row_ids: np.ndarray, kind: str = "cosine"
                   ) -> np.ndarray:
        """Stored scores of the given rows only (reads just their shards' rows)."""
        q = np.asarray(query, dtype=np.float32).ravel()
        norms = np.load(self.path / "norms.npy", mmap_mode="r")
        qn = float(np.linalg.norm(q)) or 1.0
        ids = np.asarray(row_ids, dtype=np.int64)
        out = np.zeros(len(ids))
        for shard in self.manifest["shards"]:
            lo, hi = shard["rows"]
            inside = np.flatnonzero((ids >= lo) & (ids < hi))
            if not len(inside):
                continue
            block = np.load(self.path / shard["file"], mmap_mode="r")
            vecs = np.asarray(block[ids[inside] - lo], dtype=np.float32)
            out[inside] = _normalised(vecs @ q, norms[ids[inside]], qn, kind)
        return out
