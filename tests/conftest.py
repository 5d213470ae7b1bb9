"""Shared fixtures: tiny models built here, never downloaded."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _run_outside_the_checkout(tmp_path_factory, monkeypatch):
    """Every test runs in an empty directory, so a default output path (verify.json,
    trace.json) lands there and never in the checkout."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    with path.open("w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    return path


@pytest.fixture(scope="session")
def random_lora_model(tmp_path_factory):
    """An untrained tiny GPT-2 + LoRA (random A and B) saved to disk: fast gradient checks."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    from datablame.demo.toy_lm import train_tokenizer

    root = tmp_path_factory.mktemp("random_lora")
    texts = ["### Instruction :\n say hi\n\n### Response :\n hello there friend .",
             "the quick brown fox jumps over the lazy dog again and again ,"]
    tok = train_tokenizer(texts, root / "base")
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                     pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    GPT2LMHeadModel(cfg).save_pretrained(root / "base")
    base = GPT2LMHeadModel.from_pretrained(root / "base")
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
                      fan_in_fan_out=True, init_lora_weights=False, task_type="CAUSAL_LM")
    get_peft_model(base, lora).save_pretrained(root / "adapter")
    return root / "base", root / "adapter"


@pytest.fixture(scope="session")
def demo_assets(tmp_path_factory):
    """The demo's planted-culprit dataset and a LoRA model that really learned it."""
    from datablame.demo.demo import DemoConfig, build_assets
    from datablame.text import build_index

    root = tmp_path_factory.mktemp("demo")
    info = build_assets(root, DemoConfig())
    build_index(root / "train.jsonl", root / "index")
    return root, info


@pytest.fixture(scope="session")
def gradient_index(demo_assets, tmp_path_factory):
    """The demo index plus a gradient store over every row (default K)."""
    import shutil

    from datablame.text import GradientOptions, build_index

    root, _ = demo_assets
    idx = tmp_path_factory.mktemp("gradidx") / "idx"
    shutil.copytree(root / "index", idx)
    build_index(root / "train.jsonl", idx,  # keeps the existing retrieval index
                gradients=GradientOptions(root / "base", root / "adapter", shard_rows=64))
    return idx
