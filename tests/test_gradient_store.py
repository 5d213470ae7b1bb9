"""Gradient store: deterministic projection, resumable byte-identical builds, refusals."""

import subprocess
import sys

import numpy as np
import pytest

from datablame.data.rows import load_rows
from datablame.data.template import PromptTemplate
from datablame.errors import UserError
from datablame.features.gradients import build_gradient_store
from datablame.features.projection import PROJECTIONS, make_projector
from datablame.models.hf_causal_lm import CausalLMAdapter
from datablame.store.gradient_store import GradientStore

from .conftest import write_jsonl

ROWS = [{"instruction": f"say {w}", "input": "" if i % 2 else "the fox",
         "output": f"{w} there friend ." if i % 3 else f"the lazy dog {w}"}
        for i, w in enumerate(["hi", "hello", "again", "over", "jumps", "quick", "brown",
                               "lazy", "dog", "fox", "and", "the", "there"])]


@pytest.mark.parametrize("kind", PROJECTIONS)
def test_projection_is_deterministic_across_processes(kind):
    code = ("import numpy as np; from datablame.features.projection import make_projector;"
            "g = np.arange(40000, dtype=np.float32).reshape(4, 10000) % 7 - 3;"
            f"print(make_projector('{kind}', 10000, 64, seed=3, block=4096)"
            ".project(g).tobytes().hex())")
    runs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True).stdout for _ in range(2)}
    assert len(runs) == 1
    g = np.arange(40000, dtype=np.float32).reshape(4, 10000) % 7 - 3
    here = make_projector(kind, 10000, 64, seed=3, block=4096).project(g).tobytes().hex()
    assert runs == {here + "\n"}
    other = make_projector(kind, 10000, 64, seed=4, block=4096).project(g).tobytes().hex()
    assert other != here


@pytest.mark.parametrize("kind", PROJECTIONS)
def test_projection_preserves_inner_products_within_jl_bound(kind):
    rng = np.random.default_rng(0)
    d, k = 20000, 1024
    a = rng.standard_normal((50, d)).astype(np.float32)
    b = a + 0.5 * rng.standard_normal((50, d)).astype(np.float32)  # correlated pairs
    proj = make_projector(kind, d, k, seed=0)
    pa, pb = proj.project(a), proj.project(b)
    exact = np.sum(a * b, axis=1)
    approx = np.sum(pa * pb, axis=1)
    # std of the estimate: sqrt((|a|^2|b|^2 + <a,b>^2) / k); allow 4 sigma
    sigma = np.sqrt((np.sum(a * a, 1) * np.sum(b * b, 1) + exact**2) / k)
    assert np.all(np.abs(approx - exact) < 4 * sigma)
    cos_exact = exact / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    cos_proj = approx / np.linalg.norm(pa, axis=1) / np.linalg.norm(pb, axis=1)
    assert np.max(np.abs(cos_exact - cos_proj)) < 0.1


@pytest.fixture()
def setup(tmp_path, random_lora_model):
    base, adapter = random_lora_model
    rows = load_rows(write_jsonl(tmp_path / "t.jsonl", ROWS))
    model = CausalLMAdapter(base, adapter, device="cpu")
    return tmp_path, rows, PromptTemplate(), model


