"""`sar refine`: self-autoregressive refinement on Ray Train (pipelines/train/objectives.py).

Reads  a pretrain checkpoint (`refine.init`: a location, a pretraining step or a fraction of
       pretraining; default the newest under `{run_dir}/pretrain`; EMA or raw weights) and
       `{run_dir}/latents`.
Writes `{run_dir}/refine`, laid out as pretrain's output; `loss.png` adds the exposure-bias gap.
Launch: `sar refine --config FILE [--set refine.gamma=0.5 ...]`.
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

STAGE = "refine"


def inputs(cfg: PipelineConfig) -> dict[str, Any]:
    """What a refine run consumes: the latents and the checkpoint it starts from (a location as refine.init
    gives it, else the digest of the pretrain checkpoint it names or the newest one)."""
    so = cfg.data.storage_options
    init = cfg.refine.init
    if not isinstance(init, str):
        start = driver.refine_start(cfg, required=False)
        init = checkpoints.read_meta(start, so)["digest"] if start else None
    return {"latents": latents.dataset_digest(cfg.latents_dir, so), "init": init}


def status(cfg: PipelineConfig) -> rundir.StageStatus:
    return driver.training_status(cfg, STAGE, cfg.refine_dir, inputs(cfg))


def main(cfg: PipelineConfig, options: StageOptions = StageOptions(), tracker: tracking.Tracker = tracking.NULL) -> int:
    """Start from the pretrain checkpoint, refine on Ray Train (rank 0 logs into `tracker`), record."""
    # Setup: the start checkpoint and the dataset, then (holding the stage folder's writer lease) the
    # run directory, all before Ray starts.
    so, started, t0 = cfg.data.storage_options, rundir.now_utc(), time.perf_counter()
    init = driver.refine_start(cfg)
    meta = checkpoints.read_meta(init, so)
    manifest = latents.read_manifest(cfg.latents_dir, so)
    driver.check_inputs(cfg, STAGE, meta["model_config"], manifest)
    with stage_lease(cfg.refine_dir, cfg.cluster, so) as lease:
        start_step = driver.claim_run_folder(cfg, STAGE, cfg.refine_dir, meta["model_config"], lease)
        evaluation = in_training_evaluation(cfg, STAGE, manifest)
        print(f"refining from {storage.redact(init)} (step {meta['step']}, {cfg.refine.init_weights} weights)")

        # Loop: Ray Train.
        init_ray(cfg.cluster)
        loop = driver.build_loop_config(cfg, STAGE, cfg.refine_dir, meta["model_config"], manifest, inputs(cfg),
                                  start_step=start_step, init=(init, cfg.refine.init_weights), lease=lease,
                                  tracker=tracker, evaluation=evaluation)
        metrics = driver.run_training(loop, driver.training_dataset(loop, cfg.latents_dir, manifest), tracker)

        # Save: the record of this run.
        lease.check()
        driver.write_record(loop, started, time.perf_counter() - t0, checkpoints.find_latest(cfg.refine_dir, so))
    print(f"refine done: step {metrics.get('step')}, loss_tf {metrics.get('loss_tf', float('nan')):.4f}, "
          f"loss_csf {metrics.get('loss_csf', float('nan')):.4f}")
    return 0
