"""EK-FAC (George et al. 2018; Grosse et al. 2023): an inverse Hessian per linear layer
from Kronecker factors, with eigenvalues corrected to the data.

For a weight W (out x in) whose per-example gradient is G = sum_t g_t x_t^T, K-FAC
approximates the layer's curvature E[vec(G) vec(G)^T] by A (x) S: A = E[x x^T] over the
tokens that carry gradient, S = E_rows[sum_t g g^T] (per row, not per token: a later
layer's gradient reaches only the answer's tokens, and a per-token mean would shrink its
curvature against the others'). EK-FAC keeps the eigenbases of A and S but replaces the
Kronecker eigenvalues by the data's own second moments in that basis,
lam[o, i] = mean_n ((Q_S^T G_n Q_A)[o, i])^2, so that
H^-1 V = Q_S ((Q_S^T V Q_A) / (lam + damping)) Q_A^T, damping = 0.1 x mean(lam) per layer
(kronfluence's heuristic). Scores are (1/n) g_q^T H^-1 g_i, positive = the row helped,
over the selected parameters (LoRA matrices by default): one d_out x d_out and one
d_in x d_in eigendecomposition per matrix, never a d x d matrix.

The curvature is the true Fisher by default: its gradients come from answers drawn from
the model's own predictions (as bergson and kronfluence fit it), not the rows' answers (the
empirical Fisher), which a fine-tune has already driven towards zero. One draw per row is
a noisy estimate on a small training set, so small sets get several draws (`samples`).
"""

from __future__ import annotations

import numpy as np
import torch

from datablame.methods.base import Method
from datablame.methods.influence import _InverseHessianMethod
from datablame.models.base import KRONECKER


