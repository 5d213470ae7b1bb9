"""Reproducible LoRA fine-tuning: the same recipe and the same rows give the same adapter.

Verification by retraining (`text_verify.py`) re-fine-tunes without some rows and compares;
that is only evidence when everything else about the run is the same. So every source of
randomness is pinned to the recipe's seed: the LoRA initialisation, the data order of
each epoch (drawn from `seed` and the epoch, not from a running generator, so a run
resumed at an epoch boundary continues exactly as an uninterrupted one), and dropout.

The recipe is saved next to the adapter (`datablame_recipe.json`) with what it was run on
(base model by content, rows by fingerprint, which rows were kept), and Adam's moments
(`optimizer_state.safetensors`, keyed by parameter name: the second moments are what
TrackStar-style preconditioning reads). A user who fine-tuned elsewhere writes the same
recipe by hand (YAML or JSON) so `verify` can retrain the way they did.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch

from datablame import __version__, progress
from datablame.data.template import ALPACA_TEMPLATE, FormattedText, PromptTemplate, unescape
from datablame.errors import UserError
from datablame.store.atomic import write_json_atomic

RECIPE_FILE = "datablame_recipe.json"
CHAT = "chat"  # recipe template: render rows with the base model's chat template
OPTIMIZER_FILE = "optimizer_state.safetensors"
SCHEDULES = ("constant", "linear", "cosine")
# Fields a hand-written recipe must state: they decide what the adapter learns, and a
# silent default for any of them would retrain a different model than the user's.
REQUIRED = ("rank", "alpha", "lr", "epochs", "batch_size", "seed")


@dataclass(frozen=True)
class Recipe:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ()  # empty: PEFT's default for the architecture
    lr: float = 2e-4
    schedule: str = "linear"
    warmup: float = 0.0  # fraction of the steps
    weight_decay: float = 0.0
    epochs: int = 3
    batch_size: int = 8
    seed: int = 0
    loss_on: str = "response"  # response | text
    max_length: int | None = None  # None: 512, or the model's positions if fewer
    template: str = ALPACA_TEMPLATE  # or "chat": the base model's own chat template
    response_field: str | None = None  # None: the template's last field
    chat_turns: str = "all"  # chat rows: the loss on all assistant turns, or the last
    # > 0: AdamW divides by sqrt(v_hat + adam_eps_root), as MAGIC's "metasmooth" training
    # does; 0 is torch's AdamW exactly
    adam_eps_root: float = 0.0

    def check(self) -> Recipe:
        for name in ("rank", "epochs", "batch_size", "max_length"):
            if getattr(self, name) is not None and int(getattr(self, name)) < 1:
                raise UserError(f"recipe: {name} must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0 or self.alpha <= 0:
            raise UserError("recipe: lr and alpha must be positive")
        if not 0 <= self.dropout < 1 or not 0 <= self.warmup < 1 or self.weight_decay < 0:
            raise UserError("recipe: dropout and warmup must be in [0, 1), weight_decay >= 0")
        if not self.adam_eps_root >= 0:
            raise UserError(f"recipe: adam_eps_root must be >= 0, got {self.adam_eps_root}")
        if self.schedule not in SCHEDULES:
            raise UserError(f"recipe: unknown schedule '{self.schedule}' (use "
                            f"{', '.join(SCHEDULES)})")
        if self.chat_turns not in ("all", "last"):
            raise UserError(f"recipe: chat_turns must be all or last, got '{self.chat_turns}'")
        if self.loss_on not in ("response", "text"):
            raise UserError(f"recipe: loss_on must be response or text, got '{self.loss_on}'")
        return self

    def prompt_template(self, base_dir: str | os.PathLike | None = None,
                        columns: list[str] | None = None):
        """How rows become text: the `{field}` template, or with `template: chat` the base
        model's chat template (conversations in `columns`' messages/conversations field)."""
        if self.template != CHAT:
            return PromptTemplate(self.template, self.response_field)
        from datablame.data.chat import ChatTemplate, chat_field

        if base_dir is None:
            raise UserError("recipe: template chat needs the base model's directory")
        return ChatTemplate.from_model(base_dir, messages_field=chat_field(columns or [])
                                       or "messages", assistant_turns=self.chat_turns)

    def to_json(self) -> dict:
        data = asdict(self)
        data["target_modules"] = list(self.target_modules)
        if not self.adam_eps_root:  # recipes recorded before the field existed still match
            del data["adam_eps_root"]
        return data

    @classmethod
    def from_dict(cls, data: dict, where: str = "recipe") -> Recipe:
        if not isinstance(data, dict):
            raise UserError(f"{where}: expected a mapping of recipe fields")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"{where}: unknown field(s) {', '.join(unknown)} (known: "
                            f"{', '.join(sorted(known))})")
        missing = [name for name in REQUIRED if name not in data]
        if missing:
            raise UserError(f"{where}: missing field(s) {', '.join(missing)} (a recipe must "
                            f"state {', '.join(REQUIRED)})")
        values = dict(data)
        if isinstance(values.get("target_modules"), str):
            values["target_modules"] = [m.strip() for m in values["target_modules"].split(",")]
        values["target_modules"] = tuple(values.get("target_modules") or ())
        if isinstance(values.get("template"), str):
            values["template"] = unescape(values["template"])  # "\\n" typed in a file
        try:
            types = {"rank": int, "epochs": int, "batch_size": int, "seed": int,
                     "alpha": float, "lr": float, "dropout": float,
                     "warmup": float, "weight_decay": float, "adam_eps_root": float}
            for name, kind in types.items():
                if name in values:
                    values[name] = kind(values[name])
            if values.get("max_length") is not None:
                values["max_length"] = int(values["max_length"])
        except (TypeError, ValueError) as exc:
            raise UserError(f"{where}: {exc}") from None
        return cls(**values).check()

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Recipe:
        """A YAML or JSON recipe (a file `finetune` wrote holds it under "recipe")."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"recipe file not found: {path}")
        text = path.read_text(encoding="utf-8")
        try:
            if path.suffix.lower() in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(text)
            else:
                data = json.loads(text)
        except Exception as exc:  # yaml.YAMLError / json.JSONDecodeError
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"{path}: not a valid recipe file ({first})") from None
        if isinstance(data, dict) and "recipe" in data and isinstance(data["recipe"], dict):
            data = data["recipe"]
        return cls.from_dict(data, str(path))


