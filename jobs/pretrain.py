"""`sar pretrain`: self-token pretraining on Ray Train.

Reads  `{run_dir}/latents` (the encode stage's Parquet shards and manifest).
Writes `{run_dir}/pretrain`: `checkpoints/step_N/` (model, EMA, optimizer, scheduler, step, data
position, resolved config), `metrics.jsonl`, `loss.png`, `run_config.json`, `_stage.json`.
Launch: `sar pretrain --config FILE [--set pretrain.num_workers=8 ...]`, locally or through
`sar submit` on a cluster. Re-launching the same run resumes from its newest checkpoint (a
corrupt one is moved to `checkpoints/corrupt-step_N/`). One launch at a time writes the folder:
a second exits with status 75 naming the first, before Ray starts.
"""

from __future__ import annotations

import time
from typing import Any

from jobs.config import PipelineConfig
from jobs.stages import StageOptions
from pipelines.core import rundir, storage, tracking
from pipelines.core.lease import stage_lease
from pipelines.core.ray_runtime import init_ray
from pipelines.data import latents
from pipelines.evaluate.during_training import in_training_evaluation
from pipelines.train import checkpoints, driver

STAGE = "pretrain"


def inputs(cfg: PipelineConfig) -> dict[str, Any]:
    """What a pretrain run consumes, recorded in its checkpoints: the latents' digest."""
    return {"latents": latents.dataset_digest(cfg.latents_dir, cfg.data.storage_options)}


def status(cfg: PipelineConfig) -> rundir.StageStatus:
    return driver.training_status(cfg, STAGE, cfg.pretrain_dir, inputs(cfg))


def main(cfg: PipelineConfig, options: StageOptions = StageOptions(), tracker: tracking.Tracker = tracking.NULL) -> int:
    """Check the dataset, train on Ray Train (rank 0 logs each row into `tracker`), record the run."""
    # Setup: the dataset and the model are checked before anything is written; the stage folder's
    # writer lease is held from the run directory's checks to the record, and Ray starts under it.
    so, started, t0 = cfg.data.storage_options, rundir.now_utc(), time.perf_counter()
    manifest = latents.read_manifest(cfg.latents_dir, so)
    model_config = driver.build_model_config(cfg.model, manifest)
    driver.check_inputs(cfg, STAGE, model_config, manifest)
    with stage_lease(cfg.pretrain_dir, cfg.cluster, so) as lease:
        start_step = driver.claim_run_folder(cfg, STAGE, cfg.pretrain_dir, model_config, lease)
        evaluation = in_training_evaluation(cfg, STAGE, manifest)  # trains the domain evaluator here when it is missing

        # Loop: Ray Train workers (or this process with num_workers 0).
        init_ray(cfg.cluster)
        loop = driver.build_loop_config(cfg, STAGE, cfg.pretrain_dir, model_config, manifest, inputs(cfg),
                                  start_step=start_step, lease=lease, tracker=tracker, evaluation=evaluation)
        metrics = driver.run_training(loop, driver.training_dataset(loop, cfg.latents_dir, manifest), tracker)

        # Save: the record of this run.
        lease.check()
        latest = checkpoints.find_latest(cfg.pretrain_dir, so)
        driver.write_record(loop, started, time.perf_counter() - t0, latest)
    print(f"pretrain done: step {metrics.get('step')}, loss {metrics.get('loss', float('nan')):.4f}; "
          f"checkpoint {storage.redact(latest or '')}")
    return 0
