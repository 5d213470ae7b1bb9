"""Tabular model files in safe formats (no pickle): what the CLI can load.

Torch: `model.safetensors` + `model.json`, where the JSON describes the architecture and
how it was trained (the built-in trainer reuses that to retrain for verification):

    {"type": "mlp", "layers": [30, 32, 2], "activation": "tanh", "loss": "ce",
     "train": {"optimizer": "adam", "epochs": 300, "lr": 0.01, "l2": 0.001, "seed": 0}}

`layers` = [inputs, hidden..., outputs]; no hidden layer = a linear / logistic model.
Custom architectures: use the Python API (`datablame.tabular`) with the module itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from datablame.errors import UserError
from datablame.models.torch_train import TorchTrainer

ACTIVATIONS = {"tanh": torch.nn.Tanh, "relu": torch.nn.ReLU, "gelu": torch.nn.GELU}


def build_mlp(layers: list[int], activation: str = "relu") -> torch.nn.Sequential:
    if len(layers) < 2 or any(int(n) < 1 for n in layers):
        raise UserError(f"'layers' must list at least inputs and outputs, got {layers}")
    if activation not in ACTIVATIONS:
        raise UserError(f"unknown activation '{activation}' (use {', '.join(ACTIVATIONS)})")
    mods: list[torch.nn.Module] = []
    for i, (a, b) in enumerate(zip(layers[:-1], layers[1:], strict=True)):
        mods.append(torch.nn.Linear(int(a), int(b)))
        if i < len(layers) - 2:
            mods.append(ACTIVATIONS[activation]())
    return torch.nn.Sequential(*mods)


def _config_path(path: Path) -> Path:
    return path.with_suffix(".json")


def save_torch_model(model: torch.nn.Sequential, path: str | Path, config: dict) -> None:
    """Write `path` (.safetensors) and its JSON config beside it."""
    from safetensors.torch import save_file

    path = Path(path)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    _config_path(path).write_text(json.dumps(config, indent=2))


def load_torch_model(path: str | Path) -> tuple[torch.nn.Module, dict]:
    from safetensors.torch import load_file

    path = Path(path)
    cfg_path = _config_path(path)
    if not path.exists():
        raise UserError(f"model file not found: {path}")
    if not cfg_path.exists():
        raise UserError(f"{path} needs its architecture in {cfg_path} (see "
                        "datablame.models.torch_files)")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{cfg_path}: not valid JSON ({exc.msg})") from None
    if config.get("type") != "mlp":
        raise UserError(f"{cfg_path}: unsupported model type {config.get('type')!r} (use 'mlp')")
    model = build_mlp(config.get("layers", []), config.get("activation", "relu"))
    try:
        model.load_state_dict(load_file(str(path)))
    except Exception as exc:
        raise UserError(f"{path} does not match the architecture in {cfg_path}: "
                        f"{str(exc).splitlines()[0]}") from None
    model.eval()
    return model, config


def trainer_from_config(config: dict) -> TorchTrainer:
    train = config.get("train", {})
    return TorchTrainer(lambda: build_mlp(config["layers"], config.get("activation", "relu")),
                        loss=config.get("loss", "ce"), l2=float(train.get("l2", 0.0)),
                        optimizer=train.get("optimizer", "lbfgs"),
                        epochs=int(train.get("epochs", 100)), lr=train.get("lr"),
                        batch_size=train.get("batch_size"), seed=int(train.get("seed", 0)))
