"""What each model family can compute, declared, so a method asks instead of sniffing.

Every model adapter has `capabilities`, a set of the names below; each name is a contract
(the methods it promises). A method lists what it `requires` (any one of them suffices)
and `Method.fit` refuses an adapter without it, in one line.

  GRADIENTS         gradients(x, y) -> (n, p) per-row loss gradients; losses(x, y) -> (n,);
                    num_params; sizes (parameter blocks, for DataInf)
  HESSIAN           hvp_fn(x, y), hessian(x, y) of the mean training loss (+ its L2 term)
  MARGIN_GRADIENTS  margin_gradients(x, y) -> (gradients of the margin, probabilities)
                    (TRAK's output function; without it TRAK uses the loss gradients)
  LATENT            latent(x) -> (n, d) the model's representation before its last layer
  LEAVES            leaves(x) -> (n, T, K) leaf ids; leaf_values, n_outputs, shared_outputs
  NEWTON            boosted trees: bias, learning_rate, l2, grad_hess (models/trees/base.py)
  LINEAR            model: a fitted scikit-learn linear model (closed forms, SHAP)
  TABULAR           x is a feature matrix; is_regression, predict_targets(x) and
                    query_losses(x, y) (the loss of target y at rows x, what retraining is
                    compared on): every tabular adapter, not a language model's text rows
"""

from __future__ import annotations

from datablame.errors import UserError

GRADIENTS = "gradients"
HESSIAN = "hessian"
MARGIN_GRADIENTS = "margin-gradients"
LATENT = "latent"
LEAVES = "leaves"
NEWTON = "newton"
LINEAR = "linear"
TABULAR = "tabular"
KRONECKER = "kronecker"


# How each capability reads in a refusal ("needs a gradient-boosted tree ensemble").
WORDS = {GRADIENTS: "parameter gradients (a torch model or a language model)",
         HESSIAN: "a torch model (its Hessian)", MARGIN_GRADIENTS: "a torch classifier",
         LATENT: "a torch model (its latent space)", LEAVES: "a tree ensemble",
         NEWTON: "a gradient-boosted tree ensemble", LINEAR: "a scikit-learn linear model",
         TABULAR: "a tabular model (a feature matrix)",
         KRONECKER: "a language model whose selected parameters are linear-layer weights "
                    "(LoRA: --params lora or lora-b)"}


def has(adapter, capability: str) -> bool:
    return capability in getattr(adapter, "capabilities", frozenset())


def require_any(method_name: str, adapter, capabilities: tuple[str, ...]) -> None:
    """Refuse an adapter that can give none of `capabilities` (empty: any adapter)."""
    if capabilities and not any(has(adapter, c) for c in capabilities):
        got = ", ".join(sorted(getattr(adapter, "capabilities", ()))) or "none"
        raise UserError(f"method '{method_name}' needs "
                        f"{' or '.join(WORDS[c] for c in capabilities)} (this model's "
                        f"capabilities: {got})")
