"""MAGIC-style exact attribution: the derivative of a query's loss with respect to each
training row's weight, through a replay of the whole fine-tune.

Why: every other LM method here approximates what removing a row does from the final
model alone. When the fine-tune is deterministic and replayable, which `datablame
finetune`'s recipe makes it (a seeded LoRA initialisation, a seeded data order per epoch,
seeded dropout), the effect of down-weighting a row on the final adapter is an ordinary
derivative: give row i a weight w_i in each batch loss (sum of w_i * its token losses over
sum of w_i * its token count, so w_i = 0 is the batch without it), replay the training,
and differentiate the query's final loss by w through every AdamW step (Ilyas & Engstrom,
"MAGIC: near-optimal data attribution for deep learning", 2025). score_i = -dL/dw_i,
so a positive score means the row lowered the query's loss (removing it would raise it),
the sign every method here uses.

Reverse mode, one step at a time: the forward replay keeps each step's parameters, Adam
moments and RNG state; going backwards, each step is recomputed with its graph and the
adjoints of (parameters, first moment, second moment) are carried through AdamW's update
in closed form, leaving one Hessian-vector product per step and query. Cost: a few
fine-tunes of compute per query and three copies of the trainable parameters per step in
memory, which is why it is for small adapters and small data (a tiny model's thousand
steps), not for a 7B fine-tune on a million rows: there memory (3 x LoRA size x steps)
runs out first.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from datablame import progress
from datablame.data.template import FormattedText
from datablame.errors import UserError
from datablame.models.lora_finetune import (
    Recipe,
    learning_rates,
    lora_model,
    step_batches,
    weighted_token_loss,
)

BETA1, BETA2, EPS = 0.9, 0.999, 1e-8  # torch.optim.AdamW's defaults, as finetune uses them
# predicted / actual loss change past which a removal check calls the run chaotic: smooth
# runs measured 0.17-0.64; a memorising chat fine-tune whose scores were noise (LDS -0.31)
# 12.8, which the earlier limit of 20 let through
CHAOS_RATIO = 5.0


@dataclass
class _Step:
    rows: list[int]  # row ids (of the training file) in this step's batch
    input_ids: torch.Tensor
    labels: torch.Tensor
    lr: float
    reseed: int | None  # the epoch's dropout seed, set before this step's forward


class FineTuneReplay:
    """`finetune(rows, base_dir, ..., recipe, keep=keep)` replayed step by step, with a
    weight per row. `dtype=torch.float64` for finite-difference checks."""

    def __init__(self, rows, base_dir: str | os.PathLike, recipe: Recipe, *,
                 keep: Sequence[int] | None = None, dtype: torch.dtype = torch.float32):
        from datablame.models.hf_causal_lm import CausalLMAdapter

        recipe = recipe.check()
        self.recipe = recipe
        self.n_rows = len(rows)
        template = recipe.prompt_template(base_dir, rows.columns)
        template.check_rows(rows)
        keep = list(range(len(rows))) if keep is None else sorted(int(i) for i in keep)
        self.lm = CausalLMAdapter(base_dir, None, params="all", max_length=recipe.max_length,
                                  loss_on=recipe.loss_on)
        self.model, self.names = lora_model(self.lm, recipe)
        self.model.to(dtype)
        self.dtype, self.device = dtype, self.lm.device
        params = dict(self.model.named_parameters())
        self.shapes = [params[n].shape for n in self.names]
        self.sizes = [params[n].numel() for n in self.names]
        self.theta0 = torch.cat([params[n].detach().reshape(-1) for n in self.names])
        texts = [template.format(rows.records[i]) for i in keep]
        batches = step_batches(len(keep), recipe)
        lrs = learning_rates(recipe, len(batches))
        per_epoch = math.ceil(len(keep) / recipe.batch_size)
        self.steps = []
        for t, batch in enumerate(batches):
            enc = self.lm.encode([texts[i] for i in batch])
            epoch, first = divmod(t, per_epoch)
            self.steps.append(_Step([keep[i] for i in batch], enc.input_ids.to(self.device),
                                    enc.labels.to(self.device), lrs[t],
                                    recipe.seed * 100_003 + epoch if first == 0 else None))

    # -- the pieces of one step -------------------------------------------------------------
    def _params(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        return {n: p.view(s) for n, p, s in
                zip(self.names, torch.split(theta, self.sizes), self.shapes, strict=True)}

    def _loss(self, theta, weights, input_ids, labels) -> torch.Tensor:
        """Weighted mean token loss: with every weight 1 it is HF's batch loss."""
        from torch.func import functional_call

        out = functional_call(self.model, self._params(theta), (input_ids,),
                              {"attention_mask": torch.ones_like(input_ids),
                               "use_cache": False})
        return weighted_token_loss(out.logits, labels, weights)

    def _adamw(self, theta, m, v, g, lr: float, k: int):
        wd = self.recipe.weight_decay
        m = BETA1 * m + (1 - BETA1) * g
        v = BETA2 * v + (1 - BETA2) * g * g
        if self.recipe.adam_eps_root:  # SmoothAdamW's order of operations
            denom = (v / (1 - BETA2 ** k) + self.recipe.adam_eps_root).sqrt() + EPS
        else:  # torch's AdamW's, rounding included: a long run amplifies any difference
            denom = v.sqrt() / math.sqrt(1 - BETA2 ** k) + EPS
        return theta * (1 - lr * wd) - (lr / (1 - BETA1 ** k)) * m / denom, m, v

    def _weights(self, step: _Step, weights) -> torch.Tensor:
        if weights is None:
            return torch.ones(len(step.rows), dtype=self.dtype, device=self.device)
        return torch.as_tensor(np.asarray(weights)[step.rows], dtype=self.dtype,
                               device=self.device)

    # -- forward -----------------------------------------------------------------------------
    def run(self, weights: Sequence[float] | None = None, *, keep_trajectory: bool = False,
            advance=None) -> torch.Tensor:
        """The trained LoRA parameters (flat) with row weights `weights` (one per row of the
        training file; None: all 1, the fine-tune itself)."""
        theta = self.theta0.clone()
        m, v = torch.zeros_like(theta), torch.zeros_like(theta)
        self.trajectory = [] if keep_trajectory else None
        self.model.train()
        for k, step in enumerate(self.steps, start=1):
            if step.reseed is not None:
                torch.manual_seed(step.reseed)
            if self.trajectory is not None:
                self.trajectory.append((theta, m, v, torch.get_rng_state(), _cuda_rng()))
            leaf = theta.detach().requires_grad_(True)
            loss = self._loss(leaf, self._weights(step, weights), step.input_ids, step.labels)
            (g,) = torch.autograd.grad(loss, leaf)
            with torch.no_grad():
                theta, m, v = self._adamw(theta, m, v, g, step.lr, k)
            if advance is not None:
                advance(1)
        return theta

    def difference(self, theta: torch.Tensor, adapter_dir: str | os.PathLike) -> float:
        """Largest |replayed - saved| LoRA weight, relative to the largest saved one."""
        from safetensors.torch import load_file

        saved = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
        worst, scale = 0.0, 0.0
        for name, value in self._params(theta).items():
            key = name.replace(".default", "")
            if key not in saved:
                raise UserError(f"{adapter_dir} has no LoRA weight {key}: the recipe does "
                                "not describe this adapter")
            ref = saved[key].to(device=value.device, dtype=value.dtype)
            worst = max(worst, float((ref - value).abs().max()))
            scale = max(scale, float(ref.abs().max()))
        return worst / max(scale, 1e-12)

    def check_reproduces(self, theta: torch.Tensor, adapter_dir: str | os.PathLike,
                         tolerance: float = 1e-3, *, made_by_recipe: bool = False) -> None:
        """Refuse a replay that ends elsewhere than the adapter. `made_by_recipe`: finetune
        recorded that it made this adapter with this recipe, rows and base, so a gap is the
        run amplifying rounding differences (the replay's loss and torch's sum in another
        order): measured on a tiny Llama, 1e-6 after 10 epochs, 2e-5 after 40, 25% after
        100 — a chaotic run, whose derivative would be noise."""
        gap = self.difference(theta, adapter_dir)
        if gap > tolerance and made_by_recipe:
            raise UserError(f"this fine-tune is too chaotic for exact replay derivatives: "
                            f"replaying its own recipe drifts {gap:.1%} from the adapter "
                            "(rounding differences grow through the run), so MAGIC scores "
                            "would be noise: trace with --method grad, or use magic on a "
                            "shorter or lower-learning-rate recipe")
        if gap > tolerance:
            raise UserError(f"replaying the recipe does not reproduce the adapter "
                            f"{adapter_dir} (weights differ by {gap:.1%} of their size): "
                            "it was trained some other way, so replay scores would be of "
                            "another model")

    def query_gradients(self, theta: torch.Tensor, queries: Sequence[FormattedText]
                        ) -> tuple[torch.Tensor, np.ndarray]:
        """(dL_q/dtheta for each query, each query's loss), with dropout off as at use."""
        self.model.eval()
        grads, losses = [], []
        for q in queries:
            enc = self.lm.encode([q])
            leaf = theta.detach().requires_grad_(True)
            loss = self._loss(leaf, torch.ones(1, dtype=self.dtype, device=self.device),
                              enc.input_ids.to(self.device), enc.labels.to(self.device))
            grads.append(torch.autograd.grad(loss, leaf)[0])
            losses.append(float(loss.detach()))
        self.model.train()
        return torch.stack(grads), np.asarray(losses)

    def query_losses(self, theta: torch.Tensor, queries: Sequence[FormattedText]
                     ) -> np.ndarray:
        return self.query_gradients(theta, queries)[1]

    # -- reverse -----------------------------------------------------------------------------
    def scores(self, queries: Sequence[FormattedText], *, show_progress: bool = True,
               adapter_dir: str | os.PathLike | None = None,
               through: str = "exact", made_by_recipe: bool = False) -> np.ndarray:
        """(queries, rows) MAGIC scores, -dL_q/dw_i at w = 1; rows left out of the fine-tune
        score 0. One forward replay and one reverse replay serve every query; with
        `adapter_dir`, the replay must reproduce that adapter first.

        `through`: "exact" differentiates everything; "fixed-v" holds Adam's second moment
        constant (its adjoint is the term that divides by sqrt(v)^3); "first-order" also
        drops the Hessian-vector products, leaving a replayed, Adam-preconditioned TracIn
        with the final query gradient."""
        n_steps = len(self.steps)
        with progress.task("replaying the fine-tune", n_steps if show_progress else 0) as adv:
            theta = self.run(keep_trajectory=True, advance=adv)
        if adapter_dir is not None:
            self.check_reproduces(theta, adapter_dir, made_by_recipe=made_by_recipe)
        a_theta, _ = self.query_gradients(theta, queries)
        self.final_theta, self.final_losses = theta, self.query_losses(theta, queries)
        a_m, a_v = torch.zeros_like(a_theta), torch.zeros_like(a_theta)
        d_w = torch.zeros(len(queries), self.n_rows, dtype=self.dtype, device=self.device)
        wd = self.recipe.weight_decay
        with progress.task("differentiating through it", n_steps if show_progress else 0
                           ) as advance:
            for k in range(n_steps, 0, -1):
                step = self.steps[k - 1]
                theta_k, m_k, v_k, rng, cuda_rng = self.trajectory[k - 1]
                torch.set_rng_state(rng)
                if cuda_rng is not None:
                    torch.cuda.set_rng_state_all(cuda_rng)
                leaf = theta_k.detach().requires_grad_(True)
                w = self._weights(step, None).requires_grad_(True)
                loss = self._loss(leaf, w, step.input_ids, step.labels)
                (g,) = torch.autograd.grad(loss, leaf, create_graph=True)
                with torch.no_grad():
                    gd = g.detach()
                    m1 = BETA1 * m_k + (1 - BETA1) * gd
                    v1 = BETA2 * v_k + (1 - BETA2) * gd * gd
                    s2 = 1 - BETA2 ** k
                    c = step.lr / (1 - BETA1 ** k)
                    root = (v1 / s2 + self.recipe.adam_eps_root).sqrt()
                    denom = root + EPS
                    # theta' = theta (1 - lr wd) - c m1 / (sqrt(v1/s2 + eps_root) + eps):
                    # its adjoints reach m1 and v1 in closed form; root = 0 only where
                    # m1 = 0 too
                    adj_m = a_m - a_theta * (c / denom)
                    dv = torch.where(root > 0, c * m1 / (denom * denom * 2 * s2
                                                         * root.clamp(min=1e-30)), 0.0)
                    adj_v = a_v + a_theta * dv if through == "exact" else a_v
                    u = (1 - BETA1) * adj_m + 2 * (1 - BETA2) * gd * adj_v
                hvp_theta, hvp_w = _vjps(g, (leaf, w), u, self.device.type == "cuda")
                with torch.no_grad():
                    a_theta = a_theta * (1 - step.lr * wd)
                    if through != "first-order":
                        a_theta = a_theta + hvp_theta
                    a_m, a_v = BETA1 * adj_m, BETA2 * adj_v
                    d_w[:, step.rows] += hvp_w
                self.trajectory[k - 1] = None  # done with it: memory shrinks as we go
                advance(1)
        self.trajectory = None
        return -d_w.cpu().numpy().astype(np.float64)

    def removal_check(self, scores: np.ndarray, queries: Sequence[FormattedText], *,
                      fraction: float = 0.1, seed: int = 0) -> dict:
        """Replay once more without a random `fraction` of the rows (weight 0, the same
        schedule) and compare each query's actual loss change with the one the scores
        predict (the sum of the dropped rows' scores). Call after `scores`."""
        kept = sorted({r for step in self.steps for r in step.rows})
        rng = np.random.default_rng(seed)
        drop = rng.choice(kept, max(1, round(fraction * len(kept))), replace=False)
        weights = np.ones(self.n_rows)
        weights[drop] = 0.0
        actual = self.query_losses(self.run(weights), queries) - self.final_losses
        predicted = scores[:, drop].sum(1)
        ratio = float(np.median(np.abs(predicted) / (np.abs(actual) + 1e-2)))
        if not np.isfinite(scores).all():
            ratio = math.inf  # the reverse pass overflowed
        return {"dropped": len(drop), "predicted": predicted.tolist(),
                "actual": actual.tolist(), "ratio": ratio}

    @staticmethod
    def check_smooth(check: dict, limit: float = CHAOS_RATIO) -> None:
        """Refuse scores that predict far larger loss changes than a real removal makes:
        a long fine-tune that memorised its rows at a high learning rate is chaotic, its
        exact derivative blows up going back through it, and then ranks no better than
        noise."""
        if check["ratio"] > limit:
            raise UserError(
                f"this fine-tune is too chaotic for exact replay derivatives: removing "
                f"{check['dropped']} random rows changed the query's loss by "
                f"{check['actual'][0]:+.3g}, the derivative predicted "
                f"{check['predicted'][0]:+.3g}, so MAGIC scores would be noise: trace with "
                "--method grad, or use magic on a shorter or lower-learning-rate recipe")


def _vjps(out: torch.Tensor, inputs: tuple[torch.Tensor, ...], cotangents: torch.Tensor,
          batched: bool):
    """Vector-Jacobian products of `out` for a batch of cotangents: by vmap on a GPU (where
    it batches into larger kernels), one by one on a CPU (measured faster there, and it
    needs no batching rule for every op)."""
    if batched:
        try:
            return torch.autograd.grad(out, inputs, grad_outputs=cotangents,
                                       retain_graph=True, is_grads_batched=True)
        except RuntimeError:
            pass
    per = [torch.autograd.grad(out, inputs, grad_outputs=c, retain_graph=True)
           for c in cotangents]
    return tuple(torch.stack(parts) for parts in zip(*per, strict=True))


def _cuda_rng():
    return torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
