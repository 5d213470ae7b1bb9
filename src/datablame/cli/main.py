"""The `datablame` command line: index, trace (text, here), tabular, verify (cli/tabular.py),
demo.

User errors print one line and exit with code 2 (no traceback); bugs keep their traceback.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer

from datablame import __version__, progress
from datablame.cli import audit as audit_commands
from datablame.cli import report as report_commands
from datablame.cli import status as status_commands
from datablame.cli import tabular as tabular_commands
from datablame.cli import verify as verify_commands
from datablame.cli.console import console, fail
from datablame.cli.report import check_html, write_report
from datablame.errors import UserError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="git blame for training data: find the training rows behind a model output.",
)
_fail = fail

# How a large model is loaded: the same three options on every command that loads one.
QuantizeOption = Annotated[str, typer.Option(
    help="Load the base weights in 8bit or 4bit (NF4) through bitsandbytes (needs "
         "datablame\\[quant]): a quarter of fp16's memory in 4bit, half in 8bit; the LoRA "
         "weights are traced. none: as "
         "saved.")]
DeviceMapOption = Annotated[str, typer.Option(
    help="auto: spread the model's layers over every visible GPU with accelerate, for a "
         "model larger than one GPU (layers that would be offloaded to CPU or disk are "
         "refused).")]
CheckpointingOption = Annotated[bool, typer.Option(
    "--gradient-checkpointing", help="Keep one layer's activations at a time and "
    "recompute the rest in the backward pass: less memory, ~1/3 more compute, the same "
    "gradients.")]


def _version(value: bool) -> None:
    if value:
        print(f"datablame {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version,  # noqa: UP045
                                                    is_eager=True, help="Show the version.")
                       ] = None,
) -> None:
    progress.enable(True)  # bars on a terminal, plain periodic lines in logs
    progress.enable_notes(True)
    from datablame.data.parallel_load import split_by_default

    split_by_default(True)  # a first load of a large set uses the CPUs (not the API's)


def _run_shard_workers(n: int, what: str = "gradient") -> None:
    """This `index` command again as n `--shard-of i/n` processes: one GPU each when there
    are n, else the cores split between them. Waits for all; a failed worker fails the
    build with its own error line (its finished shards are kept: rerun to resume)."""
    import os
    import subprocess
    import sys

    import torch

    args, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
        elif arg == "--workers":
            skip = True
        elif not arg.startswith("--workers="):
            args.append(arg)
    import tempfile

    gpus = torch.cuda.device_count()
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    devices = visible[:gpus] if visible else [str(d) for d in range(gpus)]
    # each worker keeps this process's CPU thread count: a matrix product sums in an order
    # that depends on it, and fewer threads would give other bytes than one process
    each = (f"GPUs {', '.join(devices)} in turn" if devices else
            "sharing the CPU cores: on a CPU, one process is usually faster")
    progress.note(f"{n} {what} workers ({each}); it is committed when all are done")
    procs, logs = [], []
    for i in range(n):
        env = dict(os.environ)
        # the rows were loaded here first (their checks kept beside them); a worker that
        # must read them again does so alone, not with a pool of its own per worker
        env.setdefault("DATABLAME_LOAD_WORKERS", "1")
        if devices:  # the i-th of the GPUs this process may use, round robin
            env["CUDA_VISIBLE_DEVICES"] = devices[i % len(devices)]
        log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115  (closed below; a pipe read in turn would block the rest)
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, "-m", "datablame", *args,
                                       "--shard-of", f"{i}/{n}"], env=env,
                                      stdout=subprocess.DEVNULL, stderr=log, text=True))
    failed = []
    for i, (proc, log) in enumerate(zip(procs, logs, strict=True)):
        proc.wait()
        log.seek(0)
        lines = [ln for ln in log.read().splitlines() if ln.strip()]
        log.close()
        if proc.returncode != 0:
            failed.append(f"worker {i}/{n}: {lines[-1] if lines else f'exit {proc.returncode}'}")
    if failed:
        _fail("; ".join(failed))


def _parse_shard_of(text: str) -> tuple[int, int]:
    try:
        i, n = (int(part) for part in text.split("/"))
    except ValueError:
        _fail(f"--shard-of expects I/N (worker I of N, e.g. 0/4), got '{text}'")
    if n < 1 or not 0 <= i < n:
        _fail(f"--shard-of {text}: I must be in 0..N-1")
    return i, n


@app.command()
def index(
    train_file: Annotated[Path, typer.Argument(help="Training rows: .jsonl, .json, .csv or "
                                                    ".parquet; a folder or glob of such "
                                                    "shards; a save_to_disk directory.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Index directory to write.")],
    split: Annotated[str, typer.Option(help="The split of a dataset directory (default: "
                                            "train, or every shard).")] = "",
    template: Annotated[str, typer.Option(help="Prompt template with {field} placeholders "
                                               "(default: Alpaca).")] = "",
    template_file: Annotated[Optional[Path], typer.Option(help="Read the template from a "  # noqa: UP045
                                                               "file.")] = None,
    response_field: Annotated[str, typer.Option(help="Field holding the model's answer "
                                                     "(default: the template's last).")] = "",
    embedder: Annotated[str, typer.Option(help="all-MiniLM-L6-v2 (bundled) or a local "
                                               "sentence-transformers directory.")] = "",
    index_type: Annotated[str, typer.Option(help="flat (exact), ivf, hnsw, or ivfpq (large "
                                                 "data: compressed lists on disk, exact "
                                                 "re-rank).")] = "flat",
    batch_size: Annotated[int, typer.Option(help="Rows per embedding batch.")] = 64,
    gradients: Annotated[bool, typer.Option("--gradients", help="Also store every row's "
                                            "projected gradient (needs --model).")] = False,
    model: Annotated[Optional[Path], typer.Option(help="Base model directory, for "  # noqa: UP045
                                                       "--gradients.")] = None,
    adapter: Annotated[Optional[Path], typer.Option(help="PEFT LoRA adapter directory.")  # noqa: UP045
                       ] = None,
    proj_dim: Annotated[int, typer.Option(help="Projected gradient dimension K.")] = 2048,
    seed: Annotated[int, typer.Option(help="Projection seed.")] = 0,
    projection: Annotated[str, typer.Option(help="countsketch (sparse, fast) or rademacher "
                                                 "(dense).")] = "countsketch",
    params: Annotated[str, typer.Option(help="auto (LoRA B if --adapter, else all), lora-b, "
                                             "lora, all, or regexes.")] = "auto",
    curvature: Annotated[Optional[str], typer.Option(  # noqa: UP045
        help="With --gradients: auto (default: both where the weights are linear / LoRA "
             "layers and the curvature takes at most 1 GiB, else none), both (plain and "
             "whitened vectors side by side; each query scored by their mix or, where its "
             "gradient is weak, the plain one), ekfac (whitened only: rows and queries "
             "whitened by a true-Fisher EK-FAC of the LoRA weights, fitted once per build) "
             "or none (plain gradients).")] = None,
    loss_on: Annotated[str, typer.Option(help="response or text.")] = "response",
    dtype: Annotated[str, typer.Option(help="fp32, bf16 or fp16.")] = "fp32",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    quantize: QuantizeOption = "none",
    device_map: DeviceMapOption = "",
    gradient_checkpointing: CheckpointingOption = False,
    max_length: Annotated[Optional[int], typer.Option(help="Tokens per text (default: 512, "  # noqa: UP045
                                                           "or the model's limit).")] = None,
    grad_batch_size: Annotated[int, typer.Option(help="Rows per gradient batch (0: as many "
                                                      "as fit ~1 GB).")] = 0,
    shard_rows: Annotated[int, typer.Option(help="Rows per gradient shard.")] = 4096,
    store_dtype: Annotated[str, typer.Option(help="fp16 or fp32 on disk.")] = "fp16",
    chat_template: Annotated[Optional[Path], typer.Option(help="Chat rows: the model "  # noqa: UP045
                             "directory whose tokenizer's chat template renders them, or a "
                             ".jinja file (default: --model).")] = None,
    chat_turns: Annotated[str, typer.Option(help="Chat rows: the loss covers all assistant "
                                                 "turns or the last.")] = "all",
    shard_of: Annotated[str, typer.Option(help="I/N: be worker I of N (a SLURM array task, "
                                               "a torchrun rank): write shards I, I+N, ... "
                                               "of the gradient store (with --gradients; the "
                                               "retrieval index must exist) or of an ivfpq "
                                               "index (--index-type ivfpq), commit "
                                               "nothing.")] = "",
    commit: Annotated[bool, typer.Option("--commit", help="Check that every --shard-of "
                                         "worker's shards are there and make the gradient "
                                         "store or ivfpq index (computes nothing).")] = False,
    ray: Annotated[str, typer.Option(help="With --gradients: build the shards with --workers "
                                          "Ray actors (one GPU each when the cluster has "
                                          "them); with --index-type ivfpq: its pieces with "
                                          "--workers Ray tasks. local (start Ray here), auto "
                                          "or HOST:PORT (join a cluster). Needs "
                                          "datablame\\[ray].")] = "",
    workers: Annotated[int, typer.Option(help="Run N --shard-of worker processes (one per "
                                              "GPU when there are N GPUs), then commit: a "
                                              "gradient store (with --gradients) or an "
                                              "ivfpq index. Same bytes as one process."
                                              )] = 1,
) -> None:
    """Embed every training row into a FAISS index; with --gradients, a gradient store too.

    Rows with a `messages` (or ShareGPT `conversations`) field are chat rows, rendered with
    the model's chat template, the loss on the assistant's turns. Rerunning an interrupted
    --gradients build continues where it stopped.
    """
    from datablame.data.chat import ChatOptions
    from datablame.data.template import unescape
    from datablame.text import GradientOptions, build_index

    if template_file is not None:
        if template:
            _fail("give the template with one of --template or --template-file")
        if not template_file.is_file():
            _fail(f"template file not found: {template_file}")
        template = template_file.read_text(encoding="utf-8")
    elif template:
        template = unescape(template)  # a shell passes "\n" as backslash + n
        progress.note(f"template: {template!r}")
    grad_opts = None
    if gradients:
        if model is None:
            _fail("--gradients needs --model (and --adapter for a LoRA model)")
        grad_opts = GradientOptions(model, adapter, params=params, dtype=dtype, device=device,
                                    quantize=quantize, device_map=device_map,
                                    checkpointing=gradient_checkpointing,
                                    max_length=max_length, loss_on=loss_on, proj_dim=proj_dim,
                                    seed=seed, shard_rows=shard_rows,
                                    batch_size=grad_batch_size, store_dtype=store_dtype,
                                    projection=projection, curvature=curvature or "auto")
        try:  # here, once: before embedding, and before --workers start processes
            from datablame.errors import check_at_least

            check_at_least("--batch-size", batch_size, 1)  # the numbers before the files
            grad_opts.check()
            if not ray:  # Ray's actors load the model on their own machines
                grad_opts.check_files()
        except UserError as exc:
            _fail(str(exc))
    elif adapter is not None:
        _fail("--adapter is only used with --gradients")
    elif quantize != "none" or device_map or gradient_checkpointing:
        _fail("--quantize, --device-map and --gradient-checkpointing load the gradient "
              "model: add --gradients --model ...")
    elif curvature not in (None, "none"):
        _fail("--curvature whitens the gradient store: add --gradients --model ...")
    chat = None
    if chat_template is not None or chat_turns != "all" or (model and not grad_opts):
        chat = ChatOptions(chat_template or model, chat_turns)
        chat.check()
        if template:
            _fail("give either a prompt template (--template) or a chat template "
                  "(--chat-template), not both")
    from datablame.errors import check_at_least

    worker = _parse_shard_of(shard_of) if shard_of else None
    check_at_least("--workers", workers, 1)
    if ray:
        if grad_opts is None and index_type != "ivfpq":
            _fail("--ray builds a gradient store (add --gradients --model ...) or an ivfpq "
                  "index (add --index-type ivfpq)")
        if worker is not None or commit:
            _fail("--ray runs the shards and the commit itself")
        if grad_opts is None:  # ivfpq pieces on Ray tasks, then the commit
            manifest = build_index(train_file, out, template=template or None, chat=chat,
                                   response_field=response_field or None,
                                   embedder=embedder or None, index_type=index_type,
                                   batch_size=batch_size, split=split or None,
                                   ray=(ray, workers))
            console.print(f"committed {len(manifest['shards'])} ivfpq index shards "
                          f"({manifest['data']['rows']} rows, {workers} Ray task(s)) -> {out}",
                          highlight=False, soft_wrap=True)
            return
        if device_map:
            _fail("--ray gives each actor one GPU: drop --device-map (a model that needs "
                  "several GPUs: build with one process)")
        manifest = build_index(train_file, out, template=template or None, chat=chat,
                               response_field=response_field or None,
                               embedder=embedder or None, index_type=index_type,
                               batch_size=batch_size, gradients=grad_opts,
                               split=split or None, ray=(ray, workers))
        console.print(f"committed {len(manifest['shards'])} gradient shards "
                      f"({manifest['rows']} rows, {workers} Ray actor(s)) -> {out}/gradients",
                      highlight=False, soft_wrap=True)
        return
    # without --gradients, --shard-of / --commit / --workers split an ivfpq retrieval index
    ivfpq_pieces = grad_opts is None and index_type == "ivfpq"
    if workers > 1:
        if grad_opts is None and not ivfpq_pieces:
            _fail("--workers splits a gradient build (add --gradients --model ...) or an "
                  "ivfpq index (add --index-type ivfpq)")
        if worker is not None or commit:
            _fail("--workers runs the --shard-of workers and the --commit itself")
        if device_map or device.startswith("cuda:"):  # each worker sees one GPU, as cuda
            _fail(f"--workers gives each worker one GPU: drop "
                  f"{'--device-map ' + device_map if device_map else '--device ' + device} "
                  "(or build with one process)")
        if ivfpq_pieces:  # refuse a bad --out here, once, not in every worker
            from datablame.store.index_dir import check_out_dir

            check_out_dir(out, {"training file": train_file})
        else:  # the gradient workers share one retrieval index
            build_index(train_file, out, template=template or None, chat=chat,
                        response_field=response_field or None, embedder=embedder or None,
                        index_type=index_type, batch_size=batch_size, split=split or None,
                        chat_model=grad_opts.model)
        _run_shard_workers(workers, "ivfpq index" if ivfpq_pieces else "gradient")
        commit = True
    if (worker is not None or commit) and grad_opts is None and not ivfpq_pieces:
        _fail("--shard-of and --commit build a gradient store (add --gradients --model ...) "
              "or an ivfpq index (add --index-type ivfpq)")
    if worker is not None and commit:
        _fail("a --shard-of worker commits nothing: run --commit once all workers are done")
    manifest = build_index(train_file, out, template=template or None, chat=chat,
                           response_field=response_field or None, embedder=embedder or None,
                           index_type=index_type, batch_size=batch_size, gradients=grad_opts,
                           split=split or None, shard_of=worker, commit=commit)
    what = "ivfpq index" if ivfpq_pieces else "gradient"
    if worker is not None:
        if manifest.get("current"):  # said in a note: nothing to write, nothing to commit
            return
        left = manifest["missing"]
        console.print(f"worker {worker[0]}/{worker[1]}: wrote {manifest['written']} of its "
                      f"{manifest['mine']} {what} shards; {len(left)} shard(s) of the "
                      f"{'index' if ivfpq_pieces else 'store'} still missing"
                      + ("" if left else "; make the "
                         f"{'index' if ivfpq_pieces else 'store'}: the same command with "
                         "--commit instead of --shard-of"),
                      highlight=False, soft_wrap=True)
        return
    if commit and ivfpq_pieces:
        console.print(f"committed {len(manifest['shards'])} ivfpq index shards "
                      f"({manifest['data']['rows']} rows) -> {out}", highlight=False,
                      soft_wrap=True)
        return
    if commit:
        console.print(f"committed {len(manifest['shards'])} gradient shards "
                      f"({manifest['rows']} rows) -> {out}/gradients" + _store_kind(out),
                      highlight=False, soft_wrap=True)
        return
    console.print(f"indexed {manifest['data']['rows']} rows from {train_file} -> {out} "
                  f"({manifest['index_type']}, {manifest['embedder']}, dim {manifest['dim']})"
                  + _store_kind(out if grad_opts is not None else None),
                  highlight=False)


def _store_kind(out: Path | None) -> str:
    """'; gradient store: K = ..., which vectors' for a build that made one."""
    if out is None:
        return ""
    from datablame.store.gradient_store import build_status

    store = build_status(out).get("store")
    return (f"; gradient store: K = {store['proj_dim']}, {store['vectors']} vectors"
            if store else "")


def _parse_fields(items: list[str], template=None) -> dict:
    """--field NAME=VALUE pairs; a chat template's conversation field is read into its
    turns here (a bad one is one line; results show turns, not a JSON string)."""
    fields: dict = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            _fail(f"--field expects NAME=VALUE, got '{item}'")
        fields[name.strip()] = value
    chat_field = getattr(template, "messages_field", None)
    if isinstance(fields.get(chat_field), str):
        from datablame.data.chat import normalize_messages

        try:
            fields[chat_field] = normalize_messages(fields[chat_field])
        except UserError as exc:
            _fail(f"--field {chat_field}: {exc}")
    return fields


def _read_query_file(path: Path, template, need_answer: bool = True
                     ) -> tuple[str, dict[str, str]]:
    """A .json object (the response field plus prompt fields, or a chat conversation that
    ends with the answer) or plain text."""
    response_field = template.response_field
    if not path.is_file():
        _fail(f"query file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            _fail(f"{path}: not valid JSON ({exc.msg})")
        chat = getattr(template, "messages_field", None)
        if isinstance(obj, list) and chat:  # a conversation given as its list of turns
            obj = {chat: obj}
        if isinstance(obj, dict) and need_answer:
            try:
                obj = template.split_answer(obj)
            except UserError as exc:
                _fail(f"{path}: {exc}")
        if not isinstance(obj, dict) or (need_answer and response_field not in obj):
            _fail(f"{path}: expected a JSON object with the '{response_field}' field" +
                  (f", or a conversation ('{chat}') ending with the assistant's turn"
                   if chat else ""))
        output = str(obj.pop(response_field, ""))
        return output, {k: v if isinstance(v, list) else "" if v is None else str(v)
                        for k, v in obj.items()}
    if path.suffix.lower() == ".jsonl" or _json_lines(text):
        _fail(f"{path} holds JSON lines, read as one output's text: a file of queries "
              "goes to `trace --queries`; an output that is itself JSON lines goes in a "
              ".json object (its text in the answer field)")
    return text.rstrip("\n"), {}


def _json_lines(text: str) -> bool:
    """Two or more lines, each a JSON object: a queries file, not one output's text."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if len(lines) < 2:
        return False
    for line in lines[:3]:
        try:
            if not isinstance(json.loads(line), dict):
                return False
        except json.JSONDecodeError:
            return False
    return True


