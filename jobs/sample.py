"""`sar sample`: generate the evaluation set with a Ray Data actor pool.

Reads   a checkpoint: `sample.checkpoint`, else the latest under {run_dir}/refine, else the
        latest under {run_dir}/pretrain (EMA weights and the token space it was trained on).
Writes  cfg.samples_dir (default {run_dir}/samples): images/{index:06d}.png (or shards/*.npz
        with sample.format=npz), index.json, and _manifest.json last; with --preview only
        preview.png (a classes x samples grid made in this process, no Ray).
Launch  sar sample --config configs/imagenet256-sar-b-klvae.yaml [--set sample.num_actors=8]
        sar submit --address http://HEAD:8265 -- sample --config ...   (a cluster)

ADM's protocol: sample.per_class (50) images for each of the classes (1000), class-major.
Each index has its own seed derived from (sample.seed, index), so the job is resumable at
any granularity: a re-run lists what is written and makes only the missing indices, with
any number of actors and any batch size, and the finished set has exactly N images.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from jobs.config import PipelineConfig
from pipelines import sampling, storage
from pipelines.errors import SarError

log = logging.getLogger(__name__)


# Setup -----------------------------------------------------------------------------------------
def resolve_checkpoint(cfg: PipelineConfig) -> str:
    """sample.checkpoint, else the newest refine checkpoint, else the newest pretrain one."""
    from jobs.checkpoints import find_latest

    if cfg.sample.checkpoint:
        return cfg.sample.checkpoint
    so = cfg.data.storage_options
    for stage_dir in (cfg.refine_dir, cfg.pretrain_dir):
        latest = find_latest(stage_dir, so)
        if latest:
            return latest
    raise SarError(f"no checkpoint to sample from: none under {storage.redact(cfg.refine_dir)} or "
                   f"{storage.redact(cfg.pretrain_dir)}; train first or set sample.checkpoint")


def resolve_num_classes(cfg: PipelineConfig, meta: dict[str, Any]) -> int:
    trained = int(meta.get("num_classes") or (meta.get("latents") or {}).get("num_classes")
                  or meta["model_config"]["num_classes"])
    wanted = cfg.sample.num_classes or trained
    if wanted > trained:
        raise SarError(f"sample.num_classes={wanted} but the checkpoint was trained on {trained} classes")
    return wanted


def generation_spec(cfg: PipelineConfig, plan: sampling.SamplePlan, checkpoint: str,
                    meta: dict[str, Any]) -> dict[str, Any]:
    """Everything an image depends on: a resume must match it exactly."""
    s = cfg.sample
    return {"num_samples": plan.size, "per_class": plan.per_class, "classes": plan.num_classes,
            "seed": plan.seed, "guidance": s.guidance.model_dump(), "flow_steps": s.flow_steps,
            "weights": s.weights, "format": s.format, "npz_shard": s.npz_shard,
            "checkpoint": storage.redact(checkpoint), "checkpoint_digest": meta.get("digest"),
            "checkpoint_step": meta.get("step")}


def check_spec(samples_dir: str, spec: dict[str, Any], so: dict[str, Any]) -> None:
    """Write the spec of a new set, or check that a partial set was made with the same one."""
    url = storage.join(samples_dir, sampling.SPEC_FILE)
    if not storage.exists(url, so):
        storage.write_json(url, spec, so)
        return
    saved = storage.read_json(url, so)
    for key, value in spec.items():
        if key != "checkpoint" and saved.get(key) != value:
            raise SarError(f"{storage.redact(samples_dir)} holds samples made with {key}={saved.get(key)!r}, "
                           f"this run would use {value!r}; set sample.output to a new folder or remove it")


# Data + model: the actor pool ---------------------------------------------------------------------
@dataclass
class PoolRun:
    """One actor-pool run: images written, wall seconds, and the seconds to the first batch (actor
    start-up and model load, paid once per run), so throughput reads with and without it."""

    written: int = 0
    seconds: float = 0.0
    first_batch_s: float = 0.0
    first_batch: int = 0  # images in the first batch

    @property
    def steady_rate(self) -> float:
        """Images/s after the first batch arrived."""
        span = self.seconds - self.first_batch_s
        return (self.written - self.first_batch) / span if span > 0 else 0.0


def run_pool(cfg: PipelineConfig, plan: sampling.SamplePlan, checkpoint: str, samples_dir: str,
             missing: list[int]) -> PoolRun:
    """Generate `missing` indices with a Ray Data actor pool."""
    import ray

    s, so = cfg.sample, cfg.data.storage_options
    if s.format == "npz":
        shards = sorted({i // s.npz_shard for i in missing})
        ds = ray.data.from_items([{sampling.SHARD: k} for k in shards])
        batch_size = 1  # one shard per call; the actor renders it in sample.batch_size chunks
    else:
        rows = plan.rows(missing)
        ds = ray.data.from_items([{k: int(rows[k][j]) for k in rows} for j in range(len(missing))])
        batch_size = s.batch_size
    gpus = ray.cluster_resources().get("GPU", 0)
    ds = ds.map_batches(
        sampling.SampleGenerator,
        fn_constructor_kwargs={
            "checkpoint": checkpoint, "samples_dir": samples_dir, "weights": s.weights,
            "guidance": s.guidance.model_dump(), "flow_steps": s.flow_steps,
            "plan": {"num_classes": plan.num_classes, "per_class": plan.per_class, "seed": plan.seed},
            "image_format": s.format, "shard_size": s.npz_shard, "batch_size": s.batch_size,
            "storage_options": so},
        batch_size=batch_size,
        concurrency=s.num_actors,
        num_gpus=s.gpus_per_actor if gpus else 0,  # the job, not the stage, decides resources
    )
    run = PoolRun()
    start = time.perf_counter()
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        n = len(batch[sampling.INDEX])
        if run.written == 0:
            run.first_batch_s, run.first_batch = time.perf_counter() - start, n
        run.written += n
        run.seconds = time.perf_counter() - start
        log.info("sample: %d/%d images (%.1f/s after start-up)", run.written, len(missing), run.steady_rate)
    return run


def write_preview(cfg: PipelineConfig, plan: sampling.SamplePlan, checkpoint: str, samples_dir: str) -> str:
    """A classes x samples grid of the first images of evenly spaced classes, in this process.

    The images are the ones the full run makes for those indices (same seeds).
    """
    import torch

    s, so = cfg.sample, cfg.data.storage_options
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, codec, _ = sampling.load_generator(checkpoint, s.weights, so, device)
    classes = np.unique(np.linspace(0, plan.num_classes - 1, min(cfg.fid.grid_classes, plan.num_classes))
                        .round().astype(int))
    per = min(cfg.fid.grid_per_class, plan.per_class)
    rows = plan.rows([i for c in classes for i in plan.class_indices(int(c), per)])
    guidance = sampling.guidance_from_config(s.guidance)
    images = np.concatenate([
        sampling.render(model, codec, rows[sampling.LABEL][i:i + s.batch_size], rows[sampling.SEED][i:i + s.batch_size],
                        guidance, s.flow_steps, device)
        for i in range(0, len(rows[sampling.INDEX]), s.batch_size)])
    url = storage.join(samples_dir, sampling.PREVIEW_FILE)
    storage.write_bytes(url, sampling.grid_png(images.reshape(len(classes), per, *images.shape[1:])), so)
    return url


# Entry point ------------------------------------------------------------------------------------
def main(cfg: PipelineConfig, args=None) -> int:
    from jobs.checkpoints import read_meta

    # Setup: which checkpoint, which set.
    s, so = cfg.sample, cfg.data.storage_options
    samples_dir = cfg.samples_dir
    checkpoint = resolve_checkpoint(cfg)
    meta = read_meta(checkpoint, so)
    plan = sampling.SamplePlan(resolve_num_classes(cfg, meta), s.per_class, s.seed)
    if getattr(args, "preview", False):
        url = write_preview(cfg, plan, checkpoint, samples_dir)
        print(f"preview of {storage.redact(checkpoint)} written to {storage.redact(url)}")
        return 0

    spec = generation_spec(cfg, plan, checkpoint, meta)
    check_spec(samples_dir, spec, so)
    done = sampling.done_indices(samples_dir, s.format, s.npz_shard, plan.size, so)
    missing = sorted(set(range(plan.size)) - done)
    print(f"sampling {plan.size} images ({plan.num_classes} classes x {plan.per_class}) from "
          f"{storage.redact(checkpoint)}: {len(done)} already written, {len(missing)} to make")

    # Loop: the actor pool writes every missing image.
    if missing:
        from jobs.runtime import init_ray

        init_ray(cfg.cluster)
        run_pool(cfg, plan, checkpoint, samples_dir, missing)

    # Save: check the set is whole, then the index and (last) the manifest.
    done = sampling.done_indices(samples_dir, s.format, s.npz_shard, plan.size, so)
    if len(done) != plan.size:
        raise SarError(f"{storage.redact(samples_dir)}: {plan.size - len(done)} of {plan.size} images are "
                       f"still missing after the run; run `sar sample` again to finish")
    storage.write_json(storage.join(samples_dir, sampling.INDEX_FILE),
                       sampling.index_rows(plan, s.format, s.npz_shard), so)
    manifest = {**spec, "index": sampling.INDEX_FILE, "num_classes_trained": meta.get("num_classes"),
                "image_size": sampling.token_space(meta).get("image_size"), "config": cfg.public_dict()}
    storage.write_json(storage.join(samples_dir, sampling.MANIFEST_FILE), manifest, so)
    print(f"{plan.size} samples in {storage.redact(samples_dir)}")
    return 0
