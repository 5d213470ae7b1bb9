"""Training rows: loaded once through Hugging Face `datasets`, with stable 0-based ids.

Row id = position in the file (blank JSONL lines are skipped and do not get an id).
Every artifact records the rows' content fingerprint so it can refuse stale data.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from datablame.errors import UserError

FORMATS = {
    ".jsonl": "json",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
}


@dataclass
class Rows:
    """Training rows as a list of dicts plus where they came from."""

    path: Path
    records: list[dict]
    line_numbers: list[int] | None = None  # JSONL: 1-based line of each row id

    def __len__(self) -> int:
        return len(self.records)

    @property
    def columns(self) -> list[str]:
        return list(self.records[0].keys()) if self.records else []

    def where(self, row_id: int) -> str:
        """Human-readable location of a row, for error messages."""
        if self.line_numbers is not None:
            return f"row {row_id} (line {self.line_numbers[row_id]})"
        return f"row {row_id}"

    def fingerprint(self) -> str:
        """Content hash of every row, independent of the file's format or mtime."""
        h = hashlib.sha256()
        for rec in self.records:
            h.update(json.dumps(rec, sort_keys=True, default=str, ensure_ascii=False).encode())
            h.update(b"\n")
        return "sha256:" + h.hexdigest()

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


def _check_jsonl(path: Path) -> list[int]:
    """Validate JSONL line by line so a bad line is named (datasets' error does not)."""
    lines: list[int] = []
    with path.open("r", encoding="utf-8", errors="strict") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}: line {lineno} is not valid JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise UserError(f"{path}: line {lineno} is not a JSON object")
            lines.append(lineno)
    return lines


def load_rows(path: str | os.PathLike) -> Rows:
    """Load JSONL / JSON / CSV / Parquet rows with `datasets`, in file order."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"training file not found: {path}")
    if path.is_dir():
        raise UserError(f"training file is a directory: {path}")
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise UserError(
            f"{path}: unsupported file type '{suffix}' (use .jsonl, .json, .csv or .parquet)"
        )
    if path.stat().st_size == 0:
        raise UserError(f"{path}: the file is empty")
    line_numbers = None
    try:
        if suffix == ".jsonl" or (suffix == ".json" and not _is_json_document(path)):
            line_numbers = _check_jsonl(path)
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text ({exc.reason})") from None
    if line_numbers is not None and not line_numbers:
        raise UserError(f"{path}: the file has no rows")

    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    try:
        ds = datasets.load_dataset(
            FORMATS[suffix], data_files=str(path), split="train", keep_in_memory=True
        )
    except Exception as exc:  # datasets wraps parser errors in many types
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path}: could not be read as {FORMATS[suffix]} ({reason})") from None
    records = ds.to_list()
    if not records:
        raise UserError(f"{path}: the file has no rows")
    if line_numbers is not None and len(line_numbers) != len(records):
        line_numbers = None  # datasets disagreed on row count; fall back to row ids only
    return Rows(path=path, records=records, line_numbers=line_numbers)


def _is_json_document(path: Path) -> bool:
    """A .json file is either one JSON list of objects or JSON Lines; tell which."""
    with path.open("rb") as fh:
        head = fh.read(4096).lstrip()
    if not head.startswith(b"["):
        return False
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
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
