"""`datablame status IDX`: how far a gradient store build is, for a long or sharded one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from datablame.cli.console import fail, wide_console


def status(index_dir: Annotated[Path, typer.Argument(help="The index directory.")],
           as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False
           ) -> None:
    """Show a gradient store build's shards, or an ivfpq index build's: done, missing,
    damaged, rate and ETA (files only: safe to run while workers write)."""
    from datablame.store.gradient_store import build_status

    sibling = index_dir.parent / f".{index_dir.name}.ivfpq-partial"
    if index_dir.is_file():
        fail(f"{index_dir} is a file, not an index directory")
    if not index_dir.is_dir() and not sibling.is_dir():  # a first ivfpq build has no index
        fail(f"index directory not found: {index_dir}")
    from datablame.store.index_dir import LOCK_NAME

    ours = ("manifest.json", "gradients", "gradients.partial", LOCK_NAME)
    if not sibling.is_dir() and not any((index_dir / name).exists() for name in ours):
        fail(f"{index_dir} is not a datablame index (no manifest.json, gradient store or "
             "build in it)")
    info = build_status(index_dir)
    if _locked(index_dir / LOCK_NAME):
        info["locked"] = True  # a build is at work: loading, embedding or writing
    console = wide_console()  # the answer goes to stdout; refusals to stderr
    if as_json:
        print(json.dumps(info, indent=2))
        return
    if info.get("locked"):
        console.print(f"{index_dir}: a build holds this index (loading rows, embedding or "
                      "writing)", highlight=False, soft_wrap=True)
    if "note" in info:
        console.print(info["note"], highlight=False, soft_wrap=True)
        return
    if not {"store", "build", "ivfpq_build", "locked"} & set(info):
        console.print(f"{index_dir}: no gradient store and no build in progress",
                      highlight=False, soft_wrap=True)
    if "store" in info:
        s = info["store"]
        console.print(f"gradient store: {s['rows']} rows in {s['shards']} shards, K = "
                      f"{s['proj_dim']} {s['store_dtype']}, {s['vectors']} vectors, "
                      f"{s['bytes'] / 1e6:.1f} MB",
                      highlight=False, soft_wrap=True)
        if s.get("stale"):
            console.print(f"  stale: {s['stale']}; trace refuses it until it is rebuilt "
                          "(`index ... --gradients`)", highlight=False, soft_wrap=True)
    for key, what, commit in (("build", "build", "--gradients --commit"),
                              ("ivfpq_build", "ivfpq index build", "--index-type ivfpq "
                                                                   "--commit")):
        if key not in info:
            continue
        b = info[key]
        rate = f"{b['rows_per_s']:.0f} rows/s" if b["rows_per_s"] else "rate unknown yet"
        eta = "" if not b["eta_s"] else (f", about {b['eta_s']:.0f} s left" if b["eta_s"] < 120
                                         else f", about {b['eta_s'] / 60:.0f} min left")
        console.print(f"{what} in progress: {b['done']}/{b['shards']} shards "
                      f"({b['rows_done']}/{b['rows']} rows), {rate}{eta}", highlight=False,
                      soft_wrap=True)
        for name in ("missing", "damaged"):
            if b[name]:
                shown = ", ".join(map(str, b[name][:12])) + (" ..." if len(b[name]) > 12
                                                             else "")
                console.print(f"  {name}: {len(b[name])} shard(s): {shown}", highlight=False,
                              soft_wrap=True)
        if not b["missing"] and not b["damaged"]:
            console.print(f"  every shard is done: a --workers or --ray build commits "
                          f"itself; after --shard-of workers, commit with `index ... "
                          f"{commit}`", highlight=False, soft_wrap=True)


def _locked(lock: Path) -> bool:
    """Whether a build holds the index's lock (its exclusive flock); reading only."""
    import fcntl

    try:
        with open(lock) as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                return True
            fcntl.flock(fh, fcntl.LOCK_UN)
    except OSError:
        return False
    return False