def _files(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_resumed_build_equals_uninterrupted_byte_for_byte(setup):
    tmp, rows, tmpl, model = setup
    kw = dict(proj_dim=32, shard_rows=4, batch_size=3)
    build_gradient_store(tmp / "a", rows, tmpl, model, **kw)
    with pytest.raises(KeyboardInterrupt):
        build_gradient_store(tmp / "b", rows, tmpl, model, stop_after_shards=2, **kw)
    assert not (tmp / "b" / "gradients").exists()  # never looks complete
    with pytest.raises(UserError, match="interrupted build can be resumed"):
        GradientStore.load(tmp / "b")
    partial = sorted(p.name for p in (tmp / "b" / "gradients.partial").glob("shard-*.npy")
                     if not p.name.endswith(".norms.npy"))
    assert partial == ["shard-00000.npy", "shard-00001.npy"]
    build_gradient_store(tmp / "b", rows, tmpl, model, **kw)
    assert _files(tmp / "a" / "gradients") == _files(tmp / "b" / "gradients")


def test_store_scores_match_exact_projected_cosine(setup):
    tmp, rows, tmpl, model = setup
    build_gradient_store(tmp, rows, tmpl, model, proj_dim=64, shard_rows=5,
                         store_dtype="fp32")
    store = GradientStore.load(tmp)
    grads = model.gradients([tmpl.format(r) for r in rows.records])
    proj = store.projector.project(grads)
    q = proj[3]
    ids, scores = store.top_k(q, k=len(rows))
    exact = proj @ q / np.linalg.norm(proj, axis=1) / np.linalg.norm(q)
    np.testing.assert_array_equal(ids, np.argsort(-exact, kind="stable"))
    np.testing.assert_allclose(scores, np.sort(exact)[::-1], rtol=1e-5)
    assert ids[0] == 3


def test_truncated_or_corrupted_shard_is_refused(setup):
    tmp, rows, tmpl, model = setup
    build_gradient_store(tmp, rows, tmpl, model, proj_dim=16, shard_rows=4)
    shard = tmp / "gradients" / "shard-00001.npy"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(UserError, match="corrupted"):
        GradientStore.load(tmp)
    shard.write_bytes(bytes(data[:-8]))
    with pytest.raises(UserError, match="truncated"):
        GradientStore.load(tmp, verify=False)


def test_store_for_another_model_template_or_data_is_refused(setup, random_lora_model):
    tmp, rows, tmpl, model = setup
    build_gradient_store(tmp, rows, tmpl, model, proj_dim=16, shard_rows=8)
    store = GradientStore.load(tmp)
    store.check_compatible(model.identity(), tmpl, rows)
    base, _ = random_lora_model
    with pytest.raises(UserError, match="different adapter"):
        store.check_compatible(CausalLMAdapter(base, None, device="cpu").identity(), tmpl, rows)
    with pytest.raises(UserError, match="different template"):
        store.check_compatible(model.identity(),
                               PromptTemplate("{instruction} {input} => {output}"), rows)
    with pytest.raises(UserError, match="different loss scope"):
        store.check_compatible(CausalLMAdapter(base, model.adapter_dir, device="cpu",
                                               loss_on="text").identity(), tmpl, rows)
    other = load_rows(write_jsonl(tmp / "o.jsonl", ROWS[:-1] + [{**ROWS[-1], "output": "x"}]))
    with pytest.raises(UserError, match=r"built for other training data \(the rows' "
                                        r"content changed since it was built\)"):
        store.check_compatible(model.identity(), tmpl, other)
    fewer = load_rows(write_jsonl(tmp / "f.jsonl", ROWS[:-1]))
    with pytest.raises(UserError, match=rf"other training data \({len(ROWS)} rows when "
                                        rf"built, {len(ROWS) - 1} now\)"):
        store.check_compatible(model.identity(), tmpl, fewer)


@pytest.mark.parametrize("absolute", [False, True])
def test_store_top_k_equals_brute_force_over_shards(tmp_path, absolute):
    """Streaming top-k over several shards = brute force; with `absolute`, by |cosine|
    (what the fused ranking uses), returning the signed scores."""
    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((1000, 16)).astype(np.float32)
    shards = []
    for s, lo in enumerate(range(0, 1000, 300)):
        block = vecs[lo:lo + 300]
        np.save(tmp_path / f"shard-{s:05d}.npy", block)
        shards.append({"file": f"shard-{s:05d}.npy", "rows": [lo, lo + len(block)],
                       "bytes": (tmp_path / f"shard-{s:05d}.npy").stat().st_size,
                       "sha256": ""})
    np.save(tmp_path / "norms.npy", np.linalg.norm(vecs, axis=1))
    store = GradientStore(tmp_path, {"shards": shards, "proj_dim": 16})
    q = rng.standard_normal(16).astype(np.float32)
    cos = vecs @ q / np.linalg.norm(vecs, axis=1) / np.linalg.norm(q)
    ids, scores = store.top_k(q, 25, absolute=absolute)
    want = np.argsort(-(np.abs(cos) if absolute else cos))[:25]
    assert list(ids) == list(want)
    np.testing.assert_allclose(scores, cos[want], rtol=1e-5)
    assert absolute == bool((scores < 0).any())


@pytest.mark.parametrize("kind,absolute", [("cosine", False), ("cosine", True),
                                           ("dot", False), ("dot", True)])
def test_many_queries_in_one_pass_equal_each_query_alone(tmp_path, monkeypatch, kind,
                                                        absolute):
    """top_k_many over fp16 shards read in blocks of 64 rows (blocks cross no shard, shards
    end mid-block) = brute force per query in float64 on the same fp16 vectors."""
    import datablame.store.gradient_store as gs

    monkeypatch.setattr(gs, "SCAN_BLOCK_ROWS", 64)
    rng = np.random.default_rng(1)
    vecs = rng.standard_normal((1000, 24)).astype(np.float16)
    shards = []
    for s, lo in enumerate(range(0, 1000, 300)):
        np.save(tmp_path / f"shard-{s:05d}.npy", vecs[lo:lo + 300])
        shards.append({"file": f"shard-{s:05d}.npy", "rows": [lo, min(lo + 300, 1000)]})
    exact = vecs.astype(np.float64)
    np.save(tmp_path / "norms.npy", np.linalg.norm(exact, axis=1).astype(np.float32))
    store = GradientStore(tmp_path, {"shards": shards, "proj_dim": 24})
    queries = rng.standard_normal((5, 24)).astype(np.float32)
    results = store.top_k_many(queries, 30, kind, absolute)
    for q, (ids, scores) in zip(queries, results, strict=True):
        dots = exact @ q.astype(np.float64)
        want = dots if kind == "dot" else dots / np.linalg.norm(exact, axis=1) / \
            np.linalg.norm(q)
        order = np.argsort(-(np.abs(want) if absolute else want), kind="stable")[:30]
        assert list(ids) == list(order)
        np.testing.assert_allclose(scores, want[order], rtol=1e-4, atol=1e-5)
        single_ids, single_scores = store.top_k(q, 30, kind, absolute)
        assert list(single_ids) == list(ids)
        np.testing.assert_allclose(single_scores, scores, rtol=1e-5)  # GEMV vs GEMM sums


def tied_store(tmp_path, seed: int) -> tuple[GradientStore, np.ndarray]:
    """Four fp16 shards of 250 rows whose last 100 rows repeat the first 100 (exact ties
    across shard groups), and three queries."""
    rng = np.random.default_rng(seed)
    vecs = rng.standard_normal((1000, 16)).astype(np.float16)
    vecs[900:1000] = vecs[0:100]
    shards = []
    for s, lo in enumerate(range(0, 1000, 250)):
        np.save(tmp_path / f"shard-{s:05d}.npy", vecs[lo:lo + 250])
        shards.append({"file": f"shard-{s:05d}.npy", "rows": [lo, lo + 250]})
    np.save(tmp_path / "norms.npy",
            np.linalg.norm(vecs.astype(np.float32), axis=1).astype(np.float32))
    store = GradientStore(tmp_path, {"shards": shards, "proj_dim": 16})
    return store, rng.standard_normal((3, 16)).astype(np.float32)


@pytest.mark.parametrize("absolute", [False, True])
def test_a_scan_split_over_workers_equals_one_scan(tmp_path, absolute):
    """Shard groups scanned in threads and merged = one scan: the same rows, in the same
    order, the same scores, ties (identical rows in different groups) to the lower id."""
    store, queries = tied_store(tmp_path, 2)
    one = store.top_k_many(queries, 40, "cosine", absolute)
    for workers in (2, 3, 8):  # 8: more workers than shards
        split = store.top_k_many(queries, 40, "cosine", absolute, workers=workers)
        for (ids, scores), (want_ids, want_scores) in zip(split, one, strict=True):
            assert list(ids) == list(want_ids)
            np.testing.assert_array_equal(scores, want_scores)
    tied = [i for i in one[0][0] if i < 100]  # a row whose twin (i + 900) ties with it
    assert tied and all(list(one[0][0]).index(i) < list(one[0][0]).index(i + 900)
                        for i in tied if i + 900 in one[0][0])


@pytest.mark.parametrize("kind,absolute", [("cosine", False), ("cosine", True),
                                           ("dot", False), ("dot", True)])
def test_the_fp16_first_pass_returns_the_exact_scans_top_k(tmp_path, monkeypatch, kind,
                                                          absolute):
    """One query is first scored by an fp16 product and only rows whose error interval
    reaches the k-th best are scored exactly: the same rows and scores as the exact scan
    (two queries take the exact path) up to fp32 rounding, over near-ties, rows of very
    different norms, zero rows, identical rows (the lower ids first), and a block whose
    fp16 products overflow (scored exactly instead)."""
    import datablame.store.gradient_store as gs

    monkeypatch.setattr(gs, "SCAN_BLOCK_ROWS", 256)
    rng = np.random.default_rng(3)
    vecs = rng.standard_normal((2000, 32)).astype(np.float32)
    vecs *= rng.choice([1e-4, 1.0, 50.0], size=(2000, 1)).astype(np.float32)
    q = rng.standard_normal(32).astype(np.float32)
    vecs[10:60] = q + 3e-2 * rng.standard_normal((50, 32))  # near-ties at the top
    vecs[100:110] = 0.0
    vecs[1200:1206] = q  # identical rows: equal scores, the lower ids first
    vecs[1800:1810] = 6e4 * np.sign(q)  # fp16 products overflow in this block
    vecs = vecs.astype(np.float16)
    shards = []
    for s, lo in enumerate(range(0, 2000, 700)):
        np.save(tmp_path / f"shard-{s:05d}.npy", vecs[lo:lo + 700])
        shards.append({"file": f"shard-{s:05d}.npy", "rows": [lo, min(lo + 700, 2000)]})
    np.save(tmp_path / "norms.npy", np.linalg.norm(vecs.astype(np.float32), axis=1))
    store = GradientStore(tmp_path, {"shards": shards, "proj_dim": 32})
    scored = []
    real = gs._Fp16Filter.candidates

    def candidates(self, part, norms):
        found = real(self, part, norms)
        scored.append(len(part) if found is None else len(found[0]))
        return found

    monkeypatch.setattr(gs._Fp16Filter, "candidates", candidates)
    exact = vecs.astype(np.float64) @ q.astype(np.float64)
    if kind == "cosine":
        norms = np.linalg.norm(vecs.astype(np.float64), axis=1)
        exact = np.where(norms > 0, exact / np.where(norms > 0, norms, 1) /
                         np.linalg.norm(q.astype(np.float64)), 0.0)
    key = np.abs(exact) if absolute else exact
    for k in (1, 40):
        ids, scores = store.top_k(q, k, kind, absolute)
        (want_ids, want), _ = store.top_k_many(np.stack([q, -q]), k, kind, absolute)
        np.testing.assert_allclose(scores, want, rtol=1e-5, atol=1e-9)
        kth = np.sort(key)[-k]  # every row returned is in the top k, up to fp32 rounding
        assert (key[ids] >= kth - 1e-5 * abs(kth) - 1e-9).all()
        np.testing.assert_allclose(scores, exact[ids], rtol=1e-5, atol=1e-9)
    assert scored and sum(scored) < 2000  # the first pass did filter
    if kind == "cosine":
        assert list(store.top_k(q, 3, kind, absolute)[0]) == [1200, 1201, 1202]
# -- issue 9: nothing lost, nothing crashes, nothing silently wrong --------------------------

def _rewrite_manifest(store_dir, change):
    import json

    path = store_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def _refresh_checksum(store_dir, name):
    """Make the manifest certify `name` as it now is (what a racing build did)."""
    import hashlib

    f = store_dir / name

    def change(m):
        entry = m["norms"] if name == "norms.npy" else \
            next(s for s in m["shards"] if s["file"] == name)
        entry.update(bytes=f.stat().st_size, sha256=hashlib.sha256(f.read_bytes()).hexdigest())
    _rewrite_manifest(store_dir, change)


@pytest.mark.parametrize("name", ["../../../x.npy", "/etc/passwd", "shard-00001.npy/..",
                                  "sub/shard-00000.npy"])
def test_manifest_paths_outside_the_store_are_refused(setup, name):
    tmp, rows, tmpl, model = setup
    build_gradient_store(tmp, rows, tmpl, model, proj_dim=16, shard_rows=8)
    (tmp / "x.npy").write_bytes((tmp / "gradients" / "shard-00000.npy").read_bytes())
    _rewrite_manifest(tmp / "gradients", lambda m: m["shards"][0].update(file=name))
    with pytest.raises(UserError, match="names a file that is not one of its own"):
        GradientStore.load(tmp, verify=False)


def test_symlinked_shard_pointing_outside_is_refused(setup):
    tmp, rows, tmpl, model = setup
    build_gradient_store(tmp, rows, tmpl, model, proj_dim=16, shard_rows=8)
    shard = tmp / "gradients" / "shard-00000.npy"
    (tmp / "outside.npy").write_bytes(shard.read_bytes())
    shard.unlink()
    shard.symlink_to(tmp / "outside.npy")
    with pytest.raises(UserError, match="resolves outside the store"):
        GradientStore.load(tmp, verify=False)


def test_damaged_norms_are_refused(setup):
    tmp, rows, tmpl, model = setup
    build_gradient_store(tmp, rows, tmpl, model, proj_dim=16, shard_rows=8)
    norms_path = tmp / "gradients" / "norms.npy"
    norms = np.load(norms_path)
    np.save(norms_path, norms / 100)  # same size, wrong values
    with pytest.raises(UserError, match="norms.npy is corrupted"):
        GradientStore.load(tmp)
    store = GradientStore.load(tmp, verify=False)  # size alone cannot see it ...
    q = store.projector.project(model.gradients([tmpl.format(rows.records[0])]))[0]
    with pytest.raises(UserError, match="is damaged: a cosine of"):  # ... the cosines can
        store.top_k(q, 3)
    with pytest.raises(UserError, match="is damaged: a cosine of"):
        store.score_rows(q, np.arange(3))


def test_shard_of_another_width_is_refused_even_if_certified(setup):
    tmp, rows, tmpl, model = setup
    build_gradient_store(tmp, rows, tmpl, model, proj_dim=16, shard_rows=8)
    np.save(tmp / "gradients" / "shard-00001.npy", np.zeros((5, 32), np.float16))
    _refresh_checksum(tmp / "gradients", "shard-00001.npy")
    with pytest.raises(UserError, match=r"shard-00001.npy holds \(5, 32\) float16, its "
                                        r"manifest says \(5, 16\) float16"):
        GradientStore.load(tmp)


def test_foreign_shard_in_a_partial_build_is_recomputed(setup):
    tmp, rows, tmpl, model = setup
    kw = dict(proj_dim=16, shard_rows=4, batch_size=3)
    build_gradient_store(tmp / "a", rows, tmpl, model, **kw)
    with pytest.raises(KeyboardInterrupt):
        build_gradient_store(tmp / "b", rows, tmpl, model, stop_after_shards=2, **kw)
    np.save(tmp / "b" / "gradients.partial" / "shard-00001.npy", np.ones((4, 32), np.float16))
    build_gradient_store(tmp / "b", rows, tmpl, model, **kw)
    assert _files(tmp / "a" / "gradients") == _files(tmp / "b" / "gradients")


def test_damaged_npy_header_is_one_line_even_without_verify(setup):
    tmp, rows, tmpl, model = setup
    build_gradient_store(tmp, rows, tmpl, model, proj_dim=16, shard_rows=8)
    shard = tmp / "gradients" / "shard-00000.npy"
    data = bytearray(shard.read_bytes())
    data[12:20] = b"@@@@@@@@"  # inside the header's dict literal
    shard.write_bytes(bytes(data))
    with pytest.raises(UserError, match="shard-00000.npy has a damaged header"):
        GradientStore.load(tmp, verify=False)


def test_store_identifies_model_by_content_params_by_names_and_dtype(setup, random_lora_model):
    import shutil

    from safetensors.torch import load_file, save_file

    tmp, rows, tmpl, _ = setup
    base0, adapter0 = random_lora_model
    base, adapter = tmp / "base", tmp / "adapter"
    shutil.copytree(base0, base)
    shutil.copytree(adapter0, adapter)
    model = CausalLMAdapter(base, adapter, device="cpu")
    build_gradient_store(tmp, rows, tmpl, model, proj_dim=16, shard_rows=8)
    store = GradientStore.load(tmp)
    assert store.manifest["model_dir"] == str(base.resolve())  # paths stay, as information
    # a byte-identical copy elsewhere and a spec meaning the same parameters are accepted
    shutil.copytree(base, tmp / "copy")
    store.check_compatible(CausalLMAdapter(tmp / "copy", adapter, device="cpu",
                                           params="lora-b").identity(), tmpl, rows)
    with pytest.raises(UserError, match="different dtype"):
        bf16 = CausalLMAdapter(base, adapter, device="cpu", dtype="bf16")
        store.check_compatible(bf16.identity(), tmpl, rows)
    with pytest.raises(UserError, match="different parameter set"):
        every_lora = CausalLMAdapter(base, adapter, device="cpu", params="lora")
        store.check_compatible(every_lora.identity(), tmpl, rows)
    weights = adapter / "adapter_model.safetensors"  # retrained in place: same path
    state = load_file(weights)
    save_file({k: v + 0.01 for k, v in state.items()}, weights)
    with pytest.raises(UserError, match="different adapter"):
        store.check_compatible(CausalLMAdapter(base, adapter, device="cpu").identity(), tmpl, rows)


def test_digest_cache_rehashes_only_changed_files(tmp_path, monkeypatch):
    import os
    import time

    from datablame.store import content_digest

    monkeypatch.setenv("DATABLAME_CACHE_DIR", str(tmp_path / "cache"))
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"a" * 1000)
    (d / "README.md").write_text("not hashed")
    calls = []
    real = content_digest.sha256_file
    monkeypatch.setattr(content_digest, "sha256_file", lambda p: calls.append(p.name) or
                        real(p))
    first = content_digest.dir_digest(d)
    assert sorted(calls) == ["config.json", "model.safetensors"]
    calls.clear()
    assert content_digest.dir_digest(d) == first and calls == []  # cached
    (d / "README.md").write_text("edited")
    assert content_digest.dir_digest(d) == first
    st = (d / "model.safetensors").stat()
    time.sleep(0.02)
    (d / "model.safetensors").write_bytes(b"b" * 1000)  # same size, mtime put back
    os.utime(d / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert content_digest.dir_digest(d) != first and calls == ["model.safetensors"]


def test_created_files_honour_the_umask(setup):
    import os
    import stat

    tmp, rows, tmpl, model = setup
    from datablame.store.atomic import atomic_dir, write_json_atomic

    old = os.umask(0o022)
    try:
        with atomic_dir(tmp / "idx") as d:
            write_json_atomic(d / "manifest.json", {})
        build_gradient_store(tmp / "idx", rows, tmpl, model, proj_dim=8, shard_rows=8)
    finally:
        os.umask(old)
    modes = {p.relative_to(tmp).as_posix(): stat.S_IMODE(p.stat().st_mode)
             for p in [tmp / "idx", *(tmp / "idx").rglob("*")]}
    assert modes == {k: 0o755 if (tmp / k).is_dir() else 0o644 for k in modes}, modes


def test_build_names_rows_cut_to_max_length_once(tmp_path, random_lora_model):
    """Issue 9.9: the warning counted per batch ("2 of 27 texts"); it names the rows, once."""
    base, adapter = random_lora_model
    long = {"instruction": "the quick brown fox jumps over the lazy dog again and again",
            "input": "", "output": "hello there friend ."}
    data = [{"instruction": "say hi", "input": "", "output": "hello"}] * 5 + [long] + \
        [{"instruction": "say", "input": "", "output": "hi"}] * 3 + [long]
    rows = load_rows(write_jsonl(tmp_path / "t.jsonl", data))
    model = CausalLMAdapter(base, adapter, device="cpu", max_length=12)
    import warnings as w

    with w.catch_warnings(record=True) as caught:
        w.simplefilter("always")
        build_gradient_store(tmp_path, rows, PromptTemplate(), model, proj_dim=16,
                             shard_rows=4, batch_size=2)
    said = [str(c.message) for c in caught if "max length" in str(c.message)]
    assert said == ["2 of 10 rows (5, 9) are longer than max length 12 tokens: kept the "
                    "answer, cut the prompt's head"]


def test_the_store_imports_no_model():
    """The store stores (issue 10): reading or writing one loads no model code."""
    model_code = ("transformers", "peft", "datablame.models.hf", "datablame.models.torch",
                  "datablame.features.gradients")
    code = ("import sys, datablame.store.gradient_store; "
            f"print(sorted(m for m in sys.modules if m.startswith({model_code!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def test_rebuilding_the_retrieval_index_keeps_the_gradient_store(tmp_path, random_lora_model):
    """Another index type (or embedder) rebuilds the FAISS part in a new directory; the
    gradient store, computed for the same rows, model and template, moves with it."""
    from datablame.store.gradient_store import GradientStore
    from datablame.text import GradientOptions, build_index

    base, adapter = random_lora_model
    data = write_jsonl(tmp_path / "t.jsonl", ROWS)
    build_index(data, tmp_path / "idx", gradients=GradientOptions(base, adapter, proj_dim=64))
    shards = _files(tmp_path / "idx" / "gradients")
    manifest = build_index(data, tmp_path / "idx", index_type="hnsw")
    assert manifest["index_type"] == "hnsw"
    assert _files(tmp_path / "idx" / "gradients") == shards
    GradientStore.load(tmp_path / "idx", verify=True)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".idx.")]


