import numpy as np
import pytest

from datablame.data.rows import load_rows
from datablame.errors import UserError
from datablame.store.retrieval_index import build_faiss, load_index

from .conftest import write_jsonl


def _unit(rng, n, d):
    v = rng.standard_normal((n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_flat_index_equals_brute_force_cosine():
    rng = np.random.default_rng(0)
    rows, queries = _unit(rng, 2000, 64), _unit(rng, 20, 64)
    sims, ids = build_faiss(rows, "flat").search(queries, 10)
    brute = queries @ rows.T
    expect = np.argsort(-brute, axis=1)[:, :10]
    np.testing.assert_array_equal(ids, expect)
    np.testing.assert_allclose(sims, np.take_along_axis(brute, expect, 1), atol=1e-5)


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_indexes_recall_the_brute_force_neighbours(kind):
    rng = np.random.default_rng(1)
    centers = _unit(rng, 40, 32)
    points = centers[rng.integers(0, 40, 4050)] + 0.2 * rng.standard_normal((4050, 32))
    points = (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32)
    # queries from the same mixture but not indexed: a row's similarity to itself would
    # make the first neighbour free
    rows, queries = points[:4000], points[4000:]
    _, ids = build_faiss(rows, kind).search(queries.astype(np.float32), 10)
    expect = np.argsort(-(queries @ rows.T), axis=1)[:, :10]
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, expect, strict=True)])
    assert recall >= 0.9


def test_real_embedder_index_matches_brute_force_and_refuses_stale_data(tmp_path):
    from datablame.features.embeddings import Embedder
    from datablame.text import build_index

    rows = [{"instruction": f"task {i}", "input": "", "output": text} for i, text in
            enumerate(["The cat sat on the mat.", "Stocks fell sharply on Monday.",
                       "A kitten rested on the rug.", "Rain is expected tomorrow.",
                       "Quarterly earnings beat expectations."])]
    data = write_jsonl(tmp_path / "t.jsonl", rows)
    build_index(data, tmp_path / "idx")
    idx = load_index(tmp_path / "idx")
    idx.check_rows(load_rows(data))
    emb = Embedder()
    stored = np.load(tmp_path / "idx" / "embeddings.npy")
    q = emb.encode(["a small cat lying on a carpet"])
    dist, ids = idx.search(q, 5)
    brute = (stored @ q[0])
    np.testing.assert_array_equal(ids[0], np.argsort(-brute))
    np.testing.assert_allclose(1 - dist[0], np.sort(brute)[::-1], atol=1e-5)
    assert ids[0][0] in (0, 2)  # the two cat rows are the nearest

    rows[3]["output"] = "Sunshine all week."
    write_jsonl(data, rows)
    with pytest.raises(UserError, match="stale"):
        idx.check_rows(load_rows(data))


def test_interrupted_build_leaves_no_index(tmp_path, monkeypatch):
    from datablame.text import build_index
    data = write_jsonl(tmp_path / "t.jsonl", [{"instruction": "a", "input": "", "output": "b"}])

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("faiss.write_index", boom)
    with pytest.raises(KeyboardInterrupt):
        build_index(data, tmp_path / "idx")
    assert not (tmp_path / "idx").exists()
    assert not list(tmp_path.glob(".idx.partial-*"))
    with pytest.raises(UserError, match="index directory not found"):
        load_index(tmp_path / "idx")


def test_a_rebuild_keeps_the_gradient_store_even_when_it_is_interrupted(tmp_path,
                                                                         monkeypatch):
    """Rebuilding the retrieval index in place (another index type) keeps its gradient
    store; a rebuild killed at the swap leaves the store aside, and the next build puts it
    back."""
    from datablame.text import build_index

    data = write_jsonl(tmp_path / "t.jsonl", [{"instruction": f"task {i}", "input": "",
                                               "output": f"answer {i}"} for i in range(6)])
    build_index(data, tmp_path / "idx")
    (tmp_path / "idx" / "gradients").mkdir()
    (tmp_path / "idx" / "gradients" / "mark").write_text("store")
    build_index(data, tmp_path / "idx", index_type="hnsw")
    assert (tmp_path / "idx" / "gradients" / "mark").read_text() == "store"
    assert load_index(tmp_path / "idx").manifest["index_type"] == "hnsw"

    import datablame.store.atomic as atomic

    real_replace = atomic.os.replace

    def die_at_the_swap(src, dst):
        if ".old-" in str(dst):  # the old index about to make way for the new one
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", die_at_the_swap)
    with pytest.raises(KeyboardInterrupt):
        build_index(data, tmp_path / "idx", index_type="flat")
    monkeypatch.undo()
    assert not (tmp_path / "idx" / "gradients").exists()  # aside, not lost
    build_index(data, tmp_path / "idx", index_type="hnsw")  # current: reused, store back
    assert (tmp_path / "idx" / "gradients" / "mark").read_text() == "store"


def test_ivf_never_returns_fewer_candidates_than_asked():
    """Issue 9.12: IVF probes a few lists; with small clusters it returned 41 of 50."""
    from datablame.store.retrieval_index import RetrievalIndex

    rng = np.random.default_rng(2)
    centers = _unit(rng, 60, 16)
    rows = centers[rng.integers(0, 60, 2400)] + 0.05 * rng.standard_normal((2400, 16))
    rows = (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)
    faiss_index = build_faiss(rows, "ivf")
    _, raw = faiss_index.search(rows[:1], 300)
    assert (raw < 0).any()  # the case: FAISS alone pads with -1
    index = RetrievalIndex(path=None, manifest={"data": {"rows": len(rows)}},
                           index=faiss_index)
    _, ids = index.search(rows[:1], 300)
    assert (ids >= 0).all() and len(set(ids[0])) == 300
    assert faiss_index.nprobe == max(1, faiss_index.nlist // 8)  # left as it was


def _small_index(tmp_path):
    from datablame.data.template import PromptTemplate
    from datablame.store.retrieval_index import save_index

    data = write_jsonl(tmp_path / "t.jsonl", [{"instruction": f"{i}", "input": "",
                                              "output": "b"} for i in range(3)])
    vecs = _unit(np.random.default_rng(0), 3, 8)
    save_index(tmp_path / "idx", vecs, load_rows(data), PromptTemplate(), "test", "flat")
    return tmp_path / "idx"


@pytest.mark.parametrize("name", ["../t.jsonl", "/etc/passwd", "faiss.index/../faiss.index"])
def test_index_manifest_cannot_name_files_outside_the_index(tmp_path, name):
    import json

    idx = _small_index(tmp_path)
    load_index(idx)
    manifest = json.loads((idx / "manifest.json").read_text())
    manifest["files"]["faiss"]["file"] = name
    (idx / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="names a file that is not one of its own"):
        load_index(idx)


def test_damaged_faiss_file_is_refused_by_checksum(tmp_path):
    idx = _small_index(tmp_path)
    data = bytearray((idx / "faiss.index").read_bytes())
    data[-5] ^= 0xFF
    (idx / "faiss.index").write_bytes(bytes(data))
    with pytest.raises(UserError, match="faiss.index is corrupted"):
        load_index(idx)
