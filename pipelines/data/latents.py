"""The latents dataset: Parquet shards, their manifest, and how training opens them.

A latents folder holds

    part-<run>-<id>.parquet   shards of up to encode.shard_rows rows (zstd), one per writer call
    _manifest.json            what the dataset is, and the shards that belong to it
    _sources.json             every source key consumed (encoded or rejected), sorted
    _rejected.json            the rejected files, when more than 1000 (else inline in the manifest)

Columns of a shard (Ray's fixed-shape tensor extension type, `dtype` of the manifest;
bfloat16 is stored as its uint16 bit pattern, see `storage_array` and `column_values`):

    key          str    source key relative to the dataset root
    label        int64
    mean         (h, w, D)  token grid of the image (scaled latent, patchified)
    mean_flip    (h, w, D)  token grid of its horizontal flip
    logvar, logvar_flip  (h, w, D)  posterior log-variances (VAE encoders only)
    pyramid      (sum s^2, D)  area-downsampled multi-scale pyramid of `mean` (when scales are set)
    tokens       (L, D)  `mean` in the grouping's token order

Commit protocol (what makes a run resumable and exactly-once). Each shard is written whole
(storage.open_atomic) under a fresh name, and belongs to the dataset only once the manifest
lists it. The driver commits as shards arrive: it writes the sidecars, then the manifest, each
atomically; the manifest carries the sidecars' digests, so a crash between the writes is
detected and the key set rebuilt from the committed shards. A run killed midway leaves
shards the manifest does not list; the next run deletes them before it starts and encodes
their images again, so every image ends up in exactly one committed shard.

One encode run per latents folder at a time, enforced: the run holds the folder's writer
lease (`_writer.lease*`, pipelines/core/lease.py; never taken for data nor cleaned up here) and
checks it before every commit. A manifest that lists a shard no longer in the folder (deleted
or lost by hand) is repaired rather than trusted: the shard leaves the manifest and its images
count as not consumed, so the next run encodes them again.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
import uuid
from collections.abc import Iterable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from models import resolve_scales
from pipelines.core import storage
from pipelines.core.errors import DatasetMismatch, SarError
from pipelines.core.lease import LEASE_PREFIX
from pipelines.core.rundir import digest_of
from pipelines.data.codecs import DEFAULT_PATCH, weights_sha256

log = logging.getLogger(__name__)

# The schema: every column of a shard, and of the batches that flow into the writer.
KEY, LABEL = "key", "label"
MEAN, MEAN_FLIP, LOGVAR, LOGVAR_FLIP = "mean", "mean_flip", "logvar", "logvar_flip"
PYRAMID, TOKENS = "pyramid", "tokens"
ERROR = "error"  # in the encode batches only: why a row could not be read ("" when fine)
TENSOR_COLUMNS = (MEAN, MEAN_FLIP, LOGVAR, LOGVAR_FLIP, PYRAMID, TOKENS)
# What training reads; the source key and the token-order copies stay on disk.
TRAIN_COLUMNS = (LABEL, MEAN, MEAN_FLIP, LOGVAR, LOGVAR_FLIP)

SCHEMA_VERSION = 1
MANIFEST, SOURCES, REJECTED = "_manifest.json", "_sources.json", "_rejected.json"
SHARD_PREFIX, SHARD_SUFFIX = "part-", ".parquet"
INLINE_REJECTED_MAX = 1000
# In a manifest as committed_state returns it (never on disk): the listed shards that are gone.
MISSING_SHARDS = "missing_shards"
# What must agree between an existing dataset and a run that adds to it.
# Causes before consequences (patch before grid), so the message names what the user changed.
HEADER_FIELDS = ("schema_version", "encoder", "weights_sha256", "scale_factor", "image_size", "patch", "channels",
                 "grid", "token_dim", "grouping", "scales", "dtype", "columns", "split")


def keys_digest(keys: Iterable[str]) -> str:
    """SHA-256 of the sorted keys, one per line."""
    h = hashlib.sha256()
    for k in sorted(keys):
        h.update(k.encode() + b"\n")
    return h.hexdigest()


def _rejected_digest(rejected: list[dict]) -> str:
    return hashlib.sha256(json.dumps(sorted(r["key"] for r in rejected)).encode()).hexdigest()


def storage_array(x: torch.Tensor, dtype: str) -> np.ndarray:
    """A tensor as the numpy array stored in Parquet; bfloat16 travels as its uint16 bits (numpy has no bf16)."""
    if dtype == "bfloat16":
        return x.to(torch.bfloat16).cpu().view(torch.int16).numpy().view(np.uint16)
    return x.to(getattr(torch, dtype)).cpu().numpy()


def column_values(t: torch.Tensor) -> torch.Tensor:
    """A stored tensor column, as read back by Ray Data, as float32 (uint16 = bfloat16 bits)."""
    return t.view(torch.bfloat16).float() if t.dtype == torch.uint16 else t.float()


# Writing shards (a Ray Data task stage) -----------------------------------------------------
def shard_table(batch: dict[str, np.ndarray]) -> pa.Table:
    """The encoded rows of a batch as an Arrow table with Ray tensor columns."""
    from ray.data.extensions import ArrowTensorArray

    columns = {KEY: pa.array([str(k) for k in batch[KEY]], pa.string()),
               LABEL: pa.array(np.asarray(batch[LABEL], np.int64))}
    for name in TENSOR_COLUMNS:
        if name in batch:
            columns[name] = ArrowTensorArray.from_numpy(np.ascontiguousarray(batch[name]))
    return pa.table(columns)


def write_shard(batch: dict[str, np.ndarray], *, latents_url: str, run_id: str,
                storage_options: dict | None = None) -> dict[str, np.ndarray]:
    """Write a batch's good rows as one shard; return one row describing it for the commit.

    Out: file ("" when every row was rejected), rows, bytes, keys (JSON list of the keys
    written), rejected (JSON list of {key, reason}).
    """
    errors = np.asarray(batch[ERROR], dtype=object)
    ok = np.array([not e for e in errors], bool)
    rejected = [{"key": str(k), "reason": str(e)} for k, e in zip(batch[KEY], errors) if e]
    keys = [str(k) for k in np.asarray(batch[KEY], dtype=object)[ok]]
    name, size = "", 0
    if ok.any():
        table = shard_table({c: np.asarray(v)[ok] for c, v in batch.items() if c != ERROR})
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        name = f"{SHARD_PREFIX}{run_id}-{uuid.uuid4().hex[:12]}{SHARD_SUFFIX}"
        storage.write_bytes(storage.join(latents_url, name), buf.getvalue(), storage_options)
        size = buf.tell()
    return {"file": np.array([name], dtype=object), "rows": np.array([len(keys)], np.int64),
            "bytes": np.array([size], np.int64), "keys": np.array([json.dumps(keys)], dtype=object),
            "rejected": np.array([json.dumps(rejected)], dtype=object)}


# Reading ---------------------------------------------------------------------------------
def read_manifest(latents_url: str, storage_options: dict | None = None) -> dict:
    """The manifest of a latents folder; SarError naming the URL when there is none."""
    url = storage.join(latents_url, MANIFEST)
    try:
        manifest = storage.read_json(url, storage_options)
    except storage.NotFound:
        raise SarError(f"no latents dataset at {storage.redact(latents_url)} ({MANIFEST} missing; run `sar encode`)") \
            from None
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise SarError(f"{storage.redact(url)}: schema_version {manifest.get('schema_version')}, "
                       f"this code reads {SCHEMA_VERSION}; re-encode with `sar encode --force`")
    return manifest


def shard_urls(latents_url: str, manifest: dict) -> list[str]:
    return [storage.join(latents_url, s["file"]) for s in manifest["shards"]]


def open_latents(latents_url: str, storage_options: dict | None = None):
    """(ray.data.Dataset over the committed shards only, manifest)."""
    import ray

    manifest = read_manifest(latents_url, storage_options)
    if not manifest["shards"]:
        raise SarError(f"latents dataset at {storage.redact(latents_url)} has no rows")
    fs, _ = storage.pyarrow_filesystem(latents_url, storage_options)
    paths = [storage.pyarrow_filesystem(u, storage_options)[1] for u in shard_urls(latents_url, manifest)]
    return ray.data.read_parquet(paths, filesystem=fs), manifest


def read_into_object_store(latents_url: str, manifest: dict, columns: Iterable[str],
                           storage_options: dict | None = None):
    """A Ray Dataset of the committed shards' `columns`, read by this process and put in Ray's object
    store, one block per shard: the same rows and types as `open_latents`, with no read task.

    For small datasets only: the rows pass through this process's memory and, on a cluster, all
    live in its node's object store.
    """
    import ray

    wanted = [c for c in columns if c in manifest["columns"]]
    tables = []
    for url in shard_urls(latents_url, manifest):
        fs, path = storage.pyarrow_filesystem(url, storage_options)
        with storage.translate_errors(url, storage_options):
            tables.append(pq.read_table(path, columns=wanted, filesystem=fs))
    return ray.data.from_arrow(tables)


# Manifest fields left out of the dataset digest: they change without changing the data.
VOLATILE_MANIFEST_FIELDS = {"created", "updated", "config", "elapsed_s", "summary"}


def manifest_digest(manifest: dict) -> str:
    """The digest of a dataset (what training stages record as `inputs.latents`): its manifest
    without timestamps and config."""
    return digest_of({k: v for k, v in manifest.items() if k not in VOLATILE_MANIFEST_FIELDS})


def dataset_digest(latents_url: str, storage_options: dict | None = None) -> str | None:
    """Digest of the committed dataset (`manifest_digest`); None when absent."""
    url = storage.join(latents_url, MANIFEST)
    if not storage.exists(url, storage_options):
        return None
    return manifest_digest(storage.read_json(url, storage_options))


def load_arrays(latents_url: str, columns: Iterable[str] = TRAIN_COLUMNS,
                storage_options: dict | None = None) -> dict[str, np.ndarray]:
    """The committed rows of a latents dataset in memory, without Ray (tools and small datasets).

    Tensor columns come back in their stored dtype and shape (bfloat16 as uint16 bits).
    """
    manifest = read_manifest(latents_url, storage_options)
    fs, _ = storage.pyarrow_filesystem(latents_url, storage_options)
    wanted = [c for c in columns if c in manifest["columns"]]
    parts: dict[str, list[np.ndarray]] = {c: [] for c in wanted}
    for url in shard_urls(latents_url, manifest):
        table = pq.read_table(storage.pyarrow_filesystem(url, storage_options)[1], columns=wanted, filesystem=fs)
        for c in wanted:
            column = table.column(c).combine_chunks()
            shape = manifest["columns"][c]
            # A tensor column is a list of flattened values (Ray's tensor extension); its shape is in the manifest.
            values = column.storage.values if isinstance(column, pa.ExtensionArray) else \
                column.values if shape else column
            parts[c].append(np.asarray(values.to_numpy(zero_copy_only=False)).reshape(len(column), *shape))
    return {c: np.concatenate(v) for c, v in parts.items()}


def data_bytes(manifest: dict) -> int:
    """Bytes of the committed shards."""
    return sum(int(shard.get("bytes", 0)) for shard in manifest.get("shards", []))


def tokens_from_batch(batch: dict[str, torch.Tensor], grouping, generator: torch.Generator,
                      device: torch.device, hflip: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Training tokens (B, L, D) and labels (B,) from a batch of latent rows.

    With `hflip` the image or its flip is chosen per example; the posterior is sampled per
    example; both at load time (MAR stores moments, not samples, so both stay augmentations;
    DESIGN section 2).
    """
    mean, mean_flip = column_values(batch[MEAN]), column_values(batch[MEAN_FLIP])  # (B, h, w, D) each
    flip = torch.rand(mean.shape[0], generator=generator) < 0.5  # (B,), drawn either way: same stream
    flip &= hflip
    sel = flip.view(-1, 1, 1, 1).to(mean.device)
    grid = torch.where(sel, mean_flip, mean)
    if LOGVAR in batch:
        logvar = torch.where(sel, column_values(batch[LOGVAR_FLIP]), column_values(batch[LOGVAR]))
        eps = torch.randn(grid.shape, generator=generator).to(grid.device)
        grid = grid + torch.exp(0.5 * logvar) * eps  # posterior sample
    x = grouping.to_sequence(grid.to(device))  # (B, L, D)
    return x, batch[LABEL].long().to(device)


