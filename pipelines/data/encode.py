"""The encode stage's Ray Data pipeline: ImageNet-layout images -> Parquet token latents.

One stage per concern:

    from_items(key, label)                       the new source files, listed in the driver
    -> map_batches(read_and_decode)   tasks      bytes -> RGB -> ADM centre crop, uint8
    -> map_batches(EncodeLatents)     actors     image + flip -> token grids (GPU when present)
    -> map_batches(write_shard)       tasks      one Parquet shard per `encode.shard_rows` rows
    -> driver                                     commits each shard into the manifest

`plan_encode` reads the folder's committed state and lists what is new, without Ray;
`run_encode` encodes only source files not yet consumed; a killed run resumes from its last
commit (pipelines/data/latents.py describes the shards, the manifest and the commit protocol). Both
run under the folder's writer lease (pipelines/core/lease.py), checked before every commit.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipelines.core import stop, storage
from pipelines.core.errors import SarError
from pipelines.core.lease import WriterLease
from pipelines.core.progress import Progress
from pipelines.core.ray_runtime import actor_pool_args, cluster_gpus, pool_args_accepted
from pipelines.data import latents as L
from pipelines.data.codecs import make_codec
from pipelines.data.imagenet import SourceListing, list_imagenet
from pipelines.data.latents import (
    ERROR,
    KEY,
    LABEL,
    LOGVAR,
    LOGVAR_FLIP,
    MEAN,
    MEAN_FLIP,
    PYRAMID,
    TOKENS,
    storage_array,
)
from pipelines.data.preprocess import PIXELS, hflip, read_and_decode, to_model_input

log = logging.getLogger("sar.encode")

COMMIT_INTERVAL_S = 30.0  # how often the manifest is rewritten while shards arrive
MAX_REJECTS_LOGGED = 20  # the manifest lists them all


def token_grouping(name: str, h: int, w: int, scales: list[int] | None):
    from models import make_grouping

    try:
        return make_grouping(name, h, w, scales)
    except ValueError as err:
        raise SarError(f"model.grouping / model.scales: {err} (token grid {h}x{w})") from None


def resolved_scales(scales: list[int] | str | None, side: int) -> list[int] | None:
    """model.scales as sides for a grid of `side`: a schedule name ('var-10', ...) resolved."""
    from models import resolve_scales

    try:
        resolved = resolve_scales(scales, side)
    except ValueError as err:
        raise SarError(f"model.scales: {err}") from None
    return list(resolved) if resolved else None


def encode_with_flips(codec, pixels: torch.Tensor, amp: torch.dtype | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, S, S, 3) uint8 pixels -> the token grids' mean and logvar (or None), (2, B, h, w, D) float32:
    each image at [0] and its flip at [1], both in one call of the codec."""
    x = to_model_input(pixels)
    x = torch.cat([x, hflip(x)])
    with torch.inference_mode(), torch.autocast(x.device.type, dtype=amp or torch.float32, enabled=amp is not None):
        m, lv = codec.encode(x)
    shape = (2, -1, *codec.grid, codec.token_dim)
    return m.float().view(shape), None if lv is None else lv.float().view(shape)


