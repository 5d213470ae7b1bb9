"""The passes a first load makes over every row, split over processes.

A first load of a large file checks every JSONL line and hashes every row (the content
fingerprint every artifact records). Both are Python work, one core's worth each, so on a
many-core node they run in worker processes over fixed pieces: byte ranges cut at line
ends for the check, row blocks for the fingerprint. The results are the serial ones: the
check names the same first bad line, and the fingerprint is the same single sha256 over
the same bytes (the workers serialize rows, the parent hashes their bytes in order), so
stores and indexes built before stay valid.

`DATABLAME_LOAD_WORKERS` sets the number of processes (1: none). By default the `datablame`
command uses the CPUs it may use (affinity and cgroup quota), up to 16, once the work is
large enough to pay for starting them; the Python API stays in one process unless asked
(starting a process re-imports the caller's script, which may lack a main guard). Workers
that cannot start or die are replaced by this process, with a warning; so is a pool the
calling script would run again (no `if __name__ == "__main__":` guard).
"""

from __future__ import annotations

import ast
import json
import os
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from datablame.errors import UserError

MAX_WORKERS = 16
BLOCK_BYTES = 16 << 20  # Arrow bytes of rows a worker serializes at a time
BATCH_ROWS = 1024  # rows turned into dicts at once (what the one-process pass holds)
PARALLEL_FROM_BYTES = 256 << 20  # below this a JSONL is checked in this process
PARALLEL_FROM_ROWS = 1_000_000  # below this the rows are hashed in this process
_by_default = False  # the CLI's own processes split large passes without being asked


def split_by_default(on: bool = True) -> None:
    global _by_default
    _by_default = on