def check_compatible(manifest: dict, *, token_dim: int, grid: tuple[int, int], grouping: str,
                     scales: list[int] | str | None) -> None:
    """Raise DatasetMismatch naming the first field where the dataset and the model differ; a
    scale schedule name is resolved for the grid first (the manifest holds the sides)."""
    scales = resolve_scales(scales, grid[0])
    wanted = {"token_dim": token_dim, "grid": list(grid), "grouping": grouping,
              "scales": list(scales) if scales else None}
    for name, want in wanted.items():
        have = manifest.get(name)
        have = list(have) if isinstance(have, (list, tuple)) else have
        if have != want:
            raise DatasetMismatch(f"{name}: dataset has {_show(have)}, model expects {_show(want)}")


def check_encode_settings(manifest: dict, encode: Any, where: str, storage_options: dict | None = None) -> None:
    """Refuse a dataset made with other encode settings than the config's (jobs.config.EncodeConfig).

    Training follows the dataset's token space whatever the config says, but records the
    config: a run on patch-4 latents under `encode.patch: 8` would say it trained on patch 8.
    Raises DatasetMismatch naming the field and both values. The weights are compared by
    location, then (only when the locations differ) by content.
    """
    wanted = {"encoder": encode.encoder, "image_size": encode.image_size,
              "patch": encode.patch or DEFAULT_PATCH.get(encode.encoder)}
    if encode.scale_factor is not None:
        wanted["scale_factor"] = encode.scale_factor
    for name, want in wanted.items():
        have = manifest.get(name)
        same = (have is not None and abs(float(have) - float(want)) <= 1e-6 * abs(float(want))
                if name == "scale_factor" else have == want)
        if not same:
            raise DatasetMismatch(f"encode.{name}: the latents at {where} were made with {_show(have)}, the config "
                                  f"says {_show(want)}; set encode.{name}={_show(have)} to train on them, or "
                                  f"re-encode them with `sar encode --force`")
    if encode.weights and manifest.get("weights_sha256") and storage.redact(encode.weights) != manifest.get("weights"):
        with storage.field("encode.weights"):
            digest = weights_sha256(storage.local_copy(encode.weights, storage_options))
        if digest != manifest["weights_sha256"]:
            raise DatasetMismatch(f"encode.weights: the latents at {where} were made with {manifest.get('weights')} "
                                  f"(sha256 {manifest['weights_sha256'][:12]}), the config names "
                                  f"{storage.redact(encode.weights)} (sha256 {digest[:12]}); re-encode with "
                                  "`sar encode --force` or set encode.weights to the dataset's")


