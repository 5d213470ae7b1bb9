"""Formatted text rows of a causal LM as inputs to the generic influence methods.

The torch methods (grad-dot, grad-cos, datainf, trak, tracin) only ask an adapter for
per-example loss gradients (and, for DataInf, the parameter blocks). This wraps the HF
causal-LM adapter so they run on LoRA parameters of a language model: `x` is a list of
`FormattedText` (rows formatted with the index template), `y` is unused (the text is its
own target).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from datablame.errors import UserError
from datablame.models.base import GRADIENTS, KRONECKER
from datablame.models.hf_causal_lm import CausalLMAdapter


@dataclass
class TextRowsAdapter:
    lm: CausalLMAdapter
    batch_size: int = 8

    capabilities = frozenset({GRADIENTS, KRONECKER})

    @property
    def num_params(self) -> int:
        return self.lm.num_params

    @property
    def sizes(self) -> list[int]:
        params = dict(self.lm.model.named_parameters())
        return [params[n].numel() for n in self.lm.param_names]

    def gradients(self, x, y=None) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(
            self.lm.gradients(list(x), batch_size=self.batch_size)))

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        params = dict(self.lm.model.named_parameters())
        return [tuple(params[n].shape) for n in self.lm.param_names]

    def kronecker_factors(self, x, sampled_labels: int | None = None
                          ) -> tuple[torch.Tensor, dict]:
        """(per-example gradients, each weight's Kronecker factors) from one pass.

        `sampled_labels` (a seed): the factors, and the gradients returned, come from
        targets drawn from the model's own predictions (the true Fisher) instead of the
        rows' answers (the empirical Fisher)."""
        if not self.lm._hooks_ok:
            raise UserError("Kronecker factors need linear-layer weights only (LoRA): pass "
                            "--params lora or lora-b")
        factors: dict = {}
        generator = None if sampled_labels is None else \
            torch.Generator().manual_seed(int(sampled_labels))
        grads = self.lm.gradients(list(x), batch_size=self.batch_size, factors=factors,
                                  sampled_labels=generator, warn=sampled_labels is None)
        return torch.from_numpy(np.ascontiguousarray(grads)), factors

    def losses(self, x, y=None) -> np.ndarray:
        return self.lm.losses(list(x))
