"""`sar sample`: generate the evaluation set with a Ray Data actor pool.

Reads   a checkpoint: `sample.checkpoint`, else the newest under {run_dir}/refine, else the
        newest under {run_dir}/pretrain (EMA weights and the token space it was trained on).
Writes  cfg.samples_dir (default {run_dir}/samples): images/{index:06d}.png (or shards/*.npz
        with sample.format=npz), index.json, _manifest.json last, _stage.json; with --preview
        only preview.png (a classes x samples grid made in this process, no Ray).
Launch  sar sample --config configs/imagenet256-sar-b-klvae.yaml [--set sample.num_actors=8]
        sar submit --address http://HEAD:8265 -- sample --config ...   (a cluster)

ADM's protocol: sample.per_class (50) images for each of the classes (1000), class-major.
Each index has its own seed derived from (sample.seed, index), so the job is resumable at
any granularity (pipelines/evaluate/sampling.py): a re-run makes only the missing indices, with any
number of actors and any batch size, and the finished set has exactly N images. One run at a
time writes the set (its writer lease; a second exits with status 75); --preview writes only
preview.png, atomically, and may run beside it.
"""

from __future__ import annotations

import time
from typing import Any

from jobs.config import PipelineConfig
from jobs.stages import StageOptions
from pipelines.core import rundir, storage, tracking
from pipelines.core.errors import SarError
from pipelines.core.lease import stage_lease
from pipelines.core.ray_runtime import init_ray
from pipelines.evaluate import sampling
from pipelines.train import checkpoints

STAGE = "sample"


def checkpoint(cfg: PipelineConfig) -> str | None:
    """sample.checkpoint, else the newest refine checkpoint, else the newest pretrain one."""
    so = cfg.data.storage_options
    return cfg.sample.checkpoint or checkpoints.find_latest(cfg.refine_dir, so) or \
        checkpoints.find_latest(cfg.pretrain_dir, so)


def settings(cfg: PipelineConfig) -> sampling.SampleSettings:
    return sampling.SampleSettings.from_config(cfg.sample)


def plan_and_spec(cfg: PipelineConfig, ckpt: str) -> tuple[sampling.SamplePlan, dict[str, Any], dict[str, Any]]:
    """Which images (the plan), everything they depend on (the spec a resume must match), and
    the checkpoint's meta.json."""
    meta = checkpoints.read_meta(ckpt, cfg.data.storage_options)
    plan = sampling.SamplePlan(sampling.num_classes(meta, cfg.sample.num_classes), cfg.sample.per_class,
                               cfg.sample.seed)
    return plan, sampling.generation_spec(plan, settings(cfg), ckpt, meta), meta


def status(cfg: PipelineConfig) -> rundir.StageStatus:
    """Up to date when the set is complete and was made with the current checkpoint and settings."""
    ckpt = checkpoint(cfg)
    if ckpt is None:
        return rundir.StageStatus(False, "no checkpoint yet")
    _, spec, _ = plan_and_spec(cfg, ckpt)
    return sampling.set_status(cfg.samples_dir, spec, cfg.data.storage_options)


def main(cfg: PipelineConfig, options: StageOptions = StageOptions(), tracker: tracking.Tracker = tracking.NULL) -> int:
    # Setup: which checkpoint, which set.
    so, samples_dir, started, t0 = cfg.data.storage_options, cfg.samples_dir, rundir.now_utc(), time.perf_counter()
    ckpt = checkpoint(cfg)
    if ckpt is None:
        raise SarError(f"no checkpoint to sample from: none under {storage.redact(cfg.refine_dir)} or "
                       f"{storage.redact(cfg.pretrain_dir)}; train first or set sample.checkpoint")
    plan, spec, meta = plan_and_spec(cfg, ckpt)
    if options.preview:
        url = sampling.write_preview(ckpt, plan, settings(cfg), samples_dir, cfg.fid.grid_classes,
                                     cfg.fid.grid_per_class, so)
        tracker.log_artifact(url)  # this stage's run (jobs/run.py)
        print(f"preview of {storage.redact(ckpt)} written to {storage.redact(url)}")
        return 0
    with stage_lease(samples_dir, cfg.cluster, so) as lease:
        sampling.check_spec(samples_dir, spec, so)
        missing = sampling.missing_indices(samples_dir, plan, settings(cfg), so)
        print(f"sampling {plan.size} images ({plan.num_classes} classes x {plan.per_class}) from "
              f"{storage.redact(ckpt)}: {plan.size - len(missing)} already written, {len(missing)} to make")

        # Loop: the actor pool writes every missing image.
        if missing:
            init_ray(cfg.cluster)
            sampling.run_pool(ckpt, plan, settings(cfg), samples_dir, missing, cfg.sample.num_actors,
                              cfg.sample.gpus_per_actor, so, resources_per_actor=cfg.sample.resources_per_actor,
                              progress_interval_s=cfg.tracking.progress_interval_s)

        # Save: check the set is whole, then the index and (last) the manifest.
        sampling.finish_set(samples_dir, plan, settings(cfg), spec, meta, cfg.public_dict(), so, lease=lease)
        lease.check()
        rundir.write_stage_record(samples_dir, STAGE, started=started, seconds=time.perf_counter() - t0,
                                  images=len(missing), inputs={"checkpoint": spec["checkpoint_digest"]},
                                  outputs={"num_samples": plan.size}, storage_options=so)
    print(f"{plan.size} samples in {storage.redact(samples_dir)}")
    return 0
