"""Seeded random projections of gradients to K dimensions (Johnson-Lindenstrauss).

Two kinds, both deterministic from (seed, block index) in any process, on any machine, in
any batch order, and never holding a d x K matrix for large d:

- `countsketch` (default): every input coordinate j is added, with a random sign, to one
  random output bucket h(j). Inner products are preserved in expectation with about the
  same variance as a dense Gaussian/Rademacher map, but projecting costs O(d) per row
  instead of O(d K): on the demo LoRA (d = 131k, K = 2048) the dense product took ~5x
  longer than computing the gradients themselves (bench/gradient_index.py).
- `rademacher`: the dense +-1/sqrt(K) map (what TRAK uses), generated block by block.

A projector runs on the device its input is on (`project_tensor`): the store build
projects each batch where its gradients were computed, so only K numbers per row leave a
GPU. The map itself is drawn on the CPU, so it is the same map on every device.
"""

from __future__ import annotations

import numpy as np
import torch

PROJECTIONS = ("countsketch", "rademacher")


class _BlockedProjector:
    kind = ""

    def __init__(self, dim_in: int, dim_out: int, seed: int = 0, block: int = 1 << 15,
                 cache_bytes: int = 1 << 30):
        if dim_out < 1:
            raise ValueError("projection dimension must be at least 1")
        self.dim_in, self.dim_out, self.seed, self.block = dim_in, dim_out, seed, block
        self._cache: dict[tuple[int, str], object] = {}  # (block, device) -> the block
        self._cache_bytes = cache_bytes

    def _generator(self, b: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + b)

    def _block(self, b: int, device: torch.device):
        key = (b, str(device))
        if key not in self._cache:
            rows = min(self.block, self.dim_in - b * self.block)
            made = _to_device(self._make_block(rows, self._generator(b)), device)
            if self._block_bytes() <= self._cache_bytes:
                self._cache[key] = made
            return made
        return self._cache[key]

    def project(self, grads: np.ndarray | torch.Tensor) -> np.ndarray:
        """(n, dim_in) -> (n, dim_out) float32, on the CPU."""
        return self.project_tensor(torch.as_tensor(grads, dtype=torch.float32)).cpu().numpy()

    def project_tensor(self, grads: torch.Tensor) -> torch.Tensor:
        """(n, dim_in) -> (n, dim_out) float32, on the device `grads` are on."""
        g = grads.to(torch.float32)
        if g.shape[1] != self.dim_in:
            raise ValueError(f"expected {self.dim_in} gradient dims, got {g.shape[1]}")
        out = torch.zeros((g.shape[0], self.dim_out), dtype=torch.float32, device=g.device)
        for b in range((self.dim_in + self.block - 1) // self.block):
            start = b * self.block
            self._apply(out, g[:, start : start + self.block], self._block(b, g.device))
        return out

    def to_json(self) -> dict:
        return {"kind": self.kind, "dim_in": self.dim_in, "dim_out": self.dim_out,
                "seed": self.seed, "block": self.block}

    def _make_block(self, rows: int, gen: torch.Generator):
        raise NotImplementedError

    def _block_bytes(self) -> int:
        raise NotImplementedError

    def _apply(self, out: torch.Tensor, g: torch.Tensor, block) -> None:
        raise NotImplementedError


class RandomProjector(_BlockedProjector):
    """Dense Rademacher map, +-1/sqrt(K)."""

    kind = "rademacher"

    def _make_block(self, rows, gen):
        signs = torch.randint(0, 2, (rows, self.dim_out), generator=gen, dtype=torch.int8)
        return (signs.float() * 2 - 1) / np.sqrt(self.dim_out)

    def _block_bytes(self) -> int:
        return self.dim_in * self.dim_out * 4

    def _apply(self, out, g, block):
        out += g @ block


class CountSketchProjector(_BlockedProjector):
    """Sparse map with one +-1 per input coordinate (a CountSketch / sparse JL transform)."""

    kind = "countsketch"

    def _make_block(self, rows, gen):
        buckets = torch.randint(0, self.dim_out, (rows,), generator=gen)
        signs = torch.randint(0, 2, (rows,), generator=gen, dtype=torch.int8).float() * 2 - 1
        return buckets, signs

    def _block_bytes(self) -> int:
        return self.dim_in * 12

    def _apply(self, out, g, block):
        buckets, signs = block
        sketch_add(out, buckets, g * signs, sort_based=out.is_cuda)


def sketch_add(out: torch.Tensor, buckets: torch.Tensor, values: torch.Tensor,
               sort_based: bool) -> None:
    """out[:, buckets[j]] += values[:, j] for every column j. On CUDA, index_add_ adds with
    atomics, in an order (and so to bytes) that varies from run to run; index_put_ with
    accumulate sorts the indices first on CUDA, always, so a shard's bytes do not depend on
    the run (without torch's global deterministic switch). The CPU keeps index_add_: its
    order is fixed, and the stores built before stay byte-identical."""
    if sort_based:  # rows of a contiguous (K, n) accumulator: the kernel's plain case
        acc = torch.zeros((out.shape[1], out.shape[0]), dtype=out.dtype, device=out.device)
        acc.index_put_((buckets,), values.T.contiguous(), accumulate=True)
        out += acc.T
    else:
        out.index_add_(1, buckets, values)


def _to_device(block, device: torch.device):
    if isinstance(block, tuple):
        return tuple(t.to(device) for t in block)
    return block.to(device)


def make_projector(kind: str, dim_in: int, dim_out: int, seed: int = 0,
                   block: int = 1 << 15) -> _BlockedProjector:
    classes = {"countsketch": CountSketchProjector, "rademacher": RandomProjector}
    if kind not in classes:
        raise ValueError(f"unknown projection '{kind}' (use {', '.join(PROJECTIONS)})")
    return classes[kind](dim_in, dim_out, seed, block)


def projector_from_json(spec: dict) -> _BlockedProjector:
    return make_projector(spec.get("kind", "rademacher"), spec["dim_in"], spec["dim_out"],
                          spec["seed"], spec["block"])
