"""A gradient store of both vectors (`index --gradients --curvature both`, what `auto`, the
default, builds where the curvature is cheap): each row keeps its plain and its whitened
projection side by side, each of unit length, and every trace path scores a query by
(1 - m) x plain cosine + m x whitened cosine, m picked per query from its largest |plain
cosine| (`fusion.mix_weight`), against ground truth computed here independently."""

import numpy as np
import pytest

from datablame.data.rows import load_rows
from datablame.data.template import PromptTemplate
from datablame.errors import UserError
from datablame.features.gradients import build_gradient_store
from datablame.methods import fusion
from datablame.models.hf_causal_lm import CausalLMAdapter
from datablame.store.gradient_store import GradientStore

from .conftest import write_jsonl
from .test_gradient_store import ROWS
from .test_whitened_store import _independent_ekfac


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_mix_weight_switches_at_the_regime_cosine():
    assert fusion.mix_weight(fusion.REGIME_COSINE) == fusion.MIX_WHITENED == 0.75
    assert fusion.mix_weight(fusion.REGIME_COSINE - 1e-9) == 0.0


def test_stored_rows_are_the_unit_plain_and_whitened_projections(tmp_path, random_lora_model):
    base, adapter = random_lora_model
    rows, tmpl = load_rows(write_jsonl(tmp_path / "t.jsonl", ROWS)), PromptTemplate()
    model = CausalLMAdapter(base, adapter)
    manifest = build_gradient_store(tmp_path, rows, tmpl, model, proj_dim=64, shard_rows=4,
                                    batch_size=3, projection="rademacher", curvature="auto")
    assert manifest["curvature"]["vectors"] == "both"
    store = GradientStore.load(tmp_path)
    assert store.holds_both
    stored = np.concatenate([np.load(tmp_path / "gradients" / s["file"])
                             for s in store.manifest["shards"]]).astype(np.float64)
    grads = model.gradients([tmpl.format(r) for r in rows.records]).astype(np.float64)
    whitened = _independent_ekfac(model, rows, tmpl).whiten(grads).numpy()
    want = np.hstack([_unit(store.projector.project(grads)),
                      _unit(store.projector.project(whitened))])
    assert stored.shape == (len(ROWS), 128)
    assert np.abs(stored - want).max() < 2e-3  # fp16 storage, float32 curvature


