"""datablame: `git blame` for training data.

Point at one model output and get back the training rows that caused it, ranked by an
influence score. Sign convention everywhere: a positive score means the row *helped* the
model produce the queried output; a negative score means it pushed against it.
"""

__version__ = "0.1.0"

import logging as _logging  # noqa: E402


class _NoOfflineKernelNotice(_logging.Filter):
    """bitsandbytes (installed for --quantize) looks for an optional CPU kernel on the Hub
    when anything imports peft, on CPUs with AVX512-bf16, and it and the `kernels` package
    log that they could not fetch or verify it: offline, as datablame always is, that is
    every run, and it would precede every one-line error."""

    def filter(self, record: _logging.LogRecord) -> bool:
        return "kernels-community" not in str(record.msg)


for _name in ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub"):
    _logging.getLogger(_name).addFilter(_NoOfflineKernelNotice())

from datablame.text import build_index, trace  # noqa: E402

__all__ = ["__version__", "build_index", "trace"]