def test_an_index_rebuilt_over_edited_rows_says_its_kept_store_is_stale(
        tmp_path, random_lora_model, monkeypatch, capsys):
    """The store is kept (not ours to delete) but no longer matches the rows: `index`
    says so as it finishes and `status` prints it on stdout, before a trace refuses it."""
    from .test_cli import run_cli

    base, adapter = random_lora_model
    data = write_jsonl(tmp_path / "t.jsonl", ROWS)
    grad = ["--gradients", "--model", base, "--adapter", adapter, "--proj-dim", "16"]
    assert run_cli(monkeypatch, capsys, "index", data, "--out", tmp_path / "idx",
                   *grad)[0] in (0, None)
    code, out, _ = run_cli(monkeypatch, capsys, "status", tmp_path / "idx")
    assert code in (0, None) and "gradient store:" in out and "stale" not in out
    from .test_cli import _assert_one_line_error

    for path, needle in ((tmp_path, "is not a datablame index"),
                         (data, "is a file, not an index directory")):
        _assert_one_line_error(*run_cli(monkeypatch, capsys, "status", path)[::2], needle)
    import fcntl

    starting = tmp_path / "starting"  # a first build, before it has written anything
    starting.mkdir()
    (starting / ".lock").touch()
    with open(starting / ".lock") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        code, out, _ = run_cli(monkeypatch, capsys, "status", starting)
    assert code in (0, None) and "a build holds this index" in out
    edited = [dict(r) for r in ROWS]
    edited[1]["output"] = "an answer nobody trained on"
    write_jsonl(data, edited)
    shards = _files(tmp_path / "idx" / "gradients")
    code, _, err = run_cli(monkeypatch, capsys, "index", data, "--out", tmp_path / "idx")
    assert code in (0, None), err
    assert "kept but built for other training data" in " ".join(err.split())
    assert _files(tmp_path / "idx" / "gradients") == shards
    code, out, err = run_cli(monkeypatch, capsys, "status", tmp_path / "idx")
    assert "stale: built for other training data" in " ".join(out.split()), (out, err)
    write_jsonl(data, edited[:-1])
    run_cli(monkeypatch, capsys, "index", data, "--out", tmp_path / "idx")
    code, out, _ = run_cli(monkeypatch, capsys, "status", tmp_path / "idx", "--json")
    import json as _json

    assert _json.loads(out)["store"]["stale"].startswith(
        f"built for other training data ({len(ROWS)} rows then, {len(ROWS) - 1} now)")


