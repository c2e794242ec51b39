"""Stopping on SIGTERM and SIGINT: the first asks the running stage to stop at its next safe
point, keeping what it has committed; a second stops at once.

Kubernetes and KubeRay send SIGTERM before they kill a pod (SIGKILL follows after the pod's
terminationGracePeriodSeconds), `ray job stop` sends it to a job's driver (SIGKILL follows after
RAY_JOB_STOP_WAIT_TIME_S), spot-instance schedulers do the same; Ctrl-C is SIGINT. The safe
points: a training run stops after its current step, saving a checkpoint when the newest one is
older than `{stage}.checkpoint_on_stop_after_s` (pipelines/train/worker.py); encode and sample
stop between two batches, after committing what arrived; `sar run` between two stages.

    handling()      the `sar` command's handlers, for the length of a command (main thread only)
    reinstall()     the same handlers again: ray.init replaces SIGTERM's with Ray's own (a C stack
                    dump, then exit 134) and Ray Train's fit() SIGINT's (run_in_thread avoids that)
    requested()     the signal that asked for a stop, 0 while none did
    check(detail)   raise Stopped when one did
    run_in_thread   a blocking call (Ray Train's fit) in a thread, the main thread left to the handlers
    forward / Poll  the request to processes of the Ray cluster (Train workers), through Ray's GCS
                    key-value store: one small write by the driver, a read at most every second
                    by the worker that polls (`ray.experimental.internal_kv`, the store Ray's own
                    libraries share state through; its functions are underscored, hence the pin
                    of Ray to 2.60.x)

Stopped is a BaseException, as KeyboardInterrupt is, so that no `except Exception` on the way
(a storage retry, a tracker) mistakes it for a failure; its exit status is 128 + the signal
number, the shells' convention: 143 for SIGTERM, 130 for SIGINT (README, "Exit status").
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from typing import Any, Callable, Iterator

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)
KV_NAMESPACE = "sar"  # Ray's internal key-value store: where forward() writes the request
POLL_S = 1.0  # how often a Train worker reads the store (a GCS round trip, ~1 ms)

_requested = 0  # the signal of the first request, 0: none
_forced = False  # a second signal arrived: the process exits at once
_active = False  # handling() is in force: reinstall() sets the handlers again
_previous: dict[int, Any] = {}


class Stopped(BaseException):
    """The command was asked to stop by a signal; `detail` says what it kept."""

    def __init__(self, signum: int, detail: str = "", at_once: bool = False):
        self.signum, self.detail, self.at_once = int(signum), detail, at_once
        how = f"at once by a second {name(signum)}" if at_once else f"by {name(signum)}"
        super().__init__(f"stopped {how}" + (f": {detail}" if detail else ""))

    @property
    def exit_status(self) -> int:
        """128 + the signal number: 143 for SIGTERM, 130 for SIGINT."""
        return 128 + self.signum


def name(signum: int) -> str:
    """SIGTERM, SIGINT, ... for a signal number."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _handler(signum: int, frame: Any) -> None:
    global _requested, _forced
    if not _requested:
        _requested = signum
        log.warning("%s received: stopping at the next safe point (a second %s or Ctrl-C stops at once)",
                    name(signum), name(signum))
        return
    _forced = True
    raise Stopped(signum, "what was committed is kept", at_once=True)


def reinstall() -> None:
    """Set this module's handlers again when handling() is in force (after ray.init replaced them)."""
    if _active and threading.current_thread() is threading.main_thread():
        for s in SIGNALS:
            signal.signal(s, _handler)


@contextlib.contextmanager
def handling() -> Iterator[None]:
    """Handle SIGTERM and SIGINT as stop requests inside the block, then restore the previous handlers."""
    global _active, _requested, _forced
    if threading.current_thread() is not threading.main_thread():  # signal.signal works there only
        yield
        return
    _previous.update({s: signal.getsignal(s) for s in SIGNALS})
    _requested, _forced, _active = 0, False, True
    reinstall()
    try:
        yield
    finally:
        _active, _requested = False, 0  # `forced()` stays: the process exits at once after the command
        for s, handler in _previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        _previous.clear()


def requested() -> int:
    """The signal that asked this process to stop, 0 while none did."""
    return _requested


def forced() -> bool:
    """True when a second signal asked to stop at once (the process should exit without clean-up)."""
    return _forced


def check(detail: str = "") -> None:
    """Raise Stopped (naming what was kept) when a stop was asked for."""
    if _requested:
        raise Stopped(_requested, detail)


def run_in_thread(fn: Callable[[], Any], on_stop: Callable[[int], None] | None = None, poll_s: float = 0.2) -> Any:
    """`fn()` in a thread while this thread waits, so that the signal handlers stay this module's
    and run at once; returns what `fn` returned or raises what it raised.

    Ray Train's fit() sets its own SIGINT handler when it runs on the main thread (it aborts the
    run at once, without a checkpoint), and not elsewhere, as under Ray Tune. `on_stop(signal)`
    runs here once, when a stop is asked for while `fn` runs.
    """
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as err:  # noqa: BLE001 - handed to the waiting thread as it is
            outcome["error"] = err

    thread = threading.Thread(target=target, name="sar-run", daemon=True)
    thread.start()
    told = False
    while thread.is_alive():
        thread.join(poll_s)
        if on_stop is not None and _requested and not told:
            told = True
            on_stop(_requested)
    if "error" in outcome:
        raise outcome.pop("error")
    return outcome.get("value")


def forward(key: str, signum: int) -> None:
    """Make the stop request visible to every process of the Ray cluster under `key` (Poll reads it)."""
    from ray.experimental import internal_kv

    internal_kv._internal_kv_put(key, str(signum), overwrite=True, namespace=KV_NAMESPACE)


def forget(key: str) -> None:
    """Remove a forwarded request (the run it was for has ended)."""
    from ray.experimental import internal_kv

    with contextlib.suppress(Exception):  # Ray already gone: nothing is left to remove
        if internal_kv._internal_kv_initialized():
            internal_kv._internal_kv_del(key, namespace=KV_NAMESPACE)


class Poll:
    """A stop request for this process or forwarded under `key`, read at most every `every_s`."""

    def __init__(self, key: str | None, every_s: float = POLL_S):
        self.key, self.every_s = key, every_s
        self._next = 0.0
        self._seen = 0

    def __call__(self) -> int:
        if _requested:
            return _requested
        if self.key and not self._seen and time.monotonic() >= self._next:
            self._next = time.monotonic() + self.every_s
            from ray.experimental import internal_kv

            if internal_kv._internal_kv_initialized():
                value = internal_kv._internal_kv_get(self.key, namespace=KV_NAMESPACE)
                self._seen = int(value) if value else 0
        return self._seen
