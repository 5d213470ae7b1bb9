"""Built-in trainers: retrain a torch model on a subset of rows, the same way every time.

Verification needs to retrain many times (leave-one-out, remove-top-k, LDS), so training
must be a function of (rows, seed) only. `TorchTrainer` is that function for torch
modules: full-batch L-BFGS for convex models (converges to *the* optimum, which influence
functions assume), Adam for neural networks, both seeded.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from datablame.models.torch_module import LOSSES, TorchModelAdapter, as_tensor


@dataclass
class TorchTrainer:
    factory: Callable[[], torch.nn.Module]  # a fresh, untrained model
    loss: str = "ce"
    l2: float = 0.0  # penalty l2/2 |theta|^2 on the mean loss
    optimizer: str = "lbfgs"
    epochs: int = 100  # L-BFGS outer steps, or Adam epochs
    lr: float | None = None
    batch_size: int | None = None  # Adam only; None = full batch
    seed: int = 0

    def fit(self, x, y, seed: int | None = None, checkpoint_every: int = 0):
        """Train from a seeded initialisation; with `checkpoint_every`, also return
        [(model copy, lr)] snapshots for TracIn."""
        seed = self.seed if seed is None else seed
        torch.manual_seed(seed)
        model = self.factory()
        x, y = as_tensor(x), as_tensor(y, floating=False)
        loss_fn = LOSSES[self.loss]
        params = [p for p in model.parameters() if p.requires_grad]

        def objective(xb, yb):
            penalty = sum((p * p).sum() for p in params)
            return loss_fn(model(xb), yb).mean() + 0.5 * self.l2 * penalty

        snapshots = []
        model.train()
        if self.optimizer == "lbfgs":
            opt = torch.optim.LBFGS(params, lr=self.lr or 1.0, max_iter=20,
                                    tolerance_grad=1e-9, tolerance_change=1e-12,
                                    history_size=50, line_search_fn="strong_wolfe")

            def closure():
                opt.zero_grad()
                value = objective(x, y)
                value.backward()
                return value

            for step in range(self.epochs):
                opt.step(closure)
                if checkpoint_every and (step + 1) % checkpoint_every == 0:
                    snapshots.append((copy.deepcopy(model).eval(), self.lr or 1.0))
        elif self.optimizer == "adam":
            lr = self.lr or 1e-2
            opt = torch.optim.Adam(params, lr=lr)
            gen = torch.Generator().manual_seed(seed)
            bs = self.batch_size or len(x)
            for epoch in range(self.epochs):
                order = torch.randperm(len(x), generator=gen)
                for start in range(0, len(x), bs):
                    idx = order[start:start + bs]
                    opt.zero_grad()
                    objective(x[idx], y[idx]).backward()
                    opt.step()
                if checkpoint_every and (epoch + 1) % checkpoint_every == 0:
                    snapshots.append((copy.deepcopy(model).eval(), lr))
        else:
            raise ValueError(f"unknown optimizer '{self.optimizer}' (lbfgs or adam)")
        model.eval()
        return (model, snapshots) if checkpoint_every else model

    def adapter(self, model: torch.nn.Module) -> TorchModelAdapter:
        return TorchModelAdapter(model, self.loss, self.l2)

    def query_losses(self, x_train, y_train, x_query, y_query, rows=None,
                     seed: int | None = None) -> np.ndarray:
        """Retrain on `rows` (all if None) and return the queries' losses."""
        if rows is not None:
            x_train, y_train = _take(x_train, rows), _take(y_train, rows)
        model = self.fit(x_train, y_train, seed=seed)
        return self.adapter(model).losses(x_query, y_query)


def _take(a, rows):
    if hasattr(a, "iloc"):
        return a.iloc[rows]
    return a[rows]
