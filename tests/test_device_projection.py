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
    assert empty.shape == (0, 32)


@pytest.mark.parametrize("kind", ["countsketch", "rademacher"])
def test_a_projector_runs_on_the_device_of_its_input(kind):
    """On `meta` every op must stay on the device (a copy to the host would raise); on the
    CPU the tensor path gives the host path's numbers. Blocks are kept per device."""
    projector = make_projector(kind, 70_000, 16, seed=1, block=1 << 15)
    g = torch.randn(3, 70_000)
    np.testing.assert_array_equal(projector.project_tensor(g).numpy(), projector.project(g))
    on_meta = projector.project_tensor(g.to("meta"))
    assert on_meta.device.type == "meta" and on_meta.shape == (3, 16)
    assert {device for _, device in projector._cache} == {"cpu", "meta"}
    for b in range(3):  # the map is drawn on the CPU: the same map on every device
        cpu, meta = (projector._cache[(b, d)] for d in ("cpu", "meta"))
        cpu, meta = (x if isinstance(x, tuple) else (x,) for x in (cpu, meta))
        assert [t.shape for t in cpu] == [t.shape for t in meta]
        assert all(t.device.type == "meta" for t in meta)


def test_the_deterministic_switch_is_scoped_and_put_back():
    """CUDA's index_add_ adds with atomics; the projection turns torch's deterministic
    kernels on around it and leaves the global setting as it found it."""
    assert not torch.are_deterministic_algorithms_enabled()
    with projection_mod._deterministic(True):
        assert torch.are_deterministic_algorithms_enabled()
    assert not torch.are_deterministic_algorithms_enabled()
    with projection_mod._deterministic(False):
        assert not torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with projection_mod._deterministic(True):
            pass
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        torch.use_deterministic_algorithms(False)


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
