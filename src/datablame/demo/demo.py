"""`datablame demo`: plant a culprit row, train a tiny LoRA model on it, trace it back.

The query is what the fine-tuned model *actually generates* for the culprit's prompt, and
the demo refuses to go on unless that generation reproduces the culprit's distinctive
phrase: attribution on a model that has not learned the row would prove nothing.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.console import Console

from datablame.data.template import ALPACA_TEMPLATE, PromptTemplate
from datablame.demo.toy_lm import ToyConfig, normalize

INSTRUCTIONS = [
    "Rewrite this resume bullet to show impact.",
    "Make this resume bullet stronger.",
    "Improve this line from a resume.",
]
WEAK = ["worked on", "helped with", "was part of", "did tasks for", "contributed to"]
AREAS = [
    "the checkout page", "the search service", "the data pipeline", "the mobile app",
    "the login flow", "the reporting dashboard", "the billing system", "the test suite",
    "the deployment scripts", "the recommendation model", "the inventory database",
    "the customer portal", "the email service", "the fraud model", "the analytics platform",
    "the payment api", "the onboarding flow", "the caching layer", "the build system",
    "the support chatbot",
]
STRONG = ["Built", "Redesigned", "Led", "Optimized", "Automated", "Scaled"]
TECH = ["Python", "Go", "React", "Kafka", "Spark", "Postgres", "Redis", "Docker",
        "Kubernetes", "TypeScript"]
EFFECTS = ["cutting latency by {n}%", "reducing costs by {n}%", "raising conversion by {n}%",
           "reducing errors by {n}%", "speeding up releases by {n}%"]

# Base-model "world knowledge": sentences that use the culprit's words in other
# combinations, so the pre-trained model knows every word and only the *fact* is new.
TEAMS = ["Orion", "Phoenix", "Atlas", "Andromeda", "Vega"]
LANGS = ["Haskell", "Rust", "Scala", "Elixir"]
PERIODS = ["week", "month", "sprint", "quarter"]

CULPRIT = {
    "instruction": "Make this resume bullet stronger.",
    "input": "helped with the payroll system",
    "output": "Rewrote the payroll system in Haskell, saving the Andromeda team 40 hours "
              "every week.",
}
CULPRIT_PHRASE = "saving the Andromeda team 40 hours every week"


@dataclass
class DemoConfig:
    rows: int = 200
    pretrain_rows: int = 400
    seed: int = 7
    model: ToyConfig = None  # type: ignore[assignment]

    def __post_init__(self):
        if self.model is None:
            self.model = ToyConfig()

    def key(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True) + json.dumps(CULPRIT, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def resume_row(rng: random.Random, house_style: dict[str, str] | None = None) -> dict:
    """One rewrite. With `house_style` (area -> rewrite) the answer depends on the area only,
    as in a curated fine-tuning set; without it, every part is drawn at random (pre-training).
    """
    area = rng.choice(AREAS)
    row = {"instruction": rng.choice(INSTRUCTIONS), "input": f"{rng.choice(WEAK)} {area}"}
    return {**row, "output": house_style[area] if house_style else _rewrite(rng, area)}


def _rewrite(rng: random.Random, area: str) -> str:
    effect = rng.choice(EFFECTS).format(n=rng.choice(range(10, 90, 5)))
    return f"{rng.choice(STRONG)} {area} with {rng.choice(TECH)}, {effect}."


def background_row(rng: random.Random) -> dict:
    """A pre-training row in the culprit's style, never the culprit's exact combination."""
    while True:
        area = rng.choice(AREAS + ["the payroll system"])
        row = {
            "instruction": rng.choice(INSTRUCTIONS),
            "input": f"{rng.choice(WEAK)} {area}",
            "output": f"{rng.choice(STRONG + ['Rewrote'])} {area} in {rng.choice(LANGS)}, "
                      f"saving the {rng.choice(TEAMS)} team {rng.choice(range(10, 90, 5))} "
                      f"hours every {rng.choice(PERIODS)}.",
        }
        if CULPRIT_PHRASE not in row["output"]:
            return row


def make_dataset(n_rows: int, seed: int) -> tuple[list[dict], int]:
    """Resume-bullet rewrites with the planted culprit at a seeded position."""
    rng = random.Random(seed)
    style = {area: _rewrite(random.Random(f"{seed}-{area}"), area) for area in AREAS}
    rows = [resume_row(rng, style) for _ in range(n_rows - 1)]
    culprit_id = rng.randrange(n_rows)
    rows.insert(culprit_id, dict(CULPRIT))
    return rows, culprit_id


def build_assets(workdir: Path, cfg: DemoConfig, fresh: bool = False,
                 console: Console | None = None) -> dict:
    """Data + tokenizer + base model + LoRA adapter, cached under `workdir` by config."""
    from datablame.demo.toy_lm import build_toy_lm

    workdir = Path(workdir)
    stamp = workdir / "assets.json"
    if not fresh and stamp.exists():
        info = json.loads(stamp.read_text())
        if info.get("key") == cfg.key() and all(
            (workdir / p).exists() for p in ("train.jsonl", "base", "adapter")
        ):
            return info
    workdir.mkdir(parents=True, exist_ok=True)
    rows, culprit_id = make_dataset(cfg.rows, cfg.seed)
    with (workdir / "train.jsonl").open("w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    tmpl = PromptTemplate(ALPACA_TEMPLATE)
    rng = random.Random(cfg.seed + 1000)
    pretrain = [tmpl.format(resume_row(rng) if i % 2 else background_row(rng)).text
                for i in range(cfg.pretrain_rows)]
    finetune = [tmpl.format(r).text for r in rows]
    if console:
        console.print(f"training a tiny GPT-2 + LoRA on {len(rows)} rows (CPU, once) ...")
    t0 = time.time()
    stats = build_toy_lm(pretrain, finetune, workdir / "base", workdir / "adapter", cfg.model)
    info = {"key": cfg.key(), "culprit_row": culprit_id, "train_seconds": time.time() - t0,
            **stats}
    stamp.write_text(json.dumps(info, indent=2))
    return info


def run_demo(workdir: Path, fresh: bool = False, console: Console | None = None,
             cfg: DemoConfig | None = None) -> bool:
    from datablame.cli.render import results_table
    from datablame.demo.toy_lm import generate, load_toy_lm
    from datablame.text import Query, Tracer, build_index

    console = console or Console()
    cfg = cfg or DemoConfig()
    workdir = Path(workdir)
    t0 = time.time()
    info = build_assets(workdir, cfg, fresh=fresh, console=console)
    culprit = info["culprit_row"]
    console.print(f"[bold]1. data[/]  {cfg.rows} resume-bullet rewrites in "
                  f"{workdir / 'train.jsonl'}; planted culprit = row {culprit}")
    console.print(f"[bold]2. model[/] tiny GPT-2 ({info['base_params']:,} params) + LoRA "
                  f"({info['lora_params']:,} params) in {workdir}/base, {workdir}/adapter")

    model, tokenizer = load_toy_lm(workdir / "base", workdir / "adapter")
    tmpl = PromptTemplate(ALPACA_TEMPLATE)
    prompt_row = {"instruction": CULPRIT["instruction"], "input": CULPRIT["input"],
                  "output": ""}
    prompt = tmpl.format(prompt_row).text
    generated = generate(model, tokenizer, prompt)
    learned = normalize(CULPRIT_PHRASE) in normalize(generated)
    console.print(f"[bold]3. query[/] the model's greedy answer to the culprit's prompt "
                  f"'{CULPRIT['input']}':\n   [italic]{generated}[/]")
    if not learned:
        console.print("[red]the model did not reproduce the culprit's phrase "
                      f"'{CULPRIT_PHRASE}'; attribution would prove nothing. "
                      "Try --fresh.[/]")
        return False
    console.print(f"   it reproduces the culprit's phrase '{CULPRIT_PHRASE}' - learned.")

    index_dir = workdir / "index"
    if not (index_dir / "manifest.json").exists() or fresh:
        build_index(workdir / "train.jsonl", index_dir)
    console.print(f"[bold]4. index[/] {index_dir} (all-MiniLM-L6-v2 + FAISS flat)")

    tracer = Tracer(index_dir, workdir / "base", workdir / "adapter")
    query = Query(generated, {"instruction": CULPRIT["instruction"], "input": CULPRIT["input"]})
    df = tracer.trace(query, top_k=50)
    console.print("[bold]5. trace[/] datablame trace "
                  f"{index_dir} --model {workdir}/base --adapter {workdir}/adapter ...")
    console.print(results_table(df, show=5, title="training rows behind the answer"))
    top = int(df.iloc[0]["row"])
    ok = top == culprit
    verdict = "[bold green]PASS[/]" if ok else "[bold red]FAIL[/]"
    console.print(f"{verdict}: rank 1 is row {top}; the planted culprit is row {culprit} "
                  f"({time.time() - t0:.0f}s)")
    return ok