def recipe_of_adapter(adapter_dir: str | os.PathLike) -> Recipe | None:
    path = Path(adapter_dir) / RECIPE_FILE
    return Recipe.from_file(path) if path.exists() else None


def check_recipe_fits_adapter(recipe: Recipe, adapter_dir: str | os.PathLike) -> None:
    """Refuse a recipe that would retrain a different adapter than the one traced."""
    path = Path(adapter_dir) / "adapter_config.json"
    if not path.exists():
        raise UserError(f"{adapter_dir} has no adapter_config.json: not a PEFT adapter")
    config = json.loads(path.read_text())
    problems = []
    if int(config.get("r", recipe.rank)) != recipe.rank:
        problems.append(f"rank {recipe.rank} vs the adapter's {config.get('r')}")
    if float(config.get("lora_alpha", recipe.alpha)) != recipe.alpha:
        problems.append(f"alpha {recipe.alpha:g} vs the adapter's {config.get('lora_alpha')}")
    trained = config.get("target_modules")
    if recipe.target_modules and trained is not None:
        trained = [trained] if isinstance(trained, str) else list(trained)
        if sorted(trained) != sorted(recipe.target_modules):
            problems.append(f"target modules {', '.join(recipe.target_modules)} vs the "
                            f"adapter's {', '.join(sorted(trained))}")
    if problems:
        raise UserError(f"the recipe does not match the adapter {adapter_dir}: "
                        f"{'; '.join(problems)}")


def rows_digest(row_ids) -> str:
    return hashlib.sha256(np.asarray(sorted(row_ids), dtype=np.int64).tobytes()).hexdigest()


def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=gen).tolist()


def step_batches(n: int, recipe: Recipe) -> list[list[int]]:
    """The rows (0..n-1, positions among the rows kept) of every optimizer step, in the
    order `finetune` takes them."""
    return [order[start:start + recipe.batch_size]
            for epoch in range(recipe.epochs)
            for order in [_epoch_order(n, recipe.seed, epoch)]
            for start in range(0, n, recipe.batch_size)]


def learning_rates(recipe: Recipe, total: int) -> list[float]:
    """The learning rate of each of `total` steps under the recipe's schedule."""
    dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=recipe.lr)
    sched = _scheduler(dummy, recipe, total)
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()"
        for _ in range(total):
            out.append(float(dummy.param_groups[0]["lr"]))
            sched.step()
    return out


