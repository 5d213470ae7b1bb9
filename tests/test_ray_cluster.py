"""`index --gradients --ray` on a two-node Ray cluster (`ray.cluster_utils.Cluster`, both
nodes on this machine, loopback only): one actor per node, one of them dies mid-shard and
is restarted, and the store still equals one process's, byte for byte. The store is a
whitened one (`--curvature ekfac`): the first actor fits the curvature, the other reads
it, and so does the restarted one."""

import os

import pytest

from .test_cli import run_cli
from .test_gradient_store import _files, one_process_store

ray = pytest.importorskip("ray")
cluster_utils = pytest.importorskip("ray.cluster_utils")


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """A head and a worker node of one CPU each, so two one-CPU actors must take one node
    each; the actor that takes shard 1 first dies (os._exit) before writing it."""
    marker = tmp_path_factory.mktemp("ray-cluster") / "died"
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ["DATABLAME_TEST_RAY_DIE"] = f"1:{marker}"  # read by the nodes' workers
    cluster = cluster_utils.Cluster(initialize_head=True, connect=True,
                                    head_node_args={"num_cpus": 1,
                                                    "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    yield marker
    ray.shutdown()
    cluster.shutdown()
    del os.environ["DATABLAME_TEST_RAY_DIE"]


def test_two_nodes_build_the_one_process_store_through_an_actor_death(
        tmp_path, random_lora_model, two_nodes, monkeypatch, capsys):
    alive = [n for n in ray.nodes() if n["Alive"]]
    assert len(alive) == 2 and all(n["Resources"].get("CPU") == 1 for n in alive)
    train, grad = one_process_store(tmp_path, random_lora_model, monkeypatch, capsys,
                                    extra=["--curvature", "ekfac"])
    code, out, err = run_cli(monkeypatch, capsys, "index", train, "--out",
                             tmp_path / "cluster", *grad, "--ray", "auto", "--workers", "2")
    assert code in (0, None), err
    assert "committed 4 gradient shards (13 rows, 2 Ray actor(s))" in out + err
    assert _files(tmp_path / "cluster" / "gradients") == \
        _files(tmp_path / "one" / "gradients")
    assert "curvature.npz" in _files(tmp_path / "one" / "gradients")
    assert two_nodes.exists()  # an actor died on shard 1: Ray restarted it and retried
