"""A gradient-store scan split over Ray tasks: each task scans one contiguous group of
shards and returns its exact top-k heaps, merged by `GradientStore.top_k_many` exactly as
its threads' are, so the result is the single scan's. Every node must see the store at
the same path (a shared file system); only the queries and k-sized lists travel.
Optional: `pip install 'datablame[ray]'`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from datablame.errors import UserError
from datablame.ray_cluster import connect, user_errors


def _scan_group(path: str, manifest: dict, q: np.ndarray, shard_ids: list[int], k: int,
                kind: str, absolute: bool) -> list[list[tuple[float, int, float]]]:
    import socket

    from datablame.store.gradient_store import NORMS_NAME, GradientStore

    store = GradientStore(Path(path), manifest)
    shards = [manifest["shards"][i] for i in shard_ids]
    # this node's copy must be the store the query was made for: present, same sizes
    for name, want in [(sh["file"], sh.get("bytes")) for sh in shards] + \
            [(NORMS_NAME, (manifest.get("norms") or {}).get("bytes"))]:
        f = Path(path) / name
        try:
            size = f.stat().st_size
        except OSError:
            size = None
        if size is None or (want is not None and size != want):
            raise UserError(f"Ray node {socket.gethostname()}: {f} is "
                            f"{'missing' if size is None else 'another size'} there; every "
                            "node must see the gradient store at the same path")
    return store._scan(q, shards, k, kind, absolute)


def scan_groups_on_ray(store, q: np.ndarray, groups: list[list[int]], k: int, kind: str,
                       absolute: bool, address: str) -> list:
    """Each group's heaps (one per query), scanned by one Ray task per group."""
    connect(address)
    import ray

    task = ray.remote(num_cpus=1)(_scan_group)
    path = os.path.abspath(store.path)
    q_ref, manifest_ref = ray.put(q), ray.put(store.manifest)
    with user_errors(died="a Ray task scanning the gradient store died ({}); rerun the trace"):
        return ray.get([task.remote(path, manifest_ref, q_ref, g, k, kind, absolute)
                        for g in groups])
