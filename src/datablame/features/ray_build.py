"""A gradient store built by Ray Core actors: each loads the model once and takes the next
missing shard when it finishes one; Ray restarts an actor that dies and retries its shard;
one actor commits at the end. Optional: `pip install 'datablame[ray]'`.

Why actors pulling shard ids rather than a fixed split: on a cluster, workers differ in
speed and some die; the shards are the same fixed row ranges `--shard-of` writes, so the
store is byte-identical to one process's whoever writes which shard. Ray Core rather than
Ray Data: Ray Data writes unordered, randomly named files, and its actor pool was seen to
hang when actors held every CPU slot.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from datablame import progress
from datablame.errors import UserError
from datablame.ray_cluster import connect, user_errors


class ShardActor:
    """Holds the rows, the index's template and the model; writes shards on request."""

    def __init__(self, out: str, train_file: str, split: str | None, options, threads: int):
        import torch

        from datablame.data.rows import load_rows
        from datablame.store.retrieval_index import load_index

        # Ray gives each actor one thread; the parent's count keeps the matrix products'
        # summation order, hence the bytes, of a one-process build
        torch.set_num_threads(threads)
        self.out = Path(out)
        index = load_index(self.out)
        self.rows = load_rows(train_file, split=split)
        index.check_rows(self.rows)
        self.template = index.template
        self.model = options.load()
        self.options = options.store_options()

    def _build(self, **kw) -> dict:
        from datablame.features.gradients import build_gradient_store

        return build_gradient_store(self.out, self.rows, self.template, self.model,
                                    **self.options, **kw)

    def missing(self) -> list[int]:
        return self._build(shards=[])["missing"]

    def build(self, shard: int) -> int:
        die = os.environ.get("DATABLAME_TEST_RAY_DIE")  # test hook: "SHARD:MARKER_FILE"
        if die and die.split(":", 1)[0] == str(shard) and \
                not Path(die.split(":", 1)[1]).exists():
            Path(die.split(":", 1)[1]).touch()
            self._build(shards=[])  # load everything, then die mid-shard
            os._exit(1)
        self._build(shards=[shard])
        return shard

    def commit(self) -> dict:
        return self._build(commit_only=True)


def build_on_ray(out: Path, train_file, split: str | None, options, actors: int,
                 address: str) -> dict:
    """Write every missing shard with `actors` Ray actors (one GPU each when the cluster
    has that many), then commit. `address`: "local" starts a Ray instance on this machine,
    "auto" or HOST:PORT joins a running cluster (an already initialised Ray is used)."""
    connect(address, max(actors, os.cpu_count() or 1))
    import ray
    import torch

    gpus = ray.cluster_resources().get("GPU", 0) >= actors
    remote = ray.remote(num_cpus=1, num_gpus=1 if gpus else 0, max_restarts=3,
                        max_task_retries=3)(ShardActor)
    # absolute paths: a cluster's workers do not start in this directory
    options = replace(options, model=os.path.abspath(options.model),
                      adapter=None if options.adapter is None else
                      os.path.abspath(options.adapter))
    pool = [remote.remote(os.path.abspath(out), os.path.abspath(train_file), split, options,
                          torch.get_num_threads())
            for _ in range(actors)]
    try:
        with user_errors(died="a Ray actor building the gradient store died ({}); its "
                              "finished shards are kept: rerun to resume"):
            todo = ray.get(pool[0].missing.remote())
            with progress.task(f"gradient shards on {actors} Ray actors", len(todo)
                               ) as advance:
                pending = {}
                for actor in pool:
                    if todo:
                        pending[actor.build.remote(todo.pop(0))] = actor
                while pending:
                    (ready,), _ = ray.wait(list(pending), num_returns=1)
                    actor = pending.pop(ready)
                    ray.get(ready)
                    advance(1)
                    if todo:
                        pending[actor.build.remote(todo.pop(0))] = actor
            return ray.get(pool[0].commit.remote())
    finally:
        for actor in pool:
            ray.kill(actor)


def _ivfpq_task(train_file: str, out: str, shard_of: tuple[int, int], options: dict,
                threads: int) -> dict:
    """One `--shard-of I/N` worker of an ivfpq index, as a Ray task."""
    import torch

    from datablame.text import _ivfpq_worker

    if os.environ.get("DATABLAME_TEST_RAY_TASK_DIE") == str(shard_of[0]):  # test hook
        os._exit(1)
    torch.set_num_threads(threads)  # the parent's: the same embeddings, the same bytes
    return _ivfpq_worker(train_file, Path(out), shard_of, **options)


def build_ivfpq_on_ray(train_file, out: Path, tasks: int, address: str, options: dict
                       ) -> None:
    """Write every piece of an ivfpq index with `tasks` Ray tasks, each the `--shard-of
    I/N` worker I (one GPU each when the cluster has that many); a task that dies is
    retried and resumes its finished pieces. The caller commits."""
    connect(address, max(tasks, os.cpu_count() or 1))
    import ray
    import torch

    gpus = ray.cluster_resources().get("GPU", 0) >= tasks
    # the test hooks (DATABLAME_TEST_*) reach the workers as they reach --workers' processes
    env = {k: v for k, v in os.environ.items() if k.startswith("DATABLAME_TEST_")}
    remote = ray.remote(num_cpus=1, num_gpus=1 if gpus else 0, max_retries=3)(_ivfpq_task)
    if env:
        remote = remote.options(runtime_env={"env_vars": env})
    refs = [remote.remote(os.path.abspath(train_file), os.path.abspath(out), (i, tasks),
                          options, torch.get_num_threads()) for i in range(tasks)]
    died = ("a Ray task building the ivfpq index died more often than Ray retries it ({}); "
            "the pieces the tasks finished are kept: rerun to resume")
    failed: UserError | None = None
    with progress.task(f"ivfpq index pieces on {tasks} Ray tasks", tasks) as advance:
        pending = list(refs)
        while pending:
            (ready,), pending = ray.wait(pending, num_returns=1)
            try:
                with user_errors(died):
                    ray.get(ready)
            except UserError as exc:  # the other tasks go on: their pieces serve the rerun
                failed = failed or exc
                continue
            advance(1)
        if failed is not None:  # inside the task: no progress line before the error
            raise failed
