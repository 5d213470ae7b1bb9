"""Hugging Face causal LMs (optionally with a PEFT LoRA adapter) as a gradient source.

Per-example gradients come from one ordinary batched backward pass with hooks on the
selected linear layers (`linear_hooks`: every LoRA matrix and attention / MLP projection),
which is exact and the fast path. Parameters that are not a linear layer's (embeddings,
norms) go through `torch.func` (`vmap` over `grad`) on right-padded batches, and a model
that cannot run under `vmap` falls back to one backward pass per row, with a warning; the
per-row loop is also the reference the batched paths are tested against.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from datablame.data.template import FormattedText
from datablame.errors import UserError
from datablame.models import linear_hooks

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LOSS_SCOPES = ("response", "text")
DEFAULT_MAX_LENGTH = 512
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


PARAM_SETS = ("auto", "lora-b", "lora", "all")
QUANTIZE = ("none", "8bit", "4bit")
DEVICE_MAPS = ("", "auto")


def _param_patterns(spec: str) -> list[re.Pattern]:
    try:
        patterns = [re.compile(p.strip()) for p in spec.split(",") if p.strip()]
    except re.error as exc:
        raise UserError(f"bad parameter pattern in '{spec}': {exc}") from None
    if not patterns:
        raise UserError(f"no parameter set in '{spec}' (use {', '.join(PARAM_SETS)} or "
                        "regexes)")
    return patterns


def check_model_files(model_dir: Path, adapter_dir: Path | None, tokenizer: bool = True
                      ) -> None:
    """The model and adapter folders hold what loading needs, and the tokenizer turns text
    into tokens: checked before minutes of embedding (a folder saved without its
    tokenizer otherwise loads an empty one in transformers 5, and every row is empty)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise UserError(f"model directory not found: {model_dir}")
    if not (model_dir / "config.json").exists():
        raise UserError(f"{model_dir} has no config.json: not a Hugging Face model dir")
    if adapter_dir is not None:
        adapter_dir = Path(adapter_dir)
        if not adapter_dir.is_dir():
            raise UserError(f"adapter directory not found: {adapter_dir}")
        if not (adapter_dir / "adapter_config.json").exists():
            raise UserError(f"{adapter_dir} has no adapter_config.json: not a PEFT adapter")
        if not any((adapter_dir / f).exists() for f in ADAPTER_WEIGHTS):
            raise UserError(f"{adapter_dir} has adapter_config.json but no weights "
                            f"({' or '.join(ADAPTER_WEIGHTS)})")
    if tokenizer:
        load_tokenizer_checked(model_dir)


def _config_vocab_size(model_dir: Path) -> int | None:
    """The vocabulary size config.json gives the embedding (a multimodal model's text
    part), or None when it does not say."""
    import json

    try:
        config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    for part in (config, config.get("text_config") if isinstance(config, dict) else None):
        if isinstance(part, dict) and isinstance(part.get("vocab_size"), int):
            return part["vocab_size"]
    return None


def load_tokenizer_checked(model_dir: Path):
    """The model's tokenizer, refused in one line if it cannot load or yields no tokens."""
    from transformers import AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    except Exception as exc:
        raise UserError(f"could not load a tokenizer from {model_dir}: "
                        f"{_first_line(exc)}") from None
    # its own vocabulary (added special tokens aside: a pad token added on load may never
    # reach the embedding) must fit the embedding, else it is another model's tokenizer
    vocab, own = _config_vocab_size(model_dir), getattr(tokenizer, "vocab_size", None)
    if vocab is not None and isinstance(own, int) and own > vocab:
        raise UserError(f"the tokenizer of {model_dir} has {own} tokens but the model's "
                        f"embedding has {vocab} rows: it is another model's tokenizer")
    if not tokenizer("hello world", add_special_tokens=False)["input_ids"]:
        known = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")
        what = "turns text into no tokens" if any(
            (Path(model_dir) / f).exists() for f in known) else \
            f"turns text into no tokens: the folder has no tokenizer files ({', '.join(known)})"
        raise UserError(f"the tokenizer of {model_dir} {what}; save the tokenizer the model "
                        "was trained with beside it (tokenizer.save_pretrained(model_dir))")
    return tokenizer