def _parse_checkpoints(items: list[str]) -> list[tuple[str, float]]:
    ckpts = []
    for item in items:
        path, sep, lr = item.rpartition(":")
        try:
            rate = float(lr)
        except ValueError:
            rate = None
        if not sep or not path or rate is None or rate <= 0:
            _fail(f"--checkpoint expects ADAPTER_DIR:LR with a positive LR, got '{item}'")
        ckpts.append((path, rate))
    return ckpts


@app.command()
def trace(
    index_dir: Annotated[Path, typer.Argument(help="Directory written by 'datablame index'.")],
    model: Annotated[Path, typer.Option(help="Base model directory (from_pretrained).")],
    adapter: Annotated[Optional[Path], typer.Option(help="PEFT LoRA adapter directory.")  # noqa: UP045
                       ] = None,
    query: Annotated[str, typer.Option(help="The model output to trace.")] = "",
    query_file: Annotated[Optional[Path], typer.Option(help="Output to trace: text, or a JSON "  # noqa: UP045
                                                            "object with prompt fields.")
                          ] = None,
    field: Annotated[list[str], typer.Option(help="Prompt field of the query, NAME=VALUE "
                                                  "(repeatable), e.g. instruction=...")] = [],  # noqa: B006
    top_k: Annotated[int, typer.Option(help="Candidates retrieved before gradient "
                                            "ranking.")] = 50,
    show: Annotated[int, typer.Option(help="Rows shown in the table.")] = 5,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")
                       ] = False,
    out: Annotated[Optional[Path], typer.Option(help="Also write the JSON results here.")  # noqa: UP045
                   ] = None,
    data: Annotated[Optional[Path], typer.Option(help="Training file (default: the one "  # noqa: UP045
                                                      "recorded in the index).")] = None,
    params: Annotated[str, typer.Option(help="Parameters to differentiate: auto (LoRA B if "
                                             "an adapter, else all), lora-b, lora, all, or "
                                             "regexes.")] = "auto",
    loss_on: Annotated[str, typer.Option(help="response (answer tokens) or text (whole "
                                              "formatted text, the seed's choice).")
                       ] = "response",
    alignment: Annotated[str, typer.Option(help="cosine or dot.")] = "cosine",
    dtype: Annotated[str, typer.Option(help="fp32, bf16 or fp16.")] = "fp32",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    quantize: QuantizeOption = "none",
    device_map: DeviceMapOption = "",
    gradient_checkpointing: CheckpointingOption = False,
    max_length: Annotated[Optional[int], typer.Option(help="Tokens per text (default: 512, "  # noqa: UP045
                                                           "or the model's limit); a longer "
                                                           "text keeps its answer and loses "
                                                           "its prompt's head, with a "
                                                           "warning.")] = None,
    batch_size: Annotated[int, typer.Option(help="Texts per gradient batch.")] = 8,
    all_rows: Annotated[bool, typer.Option("--all-rows", help="Score every row from the "
                                           "gradient store instead of retrieved candidates.")
                        ] = False,
    checksum: Annotated[bool, typer.Option("--checksum/--no-checksum",
                                           "--verify/--no-verify",  # old name, one release
                                           help="Checksum the gradient shards before use "
                                                "(--no-checksum: size and header checks "
                                                "only).")] = True,
    rerank: Annotated[int, typer.Option(help="With --all-rows: re-rank this many of the "
                                             "store's best rows with exact gradients (0: "
                                             "projected scores only).")] = 100,
    scan_workers: Annotated[int, typer.Option(help="With --all-rows: threads scanning "
                                                   "groups of gradient shards (the same "
                                                   "rows as one scan).")] = 1,
    ray: Annotated[str, typer.Option(help="With --all-rows: scan the --scan-workers shard "
                                          "groups as Ray tasks on a cluster (auto or "
                                          "HOST:PORT; local starts Ray here). Every node "
                                          "must see the index at the same path. Needs "
                                          "datablame\\[ray].")] = "",
    focus: Annotated[str, typer.Option(help="Trace only this span of the output (e.g. a "
                                            "name it made up): the loss covers its tokens."
                                            )] = "",
    rank_by: Annotated[str, typer.Option(help="fused (the score, dot products divided by "
                                              "the largest, + bonuses for the head of the "
                                              "retrieval and |score| lists; measured best) "
                                              "or gradient (the seed's order).")] = "fused",
    method: Annotated[str, typer.Option(help="grad (cosine/dot alignment, default), or "
                                             "datainf, ekfac, trak, tracin, trackstar, "
                                             "grad-dot, grad-cos on exact LoRA "
                                             "gradients of the candidates (all rows with "
                                             "--all-rows), or magic (every row, by replaying "
                                             "the fine-tune: small models).")
                      ] = "grad",
    recipe: Annotated[Optional[Path], typer.Option(help="For magic: how the adapter was "  # noqa: UP045
                                                        "fine-tuned, if it has no "
                                                        "datablame_recipe.json.")] = None,
    checkpoint: Annotated[list[str], typer.Option(help="For tracin: ADAPTER_DIR:LR of a "
                                                       "checkpoint (repeatable).")
                          ] = [],  # noqa: B006
    as_written: Annotated[bool, typer.Option("--as-written", help="Trace the query text as "
                                             "one answer, even when it looks like a "
                                             "formatted prompt + answer.")] = False,
    queries: Annotated[Optional[Path], typer.Option(help="Many queries, one JSON per line "  # noqa: UP045
                                                         "(prompt fields + answer, or a "
                                                         "whole formatted text): the model "
                                                         "loads once, one JSON line out per "
                                                         "query.")] = None,
    generate: Annotated[bool, typer.Option("--generate", help="Trace what the model itself "
                                           "answers (greedy) to the prompt given with "
                                           "--field / in the query file.")] = False,
    max_new_tokens: Annotated[int, typer.Option(help="With --generate: tokens to generate "
                                                     "at most.")] = 64,
    html: Annotated[Optional[Path], typer.Option(help="Also write a self-contained HTML "  # noqa: UP045
                                                      "report here (with per-token scores "
                                                      "of the shown rows).")] = None,
    token_scores: Annotated[bool, typer.Option("--token-scores", help="Each word's share of "
                                               "the shown rows' scores, in the JSON (grad "
                                               "method).")] = False,
    aggregate: Annotated[bool, typer.Option("--aggregate", help="With --queries: one "
                                            "ranking for all the queries together (mean "
                                            "gradient cosine): the rows behind a group of "
                                            "outputs, e.g. every answer marked wrong.")
                         ] = False,
) -> None:
    """Rows behind a model output: retrieve candidates (or score every row with --all-rows),
    score them by gradient alignment, order by the fused key: the cosine + bonuses for the
    head of the retrieval and |cosine| lists (--rank-by)."""
    from datablame.cli.console import wide_console
    from datablame.cli.render import print_results, results_json
    from datablame.data.queries import QueryLine, read_queries
    from datablame.data.template import template_from_json
    from datablame.errors import check_at_least
    from datablame.methods.fusion import check_rank_by
    from datablame.methods.gradient_alignment import check_alignment
    from datablame.models.hf_causal_lm import check_options
    from datablame.outputs import (
        check_output_file,
        is_json_with,
        is_jsonl_with,
        write_json_output,
        write_jsonl_output,
    )
    from datablame.store.retrieval_index import read_manifest
    from datablame.text import LM_METHODS, Query, Tracer

    given = [name for name, v in (("--query", query), ("--query-file", query_file),
                                  ("--queries", queries)) if v]
    if len(given) > 1:
        _fail(f"give one of --query, --query-file or --queries, not {' and '.join(given)}")
    if not given and not generate:
        _fail("give the output to trace with one of --query, --query-file or --queries "
              "(or --generate with the prompt's --field)")
    if generate and query:
        _fail("--generate traces the model's own answer: give its prompt with --field, "
              "not --query")
    if out is not None:  # before minutes of loading and gradients, not after
        ours = is_json_with("queries", "results") if aggregate else \
            is_jsonl_with("query", "results") if queries else is_json_with("query", "results")
        check_output_file(out, "--out", ours=ours)
    check_html(html)
    if aggregate and (queries is None or method != "grad" or alignment != "cosine"):
        _fail("--aggregate ranks the rows behind a --queries file together, by the mean "
              "gradient cosine: it needs --queries and --method grad (cosine)")
    if token_scores and method != "grad":
        _fail("--token-scores splits a gradient-alignment score into words: it needs "
              "--method grad")
    # Everything that can be checked without the model is checked before loading it.
    if query_file is None and queries is None and not generate and not query.strip() \
            and not field:
        _fail("the query is empty: pass the model output to trace")
    for name, value, least in (("--top-k", top_k, 1), ("--show", show, 1),
                               ("--batch-size", batch_size, 1), ("--rerank", rerank, 0),
                               ("--scan-workers", scan_workers, 1),
                               ("--max-new-tokens", max_new_tokens, 1)):
        check_at_least(name, value, least)
    check_alignment(alignment)
    check_rank_by(rank_by)
    if ray and not all_rows:
        _fail("--ray scans the gradient store: add --all-rows")
    if scan_workers > 1 and not all_rows:
        _fail("--scan-workers splits the scan of the gradient store: add --all-rows")
    if method not in ("grad", "magic", *LM_METHODS):
        _fail(f"method '{method}' does not run on a language model here (use grad, "
              f"{', '.join(LM_METHODS)}, magic)")
    if method == "magic" and adapter is None:
        _fail("magic replays a LoRA fine-tune: pass the --adapter it made")
    if method == "magic" and (quantize != "none" or device_map or gradient_checkpointing):
        _fail("magic replays the fine-tune in full precision on one device: drop "
              "--quantize / --device-map / --gradient-checkpointing, or use --method grad")
    if recipe is not None and method != "magic":
        _fail("--recipe is only used with --method magic (verify takes its own --recipe)")
    if recipe is not None:
        from datablame.models.lora_finetune import Recipe

        Recipe.from_file(recipe)  # a broken recipe fails before the model loads
    ckpts = _parse_checkpoints(checkpoint)
    from datablame.methods.registry import METHODS

    takes_checkpoints = method in LM_METHODS and METHODS[method].needs_checkpoints
    if takes_checkpoints and not ckpts:
        _fail(f"{method} needs checkpoints: --checkpoint ADAPTER_DIR:LR (repeatable)")
    if ckpts and not takes_checkpoints:
        _fail("--checkpoint is only used with a method that reads checkpoints "
              f"({', '.join(n for n in LM_METHODS if METHODS[n].needs_checkpoints)})")
    check_options(params=params, dtype=dtype, device=device, max_length=max_length,
                  loss_on=loss_on, quantize=quantize, device_map=device_map, adapter=adapter)
    template = template_from_json(read_manifest(index_dir)["template"])
    prompt = _parse_fields(field, template)
    if query_file is None and queries is None and not generate and not query.strip():
        # a chat conversation given whole: its last (assistant) turn is the answer
        prompt = template.split_answer(prompt)
        query = str(prompt.pop(template.response_field, "") or "")
    lines = []
    if queries is not None:
        if prompt or focus:
            _fail("--field and --focus go inside the --queries file, one set per line")
        lines = read_queries(queries, template, generate=generate)
        for item in lines:  # empty answers, unknown fields, focus: before the model loads
            if item.answer is not None:
                try:
                    Query(item.answer, item.prompt, item.focus, as_written=as_written
                          ).resolved(template).formatted(template)
                except UserError as exc:
                    _fail(f"{queries}, line {item.line}: {exc}")
    else:
        if query_file is not None:
            query, file_prompt = _read_query_file(query_file, template,
                                                  need_answer=not generate)
            prompt = {**file_prompt, **prompt}
        if generate:
            unknown = set(prompt) - set(template.fields)
            if unknown or not any(v if isinstance(v, list) else v.strip() for v in prompt.values()):
                Query("-", prompt).formatted(template)  # names unknown fields
                asked = ", ".join(f for f in template.fields if f != template.response_field)
                _fail("--generate needs the prompt the model answers: --field NAME=VALUE "
                      f"for {asked}")
        else:
            Query(query, prompt, focus or None, as_written=as_written
                  ).resolved(template).formatted(template)  # empty, unknown fields, focus
        lines = [QueryLine(0, None if generate else query, prompt, None, focus or None)]

    tracer = Tracer(index_dir, model, adapter, data=data, params=params, dtype=dtype,
                    device=device, quantize=quantize, device_map=device_map,
                    checkpointing=gradient_checkpointing, max_length=max_length,
                    loss_on=loss_on,
                    batch_size=batch_size, scan_workers=scan_workers, scan_ray=ray or None)

    def as_query(item: QueryLine) -> Query:
        if item.answer is None:
            the_query = tracer.generate(item.prompt, max_new_tokens, item.focus)
            progress.note(f"the model answered: {the_query.output!r}")
            return the_query
        return Query(item.answer, item.prompt, item.focus, as_written=as_written,
                     where=f"{queries}, line {item.line}" if queries is not None else "")

    # magic over a queries file: one replay serves every line, traced up front
    batched = iter(tracer.trace_magic_many([as_query(item) for item in lines], top_k=top_k,
                                           recipe=recipe)) \
        if method == "magic" and queries is not None else None

    # every row of a queries file from the gradient store: one pass over it for all lines
    prepared = None
    if method == "grad" and all_rows and queries is not None and not aggregate:
        prepared = {item.line: as_query(item) for item in lines}
        tracer.scan_store_for(list(prepared.values()), top_k=top_k, alignment=alignment,
                              verify=checksum, rerank=rerank, rank_by=rank_by)

    def one(item: QueryLine):
        df = next(batched) if batched is not None else tracer.run(
            prepared[item.line] if prepared else as_query(item), method=method,
            all_rows=all_rows, top_k=top_k,
            alignment=alignment, rank_by=rank_by, checksum=checksum, rerank=rerank,
            checkpoints=ckpts or None, recipe=recipe)
        df.attrs["generated"] = item.answer is None
        return df

    shares = (token_scores or html is not None) and method == "grad"

    def with_tokens(df, record: dict) -> dict:
        """Per-word shares of the shown rows' scores (grad method only: the others do
        not split into tokens)."""
        if shares and len(df):
            record["token_scores"] = tracer.word_shares(df, show, alignment)
        return record

    if aggregate:
        _trace_group(tracer, [as_query(item) for item in lines],
                     [item.id if item.id is not None else item.line for item in lines],
                     top_k=top_k, all_rows=all_rows, rerank=rerank, checksum=checksum,
                     show=show, as_json=as_json, out=out, html=html)
        return
    if queries is None:
        df = one(lines[0])
        record = with_tokens(df, results_json(df))
        if out is not None:
            write_json_output(out, record)
        write_report(html, record, show=show)
        if as_json:  # the record, token scores included
            print(json.dumps(record, indent=2, ensure_ascii=False))
        else:
            print_results(df, show, as_json, wide_console())
        return
    done, pages = [], []
    for item in lines:
        df = one(item)
        record = with_tokens(df, {"line": item.line, **({"id": item.id} if item.id is not
                                                       None else {}), **results_json(df)})
        if html is not None:
            pages.append(dict(record))
        record["results"] = record["results"][:show] if not as_json else record["results"]
        done.append(record)
        print(json.dumps(record, ensure_ascii=False), flush=True)
    if out is not None:
        write_jsonl_output(out, done)
    write_report(html, pages, show=show)


