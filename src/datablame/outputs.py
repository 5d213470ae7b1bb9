"""Output paths are checked before any work: a typo in --out must not cost the run.

Every file datablame writes is either new or one of its own, so a user's file is never
overwritten; a directory where a file is meant is refused. "One of its own" takes two
things: the content looks like the output it would write (a .npy array, a JSON object
with the result's keys, a page with datablame's generator tag), and datablame recorded
writing this very file (its path, size, mtime, ctime and inode, kept in
DATABLAME_CACHE_DIR/outputs.json). Content alone was a guess: any .npy array, or any JSON
with a "query" and a "results" key, passed for ours. A file of ours that was changed or
replaced since, or written on another machine, is refused too: remove it or pick
another name.
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
    if path.exists() and ours is not None and not (ours(path) and wrote(path)):
        raise UserError(f"{option}: refusing to overwrite {path}: it is not a file datablame "
                        "wrote (none recorded as written here, unchanged since); remove it or "
                        "choose another name")
    return path


OUTPUTS_FILE = "outputs.json"


def remember_written(path: str | os.PathLike) -> None:
    """Record that datablame wrote `path`, as it is now (call right after the write)."""
    from datablame.store.content_digest import cache_path, load_cache, save_cache, stat_key

    registry = cache_path(OUTPUTS_FILE)
    written = load_cache(registry)
    real = os.path.realpath(path)
    written.pop(real, None)  # re-inserted last: the most recent is kept longest
    written[real] = {"key": stat_key(Path(path).stat())}
    if not save_cache(registry, written):
        from datablame import progress

        progress.note(f"could not record writing {path} in {registry}: a rerun will refuse "
                      "to overwrite it (set DATABLAME_CACHE_DIR to a writable directory)")


def wrote(path: str | os.PathLike) -> bool:
    """datablame wrote `path` and nobody changed or replaced it since."""
    from datablame.store.content_digest import cache_path, load_cache, stat_key

    entry = load_cache(cache_path(OUTPUTS_FILE)).get(os.path.realpath(path)) or {}
    try:
        return entry.get("key") == stat_key(Path(path).stat())
    except OSError:
        return False


def write_json_output(path: str | os.PathLike, data: object) -> None:
    from datablame.store.atomic import write_json_atomic

    write_json_atomic(Path(path), data)
    remember_written(path)


def write_jsonl_output(path: str | os.PathLike, items: list) -> None:
    from datablame.store.atomic import write_jsonl_atomic

    write_jsonl_atomic(Path(path), items)
    remember_written(path)


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
    remember_written(path)


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
