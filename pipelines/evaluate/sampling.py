"""The evaluation set: which images to make, the Ray Data stage that makes them, and their layout.

Reads a checkpoint (EMA weights and the token space it was trained on) and writes

    {samples}/images/{index:06d}.png      one PNG per sample (format 'png'), or
    {samples}/shards/{shard:05d}.npz      `arr_0` (n, H, W, 3) uint8 + index, label, seed (format 'npz')
    {samples}/_spec.json                  what is being generated (written first; a resume must match it)
    {samples}/index.json                  one row per sample: index, label, seed, file
    {samples}/_manifest.json              written last: the set is complete

The set is class-major as ADM's protocol (50 per class x 1000 classes): index i has label
i // per_class. Every index draws its noise from its own seed, derived from (global seed,
index) by numpy's SeedSequence, and `SARModel.generate` keeps samples of a batch independent,
so an image depends only on its index: any batch size, any number of actors and any resume
give the same picture. Every file is written atomically, so what is listed is complete and a
re-run makes only what is missing.
"""

from __future__ import annotations

import io
import logging
import re
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from models import Guidance
from pipelines.core import storage
from pipelines.core.errors import SarError
from pipelines.core.progress import Progress
from pipelines.core.ray_runtime import actor_pool_args, cluster_gpus, pool_args_accepted
from pipelines.core.rundir import StageStatus
from pipelines.data.codecs import codec_from_manifest
from pipelines.train.checkpoints import load_model, meta_token_space

log = logging.getLogger(__name__)

# Column names of the stage's batches.
INDEX, LABEL, SEED, FILE, SHARD = "index", "label", "seed", "file", "shard"

IMAGES_DIR, SHARDS_DIR = "images", "shards"
SPEC_FILE, INDEX_FILE, MANIFEST_FILE, PREVIEW_FILE = "_spec.json", "index.json", "_manifest.json", "preview.png"
_PNG_NAME = re.compile(r"^(\d{6,})\.png$")
_NPZ_NAME = re.compile(r"^(\d{5,})\.npz$")


# Seeds and labels --------------------------------------------------------------------------
def sample_seed(seed: int, index: int) -> int:
    """The noise seed of sample `index`: a hash of (global seed, index), 63 bits."""
    state = np.random.SeedSequence([int(seed), int(index)]).generate_state(1, np.uint64)[0]
    return int(state >> np.uint64(1))  # torch.Generator.manual_seed takes any int below 2**63


@dataclass(frozen=True)
class SamplePlan:
    """The N = num_classes x per_class samples of an evaluation set, class-major."""

    num_classes: int
    per_class: int
    seed: int

    @property
    def size(self) -> int:
        return self.num_classes * self.per_class

    def labels(self, indices: np.ndarray) -> np.ndarray:
        return np.asarray(indices, dtype=np.int64) // self.per_class

    def rows(self, indices) -> dict[str, np.ndarray]:
        """The stage's input columns for `indices`."""
        indices = np.asarray(list(indices), dtype=np.int64)
        seeds = np.array([sample_seed(self.seed, i) for i in indices], dtype=np.int64)
        return {INDEX: indices, LABEL: self.labels(indices), SEED: seeds}

    def class_indices(self, label: int, count: int) -> list[int]:
        """The first `count` indices of class `label`."""
        return [label * self.per_class + k for k in range(min(count, self.per_class))]


def image_name(index: int) -> str:
    return f"{IMAGES_DIR}/{index:06d}.png"


def shard_name(shard: int) -> str:
    return f"{SHARDS_DIR}/{shard:05d}.npz"


def shard_indices(shard: int, shard_size: int, total: int) -> range:
    return range(shard * shard_size, min((shard + 1) * shard_size, total))


def done_indices(samples_dir: str, fmt: str, shard_size: int, total: int,
                 storage_options: dict[str, Any] | None = None) -> set[int]:
    """Indices already written (atomic writes: a listed file is a complete file)."""
    if fmt == "png":
        names = storage.listdir(storage.join(samples_dir, IMAGES_DIR), storage_options)
        return {int(m.group(1)) for m in map(_PNG_NAME.match, names) if m and int(m.group(1)) < total}
    done: set[int] = set()
    for name in storage.listdir(storage.join(samples_dir, SHARDS_DIR), storage_options):
        m = _NPZ_NAME.match(name)
        if m and int(m.group(1)) * shard_size < total:
            done.update(shard_indices(int(m.group(1)), shard_size, total))
    return done


