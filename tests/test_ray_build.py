"""`index --gradients --ray`: Ray Core actors write the gradient shards; the store equals one
process's, byte for byte, even when an actor dies mid-shard. A local Ray instance on this
machine only (loopback)."""

import os

import pytest

from .test_cli import _assert_one_line_error, run_cli
from .test_gradient_store import _files, one_process_store, tied_store

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    """A local Ray whose workers see a test hook: the actor that takes shard 2 first dies
    (os._exit) before writing it."""
    marker = tmp_path_factory.mktemp("ray") / "died"
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ["DATABLAME_TEST_RAY_DIE"] = f"2:{marker}"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield marker
    ray.shutdown()
    del os.environ["DATABLAME_TEST_RAY_DIE"]


def test_ray_actors_build_the_one_process_store(tmp_path, random_lora_model, local_ray,
                                                 monkeypatch, capsys):
    train, grad = one_process_store(tmp_path, random_lora_model, monkeypatch, capsys)
    code, out, err = run_cli(monkeypatch, capsys, "index", train, "--out", tmp_path / "ray",
                             *grad, "--ray", "local", "--workers", "2")
    assert code in (0, None), err
    assert "committed 4 gradient shards (13 rows, 2 Ray actor(s))" in out + err
    assert _files(tmp_path / "ray" / "gradients") == _files(tmp_path / "one" / "gradients")
    assert local_ray.exists()  # an actor died on shard 2: Ray restarted it and retried
    code, _, err = run_cli(monkeypatch, capsys, "index", train, "--out", tmp_path / "x",
                           "--ray", "local")
    _assert_one_line_error(code, err, "--ray builds a gradient store")


@pytest.mark.parametrize("absolute", [False, True])
def test_a_scan_split_over_ray_tasks_equals_one_scan(tmp_path, local_ray, absolute,
                                                     monkeypatch):
    """Shard groups scanned as Ray tasks and merged = one scan, ids and scores bit for bit,
    ties (identical rows in different groups) to the lower id."""
    import numpy as np

    from datablame.store import ray_scan

    tasks = []
    real = ray_scan._scan_group

    def counted(*args):  # runs in Ray's worker processes: report back through the result
        return [*real(*args), [(0.0, -os.getpid(), 0.0)]]

    monkeypatch.setattr(ray_scan, "_scan_group", counted)
    real_scan = ray_scan.scan_groups_on_ray

    def spy(*args):
        parts = real_scan(*args)
        tasks.extend(part.pop()[0][1] for part in parts)  # each task's process id
        return parts

    monkeypatch.setattr(ray_scan, "scan_groups_on_ray", spy)

    store, queries = tied_store(tmp_path, 5)  # exact ties across the first and last groups
    one = store.top_k_many(queries, 40, "cosine", absolute)
    for workers in (1, 2, 3, 8):
        split = store.top_k_many(queries, 40, "cosine", absolute, workers=workers,
                                 ray="local")
        for (ids, scores), (want_ids, want_scores) in zip(split, one, strict=True):
            assert list(ids) == list(want_ids)
            np.testing.assert_array_equal(scores, want_scores)
    ids, scores = store.top_k(queries[0], 40, "cosine", absolute, workers=2, ray="local")
    assert list(ids) == list(one[0][0])
    assert len(tasks) == 1 + 2 + 3 + 4 + 2  # one task per shard group, 8 workers -> 4
    assert all(-pid != os.getpid() for pid in tasks)  # scanned in Ray's workers