def check_options(*, params: str = "auto", dtype: str = "fp32", device: str = "auto",
                  max_length: int | None = None, loss_on: str = "response",
                  quantize: str = "none", device_map: str = "",
                  adapter: object | None = None) -> None:
    """Every model option that can be checked without the model: callers run this before
    loading anything, so a typo costs a second, not the minutes a 7B load takes."""
    if quantize not in QUANTIZE:
        raise UserError(f"unknown --quantize '{quantize}' (use {', '.join(QUANTIZE)})")
    if device_map not in DEVICE_MAPS:
        raise UserError(f"unknown --device-map '{device_map}' (use auto, or leave it out)")
    if device_map and device != "auto":
        raise UserError(f"--device-map {device_map} places the model's layers itself: drop "
                        f"--device {device}")
    if quantize != "none":
        if params == "all" or (params == "auto" and adapter is None):
            raise UserError(f"--quantize {quantize} stores the base weights as integers, "
                            "which have no gradient: trace a LoRA adapter's weights "
                            "(--adapter with --params lora-b or lora)")
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            raise UserError(f"--quantize {quantize} needs bitsandbytes: pip install "
                            "'datablame[quant]'")
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype '{dtype}' (use {', '.join(DTYPES)})")
    if loss_on not in LOSS_SCOPES:
        raise UserError(f"unknown loss scope '{loss_on}' (use {', '.join(LOSS_SCOPES)})")
    if max_length is not None and max_length < 2:
        raise UserError(f"--max-length must be at least 2 (got {max_length})")
    if params not in PARAM_SETS:
        _param_patterns(params)
    resolve_device(device)


def _out_of_memory(exc: Exception) -> bool:
    """A device (or the CPU) ran out of memory: a smaller batch may fit."""
    from accelerate.utils.memory import should_reduce_batch_size

    return should_reduce_batch_size(exc)


def _unless_out_of_memory(compute):
    """(compute(), False), or (None, True) when the device ran out of memory: returned,
    not raised, so the caller retries after the exception (and the batch its traceback
    holds) is gone."""
    try:
        return compute(), False
    except Exception as exc:
        if not _out_of_memory(exc):
            raise
    return None, True


def _merge_factors(total: dict, batch: dict) -> None:
    """Add one batch's Kronecker factor sums to the running ones."""
    for name, f in batch.items():
        t = total.setdefault(name, {"A": 0.0, "S": 0.0, "tokens": 0, "kind": f["kind"]})
        t["A"] = t["A"] + f["A"]
        t["S"] = t["S"] + f["S"]
        t["tokens"] += f["tokens"]


class _Checkpointing:
    """Gradient (activation) checkpointing of the decoder layers, done here rather than by
    transformers' own switch: that one acts only in training mode, and several families'
    layers apply dropout by `self.training` themselves (OPT, Falcon, XGLM, ...), so the
    gradients would change. Every module stays in eval mode; each decoder layer's forward
    is wrapped in a non-reentrant `torch.utils.checkpoint` that keeps its input and
    recomputes the rest in the backward pass, so activations take one layer's memory,
    not every layer's. It is on only while the batched hook path runs (`active`): the
    vmap and per-row paths swap parameters in with `functional_call`, which a recompute
    after the call would not see."""

    def __init__(self, model: torch.nn.Module):
        from torch.utils.checkpoint import checkpoint

        try:
            from transformers.modeling_layers import GradientCheckpointingLayer
        except ImportError:  # transformers before 4.52
            GradientCheckpointingLayer = None  # noqa: N806
        layers = [m for m in model.modules()
                  if GradientCheckpointingLayer is not None and
                  isinstance(m, GradientCheckpointingLayer)]
        if not layers:
            raise UserError(f"{type(model).__name__} has no decoder layers datablame can "
                            "checkpoint (needs transformers >= 4.52): drop "
                            "--gradient-checkpointing")
        self.active = False

        def wrap(forward):
            def checkpointed(*args, **kwargs):
                if self.active and torch.is_grad_enabled():
                    return checkpoint(forward, *args, use_reentrant=False, **kwargs)
                return forward(*args, **kwargs)
            return checkpointed

        for layer in layers:
            layer.forward = wrap(layer.forward)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device '{device}' asked for, but CUDA is not available here")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise UserError(f"unknown device '{device}' (use auto, cpu or cuda)")
    return torch.device(device)


