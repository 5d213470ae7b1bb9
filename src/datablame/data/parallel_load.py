"""The passes a first load makes over every row, split over processes.

A first load of a large file checks every JSONL line and hashes every row (the content
fingerprint every artifact records). Both are Python work, one core's worth each, so on a
many-core node they run in worker processes over fixed pieces: byte ranges cut at line
ends for the check, row blocks for the fingerprint. The results are the serial ones: the
check names the same first bad line, and the fingerprint is the same single sha256 over
the same bytes (the workers serialize rows, the parent hashes their bytes in order), so
stores and indexes built before stay valid.

`DATABLAME_LOAD_WORKERS` sets the number of processes (1: none); by default the CPUs this
process may use, up to 16, once the work is large enough to pay for starting them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from datablame.errors import UserError

MAX_WORKERS = 16
FINGERPRINT_BLOCK = 65_536  # rows a worker serializes at a time (~10 MB of JSON)
PARALLEL_FROM_BYTES = 256 << 20  # below this a JSONL is checked in this process
PARALLEL_FROM_ROWS = 1_000_000  # below this the rows are hashed in this process


def load_workers(work: int, parallel_from: int) -> int:
    """How many processes a pass over `work` (bytes or rows) uses."""
    env = os.environ.get("DATABLAME_LOAD_WORKERS", "").strip()
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            raise UserError(f"DATABLAME_LOAD_WORKERS must be a whole number (got {env!r})"
                            ) from None
    if work < parallel_from:
        return 1
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
        (os.cpu_count() or 1)
    return max(1, min(MAX_WORKERS, cpus))


def _pool(workers: int, initializer: Callable | None = None, initargs: tuple = ()):
    """Worker processes started fresh ("spawn"): forking a process that holds torch or
    datasets threads can deadlock."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=initializer, initargs=initargs)


# -- the row fingerprint ----------------------------------------------------------------

def row_bytes(rec: dict) -> bytes:
    """One row as the fingerprint hashes it (followed by a newline)."""
    return json.dumps(rec, sort_keys=True, default=str, ensure_ascii=False).encode() + b"\n"


_ROWS: Sequence[dict] | None = None


def _hold_rows(records: Sequence[dict]) -> None:
    global _ROWS
    _ROWS = records


def _block_bytes(span: tuple[int, int]) -> bytes:
    assert _ROWS is not None
    return b"".join(row_bytes(rec) for rec in _ROWS[span[0]:span[1]])


def hashed_row_bytes(records: Sequence[dict], workers: int) -> Iterator[bytes]:
    """Every row's `row_bytes`, in row order, a block at a time: serialized by `workers`
    processes (each given the rows once; `ArrowRecords` travel as their memory-mapped
    files' paths, not their data), or here."""
    n = len(records)
    spans = [(lo, min(n, lo + FINGERPRINT_BLOCK)) for lo in range(0, n, FINGERPRINT_BLOCK)]
    if workers <= 1 or len(spans) <= 1:
        for lo, hi in spans:
            yield b"".join(row_bytes(rec) for rec in records[lo:hi])
        return
    with _pool(min(workers, len(spans)), _hold_rows, (records,)) as pool:
        yield from pool.map(_block_bytes, spans)


# -- the JSONL check ----------------------------------------------------------------------

@dataclass(frozen=True)
class LineNumbers(Sequence):
    """The 1-based line of each row of a JSONL file, kept as the lines that are blank
    (rows are the other lines, in order): a few bytes for a file without blank lines,
    not 8 bytes a row."""

    rows: int
    blank: np.ndarray  # sorted 1-based numbers of the blank lines

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, row):
        if isinstance(row, slice):
            return [self[i] for i in range(*row.indices(self.rows))]
        if row < 0:
            row += self.rows
        if not 0 <= row < self.rows:
            raise IndexError(row)
        # blank line i has (blank[i] - 1 - i) rows before it: it comes before row `row`
        # when that count is at most `row`
        before = np.searchsorted(self.blank - 1 - np.arange(len(self.blank)), row,
                                 side="right")
        return int(row + 1 + before)

    def to_array(self) -> np.ndarray:
        return np.concatenate([[self.rows], self.blank]).astype(np.int64)

    @classmethod
    def from_array(cls, saved: np.ndarray) -> LineNumbers:
        return cls(int(saved[0]), np.asarray(saved[1:], dtype=np.int64))


