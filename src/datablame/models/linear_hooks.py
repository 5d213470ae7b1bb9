"""Per-example gradients of linear layers from one ordinary batched backward pass.

For y = x W^T + b, the gradient of example i's loss is sum_t g[i,t]^T x[i,t] (g = dL/dy),
so capturing each layer's input x and output gradient g with hooks gives every example's
weight gradient with one einsum, without `vmap` and without one backward per row. This
covers LoRA matrices (nn.Linear inside PEFT) and plain / GPT-2 Conv1D projections; any other
parameter (embeddings, norms) is not eligible and the caller falls back to `vmap`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def _owner_of(model: torch.nn.Module, name: str):
    """(module, 'weight'|'bias', kind) when `name` is a linear layer's parameter, else None."""
    mod_name, _, attr = name.rpartition(".")
    if attr not in ("weight", "bias"):
        return None
    module = model.get_submodule(mod_name)
    if isinstance(module, torch.nn.Linear):
        return module, attr, "linear"
    if type(module).__name__ == "Conv1D":  # transformers' GPT-2 style (in, out) weight
        return module, attr, "conv1d"
    return None


def eligible(model: torch.nn.Module, param_names: list[str]) -> bool:
    return all(_owner_of(model, n) is not None for n in param_names)


def per_example_grads(
    model: torch.nn.Module,
    param_names: list[str],
    per_example_loss: Callable[[], torch.Tensor],
    factors: dict | None = None,
) -> torch.Tensor:
    """(B, d) flattened per-example gradients over `param_names`, in that order.

    `per_example_loss()` runs the forward pass and returns a (B,) tensor of losses.
    `factors` (a dict), when given, accumulates each weight's Kronecker factors over the
    tokens that carry gradient: "A" = sum of x x^T (inputs), "S" = sum of g g^T (output
    gradients), "tokens", and "kind" (linear or conv1d): what EK-FAC is built from.
    """
    owners = {n: _owner_of(model, n) for n in param_names}
    modules = {id(o[0]): o[0] for o in owners.values()}
    inputs: dict[int, torch.Tensor] = {}
    outputs: dict[int, torch.Tensor] = {}
    calls: dict[int, int] = {}
    handles = []

    def fwd(mod, args, out):
        calls[id(mod)] = calls.get(id(mod), 0) + 1
        inputs[id(mod)] = args[0].detach()
        outputs[id(mod)] = out

    params = dict(model.named_parameters())
    previous = {n: params[n].requires_grad for n in param_names}
    try:
        for mod in modules.values():
            handles.append(mod.register_forward_hook(fwd))
        for n in param_names:  # puts the layers' outputs in the autograd graph
            params[n].requires_grad_(True)
        losses = per_example_loss()
        if any(c != 1 for c in calls.values()) or len(calls) != len(modules):
            raise RuntimeError("a layer ran more or less than once per forward pass")
        # Differentiate with respect to the layers' *outputs*, not their weights: autograd
        # then skips the summed weight gradients, which per-example gradients never use.
        keys = list(modules)
        out_grads = torch.autograd.grad(losses.sum(), [outputs[k] for k in keys],
                                        allow_unused=True)
    finally:
        for h in handles:
            h.remove()
        for n, flag in previous.items():
            params[n].requires_grad_(flag)
    grad_of = {}
    for k, g in zip(keys, out_grads, strict=True):
        grad_of[k] = torch.zeros_like(outputs[k]) if g is None else g.detach()

    flat = []
    for n in param_names:
        module, attr, kind = owners[n]
        x, g = inputs[id(module)], grad_of[id(module)]
        x = x.reshape(x.shape[0], -1, x.shape[-1]).float()
        g = g.reshape(g.shape[0], -1, g.shape[-1]).float()
        if factors is not None and attr == "weight":
            active = g.abs().sum(-1) > 0  # tokens that reach some example's loss
            xs, gs = x[active].double().cpu(), g[active].double().cpu()  # beside g_train
            f = factors.setdefault(n, {"A": 0.0, "S": 0.0, "tokens": 0, "kind": kind})
            f["A"] = f["A"] + xs.T @ xs
            f["S"] = f["S"] + gs.T @ gs
            f["tokens"] += int(active.sum())
        if attr == "bias":
            flat.append(g.sum(1))
        elif kind == "linear":  # weight (out, in)
            flat.append(torch.einsum("bto,bti->boi", g, x).reshape(x.shape[0], -1))
        else:  # conv1d weight (in, out)
            flat.append(torch.einsum("bti,bto->bio", x, g).reshape(x.shape[0], -1))
    return torch.cat([f.to(flat[0].device) for f in flat], dim=1)  # layers on many GPUs
