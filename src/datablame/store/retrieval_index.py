"""The retrieval index: row embeddings in FAISS plus a JSON manifest.

Layout of INDEX_DIR:
  manifest.json    what made it (embedder, template, data fingerprint, index type, ...)
                   and the size and sha256 of the two files below
  embeddings.npy   the normalised row embeddings (exact re-ranking, rebuilds, checks)
  faiss.index      the FAISS index over them (inner product = cosine)
The directory is built under a temporary name and renamed into place, so an interrupted
build never leaves something that looks like a valid index. The manifest's file names are
only ever these two, inside the index: anything else is refused, not opened.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from datablame import __version__
from datablame.data.rows import Rows
from datablame.data.template import PromptTemplate, template_from_json
from datablame.errors import UserError
from datablame.store.atomic import atomic_dir, write_json_atomic
from datablame.store.content_digest import sha256_file

FORMAT = "datablame.retrieval-index"
FORMAT_VERSION = 1
INDEX_TYPES = ("flat", "ivf", "hnsw")
OWN_FILES = {"embeddings": "embeddings.npy", "faiss": "faiss.index"}


def _file_entry(path: Path) -> dict:
    return {"file": path.name, "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def build_faiss(vectors: np.ndarray, index_type: str = "flat", seed: int = 0):
    """Exact flat search by default; IVF / HNSW for large data (approximate)."""
    import faiss

    n, dim = vectors.shape
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if index_type == "flat":
        index = faiss.IndexFlatIP(dim)
    elif index_type == "ivf":
        nlist = max(1, min(int(4 * math.sqrt(n)), n // 39 or 1))
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        index.cp.min_points_per_centroid = 1  # FAISS's stderr notice about few points is noise
        index.train(vectors)
        index.nprobe = max(1, nlist // 8)
    elif index_type == "hnsw":
        index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 80
        index.hnsw.efSearch = 128
    else:
        raise UserError(f"unknown index type '{index_type}' (use {', '.join(INDEX_TYPES)})")
    index.add(vectors)
    return index


@dataclass
class RetrievalIndex:
    path: Path
    manifest: dict
    index: object  # faiss.Index

    @property
    def template(self) -> PromptTemplate:
        return template_from_json(self.manifest["template"])

    @property
    def data_path(self) -> Path:
        return Path(self.manifest["data"]["path"])

    @property
    def num_rows(self) -> int:
        return int(self.manifest["data"]["rows"])

    def search(self, query_vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(cosine distances, row ids), best first; distance = 1 - cosine similarity."""
        k = min(k, self.num_rows)
        q = np.ascontiguousarray(query_vectors, np.float32)
        sims, ids = self.index.search(q, k)
        if (ids < 0).any() and hasattr(self.index, "nprobe"):
            # IVF probes a few lists and can return fewer than k: widen to every list
            # rather than hand back a short candidate set
            saved, self.index.nprobe = self.index.nprobe, self.index.nlist
            sims, ids = self.index.search(q, k)
            self.index.nprobe = saved
        return 1.0 - sims, ids

    def check_rows(self, rows: Rows) -> None:
        """Refuse training data that is not what the index was built from."""
        data = self.manifest["data"]
        if len(rows) != data["rows"]:
            raise UserError(
                f"index {self.path} is stale: it was built from {data['rows']} rows, "
                f"{rows.path} now has {len(rows)}; rebuild it with 'datablame index'"
            )
        if rows.fingerprint() != data["fingerprint"]:
            raise UserError(
                f"index {self.path} is stale: {rows.path} changed since it was indexed "
                "(content fingerprint differs); rebuild it with 'datablame index'"
            )


def save_index(out: Path, vectors: np.ndarray, rows: Rows, template: PromptTemplate,
               embedder_name: str, index_type: str,
               before_swap: Callable[[Path], None] | None = None) -> dict:
    import faiss

    index = build_faiss(vectors, index_type)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "tool_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "data": {
            "path": str(rows.path.resolve()),
            "rows": len(rows),
            "fingerprint": rows.fingerprint(),
            "columns": rows.columns,
            "split": rows.split,
        },
        "template": template.to_json(),
        "embedder": embedder_name,
        "dim": int(vectors.shape[1]),
        "metric": "cosine",
        "index_type": index_type,
    }
    with atomic_dir(Path(out), before_swap) as tmp:
        np.save(tmp / OWN_FILES["embeddings"], vectors)
        faiss.write_index(index, str(tmp / OWN_FILES["faiss"]))
        manifest["files"] = {key: _file_entry(tmp / name) for key, name in OWN_FILES.items()}
        write_json_atomic(tmp / "manifest.json", manifest)  # written last
    return manifest


def read_manifest(path: str | Path) -> dict:
    """The index's checked manifest alone: what a caller needs before the FAISS file (which
    is checksummed on load) is worth reading, e.g. the template to check a query against."""
    path = Path(path)
    manifest_path = path / "manifest.json"
    if not path.is_dir():
        raise UserError(f"index directory not found: {path}")
    if not manifest_path.exists():
        raise UserError(f"{path} is not a datablame index (no manifest.json)")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        raise UserError(f"{manifest_path} is corrupted (not valid JSON)") from None
    if manifest.get("format") != FORMAT:
        raise UserError(f"{path} is not a datablame retrieval index")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise UserError(f"{path} was written by a newer datablame; upgrade to read it")
    return manifest


def load_index(path: str | Path) -> RetrievalIndex:
    import faiss

    path = Path(path)
    manifest = read_manifest(path)
    faiss_path = _check_own_file(path, manifest, "faiss")
    try:
        index = faiss.read_index(str(faiss_path))
    except Exception:
        raise UserError(f"{path}/faiss.index is missing or corrupted; rebuild the index") from None
    if index.ntotal != manifest["data"]["rows"] or index.d != manifest["dim"]:
        raise UserError(f"{path}/faiss.index does not match its manifest; rebuild the index")
    return RetrievalIndex(path=path, manifest=manifest, index=index)


def _check_own_file(path: Path, manifest: dict, key: str) -> Path:
    """The index's own file `key`, confined to the index and checked against the manifest
    (size and sha256: FAISS parses it in native code, where damage can crash the process).
    Indexes written before files were listed fall back to the fixed name, unchecked."""
    entry = manifest.get("files", {}).get(key) if isinstance(manifest.get("files"), dict) \
        else None
    name = OWN_FILES[key]
    if entry is None:
        return path / name
    if not isinstance(entry, dict) or entry.get("file") != name:
        raise UserError(f"index {path}: its manifest names a file that is not one of its own "
                        f"({(entry.get('file') if isinstance(entry, dict) else entry)!r}); "
                        "rebuild the index")
    f = path / name
    if Path(os.path.realpath(f)).parent != Path(os.path.realpath(path)):
        raise UserError(f"index {path}: {name} resolves outside the index (to "
                        f"{os.path.realpath(f)}); rebuild the index")
    if not f.is_file():
        raise UserError(f"{path}/{name} is missing; rebuild the index")
    if f.stat().st_size != entry.get("bytes"):
        raise UserError(f"{path}/{name} is truncated or altered (size differs); rebuild the "
                        "index")
    if _file_entry(f)["sha256"] != entry.get("sha256"):
        raise UserError(f"{path}/{name} is corrupted (checksum differs); rebuild the index")
    return f