@dataclass(frozen=True)
class _Piece:
    lines: int  # lines in the piece (the last may lack its newline)
    blank: list[int]  # 0-based line indexes within the piece
    error: tuple[int, str] | None  # (0-based line index, message): the first bad line


def _check_piece(job: tuple[str, int, int]) -> _Piece:
    path, start, end = job
    blank: list[int] = []
    lines = 0
    with open(path, "rb") as fh:
        fh.seek(start)
        while fh.tell() < end:
            raw = fh.readline()
            if not raw:
                break
            index, lines = lines, lines + 1
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                return _Piece(lines, blank, (index, f"not UTF-8 text ({exc.reason})"))
            if not line.strip():
                blank.append(index)
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                return _Piece(lines, blank, (index, f"is not valid JSON ({exc.msg})"))
            if not isinstance(obj, dict):
                return _Piece(lines, blank, (index, "is not a JSON object"))
    return _Piece(lines, blank, None)


def _pieces(path: Path, count: int) -> list[tuple[str, int, int]]:
    """`count` byte ranges of the file, each starting at a line's start."""
    size = path.stat().st_size
    cuts = [0]
    with path.open("rb") as fh:
        for i in range(1, count):
            at = max(cuts[-1], size * i // count)
            fh.seek(at)
            if at > 0:
                fh.readline()  # to the start of the next line
            cuts.append(min(size, max(cuts[-1], fh.tell())))
    cuts.append(size)
    return [(str(path), a, b) for a, b in zip(cuts, cuts[1:], strict=False) if b > a]


def check_jsonl(path: Path, workers: int | None = None) -> LineNumbers:
    """Every line of a JSONL file is a JSON object or blank; a bad one is named by its
    line (datasets' own error does not). Pieces of a large file are checked in worker
    processes; the first bad line is the one a single pass would name."""
    return check_jsonl_files([Path(path)], workers)[0]


def check_jsonl_files(paths: list[Path], workers: int | None = None) -> list[LineNumbers]:
    """`check_jsonl` for the files of a folder, in one pool: a file a piece where there
    are enough files, large files cut into pieces where there are not; the first bad line
    of the first file that has one is named."""
    sizes = [Path(p).stat().st_size for p in paths]
    workers = workers or load_workers(sum(sizes), PARALLEL_FROM_BYTES)
    cuts = -(-workers // len(paths)) if workers > 1 else 1
    jobs = [(i, job) for i, p in enumerate(paths) for job in
            (_pieces(Path(p), cuts) if cuts > 1 else [(str(p), 0, sizes[i])])]
    results: Iterable[_Piece]
    if workers > 1 and len(jobs) > 1:
        with _pool(min(workers, len(jobs))) as pool:
            results = list(pool.map(_check_piece, [job for _, job in jobs]))
    else:
        results = [_check_piece(job) for _, job in jobs]
    out = []
    for i, path in enumerate(paths):
        blank: list[np.ndarray] = []
        before = 0  # lines in the pieces before this one
        for (owner, _), piece in zip(jobs, results, strict=True):
            if owner != i:
                continue
            if piece.error is not None:
                index, message = piece.error
                if message.startswith("not UTF-8"):
                    raise UserError(f"{path}: {message}")
                raise UserError(f"{path}: line {before + index + 1} {message}")
            blank.append(np.asarray(piece.blank, dtype=np.int64) + before + 1)
            before += piece.lines
        blanks = np.concatenate(blank) if blank else np.zeros(0, dtype=np.int64)
        out.append(LineNumbers(before - len(blanks), blanks))
    return out