def greedy(model, tokenizer, prompt: str, max_new_tokens: int,
           add_special_tokens: bool = True) -> str:
    """The model's own greedy continuation of `prompt` (special tokens dropped): what it
    says, deterministically, which is what a user should trace. A chat prompt holds its own
    BOS (`add_special_tokens=False`)."""
    enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=add_special_tokens
                    ).to(next(model.parameters()).device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else \
        tokenizer.eos_token_id
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


@dataclass
class EncodedBatch:
    input_ids: torch.Tensor  # (B, L) right-padded
    labels: torch.Tensor  # (B, L) -100 where not scored
    cut: list[str]  # per text: "" (whole), "prompt" (head cut) or "answer" (tail cut)

    @property
    def truncated(self) -> list[bool]:
        return [bool(c) for c in self.cut]

    def unscored(self) -> list[int]:
        """Texts with no token whose loss is traced (the first token is never predicted)."""
        return [i for i, lab in enumerate(self.labels) if not (lab[1:] != -100).any()]


def _window(n: int, first: int, limit: int, prefix: int) -> tuple[range, str]:
    """Which `limit - prefix` of `n` tokens to keep when a text is too long: the answer
    (from token `first`) whole with as much of the prompt's end as fits, or, when the
    answer alone is too long, its beginning after a little prompt context."""
    room = limit - prefix
    if n - first < room:
        return range(n - room, n), "prompt"
    context = min(max(first - prefix, 0), room // 4)
    lo = max(first - context, prefix)
    return range(lo, lo + room), "answer"


def length_order(examples: Sequence[FormattedText]) -> np.ndarray:
    """Indices sorting texts by length (stable, so deterministic): batching neighbours in
    this order pads little, whatever order the rows come in."""
    return np.argsort([len(e.text) for e in examples], kind="stable")


class CausalLMAdapter:
    """Loads `BASE_DIR` (+ `ADAPTER_DIR`) and answers: which parameters, and their gradients.

    params:
      "auto"   - the LoRA B matrices when an adapter is given, else all parameters
      "lora-b" - the LoRA B (up-projection) matrices: half the features of "lora" and
                 measured better on both planted sets (bench/facts.py; README)
      "lora"   - every LoRA matrix (A and B)
      "all"    - every parameter of the (merged view of the) model
      other   - comma-separated regular expressions matched against parameter names
    loss_on:
      "response" - mean token loss over the response field only
      "text"     - mean token loss over the whole formatted text (the seed's choice)
    """

    def __init__(
        self,
        model_dir: str | os.PathLike,
        adapter_dir: str | os.PathLike | None = None,
        *,
        params: str = "auto",
        dtype: str = "fp32",
        device: str = "auto",
        max_length: int | None = None,
        loss_on: str = "response",
        quantize: str = "none",
        device_map: str = "",
        checkpointing: bool = False,
    ):
        check_options(params=params, dtype=dtype, device=device, max_length=max_length,
                      loss_on=loss_on, quantize=quantize, device_map=device_map,
                      adapter=adapter_dir)
        self.model_dir = Path(model_dir)
        self.adapter_dir = Path(adapter_dir) if adapter_dir else None
        self.dtype_name = dtype
        self.device = resolve_device(device)
        self.max_length = max_length
        self.loss_on = loss_on
        self.params_spec = params
        self.quantize, self.device_map, self.checkpointing = quantize, device_map, checkpointing
        self.model, self.tokenizer = self._load()
        if device_map or quantize != "none":  # placed by accelerate: inputs go where the
            self.device = self.model.get_input_embeddings().weight.device  # embeddings are
            self._check_placement()
        if device_map and self.device.type == "cpu":
            from datablame import progress

            progress.note(f"--device-map {device_map}: no GPU here, every layer is on the CPU")
        config = getattr(self.model, "config", None)
        limit = getattr(config, "max_position_embeddings", None) or \
            getattr(config, "n_positions", None)
        asked, self.max_length = self.max_length, self.max_length or DEFAULT_MAX_LENGTH
        if isinstance(limit, int) and limit < self.max_length:
            if asked is not None:
                warnings.warn(f"max length {asked} is more than the model's {limit} "
                              f"positions: using {limit}", stacklevel=2)
            self.max_length = limit  # longer inputs would index past the position table
        self.param_names = self._select_params(params)
        # bitsandbytes' matrix products are autograd Functions vmap cannot run: per row
        self._vmap_ok: bool | None = False if quantize != "none" else None
        self.batch_limit: int | None = None  # rows per batch that fit, once one did not
        self.last_report: dict[str, list[int]] = {}
        self._hooks_ok = linear_hooks.eligible(self.model, self.param_names)
        if checkpointing and not self._hooks_ok:
            warnings.warn("--gradient-checkpointing applies to linear-layer and LoRA weights "
                          "(the batched hook path); these parameters are not all such, so "
                          "their gradients are taken without it", stacklevel=2)

    @classmethod
    def from_options(cls, options) -> CausalLMAdapter:
        """From an `LMOptions` (the one place the option set is spelled out)."""
        o = options
        return cls(o.model, o.adapter, params=o.params, dtype=o.dtype, device=o.device,
                   max_length=o.max_length, loss_on=o.loss_on, quantize=o.quantize,
                   device_map=o.device_map, checkpointing=o.checkpointing)

    def options(self):
        """The `LMOptions` this model was loaded with (max length as resolved)."""
        from datablame.models.lm_options import LMOptions

        return LMOptions(self.model_dir, self.adapter_dir, params=self.params_spec,
                         dtype=self.dtype_name,
                         device="auto" if self.device_map else str(self.device),
                         max_length=self.max_length, loss_on=self.loss_on,
                         quantize=self.quantize, device_map=self.device_map,
                         checkpointing=self.checkpointing)

    # -- loading ---------------------------------------------------------------------------
    def _load(self):
        from transformers import AutoModelForCausalLM

        check_model_files(self.model_dir, self.adapter_dir, tokenizer=False)
        tokenizer = load_tokenizer_checked(self.model_dir)
        placement = {}
        if self.device_map:  # accelerate spreads the layers over the GPUs
            placement["device_map"] = self.device_map
        elif self.quantize != "none":  # quantized weights are placed as they load
            placement["device_map"] = {"": str(self.device)}
        try:
            model = AutoModelForCausalLM.from_pretrained(
                self.model_dir,
                dtype=DTYPES[self.dtype_name],
                attn_implementation="eager",  # sdpa/flash kernels do not run under vmap
                trust_remote_code=False,
                quantization_config=self._quantization_config(),
                **placement,
            )
        except Exception as exc:
            raise UserError(f"could not load a causal LM from {self.model_dir}: "
                            f"{_first_line(exc)}") from None
        if self.adapter_dir is not None:
            from peft import PeftModel

            try:
                model = PeftModel.from_pretrained(model, self.adapter_dir, is_trainable=False)
            except Exception as exc:
                raise UserError(self._adapter_error(exc)) from None
        if not placement:
            model.to(self.device)
        model.eval()  # no dropout: gradients must be deterministic
        for p in model.parameters():
            p.requires_grad_(False)
        for module in model.modules():
            if type(module).__name__ == "Linear4bit" and \
                    type(module).__module__.startswith("bitsandbytes"):
                # In eval mode on a CPU, bitsandbytes repacks 4-bit weights at the first
                # gradient-free call into an inference-only layout that a later backward
                # cannot pass (layers with a bias fail); the flag changes nothing else.
                module.training = True
        self._checkpointing = _Checkpointing(model) if self.checkpointing else None
        return model, tokenizer

    def _check_placement(self) -> None:
        """Layers accelerate could not fit on the GPUs go to the CPU or disk, where their
        weights are swapped in at each forward pass: per-example gradients there are
        neither tested nor fast, so say so instead of computing them slowly or wrongly."""
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") \
            else self.model
        where = {str(v) for v in (getattr(base, "hf_device_map", None) or {}).values()}
        on_gpu = any(w not in ("cpu", "disk", "meta") for w in where)
        offloaded = where & ({"cpu", "disk", "meta"} if on_gpu else {"disk", "meta"})
        if offloaded:
            raise UserError(f"the model does not fit {'the GPUs' if on_gpu else 'memory'}: "
                            f"accelerate put layers on {' and '.join(sorted(offloaded))}, "
                            "which datablame does not take gradients through; try "
                            "--quantize 4bit, or more GPUs")

    def _quantization_config(self):
        """bitsandbytes' config for `--quantize` (None: full-precision weights). 4-bit is
        NF4 with double quantization, computing in `--dtype`: the QLoRA recipe most
        adapters of large models were trained with."""
        if self.quantize == "none":
            return None
        from transformers import BitsAndBytesConfig

        # Its warnings are per matrix product (an fp32 input cast to fp16) or about an
        # optional CPU kernel it could not fetch offline: noise on every line of a trace.
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        if self.quantize == "8bit":
            return BitsAndBytesConfig(load_in_8bit=True)
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=DTYPES[self.dtype_name])

    def _adapter_error(self, exc: Exception) -> str:
        """One line: a size-mismatch dump of every layer says less than the adapter's own
        record of the base it was trained on."""
        import json

        try:
            config = json.loads((self.adapter_dir / "adapter_config.json").read_text())
            trained_on = config.get("base_model_name_or_path")
        except (OSError, ValueError):
            trained_on = None
        first = _first_line(exc)
        if "size mismatch" in str(exc) or "Error(s) in loading" in str(exc):
            on = f" (it was trained on '{trained_on}')" if trained_on else ""
            return (f"the adapter {self.adapter_dir} does not fit the model "
                    f"{self.model_dir}{on}: its weights have other shapes")
        return f"could not load the adapter {self.adapter_dir}: {first}"

    def _select_params(self, spec: str) -> list[str]:
        names = [n for n, _ in self.model.named_parameters()]
        if spec == "auto":
            spec = "lora-b" if self.adapter_dir is not None else "all"
        if spec == "all":
            chosen = names
        elif spec == "lora":
            chosen = [n for n in names if "lora_" in n]
        elif spec == "lora-b":
            chosen = [n for n in names if "lora_B" in n or "lora_embedding_B" in n]
        else:
            patterns = _param_patterns(spec)
            chosen = [n for n in names if any(p.search(n) for p in patterns)]
        if not chosen:
            raise UserError(f"no model parameter matches '{spec}'")
        params = dict(self.model.named_parameters())
        frozen = [n for n in chosen if not params[n].is_floating_point()]
        if frozen:  # bitsandbytes' packed integer weights
            raise UserError(f"'{spec}' selects {len(frozen)} quantized base weights (e.g. "
                            f"{frozen[0]}), which have no gradient: trace the LoRA weights "
                            "(--params lora-b or lora)")
        return chosen

    @property
    def num_params(self) -> int:
        params = dict(self.model.named_parameters())
        return sum(params[n].numel() for n in self.param_names)

    def identity(self) -> dict:
        """What a gradient depends on, recorded with every stored feature and compared by
        content: digests of the model's and adapter's weight/config files (a retrain in
        place changes them, a copy elsewhere does not), the resolved parameter names (not
        the spec: 'auto' and 'lora-b' can mean the same matrices) and the dtype. The
        paths and the spec are kept as information for people reading the manifest."""
        from datablame.store.content_digest import dir_digest, names_digest

        digests = getattr(self, "_digests", None)
        if digests is None:  # hashing is cached on disk, but not free: once per adapter
            digests = self._digests = {
                "model_sha256": dir_digest(self.model_dir),
                "adapter_sha256": dir_digest(self.adapter_dir) if self.adapter_dir else None,
                "params_sha256": names_digest(self.param_names),
            }
        return {
            "model_dir": str(self.model_dir.resolve()),
            "adapter_dir": str(self.adapter_dir.resolve()) if self.adapter_dir else None,
            "params": self.params_spec,
            "param_tensors": len(self.param_names),
            **digests,
            "num_params": self.num_params,
            "loss_on": self.loss_on,
            "max_length": self.max_length,
            "dtype": self.dtype_name,
            # quantized base weights give other gradients; placement and checkpointing do not
            **({"quantize": self.quantize} if self.quantize != "none" else {}),
        }

    # -- tokenization ----------------------------------------------------------------------
    def encode(self, examples: Sequence[FormattedText]) -> EncodedBatch:
        """Tokenize, right-pad, and label only the tokens whose loss is traced."""
        tok = self.tokenizer
        encoded: list = [None] * len(examples)
        for special in (True, False):  # chat texts carry their own BOS, as in training
            which = [i for i, e in enumerate(examples) if e.add_special_tokens == special]
            if which:
                enc = tok([examples[i].text for i in which], add_special_tokens=special,
                          truncation=False, return_offsets_mapping=True)
                for j, i in enumerate(which):
                    encoded[i] = (enc["input_ids"][j], enc["offset_mapping"][j])
        rows_in = self.model.get_input_embeddings().num_embeddings
        for (ids, _), ex in zip(encoded, examples, strict=True):
            if ids and max(ids) >= rows_in:  # an added token the embedding never had
                token = tok.convert_ids_to_tokens(max(ids))
                raise UserError(f"the text {ex.text[:60]!r} has token {token!r} (id "
                                f"{max(ids)}), past the model's {rows_in} embedding rows: the "
                                "tokenizer is not the one the model was trained with")
        rows, labels, cut = [], [], []
        bos = tok.bos_token_id
        for (ids, offsets), ex in zip(encoded, examples, strict=True):
            lab = list(ids)
            if self.loss_on == "response" or ex.response_end is not None:
                # A token is traced when it overlaps a traced span (the response, a focused
                # part of it, or a chat's assistant turns); special tokens the tokenizer adds
                # (offset (0, 0)) are prompt.
                spans = ex.traced_spans()
                lab = [
                    t if any(end > lo and begin < hi for lo, hi in spans) else -100
                    for t, (begin, end) in zip(ids, offsets, strict=True)
                ]
            how = ""
            if len(ids) > self.max_length:
                first = next((i for i, (_, end) in enumerate(offsets)
                              if end > ex.response_start), len(ids))
                prefix = 1 if bos is not None and ids[0] == bos and \
                    (offsets[0] == (0, 0) or not ex.add_special_tokens) else 0
                window, how = _window(len(ids), first, self.max_length, prefix)
                keep = [*range(prefix), *window]
                ids, lab = [ids[i] for i in keep], [lab[i] for i in keep]
            rows.append(ids)
            labels.append(lab)
            cut.append(how)
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        label_t = torch.full((len(rows), width), -100, dtype=torch.long)
        for i, (r, lab) in enumerate(zip(rows, labels, strict=True)):
            input_ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            label_t[i, : len(lab)] = torch.tensor(lab, dtype=torch.long)
        return EncodedBatch(input_ids=input_ids, labels=label_t, cut=cut)

    # -- loss and gradients ----------------------------------------------------------------
    def _trainable(self) -> dict[str, torch.Tensor]:
        params = dict(self.model.named_parameters())
        return {n: params[n].detach() for n in self.param_names}

    def _example_loss(self, params, input_ids: torch.Tensor, labels: torch.Tensor):
        """Mean next-token loss of one (unbatched) example; labels -100 are ignored."""
        from torch.func import functional_call

        ids = input_ids.unsqueeze(0)
        # An all-ones mask: right padding + causal attention already hide pads from real
        # tokens, and passing a mask stops HF from inspecting ids for pads (data-dependent).
        out = functional_call(self.model, params, (ids,),
                              {"attention_mask": torch.ones_like(ids), "use_cache": False})
        logits = out.logits[0, :-1].float()
        targets = labels[1:].to(logits.device)
        mask = targets != -100
        nll = torch.nn.functional.cross_entropy(
            logits, targets.clamp(min=0), reduction="none"
        )
        return (nll * mask).sum() / mask.sum().clamp(min=1)

    def losses(self, examples: Sequence[FormattedText]) -> np.ndarray:
        """Per-example loss (no gradient), e.g. to check a model learned a row."""
        batch = self.encode(examples)
        out = []
        with torch.no_grad():
            for ids, lab in zip(batch.input_ids, batch.labels, strict=True):
                loss, oom = _unless_out_of_memory(lambda i=ids, lb=lab: float(
                    self._example_loss(self._trainable(), i.to(self.device),
                                       lb.to(self.device))))
                if oom:  # one row that does not fit: one line (raises)
                    self._smaller_batch(EncodedBatch(ids[None], lab[None], [""]))
                out.append(loss)
        return np.asarray(out)

    def gradients(
        self,
        examples: Sequence[FormattedText],
        batch_size: int = 8,
        progress=None,
        strategy: str = "auto",
        names: Sequence[object] | None = None,
        warn: bool = True,
        factors: dict | None = None,
        sampled_labels: torch.Generator | None = None,
        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> np.ndarray:
        """Flattened per-example loss gradients over the selected parameters, (n, d) float32;
        `factors` (a dict) also gathers each weight's Kronecker factors (hooks only, see
        `linear_hooks.per_example_grads`). `sampled_labels` (with `factors`): the targets
        are drawn from the model's own predictions at the answer positions, and the loss
        is their sum / sqrt(tokens): gradients whose outer products estimate the true
        Fisher (the Gauss-Newton Hessian of the mean loss) rather than the empirical one.
        `reduce`: each batch's (b, d) gradients, on the device they were computed on, are
        handed to it and only what it returns, (b, m), is kept: (n, m), float32 or what it
        returns if wider. A store build projects there, so a row's d numbers never leave
        the GPU, only its K; an exact re-rank keeps only each row's dots with the query.

        strategy: "hooks" (one batched backward; linear-layer parameters such as LoRA only),
        "vmap" (torch.func, any parameter), "loop" (one backward per row, the reference), or
        "auto": hooks when every selected parameter is a linear layer's, else vmap, falling
        back to the loop if the model cannot run under vmap.
        """
        # where the vmap / loop paths gather a batch's (b, d) gradients: on the device only
        # for a `reduce` to run there (else the host, as they come: less device memory)
        gather = self.device if reduce is not None else torch.device("cpu")
        if reduce is None:
            def reduce(grads: torch.Tensor) -> torch.Tensor:
                return grads
        if not examples:
            self.last_report = {"prompt": [], "answer": [], "unscored": []}
            empty = reduce(torch.zeros((0, self.num_params), device=self.device)).cpu().numpy()
            return empty.astype(np.result_type(empty.dtype, np.float32))
        out = None  # (n, width of what `reduce` keeps), made once the first batch is in
        report: dict[str, list[int]] = {"prompt": [], "answer": [], "unscored": []}
        order = length_order(examples)  # similar lengths share a batch: less padding
        start, batch_size = 0, min(batch_size, self.batch_limit or batch_size)
        while start < len(examples):
            take = order[start : start + batch_size]
            batch = self.encode([examples[i] for i in take])
            summed = None if factors is None else {}  # this batch's, added once it is done
            kept, oom = _unless_out_of_memory(  # only what `reduce` keeps leaves the device
                lambda b=batch, f=summed: reduce(
                    self._batch_gradients(b, strategy, gather) if f is None else
                    self._hook_gradients(b.input_ids.to(self.device), b.labels.to(self.device),
                                         f, sampled_labels)).detach().cpu().numpy())
            if oom:
                batch_size = self._smaller_batch(batch)
                continue  # the same rows again, fewer at a time
            if out is None:  # float32 gradients and projections; float64 where reduced so
                out = np.empty((len(examples), kept.shape[1]),
                               dtype=np.result_type(kept.dtype, np.float32))
            out[take] = kept
            if summed is not None:
                _merge_factors(factors, summed)
            for j, how in enumerate(batch.cut):
                if how:
                    report[how].append(int(take[j]))
            report["unscored"] += [int(take[j]) for j in batch.unscored()]
            start += len(take)
            if progress is not None:
                progress(len(take))
        self.last_report = {k: sorted(v) for k, v in report.items()}
        if warn:
            self.warn_report(self.last_report, len(examples), names)
        return out

    def _smaller_batch(self, batch: EncodedBatch) -> int:
        """After running out of memory on `batch`: half as many rows from now on, for this
        model's life (the rows come shortest first, so later batches would not fit either);
        one row that does not fit is one line saying what would help."""
        from accelerate.utils.memory import clear_device_cache

        rows, tokens = batch.input_ids.shape
        clear_device_cache(garbage_collection=True)
        if rows == 1:
            tries = [t for t, used in (("--gradient-checkpointing", self.checkpointing),
                                       ("--quantize 4bit", self.quantize == "4bit"))
                     if not used] + ["a smaller --max-length", "a larger device"]
            raise UserError(f"out of memory on {self.device} with one row of {tokens} "
                            f"tokens: try {', '.join(tries[:-1])} or {tries[-1]}")
        self.batch_limit = (rows + 1) // 2
        from datablame import progress

        each = f"{self.batch_limit} row{'s' if self.batch_limit > 1 else ''}"
        progress.note(f"out of memory on {self.device} with {rows} rows of {tokens} tokens: "
                      f"going on with {each} per batch")
        return self.batch_limit

    def warn_report(self, report: dict[str, list[int]], total: int,
                    names: Sequence[object] | None = None) -> None:
        """Say which texts were cut to max length or have nothing to score, by name."""
        def which(idx: list[int]) -> str:
            label = [str(names[i]) if names is not None else str(i) for i in idx]
            kind = "rows" if names is not None else "texts"
            more = f", ... ({len(idx) - 10} more)" if len(idx) > 10 else ""
            return f"{len(idx)} of {total} {kind} ({', '.join(label[:10])}{more})"

        if report.get("prompt"):
            warnings.warn(f"{which(report['prompt'])} are longer than max length "
                          f"{self.max_length} tokens: kept the answer, cut the prompt's head",
                          stacklevel=3)
        if report.get("answer"):
            warnings.warn(f"{which(report['answer'])} have an answer longer than max length "
                          f"{self.max_length} tokens: kept its beginning", stacklevel=3)
        if report.get("unscored"):
            warnings.warn(f"{which(report['unscored'])} have no answer tokens to score "
                          "(empty answer?): their gradient is zero and they cannot be found",
                          stacklevel=3)

    def token_gradients(self, example: FormattedText, against: np.ndarray,
                        batch_size: int = 16) -> tuple[list[tuple[int, int]], np.ndarray] | None:
        """Each traced token's part of the example's gradient, dotted with each vector of
        `against` (k, d): (character spans in `example.text`, (T, k)) whose rows sum to
        `gradients([example])[0] @ against.T` (the loss is the mean over traced tokens, so
        each part is one token's gradient / T). A batch of token gradients is reduced as
        it is computed: memory holds `batch_size` x d, never T x d. None for a text cut to
        fit max length (its offsets no longer line up)."""
        batch = self.encode([example])
        if batch.cut[0]:
            return None
        labels = batch.labels[0]
        positions = [int(p) for p in (labels[1:] != -100).nonzero()[:, 0] + 1]
        if not positions:
            return None
        offsets = self.tokenizer(example.text, add_special_tokens=example.add_special_tokens,
                                 return_offsets_mapping=True)["offset_mapping"]
        against = np.asarray(against, dtype=np.float64).reshape(-1, self.num_params)
        parts = []
        start, batch_size = 0, min(batch_size, self.batch_limit or batch_size)
        while start < len(positions):
            take = positions[start:start + batch_size]
            ids = batch.input_ids.repeat(len(take), 1)
            one = torch.full_like(ids, -100)
            for i, p in enumerate(take):
                one[i, p] = labels[p]
            tokens = EncodedBatch(ids, one, [""] * len(take))
            grads, oom = _unless_out_of_memory(
                lambda t=tokens: self._batch_gradients(t, "auto").cpu().numpy())
            if oom:  # the same tokens again, fewer at a time
                batch_size = self._smaller_batch(tokens)
                continue
            parts.append(grads.astype(np.float64) @ against.T)
            start += len(take)
        return [tuple(offsets[p]) for p in positions], np.concatenate(parts) / len(positions)

    def check_scored(self, example: FormattedText, what: str = "the query") -> None:
        """Refuse a text whose traced tokens are all gone: every row would score 0."""
        batch = self.encode([example])
        if batch.unscored():
            raise UserError(f"{what} has no tokens to trace (the answer or focus span is "
                            "empty after tokenization): give the answer the model produced")
        from datablame import progress

        if batch.cut[0]:
            part = "the prompt's head" if batch.cut[0] == "prompt" else "the answer's end"
            progress.note(f"{what} is longer than max length {self.max_length} tokens: "
                          f"{part} was cut")
        unk = getattr(self.tokenizer, "unk_token_id", None)
        traced = batch.input_ids[0][batch.labels[0] != -100]
        unknown = int((traced == unk).sum()) if unk is not None else 0
        if unknown >= 3 and unknown * 2 > len(traced):  # not one odd word in a short answer
            progress.note(f"{what}: {unknown} of {len(traced)} traced "
                          f"tokens are the tokenizer's unknown token "
                          f"({self.tokenizer.unk_token}), which the model sees as one token "
                          "whatever the word: its scores say little (is this the model's "
                          "own tokenizer and language?)")

    def _batch_gradients(self, batch: EncodedBatch, strategy: str,
                         gather: torch.device | None = None) -> torch.Tensor:
        """(b, d) float32 per-example gradients: on the device they were computed on by the
        hooks; the vmap and loop paths gather them on `gather` (default: the host)."""
        gather = gather or torch.device("cpu")
        ids = batch.input_ids.to(self.device)
        labels = batch.labels.to(self.device)
        if strategy == "hooks" or (strategy == "auto" and self._hooks_ok):
            return self._hook_gradients(ids, labels)
        use_vmap = strategy == "vmap" or (strategy == "auto" and self._vmap_ok is not False)
        if use_vmap:
            try:
                grads = self._vmap_gradients(ids, labels, gather)
                self._vmap_ok = True
                return grads
            except Exception as exc:  # model code that vmap cannot trace
                if strategy == "vmap" or _out_of_memory(exc):
                    raise  # out of memory: a smaller batch, not the per-row loop
                self._vmap_ok = False
                warnings.warn(
                    f"batched gradients failed for this model ({type(exc).__name__}: "
                    f"{str(exc)[:120]}); using one backward pass per row",
                    stacklevel=3,
                )
        out = torch.empty((len(ids), self.num_params), dtype=torch.float32, device=gather)
        for row, (i, lab) in enumerate(zip(ids, labels, strict=True)):
            out[row] = self._loop_gradient(i, lab)
        return out

    def _batch_losses(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(B,) mean token loss per example from one ordinary batched forward pass."""
        out = self.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
        logits = out.logits[:, :-1].float()
        targets = labels[:, 1:].to(logits.device)
        mask = targets != -100
        nll = torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), targets.clamp(min=0), reduction="none"
        )
        return (nll * mask).sum(1) / mask.sum(1).clamp(min=1)

    def _sampled_losses(self, ids: torch.Tensor, labels: torch.Tensor,
                        generator: torch.Generator) -> torch.Tensor:
        """(B,) summed loss of targets drawn from the model's predictions at the answer
        positions, / sqrt(answer tokens): in expectation, the outer product of its
        gradient is the Gauss-Newton Hessian of the example's mean loss."""
        out = self.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
        logits = out.logits[:, :-1].float()
        mask = labels[:, 1:].to(logits.device) != -100
        with torch.no_grad():  # only the answer positions: (tokens, vocab), not (B, L, vocab)
            probs = torch.softmax(logits[mask], -1).cpu()
            targets = torch.zeros(mask.shape, dtype=torch.long)
            if len(probs):
                targets[mask.cpu()] = torch.multinomial(probs, 1, generator=generator)[:, 0]
        nll = torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), targets.to(logits.device), reduction="none")
        return (nll * mask).sum(1) / mask.sum(1).clamp(min=1).sqrt()

    def _hook_gradients(self, ids: torch.Tensor, labels: torch.Tensor,
                        factors: dict | None = None,
                        sampled_labels: torch.Generator | None = None) -> torch.Tensor:
        if sampled_labels is None:
            def loss():
                return self._batch_losses(ids, labels)
        else:
            def loss():
                return self._sampled_losses(ids, labels, sampled_labels)
        checkpointing = self._checkpointing
        if checkpointing is not None:
            checkpointing.active = True
        try:
            grads = linear_hooks.per_example_grads(self.model, self.param_names, loss, factors)
        finally:
            if checkpointing is not None:
                checkpointing.active = False
        return grads

    def _vmap_gradients(self, ids: torch.Tensor, labels: torch.Tensor,
                        gather: torch.device) -> torch.Tensor:
        from torch.func import grad, vmap

        params = self._trainable()
        per_example = vmap(grad(self._example_loss), in_dims=(None, 0, 0))(params, ids, labels)
        out = torch.empty((ids.shape[0], self.num_params), dtype=torch.float32, device=gather)
        start = 0
        for n in self.param_names:  # each part copied in (layers may be on many GPUs), freed
            part = per_example.pop(n).reshape(ids.shape[0], -1)
            out[:, start:start + part.shape[1]] = part
            start += part.shape[1]
            del part
        return out

    def _loop_gradient(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Reference path: plain autograd on one example, trimmed of its padding."""
        length = int((labels != -100).nonzero().max()) + 1 if (labels != -100).any() else 1
        params = {n: p.clone().requires_grad_(True) for n, p in self._trainable().items()}
        loss = self._example_loss(params, ids[:length], labels[:length])
        grads = torch.autograd.grad(loss, [params[n] for n in self.param_names],
                                    allow_unused=True)
        return torch.cat([
            (g if g is not None else torch.zeros_like(params[n])).reshape(-1).float()
            .to(self.device) for n, g in zip(self.param_names, grads, strict=True)
        ])  # one row: its parts meet on the model's input device, then go to `gather`
