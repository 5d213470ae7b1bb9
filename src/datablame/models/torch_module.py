"""Any `torch.nn.Module` + loss on tabular data: gradients, Hessians, retraining.

The model is read through `torch.func.functional_call` over a flat parameter vector, so
per-example gradients are one `vmap(grad)` call (no loop over rows) and Hessian-vector
products are one `jvp(grad)`. Sized for tabular models (thousands to a few million
parameters); the HF causal-LM adapter covers language models.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch.func import functional_call, grad, jvp, vmap

from datablame.errors import UserError
from datablame.models.base import GRADIENTS, HESSIAN, LATENT, MARGIN_GRADIENTS, TABULAR

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (outputs, targets) -> (B,)


def _mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    out = out.reshape(out.shape[0], -1)
    return ((out - y.reshape(out.shape)) ** 2).sum(1)


def _ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if out.ndim == 1 or out.shape[-1] == 1:  # one logit: binary cross-entropy
        return torch.nn.functional.binary_cross_entropy_with_logits(
            out.reshape(-1), y.reshape(-1).float(), reduction="none")
    return torch.nn.functional.cross_entropy(out, y.long(), reduction="none")


LOSSES: dict[str, LossFn] = {"mse": _mse, "ce": _ce}


def as_tensor(x, floating: bool = True) -> torch.Tensor:
    """numpy / pandas / list / tensor -> tensor; features as float32, targets as given."""
    if hasattr(x, "to_numpy"):
        x = x.to_numpy()
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    if floating or t.is_floating_point():
        return t.float()
    return t


@dataclass
class TorchModelAdapter:
    """A trained module, its per-example loss and the L2 penalty it was trained with.

    loss: "mse", "ce" (multi-class logits, or one logit = binary) or a callable
          (outputs, targets) -> per-example loss.
    l2:   the weight decay of training, as a penalty l2/2 * |theta|^2 on the mean loss:
          it belongs in the Hessian of an influence function.
    """

    model: torch.nn.Module
    loss: str | LossFn = "ce"
    l2: float = 0.0
    params: str = "all"

    capabilities = frozenset({GRADIENTS, HESSIAN, MARGIN_GRADIENTS, LATENT, TABULAR})

    def __post_init__(self):
        if isinstance(self.loss, str):
            if self.loss not in LOSSES:
                raise UserError(f"unknown loss '{self.loss}' (use mse, ce or a callable)")
            self.loss_fn: LossFn = LOSSES[self.loss]
        else:
            self.loss_fn = self.loss
        self.model.eval()
        named = dict(self.model.named_parameters())
        self.names = [n for n in named if self.params == "all" or n.startswith(self.params)]
        if not self.names:
            raise UserError(f"no parameter of the model matches '{self.params}'")
        self.shapes = [named[n].shape for n in self.names]
        self.sizes = [named[n].numel() for n in self.names]
        self.theta = torch.cat([named[n].detach().reshape(-1).float() for n in self.names])

    @property
    def num_params(self) -> int:
        return int(self.theta.numel())

    def _unflatten(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = torch.split(theta, self.sizes)
        return {n: p.reshape(s) for n, p, s in zip(self.names, parts, self.shapes, strict=True)}

    def _losses(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = functional_call(self.model, self._unflatten(theta), (x,))
        return self.loss_fn(out, y)

    @property
    def is_regression(self) -> bool:
        return self.loss == "mse"

    @property
    def is_classification_loss(self) -> bool:
        return self.loss_fn is _ce

    def outputs(self, x) -> torch.Tensor:
        with torch.no_grad():
            return self.model(as_tensor(x))

    def predict_targets(self, x) -> torch.Tensor:
        """The model's own answer, the default query target (as in the seed)."""
        out = self.outputs(x)
        if self.loss_fn is _ce:
            return (out.reshape(-1) > 0).float() if out.ndim == 1 or out.shape[-1] == 1 \
                else out.argmax(-1)
        return out

    def losses(self, x, y) -> np.ndarray:
        with torch.no_grad():
            return self._losses(self.theta, as_tensor(x), as_tensor(y, floating=False)).numpy()

    def query_losses(self, x, y) -> np.ndarray:
        return self.losses(x, y)

    def latent(self, x) -> np.ndarray:
        """The input of the last layer of an nn.Sequential (its input, for a linear model):
        the space SimplEx mixes training rows in."""
        layers = list(self.model.children()) if isinstance(self.model, torch.nn.Sequential) \
            else []
        if len(layers) < 2:
            return np.asarray(x, dtype=np.float64)
        with torch.no_grad():
            body = torch.nn.Sequential(*layers[:-1])
            return body(as_tensor(x)).double().numpy()

    def _margin_and_prob(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor):
        """TRAK's output function: classification, the margin log p/(1-p) of the target
        (and p); regression, the prediction (and 0)."""
        out = functional_call(self.model, self._unflatten(theta), (x,))
        if self.loss_fn is _ce:
            if out.ndim == 1 or out.shape[-1] == 1:
                sign = 2 * y.reshape(-1).float() - 1
                margin = sign * out.reshape(-1)
            else:
                correct = out.gather(1, y.long().reshape(-1, 1)).reshape(-1)
                others = out.clone()
                others.scatter_(1, y.long().reshape(-1, 1), float("-inf"))
                margin = correct - torch.logsumexp(others, dim=1)
            return margin, torch.sigmoid(margin)
        pred = out.reshape(out.shape[0], -1).sum(1)
        return pred, torch.zeros_like(pred)

    def margin_gradients(self, x, y) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, d) per-row gradients of the margin, and each row's probability p."""
        x, y = as_tensor(x), as_tensor(y, floating=False)

        def one(theta, xi, yi):
            return self._margin_and_prob(theta, xi.unsqueeze(0), yi.unsqueeze(0))[0][0]

        g = vmap(grad(one), in_dims=(None, 0, 0))(self.theta, x, y)
        with torch.no_grad():
            _, p = self._margin_and_prob(self.theta, x, y)
        return g, p

    def gradients(self, x, y, batch_size: int = 4096) -> torch.Tensor:
        """(n, d) per-example loss gradients, vectorised with vmap in row batches."""
        x, y = as_tensor(x), as_tensor(y, floating=False)

        def one(theta, xi, yi):
            return self._losses(theta, xi.unsqueeze(0), yi.unsqueeze(0))[0]

        g = vmap(grad(one), in_dims=(None, 0, 0))
        return torch.cat([g(self.theta, x[i:i + batch_size], y[i:i + batch_size])
                          for i in range(0, len(x), batch_size)]) if len(x) else \
            torch.zeros((0, self.num_params))

    def output_gradients(self, x, batch_size: int = 4096) -> torch.Tensor:
        """(n, d) gradient of each row's (single) output: what "explain the prediction" of
        a regression model differentiates instead of a loss that is flat there."""
        x = as_tensor(x)
        width = self.outputs(x[:1]).reshape(1, -1).shape[1] if len(x) else 1
        if width != 1:
            raise UserError(f"the model has {width} outputs; explaining its prediction needs "
                            "one (give the query's target instead: y_query / --true-label)")

        def one(theta, xi):
            return functional_call(self.model, self._unflatten(theta),
                                   (xi.unsqueeze(0),)).reshape(-1)[0]

        g = vmap(grad(one), in_dims=(None, 0))
        return torch.cat([g(self.theta, x[i:i + batch_size]) for i in
                          range(0, len(x), batch_size)]) if len(x) else \
            torch.zeros((0, self.num_params))

    def _mean_loss(self, theta, x, y) -> torch.Tensor:
        return self._losses(theta, x, y).mean() + 0.5 * self.l2 * (theta * theta).sum()

    def hvp_fn(self, x, y) -> Callable[[torch.Tensor], torch.Tensor]:
        """v -> H v for the Hessian of the training objective (mean loss + L2)."""
        x, y = as_tensor(x), as_tensor(y, floating=False)
        g = grad(lambda t: self._mean_loss(t, x, y))
        return lambda v: jvp(g, (self.theta,), (v,))[1]

    def hessian(self, x, y) -> torch.Tensor:
        """Exact d x d Hessian of the training objective (small models only)."""
        if self.num_params > 20000:
            raise UserError(f"the exact Hessian needs a {self.num_params}^2 matrix; use "
                            "if-cg, if-lissa or if-arnoldi for a model this size")
        linear = self._linear_layer()
        if linear is not None:
            return self._linear_hessian(linear, as_tensor(x))
        hvp = vmap(self.hvp_fn(x, y))
        eye = torch.eye(self.num_params)
        return torch.cat([hvp(eye[i:i + 256]) for i in range(0, self.num_params, 256)])

    def _linear_layer(self) -> torch.nn.Linear | None:
        """The layer, when the model is one nn.Linear under our own (mse / ce) loss."""
        m = self.model
        if isinstance(m, torch.nn.Sequential) and len(m) == 1:
            m = m[0]
        if not isinstance(m, torch.nn.Linear) or self.params != "all" or \
                self.loss_fn not in (_ce, _mse):
            return None
        return m

    def _linear_hessian(self, layer: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
        """Closed form for a model linear in its parameters: the Hessian of the mean loss is
        (1/n) sum_i A_i (x) x~_i x~_i^T, with A_i the loss's Hessian in the outputs
        (softmax: diag(p) - p p^T; one logit: p(1 - p); squared error: 2 I) and
        x~ = [x, 1]. One (K^2 x n) @ (n x D^2) product instead of d Hessian-vector products.
        """
        n = x.shape[0]
        with torch.no_grad():
            z = layer(x)
            k = z.shape[1]
            if self.loss_fn is _mse:
                a = 2 * torch.eye(k).expand(n, k, k)
            elif k == 1:
                p = torch.sigmoid(z)
                a = (p * (1 - p)).reshape(n, 1, 1)
            else:
                p = torch.softmax(z, dim=1)
                a = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
            xt = torch.cat([x, torch.ones(n, 1)], dim=1) if layer.bias is not None else x
            d = xt.shape[1]
            outer = (xt[:, :, None] * xt[:, None, :]).reshape(n, d * d)
            full = (a.reshape(n, k * k).T @ outer / n).reshape(k, k, d, d)
            full = full.permute(0, 2, 1, 3).reshape(k * d, k * d)  # index k * d + feature
        d_in = layer.in_features
        order = {"weight": [kk * d + j for kk in range(k) for j in range(d_in)],
                 "bias": [kk * d + d_in for kk in range(k)]}
        names = [n.rpartition(".")[2] for n in self.names]
        idx = torch.tensor([i for nm in names for i in order[nm]])
        return full[idx][:, idx] + self.l2 * torch.eye(self.num_params)
