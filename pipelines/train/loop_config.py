"""What a training run's driver hands to every Train worker: `LoopConfig`, complete and frozen.

The driver (driver.py) builds it once Ray is up and ships it to the workers (worker.py); nothing
changes it afterwards. The in-training evaluation arrives as an object of the `Evaluation`
protocol, made by the evaluation layer (pipelines/evaluate/during_training.py), so the loop calls
it without importing that layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch

from pipelines.core.lease import LeaseToken
from pipelines.data.stream import LatentStream

METRICS = "metrics.jsonl"   # one row per log step, rewritten with every checkpoint
EVALS = "evals.jsonl"       # one row per in-training evaluation, rewritten at every evaluation
PLOT = "loss.png"           # the training curves, drawn when the run ends
LEASE_LOST = "lease_lost"   # the metric by which the workers tell the driver why they stopped


class Evaluation(Protocol):
    """An in-training evaluation: every `every` steps rank 0 scores the EMA weights."""

    every: int

    def build(self, stage_dir: str, device: torch.device,
              storage_options: dict[str, Any] | None) -> Callable[[torch.nn.Module, int], dict[str, Any]]:
        """The scorer of one run: (model, step) -> a row with at least step, fid, accuracy, precision,
        recall, evaluator, num_samples, seconds and `grid`, a path relative to `stage_dir`."""
        ...


@dataclass(frozen=True)
class LoopConfig:
    """Everything one training run needs, made by the stage's driver and shipped to every worker."""

    stage: str                      # "pretrain" | "refine": which objective, which config section
    stage_dir: str                  # checkpoints/, metrics.jsonl, loss.png
    train: Any                      # the stage's config section, its length resolved (driver.resolve_length)
    model_config: dict[str, Any]    # SARConfig fields
    token_space: dict[str, Any]     # the dataset's, saved with every checkpoint (sample decodes with it)
    inputs: dict[str, Any]          # digests of what the run consumes, saved with every checkpoint
    run_config: dict[str, Any]      # the resolved public config, saved with every checkpoint
    use_gpu: bool                   # one GPU per worker (decided from the cluster when train.use_gpu is None)
    accum: int                      # micro-batches per optimizer step on each worker
    storage_options: dict[str, Any] | None = None
    init: tuple[str, str] | None = None  # refine: (pretrain checkpoint URL, "ema" | "raw")
    hflip: bool = True              # data.hflip
    start_step: int = 0             # the newest checkpoint's step when the run was launched
    failure_drill: tuple[int, str] | None = None  # (step, marker location): worker.failure_drill
    tracking: dict[str, Any] | None = None  # the stage run's tracking handoff: rank 0 logs into it
    progress_interval_s: float = 30.0  # between progress lines in a log (pipelines/core/progress.py)
    plot: bool = True               # draw loss.png when the run ends
    evaluation: Evaluation | None = None  # in-training evaluation, None: none
    lease: LeaseToken | None = None  # the driver's writer-lease token, checked before each write
    stop_key: str | None = None     # where the driver forwards a stop request (core.stop.forward), read by rank 0
    stream: LatentStream | None = None  # each worker's own read of the shards (large latents); None: the Ray
                                        # Dataset "train" the driver read (driver.training_dataset)
