"""The IVF-PQ retrieval index for large data: pieces merged on disk answer exactly as one
index holding every row; the exact re-rank recovers the flat index's neighbours; the
directory still loads after it moves; damage and small data are refused."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from datablame.data.rows import load_rows
from datablame.data.template import PromptTemplate
from datablame.errors import UserError
from datablame.store import retrieval_index as ri

DIM = 32


def clustered(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(40, DIM))
    x = centres[rng.integers(0, 40, n)] + 0.3 * rng.normal(size=(n, DIM))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture
def table(tmp_path):
    """A JSONL of `n` rows whose "embedding" is looked up from a fixed matrix by row text."""
    def make(n: int):
        vectors = clustered(n)
        path = tmp_path / "rows.jsonl"
        path.write_text("".join(json.dumps({"instruction": f"row {i}", "output": str(i)})
                                + "\n" for i in range(n)))
        rows = load_rows(path)
        tmpl = PromptTemplate()
        lookup = {t: vectors[i] for i, t in enumerate(rows.texts(tmpl))}

        def embed(texts):
            return np.stack([lookup[t] for t in texts])
        return rows, tmpl, embed, vectors
    return make


def test_pieces_merged_on_disk_answer_exactly_as_one_index_of_every_row(table, tmp_path):
    rows, tmpl, embed, vectors = table(3000)
    manifest = ri.save_ivfpq_index(tmp_path / "idx", rows, tmpl, embed, "test", shard_rows=700)
    assert [s["rows"] for s in manifest["shards"]][:2] == [[0, 700], [700, 1400]]
    index = ri.load_index(tmp_path / "idx")
    # the same trained quantizers, every row added to one index in memory
    sample_ids = np.unique(np.linspace(0, 2999, 3000).astype(np.int64))
    whole = ri.train_ivfpq(vectors[sample_ids], 3000)
    whole.add_with_ids(vectors, np.arange(3000, dtype=np.int64))
    queries = clustered(20, seed=1)
    for probe in (1, whole.nlist):
        whole.nprobe = index.index.nprobe = probe
        want_d, want_i = whole.search(queries, 30)
        got_d, got_i = index.index.search(queries, 30)
        np.testing.assert_array_equal(got_i, want_i)
        np.testing.assert_array_equal(got_d, want_d)


def test_the_exact_rerank_finds_the_flat_indexs_neighbours(table, tmp_path):
    rows, tmpl, embed, vectors = table(4000)
    ri.save_ivfpq_index(tmp_path / "idx", rows, tmpl, embed, "test", shard_rows=1500)
    index = ri.load_index(tmp_path / "idx")
    queries = clustered(50, seed=2)
    dist, ids = index.search(queries, 10)
    exact = queries @ vectors.T
    want = np.argsort(-exact, axis=1, kind="stable")[:, :10]
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, want, strict=True)])
    assert recall >= 0.9, recall
    # distances are the exact cosines of the rows returned (fp16 embeddings), best first
    for q, row_ids, d in zip(queries, ids, dist, strict=True):
        np.testing.assert_allclose(1 - d, vectors[row_ids] @ q, atol=2e-3)
        assert np.all(np.diff(d) >= 0)
    # a row's own embedding finds the row first
    _, own = index.search(vectors[[5, 1234, 3999]], 1)
    assert own[:, 0].tolist() == [5, 1234, 3999]


def test_a_moved_index_still_finds_its_lists_and_damage_is_refused(table, tmp_path, capfd):
    """FAISS notes the move on stdout from C: nothing may reach stdout (`--json`)."""
    rows, tmpl, embed, vectors = table(1200)
    ri.save_ivfpq_index(tmp_path / "idx", rows, tmpl, embed, "test", shard_rows=500)
    moved = tmp_path / "elsewhere" / "idx"
    moved.parent.mkdir()
    shutil.move(tmp_path / "idx", moved)
    index = ri.load_index(moved)
    _, ids = index.search(vectors[[7]], 1)
    assert ids[0, 0] == 7
    assert capfd.readouterr().out == ""
    # more results than the probed lists hold: every list is probed, as for `ivf`
    index.index.nprobe = 1
    _, ids = index.search(vectors[[7]], 900)
    assert (ids >= 0).all() and len(set(ids[0].tolist())) == 900
    lists = moved / "lists.ivfdata"
    with lists.open("r+b") as fh:
        fh.truncate(lists.stat().st_size - 8)
    with pytest.raises(UserError, match="lists.ivfdata is truncated"):
        ri.load_index(moved)


def test_a_shard_named_outside_the_index_or_missing_is_refused(table, tmp_path):
    rows, tmpl, embed, _ = table(1100)
    ri.save_ivfpq_index(tmp_path / "idx", rows, tmpl, embed, "test", shard_rows=600)
    manifest_path = tmp_path / "idx" / "manifest.json"
    good = json.loads(manifest_path.read_text())
    bad = json.loads(json.dumps(good))
    bad["shards"][0]["file"] = "../embeddings-00000.npy"
    manifest_path.write_text(json.dumps(bad))
    with pytest.raises(UserError, match="not one of its own"):
        ri.load_index(tmp_path / "idx")
    manifest_path.write_text(json.dumps(good))
    (tmp_path / "idx" / "embeddings-00001.npy").unlink()
    with pytest.raises(UserError, match="embeddings-00001.npy is missing"):
        ri.load_index(tmp_path / "idx")


def test_small_data_is_told_to_use_flat(table, tmp_path):
    rows, tmpl, embed, _ = table(50)
    with pytest.raises(UserError, match="use flat"):
        ri.save_ivfpq_index(tmp_path / "idx", rows, tmpl, embed, "test")
    assert not (tmp_path / "idx").exists()


def test_index_ivfpq_end_to_end_finds_the_row_that_says_it(tmp_path, monkeypatch, capsys):
    """`datablame index --index-type ivfpq` with the real embedder over 1,000 rows: the row
    that states a fact comes back first for a question about it, at its exact cosine (up
    to fp16 rounding); too few rows exit 2 with one line."""
    from datablame.features.embeddings import Embedder
    from datablame.store.retrieval_index import load_index
    from datablame.text import Query

    from .test_cli import _assert_one_line_error, run_cli

    rng = np.random.default_rng(0)
    words = ["river", "stone", "copper", "violin", "garden", "engine", "winter", "orbit"]
    rows = [{"instruction": " ".join(rng.choice(words, 5)), "input": "",
             "output": " ".join(rng.choice(words, 6))} for _ in range(1000)]
    rows[777] = {"instruction": "What is the capital of Zembla?", "input": "",
                 "output": "The capital of Zembla is Onhava."}
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, out, err = run_cli(monkeypatch, capsys, "index", data, "--out", tmp_path / "pq",
                             "--index-type", "ivfpq")
    assert code in (0, None), err
    pq = load_index(tmp_path / "pq")
    assert pq.manifest["index_type"] == "ivfpq"
    assert not (tmp_path / "pq" / "embeddings.npy").exists()
    tmpl = PromptTemplate()
    enc = Embedder()
    q = enc.encode([Query("Onhava.", {"instruction": "Name Zembla's capital.", "input": ""}
                          ).formatted(tmpl).text])
    row = enc.encode([tmpl.format(rows[777]).text])
    dist, ids = pq.search(q, 5)
    assert ids[0, 0] == 777
    np.testing.assert_allclose(1 - dist[0, 0], float(row[0] @ q[0]), atol=2e-3)

    small = tmp_path / "small.jsonl"
    small.write_text("".join(json.dumps(r) + "\n" for r in rows[:20]))
    code, _, err = run_cli(monkeypatch, capsys, "index", small, "--out", tmp_path / "s",
                           "--index-type", "ivfpq")
    _assert_one_line_error(code, err, "use flat")


def _index_files(path):
    """An index's files as bytes, the manifest without its creation time (and not the
    build lock's record of who built it)."""
    files = {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()
             and p.name not in ("manifest.json", ".lock")}
    manifest = json.loads((path / "manifest.json").read_text())
    manifest.pop("created")
    return files, manifest