# Decoding ------------------------------------------------------------------------------------
def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8, rounded (as MAR's evaluation)."""
    x = ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def autocast(device: torch.device):
    """bf16 autocast on CUDA (as MAR samples under AMP); CPU runs fp32."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


@torch.no_grad()
def decode_images(codec, grid: torch.Tensor, decode_batch: int | None = None) -> np.ndarray:
    """Images (B, H, W, 3) uint8 of token grids (B, h, w, D), `decode_batch` at a time (all at once
    when None). The decoder's activations at full resolution dwarf the generator's KV cache (a kl16
    decode of 512 images at once ran out of an 80 GB GPU's memory, docs/benchmarks.md), so decoding
    in chunks lets the sampling batch grow past what the decoder could take in one call."""
    step = decode_batch or max(grid.shape[0], 1)
    return np.concatenate([to_uint8(codec.decode(grid[i:i + step])) for i in range(0, grid.shape[0], step)])


@torch.no_grad()
def render(model, codec, labels, seeds, guidance, flow_steps: int, device: torch.device,
           sampler: dict[str, Any] | None = None, decode_batch: int | None = None) -> np.ndarray:
    """Images (B, H, W, 3) uint8 for class labels and per-sample seeds; `sampler` holds the head's
    sampling options (SampleSettings.sampler: solver, temperature, compile_head); the tokens are
    decoded `decode_batch` images at a time (`decode_images`)."""
    labels = torch.as_tensor(np.array(labels), dtype=torch.long, device=device)
    seeds = [int(s) for s in seeds]
    with autocast(device):
        tokens = model.generate(labels, seeds=seeds, guidance=guidance, flow_steps=flow_steps,
                                **(sampler or {}))                                              # (B, L, D)
    grid = model.grouping.to_grid(tokens.float())                                               # (B, h, w, D)
    return decode_images(codec, grid, decode_batch)                                             # (B, H, W, 3)


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def npz_bytes(images: np.ndarray, rows: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    # `arr_0` as ADM's sample batches, so their evaluator reads a shard directly.
    np.savez(buf, arr_0=images, index=rows[INDEX], label=rows[LABEL], seed=rows[SEED])
    return buf.getvalue()


def grid_png(images: np.ndarray, min_cell: int = 64) -> bytes:
    """A (rows, cols, H, W, 3) uint8 array as one PNG grid; small images are enlarged (nearest)."""
    from torchvision.utils import make_grid

    rows, cols, h, w, _ = images.shape
    x = torch.from_numpy(images.reshape(rows * cols, h, w, 3)).permute(0, 3, 1, 2)  # (n, 3, H, W)
    factor = max(1, -(-min_cell // max(h, w)))
    if factor > 1:  # nearest keeps the pixels as generated
        x = x.repeat_interleave(factor, 2).repeat_interleave(factor, 3)
    grid = make_grid(x, nrow=cols, padding=2, pad_value=255)                      # (3, H', W')
    return png_bytes(grid.permute(1, 2, 0).contiguous().numpy())


# The Ray Data stage ------------------------------------------------------------------------
@dataclass(frozen=True)
class SampleSettings:
    """How every image of a set is made and stored (the config's sample section, as plain values)."""

    guidance: dict[str, Any]        # models.Guidance fields
    flow_steps: int
    weights: str = "ema"            # "ema" | "raw"
    image_format: str = "png"       # "png" | "npz"
    shard_size: int = 1000          # images per npz shard
    batch_size: int = 64            # images per generate call
    decode_batch: int = 64          # images per decoder call (decode_images): bounds the decoder's memory
    solver: str = "euler"           # the flow head's ODE solver: "euler" | "heun" | "midpoint"
    temperature: float = 1.0        # noise scale of the head's sampler
    compile_head: bool = False      # the head's steps compiled (CUDA graphs) on CUDA

    @property
    def sampler(self) -> dict[str, Any]:
        """The head's sampling options, as SARModel.generate takes them."""
        return {"solver": self.solver, "temperature": self.temperature, "compile_head": self.compile_head}

    @classmethod
    def from_config(cls, sample: Any) -> "SampleSettings":
        """The settings of the config's sample section (jobs.config.SampleConfig)."""
        return cls(guidance=sample.guidance.model_dump(), flow_steps=sample.flow_steps, weights=sample.weights,
                   image_format=sample.format, shard_size=sample.npz_shard, batch_size=sample.batch_size,
                   decode_batch=sample.decode_batch, solver=sample.solver, temperature=sample.temperature,
                   compile_head=sample.compile_head)

    def render(self, model, codec, rows: dict[str, np.ndarray], device: torch.device) -> np.ndarray:
        """The images (N, H, W, 3) uint8 of plan rows (labels and seeds), in batches of batch_size."""
        guidance, b = Guidance(**self.guidance), self.batch_size
        return np.concatenate([render(model, codec, rows[LABEL][i:i + b], rows[SEED][i:i + b], guidance,
                                      self.flow_steps, device, self.sampler, self.decode_batch)
                               for i in range(0, len(rows[LABEL]), b)])


def load_generator(checkpoint: str, weights: str, storage_options: dict[str, Any] | None, device: torch.device):
    """(model, codec, meta) of a checkpoint, on `device`."""
    model, meta = load_model(checkpoint, weights=weights, storage_options=storage_options)
    codec = codec_from_manifest(meta_token_space(meta), storage_options=storage_options)
    return model.to(device).eval(), codec.to(device).eval(), meta


class SampleGenerator:
    """Ray Data actor: one model replica (EMA weights) and its decoder; writes the images of a batch.

    Input rows: `index, label, seed` (format 'png') or `shard` (format 'npz'). Output rows:
    `index, label, seed, file`, one per image written.
    """

    def __init__(self, checkpoint: str, samples_dir: str, settings: SampleSettings, plan: SamplePlan,
                 storage_options: dict[str, Any] | None = None):
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model, self.codec, _ = load_generator(checkpoint, settings.weights, storage_options, self.device)
        self.samples_dir, self.storage_options = samples_dir, storage_options
        self.settings, self.plan = settings, plan
        self.format, self.shard_size = settings.image_format, settings.shard_size

    def _render(self, rows: dict[str, np.ndarray]) -> np.ndarray:
        return self.settings.render(self.model, self.codec, rows, self.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.format == "npz":
            return self._write_shards(batch[SHARD])
        rows = {k: np.asarray(batch[k]) for k in (INDEX, LABEL, SEED)}
        images = self._render(rows)
        files = []
        for index, image in zip(rows[INDEX], images):
            name = image_name(int(index))
            storage.write_bytes(storage.join(self.samples_dir, name), png_bytes(image), self.storage_options)
            files.append(name)
        return {**rows, FILE: np.array(files)}

    def _write_shards(self, shards) -> dict[str, np.ndarray]:
        out: dict[str, list] = {INDEX: [], LABEL: [], SEED: [], FILE: []}
        for shard in np.asarray(shards).tolist():
            rows = self.plan.rows(shard_indices(int(shard), self.shard_size, self.plan.size))
            name = shard_name(int(shard))
            storage.write_bytes(storage.join(self.samples_dir, name), npz_bytes(self._render(rows), rows),
                                self.storage_options)
            for k in (INDEX, LABEL, SEED):
                out[k].extend(rows[k].tolist())
            out[FILE].extend([name] * len(rows[INDEX]))
        return {k: np.array(v) for k, v in out.items()}


def index_rows(plan: SamplePlan, fmt: str, shard_size: int) -> list[dict[str, Any]]:
    """The index of a complete set: one row per sample."""
    rows = plan.rows(range(plan.size))
    return [{INDEX: int(i), LABEL: int(l), SEED: int(s),
             FILE: image_name(int(i)) if fmt == "png" else shard_name(int(i) // shard_size)}
            for i, l, s in zip(rows[INDEX], rows[LABEL], rows[SEED])]


# A set: its spec, what is missing, the pool, the commit ------------------------------------
def num_classes(meta: dict[str, Any], wanted: int | None) -> int:
    """How many classes to sample: `wanted`, or all the checkpoint was trained on."""
    trained = int(meta.get("num_classes") or (meta.get("latents") or {}).get("num_classes")
                  or meta["model_config"]["num_classes"])
    if wanted is not None and wanted > trained:
        raise SarError(f"sample.num_classes={wanted} but the checkpoint was trained on {trained} classes")
    return wanted or trained


def generation_spec(plan: SamplePlan, settings: SampleSettings, checkpoint: str, meta: dict[str, Any]) -> dict[str, Any]:
    """Everything an image depends on: a resume must match it exactly."""
    return {"num_samples": plan.size, "per_class": plan.per_class, "classes": plan.num_classes,
            "seed": plan.seed, "guidance": dict(settings.guidance), "flow_steps": settings.flow_steps,
            "solver": settings.solver, "temperature": settings.temperature,
            "weights": settings.weights, "format": settings.image_format, "npz_shard": settings.shard_size,
            "checkpoint": storage.redact(checkpoint), "checkpoint_digest": meta.get("digest"),
            "checkpoint_step": meta.get("step")}


# Spec keys added after the first sets were written, and the value those sets were made with.
_SPEC_DEFAULTS = {"solver": "euler", "temperature": 1.0}


def _spec_difference(saved: dict[str, Any], spec: dict[str, Any]) -> list[str]:
    return [k for k, v in spec.items() if k != "checkpoint" and saved.get(k, _SPEC_DEFAULTS.get(k)) != v]


def check_spec(samples_dir: str, spec: dict[str, Any], storage_options: dict[str, Any] | None = None) -> None:
    """Write the spec of a new set, or check that a partial set was made with the same one."""
    url = storage.join(samples_dir, SPEC_FILE)
    if not storage.exists(url, storage_options):
        storage.write_json(url, spec, storage_options)
        return
    saved = storage.read_json(url, storage_options)
    for key in _spec_difference(saved, spec):
        raise SarError(f"{storage.redact(samples_dir)} holds samples made with {key}={saved.get(key)!r}, "
                       f"this run would use {spec[key]!r}; set sample.output to a new folder or remove it")


def set_status(samples_dir: str, spec: dict[str, Any], storage_options: dict[str, Any] | None = None):
    """Whether the set in `samples_dir` is complete and made with `spec` (a rundir.StageStatus)."""
    url = storage.join(samples_dir, SPEC_FILE)
    if not storage.exists(url, storage_options):
        return StageStatus(False, "no samples")
    changed = _spec_difference(storage.read_json(url, storage_options), spec)
    if changed:
        return StageStatus(False, f"made from other inputs ({', '.join(changed)})", stale=True)
    if not storage.exists(storage.join(samples_dir, MANIFEST_FILE), storage_options):
        return StageStatus(False, "incomplete: resuming")
    return StageStatus(True, f"{spec['num_samples']} samples of the current checkpoint")


def missing_indices(samples_dir: str, plan: SamplePlan, settings: SampleSettings,
                    storage_options: dict[str, Any] | None = None) -> list[int]:
    done = done_indices(samples_dir, settings.image_format, settings.shard_size, plan.size, storage_options)
    return sorted(set(range(plan.size)) - done)


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


def run_pool(checkpoint: str, plan: SamplePlan, settings: SampleSettings, samples_dir: str, missing: list[int],
             num_actors: int, gpus_per_actor: float, storage_options: dict[str, Any] | None = None,
             resources_per_actor: dict[str, float] | None = None, progress_interval_s: float = 30.0) -> PoolRun:
    """Generate the `missing` indices with a Ray Data actor pool of `num_actors` SampleGenerators, each
    reserving `resources_per_actor` (custom resources) besides its GPU share; a progress line
    (pipelines/core/progress.py) every `progress_interval_s` in a log."""
    import ray

    if settings.image_format == "npz":
        shards = sorted({i // settings.shard_size for i in missing})
        ds = ray.data.from_items([{SHARD: k} for k in shards])
        batch_size = 1  # one shard per call; the actor renders it in settings.batch_size chunks
    else:
        rows = plan.rows(missing)
        ds = ray.data.from_items([{k: int(rows[k][j]) for k in rows} for j in range(len(missing))])
        batch_size = settings.batch_size
    with pool_args_accepted():
        ds = ds.map_batches(
            SampleGenerator,
            fn_constructor_kwargs={"checkpoint": checkpoint, "samples_dir": samples_dir, "settings": settings,
                                   "plan": plan, "storage_options": storage_options},
            batch_size=batch_size,
            compute=ray.data.ActorPoolStrategy(size=num_actors),
            num_gpus=gpus_per_actor if cluster_gpus() else 0,  # the job, not the stage, decides resources
            resources=resources_per_actor or None,
            **actor_pool_args(),
        )
    run = PoolRun()
    start = time.perf_counter()
    with Progress(len(missing), what="images", desc="sample", interval_s=progress_interval_s) as progress:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            n = len(batch[INDEX])
            if run.written == 0:
                run.first_batch_s, run.first_batch = time.perf_counter() - start, n
            run.written += n
            run.seconds = time.perf_counter() - start
            progress.update(n)
    return run


def finish_set(samples_dir: str, plan: SamplePlan, settings: SampleSettings, spec: dict[str, Any],
               meta: dict[str, Any], run_config: dict[str, Any],
               storage_options: dict[str, Any] | None = None, lease=None) -> dict[str, Any]:
    """Check the set is whole, then write the index and, last, the manifest; returns the manifest.

    `meta` is the checkpoint's meta.json (its token space gives the images' size); `lease`, the
    folder's writer lease (pipelines.core.lease.WriterLease), is checked before each of the two commits."""
    check = lease.check if lease is not None else (lambda: None)
    missing = missing_indices(samples_dir, plan, settings, storage_options)
    if missing:
        raise SarError(f"{storage.redact(samples_dir)}: {len(missing)} of {plan.size} images are "
                       f"still missing after the run; run `sar sample` again to finish")
    check()
    storage.write_json(storage.join(samples_dir, INDEX_FILE),
                       index_rows(plan, settings.image_format, settings.shard_size), storage_options)
    manifest = {**spec, "index": INDEX_FILE, "num_classes_trained": meta.get("num_classes"),
                "image_size": meta_token_space(meta).get("image_size"), "config": run_config}
    check()
    storage.write_json(storage.join(samples_dir, MANIFEST_FILE), manifest, storage_options)
    return manifest


def write_preview(checkpoint: str, plan: SamplePlan, settings: SampleSettings, samples_dir: str, classes: int,
                  per_class: int, storage_options: dict[str, Any] | None = None) -> str:
    """A classes x samples grid of the first images of evenly spaced classes, made in this process.

    The images are the ones the full run makes for those indices (same seeds).
    """
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, codec, _ = load_generator(checkpoint, settings.weights, storage_options, device)
    picked = np.unique(np.linspace(0, plan.num_classes - 1, min(classes, plan.num_classes)).round().astype(int))
    per = min(per_class, plan.per_class)
    rows = plan.rows([i for c in picked for i in plan.class_indices(int(c), per)])
    images = settings.render(model, codec, rows, device)
    url = storage.join(samples_dir, PREVIEW_FILE)
    storage.write_bytes(url, grid_png(images.reshape(len(picked), per, *images.shape[1:])), storage_options)
    return url


# Reading a finished set ----------------------------------------------------------------------
def read_manifest(samples_dir: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    url = storage.join(samples_dir, MANIFEST_FILE)
    try:
        return storage.read_json(url, storage_options)
    except storage.NotFound:
        raise SarError(f"no complete sample set at {storage.redact(samples_dir)} ({MANIFEST_FILE} missing): "
                       f"run `sar sample` first, or set fid.samples") from None


def read_index(samples_dir: str, storage_options: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    return storage.read_json(storage.join(samples_dir, INDEX_FILE), storage_options)


def read_finished_set(samples_dir: str, storage_options: dict[str, Any] | None = None
                      ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(manifest, index) of a complete set; a SarError when there is none or they disagree."""
    manifest = read_manifest(samples_dir, storage_options)
    index = read_index(samples_dir, storage_options)
    if len(index) != manifest["num_samples"]:
        raise SarError(f"{storage.redact(samples_dir)}: index.json lists {len(index)} samples, the manifest "
                       f"{manifest['num_samples']}")
    return manifest, index


def write_grid(samples_dir: str, index: list[dict[str, Any]], classes: int, per_class: int, url: str,
               storage_options: dict[str, Any] | None = None) -> tuple[int, int]:
    """A classes x samples PNG grid: evenly spaced classes, the first samples of each; returns its shape."""
    by_label: dict[int, list[dict[str, Any]]] = {}
    for e in index:
        by_label.setdefault(int(e[LABEL]), []).append(e)
    labels = sorted(by_label)
    picked = [labels[int(i)] for i in np.unique(np.linspace(0, len(labels) - 1, min(classes, len(labels)))
                                                .round().astype(int))]
    per = min(per_class, min(len(by_label[c]) for c in picked))
    entries = [e for c in picked for e in sorted(by_label[c], key=lambda e: e[INDEX])[:per]]
    images = load_images(samples_dir, entries, storage_options)
    storage.write_bytes(url, grid_png(images.reshape(len(picked), per, *images.shape[1:])), storage_options)
    return len(picked), per


def load_images(samples_dir: str, entries: list[dict[str, Any]],
                storage_options: dict[str, Any] | None = None) -> np.ndarray:
    """The images (n, H, W, 3) uint8 of index rows (for grids; FID streams instead)."""
    out, shard = [], (None, None, None)  # one shard in memory at a time: entries come grouped
    for e in entries:
        if e[FILE].endswith(".npz"):
            if shard[0] != e[FILE]:
                with np.load(io.BytesIO(storage.read_bytes(storage.join(samples_dir, e[FILE]), storage_options))) as z:
                    shard = (e[FILE], z["arr_0"], {int(i): k for k, i in enumerate(z["index"])})
            out.append(shard[1][shard[2][e[INDEX]]])
        else:
            data = storage.read_bytes(storage.join(samples_dir, e[FILE]), storage_options)
            out.append(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
    return np.stack(out)
