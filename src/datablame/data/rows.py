"""Training rows: read through Hugging Face `datasets`, with stable 0-based ids.

Row id = position in the file (blank JSONL lines are skipped and do not get an id).
Every artifact records the rows' content fingerprint so it can refuse stale data.
Rows stay in `datasets`' memory-mapped Arrow files and are turned into dicts as they are
read, so memory does not grow with the number of rows.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path

import numpy as np

from datablame.errors import UserError

FORMATS = {
    ".jsonl": "json",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
}


class ArrowRecords(Sequence):
    """A `datasets.Dataset` read as a sequence of row dicts, a batch at a time: the rows
    stay in its memory-mapped Arrow files instead of a dict per row in memory
    (bench/rows_memory.py).

    Rows are read as raw Arrow values, as `Dataset.to_list()` reads them: a format the
    saved dataset carries (numpy, torch, a column subset) or decodable features (images,
    audio) would otherwise change what a row is, and with it the rows' fingerprint.
    """

    BATCH = 1024

    def __init__(self, dataset) -> None:
        self.dataset = dataset.with_format("arrow")
        from datasets.utils.json import get_json_field_paths_from_feature

        self._json_fields = list(get_json_field_paths_from_feature(dataset.features))

    def __len__(self) -> int:
        return self.dataset.num_rows

    def __getitem__(self, index):
        if isinstance(index, slice):
            span = range(len(self))[index]
            if span.step != 1:
                return [self[i] for i in span]
            return self._rows(self.dataset[span.start:span.stop])  # one columnar read
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self._rows(self.dataset[int(index):int(index) + 1])[0]

    def __iter__(self) -> Iterator[dict]:
        for batch in self.dataset.iter(batch_size=self.BATCH):
            yield from self._rows(batch)

    def _rows(self, table) -> list[dict]:
        rows = table.to_pylist()
        if self._json_fields:  # what `Dataset.to_list()` does for Json features
            from datasets.utils.json import json_decode_field

            for col, *sub in self._json_fields:
                for row in rows:
                    row[col] = json_decode_field(row[col], sub)
        return rows


@dataclass(eq=False)
class ShardLines:
    """Where each row of a folder of JSONL shards sits: its file and line (rows are
    numbered across the files in name order)."""

    names: list[str]
    lines: list  # per file: `parallel_load.LineNumbers`

    def __post_init__(self) -> None:
        self.starts = np.cumsum([0] + [len(n) for n in self.lines])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def where(self, row_id: int) -> str:
        i = int(np.searchsorted(self.starts, row_id, side="right")) - 1
        return f"{self.names[i]} line {self.lines[i][row_id - int(self.starts[i])]}"

    def to_bytes(self) -> bytes:
        """The files' line numbers (not their names: the same bytes may sit under other
        names next time), as one .npz."""
        buffer = io.BytesIO()
        np.savez(buffer, *[n.to_array() for n in self.lines])
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, names: list[str]) -> ShardLines | None:
        """The saved line numbers under today's names; None if they do not fit them."""
        from datablame.data.parallel_load import LineNumbers

        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as saved:
                arrays = [saved[f"arr_{i}"] for i in range(len(saved.files))]
            if len(arrays) != len(names) or any(a.ndim != 1 or len(a) < 1 for a in arrays):
                return None
            return cls(names, [LineNumbers.from_array(a) for a in arrays])
        except Exception:  # a damaged cache file of ours: the check runs again
            return None


