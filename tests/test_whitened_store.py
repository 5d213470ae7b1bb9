"""A gradient store whitened by EK-FAC (`index --gradients --curvature ekfac`): its vectors
are the projection of H^-1/2 g, its workers share one curvature fit, and a trace through
it scores the whitened cosine an EK-FAC fitted independently gives."""

import json

import numpy as np
import pytest

from datablame.data.rows import load_rows
from datablame.data.template import PromptTemplate
from datablame.errors import UserError
from datablame.features import curvature as curvature_mod
from datablame.features.gradients import build_gradient_store
from datablame.methods.ekfac import EKFAC
from datablame.models.hf_causal_lm import CausalLMAdapter
from datablame.models.text_rows import TextRowsAdapter
from datablame.store.gradient_store import GradientStore

from .conftest import write_jsonl
from .test_gradient_store import ROWS, _files

KW = dict(proj_dim=64, shard_rows=4, batch_size=3, projection="rademacher",
          curvature="ekfac")


@pytest.fixture()
def setup(tmp_path, random_lora_model):
    base, adapter = random_lora_model
    rows = load_rows(write_jsonl(tmp_path / "t.jsonl", ROWS))
    tmpl = PromptTemplate()
    return tmp_path, rows, tmpl, CausalLMAdapter(base, adapter)


def _independent_ekfac(model, rows, tmpl) -> EKFAC:
    """The EK-FAC `--method ekfac` fits on every row, with the store's options."""
    plan = curvature_mod.curvature_plan("ekfac", len(rows), 0, model)
    ek = EKFAC(samples=plan["draws_per_row"], seed=0)
    ek.fit_curvature(TextRowsAdapter(model, 8), [tmpl.format(r) for r in rows.records])
    return ek


def test_stored_vectors_are_the_projected_whitened_gradients(setup):
    tmp, rows, tmpl, model = setup
    manifest = build_gradient_store(tmp, rows, tmpl, model, **KW)
    assert manifest["curvature"]["kind"] == "ekfac"
    assert manifest["curvature"]["rows"] == len(rows)
    store = GradientStore.load(tmp)
    texts = [tmpl.format(r) for r in rows.records]
    grads = model.gradients(texts, batch_size=8).astype(np.float64)
    ek = _independent_ekfac(model, rows, tmpl)
    whitened = ek.whiten(grads).numpy()
    # whitening is H^-1/2: the dot products of whitened gradients are g_a^T H^-1 g_b
    np.testing.assert_allclose(whitened @ whitened.T, ek.solve(grads).numpy() @ grads.T,
                               rtol=1e-6, atol=1e-9 * np.abs(whitened @ whitened.T).max())
    stored = np.concatenate([np.load(tmp / "gradients" / s["file"])
                             for s in store.manifest["shards"]]).astype(np.float64)
    want = store.projector.project(whitened)
    scale = np.abs(want).max()
    assert np.abs(stored - want).max() < 2e-3 * scale  # fp16 storage, float32 curvature
    plain = store.projector.project(grads)
    assert np.abs(stored - plain).max() > 0.1 * scale  # it is not the plain store
    # a query is whitened with the store's own (saved) curvature
    np.testing.assert_allclose(store.whiten(grads[:2]), whitened[:2], rtol=1e-4,
                               atol=1e-5 * np.abs(whitened).max())


def test_sharded_workers_share_one_fit_and_equal_one_process(setup, monkeypatch):
    """Two --shard-of workers (one after the other, in one process: the plan lock itself
    is not exercised here) fit the curvature once, the second reading the first's file,
    and commit to the one-process store file for file. Once the curvature file holds
    another fit, every shard counts as not written (its sidecar names the old fit) and the
    commit refuses; with the fit restored, it commits."""
    tmp, rows, tmpl, model = setup
    build_gradient_store(tmp / "one", rows, tmpl, model, **KW)
    fits = []
    real_fit = curvature_mod.fit_curvature

    def counted(*args):
        fits.append(1)
        return real_fit(*args)

    monkeypatch.setattr("datablame.features.gradients.fit_curvature", counted)
    for i in range(2):
        build_gradient_store(tmp / "two", rows, tmpl, model, shard_of=(i, 2), **KW)
    assert len(fits) == 1
    partial = tmp / "two" / "gradients.partial"
    sha = json.loads((partial / "shard-00000.json").read_text())["curvature"]
    assert len(sha) == 64
    # another fit replaces the file: every shard now stands on another curvature
    saved = (partial / "curvature.npz").read_bytes()
    other = EKFAC.from_curvature_arrays(dict(np.load(partial / "curvature.npz")))
    other.blocks = [(*b[:5], b[5] * 2) for b in other.blocks]
    curvature_mod.save_curvature(other, partial / "curvature.npz")
    with pytest.raises(UserError, match="not written yet"):
        build_gradient_store(tmp / "two", rows, tmpl, model, commit_only=True, **KW)
    (partial / "curvature.npz").write_bytes(saved)
    build_gradient_store(tmp / "two", rows, tmpl, model, commit_only=True, **KW)
    assert _files(tmp / "two" / "gradients") == _files(tmp / "one" / "gradients")
    assert "curvature.npz" in _files(tmp / "one" / "gradients")


