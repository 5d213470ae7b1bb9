"""`index --gradients --ray`: Ray Core actors write the gradient shards; the store equals one
process's, byte for byte, even when an actor dies mid-shard. A local Ray instance on this
machine only (loopback)."""

import os

import pytest

from .test_cli import _assert_one_line_error, run_cli
from .test_gradient_store import _files, one_process_store

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
