"""Errors that mean "the input is wrong", shown to the user as one line (exit status 1), and the
cause of any other failure found inside the wrappers it arrives in.

A failure inside a run reaches the driver wrapped: a Ray task's or actor's RayTaskError keeps the
task's own exception as `cause`; Ray Data wraps a stage's exception in UserCodeException and
chains it as __cause__; Ray Train v2 raises WorkerGroupError, whose `worker_failures` map ranks
to UserExceptionWithTraceback (the worker's exception as `_base_exc`), or ControllerError
(`controller_failure`); torch re-raises a failed write as a RuntimeError whose __context__ is the
OSError. `causes` walks all of these; `describe` says the one that matters in one line.
"""

from __future__ import annotations

import errno as errno_codes
from collections.abc import Iterator


class SarError(RuntimeError):
    """A stage cannot go on; the message names the file, field or value at fault."""


class DatasetMismatch(SarError):
    """A dataset's manifest does not match the model or run that wants to use it."""


def causes(err: BaseException) -> Iterator[BaseException]:
    """`err` and every exception inside it, outermost first: what Ray's wrappers carry (a task's
    `cause`, Ray Train's worker failures by rank and controller failure, the exception a traceback
    wrapper holds), then __cause__ and __context__."""
    queue: list[BaseException] = [err]
    seen: set[int] = set()
    while queue:
        e = queue.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        inner = [getattr(e, "cause", None), getattr(e, "_base_exc", None), getattr(e, "controller_failure", None)]
        failures = getattr(e, "worker_failures", None)
        if isinstance(failures, dict):
            inner += [failures[rank] for rank in sorted(failures)]
        inner += [e.__cause__, e.__context__]
        queue[:0] = [x for x in inner if isinstance(x, BaseException)]


def _carries(e: BaseException) -> bool:
    """True for Ray's wrappers, whose own message repeats (with a traceback) the exception they carry."""
    return (type(e).__name__ == "UserCodeException"  # Ray Data: the stage's exception is its __cause__
            or any(isinstance(getattr(e, a, None), BaseException) for a in ("cause", "_base_exc", "controller_failure"))
            or bool(getattr(e, "worker_failures", None)))


def root_cause(err: BaseException) -> BaseException:
    """The exception that says what went wrong: the first OSError (a full disk, a permission, a file
    gone) or out-of-memory error inside `err`, else the outermost one that is not a wrapper."""
    chain = list(causes(err))
    for e in chain:
        if not _carries(e) and (isinstance(e, (OSError, MemoryError)) or type(e).__name__ == "OutOfMemoryError"):
            return e
    return next((e for e in chain if not _carries(e)), err)


def describe(e: BaseException) -> str:
    """One line for an exception: an OSError as `FILE: what (ENAME)`, an out-of-memory error by its
    first sentence, anything else as `Type: its first line`."""
    if isinstance(e, OSError) and e.errno is not None and e.strerror:
        code = errno_codes.errorcode.get(e.errno, str(e.errno))
        text = f"{e.strerror} ({code})"
        return f"{e.filename}: {text}" if e.filename else text
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    first = lines[0] if lines else ""
    if type(e).__name__ == "OutOfMemoryError" or isinstance(e, MemoryError):
        sentence = first.split(". ")[0].rstrip(".")
        return f"out of memory: {sentence}" if sentence else "out of memory"
    return f"{type(e).__name__}: {first}" if first else type(e).__name__
