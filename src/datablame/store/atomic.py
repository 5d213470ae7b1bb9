"""Atomic writes: a reader sees the old artifact or the complete new one, never half.

`tempfile` creates its directories 0700 and files 0600 whatever the umask; what we write
is chmod-ed to what a plain `mkdir` / `open` would have made, so an index is as readable
by the user's group as any other file they create.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def umask() -> int:
    """The process umask (read by setting it, so set it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_dir(target: Path, before_swap: Callable[[Path], None] | None = None
               ) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `target` by rename.

    `before_swap(tmp)` runs once the content is complete, just before the rename (the
    index lock uses it to lock the replacement's lock file).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    os.chmod(tmp, 0o777 & ~umask())
    try:
        yield tmp
        if before_swap is not None:
            before_swap(tmp)
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json_atomic(path: Path, data: object) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def write_jsonl_atomic(path: Path, items: list) -> None:
    write_text_atomic(path, "".join(json.dumps(item, ensure_ascii=False) + "\n"
                                    for item in items))


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: Path, data: bytes) -> None:
    write_file_atomic(path, lambda tmp: tmp.write_bytes(data))


def write_file_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` fills a temporary file beside `path` (by name: FAISS writes to a path),
    which is then given the umask's mode, fsynced and renamed into place; each writer has
    a name of its own, so two writers of one file leave one whole file, and a failure
    leaves no temporary file behind."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~umask())
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
