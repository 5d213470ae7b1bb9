"""The language-model option set, said once: what to load and how to take its loss.

Every door that loads a causal LM (index --gradients, trace, verify, finetune, the Python
API) carries one `LMOptions`, so a new option lands in one place and the checks that need
no model (dtype, device, loss scope, parameter patterns) run before minutes of loading.
Kept free of torch imports so the CLI can build and check it cheaply.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields, replace


@dataclass(frozen=True)
class LMOptions:
    model: str | os.PathLike
    adapter: str | os.PathLike | None = None
    params: str = "auto"  # auto: LoRA B with an adapter, else all; lora-b, lora, all, regexes
    dtype: str = "fp32"
    device: str = "auto"
    max_length: int | None = None  # None: 512, or the model's positions if fewer
    loss_on: str = "response"
    quantize: str = "none"  # 8bit / 4bit: base weights through bitsandbytes (LoRA traced)
    device_map: str = ""  # auto: accelerate spreads the layers over GPUs, then CPU
    checkpointing: bool = False  # recompute each layer's activations in the backward pass

    def check(self) -> None:
        from datablame.models.hf_causal_lm import check_options

        check_options(params=self.params, dtype=self.dtype, device=self.device,
                      max_length=self.max_length, loss_on=self.loss_on,
                      quantize=self.quantize, device_map=self.device_map,
                      adapter=self.adapter)

    def check_files(self) -> None:
        """The model and adapter folders and the tokenizer, where this process loads the
        model (not a Ray driver whose actors load it on their own machines)."""
        from datablame.models.hf_causal_lm import check_model_files

        check_model_files(self.model, self.adapter)

    def lm_fields(self) -> dict:
        """Just the LM options (a subclass's extra fields left out)."""
        names = {f.name for f in fields(LMOptions)}
        return {k: v for k, v in asdict(self).items() if k in names}

    def with_adapter(self, adapter: str | os.PathLike | None) -> LMOptions:
        return replace(LMOptions(**self.lm_fields()), adapter=adapter)

    def load(self):
        """The model, loaded (`CausalLMAdapter`)."""
        from datablame.models.hf_causal_lm import CausalLMAdapter

        return CausalLMAdapter.from_options(self)
