"""Joining Ray, said once for every `--ray` path (the gradient build's actors, the store
scan's tasks). Optional: `pip install 'datablame[ray]'`."""

from __future__ import annotations

import contextlib
import logging
import os

from datablame.errors import UserError


def connect(address: str, cpus: int | None = None) -> None:
    """Use a running Ray (already initialised), start one on this machine ("local", with
    `cpus` CPUs, default all), or join a cluster ("auto" or HOST:PORT); a missing Ray or a
    cluster that cannot be joined is one line."""
    try:
        import ray
    except ImportError:
        raise UserError("--ray needs Ray: pip install 'datablame[ray]'") from None
    if ray.is_initialized():
        return
    if address == "local":
        ray.init(num_cpus=cpus or os.cpu_count() or 1, include_dashboard=False,
                 log_to_driver=False, logging_level=logging.WARNING)
        return
    try:
        # WARNING: Ray's "Connecting to existing Ray cluster" line would precede the error
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise UserError(f"--ray {address}: cannot join the Ray cluster "
                        f"({str(exc).splitlines()[0]})") from None


@contextlib.contextmanager
def user_errors(died: str | None = None):
    """A `UserError` raised inside a Ray task or actor reaches the user as its one line,
    not as Ray's wrapped traceback; so does, with `died` (a line with "{}" where Ray's
    reason goes), a worker, actor or node that died more often than Ray retries it; and
    a runtime environment the cluster could not set up."""
    import ray

    lost = (ray.exceptions.WorkerCrashedError, ray.exceptions.RayActorError,
            ray.exceptions.NodeDiedError, ray.exceptions.LocalRayletDiedError,
            ray.exceptions.OutOfMemoryError, ray.exceptions.ObjectLostError)
    try:
        yield
    except ray.exceptions.RuntimeEnvSetupError as exc:  # the cluster's pip / conda / files
        raise UserError(f"--ray: Ray could not set up the workers' runtime environment "
                        f"({_last_line(exc)}): check the cluster's or the job's "
                        "runtime_env") from None
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, UserError):
            raise UserError(str(cause)) from None
        if died is not None and isinstance(cause, lost):
            raise UserError(died.format(_first_line(cause))) from None
        raise
    except lost as exc:
        if died is None:
            raise
        raise UserError(died.format(_first_line(exc))) from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _last_line(exc: BaseException) -> str:
    """Ray puts the setup's own error (pip's, conda's) last, after its traceback."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[-1] if lines else type(exc).__name__