def _show(v: Any) -> str:
    return "none" if v is None else json.dumps(v) if isinstance(v, list) else str(v)


# The commit state of a folder ---------------------------------------------------------------
def committed_state(latents_url: str, storage_options: dict | None = None) -> tuple[dict | None, set[str], list]:
    """(manifest or None, source keys consumed, rejected records) as last committed.

    A sidecar whose digest is not the manifest's was written by a commit that never
    finished: the keys are then rebuilt from the committed shards (and rejected files not
    provably recorded are simply tried again). So are they when a shard the manifest lists is
    missing: the returned manifest leaves it out (its names under MISSING_SHARDS) and its
    images are not consumed, so they are encoded again; the next commit makes that permanent.
    """
    if not storage.exists(storage.join(latents_url, MANIFEST), storage_options):
        return None, set(), []
    manifest = read_manifest(latents_url, storage_options)
    rejected = manifest.get("rejected", [])
    if isinstance(rejected, dict):  # more than INLINE_REJECTED_MAX: in the sidecar
        side = _read_sidecar(latents_url, REJECTED, storage_options)
        rejected = side.get("rejected", []) if side.get("digest") == rejected["digest"] else []
    present = set(_owned_files(latents_url, storage_options))
    missing = [s["file"] for s in manifest["shards"] if s["file"] not in present]
    if missing:
        log.warning("%d of the %d shards that %s lists are missing (e.g. %s): their images will be encoded again",
                    len(missing), len(manifest["shards"]), storage.redact(storage.join(latents_url, MANIFEST)),
                    missing[0])
        shards = [s for s in manifest["shards"] if s["file"] in present]
        manifest = {**manifest, "shards": shards, "num_rows": sum(s["rows"] for s in shards), MISSING_SHARDS: missing}
    side = _read_sidecar(latents_url, SOURCES, storage_options)
    if not missing and side.get("digest") == manifest["sources"]["digest"]:
        consumed = set(side["keys"])
    else:
        if not missing:
            log.warning("%s does not match the manifest (an interrupted commit): rebuilding from the shards", SOURCES)
        consumed = {r["key"] for r in rejected}
        fs, _ = storage.pyarrow_filesystem(latents_url, storage_options)
        for url in shard_urls(latents_url, manifest):
            path = storage.pyarrow_filesystem(url, storage_options)[1]
            consumed.update(pq.read_table(path, columns=[KEY], filesystem=fs).column(KEY).to_pylist())
    return manifest, consumed, list(rejected)