@pytest.mark.parametrize("regime", ["mixed", "plain"])
def test_every_trace_path_scores_the_regimes_mix(tmp_path, random_lora_model, monkeypatch,
                                                 regime):
    """The scan (projected), a queries file, the exact re-rank, the candidate path, a group
    and per-word shares all score (1 - m) plain + m whitened cosine, m = 0.75 where the
    query's best |plain cosine| reaches the regime cosine and 0 (the plain cosine, the
    default key) below it; the fused key takes that regime's bonuses."""
    from datablame.text import GradientOptions, Query, Tracer, build_index

    # a random model's cosines sit anywhere: put the threshold where each regime is certain
    monkeypatch.setattr(fusion, "REGIME_COSINE", -1.0 if regime == "mixed" else 2.0)
    m = 0.75 if regime == "mixed" else 0.0
    base, adapter = random_lora_model
    train = write_jsonl(tmp_path / "t.jsonl", ROWS)
    build_index(train, tmp_path / "idx", gradients=GradientOptions(base, adapter, proj_dim=256,
                                                                   shard_rows=4))
    tracer = Tracer(tmp_path / "idx", base, adapter)
    assert tracer.holds_both()
    query = Query("hello there friend .", {"instruction": "say hello", "input": ""})
    rows, tmpl = load_rows(train), PromptTemplate()
    ek = _independent_ekfac(tracer.model, rows, tmpl)
    texts = [query.formatted(tmpl)] + [tmpl.format(r) for r in rows.records]
    grads = tracer.model.gradients(texts).astype(np.float64)
    whitened = ek.whiten(grads).numpy()
    plain_cos, white_cos = (_unit(g)[1:] @ _unit(g)[0] for g in (grads, whitened))
    want = (1 - m) * plain_cos + m * white_cos
    assert np.abs(plain_cos - white_cos).max() > 0.05  # the two regimes differ here
    store = GradientStore.load(tmp_path / "idx")
    p, w = (_unit(store.projector.project(g)) for g in (grads, whitened))
    projected = (1 - m) * (p[1:] @ p[0]) + m * (w[1:] @ w[0])
    scan = tracer.run(query, all_rows=True, top_k=len(ROWS), rerank=0)
    got = scan.set_index("row")["score"].sort_index().to_numpy()
    np.testing.assert_allclose(got, projected, atol=5e-3)
    assert np.abs(got - want).max() > 1e-3  # projected, not exact: the store was read
    assert scan.attrs["whitened_weight"] == m
    signed = tracer.run(query, all_rows=True, top_k=len(ROWS), rerank=0, rank_by="gradient")
    assert list(signed["score"]) == sorted(got, reverse=True)  # its list, signed order
    tracer.scan_store_for([query], top_k=len(ROWS), rerank=0)
    batched = tracer.run(query, all_rows=True, top_k=len(ROWS), rerank=0)
    np.testing.assert_allclose(batched.set_index("row")["score"].sort_index(), got,
                               atol=1e-6)
    bonuses = (fusion.RETRIEVAL_BONUS_MIX, fusion.STRENGTH_BONUS_MIX) if m else \
        (fusion.RETRIEVAL_BONUS, fusion.STRENGTH_BONUS)
    for df in (tracer.run(query, all_rows=True, top_k=len(ROWS), rerank=len(ROWS)),
               tracer.run(query, top_k=len(ROWS))):
        np.testing.assert_allclose(df.set_index("row")["score"].sort_index(), want,
                                   atol=1e-4)
        assert ("0.25 plain + 0.75 after EK-FAC" if m else "plain (best |cosine|") in \
            df.attrs["method"]
        np.testing.assert_allclose(
            df["fused"], df["score"] + bonuses[0] / (1 + df["retrieval_rank"].to_numpy())
            + bonuses[1] / (1 + df["gradient_rank"].to_numpy()))
    group = tracer.trace_group([query], top_k=len(ROWS), all_rows=True, rerank=len(ROWS))
    np.testing.assert_allclose(group.set_index("row")["score"].sort_index(), want, atol=1e-4)
    # per-word shares of a row's score add up to it, both ways round
    shares = tracer.word_shares(df, 3)
    for r, score in zip(df["row"][:3], df["score"][:3], strict=True):
        assert sum(shares["answer"]["shares"][str(r)]) == pytest.approx(score, abs=1e-5)
        assert sum(shares["rows"][str(r)]["shares"]) == pytest.approx(score, abs=1e-5)
        assert shares["scores"][str(r)] == pytest.approx(score, abs=1e-5)


def test_dot_alignment_is_refused_on_a_store_of_unit_vectors(tmp_path, random_lora_model):
    from datablame.text import GradientOptions, Query, Tracer, build_index

    base, adapter = random_lora_model
    train = write_jsonl(tmp_path / "t.jsonl", ROWS)
    build_index(train, tmp_path / "idx", gradients=GradientOptions(base, adapter, proj_dim=32,
                                                                   shard_rows=8))
    tracer = Tracer(tmp_path / "idx", base, adapter)
    query = Query("hello there friend .", {"instruction": "say hello", "input": ""})
    for all_rows in (True, False):
        with pytest.raises(UserError, match="scores cosines; drop --alignment dot"):
            tracer.run(query, all_rows=all_rows, alignment="dot")


