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
from datablame.ray_cluster import connect


def _scan_group(path: str, manifest: dict, q: np.ndarray, shard_ids: list[int], k: int,
                kind: str, absolute: bool) -> list[list[tuple[float, int, float]]]:
    from datablame.store.gradient_store import GradientStore

    store = GradientStore(Path(path), manifest)
    return store._scan(q, [manifest["shards"][i] for i in shard_ids], k, kind, absolute)


def scan_groups_on_ray(store, q: np.ndarray, groups: list[list[int]], k: int, kind: str,
                       absolute: bool, address: str) -> list:
    """Each group's heaps (one per query), scanned by one Ray task per group."""
    connect(address)
    import ray

    task = ray.remote(num_cpus=1)(_scan_group)
    path = os.path.abspath(store.path)
    q_ref, manifest_ref = ray.put(q), ray.put(store.manifest)
    try:
        return ray.get([task.remote(path, manifest_ref, q_ref, g, k, kind, absolute)
                        for g in groups])
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, UserError):
            raise UserError(str(cause)) from None
        raise
