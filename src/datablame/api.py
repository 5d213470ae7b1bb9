"""Old import path of the text pipeline, kept for one release: use `datablame.text`."""

from datablame.text import (  # noqa: F401
    LM_METHODS,
    GradientOptions,
    LMOptions,
    Query,
    Tracer,
    build_index,
    trace,
)
