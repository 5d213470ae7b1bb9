"""The retrieval index: row embeddings in FAISS plus a JSON manifest.

Layout of INDEX_DIR:
  manifest.json    what made it (embedder, template, data fingerprint, index type, ...)
                   and the size and sha256 of the files below
  embeddings.npy   the normalised row embeddings (exact re-ranking, rebuilds, checks)
  faiss.index      the FAISS index over them (inner product = cosine)
An `ivfpq` index (for data too large to hold its embeddings in memory) has instead:
  faiss.index      IVF-PQ, trained once on a sample of the rows, its inverted lists in
  lists.ivfdata    an on-disk file (memory-mapped; merged from per-shard indexes)
  embeddings-NNNNN.npy   fp16 embeddings per shard of rows: the exact re-rank of the
                   approximate candidates
The directory is built under a temporary name and renamed into place, so an interrupted
build never leaves something that looks like a valid index. The manifest's file names are
only ever these, inside the index: anything else is refused, not opened.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
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
INDEX_TYPES = ("flat", "ivf", "hnsw", "ivfpq")
OWN_FILES = {"embeddings": "embeddings.npy", "faiss": "faiss.index", "ivfdata": "lists.ivfdata"}
SHARD_FILE = re.compile(r"embeddings-\d{5}\.npy")
IVFPQ_SHARD_ROWS = 65536


def ivfpq_shard_rows() -> int:
    """Rows per ivfpq shard (a test hook, DATABLAME_TEST_IVFPQ_SHARD_ROWS, makes small data
    several shards, in worker processes too)."""
    try:
        rows = int(os.environ.get("DATABLAME_TEST_IVFPQ_SHARD_ROWS", IVFPQ_SHARD_ROWS))
    except ValueError:
        rows = IVFPQ_SHARD_ROWS
    return rows if rows >= 1 else IVFPQ_SHARD_ROWS
IVFPQ_MIN_ROWS = 1000  # fewer rows than this train no product quantizer worth having
IVFPQ_TRAIN_ROWS = 65536  # the sample the coarse and product quantizers are trained on
IVFPQ_RERANK = 10  # approximate candidates per result, re-ranked with exact cosines


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
    elif index_type == "ivfpq":  # its lists live on disk, beside fp16 shards
        raise ValueError("an ivfpq index is built shard by shard: use save_ivfpq_index")
    elif index_type == "hnsw":
        index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 80
        index.hnsw.efSearch = 128
    else:
        raise UserError(f"unknown index type '{index_type}' (use {', '.join(INDEX_TYPES)})")
    index.add(vectors)
    return index


def train_ivfpq(sample: np.ndarray, n_rows: int, seed: int = 0):
    """An empty IVF-PQ index trained on `sample` for `n_rows` rows in all: 4 sqrt(n) lists
    (at most what the sample can train), 8-bit codes of one byte per 8 dimensions (48
    bytes per row for a 384-dimensional embedder) when the dimension allows it."""
    import faiss

    sample = np.ascontiguousarray(sample, dtype=np.float32)
    dim = sample.shape[1]
    nlist = max(1, min(int(4 * math.sqrt(n_rows)), len(sample) // 39 or 1))
    m = next(m for m in (dim // 8, dim // 4, dim // 2, dim, 1) if m and dim % m == 0)
    nbits = 8 if len(sample) >= 256 * 4 else max(1, int(math.log2(max(len(sample) // 4, 2))))
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFPQ(quantizer, dim, nlist, m, nbits, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = seed
    index.cp.min_points_per_centroid = 1  # FAISS's stderr notice about few points is noise
    index.pq.cp.seed = seed
    index.pq.cp.min_points_per_centroid = 1
    index.train(sample)
    index.nprobe = max(1, nlist // 8)
    return index


def check_ivfpq_rows(rows: Rows) -> None:
    if len(rows) < IVFPQ_MIN_ROWS:
        raise UserError(f"--index-type ivfpq is for large data: {rows.path} has {len(rows)} "
                        f"rows (fewer than {IVFPQ_MIN_ROWS}); use flat, which is exact")


@contextlib.contextmanager
def _faiss_stdout_quiet():
    """FAISS prints notes from C ("resizing", "updating ondisk filename") to fd 1, where
    they would corrupt `--json` output: send fd 1 to /dev/null while it runs."""
    sys.stdout.flush()
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def save_ivfpq_index(out: Path, rows: Rows, template: PromptTemplate, embed,
                     embedder_name: str, shard_rows: int | None = None,
                     before_swap: Callable[[Path], None] | None = None,
                     progress=None, shard_of: tuple[int, int] | None = None,
                     commit_only: bool = False) -> dict:
    """Embed the rows a shard at a time into an IVF-PQ index whose lists live on disk
    (`store.ivfpq_build`): the quantizers trained once, on evenly spaced rows; each shard's
    rows added to a copy of the trained index and written as a piece, with the shard's
    fp16 embeddings; FAISS then merges the pieces' inverted lists into one file on disk.
    Memory holds one shard's embeddings, not every row's; an interrupted build resumes.
    `embed(texts)` returns normalised float32 vectors.

    `shard_of=(i, n)`: one of n workers writes the shards s with s % n == i and commits
    nothing; returns {"written", "mine", "missing"}. `commit_only`: merge the pieces the
    workers wrote (refused while any is missing)."""
    from datablame.store.ivfpq_build import IvfpqBuild

    build = IvfpqBuild(out, rows, template, embed, embedder_name,
                       ivfpq_shard_rows() if shard_rows is None else shard_rows,
                       existing_only=commit_only)
    try:
        if not commit_only:
            mine = [s for s in range(build.n_shards)
                    if shard_of is None or s % shard_of[1] == shard_of[0]]
            written = build.build(mine, progress)
            if shard_of is not None:
                return {"written": written, "mine": len(mine), "missing": build.missing()}
        return build.commit(_manifest(rows, template, embedder_name, 0, "ivfpq"),
                            before_swap)
    finally:
        build.close()


@dataclass
class RetrievalIndex:
    path: Path
    manifest: dict
    index: object  # faiss.Index
    _shards: list | None = field(default=None, repr=False)  # ivfpq: fp16 shards, mapped once

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
        if self.manifest.get("index_type") == "ivfpq":
            return self._search_reranked(q, k)
        sims, ids = self.index.search(q, k)
        if (ids < 0).any() and hasattr(self.index, "nprobe"):
            # IVF probes a few lists and can return fewer than k: widen to every list
            # rather than hand back a short candidate set
            saved, self.index.nprobe = self.index.nprobe, self.index.nlist
            sims, ids = self.index.search(q, k)
            self.index.nprobe = saved
        return 1.0 - sims, ids

    def _search_reranked(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """IVF-PQ's approximate candidates (IVFPQ_RERANK per result), ordered by their
        exact cosines from the fp16 embeddings."""
        want = min(self.num_rows, max(k * IVFPQ_RERANK, k))
        _, cand = self.index.search(q, want)
        if (cand[:, :k] < 0).any():
            # the probed lists hold fewer than k rows: probe every list, as `ivf` does
            saved, self.index.nprobe = self.index.nprobe, self.index.nlist
            _, cand = self.index.search(q, want)
            self.index.nprobe = saved
        shards = self.manifest["shards"]
        bounds = np.array([sh["rows"][1] for sh in shards])
        if self._shards is None:
            self._shards = [np.load(self.path / sh["file"], mmap_mode="r") for sh in shards]
        dist = np.full((len(q), k), np.inf, dtype=np.float32)
        ids = np.full((len(q), k), -1, dtype=np.int64)
        for j in range(len(q)):
            found = cand[j][cand[j] >= 0]
            if (found >= self.num_rows).any():
                raise UserError(f"{self.path}/{OWN_FILES['ivfdata']} is damaged (a row id "
                                "past the end of the data); rebuild the index")
            vecs = np.empty((len(found), q.shape[1]), dtype=np.float32)
            which = np.searchsorted(bounds, found, side="right")
            for s in np.unique(which):
                sel = np.flatnonzero(which == s)
                vecs[sel] = self._shards[s][found[sel] - shards[s]["rows"][0]]
            sims = vecs @ q[j]
            order = np.lexsort((found, -sims))[:k]  # ties to the lower row id
            ids[j, : len(order)] = found[order]
            dist[j, : len(order)] = 1.0 - sims[order]
        return dist, ids

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
    manifest = _manifest(rows, template, embedder_name, int(vectors.shape[1]), index_type)
    with atomic_dir(Path(out), before_swap) as tmp:
        np.save(tmp / OWN_FILES["embeddings"], vectors)
        faiss.write_index(index, str(tmp / OWN_FILES["faiss"]))
        manifest["files"] = {key: _file_entry(tmp / OWN_FILES[key])
                             for key in ("embeddings", "faiss")}
        write_json_atomic(tmp / "manifest.json", manifest)  # written last
    return manifest


def _manifest(rows: Rows, template: PromptTemplate, embedder_name: str, dim: int,
              index_type: str) -> dict:
    return {
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
        "dim": int(dim),
        "metric": "cosine",
        "index_type": index_type,
    }


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
    flags = 0
    if manifest.get("index_type") == "ivfpq":
        _check_ivfpq_files(path, manifest)
        # the lists file is found beside the index, wherever the directory has moved, and
        # mapped read-only (a shared or read-only index loads)
        flags = faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY
    try:
        with _faiss_stdout_quiet():
            index = faiss.read_index(str(faiss_path), flags)
    except Exception:
        raise UserError(f"{path}/faiss.index is missing or corrupted; rebuild the index") from None
    if index.ntotal != manifest["data"]["rows"] or index.d != manifest["dim"]:
        raise UserError(f"{path}/faiss.index does not match its manifest; rebuild the index")
    return RetrievalIndex(path=path, manifest=manifest, index=index)


def _check_ivfpq_files(path: Path, manifest: dict) -> None:
    """The lists file and the embedding shards: inside the index, their sizes as written,
    and shards that cover the rows in order. Their sha256 is recorded, not re-read on every
    load (at a billion rows they are tens of GB); a damaged row id is caught at search."""
    files = manifest.get("files")
    if not isinstance(files, dict) or "ivfdata" not in files or "faiss" not in files:
        raise UserError(f"index {path}: its manifest does not list its files; rebuild the "
                        "index")
    _check_own_file(path, manifest, "ivfdata", content=False)
    expected = 0
    shards = manifest.get("shards")
    for shard in shards if isinstance(shards, list) and shards else [{}]:
        if not isinstance(shard, dict) or not isinstance(shard.get("rows"), list) or \
                len(shard["rows"]) != 2:
            shard = {"file": None}
        name = shard.get("file")
        f = path / str(name)
        if not isinstance(name, str) or not SHARD_FILE.fullmatch(name) or \
                Path(os.path.realpath(f)).parent != Path(os.path.realpath(path)):
            raise UserError(f"index {path}: its manifest names a shard that is not one of "
                            f"its own ({name!r}); rebuild the index")
        if shard["rows"][0] != expected:
            raise UserError(f"index {path}: its shards do not cover the rows in order; "
                            "rebuild the index")
        expected = shard["rows"][1]
        if not f.is_file() or f.stat().st_size != shard.get("bytes"):
            raise UserError(f"{path}/{name} is missing or truncated; rebuild the index")
    if expected != manifest["data"]["rows"]:
        raise UserError(f"index {path}: its shards do not cover the rows in order; rebuild "
                        "the index")


def _check_own_file(path: Path, manifest: dict, key: str, content: bool = True) -> Path:
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
    if content and _file_entry(f)["sha256"] != entry.get("sha256"):
        raise UserError(f"{path}/{name} is corrupted (checksum differs); rebuild the index")
    return f