def _read_sidecar(latents_url: str, name: str, storage_options: dict | None) -> dict:
    try:
        return storage.read_json(storage.join(latents_url, name), storage_options)
    except storage.NotFound:
        return {}


def _owned_files(latents_url: str, storage_options: dict | None) -> list[str]:
    """Names in the folder that the encode stage writes (shards, sidecars, temporaries)."""
    fs, path = storage.filesystem(latents_url, storage_options)
    fs.invalidate_cache(path)  # shards are written by other processes: list afresh
    return [n for n in storage.listdir(latents_url, storage_options)
            if not n.startswith(LEASE_PREFIX)
            and ((n.startswith(SHARD_PREFIX) and n.endswith(SHARD_SUFFIX)) or n in (MANIFEST, SOURCES, REJECTED)
                 or (n.startswith((f".{SHARD_PREFIX}", "._")) and n.endswith(".tmp")))]


def remove_orphans(latents_url: str, manifest: dict | None, storage_options: dict | None = None) -> list[str]:
    """Delete shards (and temporaries) that no committed manifest lists; return their names."""
    listed = {s["file"] for s in manifest["shards"]} if manifest else set()
    orphans = [n for n in _owned_files(latents_url, storage_options)
               if n not in listed and n not in (MANIFEST, SOURCES, REJECTED)]
    for name in orphans:
        storage.remove(storage.join(latents_url, name), storage_options=storage_options)
    if orphans:
        log.info("removed %d uncommitted files from an interrupted run (e.g. %s)", len(orphans), orphans[0])
    return orphans


