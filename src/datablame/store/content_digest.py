"""Content digests of model directories (and data files): a store is tied to the weights,
not to a path.

A path says nothing about content: an adapter retrained in place keeps its path, a
byte-identical copy of a base model elsewhere does not. So a store records the sha256 of
every file that shapes a gradient (weights, configs, tokenizer files), combined per
directory.

Hashing 14 GB of a 7B model on every trace would cost tens of seconds, so each file's
digest is cached in DATABLAME_CACHE_DIR (default ~/.cache/datablame/digests.json), keyed
by its real path and trusted while (size, mtime_ns, ctime_ns, inode) are unchanged. The
ctime cannot be set back by `touch` or a copy tool, so a file rewritten in place is
hashed again; a new copy is hashed once. The trade-off: the first use of a model in a
new place reads all of it once (see README for the measured speed); sampling parts of a
file instead would be fast every time but could miss a retrain that changes few bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from datablame import progress

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
CONFIG_SUFFIXES = (".json", ".model", ".tiktoken")  # configs and tokenizer files
CONFIG_NAMES = ("merges.txt", "vocab.txt")
MAX_CACHE_ENTRIES = 65536  # a dataset of thousands of shard files, and the models
MAX_HASH_THREADS = 8  # files hashed at once (storage, not cores, is the limit beyond)


def cache_path(name: str = "digests.json") -> Path:
    base = os.environ.get("DATABLAME_CACHE_DIR") or \
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "datablame"
    return Path(base) / name


def hashed_files(directory: Path) -> list[Path]:
    """The files of `directory` that shape a gradient (not READMEs, logs, dot files)."""
    return sorted(p for p in Path(directory).iterdir()
                  if p.is_file() and not p.name.startswith(".") and
                  (p.name.endswith(WEIGHT_SUFFIXES + CONFIG_SUFFIXES) or
                   p.name in CONFIG_NAMES))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def stat_key(st: os.stat_result) -> dict:
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns,
            "ino": st.st_ino}


def load_cache(path: Path) -> dict:
    try:
        cache = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return cache if isinstance(cache, dict) else {}


def save_cache(path: Path, cache: dict) -> bool:
    """Best effort: an unwritable cache only means hashing again next time (False)."""
    from datablame.store.atomic import write_json_atomic

    live = {k: v for k, v in cache.items() if os.path.exists(k)}
    keep = dict(list(live.items())[-MAX_CACHE_ENTRIES:])
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, keep)
    except OSError:
        return False
    return True


def file_digests(files: list[Path], what: str, bar_from: int = 0) -> list[str]:
    """sha256 of each file, read only where the cache's (size, mtime, ctime, inode) no
    longer match (`what` names them on the progress bar, drawn when at least `bar_from`
    bytes are to be read)."""
    cpath = cache_path()
    cache = load_cache(cpath)
    stats = {f: Path(f).stat() for f in files}
    todo = [f for f in files
            if (cache.get(os.path.realpath(f)) or {}).get("key") != stat_key(stats[f])]
    if todo:
        from concurrent.futures import ThreadPoolExecutor

        total = sum(stats[f].st_size for f in todo)
        # threads: hashlib lets go of the GIL while it hashes, so the files of a sharded
        # dataset (or a model's weight shards) are read and hashed side by side
        threads = min(len(todo), MAX_HASH_THREADS, os.cpu_count() or 1)
        with progress.task(f"hashing {what}", total if total >= bar_from else 0) as advance, \
                ThreadPoolExecutor(threads) as pool:
            for f, digest in zip(todo, pool.map(lambda f: sha256_file(Path(f)), todo),
                                 strict=True):
                cache.pop(os.path.realpath(f), None)  # re-inserted last: most recent
                cache[os.path.realpath(f)] = {"key": stat_key(stats[f]), "sha256": digest}
                advance(stats[f].st_size)
        save_cache(cpath, cache)
    return [cache[os.path.realpath(f)]["sha256"] for f in files]


def dir_digest(directory: str | os.PathLike) -> str:
    """sha256 over (name, size, sha256) of every hashed file, in name order."""
    files = hashed_files(Path(directory))
    h = hashlib.sha256()
    for f, digest in zip(files, file_digests(files, str(directory)), strict=True):
        h.update(f"{f.name}\t{f.stat().st_size}\t{digest}\n".encode())
    return h.hexdigest()


def names_digest(names: list[str]) -> str:
    """sha256 of the sorted parameter names: what a spec like 'auto' resolved to."""
    return hashlib.sha256("\n".join(sorted(names)).encode()).hexdigest()