class EKFAC(_InverseHessianMethod):
    name = "ekfac"
    requires = (KRONECKER,)

    def __init__(self, damping_scale: float = 0.1, correct_eigenvalues: bool = True,
                 fisher: str = "sampled", samples: int | None = None, seed: int = 0):
        if fisher not in ("empirical", "sampled"):
            raise ValueError(f"fisher must be 'empirical' or 'sampled', not {fisher!r}")
        if samples is not None and samples < 1:
            raise ValueError(f"samples must be at least 1, not {samples}")
        self.damping_scale = damping_scale
        self.correct_eigenvalues = correct_eigenvalues  # False: plain K-FAC eigenvalues
        self.fisher = fisher
        self.samples = samples  # draws per row; None: enough for SAMPLED_ROWS in all
        self.seed = seed
        self._device_blocks: dict[str, list] = {}  # `blocks` copied to a GPU, by device

    SAMPLED_ROWS = 4096
    MAX_DRAWS = 16
    KEEP_BYTES = 2 * 1024**3  # draws' gradients kept for the correction; beyond, recomputed

    def draws_for(self, n_rows: int) -> int:
        if self.samples is not None:
            return self.samples
        return max(1, min(self.MAX_DRAWS, -(-self.SAMPLED_ROWS // max(n_rows, 1))))

    def _draw_seed(self, draw: int) -> int:
        return int(np.random.SeedSequence([self.seed, draw]).generate_state(1)[0])

    def fit(self, adapter, x_train, y_train):
        Method.fit(self, adapter, x_train, y_train)
        own = self.fit_curvature(adapter, x_train)
        self.g_train = own if own is not None else adapter.gradients(x_train, y_train).double()
        return self

    def fit_curvature(self, adapter, x_train) -> torch.Tensor | None:
        """Fit the curvature only (what a gradient store whitens its rows with: no
        training gradients are kept). Returns the rows' own gradients when the empirical
        Fisher computed them anyway, else None."""
        seeds = [None] if self.fisher == "empirical" else \
            [self._draw_seed(d) for d in range(self.draws_for(len(x_train)))]

        def draw(seed):
            return adapter.kronecker_factors(x_train) if seed is None else \
                adapter.kronecker_factors(x_train, sampled_labels=seed)

        factors, kept, kept_bytes, own = None, {}, 0, None
        for d, seed in enumerate(seeds):  # S summed over draws; A does not depend on them
            grads, f = draw(seed)
            if seed is None:
                own = grads.double()
            factors = f if factors is None else \
                {name: {**factors[name], "S": factors[name]["S"] + f[name]["S"]}
                 for name in factors}
            size = grads.numel() * grads.element_size()
            if self.correct_eigenvalues and (seed is None or kept_bytes + size <= self.KEEP_BYTES):
                kept[d], kept_bytes = grads, kept_bytes + size
            del grads, f
        self.param_names = list(adapter.lm.param_names)
        self.blocks, self._device_blocks = [], {}
        start = 0
        for name, shape in zip(adapter.lm.param_names, adapter.shapes, strict=True):
            size = int(torch.Size(shape).numel())
            f = factors[name]
            # E[G G^T] ~ (mean of x x^T over the tokens that carry gradient) (x) (sum of
            # g g^T per row): a later layer's gradient reaches fewer tokens (only the
            # answer's), so a per-token mean of g g^T would shrink its curvature.
            a = f["A"] / max(f["tokens"], 1)
            s = f["S"] / (len(x_train) * len(seeds))
            l_a, q_a = torch.linalg.eigh(a)
            l_s, q_s = torch.linalg.eigh(s)
            conv = f["kind"] == "conv1d"  # weight stored (in, out): work on its transpose
            lam = torch.outer(l_s.clamp(min=0), l_a.clamp(min=0))  # K-FAC's eigenvalues
            self.blocks.append([slice(start, start + size), shape, conv, q_s, q_a, lam])
            start += size
        if self.correct_eigenvalues:  # the data's own second moments in the eigenbasis
            sums = [0.0] * len(self.blocks)
            for d, seed in enumerate(seeds):
                grads = kept.pop(d) if d in kept else draw(seed)[0]  # same seed, same draw
                for b, (block, shape, conv, q_s, q_a, _) in enumerate(self.blocks):
                    sums[b] = sums[b] + (self._rotate(self._matrices(
                        grads[:, block].double(), shape, conv), q_s, q_a) ** 2).mean(0)
                del grads
            for b, total in enumerate(sums):
                self.blocks[b][5] = total / len(seeds)
        for b in self.blocks:
            b[5] = b[5] + self.damping_scale * b[5].mean().clamp(min=1e-30)
        self.blocks = [tuple(b) for b in self.blocks]
        return own

    def curvature_arrays(self, dtype=np.float32) -> dict[str, np.ndarray]:
        """The fitted curvature as plain arrays (`from_curvature_arrays` reads them back):
        what a gradient store keeps beside its shards."""
        out: dict[str, np.ndarray] = {"names": np.array(self.param_names)}
        for b, (block, shape, conv, q_s, q_a, lam) in enumerate(self.blocks):
            out[f"{b}.layout"] = np.array([block.start, block.stop, int(conv), *shape],
                                          dtype=np.int64)
            for key, value in (("q_s", q_s), ("q_a", q_a), ("lam", lam)):
                out[f"{b}.{key}"] = value.numpy().astype(dtype)
        return out

    @classmethod
    def from_curvature_arrays(cls, arrays) -> EKFAC:
        """A curvature-only EK-FAC (whiten / solve, no training rows) from
        `curvature_arrays`."""
        ek = cls()
        ek.param_names = [str(n) for n in arrays["names"]]
        ek.blocks = []
        for b in range(len(ek.param_names)):
            start, stop, conv, *shape = (int(v) for v in arrays[f"{b}.layout"])
            ek.blocks.append((slice(start, stop), tuple(shape), bool(conv),
                              *(torch.from_numpy(np.array(arrays[f"{b}.{key}"]))
                                for key in ("q_s", "q_a", "lam"))))
        return ek

    def _blocks_on(self, device: torch.device) -> list:
        """The eigenbases and eigenvalues on `device` (copied there once): vectors are
        whitened where they are, on a GPU during a store build."""
        if device.type == "cpu":
            return self.blocks
        if str(device) not in self._device_blocks:
            self._device_blocks[str(device)] = [
                (block, shape, conv, *(t.to(device) for t in tensors))
                for block, shape, conv, *tensors in self.blocks]
        return self._device_blocks[str(device)]

    @staticmethod
    def _matrices(flat: torch.Tensor, shape, conv: bool) -> torch.Tensor:
        """(m, d_block) -> (m, out, in)."""
        mats = flat.reshape(flat.shape[0], *shape)
        return mats.transpose(1, 2) if conv else mats

    @staticmethod
    def _rotate(mats: torch.Tensor, q_s: torch.Tensor, q_a: torch.Tensor) -> torch.Tensor:
        return q_s.T @ mats @ q_a

    def solve(self, v) -> torch.Tensor:
        """H^-1 v (damped), for (m, d) vectors."""
        return self._apply(torch.as_tensor(v), -1.0)

    _solve = solve  # what the influence methods' scores call

    def whiten(self, v: torch.Tensor) -> torch.Tensor:
        """H^-1/2 v: vectors whose dot product is g_q^T H^-1 g_i, and whose cosine is the
        alignment of two gradients after the curvature is divided out."""
        return self._apply(torch.as_tensor(v), -0.5)

    def _apply(self, v: torch.Tensor, power: float) -> torch.Tensor:
        v = v.to(self.blocks[0][3].dtype)  # float64 when fitted here, float32 when loaded
        out = torch.empty_like(v)
        for block, shape, conv, q_s, q_a, lam in self._blocks_on(v.device):
            solved = q_s @ (self._rotate(self._matrices(v[:, block], shape, conv), q_s, q_a)
                            * lam ** power) @ q_a.T
            out[:, block] = (solved.transpose(1, 2) if conv else solved).reshape(
                v.shape[0], -1)
        return out