def usable_cpus() -> int:
    """The CPUs this process may use: its affinity, within a cgroup v2 CPU quota (a
    container's or a SLURM job's share of a larger host)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
        (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


def load_workers(work: int, parallel_from: int) -> int:
    """How many processes a pass over `work` (bytes or rows) uses."""
    env = os.environ.get("DATABLAME_LOAD_WORKERS", "").strip()
    if env:
        try:
            workers = max(1, int(env))
        except ValueError:
            raise UserError(f"DATABLAME_LOAD_WORKERS must be a whole number (got {env!r})"
                            ) from None
    elif not _by_default or work < parallel_from:
        return 1
    else:
        workers = min(MAX_WORKERS, usable_cpus())
    if workers > 1 and not _main_is_guarded():
        _warn("the calling script runs this outside an `if __name__ == \"__main__\":` block, "
              "which every worker process would run again: loading in this process")
        return 1
    return workers


def _main_is_guarded() -> bool:
    """Whether a spawned worker can import this process's main module without running the
    caller's work again, as spawn's own rules go: no script (python -c, a REPL, a
    notebook, `python -m pkg` of a package's __main__), or a script (or `-m` module)
    whose code now running is inside a top-level `if __name__ == "__main__":` block."""
    import multiprocessing
    import sys

    if multiprocessing.parent_process() is not None:
        return False  # a worker itself: no pools inside pools
    main = sys.modules.get("__main__")
    name = getattr(getattr(main, "__spec__", None), "name", None)
    if name == "__main__" or (name or "").endswith(".__main__"):
        return True  # multiprocessing does not import a package's __main__ again
    path = getattr(main, "__file__", None)
    if path is None:
        return True
    frame = sys._getframe()
    while frame is not None and frame.f_globals is not vars(main):
        frame = frame.f_back
    if frame is None:  # called from code not in the script (a callback, a thread)
        return True
    while frame.f_back is not None and frame.f_back.f_globals is vars(main):
        frame = frame.f_back  # the script's own module-level frame
    try:
        tree = ast.parse(Path(path).read_text(encoding="utf-8"))
    except (OSError, SyntaxError, ValueError):
        return False  # cannot see the script: one process
    line = frame.f_lineno
    return any(isinstance(node, ast.If) and _is_main_test(node.test) and
               node.lineno <= line <= (node.end_lineno or node.lineno) for node in tree.body)


def _is_main_test(test: ast.expr) -> bool:
    """`__name__ == "__main__"`, either way round."""
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1 and
            isinstance(test.ops[0], ast.Eq)):
        return False
    sides = [test.left, *test.comparators]
    return any(isinstance(x, ast.Name) and x.id == "__name__" for x in sides) and \
        any(isinstance(x, ast.Constant) and x.value == "__main__" for x in sides)


def _warn(message: str) -> None:
    """A warning that points at the caller's line, not at datablame's."""
    import sys

    level, frame = 2, sys._getframe(1)  # 2: the caller of _warn
    package = str(Path(__file__).resolve().parent.parent)
    while frame is not None and str(Path(frame.f_code.co_filename).resolve()
                                    ).startswith(package):
        level, frame = level + 1, frame.f_back
    warnings.warn(message, UserWarning, stacklevel=level)


def _fell_back(what: str, exc: BaseException) -> None:
    _warn(f"{what} in worker processes failed ({type(exc).__name__}); done in this process "
          "instead (set DATABLAME_LOAD_WORKERS=1 to skip the workers)")


def _pool(workers: int, initializer: Callable | None = None, initargs: tuple = ()):
    """Worker processes started fresh ("spawn"): forking a process that holds torch or
    datasets threads can deadlock."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=initializer, initargs=initargs)


# a pool that could not start its workers (a script without a main guard re-run by
# "spawn"), or whose worker died (killed for memory)
_WORKERS_FAILED = (BrokenProcessPool, RuntimeError, OSError, EOFError)


# -- the row fingerprint ----------------------------------------------------------------

def row_bytes(rec: dict) -> bytes:
    """One row as the fingerprint hashes it (followed by a newline)."""
    return json.dumps(rec, sort_keys=True, default=str, ensure_ascii=False).encode() + b"\n"


_ROWS: Sequence[dict] | None = None


def _hold_rows(records: Sequence[dict]) -> None:
    global _ROWS
    _ROWS = records


def _span_bytes(records: Sequence[dict], lo: int, hi: int) -> bytes:
    """Rows lo..hi as the fingerprint hashes them, a batch of dicts at a time."""
    out = bytearray()
    for at in range(lo, hi, BATCH_ROWS):
        for rec in records[at:min(hi, at + BATCH_ROWS)]:
            out += row_bytes(rec)
    return bytes(out)


def _block_bytes(span: tuple[int, int]) -> bytes:
    assert _ROWS is not None
    return _span_bytes(_ROWS, *span)


def _block_rows(records: Sequence[dict]) -> int:
    """Rows a block holds: about BLOCK_BYTES of the rows' Arrow data (long documents make
    short blocks), at least one batch."""
    dataset = getattr(records, "dataset", None)
    size = getattr(getattr(dataset, "data", None), "nbytes", 0) if dataset is not None else 0
    per_row = max(1, size // max(1, len(records)))
    return max(BATCH_ROWS, BLOCK_BYTES // per_row)


def hashed_row_bytes(records: Sequence[dict], workers: int) -> Iterator[bytes]:
    """Every row's `row_bytes`, in row order: a batch at a time here, or a block at a time
    from `workers` processes (each given the rows once; `ArrowRecords` travel as their
    memory-mapped files' paths, not their data), at most two blocks per worker ahead of
    the hash."""
    n = len(records)
    if workers > 1:
        block = _block_rows(records)
        spans = [(lo, min(n, lo + block)) for lo in range(0, n, block)]
        if len(spans) > 1:
            done = 0
            try:
                with _pool(min(workers, len(spans)), _hold_rows, (records,)) as pool:
                    ahead = 2 * workers
                    pending = [pool.submit(_block_bytes, span) for span in spans[:ahead]]
                    for i in range(len(spans)):
                        data = pending[i].result()
                        if i + ahead < len(spans):
                            pending.append(pool.submit(_block_bytes, spans[i + ahead]))
                        pending[i] = None  # the hash has it: let it go
                        yield data
                        done = spans[i][1]
                return
            except _WORKERS_FAILED as exc:
                _fell_back("hashing the rows", exc)
                yield from _serial_bytes(records, done, n)
                return
    yield from _serial_bytes(records, 0, n)


def _serial_bytes(records: Sequence[dict], lo: int, n: int) -> Iterator[bytes]:
    for at in range(lo, n, BATCH_ROWS):
        yield _span_bytes(records, at, min(n, at + BATCH_ROWS))


# -- the JSONL check ----------------------------------------------------------------------

@dataclass(eq=False)
class LineNumbers(Sequence):
    """The 1-based line of each row of a JSONL file, kept as the lines that are blank
    (rows are the other lines, in order): a few bytes for a file without blank lines,
    not 8 bytes a row."""

    rows: int
    blank: np.ndarray  # sorted 1-based numbers of the blank lines
    # blank line i has (blank[i] - 1 - i) rows before it
    _rows_before: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.blank = np.asarray(self.blank, dtype=np.int64)
        self._rows_before = self.blank - 1 - np.arange(len(self.blank))

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, row):
        if isinstance(row, slice):
            return [self[i] for i in range(*row.indices(self.rows))]
        if row < 0:
            row += self.rows
        if not 0 <= row < self.rows:
            raise IndexError(row)
        # the blank lines before row `row`: those with at most `row` rows before them
        return int(row + 1 + np.searchsorted(self._rows_before, row, side="right"))

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


LONE_CR = re.compile(r"\r(?!\n)")


def _check_piece(job: tuple[str, int, int]) -> _Piece:
    """A piece's lines as text mode reads them (a line ends at LF, CR LF or a lone CR,
    as the check before pieces did and `datasets` does); pieces are cut at LFs."""
    path, start, end = job
    blank: list[int] = []
    lines = 0
    with open(path, "rb") as fh:
        fh.seek(start)
        while fh.tell() < end:
            at_start = fh.tell() == 0
            raw = fh.readline()
            if not raw:
                break
            if at_start:  # a byte-order mark opening the file is not part of a row
                raw = raw.removeprefix(b"\xef\xbb\xbf")
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                return _Piece(lines + 1, blank, (lines, f"is not UTF-8 text ({exc.reason})"))
            parts = LONE_CR.split(text)
            if len(parts) > 1 and parts[-1] == "":
                parts.pop()  # the text ended at a lone CR: no line after it
            for line in parts:
                index, lines = lines, lines + 1
                if not line.strip():
                    blank.append(index)
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    return _Piece(lines, blank, (index, f"is not valid JSON ({exc.msg} "
                                                        f"column {exc.colno})"))
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
    results: Iterable[_Piece] | None = None
    if workers > 1 and len(jobs) > 1:
        try:
            with _pool(min(workers, len(jobs))) as pool:
                results = list(pool.map(_check_piece, [job for _, job in jobs]))
        except _WORKERS_FAILED as exc:
            _fell_back("checking the JSON lines", exc)
    if results is None:
        results = [_check_piece(job) for _, job in jobs]
    pieces: list[list[_Piece]] = [[] for _ in paths]  # jobs run in file order
    for (owner, _), piece in zip(jobs, results, strict=True):
        pieces[owner].append(piece)
    out = []
    for path, own in zip(paths, pieces, strict=True):
        blank: list[np.ndarray] = []
        before = 0  # lines in the pieces before this one
        for piece in own:
            if piece.error is not None:
                index, message = piece.error
                raise UserError(f"{path}: line {before + index + 1} {message}")
            blank.append(np.asarray(piece.blank, dtype=np.int64) + before + 1)
            before += piece.lines
        blanks = np.concatenate(blank) if blank else np.zeros(0, dtype=np.int64)
        out.append(LineNumbers(before - len(blanks), blanks))
    return out