class EncodeLatents:
    """Ray Data actor stage: uint8 pixels -> token grids of each image and of its flip.

    In:  key, label, pixels (S, S, 3) uint8, error.
    Out: key, label, error, mean, mean_flip (h, w, D); logvar, logvar_flip (VAEs);
         pyramid (sum s^2, D) when `scales` is set; tokens (L, D) in `grouping`'s order.
    Rows whose `error` is set are not encoded (zeros), for the writer to record as rejected.
    """

    def __init__(self, encoder: str, weights: str | None, image_size: int, patch: int | None,
                 scale_factor: float | None, grouping: str, scales: list[int] | None,
                 storage_dtype: str = "float16", storage_options: dict | None = None):
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.codec = make_codec(encoder, weights, image_size, patch, scale_factor, storage_options).to(self.device)
        h, w = self.codec.grid
        self.grouping = token_grouping(grouping, h, w, scales)
        self.pyramid = token_grouping("next-scale", h, w, scales) if scales else None
        self.dtype = storage_dtype
        # bf16 autocast where the GPU has it (fp16 overflows in some VAEs), else fp16.
        self.amp = None
        if self.device.type == "cuda":
            self.amp = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch[KEY])
        ok = np.array([not e for e in batch[ERROR]], bool)
        h, w = self.codec.grid
        D = self.codec.token_dim
        mean = torch.zeros(2, n, h, w, D)
        logvar = torch.zeros(2, n, h, w, D) if self.codec.name != "raw" else None
        if ok.any():
            pixels = torch.from_numpy(np.ascontiguousarray(batch[PIXELS][ok])).to(self.device, non_blocking=True)
            m, lv = encode_with_flips(self.codec, pixels, self.amp)
            idx = torch.from_numpy(np.flatnonzero(ok))
            mean[:, idx] = m.cpu()
            if logvar is not None:
                logvar[:, idx] = lv.cpu()
        out = {KEY: batch[KEY], LABEL: batch[LABEL], ERROR: batch[ERROR],
               MEAN: storage_array(mean[0], self.dtype), MEAN_FLIP: storage_array(mean[1], self.dtype)}
        if logvar is not None:
            out[LOGVAR] = storage_array(logvar[0], self.dtype)
            out[LOGVAR_FLIP] = storage_array(logvar[1], self.dtype)
        if self.pyramid is not None:
            out[PYRAMID] = storage_array(self.pyramid.to_sequence(mean[0]), self.dtype)
        out[TOKENS] = storage_array(self.grouping.to_sequence(mean[0]), self.dtype)
        return out


# The driver ------------------------------------------------------------------------------------
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


@dataclass
class EncodeJob:
    """What one encode run reads and writes: the config's data and encode sections, the grouping."""

    data: Any              # jobs.config.DataConfig: source, split, classes, per_class, storage_options
    encode: Any            # jobs.config.EncodeConfig
    grouping: str
    scales: list[int] | None
    out: str               # the latents folder
    run_config: dict[str, Any]  # the resolved public config, saved in the manifest
    progress_interval_s: float = 30.0  # between progress lines in a log (pipelines/core/progress.py)

    @property
    def storage_options(self) -> dict[str, Any]:
        return self.data.storage_options


def dataset_header(job: EncodeJob, codec, listing: SourceListing) -> dict:
    """What the manifest says about the dataset as a whole (everything but its contents)."""
    h, w = codec.grid
    D = codec.token_dim
    scales = resolved_scales(job.scales, h)
    columns = {KEY: [], LABEL: [], MEAN: [h, w, D], MEAN_FLIP: [h, w, D]}
    if codec.name != "raw":
        columns.update({LOGVAR: [h, w, D], LOGVAR_FLIP: [h, w, D]})
    if scales:
        columns[PYRAMID] = [sum(s * s for s in scales), D]
    columns[TOKENS] = [token_grouping(job.grouping, h, w, scales).seq_len, D]
    return {
        "schema_version": L.SCHEMA_VERSION,
        "encoder": codec.name,
        "weights": storage.redact(job.encode.weights) if job.encode.weights else None,
        "weights_sha256": codec.weights_sha256,
        "scale_factor": codec.scale_factor,
        "image_size": codec.image_size,
        "grid": [h, w],
        "channels": codec.channels,
        "patch": codec.patch,
        "token_dim": D,
        "grouping": job.grouping,
        "scales": scales,
        "dtype": job.encode.storage_dtype,
        "columns": columns,
        "source": storage.redact(job.data.source),
        "split": job.data.split,
        "classes": listing.wnids,
        "num_classes": len(listing.wnids),
        "config": job.run_config,
    }


