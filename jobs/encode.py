"""`sar encode`: ImageNet-layout images -> Parquet token latents, with Ray Data.

Reads   `data.source` (a folder or s3:// URL in the ImageNet layout, pipelines/data/imagenet.py),
        split `data.split`, optionally the first `data.classes` classes / `data.per_class`
        images; the VAE weights at `encode.weights` (local or object store).
Writes  `{run_dir}/latents/` (or `encode.output`): Parquet shards, `_manifest.json`,
        `_sources.json`, `_stage.json` (pipelines/data/latents.py describes them and the commit protocol).
Launch  sar encode --config configs/imagenet256-sar-b-klvae.yaml [--set encode.num_actors=8] [--force]
        on a cluster: sar submit --address http://HEAD:8265 -- encode --config ...

The pipeline is pipelines/data/encode.py. Re-running encodes only source files not yet consumed;
a killed run resumes from its last commit; `--force` starts again from nothing. One run at a
time writes a latents folder (its writer lease); a second one exits with status 75 naming the
first. Ray starts only when there is something to encode.
"""

from __future__ import annotations

import time

from jobs.config import PipelineConfig
from jobs.stages import StageOptions
from pipelines.core import rundir, tracking
from pipelines.core.lease import stage_lease
from pipelines.core.ray_runtime import init_ray
from pipelines.data import latents
from pipelines.data.encode import EncodeJob, list_new_sources, list_source, plan_encode, run_encode

STAGE = "encode"


def job(cfg: PipelineConfig) -> EncodeJob:
    return EncodeJob(data=cfg.data, encode=cfg.encode, grouping=cfg.model.grouping, scales=cfg.model.scales,
                     out=cfg.latents_dir, run_config=cfg.public_dict(),
                     progress_interval_s=cfg.tracking.progress_interval_s)


def status(cfg: PipelineConfig) -> rundir.StageStatus:
    """Up to date when a committed dataset has consumed every file of the source and has every shard
    its manifest lists."""
    manifest, consumed, _ = latents.committed_state(cfg.latents_dir, cfg.data.storage_options)
    if manifest is None:
        return rundir.StageStatus(False, "no latents")
    if manifest.get(latents.MISSING_SHARDS):
        return rundir.StageStatus(False, f"{len(manifest[latents.MISSING_SHARDS])} shards missing")
    _, new = list_new_sources(job(cfg), consumed)
    if new:
        return rundir.StageStatus(False, f"{len(new)} new source files")
    return rundir.StageStatus(True, f"{manifest['num_rows']} rows, no new source file")


def main(cfg: PipelineConfig, options: StageOptions = StageOptions(), tracker: tracking.Tracker = tracking.NULL) -> int:
    """List the source, take the folder's writer lease, start Ray only if there is something to
    encode, encode it, write the stage record, print the closing summary line."""
    started, t0, so = rundir.now_utc(), time.perf_counter(), cfg.data.storage_options
    encode_job = job(cfg)
    listing = list_source(encode_job)  # a wrong data.source stops here, before anything is written
    with stage_lease(cfg.latents_dir, cfg.cluster, so) as lease:
        plan = plan_encode(encode_job, force=options.force, listing=listing)
        if plan.new_items:
            init_ray(cfg.cluster)
        summary = run_encode(encode_job, plan=plan, lease=lease)
        lease.check()
        rundir.write_stage_record(cfg.latents_dir, STAGE, started=started, seconds=time.perf_counter() - t0,
                                  images=summary.rows_written + summary.rejected,
                                  inputs={"source": cfg.data.source},
                                  outputs={"latents": latents.dataset_digest(cfg.latents_dir, so),
                                           "rows": summary.total_rows},
                                  storage_options=so)
    print(summary.line())
    return 0