def test_one_query_gets_one_regime_on_every_path(tmp_path, random_lora_model, monkeypatch):
    """The regime comes from the store (the best projected |plain cosine| over every row)
    on every path, even where the exact best differs: the threshold is put between them.
    Two queries in two regimes: a queries file's three-column pass, the retrieval-only rows
    (`score_rows`), and a group trace's per-query mixes agree with ground truth."""
    from datablame.text import GradientOptions, Query, Tracer, build_index

    base, adapter = random_lora_model
    train = write_jsonl(tmp_path / "t.jsonl", ROWS)
    build_index(train, tmp_path / "idx", gradients=GradientOptions(base, adapter, proj_dim=64,
                                                                   shard_rows=4))
    tracer = Tracer(tmp_path / "idx", base, adapter)
    store = GradientStore.load(tmp_path / "idx")
    rows, tmpl = load_rows(train), PromptTemplate()
    ek = _independent_ekfac(tracer.model, rows, tmpl)
    queries = [Query("quick brown fox again .", {"instruction": "say a thing", "input": ""}),
               Query("the cat sat on the mat .", {"instruction": "a cat", "input": ""})]
    truth = []
    for q in queries:
        texts = [q.formatted(tmpl)] + [tmpl.format(r) for r in rows.records]
        grads = tracer.model.gradients(texts).astype(np.float64)
        whitened = ek.whiten(grads).numpy()
        p, w = (_unit(store.projector.project(g)) for g in (grads, whitened))
        exact = [_unit(g)[1:] @ _unit(g)[0] for g in (grads, whitened)]
        truth.append({"best": float(np.abs(p[1:] @ p[0]).max()),
                      "exact best": float(np.abs(exact[0]).max()),
                      "projected": (p[1:] @ p[0], w[1:] @ w[0]), "exact": exact})
    first = truth[0]
    assert abs(first["best"] - first["exact best"]) > 1e-4  # K = 64: they differ
    monkeypatch.setattr(fusion, "REGIME_COSINE", (first["best"] + first["exact best"]) / 2)
    m = fusion.mix_weight(first["best"])
    for df in (tracer.run(queries[0], all_rows=True, top_k=len(ROWS)),
               tracer.run(queries[0], top_k=len(ROWS))):
        assert df.attrs["whitened_weight"] == m
        plain, white = first["exact"]
        np.testing.assert_allclose(df.set_index("row")["score"].sort_index(),
                                   (1 - m) * plain + m * white, atol=1e-4)
    # now one query on each side of the threshold
    monkeypatch.setattr(fusion, "REGIME_COSINE", (truth[0]["best"] + truth[1]["best"]) / 2)
    weights = [fusion.mix_weight(t["best"]) for t in truth]
    assert sorted(weights) == [0.0, 0.75]
    alone = [tracer.trace_all_rows(q, top_k=3, rerank=0, pool=3) for q in queries]
    tracer.scan_store_for(queries, top_k=3, rerank=0, pool=3)  # three columns per query
    for q, t, m, one in zip(queries, truth, weights, alone, strict=True):
        df = tracer.trace_all_rows(q, top_k=3, rerank=0, pool=3)
        assert df.attrs["whitened_weight"] == one.attrs["whitened_weight"] == m
        assert list(df["row"]) == list(one["row"])
        plain, white = t["projected"]  # retrieval-only rows included (`score_rows`)
        np.testing.assert_allclose(df["score"], ((1 - m) * plain + m * white)[df["row"]],
                                   atol=5e-3)
        np.testing.assert_allclose(df["score"], one["score"], atol=1e-6)
    assert any((df["gradient_rank"] > 3).any() for df in alone)  # found by retrieval only
    group = tracer.trace_group(queries, top_k=len(ROWS), all_rows=True, rerank=len(ROWS))
    want = np.mean([(1 - m) * t["exact"][0] + m * t["exact"][1]
                    for t, m in zip(truth, weights, strict=True)], axis=0)
    np.testing.assert_allclose(group.set_index("row")["score"].sort_index(), want, atol=1e-4)


def test_damaged_rows_are_refused_without_checksums(tmp_path, random_lora_model):
    """Scores of unit halves are bounded by the query's halves: rows scaled in place (same
    size, no checksum read) are refused by the scan and by `score_rows`."""
    from datablame.features.curvature import query_vector

    base, adapter = random_lora_model
    rows, tmpl = load_rows(write_jsonl(tmp_path / "t.jsonl", ROWS)), PromptTemplate()
    model = CausalLMAdapter(base, adapter)
    build_gradient_store(tmp_path, rows, tmpl, model, proj_dim=16, shard_rows=8,
                         curvature="both")
    store = GradientStore.load(tmp_path, verify=False)
    g = model.gradients([tmpl.format(rows.records[0])])
    q = query_vector(store.projector.project(g),
                     store.projector.project(store.curvature.whiten(g).numpy()), 0.75)[0]
    assert np.abs(store.top_k(q, 3, "dot")[1]).max() <= 1.0 + 1e-3  # intact
    shard = tmp_path / "gradients" / "shard-00000.npy"
    np.save(shard, np.load(shard) * 50)
    with pytest.raises(UserError, match="is damaged"):
        GradientStore.load(tmp_path, verify=False).top_k(q, 3, "dot")
    with pytest.raises(UserError, match="is damaged"):
        GradientStore.load(tmp_path, verify=False).score_rows(q, np.arange(3), "dot")
