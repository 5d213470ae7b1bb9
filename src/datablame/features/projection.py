"""Seeded random projection of gradients to K dimensions (Johnson-Lindenstrauss).

The d x K matrix is never materialised for large d: it is generated block by block (rows
of the matrix, `block` input dimensions at a time) from (seed, block index), so the same
seed gives the same projection in any process, on any machine, in any batch order.
Entries are Rademacher (+-1/sqrt(K)): inner products are preserved in expectation with
variance about (|a|^2|b|^2 + <a,b>^2) / K.
"""

from __future__ import annotations

import numpy as np
import torch


class RandomProjector:
    def __init__(self, dim_in: int, dim_out: int, seed: int = 0, block: int = 1 << 15,
                 cache_bytes: int = 1 << 30):
        if dim_out < 1:
            raise ValueError("projection dimension must be at least 1")
        self.dim_in, self.dim_out, self.seed, self.block = dim_in, dim_out, seed, block
        self._cache: dict[int, torch.Tensor] = {}
        self._cacheable = dim_in * dim_out * 4 <= cache_bytes

    def _block(self, b: int) -> torch.Tensor:
        if b in self._cache:
            return self._cache[b]
        rows = min(self.block, self.dim_in - b * self.block)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + b)
        signs = torch.randint(0, 2, (rows, self.dim_out), generator=gen, dtype=torch.int8)
        mat = (signs.float() * 2 - 1) / np.sqrt(self.dim_out)
        if self._cacheable:
            self._cache[b] = mat
        return mat

    def project(self, grads: np.ndarray | torch.Tensor) -> np.ndarray:
        """(n, dim_in) -> (n, dim_out) float32."""
        g = torch.as_tensor(grads, dtype=torch.float32)
        if g.shape[1] != self.dim_in:
            raise ValueError(f"expected {self.dim_in} gradient dims, got {g.shape[1]}")
        out = torch.zeros((g.shape[0], self.dim_out), dtype=torch.float32)
        n_blocks = (self.dim_in + self.block - 1) // self.block
        for b in range(n_blocks):
            start = b * self.block
            out += g[:, start : start + self.block] @ self._block(b)
        return out.numpy()

    def to_json(self) -> dict:
        return {"kind": "rademacher", "dim_in": self.dim_in, "dim_out": self.dim_out,
                "seed": self.seed, "block": self.block}
