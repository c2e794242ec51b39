"""`sar encode`: ImageNet-layout images -> Parquet token latents, with Ray Data.

Reads   `data.source` (a folder or s3:// URL in the ImageNet layout, pipelines/imagenet.py),
        split `data.split`, optionally the first `data.classes` classes / `data.per_class`
        images; the VAE weights at `encode.weights` (local or object store).
Writes  `{run_dir}/latents/` (or `encode.output`): Parquet shards, `_manifest.json`,
        `_sources.json` (pipelines/latents.py describes them and the commit protocol).
Launch  sar encode --config configs/imagenet256-sar-b-klvae.yaml [--set encode.num_actors=8] [--force]
        on a cluster: sar submit --address http://HEAD:8265 -- encode --config ...

The Ray Data pipeline, one stage per concern:

    from_items(key, label)                       the new source files, listed in the driver
    -> map_batches(read_and_decode)   tasks      bytes -> RGB -> ADM centre crop, uint8
    -> map_batches(EncodeLatents)     actors     image + flip -> token grids (GPU when present)
    -> map_batches(write_shard)       tasks      one Parquet shard per `encode.shard_rows` rows
    -> driver                                     commits each shard into the manifest

Re-running encodes only source files not yet consumed; a killed run resumes from its last
commit; `--force` starts again from nothing.
"""

from __future__ import annotations

import argparse
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from jobs.config import PipelineConfig
from jobs.runtime import cluster_gpus, init_ray
from pipelines import latents as L
from pipelines import storage
from pipelines.encoders import (
    LOGVAR,
    LOGVAR_FLIP,
    MEAN,
    MEAN_FLIP,
    PYRAMID,
    TOKENS,
    EncodeLatents,
    make_codec,
    token_grouping,
)
from pipelines.errors import SarError
from pipelines.imagenet import SourceListing, list_imagenet
from pipelines.preprocess import read_and_decode

log = logging.getLogger("sar.encode")

COMMIT_INTERVAL_S = 30.0  # how often the manifest is rewritten while shards arrive
MAX_REJECTS_LOGGED = 20  # the manifest lists them all


@dataclass
class EncodeSummary:
    latents: str
    new_sources: int
    rows_written: int
    rejected: int
    shards_written: int
    bytes_written: int
    seconds: float
    total_rows: int

    @property
    def images_per_s(self) -> float:
        return (self.rows_written + self.rejected) / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        if self.new_sources == 0:
            return f"encode: up to date, {self.total_rows} rows at {storage.redact(self.latents)}; nothing new to encode"
        return (f"encode: wrote {self.rows_written} rows in {self.shards_written} shards, rejected {self.rejected}, "
                f"{self.images_per_s:.1f} images/s, {self.bytes_written / 1e6:.1f} MB in {self.seconds:.1f} s; "
                f"{self.total_rows} rows at {storage.redact(self.latents)}")


def dataset_header(cfg: PipelineConfig, codec, listing: SourceListing) -> dict:
    """What the manifest says about the dataset as a whole (everything but its contents)."""
    h, w = codec.grid
    D = codec.token_dim
    scales = list(cfg.model.scales) if cfg.model.scales else None
    columns = {"key": [], "label": [], MEAN: [h, w, D], MEAN_FLIP: [h, w, D]}
    if codec.name != "raw":
        columns.update({LOGVAR: [h, w, D], LOGVAR_FLIP: [h, w, D]})
    if scales:
        columns[PYRAMID] = [sum(s * s for s in scales), D]
    columns[TOKENS] = [token_grouping(cfg.model.grouping, h, w, scales).seq_len, D]
    return {
        "schema_version": L.SCHEMA_VERSION,
        "encoder": codec.name,
        "weights": storage.redact(cfg.encode.weights) if cfg.encode.weights else None,
        "weights_sha256": codec.weights_sha256,
        "scale_factor": codec.scale_factor,
        "image_size": codec.image_size,
        "grid": [h, w],
        "channels": codec.channels,
        "patch": codec.patch,
        "token_dim": D,
        "grouping": cfg.model.grouping,
        "scales": scales,
        "dtype": cfg.encode.storage_dtype,
        "columns": columns,
        "source": storage.redact(cfg.data.source),
        "split": cfg.data.split,
        "classes": listing.wnids,
        "num_classes": len(listing.wnids),
        "config": cfg.public_dict(),
    }