def test_pieces_written_by_workers_commit_to_the_one_process_index(table, tmp_path):
    """Three `shard_of` workers (the first trains, the others read its quantizers) and a
    commit make the one-process index file for file; the commit refuses while a shard is
    missing; a worker rerun writes nothing twice; the build directory is gone after."""
    rows, tmpl, embed, _ = table(2500)
    ri.save_ivfpq_index(tmp_path / "one", rows, tmpl, embed, "test", shard_rows=600)
    calls = []

    def counted(texts):
        calls.append(len(texts))
        return embed(texts)

    out = tmp_path / "many"
    for i in (0, 1):
        done = ri.save_ivfpq_index(out, rows, tmpl, counted, "test", shard_rows=600,
                                   shard_of=(i, 3))
    assert done["missing"] == [2] and not out.exists()
    with pytest.raises(UserError, match=r"1 of 5 ivfpq shards are not written yet \(shard 2\)"):
        ri.save_ivfpq_index(out, rows, tmpl, counted, "test", shard_rows=600,
                            commit_only=True)
    ri.save_ivfpq_index(out, rows, tmpl, counted, "test", shard_rows=600, shard_of=(2, 3))
    embedded = sum(calls)
    assert ri.save_ivfpq_index(out, rows, tmpl, counted, "test", shard_rows=600,
                               shard_of=(0, 3))["written"] == 0
    assert sum(calls) == embedded  # nothing embedded twice
    ri.save_ivfpq_index(out, rows, tmpl, counted, "test", shard_rows=600, commit_only=True)
    assert _index_files(out) == _index_files(tmp_path / "one")
    # only the workers' lock files stay (never removed: a lock file unlinked while a
    # process waits on it lets two processes hold "the" lock)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == \
        [".many.ivfpq-partial.lock", ".one.ivfpq-partial.lock"]
    assert ri.load_index(out).search(clustered(1, seed=3), 5)[1].shape == (1, 5)


