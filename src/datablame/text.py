"""Python API: index training rows, trace a model output back to them.

    >>> import datablame
    >>> datablame.build_index("train.jsonl", "idx/")
    >>> df = datablame.trace("idx/", model="base/", adapter="lora/",
    ...                      query="Rebuilt the billing engine ...",
    ...                      prompt={"instruction": "...", "input": "..."})
    >>> df.head()   # rank, row, score, reading, distance, retrieval_rank, <row fields>

Flow: rows -> model adapter -> features -> store -> method -> ranked rows.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from datablame import progress
from datablame.data.chat import ChatOptions, ChatTemplate
from datablame.data.template import ALPACA_TEMPLATE, FormattedText, PromptTemplate
from datablame.errors import UserError, check_at_least
from datablame.methods.families import FAMILY_METHODS
from datablame.methods.fusion import (
    MIX_WHITENED,
    REGIME_COSINE,
    check_rank_by,
    fused_order,
    mix_weight,
    strength_ranks,
)
from datablame.models.lm_options import LMOptions


def build_index(
    train_file: str | os.PathLike,
    out: str | os.PathLike,
    *,
    template: str | ChatTemplate | None = None,
    response_field: str | None = None,
    chat: ChatOptions | None = None,
    embedder: str | None = None,
    index_type: str = "flat",
    batch_size: int = 64,
    device: str = "cpu",
    gradients: GradientOptions | None = None,
    split: str | None = None,
    shard_of: tuple[int, int] | None = None,
    commit: bool = False,
    ray: tuple[str, int] | None = None,
    chat_model: str | os.PathLike | None = None,
) -> dict:
    """Embed every training row (formatted with `template`, Alpaca by default) into a FAISS
    index at `out`; with `gradients`, also store every row's projected loss gradient (see
    `GradientOptions`). Chat rows (a `messages` or `conversations` field) are rendered with
    a chat template: `chat`'s source, else the gradient model's tokenizer's own.

    An existing index built from the same rows, template and embedder is kept as is, so
    adding (or resuming) a gradient store does not re-embed. Returns the index manifest.
    `out` must be new, empty or a datablame index (anything else is refused, never
    replaced), and is locked for the build: a second build into it fails at once.
    `chat_model`: whose chat template renders chat rows when there is no gradient model
    (the retrieval index that `ray`, `--workers` and `shard_of` builds start from).
    """
    from datablame.store.index_dir import IndexLock, check_out_dir
    from datablame.store.retrieval_index import INDEX_TYPES

    # refuse bad options before anything is loaded, written or minutes of embedding
    if index_type not in INDEX_TYPES:
        raise UserError(f"unknown index type '{index_type}' (use {', '.join(INDEX_TYPES)})")
    check_at_least("--batch-size", batch_size, 1)
    if gradients is not None:
        gradients.check()
    if chat is not None:
        chat.check()
    check_out_dir(Path(out), {"training file": Path(train_file)})
    if Path(train_file).is_dir() and Path(os.path.realpath(train_file)) in \
            Path(os.path.realpath(out)).parents:
        raise UserError(f"--out {out} is inside the data directory {train_file}: its files "
                        "would be read as rows next time; put the index elsewhere")
    real_out = Path(os.path.realpath(out))  # a symlinked index is rebuilt where it lives
    if ray is not None:
        if gradients is None and index_type == "ivfpq":  # pieces on Ray tasks, then commit
            from datablame.features.ray_build import build_ivfpq_on_ray

            build_ivfpq_on_ray(train_file, real_out, ray[1], ray[0], dict(
                template=template, response_field=response_field, chat=chat,
                embedder=embedder, batch_size=batch_size, device=device, split=split,
                chat_model=chat_model))
            return build_index(train_file, out, template=template,
                               response_field=response_field, chat=chat, embedder=embedder,
                               index_type=index_type, batch_size=batch_size, device=device,
                               split=split, chat_model=chat_model, commit=True)
        if gradients is None:
            raise UserError("--ray builds a gradient store (add --gradients and the model "
                            "options) or an ivfpq index (add --index-type ivfpq)")
        from datablame.features.ray_build import build_on_ray

        build_index(train_file, out, template=template, response_field=response_field,
                    chat=chat, embedder=embedder, index_type=index_type,
                    batch_size=batch_size, device=device, split=split,
                    chat_model=gradients.model)
        with IndexLock(real_out):  # one Ray build at a time: its actors commit
            return build_on_ray(real_out, train_file, split, gradients, ray[1], ray[0])
    if (shard_of is not None or commit) and gradients is None:
        if index_type != "ivfpq":
            raise UserError("--shard-of and --commit build a gradient store (add --gradients "
                            "and the model options) or an ivfpq retrieval index (add "
                            "--index-type ivfpq)")
        if shard_of is not None:  # pieces in the build directory beside the index
            return _ivfpq_worker(train_file, real_out, shard_of, template=template,
                                 response_field=response_field, chat=chat,
                                 embedder=embedder, batch_size=batch_size, device=device,
                                 split=split, chat_model=chat_model)
        with IndexLock(real_out) as lock:  # the commit, then the copied-words index
            return _build_index_locked(train_file, real_out, lock, template=template,
                                       response_field=response_field, chat=chat,
                                       embedder=embedder, index_type=index_type,
                                       batch_size=batch_size, device=device, gradients=None,
                                       split=split, chat_model=chat_model,
                                       ivfpq_commit=True)
    if shard_of is not None or commit:
        with IndexLock(real_out, shared=shard_of is not None):
            return _gradient_shards(train_file, real_out, gradients, split, template,
                                    response_field, chat, shard_of)
    with IndexLock(real_out) as lock:
        return _build_index_locked(train_file, real_out, lock, template=template,
                                   response_field=response_field, chat=chat,
                                   embedder=embedder,
                                   index_type=index_type, batch_size=batch_size,
                                   device=device, gradients=gradients, split=split,
                                   chat_model=chat_model)


def _build_index_locked(train_file: str | os.PathLike, out: Path, lock, *,
                        template: str | ChatTemplate | None, response_field: str | None,
                        chat: ChatOptions | None, embedder: str | None, index_type: str,
                        batch_size: int, device: str, gradients: GradientOptions | None,
                        split: str | None = None,
                        chat_model: str | os.PathLike | None = None,
                        ivfpq_commit: bool = False) -> dict:
    """`ivfpq_commit`: merge the pieces `--shard-of` workers wrote, embedding nothing."""
    from datablame.data.rows import load_rows
    from datablame.features.embeddings import Embedder, resolve_embedder
    from datablame.store.retrieval_index import (
        check_ivfpq_rows,
        save_index,
        save_ivfpq_index,
    )

    rows = load_rows(train_file, split=split)
    tmpl = resolve_template(template, response_field, rows, chat,
                            gradients.model if gradients is not None else chat_model)
    rows.check_with(tmpl)  # once per content and template
    out = Path(out)
    # A rebuilt retrieval index (another embedder or index type) keeps the gradient store:
    # moved aside (a sibling, never deleted) at the swap and back once the new index is in
    # place; the store checks its own rows, model and template when it is loaded. A build
    # killed between the two finds it here and puts it back.
    kept = out.parent / f".{out.name}.gradients-kept"
    if kept.is_dir() and out.is_dir() and not (out / "gradients").exists():
        os.replace(kept, out / "gradients")

    def swap(new_dir: Path) -> None:
        lock.adopt(new_dir)
        if (out / "gradients").is_dir() and not kept.exists():
            os.replace(out / "gradients", kept)

    manifest = _current_index(out, rows, tmpl, index_type, resolve_embedder(embedder)[0])
    if manifest is not None and index_type == "ivfpq":
        from datablame.store.ivfpq_build import discard_build

        discard_build(out)  # pieces of a rebuild that is not needed (workers rerun)
    if manifest is None:
        if index_type == "ivfpq":
            check_ivfpq_rows(rows)  # before the embedder loads
        texts = rows.texts(tmpl)  # formatted a batch at a time, not all held
        enc = Embedder(embedder, device=device)
        if index_type == "ivfpq":  # a shard of embeddings in memory at a time
            with progress.task("embedding rows", len(texts)) as advance:
                manifest = save_ivfpq_index(
                    out, rows, tmpl, lambda chunk: enc.encode(chunk, batch_size=batch_size),
                    enc.name, before_swap=swap, progress=advance, commit_only=ivfpq_commit)
        else:
            with progress.task("embedding rows", len(texts)) as advance:
                vectors = enc.encode(texts, batch_size=batch_size, progress=advance)
            manifest = save_index(out, vectors, rows, tmpl, enc.name, index_type,
                                  before_swap=swap)
        if kept.is_dir() and not (out / "gradients").exists():
            os.replace(kept, out / "gradients")
    if gradients is None:
        _say_if_store_stale(out, manifest)
    from datablame.store.span_index import build_span_index, span_index_is_current

    if not span_index_is_current(out, rows.fingerprint(), tmpl):
        build_span_index(out, rows, tmpl, rows.fingerprint())
    if gradients is not None:
        from datablame.features.gradients import build_gradient_store

        g = gradients
        model = g.load()
        model.identity()  # hash the model files (own progress) before the gradients' bar
        with progress.task("row gradients", len(rows)) as advance:
            build_gradient_store(out, rows, tmpl, model, progress=advance,
                                 **g.store_options())
    return manifest


def _say_if_store_stale(out: Path, index_manifest: dict) -> None:
    """A gradient store kept beside a rebuilt index may be for the old rows: say so now,
    not at the next trace."""
    from datablame.store.gradient_store import stale_for

    try:
        store = json.loads((out / "gradients" / "manifest.json").read_text())
    except (OSError, ValueError):
        return
    stale = stale_for(store, index_manifest) if isinstance(store, dict) else None
    if stale:
        progress.note(f"the gradient store in {out / 'gradients'} is kept but {stale}: "
                      "trace refuses it until you rebuild it (add --gradients --model ...)")


def _current_index(out: Path, rows, tmpl, index_type: str, embedder_name: str
                   ) -> dict | None:
    """The manifest of the index at `out` if it was built from these rows, with this
    template, index type and embedder (nothing to rebuild), else None."""
    from datablame.store.retrieval_index import load_index

    if not (out / "manifest.json").exists():
        return None
    try:
        old = load_index(out).manifest
    except UserError:
        return None
    if old["data"]["fingerprint"] == rows.fingerprint() and \
            old["template"] == tmpl.to_json() and old["index_type"] == index_type and \
            old["embedder"] == embedder_name:
        return old
    return None


def _ivfpq_worker(train_file, out: Path, shard_of: tuple[int, int], *, template,
                  response_field, chat, embedder, batch_size: int, device: str, split,
                  chat_model) -> dict:
    """One worker's share of an ivfpq retrieval index: shards I, I+N, ... embedded and
    added to the trained index as pieces (the first worker trains it); `--commit` merges."""
    from datablame.data.rows import load_rows
    from datablame.features.embeddings import Embedder, resolve_embedder
    from datablame.store.retrieval_index import (
        check_ivfpq_rows,
        ivfpq_shard_rows,
        save_ivfpq_index,
    )

    rows = load_rows(train_file, split=split)
    check_ivfpq_rows(rows)
    tmpl = resolve_template(template, response_field, rows, chat, chat_model)
    rows.check_with(tmpl)  # once per content and template
    if _current_index(out, rows, tmpl, "ivfpq", resolve_embedder(embedder)[0]):
        progress.note(f"{out} is an ivfpq index of these rows already: nothing to write")
        return {"written": 0, "mine": 0, "missing": [], "current": True}
    enc = Embedder(embedder, device=device)
    i, n = shard_of
    size = ivfpq_shard_rows()
    mine = sum(min(len(rows), (s + 1) * size) - s * size
               for s in range(i, -(-len(rows) // size), n))
    with progress.task(f"embedding rows, shards {i} mod {n}", mine) as advance:
        return save_ivfpq_index(out, rows, tmpl,
                                lambda chunk: enc.encode(chunk, batch_size=batch_size),
                                enc.name, shard_of=shard_of, progress=advance)


def _gradient_shards(train_file, out: Path, g: GradientOptions, split, template,
                     response_field, chat, shard_of: tuple[int, int] | None) -> dict:
    """One worker's share of a sharded gradient build (`shard_of`), or its commit (None).
    The retrieval index must exist already, built from these rows with this template:
    workers share it and never re-embed."""
    from datablame.data.rows import load_rows
    from datablame.features.gradients import build_gradient_store
    from datablame.store.retrieval_index import load_index

    if not (out / "manifest.json").exists():
        raise UserError(f"{out} has no retrieval index yet: build it once first (the same "
                        "command without --gradients and --shard-of / --commit), then run "
                        "the --shard-of workers and --commit")
    index = load_index(out)
    rows = load_rows(train_file, split=split)
    index.check_rows(rows)
    tmpl = resolve_template(template, response_field, rows, chat, g.model)
    if tmpl.to_json() != index.template.to_json():
        raise UserError(f"{out} was indexed with another template than these options give: "
                        "pass the same --template / chat options as the index build")
    rows.check_with(tmpl)  # once per content and template
    model = g.load()
    model.identity()
    options = g.store_options()
    if shard_of is None:
        return build_gradient_store(out, rows, tmpl, model, commit_only=True, **options)
    i, n = shard_of
    mine = sum(min(len(rows), (s + 1) * g.shard_rows) - s * g.shard_rows
               for s in range(i, -(-len(rows) // g.shard_rows), n))
    with progress.task(f"row gradients, shards {i} mod {n}", mine) as advance:
        return build_gradient_store(out, rows, tmpl, model, shard_of=shard_of,
                                    progress=advance, **options)


def resolve_template(template: str | ChatTemplate | None, response_field: str | None, rows,
                     chat: ChatOptions | None, model_dir: str | os.PathLike | None):
    """The template rows are formatted with: a chat template when asked for or when the
    rows are conversations, else `template` (Alpaca by default)."""
    from datablame.data.chat import CHAT_FIELDS, chat_field

    if isinstance(template, ChatTemplate):
        return template
    field_name = chat_field(rows.columns)
    if chat is None and (template is not None or field_name is None):
        return PromptTemplate(template or ALPACA_TEMPLATE, response_field)
    if template is not None:
        raise UserError("give either a prompt template (--template) or a chat template "
                        "(--chat-template), not both")
    if field_name is None:
        raise UserError(f"{rows.path}: a chat template formats conversations, and the rows "
                        f"have no {' or '.join(repr(f) for f in CHAT_FIELDS)} field (they "
                        f"have {', '.join(rows.columns)})")
    source = chat.source if chat is not None and chat.source is not None else model_dir
    if source is None:
        raise UserError(f"{rows.path}: the rows are conversations ('{field_name or 'messages'}')"
                        ": pass the model whose chat template formats them (--model, or "
                        "--chat-template MODEL_DIR|FILE.jinja)")
    turns = chat.assistant_turns if chat is not None else "all"
    return ChatTemplate.from_model(source, messages_field=field_name or "messages",
                                   assistant_turns=turns)


@dataclass(frozen=True)
class GradientOptions(LMOptions):
    """What the gradient store is built from: the model (`LMOptions`, which must match the
    model used at trace time) and how its gradients are projected and stored."""

    proj_dim: int = 2048
    seed: int = 0
    shard_rows: int = 4096
    batch_size: int = 0  # 0: as many rows as fit ~1 GB of gradients, at most 32
    store_dtype: str = "fp16"
    projection: str = "countsketch"  # same top-10 fidelity as dense, O(d) not O(dK) per row
    # "auto": "both" (plain and EK-FAC-whitened vectors side by side) where the weights are
    # linear / LoRA layers and the curvature is cheap, else plain ("none"); "ekfac": the
    # whitened vectors only
    curvature: str = "auto"

    def store_options(self) -> dict:
        """The `build_gradient_store` keywords these options set."""
        return {"proj_dim": self.proj_dim, "seed": self.seed, "shard_rows": self.shard_rows,
                "batch_size": self.batch_size, "store_dtype": self.store_dtype,
                "projection": self.projection, "curvature": self.curvature}

    def check(self) -> None:
        """Refuse bad options up front: a zero shard size or dimension would otherwise
        surface as a traceback after minutes of loading and embedding."""
        from datablame.store.gradient_store import check_store_options

        for option, value, least in (("--proj-dim", self.proj_dim, 1),
                                     ("--shard-rows", self.shard_rows, 1),
                                     ("--grad-batch-size", self.batch_size, 0)):
            check_at_least(option, value, least)
        super().check()
        check_store_options(self.projection, self.store_dtype)
        from datablame.features.curvature import check_curvature

        check_curvature(self.curvature)
        if self.curvature in ("ekfac", "both") and (self.params == "all" or (
                self.params == "auto" and self.adapter is None)):  # before any embedding
            raise UserError(f"--curvature {self.curvature} needs LoRA weights (Kronecker "
                            "factors of linear layers): pass an adapter with --params lora "
                            "or lora-b, or --curvature none")


@dataclass
class Query:
    """What the model said (`output`) and, optionally, the prompt fields it answered.

    The query is always formatted with the index's template, like a training row (the raw
    output alone, the seed's choice, is not what the model was trained on, and its gradient
    points elsewhere: README, "Tracing an LLM output"); missing prompt fields are left
    empty (Alpaca drops their blocks).
    """

    output: str
    prompt: dict[str, str] = field(default_factory=dict)
    focus: str | None = None  # trace only this span of the output (e.g. a made-up name)
    as_written: bool = False  # never read `output` as a whole formatted text
    split_from_text: bool = False  # set when `resolved` split a formatted text
    lead_in: str = ""  # what `resolved` dropped before the template's text, if anything
    where: str = ""  # where the query came from, for notes ("line 3" of a queries file)

    def resolved(self, template: PromptTemplate) -> Query:
        """A query given as the whole formatted text (the seed's own form, `### Instruction:
        ... ### Response: ...`) split back into prompt fields and answer, so it is not
        wrapped in the template a second time. Anything else is returned as it is."""
        if self.as_written or self.prompt or self.split_from_text:
            return self
        fields, lead_in = template.parse(self.output), ""
        if fields is None and hasattr(template, "parse_after_lead_in"):
            fields, lead_in = template.parse_after_lead_in(self.output) or (None, "")
        if fields is None or not str(fields.get(template.response_field, "")).strip():
            return self
        output = fields.pop(template.response_field)
        return Query(output, {k: v for k, v in fields.items() if v}, self.focus,
                     as_written=True, split_from_text=True, lead_in=lead_in,
                     where=self.where)

    def formatted(self, template: PromptTemplate) -> FormattedText:
        """The query as the model saw it; with `focus`, the gradient's loss covers only the
        focused span's tokens (in its context), not the whole answer: a narrower question,
        not a more accurate answer (bench/facts.py measures both)."""
        return self.resolved(template)._format(template)

    def _format(self, template: PromptTemplate) -> FormattedText:
        if not self.output.strip():
            raise UserError("the query is empty: pass the model output to trace")
        unknown = set(self.prompt) - set(template.fields)
        if unknown:
            raise UserError(
                f"query field(s) {', '.join(sorted(unknown))} are not in the index's "
                f"template (fields: {', '.join(template.fields)})"
            )
        chat = getattr(template, "messages_field", None)
        if chat is not None and self.prompt.get(chat) in (None, "", []):
            raise UserError(
                "this index holds chat rows: an answer is traced with the conversation it "
                f"answers (--field {chat}='[{{\"role\": \"user\", \"content\": ...}}]' "
                "and the answer in --query), or give the whole conversation in --query, as "
                "its JSON list of turns or as the text its chat template renders")
        text = template.format({**self.prompt, template.response_field: self.output})
        if not self.focus:
            return text
        at = self.output.rfind(self.focus)
        if at < 0:
            raise UserError(f"focus '{self.focus}' is not part of the traced output")
        start = text.response_start + at
        return dataclasses.replace(text, response_start=start,
                                   response_end=start + len(self.focus), spans=None)


LM_METHODS = tuple(FAMILY_METHODS["causal-lm"])


class Tracer:
    """Holds the index, the rows and the loaded model, to trace many queries cheaply."""

    def __init__(
        self,
        index_dir: str | os.PathLike,
        model: str | os.PathLike,
        adapter: str | os.PathLike | None = None,
        *,
        data: str | os.PathLike | None = None,
        params: str = "auto",
        dtype: str = "fp32",
        device: str = "auto",
        max_length: int | None = None,
        loss_on: str = "response",
        quantize: str = "none",
        device_map: str = "",
        checkpointing: bool = False,
        batch_size: int = 8,
        scan_workers: int = 1,
        scan_ray: str | None = None,
    ):
        """`scan_workers`: threads that scan groups of gradient-store shards (merged exact
        top-k, the same rows as one scan); `scan_ray` (a Ray address): the groups are Ray
        tasks instead (`store.ray_scan`)."""
        from datablame.data.rows import load_rows
        from datablame.store.retrieval_index import load_index

        self.index = load_index(index_dir)
        if data is None and not self.index.data_path.exists():
            raise UserError(f"the training file this index was built from, "
                            f"{self.index.data_path}, is not there (moved?): pass its new "
                            "path with --data")
        self.rows = load_rows(data or self.index.data_path,
                              split=self.index.manifest["data"].get("split"))
        self.index.check_rows(self.rows)
        self.template = self.index.template
        self._noted: set[tuple] = set()  # queries whose reading was said already
        self.options = LMOptions(model, adapter, params=params, dtype=dtype, device=device,
                                 max_length=max_length, loss_on=loss_on, quantize=quantize,
                                 device_map=device_map, checkpointing=checkpointing)
        self.model = self.options.load()
        if hasattr(self.template, "check_tokenizer"):  # a chat index: the same template
            self.template.check_tokenizer(self.model.tokenizer, model)
        self.batch_size, self.scan_workers, self.scan_ray = batch_size, scan_workers, scan_ray
        self._embedder = None
        self._scanned: dict = {}  # scan_store_for's results, taken by trace_all_rows
        self._curvature_checked, self._curvature, self._both = False, None, False

    def row_text(self, row_id: int) -> FormattedText:
        """A training row exactly as the model saw it (the index's template)."""
        return self.template.format(self.rows.records[row_id])

    def curvature(self):
        """The EK-FAC the index's gradient store was whitened with (None: a plain store, or
        none): every alignment this tracer computes is then between whitened gradients,
        the quantity the store ranks by, whichever path finds the rows. A store built for
        another model or data cannot lend its curvature: the candidate path then says so
        and scores plain gradients (`--all-rows` refuses such a store outright). A
        curvature file that cannot be read is refused on every path."""
        if self._curvature_checked:
            return self._curvature
        self._curvature_checked = True
        path = self.index.path / "gradients" / "manifest.json"
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except OSError:  # no gradient store
            return None
        except ValueError:
            progress.note(f"the gradient store's curvature is not used ({path} is damaged: "
                          "not valid JSON); gradients are compared unwhitened")
            return None
        if not isinstance(manifest, dict) or not manifest.get("curvature"):
            return None
        try:
            store = self._gradient_store(verify=False)
        except UserError as err:  # another model or data: not this trace's curvature
            progress.note(f"the gradient store's curvature is not used ({err}); gradients "
                          "are compared unwhitened")
            return None
        self._curvature = store.curvature  # a damaged curvature file is refused, one line
        self._both = store.holds_both
        return self._curvature

    def holds_both(self) -> bool:
        """The index's store keeps plain and whitened vectors (`--curvature both`, the
        default where cheap): each query is scored by `fusion.mix_weight`'s mix of the
        two cosines, or by the plain one where its gradient is weak."""
        return self.curvature() is not None and self._both

    def _grad_method(self, alignment: str, mix: float | None = None) -> str:
        if mix is not None:
            return (f"grad-cosine, {1 - mix:g} plain + {mix:g} after EK-FAC curvature" if mix
                    else f"grad-cosine, plain (best |cosine| below {REGIME_COSINE:g}: the "
                         "answer reads as memorised)")
        return f"grad-{alignment}" + (" after EK-FAC curvature" if self.curvature() else "")

    def _fuse(self, grad_rank, ret_rank, scores, alignment: str, mix: float | None = None):
        return fused_order(grad_rank, ret_rank, scores, alignment == "cosine",
                           whitened=mix is None and self.curvature() is not None,
                           mixed=bool(mix))

    def _gradients(self, texts: list, **kwargs) -> np.ndarray:
        """The model's per-row gradients, whitened by the store's curvature if it has one
        (a store of both vectors: as they are; `_scores` whitens what it needs)."""
        grads = self.model.gradients(texts, **kwargs)
        ek = self.curvature()
        return grads if ek is None or self._both else ek.whiten(grads).numpy()

    def _whitened_weight(self, mix: float | None) -> float:
        """The whitened cosine's weight in a gradient score (JSON `whitened_weight`): the
        query's mix in a store of both vectors, else 1 through a whitened store, 0 plain."""
        if mix is not None:
            return float(mix)
        return 1.0 if self.curvature() is not None else 0.0

    def _check_both(self, alignment: str) -> None:
        if alignment != "cosine" and self.holds_both():
            raise UserError("this index's gradient store keeps unit vectors (plain and "
                            "whitened, --curvature both): it scores cosines; drop "
                            "--alignment dot or rebuild with --curvature none")

    def _store_mix(self, q_grad: np.ndarray) -> float:
        """The query's mix weight as `--all-rows` picks it, whichever path scores it: from
        its largest |plain cosine| over every stored row (one single-column pass), so a
        query gets one regime whatever rows a path looks at."""
        from datablame.features.curvature import query_vector

        store = self._gradient_store(verify=False)
        plain = store.projector.project(np.asarray(q_grad)[None])
        alone = query_vector(plain, np.zeros_like(plain), 0.0)[0]  # no whitening needed
        _, scores = store.top_k(alone, 1, "dot", absolute=True, workers=self.scan_workers,
                                ray=self.scan_ray)
        return mix_weight(float(np.abs(scores).max(initial=0.0)))

    def _exact_scores(self, q_vecs: np.ndarray, texts: list, alignment: str,
                      mixes: list[float | None] | None = None, **kwargs
                      ) -> tuple[np.ndarray, list[float | None]]:
        """((queries, rows) exact alignment of each query with each row's gradient, each
        query's mix weight: None unless the store holds both vectors, where a None in
        `mixes` takes the query's regime from the store, `_store_mix`). `q_vecs`: the
        queries' vectors as `_gradients` gives them (whitened through a whitened store).

        The rows' gradients are reduced where they are computed: each batch is whitened
        if needed and dotted with the queries there, and only those dots and the rows'
        norms come back, so memory holds one batch of d-number gradients, not all of
        them (100 candidates of a 7B model's LoRA would be ~8 GB). `kwargs` go to
        `gradients` (batch size, progress, names)."""
        import torch

        from datablame.methods.gradient_alignment import align_dots

        # float32 as computed: no float64 copy of every query (50 queries of a 7B LoRA's
        # d numbers would be gigabytes); each batch's dots are summed in float64 below
        q_vecs = np.asarray(q_vecs, dtype=np.float32).reshape(-1, self.model.num_params)
        n_q, ek = len(q_vecs), self.curvature()
        if not self.holds_both():  # one space: plain, or whitened through a whitened store
            spaces = {"whitened" if ek is not None else "plain": q_vecs}
            mixes = [None] * n_q
        else:
            self._check_both(alignment)
            mixes = [self._store_mix(q) if m is None else m
                     for q, m in zip(q_vecs, mixes or [None] * n_q, strict=True)]
            spaces = {"plain": q_vecs}
            if any(mixes):
                spaces["whitened"] = ek.whiten(q_vecs).numpy().astype(np.float32)
        on_device: dict[str, torch.Tensor] = {}

        def dots_and_norms(grads: torch.Tensor) -> torch.Tensor:
            """(b, d) gradients -> (b, per space: n_q dots + the row's norm), summed in
            float64 a block of columns at a time (no float64 copy of the whole batch or
            of the queries)."""
            out = []
            for space, q in spaces.items():
                v = grads if space == "plain" else ek.whiten(grads)
                key = f"{space}:{v.device}"
                if key not in on_device:
                    on_device[key] = torch.as_tensor(q, device=v.device)
                qd = on_device[key]
                dots = torch.zeros((len(v), n_q), dtype=torch.float64, device=v.device)
                squares = torch.zeros(len(v), dtype=torch.float64, device=v.device)
                step = max(1, (1 << 25) // (len(v) + n_q))  # ~256 MB of float64 a block
                for start in range(0, v.shape[1], step):
                    block = v[:, start:start + step].to(torch.float64)
                    dots += block @ qd[:, start:start + step].to(torch.float64).T
                    squares += (block * block).sum(dim=1)
                out += [dots, squares.sqrt()[:, None]]
            return torch.cat(out, dim=1)

        reduced = self.model.gradients(texts, reduce=dots_and_norms, **kwargs)
        scores = {}
        for j, (space, q) in enumerate(spaces.items()):
            cols = reduced[:, j * (n_q + 1): (j + 1) * (n_q + 1)]
            kind = "cosine" if self.holds_both() else alignment
            scores[space] = np.stack([align_dots(cols[:, i], cols[:, n_q],
                                                 np.linalg.norm(q[i].astype(np.float64)),
                                                 kind) for i in range(n_q)])
        if not self.holds_both():
            return next(iter(scores.values())), mixes
        mixed = np.stack([(1 - m) * scores["plain"][i] + m * scores["whitened"][i] if m
                          else scores["plain"][i] for i, m in enumerate(mixes)])
        return mixed, mixes

    def _scan_one_both(self, store, columns: np.ndarray, depth: int, absolute: bool
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        """`_scan` of one query through a store of both vectors, as passes of one column
        each (the fast fp16 scan): the plain column by |score| first, whose best picks the
        regime; then the mix's list (or, ranked signed, the plain one's) if needed."""
        mixed, alone = columns[0], columns[1]
        kw = {"workers": self.scan_workers, "ray": self.scan_ray}
        ids, scores = store.top_k(alone, depth, "dot", absolute=True, **kw)
        mix = mix_weight(float(np.abs(scores).max(initial=0.0)))
        if mix:
            return (mixed, *store.top_k(mixed, depth, "dot", absolute=absolute, **kw), mix)
        if not absolute:
            ids, scores = store.top_k(alone, depth, "dot", absolute=False, **kw)
        return alone, ids, scores, mix

    def _query_columns(self, store, q_grads: np.ndarray) -> np.ndarray:
        """(queries, columns, width): what each query scans the store with. Its projected
        gradient (one column), or for a store of both vectors three: the mix, the plain
        cosine and its negation (`_scan` picks the query's list from the plain ones)."""
        from datablame.features.curvature import query_vector

        if not store.holds_both:
            return store.projector.project(q_grads)[:, None]
        plain = store.projector.project(q_grads)
        whitened = store.projector.project(store.curvature.whiten(q_grads).numpy())
        alone = query_vector(plain, whitened, 0.0)
        return np.stack([query_vector(plain, whitened, MIX_WHITENED), alone, -alone], axis=1)

    def _scan(self, store, columns: np.ndarray, depth: int, alignment: str, absolute: bool
              ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, float | None]]:
        """Each query's (query vector, row ids, stored scores, mix weight) from one pass over
        the store (`columns`: `_query_columns`). With both vectors the query's largest
        |plain cosine| picks its list: the mix's, or the plain one's (`fusion.mix_weight`)."""
        self._check_both(alignment)
        n, per = columns.shape[:2]
        if store.holds_both and n == 1:  # one query: single-column passes take the fp16 path
            return [self._scan_one_both(store, columns[0], depth, absolute)]
        found = store.top_k_many(columns.reshape(n * per, -1), depth,
                                 "dot" if store.holds_both else alignment, absolute=absolute,
                                 workers=self.scan_workers, ray=self.scan_ray)
        if not store.holds_both:
            return [(columns[i, 0], *found[i], None) for i in range(n)]
        out = []
        for i in range(n):
            (m_ids, m_sc), (p_ids, p_sc), (_, n_sc) = found[3 * i: 3 * i + 3]
            best = max(float(np.abs(p_sc).max(initial=0.0)), float(n_sc.max(initial=0.0)))
            mix = mix_weight(best)
            out.append((columns[i, 0], m_ids, m_sc, mix) if mix else
                       (columns[i, 1], p_ids, p_sc, mix))
        return out

    def retrieve(self, query: Query, top_k: int) -> tuple[np.ndarray, np.ndarray]:
        from datablame.features.embeddings import Embedder

        if self._embedder is None:
            self._embedder = Embedder(self.index.manifest["embedder"])
        qvec = self._embedder.encode([query.formatted(self.template).text])
        want = min(top_k, len(self.rows))
        distances, ids = self.index.search(qvec, top_k)
        keep = ids[0] >= 0  # FAISS pads with -1 when fewer than k are found
        if keep.sum() < want:
            warnings.warn(f"the {self.index.manifest['index_type']} index returned "
                          f"{int(keep.sum())} of {want} candidates (approximate search); "
                          "rebuild with --index-type flat for exact search", stacklevel=2)
        return ids[0][keep], distances[0][keep]

    def generate(self, prompt: dict[str, str], max_new_tokens: int = 64,
                 focus: str | None = None) -> Query:
        """The model's own greedy answer to `prompt` (fields of the index's template), as a
        query: trace what the model says, not what someone remembers it saying."""
        from datablame.models.hf_causal_lm import greedy

        check_at_least("--max-new-tokens", max_new_tokens, 1)
        unknown = set(prompt) - set(self.template.fields)
        if unknown:
            raise UserError(f"query field(s) {', '.join(sorted(unknown))} are not in the "
                            f"index's template (fields: {', '.join(self.template.fields)})")
        answer = greedy(self.model.model, self.model.tokenizer,
                        self.template.generation_prompt(prompt), max_new_tokens,
                        add_special_tokens=self.template.add_special_tokens)
        if not answer.strip():
            raise UserError("the model generated nothing for this prompt (it ended at "
                            "once): nothing to trace")
        return Query(answer, dict(prompt), focus, as_written=True)

    def run(self, query: Query | str, *, method: str = "grad", all_rows: bool = False,
            top_k: int = 50, alignment: str = "cosine", rank_by: str = "fused",
            checksum: bool = True, rerank: int = 100, checkpoints: list | None = None,
            recipe: str | os.PathLike | None = None) -> pd.DataFrame:
        """One query by the chosen path: `method` "grad" (gradient alignment, fused with
        retrieval) over retrieved candidates or, with `all_rows`, the gradient store;
        "magic" (every row, by replaying the fine-tune: `recipe` if the adapter has none);
        any other LM method over the candidates (or every row)."""
        if method == "magic":
            return self.trace_magic(query, top_k=top_k, recipe=recipe)
        if method != "grad":
            return self.trace_method(query, method=method, top_k=top_k, all_rows=all_rows,
                                     checkpoints=checkpoints)
        if all_rows:
            return self.trace_all_rows(query, top_k=top_k, alignment=alignment,
                                       verify=checksum, rerank=rerank, rank_by=rank_by)
        return self.trace(query, top_k=top_k, alignment=alignment, rank_by=rank_by)

    def _prepare(self, query: Query | str, top_k: int) -> tuple[Query, FormattedText]:
        """The query as the model saw it, checked before any gradient is computed."""
        if isinstance(query, str):
            query = Query(query)
        if top_k < 1:
            raise UserError("top-k must be at least 1")
        resolved = query.resolved(self.template)
        said = (query.where, query.output, repr(query.prompt))  # a note once per query
        if resolved.split_from_text and not query.split_from_text and \
                said not in self._noted:
            self._noted.add(said)
            at = f"{query.where}: " if query.where else ""
            shown = ", ".join(f"{k}=<{len(v)} turns>" if isinstance(v, list) else
                              f"{k}={v[:40]!r}" for k, v in resolved.prompt.items())
            progress.note(f"{at}read the query as a formatted prompt and answer ({shown}; "
                          f"answer {resolved.output[:40]!r}); pass --as-written to trace "
                          "the text as one answer")
            if resolved.lead_in:
                progress.note(f"{at}the query opens with {resolved.lead_in[:50]!r}, which the "
                              "index's template does not have: traced without it, as the "
                              "index's rows are; if the model was trained with it, index "
                              "again with a --template that starts with it")
        q_text = resolved.formatted(self.template)
        self.model.check_scored(q_text, what="the query")
        return resolved, q_text

    def score_rows(self, query: Query | str, row_ids: list[int], alignment: str = "cosine"
                   ) -> np.ndarray:
        """The gradient alignment of the query with these rows (exact gradients), e.g. the
        rows `spans` found a copy in: did the copied row also teach the answer?"""
        _, q_text = self._prepare(query, 1)
        return self._align_rows(q_text, row_ids, alignment)[0]

    def word_shares(self, df: pd.DataFrame, show: int, alignment: str = "cosine") -> dict:
        """`token_scores` for a trace's result: its traced output against its first
        `show` rows (with the trace's own mix of plain and whitened cosines, if any)."""
        traced = Query(df.attrs["query"], df.attrs["prompt"], df.attrs["focus"],
                       as_written=True)
        return self.token_scores(traced, [int(r) for r in df["row"][:show]], alignment,
                                 mix=df.attrs.get("whitened_weight"))

    def token_scores(self, query: Query | str, row_ids: list[int], alignment: str = "cosine",
                     max_row_tokens: int = 512, mix: float | None = None) -> dict:
        """Each word's share of each row's gradient score, both ways: the query's answer
        words (which words this row taught) and the row's own trained words (which of its
        words taught the answer). The shares of one row add up to its score, because the
        loss is a mean over tokens and the alignment is linear in each gradient. Rows whose
        trained text is longer than `max_row_tokens` get answer shares only. A store of
        both vectors: the score is (1 - mix) plain + mix whitened cosine, `mix` None
        taking the query's regime from the store as `_scores` does; each term is linear
        too."""
        from datablame.methods.gradient_alignment import check_alignment

        check_alignment(alignment)
        self._check_both(alignment)
        _, q_text = self._prepare(query, 1)
        texts = [self.row_text(int(r)) for r in row_ids]
        ek = self.curvature()
        with progress.task("per-token scores", len(texts) + 1) as advance:
            g_q = self.model.gradients([q_text]).astype(np.float64)[0]
            row_grads = self.model.gradients(texts, batch_size=self.batch_size,
                                             names=list(map(int, row_ids))).astype(np.float64)
            # terms of the score: (weight, query vector, row vectors, query norm, row norms);
            # whitened, a token's share is its gradient . H^-1 g over the whitened norms
            plain = (1.0, g_q, row_grads, np.linalg.norm(g_q),
                     np.linalg.norm(row_grads, axis=1))
            if ek is None:
                terms = [plain]
            else:
                if self.holds_both() and mix is None:
                    mix = self._store_mix(g_q)
                w_q, w_rows = (ek.whiten(g).numpy() for g in (g_q[None], row_grads))
                s_q, s_rows = (ek.solve(g).numpy() for g in (g_q[None], row_grads))
                whitened = (1.0, s_q[0], s_rows, np.linalg.norm(w_q),
                            np.linalg.norm(w_rows, axis=1))
                terms = [whitened] if not self.holds_both() else \
                    [t for t in ((1 - mix, *plain[1:]), (mix, *whitened[1:])) if t[0]]
            n = len(texts)
            # the answer's tokens against every row (and term) at once: (T_q, terms x rows)
            q_parts = self.model.token_gradients(q_text, np.vstack([t[2] for t in terms]),
                                                 batch_size=self.batch_size)
            advance(1)
            if q_parts is None:
                return {}

            def scales(j: int) -> list[float]:
                return [t[0] if alignment == "dot" else
                        t[0] / ((float(t[3]) or 1.0) * (float(t[4][j]) or 1.0)) for t in terms]

            answer = _traced_words(q_text, q_parts[0])
            result: dict = {"alignment": alignment, "answer": {"text": answer["text"],
                                                              "shares": {}}, "rows": {},
                            "scores": {}}
            for j, (r, text) in enumerate(zip(row_ids, texts, strict=True)):
                scale = scales(j)
                mine = sum(q_parts[1][:, i * n + j] * scale[i] for i in range(len(terms)))
                result["answer"]["shares"][str(int(r))] = answer["assign"](mine)
                # what the shares add up to: the exact score (an --all-rows row outside the
                # exact re-rank shows the store's projected one)
                result["scores"][str(int(r))] = float(np.sum(mine))
                parts = self.model.token_gradients(text, np.vstack([t[1] for t in terms]),
                                                   batch_size=self.batch_size) \
                    if self.model.encode([text]).input_ids.shape[1] <= max_row_tokens else None
                if parts is not None:
                    own = _traced_words(text, parts[0])
                    result["rows"][str(int(r))] = {"text": own["text"], "shares": own["assign"](
                        sum(parts[1][:, i] * scale[i] for i in range(len(terms))))}
                advance(1)
        return result

    def trace_group(self, queries: list[Query], *, top_k: int = 50, all_rows: bool = False,
                    rerank: int = 100, checksum: bool = True, names: list | None = None
                    ) -> pd.DataFrame:
        """The rows behind many outputs together (a group question, e.g. every answer a
        reviewer marked wrong): each row's mean gradient cosine over the queries, exact.

        Candidates: the union of each query's `top_k` retrieved rows or, with `all_rows`,
        the gradient store's best rows for the sum of the queries' unit projected
        gradients (its cosine with a row, times the sum's norm, is the row's summed
        projected cosine over the queries: one pass over the store), the best
        max(`top_k`, `rerank`) of them, every candidate then scored exactly. `helps` /
        `opposes` count the queries a row's gradient agrees / disagrees with
        (|cosine| > 0.1), `strongest_query` names the one it weighs most on."""

        if not queries:
            raise UserError("no queries to aggregate over")
        names = names if names is not None else list(range(1, len(queries) + 1))
        resolved, prepared = zip(*(self._prepare(q, top_k) for q in queries), strict=True)
        with progress.task("query gradients", len(prepared)) as advance:
            q_grads = self._gradients(list(prepared), batch_size=self.batch_size,
                                      progress=advance, names=[f"query {n}" for n in names])
        if all_rows:
            store = self._gradient_store(checksum)
            depth = min(len(self.rows), max(top_k, rerank))
            if store.holds_both:  # each query's mix column already has the unit halves
                candidates, _ = store.top_k(self._query_columns(store, q_grads)[:, 0].sum(
                    axis=0), depth, "dot", workers=self.scan_workers, ray=self.scan_ray)
            else:
                projected = store.projector.project(q_grads)
                unit = projected / np.maximum(np.linalg.norm(projected, axis=1,
                                                             keepdims=True), 1e-30)
                candidates, _ = store.top_k(unit.sum(axis=0), depth, "cosine",
                                            workers=self.scan_workers, ray=self.scan_ray)
        else:
            found: dict[int, None] = {}
            for q in resolved:
                for r in self.retrieve(q, top_k)[0]:
                    found.setdefault(int(r), None)
            candidates = np.fromiter(found, dtype=int)
        with progress.task("gradients", len(candidates)) as advance:
            per_query, _ = self._exact_scores(
                q_grads, [self.row_text(int(i)) for i in candidates], "cosine",
                batch_size=self.batch_size, progress=advance, names=list(map(int, candidates)))
        mean = per_query.mean(axis=0)
        order = np.argsort(-mean, kind="stable")[:top_k]
        strongest = np.argmax(np.abs(per_query[:, order]), axis=0)
        extra = {"helps": (per_query[:, order] > 0.1).sum(axis=0),
                 "opposes": (per_query[:, order] < -0.1).sum(axis=0),
                 "strongest_query": [names[i] for i in strongest]}
        df = _ranked_frame(self.rows, candidates[order], mean[order], "cosine", extra)
        method = (f"grad-cosine, per query {1 - MIX_WHITENED:g} plain + {MIX_WHITENED:g} "
                  "after EK-FAC curvature, or plain where its gradient is weak"
                  if self.holds_both() else self._grad_method("cosine"))
        df.attrs.update(group=[str(n) for n in names], method=f"{method}"
                        ", mean over the queries", candidates=int(len(candidates)),
                        candidates_from="gradient store" if all_rows else "retrieval",
                        index=str(self.index.path), model=str(self.options.model),
                        adapter=None if self.options.adapter is None
                        else str(self.options.adapter), rows=len(self.rows.records))
        return df

    def _align_rows(self, q_text: FormattedText, row_ids, alignment: str
                    ) -> tuple[np.ndarray, float | None]:
        """Exact gradient alignment of the query text with each of these rows, and the mix
        weight it used (`_scores`)."""
        texts = [self.row_text(int(i)) for i in row_ids]
        with progress.task("gradients", len(texts) + 1) as advance:
            q_vec = self._gradients([q_text], names=["the query"])
            advance(1)
            scores, mixes = self._exact_scores(q_vec, texts, alignment,
                                               batch_size=self.batch_size, progress=advance,
                                               names=list(map(int, row_ids)))
        return scores[0], mixes[0]

    def trace(self, query: Query | str, top_k: int = 50, alignment: str = "cosine",
              rank_by: str = "fused") -> pd.DataFrame:
        """Stage 1: retrieve `top_k` candidates; stage 2: score them by gradient alignment
        and order them by the fusion of both (default, see `fused_key`) or by the
        gradient alone (`rank_by="gradient"`, the seed's order; bench/facts.py compares
        them). `score` is always the signed gradient alignment.
        """
        check_rank_by(rank_by)
        query, q_text = self._prepare(query, top_k)
        cand_ids, distances = self.retrieve(query, top_k)
        scores, mix = self._align_rows(q_text, cand_ids, alignment)
        order = np.argsort(-scores, kind="stable")
        ret_rank = np.arange(1, len(scores) + 1)
        extra: dict = {}
        if rank_by == "fused":
            grad_rank = strength_ranks(scores)
            order, fused = self._fuse(grad_rank, ret_rank, scores, alignment, mix)
            extra = {"fused": fused[order], "gradient_rank": grad_rank[order]}
        df = _ranked_frame(self.rows, cand_ids[order], scores[order], alignment,
                           {**extra, "distance": distances[order].astype(float),
                            "retrieval_rank": ret_rank[order]})
        how = ", fused with retrieval" if rank_by == "fused" else ""
        self._describe(df, query, q_text, f"{self._grad_method(alignment, mix)}{how}")
        df.attrs["whitened_weight"] = self._whitened_weight(mix)
        return df

    def _gradient_store(self, verify: bool):
        from datablame.store.gradient_store import GradientStore

        store = getattr(self, "_store", None)
        if store is None or (verify and not self._store_verified):
            # checksums read every shard once: do it once per Tracer, not once per query
            store = GradientStore.load(self.index.path, verify=verify)
            store.check_compatible(self.model.identity(), self.template, self.rows)
            self._store, self._store_verified = store, verify
        return store

    def scan_store_for(self, queries: list[Query | str], *, top_k: int = 50,
                       alignment: str = "cosine", verify: bool = True, rerank: int = 100,
                       rank_by: str = "fused", pool: int = 1000) -> None:
        """Read the gradient store once for every query of a batch (one matrix product per
        block of rows, `GradientStore.top_k_many`) and keep each query's candidates for
        its `trace_all_rows` call with the same settings: a queries file costs one pass
        over the store instead of one per line."""
        check_rank_by(rank_by)
        if not queries:
            return
        store = self._gradient_store(verify)
        fused_mode = rank_by == "fused"
        depth = min(len(self.rows), max(top_k, rerank, pool if fused_mode else 0))
        texts = [self._prepare(q, top_k)[1] for q in queries]
        self._check_both(alignment)
        # projected a batch at a time: only K numbers per query are kept, not a gradient
        columns = np.concatenate([self._query_columns(store, self._gradients(
            texts[i:i + self.batch_size], batch_size=self.batch_size))
            for i in range(0, len(texts), self.batch_size)])
        scanned = self._scan(store, columns, depth, alignment, fused_mode)
        for text, result in zip(texts, scanned, strict=True):
            # the whole formatted text is the key: a focus or another split of the same
            # words is another query; a query asked twice is taken twice
            key = (repr(text), depth, alignment, fused_mode)
            self._scanned[key] = (result, self._scanned.get(key, (None, 0))[1] + 1)

    def trace_all_rows(self, query: Query | str, top_k: int = 50, alignment: str = "cosine",
                       verify: bool = True, rerank: int = 100, rank_by: str = "fused",
                       pool: int = 1000) -> pd.DataFrame:
        """Score *every* row with the stored projected gradients (one backward pass and
        one pass over the store), re-rank the best `rerank` rows with their exact
        gradients (the projection finds them, the exact gradient orders them), and by
        default fuse that ranking with embedding retrieval over all rows.

        rank_by="fused" orders rows by `fused_key` over the best `pool` rows of each list
        (the gradient list by |score|); rank_by="gradient" is the signed gradient ranking
        alone (bench/facts.py and bench/paraphrase.py compare them). The `score` column is
        always the signed gradient alignment; `fused` is the ordering key. The projection
        finds the candidates but leaves near-ties among them, which is why the head is
        re-scored exactly; `rerank=0` skips the exact pass.
        """
        check_rank_by(rank_by)
        query, q_text = self._prepare(query, top_k)
        store = self._gradient_store(verify)
        self._check_both(alignment)
        fused_mode = rank_by == "fused"
        depth = min(len(self.rows), max(top_k, rerank, pool if fused_mode else 0))
        q_grad = self._gradients([q_text])
        key = (repr(q_text), depth, alignment, fused_mode)
        scanned, left = self._scanned.pop(key, (None, 0))
        if left > 1:
            self._scanned[key] = (scanned, left - 1)
        if scanned is None:  # else `scan_store_for` read the store once for a queries file
            scanned = self._scan(store, self._query_columns(store, q_grad), depth, alignment,
                                 fused_mode)[0]
        q_vec, row_ids, proj_scores, mix = scanned
        kind = "dot" if mix is not None else alignment  # how the stored rows are scored
        scores = proj_scores.copy()
        exact = np.zeros(len(row_ids), dtype=bool)
        if rerank > 0:
            head = row_ids[:rerank]
            with progress.task("exact re-ranking", len(head)) as advance:
                scores[: len(head)] = self._exact_scores(
                    q_grad, [self.row_text(int(i)) for i in head], alignment, [mix],
                    batch_size=self.batch_size, progress=advance,
                    names=list(map(int, head)))[0][0]
            exact[: len(head)] = True
            key = np.abs(scores[: len(head)]) if fused_mode else scores[: len(head)]
            order = np.r_[np.argsort(-key, kind="stable"), np.arange(len(head), len(row_ids))]
            row_ids, scores, proj_scores, exact = (row_ids[order], scores[order],
                                                   proj_scores[order], exact[order])
        grad_rank = np.arange(1, len(row_ids) + 1)
        extra: dict = {}
        if fused_mode:
            ret_ids, distances = self.retrieve(query, depth)
            missing = np.setdiff1d(ret_ids, row_ids)  # found by retrieval only
            if len(missing):
                miss_scores = store.score_rows(q_vec, missing, kind)
                row_ids = np.r_[row_ids, missing]
                scores = np.r_[scores, miss_scores]
                proj_scores = np.r_[proj_scores, miss_scores]
                exact = np.r_[exact, np.zeros(len(missing), dtype=bool)]
                grad_rank = np.r_[grad_rank, np.full(len(missing), depth + 1)]
            ret_rank = np.full(len(row_ids), depth + 1)
            dist = np.full(len(row_ids), np.nan)
            where = {int(r): i for i, r in enumerate(row_ids)}
            for rank, (r, d) in enumerate(zip(ret_ids, distances, strict=True), start=1):
                ret_rank[where[int(r)]] = rank
                dist[where[int(r)]] = d
            order, fused = self._fuse(grad_rank, ret_rank, scores, alignment, mix)
            row_ids, scores, proj_scores, exact = (row_ids[order], scores[order],
                                                   proj_scores[order], exact[order])
            extra = {"fused": fused[order], "gradient_rank": grad_rank[order],
                     "retrieval_rank": ret_rank[order], "distance": dist[order]}
        keep = slice(0, top_k)
        df = _ranked_frame(self.rows, row_ids[keep], scores[keep], alignment,
                           {**{k: v[keep] for k, v in extra.items()},
                            "store_score": proj_scores[keep], "exact": exact[keep]})
        how = "fused with retrieval" if fused_mode else "gradient only"
        self._describe(df, query, q_text, f"{self._grad_method(alignment, mix)} (all rows, "
                                          f"K={store.manifest['proj_dim']}, exact top "
                                          f"{min(rerank, len(self.rows))}, {how})")
        df.attrs["whitened_weight"] = self._whitened_weight(mix)
        return df

    def trace_method(self, query: Query | str, method: str = "datainf", top_k: int = 50,
                     all_rows: bool = False, checkpoints: list | None = None,
                     **params) -> pd.DataFrame:
        """Rank candidates (or, with `all_rows`, every row) with any gradient method that
        runs on LoRA parameters: grad-dot, grad-cos, datainf, ekfac, trak, tracin,
        trackstar.

        tracin takes `checkpoints=[(adapter_dir, learning_rate), ...]` saved during
        fine-tuning (same base model). Exact gradients are held in memory: for large data
        use `trace_all_rows` (the projected gradient store) or retrieval candidates.
        """
        from datablame.methods.registry import METHODS, get_method
        from datablame.models.text_rows import TextRowsAdapter

        if method not in LM_METHODS:
            raise UserError(f"method '{method}' does not run on a language model here "
                            f"(use {', '.join(LM_METHODS)})")
        query, q_text = self._prepare(query, top_k)
        if all_rows:
            cand_ids = np.arange(len(self.rows))
            distances = np.full(len(cand_ids), np.nan)
        else:
            cand_ids, distances = self.retrieve(query, top_k)
        texts = [self.row_text(int(i)) for i in cand_ids]
        adapter = TextRowsAdapter(self.model, self.batch_size)
        if METHODS[method].needs_checkpoints:
            if not checkpoints:
                raise UserError(f"{method} needs checkpoints: "
                                "[(adapter_dir, learning_rate), ...]")
            params["checkpoints"] = [
                (TextRowsAdapter(self.model.options().with_adapter(d).load(),
                                 self.batch_size), float(lr)) for d, lr in checkpoints]
        with progress.task(f"{method} gradients", len(texts) + 1):
            est = get_method(method, **params).fit(adapter, texts, None)
            scores = est.scores([q_text], None)[0]
        order = np.argsort(-scores, kind="stable")[: top_k if all_rows else len(scores)]
        df = _ranked_frame(self.rows, cand_ids[order], scores[order], "dot",
                           {"distance": distances[order].astype(float)})
        self._describe(df, query, q_text, method)
        return df

    def trace_magic(self, query: Query | str, top_k: int = 50,
                    recipe: str | os.PathLike | None = None) -> pd.DataFrame:
        """Score every row by MAGIC (methods/magic.py): replay the adapter's fine-tune from
        its recipe and differentiate the query's loss by each row's weight. Refused unless
        the replay reproduces the adapter: scores of another training run would not be
        this model's. Costs a few fine-tunes per call: small adapters and data only."""
        return self.trace_magic_many([query], top_k=top_k, recipe=recipe)[0]

    def trace_magic_many(self, queries: list[Query | str], top_k: int = 50,
                         recipe: str | os.PathLike | None = None) -> list[pd.DataFrame]:
        """`trace_magic` for many queries at the price of one: one forward replay, one
        reverse pass and one removal check serve them all."""
        from datablame.methods.magic import FineTuneReplay
        from datablame.text_verify import check_recipe_rows, made_by_recipe

        if self.options.adapter is None:
            raise UserError("magic replays a LoRA fine-tune: pass the --adapter it made")
        prepared = [self._prepare(q, top_k) for q in queries]
        q_texts = [q_text for _, q_text in prepared]
        recipe_obj = check_recipe_rows(self.rows, self.options.model, self.options.adapter,
                                       recipe)
        replay = getattr(self, "_replay", None)
        if replay is None:
            replay = self._replay = FineTuneReplay(self.rows, self.options.model, recipe_obj)
        all_scores = replay.scores(q_texts, adapter_dir=self.options.adapter,
                                   made_by_recipe=made_by_recipe(
                                       self.options.adapter, self.options.model, recipe_obj,
                                       len(self.rows)))
        check = replay.removal_check(all_scores, q_texts)
        replay.check_smooth(check)
        if not recipe_obj.adam_eps_root:
            progress.note("this fine-tune used torch's AdamW: a near-zero second moment "
                          "makes removing some rows jump rather than follow the derivative; "
                          "`adam_eps_root: 1e-8` in the recipe makes MAGIC's scores predict "
                          "removals far better (README, 'Where MAGIC is exact')")
        frames = []
        for i, ((query, q_text), scores) in enumerate(zip(prepared, all_scores, strict=True)):
            order = np.argsort(-scores, kind="stable")[:top_k]
            df = _ranked_frame(self.rows, order, scores[order], "dot", {})
            df["reading"] = [f"{s:+.2g} loss if removed" for s in scores[order]]
            self._describe(df, query, q_text, (
                f"magic (replayed fine-tune, {len(replay.steps)} steps; check: dropping "
                f"{check['dropped']} random rows changed the loss by "
                f"{check['actual'][i]:+.3g}, predicted {check['predicted'][i]:+.3g})"))
            frames.append(df)
        return frames

    def _describe(self, df: pd.DataFrame, query: Query, q_text: FormattedText, method: str
                  ) -> None:
        from datablame.store.span_index import longest_common_run, traced_texts

        # how much of the answer each row holds word for word: a copy, whatever the score
        answer = query.focus or query.output
        copied = [max((longest_common_run(answer, t) for t in
                       traced_texts(self.template, self.rows.records[int(r)])), default=0)
                  for r in df["row"]]
        at = next((i for i, c in enumerate(df.columns) if str(c).startswith("field:")),
                  len(df.columns))
        df.insert(at, "copied", copied)
        df.attrs.update(query=query.output, prompt=query.prompt, focus=query.focus,
                        text=q_text.text,
                        method=method, loss_on=self.model.loss_on,
                        params=self.model.params_spec, num_params=self.model.num_params,
                        response_field=self.template.response_field,
                        index=str(self.index.path), model=str(self.options.model),
                        adapter=None if self.options.adapter is None
                        else str(self.options.adapter),
                        rows=len(self.rows.records))


def _traced_words(formatted: FormattedText, token_spans: list[tuple[int, int]]) -> dict:
    """The traced text of `formatted` (its spans joined by newlines) and a function that
    sums per-token values into its words (a token goes to the word it overlaps most;
    tokens outside every word, such as an end-of-turn marker, to the nearest word)."""
    from bisect import bisect_right

    from datablame.store.span_index import words

    pieces, starts, ends, at = [], [], [], 0
    for a, b in formatted.traced_spans():
        piece = formatted.text[a:b]
        for _, ws, we in words(piece):
            starts.append(a + ws)
            ends.append(a + we)
        pieces.append(piece)
        at += len(piece) + 1
    text = "\n".join(pieces)

    def assign(values) -> list[float]:
        out = [0.0] * len(starts)
        if not starts:
            return out
        for (b, e), v in zip(token_spans, values, strict=True):
            i = max(bisect_right(starts, b) - 1, 0)
            best, best_overlap = i, -1
            for j in range(i, min(i + 4, len(starts))):
                overlap = min(e, ends[j]) - max(b, starts[j])
                if overlap > best_overlap:
                    best, best_overlap = j, overlap
            if best_overlap <= 0:  # between or after words: the nearest one
                best = min(range(max(i - 1, 0), min(i + 2, len(starts))),
                           key=lambda j: min(abs(b - ends[j]), abs(starts[j] - e)))
            out[best] += float(v)
        return out

    return {"text": text, "assign": assign}


def _ranked_frame(rows, row_ids, scores, alignment: str, extra: dict) -> pd.DataFrame:
    from datablame.methods.gradient_alignment import reading

    df = pd.DataFrame({
        "rank": np.arange(1, len(row_ids) + 1),
        "row": np.asarray(row_ids, dtype=int),
        "score": np.asarray(scores, dtype=float),
        "reading": [reading(s) if alignment == "cosine" else "" for s in scores],
        **extra,
    })
    fields = pd.DataFrame([rows.records[int(i)] for i in df["row"]])
    return pd.concat([df, fields.add_prefix("field:")], axis=1)


def trace(
    index_dir: str | os.PathLike,
    model: str | os.PathLike,
    query: str,
    *,
    adapter: str | os.PathLike | None = None,
    prompt: dict[str, str] | None = None,
    top_k: int = 50,
    **options,
) -> pd.DataFrame:
    """One-shot trace; see `Tracer` to keep the model loaded across queries."""
    tracer = Tracer(index_dir, model, adapter, **options)
    return tracer.trace(Query(query, prompt or {}), top_k=top_k)


def verbatim_spans(index_dir: str | os.PathLike, query: Query | str, *, min_words: int = 7,
                   max_rows: int = 20, data: str | os.PathLike | None = None,
                   tracer: Tracer | None = None) -> dict:
    """Every maximal span of the query's answer (at least `min_words` words) that occurs
    word for word in a training row's trained text, rarest first, with the rows holding it.
    A string match, not an influence estimate; with a `tracer` (the model), each matched
    row also gets its gradient alignment with the answer: copied *and* taught it, or
    copied-looking but not what the model learned the answer from."""
    from datablame.data.rows import load_rows
    from datablame.store.retrieval_index import load_index
    from datablame.store.span_index import SpanIndex

    check_at_least("--min-words", min_words, 1)
    check_at_least("--max-rows", max_rows, 1)
    index = load_index(index_dir)
    template = index.template
    spans = SpanIndex(index_dir, index.manifest["data"]["fingerprint"], template)
    query = Query(query) if isinstance(query, str) else query
    resolved = query.resolved(template)
    answer = resolved.focus or resolved.output
    if not answer.strip():
        raise UserError("the query is empty: pass the model output to look for")
    found = spans.find(answer, min_words=min_words, max_rows=max_rows)
    covered = np.zeros(len(answer), dtype=bool)
    for s in found:
        covered[s.start:s.end] = True
    letters = np.array([not c.isspace() for c in answer])
    result = {"query": answer, "min_words": min_words, "rows": index.manifest["data"]["rows"],
              "copied_fraction": float(covered[letters].mean()) if letters.any() else 0.0,
              "spans": [dict(vars(s)) for s in found]}
    if data is not None or index.data_path.exists():  # the rows' text, for showing them
        rows = load_rows(data or index.data_path, split=index.manifest["data"].get("split"))
        index.check_rows(rows)
        result["row_fields"] = {r: rows.records[r] for s in found for r in s.rows[:3]}
    if tracer is not None and found:
        from datablame.methods.gradient_alignment import reading

        matched = sorted({r for s in found for r in s.rows})
        scores = tracer.score_rows(query, matched)
        result["gradient"] = {int(r): {"score": float(v), "reading": reading(float(v))}
                              for r, v in zip(matched, scores, strict=True)}
    return result
