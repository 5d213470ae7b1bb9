"""Projection and whitening where the gradients are: a store build hands each batch's
(b, d) gradients to the projector on the device they were computed on, and only the
(b, K) projections come back to the host. No GPU here, so the device path is checked on
the CPU against the host path (same numbers), and on torch's `meta` device, where any hop
through the host or numpy raises."""

import numpy as np
import pytest
import torch

from datablame.data.rows import load_rows
from datablame.data.template import PromptTemplate
from datablame.features import projection as projection_mod
from datablame.features.gradients import build_gradient_store
from datablame.features.projection import make_projector
from datablame.models.hf_causal_lm import CausalLMAdapter
from datablame.store.gradient_store import GradientStore

from .conftest import write_jsonl
from .test_gradient_store import ROWS
from .test_gradients import _examples
from .test_whitened_store import _independent_ekfac


def _watch_host_copies(monkeypatch) -> list[tuple[int, int]]:
    """(rows, width) of every 2-D tensor copied to the host (`.cpu()`) or made a numpy
    array (`.numpy()`) from now on in this test."""
    copies: list[tuple[int, int]] = []

    def spy(real):
        def call(self, *args, **kwargs):
            if self.dim() == 2:
                copies.append(tuple(self.shape))
            return real(self, *args, **kwargs)
        return call

    monkeypatch.setattr(torch.Tensor, "cpu", spy(torch.Tensor.cpu))
    monkeypatch.setattr(torch.Tensor, "numpy", spy(torch.Tensor.numpy))
    return copies


@pytest.mark.parametrize("strategy", ["hooks", "vmap", "loop"])
def test_a_reduced_gradient_is_the_reduction_of_the_full_one(random_lora_model, strategy):
    base, adapter = random_lora_model
    model = CausalLMAdapter(base, adapter, device="cpu")
    projector = make_projector("countsketch", model.num_params, 32, seed=3)
    full = model.gradients(_examples(), batch_size=3, strategy=strategy)
    seen = []

    def reduce(grads: torch.Tensor) -> torch.Tensor:
        seen.append((type(grads), grads.shape[1]))
        return projector.project_tensor(grads)

    reduced = model.gradients(_examples(), batch_size=3, strategy=strategy, reduce=reduce)
    assert reduced.shape == (len(_examples()), 32)  # only K numbers per row came back
    np.testing.assert_array_equal(reduced, projector.project(full))  # the same numbers
    assert seen and all(kind is torch.Tensor and d == model.num_params for kind, d in seen)
    empty = model.gradients([], reduce=projector.project_tensor)
    assert empty.shape == (0, 32) and empty.dtype == reduced.dtype == np.float32


@pytest.mark.parametrize("kind", ["countsketch", "rademacher"])
def test_a_projector_runs_on_the_device_of_its_input(kind):
    """On `meta` every op must stay on the device (a copy to the host would raise).
    Blocks are kept per device."""
    projector = make_projector(kind, 70_000, 16, seed=1, block=1 << 15)
    g = torch.randn(3, 70_000)
    projector.project(g)  # fills the CPU's blocks
    on_meta = projector.project_tensor(g.to("meta"))
    assert on_meta.device.type == "meta" and on_meta.shape == (3, 16)
    assert {device for _, device in projector._cache} == {"cpu", "meta"}
    for b in range(3):  # the map is drawn on the CPU: the same map on every device
        cpu, meta = (projector._cache[(b, d)] for d in ("cpu", "meta"))
        cpu, meta = (x if isinstance(x, tuple) else (x,) for x in (cpu, meta))
        assert [t.shape for t in cpu] == [t.shape for t in meta]
        assert all(t.device.type == "meta" for t in meta)


def test_the_sort_based_sketch_add_is_the_same_sum():
    """On CUDA the CountSketch adds through index_put_ with accumulate, which torch always
    runs as a sort there (the same bytes every run; index_add_ adds with atomics). Only
    the sum can be checked on a CPU: both ways give it to float rounding. (On the CPU
    index_put_ accumulates in parallel, in a varying order: the CPU keeps index_add_.)"""
    torch.manual_seed(0)
    values = torch.randn(4, 50_000)
    buckets = torch.randint(0, 64, (50_000,))
    want = np.zeros((4, 64))
    for j, b in enumerate(buckets.tolist()):
        want[:, b] += values[:, j].double().numpy()
    for sort_based in (False, True):
        out = torch.zeros(4, 64)
        projection_mod.sketch_add(out, buckets, values, sort_based=sort_based)
        np.testing.assert_allclose(out.numpy(), want, rtol=1e-5, atol=1e-4)


def test_no_batch_of_whole_gradients_reaches_the_host(random_lora_model, monkeypatch):
    """With a `reduce`, nothing d numbers wide is copied to the host or made a numpy
    array, on any path (hooks, vmap, loop): only the (b, K) projections are."""
    base, adapter = random_lora_model
    model = CausalLMAdapter(base, adapter, device="cpu")
    projector = make_projector("countsketch", model.num_params, 16, seed=0)
    copies = _watch_host_copies(monkeypatch)
    for strategy in ("hooks", "vmap", "loop"):
        copies.clear()
        model.gradients(_examples(), batch_size=4, strategy=strategy,
                        reduce=projector.project_tensor)
        widths = [width for _, width in copies]
        assert widths and model.num_params not in widths, (strategy, widths)
    copies.clear()
    model.gradients(_examples()[:1], strategy="vmap")  # the spy sees a whole gradient
    assert model.num_params in [width for _, width in copies]