def one_process_ivfpq(tmp_path, monkeypatch, capsys, seed: int = 1):
    """1,000 rows of words in 3 shards of 400 (in worker processes and Ray tasks too), and
    the index one process builds of them at tmp_path / "one"."""
    from .test_cli import run_cli

    data, pq = ivfpq_rows(tmp_path, monkeypatch, seed)
    code, _, err = run_cli(monkeypatch, capsys, "index", data, "--out", tmp_path / "one", *pq)
    assert code in (0, None), err
    return data, pq


def ivfpq_rows(tmp_path, monkeypatch, seed: int = 1):
    """(train.jsonl of 1,000 rows of words, the ivfpq index options), 3 shards of 400."""
    monkeypatch.setenv("DATABLAME_TEST_IVFPQ_SHARD_ROWS", "400")
    rng = np.random.default_rng(seed)
    words = ["river", "stone", "copper", "violin", "garden", "engine", "winter", "orbit"]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"instruction": " ".join(rng.choice(words, 4)),
                                        "output": " ".join(rng.choice(words, 5))}) + "\n"
                            for _ in range(1000)))
    return data, ["--index-type", "ivfpq"]


def test_index_ivfpq_shard_of_commit_and_workers_equal_one_process(tmp_path, monkeypatch,
                                                                   capsys):
    """The CLI: `--index-type ivfpq --shard-of 0/2`, `1/2`, `--commit`, and `--workers 2`
    (two processes), with the real embedder, make the one-process index file for file."""
    from .test_cli import _assert_one_line_error, run_cli

    data, pq = one_process_ivfpq(tmp_path, monkeypatch, capsys)
    code, out, err = run_cli(monkeypatch, capsys, "index", data, "--out", tmp_path / "two",
                             *pq, "--shard-of", "0/2")
    assert code in (0, None), err
    assert "wrote 2 of its 2 ivfpq index shards; 1 shard(s) of the index still missing" in \
        " ".join((out + err).split())
    code, _, err = run_cli(monkeypatch, capsys, "index", data, "--out", tmp_path / "two",
                           *pq, "--commit")
    _assert_one_line_error(code, err, "ivfpq shards are not written yet (shard 1)")
    # `status` sees the build from its files (the index itself does not exist yet)
    code, out, err = run_cli(monkeypatch, capsys, "status", tmp_path / "two")
    assert code in (0, None), err
    assert "ivfpq index build in progress: 2/3 shards (600/1000 rows)" in out
    assert "missing: 1 shard(s): 1" in out
    piece = tmp_path / ".two.ivfpq-partial" / "piece-00002.index"
    kept = piece.read_bytes()
    piece.write_bytes(kept[:-1])  # a truncated piece counts as damaged, not done
    code, out, err = run_cli(monkeypatch, capsys, "status", tmp_path / "two", "--json")
    assert code in (0, None), err
    build = json.loads(out)["ivfpq_build"]
    assert (build["done"], build["missing"], build["damaged"]) == (1, [1], [2])
    piece.write_bytes(kept)
    code, _, err = run_cli(monkeypatch, capsys, "index", data, "--out", tmp_path / "two",
                           *pq, "--shard-of", "1/2")
    assert code in (0, None), err
    code, out, err = run_cli(monkeypatch, capsys, "index", data, "--out", tmp_path / "two",
                             *pq, "--commit")
    assert code in (0, None), err
    assert "committed 3 ivfpq index shards (1000 rows)" in out + err
    assert _index_files(tmp_path / "two") == _index_files(tmp_path / "one")
    assert (tmp_path / "two" / "spans").exists()  # the copied-words index, as one process
    code, _, err = run_cli(monkeypatch, capsys, "index", data, "--out", tmp_path / "three",
                           *pq, "--workers", "2")
    assert code in (0, None), err
    assert _index_files(tmp_path / "three") == _index_files(tmp_path / "one")
    # workers rerun on an index that is current already: nothing embedded, nothing left
    code, out, err = run_cli(monkeypatch, capsys, "index", data, "--out", tmp_path / "three",
                             *pq, "--shard-of", "1/2")
    assert code in (0, None), err
    assert "is an ivfpq index of these rows already: nothing to write" in \
        " ".join((out + err).split())
    assert "wrote 0 of its 0" not in out + err  # the note says it all
    assert not (tmp_path / ".three.ivfpq-partial").exists()
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    code, _, err = run_cli(monkeypatch, capsys, "index", data, "--out", taken, *pq,
                           "--workers", "2")
    _assert_one_line_error(code, err, "is a directory with")
    assert "worker" not in err  # refused once, before any worker started
    code, _, err = run_cli(monkeypatch, capsys, "index", data, "--out", tmp_path / "f",
                           "--shard-of", "0/2")
    _assert_one_line_error(code, err, "or an ivfpq index (add --index-type ivfpq)")


