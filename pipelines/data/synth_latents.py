"""A synthetic latents dataset at ImageNet's KL-16 shape, written without images (`sar synth-latents`).

What `sar encode` makes of ImageNet at 256 px with MAR's kl16 (stride 16, 16 channels, patch 1:
a 16x16 grid of 16-dim tokens, latent scale 0.2325), at any row count: the encode stage's own
shards (latents.write_shard: key, label, mean, mean_flip, logvar, logvar_flip and the token-order
copy, one row group each) and its manifest (encode.dataset_header, committed by latents.Committer),
so training, `sar plan` and the benchmarks read it as they read real latents. For measuring the
data path at size: the values are random (mean ~ N(0, 1) as a scaled latent is, logvar ~ N(-6, 1),
the flips the grids mirrored), one of `classes` labels per row drawn uniformly, so any shard mixes
the classes as a shuffled encode's do.

The dataset appears whole or not at all: the shards are written first, the manifest last; a run
killed midway leaves shards no manifest lists, which the next run deletes.
"""

from __future__ import annotations

import functools
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch

from pipelines.core import storage
from pipelines.core.errors import SarError
from pipelines.data import latents as L
from pipelines.data.codecs import Codec
from pipelines.data.encode import EncodeJob, dataset_header, token_grouping
from pipelines.data.imagenet import SourceListing
from pipelines.data.synth import wnid

# MAR's kl16 on ImageNet 256 (DESIGN 2; paper Table 3): stride 16, 16 latent channels, patch 1, scale 0.2325.
IMAGE_SIZE, STRIDE, CHANNELS, PATCH, SCALE_FACTOR = 256, 16, 16, 1, 0.2325
GROUPING = "next-neighbour"  # the configs' grouping: the order of the token-order copy
SOURCE = "synthetic"


@dataclass
class SynthSummary:
    url: str
    rows: int
    shards: int
    bytes: int
    seconds: float

    def line(self) -> str:
        return (f"wrote {self.rows:,} rows of KL-16 latents in {self.shards} shards, {self.bytes / 1e9:.2f} GB "
                f"({self.bytes / max(self.rows, 1) / 1024:.1f} KiB a row) in {self.seconds:.1f} s to "
                f"{storage.redact(self.url)}")


def kl16_space() -> Codec:
    """The token space of MAR's kl16 at 256 px, without its weights (what a manifest says of it)."""
    return Codec("kl-vae", IMAGE_SIZE, CHANNELS, STRIDE, PATCH, torch.zeros(CHANNELS),
                 torch.full((CHANNELS,), SCALE_FACTOR), SCALE_FACTOR, None)


def make_shard_rows(start: int, n: int, *, seed: int, classes: int, dtype: str, grouping) -> dict[str, np.ndarray]:
    """Rows [start, start + n) as a batch for latents.write_shard, drawn from the seed and `start` alone
    (the same seed and shard size make the same dataset)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + start)
    side = IMAGE_SIZE // (STRIDE * PATCH)
    mean = torch.randn(n, side, side, CHANNELS * PATCH * PATCH, generator=g)
    logvar = torch.randn(mean.shape, generator=g) - 6.0
    labels = torch.randint(classes, (n,), generator=g).numpy()
    return {L.KEY: np.array([f"{SOURCE}/{i:09d}" for i in range(start, start + n)], dtype=object),
            L.LABEL: labels, L.ERROR: np.array([""] * n, dtype=object),
            L.MEAN: L.storage_array(mean, dtype), L.MEAN_FLIP: L.storage_array(mean.flip(2), dtype),
            L.LOGVAR: L.storage_array(logvar, dtype), L.LOGVAR_FLIP: L.storage_array(logvar.flip(2), dtype),
            L.TOKENS: L.storage_array(grouping.to_sequence(mean), dtype)}


def write_synthetic_shard(start: int, n: int, *, out: str, run_id: str, seed: int, classes: int, dtype: str,
                          storage_options: dict | None) -> dict:
    """Make and write one shard (in a worker process); its writer result for the Committer."""
    grouping = token_grouping(GROUPING, *kl16_space().grid, None)
    batch = make_shard_rows(start, n, seed=seed, classes=classes, dtype=dtype, grouping=grouping)
    result = L.write_shard(batch, latents_url=out, run_id=run_id, storage_options=storage_options)
    return {k: v[0] for k, v in result.items()}


def make_synthetic_latents(out: str, rows: int, *, shard_rows: int = 1024, classes: int = 1000, seed: int = 0,
                           dtype: str = "bfloat16", force: bool = False, workers: int = 1,
                           storage_options: dict | None = None) -> SynthSummary:
    """Write `rows` rows of KL-16-shaped latents to the latents folder `out` (local or object store), the
    shards made by `workers` processes (1: this one)."""
    if rows < 1 or shard_rows < 1 or classes < 1 or workers < 1:
        raise ValueError(f"--rows, --shard-rows, --classes and --workers must be at least 1 (got {rows}, "
                         f"{shard_rows}, {classes}, {workers})")
    previous, _, _ = L.committed_state(out, storage_options)
    if previous is not None:
        if not force:
            raise SarError(f"{storage.redact(out)} already holds a latents dataset ({previous['num_rows']} rows); "
                           "remove it or pass --force")
        L.remove_dataset(out, storage_options)
    L.remove_orphans(out, None, storage_options)
    space = kl16_space()
    job = EncodeJob(data=SimpleNamespace(source=SOURCE, split="train"),
                    encode=SimpleNamespace(weights=None, storage_dtype=dtype), grouping=GROUPING, scales=None,
                    out=out, run_config={})
    listing = SourceListing(root=SOURCE, split="train", wnids=[wnid(c) for c in range(classes)], items=[])
    committer = L.Committer(out, {**dataset_header(job, space, listing), "synthetic": {"seed": seed}}, None, set(), [],
                            storage_options)
    run_id = f"synth{seed}-{time.strftime('%Y%m%d%H%M%S')}"
    t0 = time.perf_counter()
    write = functools.partial(write_synthetic_shard, out=out, run_id=run_id, seed=seed, classes=classes, dtype=dtype,
                              storage_options=storage_options)
    starts = range(0, rows, shard_rows)
    sizes = [min(shard_rows, rows - start) for start in starts]
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) if workers > 1 else None
    try:
        for result in (pool.map if pool else map)(write, starts, sizes):  # in order: shards listed as rows run
            committer.add(result)
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)
    manifest = committer.commit()
    return SynthSummary(out, manifest["num_rows"], len(manifest["shards"]), L.data_bytes(manifest),
                        time.perf_counter() - t0)
