"""datablame: `git blame` for training data.

Point at one model output and get back the training rows that caused it, ranked by an
influence score. Sign convention everywhere: a positive score means the row *helped* the
model produce the queried output; a negative score means it pushed against it.
"""

__version__ = "0.1.0"

from datablame.text import build_index, trace  # noqa: E402

__all__ = ["__version__", "build_index", "trace"]