def test_whitening_runs_on_the_device_of_its_input(tmp_path, random_lora_model):
    base, adapter = random_lora_model
    model = CausalLMAdapter(base, adapter, device="cpu")
    tmpl = PromptTemplate()
    rows = load_rows(write_jsonl(tmp_path / "t.jsonl", ROWS))
    ek = _independent_ekfac(model, rows, tmpl)
    g = torch.randn(2, model.num_params, dtype=torch.float64)
    on_meta = ek.whiten(g.to("meta"))
    assert on_meta.device.type == "meta" and on_meta.shape == g.shape
    assert ek.whiten(g).device.type == "cpu"
    assert set(ek._device_blocks) == {"meta"}  # the CPU uses the fitted blocks themselves


def test_a_store_build_brings_only_k_numbers_per_row_to_the_host(tmp_path, random_lora_model,
                                                                   monkeypatch):
    """Every gradient call of the build returns (rows, K) or (rows, 2K), never (rows, d);
    the stored rows are the projections of the gradients computed independently."""
    base, adapter = random_lora_model
    model = CausalLMAdapter(base, adapter, device="cpu")
    rows = load_rows(write_jsonl(tmp_path / "t.jsonl", ROWS))
    tmpl = PromptTemplate()
    widths = []
    original = model.gradients

    def watched(*args, **kwargs):
        out = original(*args, **kwargs)
        widths.append((kwargs.get("reduce") is not None, out.shape[1]))
        return out

    monkeypatch.setattr(model, "gradients", watched)
    build_gradient_store(tmp_path / "both", rows, tmpl, model, proj_dim=64, shard_rows=4,
                         batch_size=3, curvature="both")
    shard_calls = [w for reduced, w in widths if reduced]
    assert shard_calls and set(shard_calls) == {128}
    # the curvature fit needs whole gradients (its Kronecker factors); the shards do not
    assert all(w == model.num_params for reduced, w in widths if not reduced)
    widths.clear()
    build_gradient_store(tmp_path / "plain", rows, tmpl, model, proj_dim=64, shard_rows=4,
                         batch_size=3, curvature="none")
    assert widths and all(reduced and w == 64 for reduced, w in widths)
    store = GradientStore.load(tmp_path / "plain")
    stored = np.concatenate([np.load(tmp_path / "plain" / "gradients" / s["file"])
                             for s in store.manifest["shards"]]).astype(np.float32)
    grads = original([tmpl.format(r) for r in rows.records], batch_size=3)
    want = store.projector.project(grads)
    assert np.abs(stored - want).max() <= 1e-3 * np.abs(want).max()  # fp16 on disk


@pytest.mark.parametrize("regime", ["mixed", "plain"])
def test_an_exact_re_rank_brings_only_dots_to_the_host(tmp_path, random_lora_model,
                                                        monkeypatch, regime):
    """The exact re-rank, the candidate path and a group score their candidate rows where
    the gradients are computed: the only d-number gradient that reaches the host is the
    query's own (one row); the scores are the ones tests/test_both_vectors_store.py
    checks against ground truth, so equal here to the host computation."""
    from datablame.methods import fusion
    from datablame.text import GradientOptions, Query, Tracer, build_index

    monkeypatch.setattr(fusion, "REGIME_COSINE", -1.0 if regime == "mixed" else 2.0)
    base, adapter = random_lora_model
    train = write_jsonl(tmp_path / "t.jsonl", ROWS)
    build_index(train, tmp_path / "idx", gradients=GradientOptions(base, adapter, proj_dim=64,
                                                                   shard_rows=4))
    tracer = Tracer(tmp_path / "idx", base, adapter)
    query = Query("hello there friend .", {"instruction": "say hello", "input": ""})
    tmpl = PromptTemplate()
    texts = [tmpl.format(r) for r in load_rows(train).records]
    q_grad = tracer.model.gradients([query.formatted(tmpl)]).astype(np.float64)[0]
    rows_grads = tracer.model.gradients(texts).astype(np.float64)
    d = tracer.model.num_params
    copies = _watch_host_copies(monkeypatch)
    results = [tracer.run(query, all_rows=True, top_k=len(ROWS), rerank=len(ROWS)),
               tracer.run(query, top_k=len(ROWS)),
               tracer.trace_group([query], top_k=len(ROWS), all_rows=True, rerank=len(ROWS))]
    seen = [rows for rows, width in copies if width == d]
    assert seen and set(seen) == {1}, seen  # the query's gradient, each time
    m = 0.75 if regime == "mixed" else 0.0
    plain = rows_grads @ q_grad / (np.linalg.norm(rows_grads, axis=1) * np.linalg.norm(q_grad))
    for df in results:
        got = df.set_index("row")["score"].sort_index().to_numpy()
        if not m:
            np.testing.assert_allclose(got, plain, atol=1e-5)
        else:
            assert np.abs(got - plain).max() > 1e-3  # whitened in part