@dataclass(eq=False)
class Rows:
    """Training rows (a sequence of dicts: a list, or `ArrowRecords` read lazily) plus
    where they came from."""

    path: Path
    records: Sequence[dict]
    line_numbers: Sequence[int] | None = None  # JSONL: 1-based line of each row id
    split: str | None = None  # the split of a dataset directory these rows are
    shard_lines: ShardLines | None = None  # a folder of JSONL shards: each row's file, line
    _fingerprint: str | None = dataclass_field(default=None, init=False, repr=False)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def columns(self) -> list[str]:
        return list(self.records[0].keys()) if self.records else []

    def where(self, row_id: int) -> str:
        """Human-readable location of a row, for error messages."""
        if self.line_numbers is not None:
            return f"row {row_id} (line {self.line_numbers[row_id]})"
        if self.shard_lines is not None:
            return f"row {row_id} ({self.shard_lines.where(row_id)})"
        return f"row {row_id}"

    def fingerprint(self) -> str:
        """Content hash of every row, independent of the file's format or mtime (one pass
        over the rows, kept: the rows of a `Rows` do not change). Rows read from files
        keep it beside their Arrow copy, which is named by the files' bytes: the next
        load of the same bytes reads it instead of hashing every row again."""
        if self._fingerprint is None:
            cache_dir = getattr(self.records, "cache_dir", None)
            saved = _read_cached(cache_dir, _fingerprint_file() if cache_dir else "")
            if saved is not None:
                self._fingerprint = saved.decode()
                return self._fingerprint
            from datablame.data.parallel_load import (
                PARALLEL_FROM_ROWS,
                hashed_row_bytes,
                load_workers,
            )

            # memory-mapped rows travel to worker processes as file paths; others stay
            workers = load_workers(len(self.records), PARALLEL_FROM_ROWS) \
                if isinstance(self.records, ArrowRecords) else 1
            h = hashlib.sha256()
            for block in hashed_row_bytes(self.records, workers):
                h.update(block)
            self._fingerprint = "sha256:" + h.hexdigest()
            if cache_dir is not None:
                _write_cached(cache_dir, _fingerprint_file(), self._fingerprint.encode())
        return self._fingerprint

    def check_with(self, template) -> None:
        """`template.check_rows(self)` once per row content, template and release: the
        verdict is kept beside the Arrow copy, so the workers of a sharded build and later
        builds over the same bytes do not read every row again to check it."""
        import transformers

        from datablame import __version__

        cache_dir = getattr(self.records, "cache_dir", None)
        if cache_dir is None:
            template.check_rows(self)
            return
        # the rows (their fingerprint is per `datasets` version), the template, and what
        # renders and checks it (a chat template renders through transformers' Jinja)
        key = hashlib.sha256(json.dumps([self.fingerprint(), template.to_json(), __version__,
                                         transformers.__version__], sort_keys=True).encode())
        name = f"checked-rows-{key.hexdigest()[:32]}"
        if _read_cached(cache_dir, name) is not None:
            return
        template.check_rows(self)
        _write_cached(cache_dir, name, b"")

    def texts(self, template) -> Sequence[str]:
        """Every row formatted by `template`, made as they are read (len and slices)."""
        return _FormattedRows(self.records, template)

    def require_fields(self, fields: list[str], response_field: str | None = None,
                       optional: frozenset[str] | set[str] = frozenset()) -> None:
        """Every field the template needs is a column of the data, unless the template marks
        it optional (`{input?}`). Empty and null values are empty text, except the response
        field: a row without an answer has nothing to trace."""
        for field in fields:
            if field not in self.columns and field not in optional:
                raise UserError(
                    f"{self.path}: field '{field}' is missing ({self.where(0)} has "
                    f"{', '.join(self.columns) or 'no fields'}); mark it optional in the "
                    f"template as {{{field}?}} if rows may lack it"
                )
        if response_field is None:
            return
        for i, rec in enumerate(self.records):
            value = rec.get(response_field)
            if value is None or (isinstance(value, float) and value != value):
                raise UserError(f"{self.path}: {self.where(i)} is missing field "
                                f"'{response_field}' (the answer the model was trained on)")


class _FormattedRows(Sequence):
    def __init__(self, records: Sequence[dict], template) -> None:
        self.records, self.template = records, template

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self.template.format(r).text for r in self.records[index]]
        return self.template.format(self.records[index]).text


