"""Starting Ray the same way in every stage: a cluster when one is named, else a local Ray."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

log = logging.getLogger(__name__)


def init_ray(cluster: Any) -> None:
    """Connect to `cluster.address` (or RAY_ADDRESS), else start a local Ray sized by the config.

    `cluster` is the config's cluster section (jobs.config.ClusterConfig). A no-op when Ray is
    already initialised (a test session, a Ray Job's driver that called ray.init itself).
    `num_cpus` and `object_store_memory` apply to a local Ray only.
    """
    import ray

    quiet_data_progress()
    if ray.is_initialized():
        return
    address = cluster.address or os.environ.get("RAY_ADDRESS")
    runtime_env = cluster.runtime_env or None
    if address:
        log.info("connecting to the Ray cluster at %s", address)
        ray.init(address=address, runtime_env=runtime_env)
    else:
        ray.init(num_cpus=cluster.num_cpus, object_store_memory=cluster.object_store_memory, runtime_env=runtime_env)


def quiet_data_progress() -> None:
    """No Ray Data progress bars when stderr is not a terminal.

    Off a terminal (a log file, a Ray Job's log) Ray Data logs a block of lines per operator every
    few seconds instead of redrawing bars; the stages write their own progress lines
    (pipelines/progress.py). On a terminal the bars stay.
    """
    if not sys.stderr.isatty():
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False


def cluster_gpus() -> float:
    """GPUs in the Ray cluster (0 on a CPU-only machine or before Ray starts)."""
    import ray

    return float(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else 0.0