def test_trace_all_rows_on_ray_equals_the_local_scan(tmp_path, random_lora_model, local_ray,
                                                     monkeypatch, capsys):
    import json

    train, _ = one_process_store(tmp_path, random_lora_model, monkeypatch, capsys)
    base, adapter = random_lora_model
    args = ["trace", tmp_path / "one", "--model", base, "--adapter", adapter, "--all-rows",
            "--query", "hello there friend .", "--field", "instruction=say hello",
            "--top-k", "13", "--rerank", "0", "--json"]
    code, alone, err = run_cli(monkeypatch, capsys, *args)
    assert code in (0, None), err
    code, on_ray, err = run_cli(monkeypatch, capsys, *args, "--ray", "auto",
                                "--scan-workers", "3")
    assert code in (0, None), err
    rows = [[(r["row"], r["score"]) for r in json.loads(out)["results"]]
            for out in (alone, on_ray)]
    assert rows[0] == rows[1] and len(rows[0]) == 13
    code, _, err = run_cli(monkeypatch, capsys, "trace", tmp_path / "one", "--model", base,
                           "--adapter", adapter, "--query", "hi", "--ray", "auto")
    _assert_one_line_error(code, err, "--ray scans the gradient store: add --all-rows")


def test_ivfpq_pieces_on_ray_tasks_equal_one_process(tmp_path, local_ray, monkeypatch,
                                                     capsys):
    """`index --index-type ivfpq --ray local --workers 2`: two Ray tasks write the pieces
    (the `--shard-of` workers), the commit merges them: the one-process index, file for
    file."""
    from .test_ivfpq import _index_files, one_process_ivfpq

    data, pq = one_process_ivfpq(tmp_path, monkeypatch, capsys, seed=2)
    code, out, err = run_cli(monkeypatch, capsys, "index", data, "--out", tmp_path / "ray",
                             *pq, "--ray", "local", "--workers", "2")
    assert code in (0, None), err
    assert "committed 3 ivfpq index shards (1000 rows, 2 Ray task(s))" in out + err
    assert _index_files(tmp_path / "ray") == _index_files(tmp_path / "one")
    assert not (tmp_path / ".ray.ivfpq-partial").exists()


def test_ivfpq_task_that_keeps_dying_is_one_line_and_a_rerun_resumes(tmp_path, local_ray,
                                                                      monkeypatch, capsys):
    """A Ray task that dies more often than Ray retries it (worker 1 of 2, every time):
    one line, exit 2, once worker 0 has finished its pieces (shards 0 and 2), which are
    kept; the rerun completes the index."""
    from .test_ivfpq import ivfpq_rows

    data, pq = ivfpq_rows(tmp_path, monkeypatch, seed=3)
    monkeypatch.setenv("DATABLAME_TEST_RAY_TASK_DIE", "1")
    code, _, err = run_cli(monkeypatch, capsys, "index", data, "--out", tmp_path / "idx",
                           *pq, "--ray", "local", "--workers", "2")
    # worker 0's progress comes first (the driver waits for it), then the one error line
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and "Traceback" not in err, err
    assert [line for line in lines if line.startswith("error:")] == lines[-1:], err
    assert "a Ray task building the ivfpq index died more often than Ray retries it" in \
        lines[-1]
    partial = tmp_path / ".idx.ivfpq-partial"
    kept = sorted(p.name for p in partial.glob("piece-*.json"))
    assert kept == ["piece-00000.json", "piece-00002.json"]  # worker 0 finished first
    monkeypatch.delenv("DATABLAME_TEST_RAY_TASK_DIE")
    code, out, err = run_cli(monkeypatch, capsys, "index", data, "--out", tmp_path / "idx",
                             *pq, "--ray", "local", "--workers", "2")
    assert code in (0, None), err
    assert "committed 3 ivfpq index shards (1000 rows, 2 Ray task(s))" in out + err


def test_a_runtime_environment_ray_cannot_set_up_is_one_line(local_ray):
    """A task whose runtime environment fails on the worker (here a conda env on a machine
    without conda; on a cluster, a pip install that fails): Ray's multi-line traceback
    becomes one line that keeps the setup's own last line."""
    from datablame.errors import UserError
    from datablame.ray_cluster import user_errors

    @ray.remote(runtime_env={"conda": "datablame-no-such-env"})
    def task() -> int:
        return 1

    with pytest.raises(UserError) as caught, user_errors(died="a task died ({})"):
        ray.get(task.remote())
    message = str(caught.value)
    assert "\n" not in message and "could not set up the workers' runtime environment" in \
        message
    assert "Conda" in message or "conda" in message, message