def load_rows(path: str | os.PathLike, split: str | None = None) -> Rows:
    """Load rows with `datasets`, in order: a JSONL / JSON / CSV / Parquet file, a folder
    (or glob) of such shards (sorted by name; `split` keeps the shards named for it, as
    the Hub's `train-00000-of-00004.parquet` layout), or a directory written by
    `save_to_disk` (a `DatasetDict`'s `split`, "train" by default)."""
    text = str(path)
    if any(c in text for c in "*?[") and not Path(path).exists():
        files = sorted(Path(f) for f in glob.glob(text, recursive=True))
        root = Path(os.path.commonpath([str(f.parent) for f in files])) if files else Path(".")
        rows = _load_shards(root, files, split, where=f"pattern {text}")
        rows.path = Path(os.path.abspath(text))  # reloaded by the pattern, not the folder
        return rows
    path = Path(path)
    if not path.exists():
        raise UserError(f"training file not found: {path}")
    if path.is_dir():
        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            return _load_saved(path, split)
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in
                       FORMATS and not any(part.startswith(".") for part in
                                           p.relative_to(path).parts))
        return _load_shards(path, files, split, where=f"directory {path}")
    if split is not None:
        raise UserError(f"--split selects a split of a dataset directory; {path} is one file")
    return _load_file(path)


def _load_saved(path: Path, split: str | None) -> Rows:
    """A dataset `save_to_disk` wrote: one `Dataset`, or a `DatasetDict` of splits."""
    import datasets

    datasets.disable_progress_bars()
    try:
        ds = datasets.load_from_disk(str(path))  # memory-mapped, not copied
    except Exception as exc:
        raise UserError(f"{path}: could not be read as a saved dataset "
                        f"({_last_line(exc)})") from None
    if isinstance(ds, datasets.DatasetDict):
        want = split or "train"
        if want not in ds:
            raise UserError(f"{path}: no split '{want}' (splits: {', '.join(ds)}); pass "
                            "--split")
        ds, split = ds[want], want
    elif split is not None:
        raise UserError(f"{path} holds one dataset, not splits: drop --split {split}")
    if ds.num_rows == 0:
        raise UserError(f"{path}: the dataset has no rows")
    records = ArrowRecords(ds)
    files = [f["filename"] for f in ds.cache_files]
    if files and getattr(ds, "_indices", None) is None:
        # what a load learns, kept by the bytes of its Arrow files and their description
        meta = [str(Path(files[0]).parent / m) for m in ("state.json", "dataset_info.json")
                if (Path(files[0]).parent / m).is_file()]
        records.cache_dir = _arrow_cache(files + meta)
    return Rows(path=path, records=records, split=split)


def _load_shards(path: Path, files: list[Path], split: str | None, where: str) -> Rows:
    """Shards of one format, read as one dataset in name order."""
    files = [f for f in files if f.is_file() and f.suffix.lower() in FORMATS]
    found = {_split_of(f, path) for f in files} - {None}
    if split is None and len(found) > 1:  # train-* beside test-*: the training split
        if "train" not in found:
            raise UserError(f"{where}: shards of splits {', '.join(sorted(found))}; pass "
                            "--split")
        split = "train"
    if split is not None:
        files = [f for f in files if _split_of(f, path) == split]
    if not files:
        what = f" for split '{split}'" if split else ""
        raise UserError(f"{where}: no .jsonl, .json, .csv or .parquet files{what}")
    kinds = {FORMATS[f.suffix.lower()] for f in files}
    if len(kinds) > 1:
        raise UserError(f"{where}: shards of several formats ({', '.join(sorted(kinds))}); "
                        "keep one format per folder")
    if len(files) == 1:  # its line numbers name bad rows; reloaded by the folder + split
        rows = _load_file(files[0])
        rows.path, rows.split = path, split
        return rows
    cache = _arrow_cache([str(f) for f in files])
    names = [str(f.relative_to(path)) if f.is_relative_to(path) else f.name for f in files]
    shard_lines = None
    if all(f.suffix.lower() == ".jsonl" for f in files):
        saved = _read_cached(cache, SHARDS_FILE)
        shard_lines = ShardLines.from_bytes(saved, names) if saved is not None else None
    # this content was checked before (and, for JSON Lines, its lines kept)
    checked = _read_cached(cache, CHECKED_FILE) is not None and (
        shard_lines is not None or not all(f.suffix.lower() == ".jsonl" for f in files))
    lines, first_error = [], None
    for f in files:  # the first file with a problem is the one named, as file by file
        try:
            if f.stat().st_size == 0:
                raise UserError(f"{f}: the file is empty")
            if not checked and FORMATS[f.suffix.lower()] == "json" and \
                    (f.suffix.lower() == ".jsonl" or not _is_json_document(f)):
                lines.append(f)
        except UserError as exc:
            first_error = exc
            break
    fresh = None
    if lines:  # the JSON Lines files before it, checked in one pass (split over processes)
        from datablame.data.parallel_load import check_jsonl_files

        numbers = check_jsonl_files(lines)
        if first_error is None and len(lines) == len(files):
            shard_lines = fresh = ShardLines(names, numbers)
    if first_error is not None:
        raise first_error
    records = _read_with_datasets(kinds.pop(), [str(f) for f in files], where, cache)
    if fresh is not None:
        _write_cached(cache, SHARDS_FILE, fresh.to_bytes())
    _write_cached(cache, CHECKED_FILE, b"")
    if shard_lines is not None and len(shard_lines) != len(records):
        shard_lines = None  # datasets disagreed on the rows: row ids only
    return Rows(path=path, records=records, split=split, shard_lines=shard_lines)