def test_an_altered_curvature_file_is_refused(setup):
    tmp, rows, tmpl, model = setup
    build_gradient_store(tmp, rows, tmpl, model, **KW)
    f = tmp / "gradients" / "curvature.npz"
    saved = f.read_bytes()
    data = bytearray(saved)
    data[len(data) // 2] ^= 1
    f.write_bytes(bytes(data))
    with pytest.raises(UserError, match="curvature.npz is missing, truncated or altered"):
        GradientStore.load(tmp)  # checksummed
    unchecked = GradientStore.load(tmp, verify=False)  # size only: read, and refused
    with pytest.raises(UserError, match="curvature.npz cannot be read"):
        unchecked.whiten(np.ones((1, unchecked.manifest["num_params"]), dtype=np.float32))
    f.write_bytes(saved[:-10])
    with pytest.raises(UserError, match="curvature.npz is missing, truncated or altered"):
        GradientStore.load(tmp, verify=False)


def test_a_model_without_kronecker_factors_is_refused_before_any_shard(setup,
                                                                       random_lora_model):
    tmp, rows, tmpl, _ = setup
    base, adapter = random_lora_model
    full = CausalLMAdapter(base, adapter, params="all")  # embeddings too: no K-FAC
    with pytest.raises(UserError, match="--curvature ekfac needs LoRA weights"):
        build_gradient_store(tmp, rows, tmpl, full, **KW)
    assert not (tmp / "gradients.partial").exists()


def test_a_trace_through_a_whitened_store_scores_whitened_cosines(tmp_path,
                                                                  random_lora_model):
    """--all-rows (scan, exact re-rank) and the candidate path both score the cosine of
    whitened gradients, equal to an independently fitted EK-FAC's; the fused key weighs
    retrieval by the whitened bonus; the method says what was compared."""
    from datablame.methods.fusion import RETRIEVAL_BONUS_WHITENED, STRENGTH_BONUS_WHITENED
    from datablame.text import GradientOptions, Query, Tracer, build_index

    base, adapter = random_lora_model
    train = write_jsonl(tmp_path / "t.jsonl", ROWS)
    build_index(train, tmp_path / "idx", gradients=GradientOptions(
        base, adapter, proj_dim=256, shard_rows=4, curvature="ekfac"))
    tracer = Tracer(tmp_path / "idx", base, adapter)
    query = Query("hello there friend .", {"instruction": "say hello", "input": ""})
    rows, tmpl = load_rows(train), PromptTemplate()
    ek = _independent_ekfac(tracer.model, rows, tmpl)
    texts = [query.formatted(tmpl)] + [tmpl.format(r) for r in rows.records]
    w = ek.whiten(tracer.model.gradients(texts).astype(np.float64)).numpy()
    w /= np.linalg.norm(w, axis=1, keepdims=True)
    want = w[1:] @ w[0]
    # the store alone (no exact re-rank): the projected whitened cosine, fp16-stored
    store = GradientStore.load(tmp_path / "idx")
    p = store.projector.project(ek.whiten(tracer.model.gradients(texts)
                                          .astype(np.float64)).numpy())
    p /= np.linalg.norm(p, axis=1, keepdims=True)
    scan = tracer.run(query, all_rows=True, top_k=len(ROWS), rerank=0)
    got = scan.set_index("row")["score"].sort_index().to_numpy()
    np.testing.assert_allclose(got, p[1:] @ p[0], atol=5e-3)
    assert np.abs(got - want).max() > 1e-3  # projected, not exact: the store was read
    # a queries file reads the store once for all its lines: the same as alone
    tracer.scan_store_for([query], top_k=len(ROWS), rerank=0)
    batched = tracer.run(query, all_rows=True, top_k=len(ROWS), rerank=0)
    np.testing.assert_allclose(batched.set_index("row")["score"].sort_index(), got,
                               atol=1e-6)
    group = tracer.trace_group([query], top_k=len(ROWS), all_rows=True, rerank=len(ROWS))
    np.testing.assert_allclose(group.set_index("row")["score"].sort_index(), want, atol=1e-4)
    assert "after EK-FAC curvature" in group.attrs["method"]
    for df in (tracer.run(query, all_rows=True, top_k=len(ROWS), rerank=len(ROWS)),
               tracer.run(query, top_k=len(ROWS))):
        got = df.set_index("row")["score"].sort_index().to_numpy()
        np.testing.assert_allclose(got, want, atol=1e-4)
        assert "after EK-FAC curvature" in df.attrs["method"]
        assert df.attrs["whitened_weight"] == 1.0  # --json says the score is whitened
        ret_rank = df["retrieval_rank"].to_numpy()
        grad_rank = df["gradient_rank"].to_numpy()
        np.testing.assert_allclose(
            df["fused"], df["score"] + RETRIEVAL_BONUS_WHITENED / (1 + ret_rank)
            + STRENGTH_BONUS_WHITENED / (1 + grad_rank))


def test_curvature_options_are_refused_in_one_line_before_any_work(tmp_path, monkeypatch,
                                                                   capsys, random_lora_model):
    from .test_cli import _assert_one_line_error, run_cli

    base, adapter = random_lora_model
    train = write_jsonl(tmp_path / "t.jsonl", ROWS)
    code, _, err = run_cli(monkeypatch, capsys, "index", train, "--out", tmp_path / "a",
                           "--curvature", "ekfac")
    _assert_one_line_error(code, err, "--curvature whitens the gradient store: add "
                                      "--gradients")
    code, _, err = run_cli(monkeypatch, capsys, "index", train, "--out", tmp_path / "b",
                           "--gradients", "--model", base, "--adapter", adapter,
                           "--curvature", "kfac")
    _assert_one_line_error(code, err, "unknown curvature 'kfac' (use auto, none, ekfac, both)")
    code, _, err = run_cli(monkeypatch, capsys, "index", train, "--out", tmp_path / "c",
                           "--gradients", "--model", base, "--adapter", adapter,
                           "--params", "all", "--curvature", "ekfac")
    _assert_one_line_error(code, err, "--curvature ekfac needs LoRA weights")
    assert not any((tmp_path / d).exists() for d in "abc")  # before any embedding


def test_a_damaged_curvature_is_refused_even_without_checksums(tmp_path, random_lora_model):
    """`--no-checksum` skips the curvature's sha256, not the curvature: a damaged file is
    refused when the trace reads it, never replaced by plain (unwhitened) query
    gradients against whitened rows."""
    from datablame.text import GradientOptions, Query, Tracer, build_index

    base, adapter = random_lora_model
    train = write_jsonl(tmp_path / "t.jsonl", ROWS)
    build_index(train, tmp_path / "idx", gradients=GradientOptions(
        base, adapter, proj_dim=64, shard_rows=4, curvature="ekfac"))
    f = tmp_path / "idx" / "gradients" / "curvature.npz"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 1
    f.write_bytes(bytes(data))
    query = Query("hello there friend .", {"instruction": "say hello", "input": ""})
    with pytest.raises(UserError, match="curvature.npz cannot be read"):
        Tracer(tmp_path / "idx", base, adapter).run(query, all_rows=True, checksum=False)
    with pytest.raises(UserError, match="curvature.npz cannot be read"):
        Tracer(tmp_path / "idx", base, adapter).run(query)  # the candidate path too


def test_an_empty_curvature_file_in_a_partial_build_is_fitted_again(setup):
    tmp, rows, tmpl, model = setup
    with pytest.raises(KeyboardInterrupt):
        build_gradient_store(tmp / "a", rows, tmpl, model, stop_after_shards=1, **KW)
    (tmp / "a" / "gradients.partial" / "curvature.npz").write_bytes(b"")
    build_gradient_store(tmp / "a", rows, tmpl, model, **KW)
    build_gradient_store(tmp / "b", rows, tmpl, model, **KW)
    assert _files(tmp / "a" / "gradients") == _files(tmp / "b" / "gradients")


def test_auto_whitens_only_while_the_curvature_is_cheap(setup, monkeypatch, capsys):
    """`--curvature auto` fits EK-FAC while the eigenbases are small (the size written is
    the size predicted) and builds a plain store, with a note, when they would not be;
    `ekfac` whitens whatever the size."""
    from datablame import progress

    tmp, rows, tmpl, model = setup
    size, flops = curvature_mod.curvature_cost(model)
    manifest = build_gradient_store(tmp, rows, tmpl, model, **{**KW, "curvature": "auto"})
    assert manifest["curvature"]["kind"] == "ekfac"
    with np.load(tmp / "gradients" / curvature_mod.CURVATURE_FILE) as arrays:
        written = sum(arrays[k].nbytes for k in arrays.files if not k.endswith(
            ("names", "layout")))
    assert written == size
    monkeypatch.setattr(curvature_mod, "AUTO_LIMIT_BYTES", size - 1)
    progress.enable_notes(True)
    try:
        assert curvature_mod.curvature_plan("auto", len(rows), 0, model) is None
    finally:
        progress.enable_notes(False)
    note = " ".join(capsys.readouterr().err.split())
    assert f"~{flops / 1e9:.0f} GFLOP per row" in note and "building a plain store" in note
    assert curvature_mod.curvature_plan("ekfac", len(rows), 0, model)["kind"] == "ekfac"