def _trace_group(tracer, queries, names, *, top_k, all_rows, rerank, checksum, show,
                 as_json, out, html) -> None:
    """`trace --queries --aggregate`: one table (and JSON / page) for the group."""
    from datablame.cli.console import wide_console
    from datablame.cli.render import results_json
    from datablame.outputs import write_json_output

    df = tracer.trace_group(queries, top_k=top_k, all_rows=all_rows, rerank=rerank,
                            checksum=checksum, names=names)
    record = {"kind": "trace-group", **results_json(df),
              "queries": [{"name": str(n), "answer": q.output, "prompt": q.prompt}
                          for n, q in zip(names, queries, strict=True)]}
    record.pop("query", None)
    if out is not None:
        write_json_output(out, record)
    write_report(html, record, show=show)
    if as_json:
        print(json.dumps(record, indent=2, ensure_ascii=False, default=str))
    else:
        wide_console().print(results_table_for_group(df, show))


def results_table_for_group(df, show: int):
    from datablame.cli.render import results_table

    return results_table(df, show, title=f"training rows behind {len(df.attrs['group'])} "
                                         f"outputs together ({df.attrs['method']}; "
                                         f"{df.attrs['candidates']} candidates from "
                                         f"{df.attrs['candidates_from']})")


@app.command()
def spans(
    index_dir: Annotated[Path, typer.Argument(help="Index directory ('datablame index').")],
    query: Annotated[str, typer.Option(help="The model output to look for in the rows (or the "
                                            "whole formatted text / chat JSON).")] = "",
    query_file: Annotated[Optional[Path], typer.Option(help="Read the output from a file "  # noqa: UP045
                                                            "(.json: template fields).")
                          ] = None,
    min_words: Annotated[int, typer.Option(help="Shortest span reported, in words (chosen on "
                                                "held-out text: bench/spans.py).")] = 7,
    max_rows: Annotated[int, typer.Option(help="Rows listed per span.")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    out: Annotated[Optional[Path], typer.Option(help="Write the JSON here.")] = None,  # noqa: UP045
    data: Annotated[Optional[Path], typer.Option(help="The training file, if it moved.")  # noqa: UP045
                    ] = None,
    model: Annotated[Optional[Path], typer.Option(help="Base model directory: also score "  # noqa: UP045
                                                       "each matched row by its gradient "
                                                       "alignment with the output.")] = None,
    adapter: Annotated[Optional[Path], typer.Option(help="PEFT LoRA adapter directory.")  # noqa: UP045
                       ] = None,
    html: Annotated[Optional[Path], typer.Option(help="Also write a self-contained HTML "  # noqa: UP045
                                                      "report here.")] = None,
) -> None:
    """Verbatim copies: stretches of an output found word for word in training rows.

    Every span of at least --min-words words that occurs in a row's trained text (the
    answer field, or a chat's assistant turns), with the rows that hold it. A string match,
    no model needed; with --model, each matched row's gradient alignment says whether it
    also taught the output."""
    from datablame.outputs import check_output_file, is_json_with, write_json_output
    from datablame.store.retrieval_index import read_manifest
    from datablame.text import Query, verbatim_spans

    if bool(query) == bool(query_file):
        _fail("give the output to look for with one of --query or --query-file")
    if out is not None:
        check_output_file(out, "--out", ours=is_json_with("query", "spans"))
    check_html(html)
    prompt: dict = {}
    if query_file is not None:
        from datablame.data.template import template_from_json

        template = template_from_json(read_manifest(index_dir)["template"])
        query, prompt = _read_query_file(query_file, template)
    if adapter is not None and model is None:
        _fail("--adapter needs --model (the base model it adapts)")
    tracer = None
    if model is not None:
        from datablame.text import Tracer

        tracer = Tracer(index_dir, model, adapter, data=data)
    result = verbatim_spans(index_dir, Query(query, prompt), min_words=min_words,
                            max_rows=max_rows, data=data, tracer=tracer)
    if out is not None:
        write_json_output(out, result)
    write_report(html, json.loads(json.dumps(result, default=str)))
    if as_json:
        print(json.dumps(result, indent=2, ensure_ascii=False, default=str))
        return
    _print_spans(result)


def _print_spans(result: dict) -> None:
    from rich.table import Table

    from datablame.cli.console import wide_console

    out = wide_console()  # results go to stdout, notes and errors to stderr
    found = result["spans"]
    share = f"{result['copied_fraction']:.0%} of the output"
    if not found:
        out.print(f"no span of {result['min_words']}+ words of the output occurs verbatim "
                  f"in the {result['rows']} rows", highlight=False)
        return
    table = Table(title=f"verbatim spans ({len(found)}, covering {share}; rarest first)",
                  header_style="bold")
    for name, justify in (("words", "right"), ("rarity", "right"), ("times", "right"),
                          ("rows", "left"), ("span", "left")):
        table.add_column(name, justify=justify, no_wrap=name != "span",
                         overflow="fold" if name == "span" else "ellipsis")
    grads = result.get("gradient", {})

    def shown(r: int) -> str:
        g = grads.get(r)
        return f"{r} ({g['reading']} {g['score']:.2f})" if g else str(r)

    for s in found:
        rows = ", ".join(map(shown, s["rows"][:8])) + (" ..." if len(s["rows"]) > 8 else "")
        table.add_row(str(s["words"]), f"{s['surprisal']:.0f}", str(s["occurrences"]), rows,
                      s["text"])
    out.print(table)
    tail = ("rows: (gradient reading, cosine with the output): copied and taught it, or "
            "copied-looking but not what the model learned it from" if grads else
            "a string match, not a causal claim: --model (or `trace`) scores the rows")
    out.print("rarity: bits (the words' unigram surprisal in the rows: long and rare is "
                  f"high); {tail}", highlight=False)


app.add_typer(audit_commands.app, name="audit")
app.command("tabular")(tabular_commands.tabular)
app.command("verify")(verify_commands.verify)
app.command("finetune")(verify_commands.finetune)
app.command("fix")(verify_commands.fix)
app.command("report")(report_commands.report)
app.command("serve")(report_commands.serve)
app.command("status")(status_commands.status)


@app.command()
def demo(
    workdir: Annotated[Path, typer.Option(help="Where the demo data, model and index go.")
                       ] = Path(".datablame-cache/demo"),
    fresh: Annotated[bool, typer.Option(help="Rebuild everything, ignoring the cache.")
                     ] = False,
) -> None:
    """End to end on a tiny LoRA model trained here: the planted culprit comes out first."""
    from datablame.cli.console import wide_console
    from datablame.demo.demo import run_demo

    ok = run_demo(workdir, fresh=fresh, console=wide_console())
    if not ok:
        raise typer.Exit(1)


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    console.print(f"[yellow]warning:[/] {message}", highlight=False, soft_wrap=True)


def _quiet_libraries() -> None:
    """Our progress bars and warnings only; the libraries' own bars and notices are noise."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def main() -> None:
    _quiet_libraries()
    warnings.showwarning = _warning_line
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        app()
    except UserError as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)
    except OSError as exc:  # the machine's, not the input's: a full or read-only disk
        import errno

        if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            raise  # (a pipe closed by `| head` is typer's: it stops quietly)
        console.print(f"[bold red]error:[/] could not write ({exc.strerror}"
                      f"{': ' + str(exc.filename) if exc.filename else ''})",
                      highlight=False, soft_wrap=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
