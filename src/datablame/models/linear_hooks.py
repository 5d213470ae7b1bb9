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

    Each layer's output gradient is reduced to its per-example weight gradients by a hook
    the moment the backward pass computes it, and then freed: memory holds one layer's
    (B, T, out) output gradient at a time, not every layer's (for LoRA on every linear
    layer of a large model, that difference is gigabytes). The backward pass also sums
    the selected weights' gradients, which are small and thrown away.
    """
    owners = {n: _owner_of(model, n) for n in param_names}
    modules = {id(o[0]): o[0] for o in owners.values()}
    names_of: dict[int, list[str]] = {}
    for n, (module, _, _) in owners.items():
        names_of.setdefault(id(module), []).append(n)
    inputs: dict[int, torch.Tensor] = {}
    parts: dict[str, torch.Tensor] = {}
    calls: dict[int, int] = {}
    handles = []
    recording, rows = [True], [0]

    def reducer(key: int):
        def on_output_grad(g: torch.Tensor) -> None:
            x = inputs.pop(key)
            # (B, T, d), also where a model flattens its tokens to (B*T, d) first (OPT's MLP)
            g = g.detach().reshape(rows[0], -1, g.shape[-1]).float()
            # accelerate moves a placed module's input inside its forward, after the hook
            x = x.reshape(rows[0], -1, x.shape[-1]).float().to(g.device)
            for n in names_of[key]:
                _, attr, kind = owners[n]
                if factors is not None and attr == "weight":
                    _add_factors(factors, n, x, g)
                if attr == "bias":
                    parts[n] = g.sum(1)
                elif kind == "linear":  # weight (out, in)
                    parts[n] = torch.einsum("bto,bti->boi", g, x).reshape(x.shape[0], -1)
                else:  # conv1d weight (in, out)
                    parts[n] = torch.einsum("bti,bto->bio", x, g).reshape(x.shape[0], -1)
        return on_output_grad

    def fwd(mod, args, out):
        if not recording[0]:  # a checkpointed layer recomputed in the backward pass: its
            return  # original output's hook already stands
        calls[id(mod)] = calls.get(id(mod), 0) + 1
        inputs[id(mod)] = args[0].detach()
        if out.requires_grad:
            out.register_hook(reducer(id(mod)))

    if factors is not None:  # in parameter order, whatever order the backward pass takes
        for n, (_, attr, kind) in owners.items():
            if attr == "weight":
                factors.setdefault(n, {"A": 0.0, "S": 0.0, "tokens": 0, "kind": kind})
    params = dict(model.named_parameters())
    previous = {n: (params[n].requires_grad, params[n].grad) for n in param_names}
    try:
        for mod in modules.values():
            handles.append(mod.register_forward_hook(fwd))
        for n in param_names:  # puts the layers' outputs in the autograd graph
            params[n].requires_grad_(True)
            params[n].grad = None
        losses = per_example_loss()
        if any(c != 1 for c in calls.values()) or len(calls) != len(modules):
            raise RuntimeError("a layer ran more or less than once per forward pass")
        recording[0] = False
        rows[0] = losses.shape[0]
        selected = [params[n] for n in param_names]
        if losses.requires_grad:
            losses.sum().backward(inputs=selected)
    finally:
        for h in handles:
            h.remove()
        for n, (flag, grad) in previous.items():
            params[n].requires_grad_(flag)
            params[n].grad = grad
    flat = [parts.get(n, torch.zeros(rows[0], params[n].numel(), device=losses.device))
            for n in param_names]  # a layer whose output never reached the loss: zeros
    return torch.cat([f.to(flat[0].device) for f in flat], dim=1)  # layers on many GPUs


def _add_factors(factors: dict, name: str, x: torch.Tensor, g: torch.Tensor) -> None:
    active = g.abs().sum(-1) > 0  # tokens that reach some example's loss
    xs, gs = x[active].double().cpu(), g[active].double().cpu()  # beside g_train
    f = factors[name]
    f["A"] = f["A"] + xs.T @ xs
    f["S"] = f["S"] + gs.T @ gs
    f["tokens"] += int(active.sum())