def build_pipeline(job: EncodeJob, items: list[tuple[str, int]], run_id: str):
    """The Ray Data dataset whose rows are writer results (one per shard), not yet executed."""
    import ray

    enc, so = job.encode, job.storage_options
    # Blocks of about one encoder batch each, so the read/decode work spreads over the cluster.
    blocks = enc.read_parallelism if enc.read_parallelism > 0 else max(1, min(len(items) // enc.batch_size, 4096))
    ds = ray.data.from_items([{KEY: k, LABEL: label} for k, label in items], override_num_blocks=blocks)
    ds = ds.map_batches(read_and_decode, batch_size=enc.batch_size, batch_format="numpy",
                        fn_kwargs={"root": job.data.source, "image_size": enc.image_size, "storage_options": so})
    # On a GPU cluster the decode tasks and the GPU actors are separate operators (decode on
    # every CPU); without GPUs, Ray Data fuses decode into the CPU actors, saving a copy.
    gpu = {"num_gpus": enc.gpus_per_actor} if cluster_gpus() > 0 and enc.gpus_per_actor > 0 else {}
    with pool_args_accepted():
        ds = ds.map_batches(
            EncodeLatents, batch_size=enc.batch_size, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=enc.num_actors),
            fn_constructor_kwargs={
                "encoder": enc.encoder, "weights": enc.weights, "image_size": enc.image_size, "patch": enc.patch,
                "scale_factor": enc.scale_factor, "grouping": job.grouping, "scales": job.scales,
                "storage_dtype": enc.storage_dtype, "storage_options": so,
            },
            **gpu, **actor_pool_args(),
        )
    return ds.map_batches(L.write_shard, batch_size=enc.shard_rows, batch_format="numpy",
                          fn_kwargs={"latents_url": job.out, "run_id": run_id, "storage_options": so})


def list_source(job: EncodeJob) -> SourceListing:
    """The source files of the configured split and subset (one listing; checks data.source)."""
    d = job.data
    return list_imagenet(d.source, d.split, d.classes, d.per_class, job.storage_options)


def list_new_sources(job: EncodeJob, consumed: set[str],
                     listing: SourceListing | None = None) -> tuple[SourceListing, list[tuple[str, int]]]:
    """The source listing and its (key, label) items that no commit has consumed."""
    listing = listing or list_source(job)
    return listing, [(k, label) for k, label in listing.items if k not in consumed]


@dataclass
class EncodePlan:
    """What a run will do, decided from the folder's committed state and the source, before Ray starts."""

    previous: dict | None           # the committed manifest (without shards that went missing)
    consumed: set[str]
    rejected: list[dict]
    listing: SourceListing
    new_items: list[tuple[str, int]]
    header: dict                    # what this run's manifest says about the dataset

    @property
    def repair(self) -> bool:
        """The manifest listed shards that are gone or damaged: it must be rewritten even with nothing new."""
        return bool(self.previous and self.previous.get(L.BAD_SHARDS))


def plan_encode(job: EncodeJob, force: bool = False, listing: SourceListing | None = None) -> EncodePlan:
    """Clean the folder (everything with --force, else leftovers of an interrupted run), read its
    committed state and list what is new; the caller holds the folder's writer lease."""
    out, so = job.out, job.storage_options
    if force:
        log.info("--force: removing the latents dataset at %s", storage.redact(out))
        L.remove_dataset(out, so)
    previous, consumed, rejected = L.committed_state(out, so)
    L.remove_orphans(out, previous, so)
    listing, new_items = list_new_sources(job, consumed, listing)
    log.info("%d source files in %s/%s, %d new", len(listing.items), storage.redact(job.data.source),
             job.data.split, len(new_items))

    # The codec's description, made here (the actors load their own copy); an existing dataset
    # must describe the same token space.
    enc = job.encode
    codec = make_codec(enc.encoder, enc.weights, enc.image_size, enc.patch, enc.scale_factor, so)
    header = dataset_header(job, codec, listing)
    del codec
    if previous is not None:
        problem = L.header_mismatch(previous, header)
        if problem:
            raise SarError(f"{storage.redact(out)} holds a different dataset ({problem}); "
                           "re-run with --force or set encode.output")
        header["classes"] = max(previous.get("classes") or [], header["classes"], key=len)
        header["num_classes"] = len(header["classes"])
    return EncodePlan(previous, consumed, rejected, listing, new_items, header)


def write_order(items: list[tuple[str, int]], seed: int = 0) -> list[tuple[str, int]]:
    """The items in a seeded random order. The listing is sorted by key, so class by class, and its
    shards would each hold one class or two; training shuffles whole shards and a bounded buffer of rows
    (pipelines/data/stream.py), which cannot mix classes that its shards do not."""
    order = list(items)
    random.Random(seed).shuffle(order)
    return order


def run_encode(job: EncodeJob, force: bool = False, commit_interval_s: float = COMMIT_INTERVAL_S,
               on_commit: Callable[[dict], None] | None = None, plan: EncodePlan | None = None,
               lease: WriterLease | None = None) -> EncodeSummary:
    """Encode what is new in the source into `job.out`; Ray must be initialised when there is.

    `lease` is the folder's writer lease, held by the caller (with the `plan` it made under
    it); without one, this run takes its own for its whole length.
    """
    if lease is None:
        with WriterLease(job.out, job.storage_options) as own:
            return run_encode(job, force, commit_interval_s, on_commit, None, own)
    out, so = job.out, job.storage_options
    plan = plan or plan_encode(job, force)
    previous, rejected = plan.previous, plan.rejected
    total = previous["num_rows"] if previous else 0
    if not plan.new_items and not plan.repair:
        return EncodeSummary(out, 0, 0, 0, 0, 0, 0.0, total)

    # Loop: stream the pipeline; commit shards into the manifest as they are written.
    committer = L.Committer(out, plan.header, previous, plan.consumed, rejected, so)

    def commit() -> dict:
        lease.check()  # another process may own the folder now: write nothing more
        manifest = committer.commit()
        if on_commit:
            on_commit(manifest)
        return manifest

    run_id = time.strftime("%Y%m%d%H%M%S") + "-" + uuid.uuid4().hex[:6]
    start = last_commit = time.monotonic()
    shards = 0
    manifest = previous if not plan.repair else None
    if plan.new_items:
        progress = Progress(len(plan.new_items), what="images", desc="encode", interval_s=job.progress_interval_s)
        rows = iter(build_pipeline(job, write_order(plan.new_items), run_id).iter_rows())
        for result in rows:
            committer.add(result)
            progress.set(committer.new_rows + committer.new_rejected)  # one writer result: a shard's images
            shards += bool(result["file"])
            if stop.requested():  # SIGTERM / SIGINT: commit what arrived, encode the rest next time
                break
            if time.monotonic() - last_commit >= commit_interval_s:
                manifest = commit()
                last_commit = time.monotonic()
        getattr(rows, "close", lambda: None)()  # Ray Data's executor (a generator) stops here, while Ray is up
        progress.close()
    if committer.pending or manifest is None:
        manifest = commit()
    seconds = time.monotonic() - start

    # Save: nothing outside the manifest may remain (a retried writer task leaves its first file).
    L.remove_orphans(out, manifest, so)
    left = len(plan.new_items) - committer.new_rows - committer.new_rejected
    if left:  # stopped between two shards (a stop during the last one lets the run finish)
        stop.check(f"{manifest['num_rows']} rows committed to {storage.redact(out)}, {left} source files left; "
                   "the same command encodes them")
    new_rejects = committer.rejected[len(rejected):]
    for r in new_rejects[:MAX_REJECTS_LOGGED]:
        log.warning("rejected %s: %s", r["key"], r["reason"])
    if len(new_rejects) > MAX_REJECTS_LOGGED:
        log.warning("... and %d more rejected files, listed in the manifest", len(new_rejects) - MAX_REJECTS_LOGGED)
    return EncodeSummary(out, len(plan.new_items), committer.new_rows, committer.new_rejected, shards,
                         committer.new_bytes, seconds, manifest["num_rows"])
