"""Starting Ray the same way in every stage: a cluster when one is named, else a local Ray.

Stages call `init_ray` only once their config and inputs are checked and their output's writer
lease is held, so a bad input, an up-to-date output or a busy output never waits for Ray.
`shutdown_ray` stops what `init_ray` started (or leaves the cluster it joined), with the Ray
workers and actors of this driver.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from typing import Any, Iterator

from pipelines.core import stop
from pipelines.core.errors import SarError

log = logging.getLogger(__name__)
_initialized_here = False  # init_ray called ray.init (not a test session's or a Ray Job's own)


class RayStartError(SarError):
    """Ray could not be started or joined; the message says what to do."""


class RayUnreachable(RayStartError):
    """The Ray cluster at cluster.address (or RAY_ADDRESS) did not answer: try again later (exit 75)."""

    transient = True


def _first_line(err: BaseException) -> str:
    text = " ".join(str(err).split(". ")[0].split())
    return text or type(err).__name__


def init_ray(cluster: Any) -> None:
    """Connect to `cluster.address` (or RAY_ADDRESS), else start a local Ray sized by the config.

    `cluster` is the config's cluster section (jobs.config.ClusterConfig). A no-op when Ray is
    already initialised (a test session, a Ray Job's driver that called ray.init itself).
    `num_cpus`, `object_store_memory` and `dashboard` apply to a local Ray only: without the
    dashboard, Ray starts its head process with only the modules it needs itself.
    """
    import ray

    global _initialized_here
    quiet_data_progress()
    if ray.is_initialized():
        return
    stop.check("before Ray started; the same command goes on from what is committed")  # Ray's start-up is long
    address = cluster.address or os.environ.get("RAY_ADDRESS")
    runtime_env = cluster.runtime_env or None
    try:
        if address:
            log.info("connecting to the Ray cluster at %s", address)
            ray.init(address=address, runtime_env=runtime_env)
        else:
            ray.init(num_cpus=cluster.num_cpus, object_store_memory=cluster.object_store_memory,
                     runtime_env=runtime_env, include_dashboard=cluster.dashboard)
    except Exception as err:  # noqa: BLE001 - whatever Ray raised, the user gets one line and a remedy
        stop.reinstall()
        if address:
            # Nothing answered (a head that is down, restarting or not yet up): try again later (75).
            unreachable = isinstance(err, (ConnectionError, TimeoutError)) or any(
                w in str(err).lower() for w in ("connect", "timed out", "unavailable", "could not find any running"))
            raise (RayUnreachable if unreachable else RayStartError)(
                f"cannot join the Ray cluster at {address} ({_first_line(err)}); check cluster.address or "
                "RAY_ADDRESS, and that the cluster is up") from err
        # Typically "The current node timed out during startup": the raylet did not register within
        # Ray's fixed 30 s, which happens on an overloaded or memory-starved machine.
        raise RayStartError(f"could not start a local Ray ({_first_line(err)}); try again when the machine is "
                            "less loaded, or start Ray once with `ray start --head` and set cluster.address "
                            "(or RAY_ADDRESS) to it; Ray's logs are in /tmp/ray/session_latest/logs") from err
    _initialized_here = True
    # ray.init's core worker replaces the SIGTERM handler with one that dumps a C stack and aborts.
    stop.reinstall()


def shutdown_ray() -> None:
    """Stop the local Ray that init_ray started, or leave the cluster it joined: the driver's tasks,
    actors and Train workers end with it. A no-op when init_ray did not start Ray (a test session)."""
    global _initialized_here
    if not _initialized_here:
        return
    import ray

    _initialized_here = False
    if ray.is_initialized():
        ray.shutdown()


def started_locally() -> bool:
    """True when this process runs a local, single-node Ray (not a cluster it joined)."""
    import ray

    if not ray.is_initialized():
        return False
    return len(ray.nodes()) == 1 and not os.environ.get("RAY_ADDRESS")


def actor_pool_args() -> dict[str, Any]:
    """Ray Data remote args for the stages' actor pools.

    Ray Data restarts a dead pool actor and retries its task (max_restarts=-1), which is what
    keeps a cluster run going when a node is preempted. Its constructor arguments travel
    through the object store, so Ray core then logs an error-level warning at every actor
    start (ray-project/ray#53727: a restart fails if those arguments were lost). A local,
    single-node Ray has no node to lose, and encode and sample resume from their last commit
    after any failure, so local pools run without restarts, and without the line. Clusters keep
    Ray Data's default.
    """
    return {"max_restarts": 0} if started_locally() else {}


@contextlib.contextmanager
def pool_args_accepted() -> Iterator[None]:
    """Around a map_batches call given `actor_pool_args()`.

    Ray 2.60 takes max_restarts only through map_batches' **ray_remote_args (its own docs say
    so: `map_batches(..., max_restarts=0)`), and marks those arguments deprecated in favour of
    named ones, of which max_restarts has none yet. That one warning is silenced here.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated", category=DeprecationWarning)
        yield


def quiet_data_progress() -> None:
    """No Ray Data progress bars when stderr is not a terminal.

    Off a terminal (a log file, a Ray Job's log) Ray Data logs a block of lines per operator every
    few seconds instead of redrawing bars; the stages write their own progress lines
    (pipelines/core/progress.py). On a terminal the bars stay.
    """
    if not sys.stderr.isatty():
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False


def cluster_gpus() -> float:
    """GPUs in the Ray cluster (0 on a CPU-only machine or before Ray starts)."""
    import ray

    return float(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else 0.0
