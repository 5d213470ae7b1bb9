"""An `ivfpq` retrieval index built in pieces, by one process or by many workers.

The pieces live in a sibling build directory, `.NAME.ivfpq-partial/`, beside the index
`NAME` (ours: it is named after the index and holds nothing else):
  plan.json              what is being built (rows, fingerprint, template, embedder, shard
                         size); a build with another plan discards the directory
  trained.index          the IVF-PQ quantizers, trained once, on evenly spaced rows, by
                         whichever worker comes first (under a lock; the others wait and
                         read it); sample.npy holds the sample's embeddings when the
                         sample is every row (small data: the shards reuse them)
  embeddings-NNNNN.npy   a shard's fp16 embeddings, piece-NNNNN.index the trained index
                         with the shard's rows added, piece-NNNNN.json its sidecar
                         (written last: sizes and sha256 of both, the trained index's)
The commit checks every sidecar, merges the pieces' inverted lists into the index's
`lists.ivfdata` (FAISS's merge_ondisk), links the embeddings in and renames the finished
index into place; only then is the build directory removed, so a commit that fails (a
full disk during the merge) loses nothing. Shards are fixed row ranges embedded in fixed
batches, so the index is the same whichever worker wrote which shard, and an interrupted
build resumes.

Workers hold `.NAME.ivfpq-partial.lock` shared for as long as they run; discarding a build
of other options and committing need it exclusive, and are refused in one line while
workers are running (never waited for, never forced).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

from datablame.data.rows import Rows
from datablame.data.template import PromptTemplate
from datablame.errors import UserError
from datablame.store.atomic import (
    atomic_dir,
    write_bytes_atomic,
    write_file_atomic,
    write_json_atomic,
)
from datablame.store.content_digest import sha256_file

TRAINED, SAMPLE = "trained.index", "sample.npy"
BUILD_FORMAT = "datablame.ivfpq-build"


class IvfpqBuild:
    def __init__(self, out: Path, rows: Rows, template: PromptTemplate, embed: Callable,
                 embedder_name: str, shard_rows: int, *, existing_only: bool = False):
        """`embed(texts)` returns normalised float32 vectors. `existing_only` (a commit):
        use the build of this plan as it is, never start or discard one."""
        import fcntl

        from datablame.store.retrieval_index import IVFPQ_TRAIN_ROWS, check_ivfpq_rows

        check_ivfpq_rows(rows)
        if shard_rows < 1:
            raise UserError("rows per shard must be at least 1")
        self.out, self.rows, self.template, self.embed = Path(out), rows, template, embed
        self.n, self.shard_rows = len(rows), shard_rows
        self.partial = self.out.parent / f".{self.out.name}.ivfpq-partial"
        self._lock = self.out.parent / f".{self.out.name}.ivfpq-partial.lock"
        # 39 rows per list: FAISS's floor for training 4 sqrt(n) coarse centroids
        train_rows = min(self.n, max(IVFPQ_TRAIN_ROWS, 39 * int(4 * math.sqrt(self.n))))
        self.sample_ids = np.unique(np.linspace(0, self.n - 1, train_rows).astype(np.int64))
        self.plan = {"format": BUILD_FORMAT, "rows": self.n, "fingerprint": rows.fingerprint(),
                     "template": template.to_json(), "embedder": embedder_name,
                     "shard_rows": shard_rows, "sample_rows": len(self.sample_ids)}
        self.digest = hashlib.sha256(json.dumps(self.plan, sort_keys=True).encode()
                                     ).hexdigest()
        self._texts = None
        self._trained_sha: str | None = None
        self.out.parent.mkdir(parents=True, exist_ok=True)
        # held shared while this build writes pieces (released by `close`)
        self._guard = open(self._lock, "a")  # noqa: SIM115
        fcntl.flock(self._guard, fcntl.LOCK_SH)
        if existing_only:
            if not self._same_plan():
                self.close()
                raise UserError(f"no ivfpq pieces of these rows and options in "
                                f"{self.partial} to commit: run the --shard-of workers "
                                "with the same options first")
            return
        if self._same_plan():
            return
        # a new build, or one of other options to discard: only while no worker runs
        fcntl.flock(self._guard, fcntl.LOCK_UN)
        try:
            fcntl.flock(self._guard, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # a worker is running: perhaps one of this very plan
            fcntl.flock(self._guard, fcntl.LOCK_SH)
            if self._same_plan():
                return
            self.close()
            raise UserError(f"{self.partial} holds an ivfpq build of other rows or options "
                            "that workers are still writing: let them finish (and commit) "
                            "or stop them, then rerun") from None
        if not self._same_plan():  # checked again, alone
            if self.partial.exists():
                self._check_ours()
                done = len(list(self.partial.glob("piece-*.json")))
                shutil.rmtree(self.partial)  # ours, of other options: start over
                if done:
                    from datablame import progress

                    progress.note(f"discarded {done} finished piece(s) of an ivfpq build "
                                  f"of other rows or options in {self.partial}")
            self.partial.mkdir(parents=True)
            write_json_atomic(self.partial / "plan.json", self.plan)
        fcntl.flock(self._guard, fcntl.LOCK_SH)  # back to sharing with other workers

    def _check_ours(self) -> None:
        """The build directory is named after the index; refuse to touch one that a
        datablame ivfpq build did not make (someone's folder of that name)."""
        try:
            plan = json.loads((self.partial / "plan.json").read_text())
        except (OSError, ValueError):
            plan = None
        empty = not any(self.partial.iterdir())  # a build stopped before its plan
        if not empty and (not isinstance(plan, dict) or plan.get("format") != BUILD_FORMAT):
            self.close()
            raise UserError(f"{self.partial} exists and is not a datablame ivfpq build "
                            "directory: move it away (the build keeps its pieces there)")

    def _same_plan(self) -> bool:
        try:
            return json.loads((self.partial / "plan.json").read_text()) == self.plan
        except (OSError, ValueError):
            return False

    def close(self) -> None:
        """Stop holding the build (a worker that is done)."""
        if not self._guard.closed:
            self._guard.close()

    @property
    def texts(self):
        if self._texts is None:
            self._texts = self.rows.texts(self.template)  # formatted a batch at a time
        return self._texts

    @property
    def n_shards(self) -> int:
        return -(-self.n // self.shard_rows)

    def row_range(self, shard: int) -> tuple[int, int]:
        return shard * self.shard_rows, min(self.n, (shard + 1) * self.shard_rows)

    def _paths(self, shard: int) -> tuple[Path, Path, Path]:
        return (self.partial / f"embeddings-{shard:05d}.npy",
                self.partial / f"piece-{shard:05d}.index",
                self.partial / f"piece-{shard:05d}.json")

    def trained(self):
        """The trained, empty IVF-PQ index: fitted by the first worker, read by the rest."""
        import fcntl

        import faiss

        from datablame.store.retrieval_index import _faiss_stdout_quiet, train_ivfpq

        path = self.partial / TRAINED
        with open(self.partial / ".train.lock", "a") as guard:  # one trains, others wait
            fcntl.flock(guard, fcntl.LOCK_EX)
            if not path.exists():
                sample = self.embed([self.texts[int(i)] for i in self.sample_ids])
                if len(self.sample_ids) == self.n:  # every row: the shards reuse it
                    write_bytes_atomic(self.partial / SAMPLE, _npy_bytes(sample))
                with _faiss_stdout_quiet():
                    index = train_ivfpq(sample, self.n)
                write_file_atomic(path, lambda f: faiss.write_index(index, str(f)))
            self._trained_sha = sha256_file(path)
        with _faiss_stdout_quiet():
            return faiss.read_index(str(path))

    def _side(self, shard: int) -> dict | None:
        try:
            return json.loads(self._paths(shard)[2].read_text())
        except (OSError, ValueError):
            return None

    def has(self, shard: int) -> bool:
        """Complete: its sidecar (written last) is this plan's and this training's, and
        both files have the sizes it records."""
        emb, piece, _ = self._paths(shard)
        side = self._side(shard)
        return (side is not None and side.get("plan") == self.digest and
                side.get("trained") == self._trained_sha and
                side.get("rows") == list(self.row_range(shard)) and
                emb.is_file() and emb.stat().st_size == side["embeddings"]["bytes"] and
                piece.is_file() and piece.stat().st_size == side["piece"]["bytes"])

    def missing(self) -> list[int]:
        if self._trained_sha is None and (self.partial / TRAINED).exists():
            self._trained_sha = sha256_file(self.partial / TRAINED)
        return [s for s in range(self.n_shards) if not self.has(s)]

    def write(self, shard: int, trained) -> None:
        import faiss

        from datablame.store.retrieval_index import _faiss_stdout_quiet

        lo, hi = self.row_range(shard)
        if len(self.sample_ids) == self.n:  # a sample of every row is every shard already
            vectors = np.load(self.partial / SAMPLE, mmap_mode="r")[lo:hi]
        else:
            vectors = self.embed(self.texts[lo:hi])
        emb, piece_path, side = self._paths(shard)
        write_bytes_atomic(emb, _npy_bytes(np.asarray(vectors).astype(np.float16)))
        piece = faiss.clone_index(trained)
        with _faiss_stdout_quiet():
            piece.add_with_ids(np.ascontiguousarray(vectors, np.float32),
                               np.arange(lo, hi, dtype=np.int64))
        write_file_atomic(piece_path, lambda f: faiss.write_index(piece, str(f)))
        write_json_atomic(side, {"plan": self.digest, "trained": self._trained_sha,
                                 "rows": [lo, hi], "embeddings": _entry(emb),
                                 "piece": _entry(piece_path)})

    def build(self, shards: list[int], progress=None) -> int:
        """Write these shards unless done; returns how many were written."""
        trained = self.trained()
        written = 0
        for s in shards:
            if not self.has(s):
                self.write(s, trained)
                written += 1
            if progress is not None:
                progress(self.row_range(s)[1] - self.row_range(s)[0])
        return written

    def commit(self, manifest: dict, before_swap: Callable[[Path], None] | None = None
               ) -> dict:
        """Check every piece, merge them into the index at `out` (renamed into place) and
        remove the build directory; `manifest`: the index manifest so far."""
        import fcntl

        import faiss
        from faiss.contrib.ondisk import merge_ondisk

        from datablame.store.retrieval_index import (
            IVFPQ_RERANK,
            OWN_FILES,
            _faiss_stdout_quiet,
            _file_entry,
        )

        try:  # alone: no worker may be writing pieces while they are merged
            fcntl.flock(self._guard, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"workers are still writing ivfpq pieces into {self.partial}: "
                            "commit when they are done") from None
        missing = self.missing()
        if missing:
            shown = ", ".join(map(str, missing[:8])) + (" ..." if len(missing) > 8 else "")
            raise UserError(f"{len(missing)} of {self.n_shards} ivfpq shards are not written "
                            f"yet (shard {shown}): rerun their --shard-of workers")
        with _faiss_stdout_quiet():
            trained = faiss.read_index(str(self.partial / TRAINED))
        manifest = {**manifest, "dim": int(trained.d), "ivfpq": {
            "nlist": int(trained.nlist), "code_bytes": int(trained.code_size),
            "nprobe": int(trained.nprobe), "trained_on_rows": len(self.sample_ids),
            "rerank": IVFPQ_RERANK}}
        with atomic_dir(self.out, before_swap) as tmp:
            shards = []
            for s in range(self.n_shards):
                emb = self._paths(s)[0]
                _link_or_copy(emb, tmp / emb.name)  # the build keeps its own until the swap
                shards.append({**self._side(s)["embeddings"], "file": emb.name,
                               "rows": list(self.row_range(s))})
            merged = faiss.clone_index(trained)
            with _faiss_stdout_quiet():
                # the pieces stay mapped until the process ends (FAISS does not own them
                # after the merge): their space on disk is freed then
                merge_ondisk(merged, [str(self._paths(s)[1]) for s in range(self.n_shards)],
                             str(tmp / OWN_FILES["ivfdata"]))
            # the lists' file name as the index loads it (IO_FLAG_ONDISK_SAME_DIR: beside
            # the index), not this temporary directory's: the same bytes from any build
            faiss.downcast_InvertedLists(faiss.extract_index_ivf(merged).invlists
                                         ).filename = OWN_FILES["ivfdata"]
            faiss.write_index(merged, str(tmp / OWN_FILES["faiss"]))
            del merged
            manifest["files"] = {key: _file_entry(tmp / OWN_FILES[key])
                                 for key in ("faiss", "ivfdata")}
            manifest["shards"] = shards
            write_json_atomic(tmp / "manifest.json", manifest)  # written last
        shutil.rmtree(self.partial, ignore_errors=True)  # ours, merged and swapped in
        self.close()
        return manifest



def build_status(out: Path) -> dict | None:
    """Where an ivfpq build of the index `out` stands, from its files alone (no model, no
    lock; safe while workers write): None without a build directory, else shards done /
    missing / damaged (a piece whose sidecar is not this plan's and training's, or whose
    files have other sizes), rows, and the rate from the sidecars' times."""
    out = Path(out)
    partial = out.parent / f".{out.name}.ivfpq-partial"
    try:
        plan = json.loads((partial / "plan.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(plan, dict) or plan.get("format") != BUILD_FORMAT:
        return None
    digest = hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()
    trained = partial / TRAINED
    trained_sha = sha256_file(trained) if trained.exists() else None
    rows, size = int(plan["rows"]), int(plan["shard_rows"])
    done, missing, damaged, times = [], [], [], []
    for shard in range(-(-rows // size)):
        side_path = partial / f"piece-{shard:05d}.json"
        try:
            side = json.loads(side_path.read_text())
        except (OSError, ValueError):
            side = None
        files = [(partial / f"embeddings-{shard:05d}.npy", "embeddings"),
                 (partial / f"piece-{shard:05d}.index", "piece")]
        if side is None:
            (damaged if any(f.exists() for f, _ in files) else missing).append(shard)
        elif side.get("plan") == digest and side.get("trained") == trained_sha and all(
                f.is_file() and f.stat().st_size == side[key]["bytes"] for f, key in files):
            done.append(shard)
            times.append(side_path.stat().st_mtime)
        else:
            damaged.append(shard)
    return {"partial": str(partial), "trained": trained_sha is not None,
            **progress_of(done, times, rows, lambda s: min(rows, (s + 1) * size) - s * size,
                          -(-rows // size)),
            "missing": missing, "damaged": damaged}


def progress_of(done: list[int], times: list[float], rows: int,
                rows_of: Callable[[int], int], shards: int) -> dict:
    """Shards and rows done, rows/s over the finished shards' sidecar times, and an ETA:
    what `datablame status` prints for a gradient store build and an ivfpq build alike."""
    rows_done = sum(rows_of(s) for s in done)
    ordered = sorted(zip(times, done, strict=True))
    rate = None
    if len(ordered) >= 2 and ordered[-1][0] > ordered[0][0]:
        rate = (rows_done - rows_of(ordered[0][1])) / (ordered[-1][0] - ordered[0][0])
    return {"shards": shards, "done": len(done), "rows": rows, "rows_done": rows_done,
            "rows_per_s": rate, "eta_s": (rows - rows_done) / rate if rate else None}


def discard_build(out: Path) -> None:
    """Remove `out`'s ivfpq build directory (the index is current already), unless a
    worker is writing into it."""
    import fcntl

    out = Path(out)
    partial = out.parent / f".{out.name}.ivfpq-partial"
    if not partial.exists():
        return
    with open(out.parent / f".{out.name}.ivfpq-partial.lock", "a") as guard:
        try:
            fcntl.flock(guard, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return  # a worker still runs: it finds the index current and stops
        try:
            ours = json.loads((partial / "plan.json").read_text()).get("format") == \
                BUILD_FORMAT
        except (OSError, ValueError, AttributeError):
            ours = False
        if ours:  # never someone's folder that happens to have the name
            shutil.rmtree(partial, ignore_errors=True)


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # a file system without hard links
        shutil.copyfile(source, target)


def _entry(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
