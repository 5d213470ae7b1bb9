"""The index directory we write into: whose it is, and who is writing it.

`check_out_dir` refuses an `--out` that holds anything but a datablame index (or nothing),
so a build never deletes what the user did not hand us as ours. `IndexLock` is an
exclusive `flock` on INDEX_DIR/.lock: two builds into one directory would otherwise
delete each other's partial work or certify a store mixing their shards. The kernel drops
the lock when its process dies, so a crashed build never blocks the next one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
from datetime import datetime, timezone
from pathlib import Path

from datablame.errors import UserError

LOCK_NAME = ".lock"
RETRIEVAL_FORMAT = "datablame.retrieval-index"


def _is_index(path: Path) -> bool:
    try:
        manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == RETRIEVAL_FORMAT


def check_out_dir(out: Path, inputs: dict[str, Path]) -> None:
    """Refuse an output path that is, contains or would replace something not ours.

    `inputs` names the files we read ("training file": path): an index replaced in place
    is renamed away whole, so it must not hold them either. An empty directory, or one
    holding only a crashed build's lock file, may be used.
    """
    out = Path(out)
    real = Path(os.path.realpath(out))
    for label, path in inputs.items():
        src = Path(os.path.realpath(path))
        if real == src:
            raise UserError(f"--out {out} is the {label}; choose a new directory for the "
                            "index")
        if real in src.parents and real.is_dir():
            raise UserError(f"--out {out} contains the {label} {path}; choose a directory "
                            "that does not hold the training data")
    for above in [real, *real.parents]:
        if above.exists() and not above.is_dir():
            what = "is a file" if above.is_file() else "is not a directory"
            where = f"--out {out} {what}" if above == real else \
                f"cannot create --out {out}: {above} {what}"
            raise UserError(f"{where}; choose a new or empty directory for the index")
        if above.exists():
            break
    if not real.is_dir() or _is_index(real):
        return
    entries = [p for p in real.iterdir() if p.name != LOCK_NAME]
    if entries:
        n = len(entries)
        raise UserError(f"--out {out} is a directory with {n} entr{'y' if n == 1 else 'ies'} "
                        "that is not a datablame index; refusing to replace it (choose a new "
                        "or empty directory)")


class IndexLock:
    """Exclusive, non-blocking lock on OUT/.lock, held until `release` (or process exit).

    An index replaced by rename moves its lock file away with it, so `adopt(new_dir)`
    locks the replacement's lock file too before the swap: whoever opens OUT/.lock after
    the swap finds it held.
    """

    def __init__(self, out: str | os.PathLike, shared: bool = False):
        """`shared`: a lock many gradient-shard workers hold at once (`index --shard-of`),
        which still keeps out a whole build and is kept out by one."""
        self.out = Path(out)
        self.shared = shared
        self._fds: list[int] = []
        self.created_dir = False

    def __enter__(self) -> IndexLock:
        self.acquire()
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self.release(failed=exc_type is not None)

    def acquire(self) -> None:
        if not self.out.exists():
            self.out.mkdir(parents=True)
            self.created_dir = True
        path = self.out / LOCK_NAME
        for _ in range(5):  # the file may be replaced between open and flock: retry
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX)
                            | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise UserError(f"another datablame build is writing {self.out} ({holder}); "
                                "wait for it to finish or use another --out") from None
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                if not self.shared:
                    _write_holder(fd)
                self._fds.append(fd)
                return
            os.close(fd)
        raise UserError(f"could not lock {path}: it keeps being replaced")

    def adopt(self, new_dir: Path) -> None:
        """Lock `new_dir`/.lock too (it is about to become OUT by rename)."""
        fd = os.open(Path(new_dir) / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        _write_holder(fd)
        self._fds.append(fd)

    def release(self, failed: bool = False) -> None:
        """Unlock; after a failed build in a directory we created, remove it if it holds
        nothing but our lock file (it was ours, and is empty)."""
        if failed and self.created_dir:
            with contextlib.suppress(OSError):
                if [p.name for p in self.out.iterdir()] == [LOCK_NAME]:
                    (self.out / LOCK_NAME).unlink()
                    self.out.rmdir()
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()


def _write_holder(fd: int) -> None:
    info = {"pid": os.getpid(), "host": socket.gethostname(),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"pid {info['pid']} on {info['host']}, started {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "its pid is not recorded yet"