def one_process_store(tmp_path, random_lora_model, monkeypatch, capsys, extra=()):
    """ROWS and a one-process gradient store of them in tmp_path/one (4-row shards, K 64,
    and any `extra` index options): what every executor's store is compared with.
    Returns (train file, the index args)."""
    from .test_cli import run_cli

    base, adapter = random_lora_model
    train = write_jsonl(tmp_path / "t.jsonl", ROWS)
    grad = ["--gradients", "--model", base, "--adapter", adapter, "--shard-rows", "4",
            "--proj-dim", "64", *extra]
    code, _, err = run_cli(monkeypatch, capsys, "index", train, "--out", tmp_path / "one",
                           *grad)
    assert code in (0, None), err
    return train, grad


def test_sharded_workers_then_commit_equal_one_process_byte_for_byte(tmp_path,
                                                                     random_lora_model,
                                                                     monkeypatch, capsys):
    """`index --gradients --shard-of 0/2` and `1/2` (shards of 4 rows, round robin) then
    `--commit` make the store one process makes, file for file, and so does `--workers 2`
    (two processes); the commit refuses while a worker has not run, and a worker refuses
    an index that does not exist."""
    from .test_cli import _assert_one_line_error, run_cli

    train, grad = one_process_store(tmp_path, random_lora_model, monkeypatch, capsys)
    sharded = tmp_path / "sharded"
    code, _, err = run_cli(monkeypatch, capsys, "index", train, "--out", sharded, *grad,
                           "--shard-of", "0/2")
    _assert_one_line_error(code, err, "no retrieval index yet")
    code, _, err = run_cli(monkeypatch, capsys, "index", train, "--out", sharded)
    assert code in (0, None), err
    code, out, err = run_cli(monkeypatch, capsys, "index", train, "--out", sharded, *grad,
                             "--shard-of", "0/2")
    assert code in (0, None), err
    assert "shard(s) of the store still missing" in " ".join((out + err).split())
    code, _, err = run_cli(monkeypatch, capsys, "index", train, "--out", sharded, *grad,
                           "--commit")
    _assert_one_line_error(code, err, "gradient shards are not written yet (shard 1")
    # a worker of other options never discards the shards another worker finished
    other = [*grad[:-1], "32"]  # --proj-dim 32 instead of 64
    code, _, err = run_cli(monkeypatch, capsys, "index", train, "--out", sharded, *other,
                           "--shard-of", "1/2")
    _assert_one_line_error(code, err, "holds 2 finished shard(s) of a build with other "
                                      "options (proj_dim: 64 -> 32")
    code, _, err = run_cli(monkeypatch, capsys, "index", train, "--out", sharded, *other,
                           "--commit")
    _assert_one_line_error(code, err, "its shards were built with proj_dim: 64 -> 32")
    code, out, err = run_cli(monkeypatch, capsys, "status", sharded)
    assert code in (0, None), err
    assert "build in progress: 2/4 shards" in out and "missing: 2 shard(s): 1, 3" in out
    assert not (sharded / "gradients").exists()
    code, out, err = run_cli(monkeypatch, capsys, "index", train, "--out", sharded, *grad,
                             "--shard-of", "1/2")
    assert code in (0, None), err
    assert "--commit instead of --shard-of" in " ".join((out + err).split())
    code, out, err = run_cli(monkeypatch, capsys, "index", train, "--out", sharded, *grad,
                             "--commit")
    assert code in (0, None), err
    n_shards = -(-len(ROWS) // 4)
    assert f"committed {n_shards} gradient shards" in out + err
    assert _files(sharded / "gradients") == _files(tmp_path / "one" / "gradients")
    # --workers 2: the same two workers as processes, and the commit, in one command
    code, _, err = run_cli(monkeypatch, capsys, "index", train, "--out", tmp_path / "two",
                           *grad, "--workers", "2")
    assert code in (0, None), err
    assert _files(tmp_path / "two" / "gradients") == _files(tmp_path / "one" / "gradients")
    for bad, needle in (("2/2", "I must be in 0..N-1"), ("x", "expects I/N")):
        code, _, err = run_cli(monkeypatch, capsys, "index", train, "--out", sharded, *grad,
                               "--shard-of", bad)
        _assert_one_line_error(code, err, needle)


def test_commit_merges_sidecars_and_refuses_what_they_do_not_vouch_for(setup):
    """The commit reads sidecars, headers and norms, not the shards' data: a shard whose
    sidecar is missing, from another plan, or whose file is truncated does not count as
    written, and the commit refuses naming it (one line); after a rerun the store equals
    one process's, without sidecars left."""
    import json as _json

    tmp, rows, tmpl, model = setup
    kw = dict(proj_dim=16, shard_rows=4, batch_size=3)
    build_gradient_store(tmp / "one", rows, tmpl, model, **kw)
    for i in range(2):
        out = build_gradient_store(tmp / "two", rows, tmpl, model, shard_of=(i, 2), **kw)
    assert out["missing"] == []
    partial = tmp / "two" / "gradients.partial"

    def refused(shard: int) -> None:
        with pytest.raises(UserError, match=rf"not written yet \(shard {shard}\)"):
            build_gradient_store(tmp / "two", rows, tmpl, model, commit_only=True, **kw)

    side = partial / "shard-00001.json"
    saved = side.read_text()
    side.unlink()
    refused(1)
    side.write_text(_json.dumps({**_json.loads(saved), "plan": "0" * 64}))
    refused(1)
    side.write_text(saved)
    shard = partial / "shard-00002.npy"
    data = shard.read_bytes()
    shard.write_bytes(data[:-8])
    refused(2)
    from datablame.store.gradient_store import build_status

    status = build_status(tmp / "two")["build"]
    assert (status["done"], status["missing"], status["damaged"]) == (3, [], [2])
    assert status["rows_done"] == len(rows) - 4 and "store" not in build_status(tmp / "two")
    assert build_gradient_store(tmp / "two", rows, tmpl, model, shard_of=(0, 2),
                                **kw)["written"] == 1  # the worker redoes shard 2 only
    build_gradient_store(tmp / "two", rows, tmpl, model, commit_only=True, **kw)
    assert _files(tmp / "two" / "gradients") == _files(tmp / "one" / "gradients")
    assert sorted(p.name for p in (tmp / "two" / "gradients").glob("*.json")) == \
        ["manifest.json"]
    assert build_status(tmp / "two")["store"]["rows"] == len(rows)
    assert "build" not in build_status(tmp / "two")


def test_a_rebuild_never_deletes_files_it_did_not_write(setup):
    """A rebuild swaps INDEX/gradients out whole: a user's notes or folder inside it, or a
    gradients directory that is not a store, are refused in one line and left as they
    were; the store itself is untouched."""
    tmp, rows, tmpl, model = setup
    build_gradient_store(tmp, rows, tmpl, model, proj_dim=16, shard_rows=8)
    final = tmp / "gradients"
    before = {p.name: p.read_bytes() for p in final.iterdir()}
    (final / "NOTES.txt").write_text("mine")
    (final / "backup").mkdir()
    (final / "backup" / "README-mine.txt").write_text("mine too")
    with pytest.raises(UserError, match=r"holds files datablame did not write \(NOTES.txt, "
                                        r"backup/\)"):
        build_gradient_store(tmp, rows, tmpl, model, proj_dim=32, shard_rows=8)
    assert (final / "NOTES.txt").read_text() == "mine"
    assert (final / "backup" / "README-mine.txt").read_text() == "mine too"
    assert all((final / name).read_bytes() == data for name, data in before.items())
    other = tmp / "other"
    (other / "gradients").mkdir(parents=True)
    (other / "gradients" / "manifest.json").write_text("{}")
    (other / "gradients" / "thesis.txt").write_text("mine")
    with pytest.raises(UserError, match="did not write"):
        build_gradient_store(other, rows, tmpl, model, proj_dim=16, shard_rows=8)
    (other / "gradients" / "manifest.json").unlink()
    with pytest.raises(UserError, match="did not write"):
        build_gradient_store(other, rows, tmpl, model, proj_dim=16, shard_rows=8)
    assert (other / "gradients" / "thesis.txt").read_text() == "mine"