def remove_dataset(latents_url: str, storage_options: dict | None = None) -> None:
    """Delete a latents dataset (manifest first, so it is never half-visible), leaving other files."""
    names = _owned_files(latents_url, storage_options)
    if MANIFEST in names:
        storage.remove(storage.join(latents_url, MANIFEST), storage_options=storage_options)
    for name in names:
        if name != MANIFEST:
            storage.remove(storage.join(latents_url, name), storage_options=storage_options)


class Committer:
    """Adds written shards to a latents folder's manifest, atomically and in order.

    `header` holds what describes the dataset (encoder, grid, ...); it must agree with a
    previous manifest on HEADER_FIELDS, else the folder holds a different dataset.
    """

    def __init__(self, latents_url: str, header: dict, previous: dict | None, consumed: set[str],
                 rejected: list[dict], storage_options: dict | None = None):
        self.url, self.storage_options = latents_url, storage_options
        self.header = dict(header)
        self.shards = list(previous["shards"]) if previous else []
        self.generation = previous.get("generation", 0) if previous else 0
        self.consumed = set(consumed)
        self.rejected = list(rejected)
        self.pending = 0
        self.new_rows = self.new_rejected = self.new_bytes = 0

    def add(self, result: dict) -> None:
        """Record one writer result (see write_shard); visible after the next commit."""
        keys = json.loads(result["keys"])
        rejected = json.loads(result["rejected"])
        if result["file"]:
            self.shards.append({"file": str(result["file"]), "rows": int(result["rows"]), "bytes": int(result["bytes"])})
        self.consumed.update(keys)
        self.consumed.update(r["key"] for r in rejected)
        self.rejected.extend(rejected)
        self.new_rows += len(keys)
        self.new_rejected += len(rejected)
        self.new_bytes += int(result["bytes"])
        self.pending += 1

    def commit(self) -> dict:
        """Write the sidecars, then the manifest; return the manifest."""
        self.generation += 1
        digest = keys_digest(self.consumed)
        storage.write_json(storage.join(self.url, SOURCES),
                           {"generation": self.generation, "digest": digest, "keys": sorted(self.consumed)},
                           self.storage_options)
        rejected: list | dict = sorted(self.rejected, key=lambda r: r["key"])
        if len(rejected) > INLINE_REJECTED_MAX:
            rdigest = _rejected_digest(rejected)
            storage.write_json(storage.join(self.url, REJECTED), {"digest": rdigest, "rejected": rejected},
                               self.storage_options)
            rejected = {"count": len(rejected), "file": REJECTED, "digest": rdigest}
        manifest = {
            **self.header,
            "num_rows": sum(s["rows"] for s in self.shards),
            "num_rejected": len(self.rejected),
            "rejected": rejected,
            "sources": {"count": len(self.consumed), "digest": digest, "file": SOURCES},
            "shards": self.shards,
            "generation": self.generation,
            "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        storage.write_json(storage.join(self.url, MANIFEST), manifest, self.storage_options)
        self.pending = 0
        return manifest


def header_mismatch(previous: dict, header: dict) -> str | None:
    """The first header field where an existing dataset differs from this run, described."""
    for name in HEADER_FIELDS:
        if previous.get(name) != header.get(name):
            return f"{name}: dataset has {_show(previous.get(name))}, this run makes {_show(header.get(name))}"
    short, long = sorted([previous.get("classes") or [], header.get("classes") or []], key=len)
    if long[:len(short)] != short:
        return "classes: the label order differs from the dataset's (LOC_synset_mapping.txt changed?)"
    return None