SPLITS = ("train", "test", "validation", "valid", "eval", "dev")


def _split_of(file: Path, root: Path) -> str | None:
    """The split a shard is named for: a folder `train/` or a name `train-00000-of-...`."""
    parts = file.relative_to(root).parts if file.is_relative_to(root) else (file.name,)
    for part in (*parts[:-1], file.name):
        head = part.split("-", 1)[0].split(".", 1)[0].split("_", 1)[0].lower()
        if head in SPLITS or part.lower() in SPLITS:
            return head if head in SPLITS else part.lower()
    return None


def _last_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__


# what a load learnt, kept beside the Arrow copy; the version names the checks that made
# them, so a stricter check in a later release reads the rows again
LOADED_VERSION = 2  # 2: line numbers kept as the blank lines (`LineNumbers.to_array`)
LINES_FILE, CHECKED_FILE = f"line_numbers-v{LOADED_VERSION}.npy", f"checked-v{LOADED_VERSION}"
SHARDS_FILE = f"shard_lines-v{LOADED_VERSION}.npz"


FINGERPRINT_VERSION = 1  # what the fingerprint hashes; the other checks version apart


def _fingerprint_file() -> str:
    """Per `datasets` version: another version may parse the same bytes into other rows."""
    import datasets

    return f"fingerprint-v{FINGERPRINT_VERSION}-{datasets.__version__}.txt"


def _content_digest(files: list[str]) -> str:
    """sha256 over the files' sha256s, in order: each read once, then taken from the digest
    cache while its size, mtime, ctime and inode are unchanged (`store.content_digest`)."""
    from datablame.store.content_digest import file_digests

    h = hashlib.sha256()
    # a bar only where hashing takes a moment (the rows' own errors stay one line)
    for digest in file_digests([Path(f) for f in files], "training data", bar_from=1 << 28):
        h.update(digest.encode() + b"\0")
    return h.hexdigest()[:32]


def _arrow_cache(files: list[str]) -> Path:
    """Where `datasets` keeps the Arrow copy of these files' rows (and we keep what was
    learnt from them: their fingerprint, JSONL line numbers), named by the files' bytes:
    `datasets` keys local files by path and mtime and served the old rows of a file
    rewritten with the same size and mtime."""
    import datasets

    return Path(datasets.config.HF_DATASETS_CACHE) / "datablame" / _content_digest(files)


def _read_cached(cache_dir: Path | None, name: str) -> bytes | None:
    try:
        return (cache_dir / name).read_bytes() if cache_dir is not None else None
    except OSError:
        return None


def _write_cached(cache_dir: Path | None, name: str, data: bytes) -> None:
    """Best effort, atomic: a cache that cannot be written is computed again next time."""
    if cache_dir is None:
        return
    from datablame.store.atomic import write_bytes_atomic

    with contextlib.suppress(OSError):
        cache_dir.mkdir(parents=True, exist_ok=True)  # a saved dataset's is ours alone
        write_bytes_atomic(cache_dir / name, data)


