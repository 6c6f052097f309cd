"""The project's own error from inside Ray's wrappers, so the command line can print one line.

An exception raised in a Ray task or actor method reaches the driver as a ``RayTaskError``
that keeps it as ``cause``; one raised in a Ray Train worker reaches ``trainer.fit()`` as a
``WorkerGroupError`` that keeps it per rank in ``worker_failures`` (Ray 2.60, Train V2), and a
failed controller as a ``ControllerError`` with ``controller_failure``. Train V1's
``TrainingFailedError`` chains it as ``__cause__``. Ray is not imported: attributes are read.
"""

from __future__ import annotations


def _inner(error: BaseException) -> BaseException | None:
    """The exception ``error`` wraps, when it is one of Ray's wrappers; else None."""
    cause = getattr(error, "cause", None)  # RayTaskError (and its dual-class instances)
    if isinstance(cause, BaseException) and type(error).__module__.startswith("ray"):
        return cause
    failures = getattr(error, "worker_failures", None)  # Train V2 WorkerGroupError
    if isinstance(failures, dict) and failures:
        return failures[min(failures)]
    controller = getattr(error, "controller_failure", None)  # Train V2 ControllerError
    if isinstance(controller, BaseException):
        return controller
    if type(error).__name__ == "TrainingFailedError" and error.__cause__ is not None:
        return error.__cause__  # Train V1
    return None


def unwrap(error: BaseException) -> BaseException:
    """The innermost exception under Ray's wrappers (nested tasks wrap more than once)."""
    seen = {id(error)}
    inner = _inner(error)
    while inner is not None and id(inner) not in seen:
        error = inner
        seen.add(id(error))
        inner = _inner(error)
    return error