def build_pipeline(cfg: PipelineConfig, items: list[tuple[str, int]], run_id: str):
    """The Ray Data dataset whose rows are writer results (one per shard), not yet executed."""
    import ray

    enc, so = cfg.encode, cfg.data.storage_options
    # Blocks of about one encoder batch each, so the read/decode work spreads over the cluster.
    blocks = enc.read_parallelism if enc.read_parallelism > 0 else max(1, min(len(items) // enc.batch_size, 4096))
    ds = ray.data.from_items([{"key": k, "label": label} for k, label in items], override_num_blocks=blocks)
    ds = ds.map_batches(read_and_decode, batch_size=enc.batch_size, batch_format="numpy",
                        fn_kwargs={"root": cfg.data.source, "image_size": enc.image_size, "storage_options": so})
    # On a GPU cluster the decode tasks and the GPU actors are separate operators (decode on
    # every CPU); without GPUs, Ray Data fuses decode into the CPU actors, saving a copy.
    gpu = {"num_gpus": enc.gpus_per_actor} if cluster_gpus() > 0 and enc.gpus_per_actor > 0 else {}
    ds = ds.map_batches(
        EncodeLatents, batch_size=enc.batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=enc.num_actors),
        fn_constructor_kwargs={
            "encoder": enc.encoder, "weights": enc.weights, "image_size": enc.image_size, "patch": enc.patch,
            "scale_factor": enc.scale_factor, "grouping": cfg.model.grouping, "scales": cfg.model.scales,
            "storage_dtype": enc.storage_dtype, "storage_options": so,
        },
        **gpu,
    )
    return ds.map_batches(L.write_shard, batch_size=enc.shard_rows, batch_format="numpy",
                          fn_kwargs={"latents_url": cfg.latents_dir, "run_id": run_id, "storage_options": so})


def run_encode(cfg: PipelineConfig, force: bool = False, commit_interval_s: float = COMMIT_INTERVAL_S,
               on_commit: Callable[[dict], None] | None = None) -> EncodeSummary:
    """Encode what is new in `data.source` into `cfg.latents_dir`; Ray must be initialised."""
    out, so = cfg.latents_dir, cfg.data.storage_options

    # Setup: the output folder's committed state; leftovers of an interrupted run go.
    if force:
        log.info("--force: removing the latents dataset at %s", storage.redact(out))
        L.remove_dataset(out, so)
    previous, consumed, rejected = L.committed_state(out, so)
    L.remove_orphans(out, previous, so)

    # Data: list the source, keep what no commit has consumed.
    listing = list_imagenet(cfg.data.source, cfg.data.split, cfg.data.classes, cfg.data.per_class, so)
    new_items = [(k, label) for k, label in listing.items if k not in consumed]
    log.info("%d source files in %s/%s, %d new", len(listing.items), storage.redact(cfg.data.source),
             cfg.data.split, len(new_items))

    # Model: the codec's description, made in the driver (the actors load their own copy).
    codec = make_codec(cfg.encode.encoder, cfg.encode.weights, cfg.encode.image_size, cfg.encode.patch,
                       cfg.encode.scale_factor, so)
    header = dataset_header(cfg, codec, listing)
    del codec
    if previous is not None:
        problem = L.header_mismatch(previous, header)
        if problem:
            raise SarError(f"{storage.redact(out)} holds a different dataset ({problem}); "
                           "re-run with --force or set encode.output")
        header["classes"] = max(previous.get("classes") or [], header["classes"], key=len)
        header["num_classes"] = len(header["classes"])
    total = previous["num_rows"] if previous else 0
    if not new_items:
        return EncodeSummary(out, 0, 0, 0, 0, 0, 0.0, total)

    # Loop: stream the pipeline; commit shards into the manifest as they are written.
    committer = L.Committer(out, header, previous, consumed, rejected, so)
    run_id = time.strftime("%Y%m%d%H%M%S") + "-" + uuid.uuid4().hex[:6]
    start = last_commit = time.monotonic()
    shards = 0
    manifest = previous
    for result in build_pipeline(cfg, new_items, run_id).iter_rows():
        committer.add(result)
        shards += bool(result["file"])
        if time.monotonic() - last_commit >= commit_interval_s:
            manifest = committer.commit()
            last_commit = time.monotonic()
            if on_commit:
                on_commit(manifest)
    if committer.pending or manifest is None:
        manifest = committer.commit()
        if on_commit:
            on_commit(manifest)
    seconds = time.monotonic() - start

    # Save: nothing outside the manifest may remain (a retried writer task leaves its first file).
    L.remove_orphans(out, manifest, so)
    new_rejects = committer.rejected[len(rejected):]
    for r in new_rejects[:MAX_REJECTS_LOGGED]:
        log.warning("rejected %s: %s", r["key"], r["reason"])
    if len(new_rejects) > MAX_REJECTS_LOGGED:
        log.warning("... and %d more rejected files, listed in the manifest", len(new_rejects) - MAX_REJECTS_LOGGED)
    return EncodeSummary(out, len(new_items), committer.new_rows, committer.new_rejected, shards,
                         committer.new_bytes, seconds, manifest["num_rows"])


def main(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    """`sar encode`: set up Ray, encode what is new, print the closing summary line."""
    init_ray(cfg.cluster)
    summary = run_encode(cfg, force=bool(getattr(args, "force", False)))
    print(summary.line())
    return 0