def _read_with_datasets(kind: str, data_files, where: str, cache: Path) -> ArrowRecords:
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    # converted once into `datasets`' Arrow cache (`_arrow_cache`) and memory-mapped
    try:
        ds = datasets.load_dataset(kind, data_files=data_files, split="train",
                                   cache_dir=str(cache))
    except Exception as exc:  # datasets wraps parser errors in many types
        if "corresponds to no data" in str(exc):  # e.g. a CSV of its header alone
            raise UserError(f"{where}: the file has no rows") from None
        raise UserError(f"{where}: could not be read as {kind} ({_last_line(exc)})") from None
    if ds.num_rows == 0:
        raise UserError(f"{where}: the file has no rows")
    records = ArrowRecords(ds)
    records.cache_dir = cache
    return records


def _load_file(path: Path) -> Rows:
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise UserError(
            f"{path}: unsupported file type '{suffix}' (use .jsonl, .json, .csv or .parquet)"
        )
    if path.stat().st_size == 0:
        raise UserError(f"{path}: the file is empty")
    cache = _arrow_cache([str(path)])
    line_numbers = None
    saved = _read_cached(cache, LINES_FILE)  # this content was checked before
    if saved is not None:
        from datablame.data.parallel_load import LineNumbers

        line_numbers = LineNumbers.from_array(np.load(io.BytesIO(saved), allow_pickle=False))
    elif suffix == ".jsonl" or (suffix == ".json" and not _is_json_document(path)):
        from datablame.data.parallel_load import check_jsonl

        line_numbers = check_jsonl(path)  # a bad line named (datasets' error does not)
    if line_numbers is not None and len(line_numbers) == 0:
        raise UserError(f"{path}: the file has no rows")

    records = _read_with_datasets(FORMATS[suffix], str(path), str(path), cache)
    if line_numbers is not None and saved is None:
        buffer = io.BytesIO()
        np.save(buffer, line_numbers.to_array())
        _write_cached(cache, LINES_FILE, buffer.getvalue())
    if line_numbers is not None and len(line_numbers) != len(records):
        line_numbers = None  # datasets disagreed on row count; fall back to row ids only
    return Rows(path=path, records=records, line_numbers=line_numbers)


def _is_json_document(path: Path) -> bool:
    """A .json file is either one JSON list of objects or JSON Lines; tell which."""
    with path.open("rb") as fh:
        head = fh.read(4096).removeprefix(b"\xef\xbb\xbf").lstrip()  # a BOM, as datasets
    if not head.startswith(b"["):
        return False
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text ({exc.reason})") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
    if not data:
        raise UserError(f"{path}: the file has no rows")
    for i, rec in enumerate(data):
        if not isinstance(rec, dict):
            raise UserError(f"{path}: row {i} is not a JSON object")
    return True


def load_table(path: str | os.PathLike, target: str | None = None,
               feature_columns: list[str] | None = None):
    """A tabular file (CSV / Parquet) -> (features DataFrame, target Series or None)."""
    import pandas as pd

    path = Path(path)
    if not path.exists():
        raise UserError(f"file not found: {path}")
    suffix = path.suffix.lower()
    if path.stat().st_size == 0:
        raise UserError(f"{path}: the file is empty")
    try:
        if suffix == ".csv":
            df = pd.read_csv(path)
        elif suffix in (".parquet", ".pq"):
            df = pd.read_parquet(path)
        else:
            raise UserError(f"{path}: unsupported table type '{suffix}' (use .csv or .parquet)")
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"{path}: could not be read ({str(exc).splitlines()[0]})") from None
    if df.empty:
        raise UserError(f"{path}: the file has no rows")
    y = None
    if target is not None:
        if target not in df.columns:
            raise UserError(f"{path}: target column '{target}' is missing (columns: "
                            f"{', '.join(map(str, df.columns))})")
        y = df[target]
        df = df.drop(columns=[target])
    if feature_columns is not None:
        missing = [c for c in feature_columns if c not in df.columns]
        if missing:
            raise UserError(f"{path}: feature column(s) {', '.join(missing)} are missing")
        df = df[feature_columns]
    return df, y