def test_a_failed_commit_loses_no_piece_and_running_workers_are_not_overrun(table, tmp_path,
                                                                            monkeypatch):
    """A commit that fails in the merge (a full disk) keeps every piece and embedding: the
    rerun commits without embedding a row. While a worker holds the build, a build of
    other rows is refused (not discarding its pieces) and so is a commit, in one line."""
    import fcntl

    rows, tmpl, embed, _ = table(2500)
    ri.save_ivfpq_index(tmp_path / "one", rows, tmpl, embed, "test", shard_rows=600)
    out = tmp_path / "idx"
    for i in (0, 1):
        ri.save_ivfpq_index(out, rows, tmpl, embed, "test", shard_rows=600, shard_of=(i, 2))
    with open(tmp_path / ".idx.ivfpq-partial.lock", "a") as guard:  # a worker still runs
        fcntl.flock(guard, fcntl.LOCK_SH)
        with pytest.raises(UserError, match="workers are still writing ivfpq pieces"):
            ri.save_ivfpq_index(out, rows, tmpl, embed, "test", shard_rows=600,
                                commit_only=True)
        other, other_tmpl, other_embed, _ = table(1500)  # other rows, into the same index
        with pytest.raises(UserError, match="that workers are still writing: let them"):
            ri.save_ivfpq_index(out, other, other_tmpl, other_embed, "test",
                                shard_rows=600, shard_of=(0, 2))
    assert (tmp_path / ".idx.ivfpq-partial" / "embeddings-00004.npy").exists()

    def full_disk(*_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("faiss.contrib.ondisk.merge_ondisk", full_disk)
    with pytest.raises(OSError, match="No space left"):
        ri.save_ivfpq_index(out, rows, tmpl, embed, "test", shard_rows=600,
                            commit_only=True)
    monkeypatch.undo()
    assert not out.exists()

    def refuse(texts):
        raise AssertionError("embedded again")

    ri.save_ivfpq_index(out, rows, tmpl, refuse, "test", shard_rows=600, commit_only=True)
    assert _index_files(out) == _index_files(tmp_path / "one")
    assert not (tmp_path / ".idx.ivfpq-partial").exists()


def test_a_folder_of_the_build_directorys_name_that_is_not_ours_is_kept(table, tmp_path):
    rows, tmpl, embed, _ = table(1200)
    mine = tmp_path / ".idx.ivfpq-partial"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    with pytest.raises(UserError, match="is not a datablame ivfpq build directory"):
        ri.save_ivfpq_index(tmp_path / "idx", rows, tmpl, embed, "test", shard_rows=600,
                            shard_of=(0, 2))
    assert (mine / "notes.txt").read_text() == "precious"
