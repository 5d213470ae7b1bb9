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

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from datablame import progress
from datablame.errors import UserError
from datablame.template import ALPACA_TEMPLATE, FormattedText, PromptTemplate


def build_index(
    train_file: str | os.PathLike,
    out: str | os.PathLike,
    *,
    template: str = ALPACA_TEMPLATE,
    response_field: str | None = None,
    embedder: str | None = None,
    index_type: str = "flat",
    batch_size: int = 64,
    device: str = "cpu",
) -> dict:
    """Embed every training row (formatted with `template`) into a FAISS index at `out`.

    Returns the manifest written beside the index.
    """
    from datablame.features.embeddings import Embedder
    from datablame.rows import load_rows
    from datablame.store.retrieval_index import INDEX_TYPES, save_index

    if index_type not in INDEX_TYPES:
        raise UserError(f"unknown index type '{index_type}' (use {', '.join(INDEX_TYPES)})")
    tmpl = PromptTemplate(template, response_field)
    rows = load_rows(train_file)
    rows.require_fields(tmpl.fields)
    texts = [tmpl.format(r).text for r in rows.records]
    enc = Embedder(embedder, device=device)
    with progress.task("embedding rows", len(texts)) as advance:
        vectors = enc.encode(texts, batch_size=batch_size, progress=advance)
    return save_index(Path(out), vectors, rows, tmpl, enc.name, index_type)


@dataclass
class Query:
    """What the model said (`output`) and, optionally, the prompt fields it answered.

    The query is always formatted with the index's template, like a training row; missing
    prompt fields are left empty (Alpaca drops their blocks). Measured on the demo model:
    the raw output alone (the seed's choice) put the culprit at gradient rank 133 of 200,
    the same text inside the template's response block put it at rank 1.
    """

    output: str
    prompt: dict[str, str] = field(default_factory=dict)

    def formatted(self, template: PromptTemplate) -> FormattedText:
        if not self.output.strip():
            raise UserError("the query is empty: pass the model output to trace")
        unknown = set(self.prompt) - set(template.fields)
        if unknown:
            raise UserError(
                f"query field(s) {', '.join(sorted(unknown))} are not in the index's "
                f"template (fields: {', '.join(template.fields)})"
            )
        return template.format({**self.prompt, template.response_field: self.output})


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
        max_length: int = 512,
        loss_on: str = "response",
        batch_size: int = 8,
    ):
        from datablame.adapters.hf_causal_lm import CausalLMAdapter
        from datablame.rows import load_rows
        from datablame.store.retrieval_index import load_index

        self.index = load_index(index_dir)
        self.rows = load_rows(data or self.index.data_path)
        self.index.check_rows(self.rows)
        self.template = self.index.template
        self.model = CausalLMAdapter(model, adapter, params=params, dtype=dtype, device=device,
                                     max_length=max_length, loss_on=loss_on)
        self.batch_size = batch_size
        self._embedder = None

    def row_text(self, row_id: int) -> FormattedText:
        """A training row exactly as the model saw it (the index's template)."""
        return self.template.format(self.rows.records[row_id])

    def retrieve(self, query: Query, top_k: int) -> tuple[np.ndarray, np.ndarray]:
        from datablame.features.embeddings import Embedder

        if self._embedder is None:
            self._embedder = Embedder(self.index.manifest["embedder"])
        qvec = self._embedder.encode([query.formatted(self.template).text])
        distances, ids = self.index.search(qvec, top_k)
        keep = ids[0] >= 0  # FAISS pads with -1 when fewer than k are found
        return ids[0][keep], distances[0][keep]

    def trace(self, query: Query | str, top_k: int = 50, alignment: str = "cosine"
              ) -> pd.DataFrame:
        """Stage 1: retrieve `top_k` candidates; stage 2: rank them by gradient alignment."""
        from datablame.methods.gradient_alignment import align, reading

        if isinstance(query, str):
            query = Query(query)
        if top_k < 1:
            raise UserError("top-k must be at least 1")
        q_text = query.formatted(self.template)
        cand_ids, distances = self.retrieve(query, top_k)
        texts = [q_text] + [self.row_text(int(i)) for i in cand_ids]
        with progress.task("gradients", len(texts)) as advance:
            grads = self.model.gradients(texts, batch_size=self.batch_size, progress=advance)
        scores = align(grads[0], grads[1:], alignment)
        order = np.argsort(-scores, kind="stable")
        df = pd.DataFrame({
            "rank": np.arange(1, len(order) + 1),
            "row": cand_ids[order].astype(int),
            "score": scores[order],
            "reading": [reading(s) if alignment == "cosine" else "" for s in scores[order]],
            "distance": distances[order].astype(float),
            "retrieval_rank": order + 1,
        })
        fields = pd.DataFrame([self.rows.records[int(i)] for i in df["row"]])
        df = pd.concat([df, fields.add_prefix("field:")], axis=1)
        df.attrs.update(query=query.output, prompt=query.prompt, text=q_text.text,
                        method=f"grad-{alignment}", loss_on=self.model.loss_on,
                        params=self.model.params_spec, num_params=self.model.num_params)
        return df


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