def lora_model(lm, recipe: Recipe):
    """(PEFT model, names of its LoRA parameters) initialised from the recipe's seed:
    `finetune` and its replay (methods/magic.py) start from the same adapter."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(recipe.seed)
    lora = LoraConfig(r=recipe.rank, lora_alpha=recipe.alpha, lora_dropout=recipe.dropout,
                      target_modules=list(recipe.target_modules) or None,
                      task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fan_in_fan_out notices for GPT-2's Conv1D
        try:
            model = get_peft_model(lm.model, lora)
        except ValueError as exc:
            raise UserError(f"recipe: {str(exc).splitlines()[0]}") from None
    names = [n for n, p in model.named_parameters() if "lora_" in n]
    params = dict(model.named_parameters())
    for n in names:
        params[n].requires_grad_(True)
    return model, names


def _scheduler(opt, recipe: Recipe, total: int):
    from transformers import get_scheduler

    name = "constant_with_warmup" if recipe.schedule == "constant" else recipe.schedule
    return get_scheduler(name, opt, num_warmup_steps=int(recipe.warmup * total),
                         num_training_steps=total)


def _save_optimizer(opt, names: list[str], path: Path, step: int) -> None:
    from safetensors.torch import save_file

    state = opt.state_dict()["state"]
    tensors = {}
    for idx, name in enumerate(names):
        for key in ("exp_avg", "exp_avg_sq"):
            if idx in state and key in state[idx]:
                tensors[f"{name}.{key}"] = state[idx][key].contiguous()
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"step": str(step)})
    os.replace(tmp, path)


def _load_optimizer(opt, names: list[str], path: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        step = float(fh.metadata()["step"])
        state = {idx: {"step": torch.tensor(step),
                       "exp_avg": fh.get_tensor(f"{name}.exp_avg"),
                       "exp_avg_sq": fh.get_tensor(f"{name}.exp_avg_sq")}
                 for idx, name in enumerate(names)}
    saved = opt.state_dict()
    saved["state"] = state
    opt.load_state_dict(saved)


def finetune(rows, base_dir: str | os.PathLike, out_dir: str | os.PathLike,
             recipe: Recipe | None = None, *, keep: list[int] | None = None,
             same_schedule: bool = False, show_progress: bool = True) -> dict:
    """LoRA-fine-tune `base_dir` on `rows` (a `Rows`; `keep`: only these row ids) and save
    the adapter, its recipe and Adam's moments in `out_dir`. Returns the run's summary.

    `same_schedule`: the rows left out keep their places in the full run's batches with
    weight 0, so every step, learning rate and dropout draw is the full run's: the
    single-model counterfactual that MAGIC's derivative predicts. Without it the kept rows
    are re-batched, as a user retraining on less data would.

    `out_dir` must be new, empty or an adapter this function wrote; work goes to a sibling
    `.partial` directory, saved at every epoch, so an interrupted run resumes there."""
    from datablame.models.hf_causal_lm import CausalLMAdapter
    from datablame.store.content_digest import dir_digest

    recipe = (recipe or Recipe()).check()
    out = Path(out_dir)
    check_out_dir(out)
    template = recipe.prompt_template(base_dir, rows.columns)
    template.check_rows(rows)
    keep = list(range(len(rows))) if keep is None else sorted(int(i) for i in keep)
    if not keep:
        raise UserError("no training rows left to fine-tune on")
    scheduled = list(range(len(rows))) if same_schedule else keep
    texts = [template.format(rows.records[i]) for i in scheduled]
    kept = set(keep)
    weights = (torch.tensor([float(i in kept) for i in scheduled]) if same_schedule
               else None)
    identity = {"recipe": recipe.to_json(), "base_model": str(base_dir),
                "base_digest": dir_digest(base_dir), "data_fingerprint": rows.fingerprint(),
                "n_rows": len(rows), "rows_kept": len(keep), "rows_digest": rows_digest(keep),
                **({"schedule": "same as on every row, left-out rows weigh 0"}
                   if same_schedule else {}),
                "datablame": __version__, "torch": torch.__version__}
    partial = out.with_name(f".{out.name}.partial")
    done_epochs = _resume_point(partial, identity)

    lm = CausalLMAdapter(base_dir, None, params="all", max_length=recipe.max_length,
                         loss_on=recipe.loss_on)
    model, names = lora_model(lm, recipe)
    if done_epochs:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(model, load_file(str(partial / "adapter_model.safetensors")))
    params = dict(model.named_parameters())
    trainable = [params[n] for n in names]
    opt = (SmoothAdamW(trainable, lr=recipe.lr, weight_decay=recipe.weight_decay,
                       eps_root=recipe.adam_eps_root) if recipe.adam_eps_root > 0 else
           torch.optim.AdamW(trainable, lr=recipe.lr, weight_decay=recipe.weight_decay))
    per_epoch = (len(texts) + recipe.batch_size - 1) // recipe.batch_size
    sched = _scheduler(opt, recipe, per_epoch * recipe.epochs)
    if done_epochs:
        _load_optimizer(opt, names, partial / OPTIMIZER_FILE)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()"
            for _ in range(done_epochs * per_epoch):
                sched.step()
    model.train()
    losses: list[float] = []
    steps_left = (recipe.epochs - done_epochs) * per_epoch if show_progress else 0
    with progress.task("fine-tuning", steps_left) as advance:
        for epoch in range(done_epochs, recipe.epochs):
            torch.manual_seed(recipe.seed * 100_003 + epoch)  # dropout
            order = _epoch_order(len(texts), recipe.seed, epoch)
            for start in range(0, len(order), recipe.batch_size):
                ids = order[start:start + recipe.batch_size]
                loss = _batch_loss(model, lm, [texts[i] for i in ids],
                                   None if weights is None else weights[ids])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                losses.append(float(loss.detach()))
                advance(1)
            _save_epoch(model, opt, names, partial, identity, epoch + 1, per_epoch)
    model.eval()
    summary = {**identity, "epochs_done": recipe.epochs, "final_loss": losses[-1] if losses
               else None, "steps": per_epoch * recipe.epochs}
    write_json_atomic(partial / RECIPE_FILE, summary)
    (partial / "state.json").unlink(missing_ok=True)
    _replace_dir(partial, out)
    return summary


class SmoothAdamW(torch.optim.Optimizer):
    """torch's AdamW with eps_root inside the square root:

        theta <- theta (1 - lr wd) - lr m_hat / (sqrt(v_hat + eps_root) + eps)

    Why: a parameter whose gradients are still near zero (LoRA's A while B is 0) has
    v_hat near 0, where m_hat / sqrt(v_hat) is a near-sign step whose derivative is huge:
    removing one row can flip it, so the trained weights jump instead of moving smoothly
    with the row weights, and no derivative (MAGIC's) can predict them. eps_root bounds
    that slope. Same state keys as AdamW (exp_avg, exp_avg_sq, step)."""

    def __init__(self, params, lr: float, weight_decay: float = 0.0, eps_root: float = 1e-8,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "betas": betas,
                                  "eps": eps, "eps_root": eps_root})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                k = float(state["step"])
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(p.grad, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                denom = (v / (1 - beta2 ** k) + group["eps_root"]).sqrt_().add_(group["eps"])
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.addcdiv_(m, denom, value=-group["lr"] / (1 - beta1 ** k))
        return None


def _batch_loss(model, lm, batch: list[FormattedText],
                weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean token loss over the batch's scored tokens, as HF computes it (with `weights`:
    `weighted_token_loss`). An all-ones mask, as for the traced gradients: right padding +
    causal attention hide pads from every real token, and pads carry no label."""
    enc = lm.encode(batch)
    ids = enc.input_ids.to(lm.device)
    if weights is None:
        return model(input_ids=ids, attention_mask=torch.ones_like(ids),
                     labels=enc.labels.to(lm.device), use_cache=False).loss
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
    return weighted_token_loss(logits, enc.labels.to(lm.device), weights.to(logits.device))


def weighted_token_loss(logits: torch.Tensor, labels: torch.Tensor,
                        weights: torch.Tensor) -> torch.Tensor:
    """sum_i w_i * (row i's token losses) / sum_i w_i * (row i's token count): with every
    weight 1 it is HF's batch loss, and w_i = 0 is the batch without row i. A batch whose
    weights are all 0 has loss 0 (AdamW still steps, on its moments)."""
    logits = logits[:, :-1]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    targets = labels[:, 1:]
    mask = (targets != -100).to(logits.dtype)
    nll = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.clamp(min=0).reshape(-1),
        reduction="none").view_as(mask)
    weights = weights.to(logits.dtype)
    return (weights * (nll * mask).sum(1)).sum() / (weights * mask.sum(1)).sum().clamp(
        min=1e-12)


def check_out_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out: {out} is a file, not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / RECIPE_FILE).exists():
        raise UserError(f"--out: {out} is not empty and not an adapter datablame fine-tuned; "
                        "refusing to write into it")


def _resume_point(partial: Path, identity: dict) -> int:
    state = partial / "state.json"
    if not state.exists():
        if partial.exists():
            shutil.rmtree(partial)  # ours (the .partial name), never finished an epoch
        return 0
    saved = json.loads(state.read_text())
    if saved.get("identity") != identity:
        shutil.rmtree(partial)  # another recipe or other rows: start over
        return 0
    return int(saved["epochs_done"])


def _save_epoch(model, opt, names, partial: Path, identity: dict, epochs_done: int,
                per_epoch: int) -> None:
    partial.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(partial)
    _save_optimizer(opt, names, partial / OPTIMIZER_FILE, epochs_done * per_epoch)
    write_json_atomic(partial / "state.json", {"identity": identity,
                                               "epochs_done": epochs_done})


def _replace_dir(src: Path, dst: Path) -> None:
    """Move the finished run into place; an old adapter of ours there is replaced."""
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old)
    else:
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dst)
