"""Output paths are checked before any work: a typo in --out must not cost the run.

Every file datablame writes is either new or one of its own (recognised by content), so a
user's file is never overwritten; a directory where a file is meant is refused.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from datablame.errors import UserError


def check_output_file(path: str | os.PathLike, option: str, *, suffix: str | None = None,
                      ours: Callable[[Path], bool] | None = None, what: str = "") -> Path:
    """Refuse, before anything is computed, an output path that cannot be written."""
    path = Path(path)
    if suffix is not None and path.suffix.lower() != suffix:
        raise UserError(f"{option} must end in {suffix}{what}, got {path}")
    if path.is_dir():
        raise UserError(f"{option}: {path} is a directory; give a file name")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise UserError(f"{option}: {path}: directory does not exist ({parent})")
    if not os.access(parent, os.W_OK):
        raise UserError(f"{option}: {path}: directory {parent} is not writable")
    if path.exists() and ours is not None and not ours(path):
        raise UserError(f"{option}: refusing to overwrite {path}: it is not a file datablame "
                        "wrote")
    return path


def check_output_dir(path: str | os.PathLike, option: str) -> Path:
    """A directory to write into (created now, so a bad path fails before the work)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{option}: {path} is a file, not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{option}: cannot create {path} ({exc.strerror})") from None
    if not os.access(path, os.W_OK):
        raise UserError(f"{option}: {path} is not writable")
    return path


def is_npy(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(6) == b"\x93NUMPY"


def is_json_with(*keys: str) -> Callable[[Path], bool]:
    """A JSON object holding `keys`: how a results file of ours is recognised."""
    def check(path: Path) -> bool:
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, OSError):
            return False
        return isinstance(obj, dict) and all(k in obj for k in keys)
    return check


def is_jsonl_with(*keys: str) -> Callable[[Path], bool]:
    """JSON lines whose first holds `keys` (how a batch results file of ours is known)."""
    def check(path: Path) -> bool:
        try:
            with path.open(encoding="utf-8") as fh:
                first = fh.readline()
            obj = json.loads(first) if first.strip() else None
        except (UnicodeDecodeError, json.JSONDecodeError, OSError):
            return False
        return isinstance(obj, dict) and all(k in obj for k in keys)
    return check


def save_npy(path: Path, array) -> None:
    """Exactly `path` (np.save would append .npy to other names), written atomically."""
    import numpy as np

    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, np.asarray(array))
    os.replace(tmp, path)


def write_training_rows(train_file: str | os.PathLike, path: str | os.PathLike,
                        rows, table=None) -> None:
    """The training rows `rows` (ids, in order) written to `path` atomically in the
    training file's own format: a table (.csv / .parquet / .pq) through pandas (`table`:
    it already loaded), a JSON list or JSON Lines copied as written, not re-serialised."""
    train_file, path = Path(train_file), Path(path)
    suffix = train_file.suffix.lower()
    rows = [int(r) for r in rows]
    tmp = path.with_name(f".{path.name}.partial")
    if suffix in (".csv", ".parquet", ".pq"):
        if table is None:
            from datablame.data.rows import load_table

            table, _ = load_table(train_file)
        part = table.iloc[rows]
        part.to_csv(tmp, index=False) if suffix == ".csv" else part.to_parquet(tmp)
    elif suffix in (".jsonl", ".json"):
        text = train_file.read_text(encoding="utf-8")
        try:
            document = json.loads(text) if suffix == ".json" else None
        except json.JSONDecodeError:  # a .json file of JSON lines
            document = None
        if isinstance(document, list):
            tmp.write_text(json.dumps([document[i] for i in rows], ensure_ascii=False),
                           encoding="utf-8")
        else:
            lines = [ln for ln in text.splitlines() if ln.strip()]
            tmp.write_text("".join(lines[i] + "\n" for i in rows), encoding="utf-8")
    else:
        raise UserError(f"rows are written in a .jsonl, .json, .csv or .parquet training "
                        f"file's format, not {train_file.name}'s")
    tmp.replace(path)
