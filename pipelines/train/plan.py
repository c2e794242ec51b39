"""What a run will read, write and take, from its config and its dataset, before anything runs.

`make_plan(cfg, manifest)` gives the figures `sar plan` prints (jobs/plan.py) and the run report
shows (pipelines/report/page.py). Each figure carries where it comes from:

    given      a command-line rate (`--pretrain-rate` ...)
    dataset    the latents' manifest: rows, shards, bytes
    config     data.num_images, batch sizes, steps, epochs, checkpoints kept, samples
    measured   a figure of docs/benchmarks.md (the GPU rates were taken on one H100, the reader's on
               the 2-core development machine), quoted below with its command
    projected  arithmetic on the above: another model's rate from its FLOPs at the measured MFU,
               the encoder's from its FLOPs, a stage's wall time from its work and rate

The model is built on torch's meta device (no memory, no weights) to count its parameters and
FLOPs, so a plan of SAR-H is as quick as one of SAR-B. Nothing here starts Ray or reads more than
the manifest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from models import SARConfig, SARModel, count_parameters, preset_config, train_flops_per_image
from pipelines.core import storage
from pipelines.data import stream
from pipelines.data.codecs import DEFAULT_PATCH, Codec
from pipelines.data.encode import EncodeJob, dataset_header
from pipelines.data.imagenet import SourceListing
from pipelines.data.latents import LABEL, MANIFEST, TENSOR_COLUMNS, TRAIN_COLUMNS, read_manifest
from pipelines.train.driver import DRIVER_READ_MAX, build_model_config, resolve_length

IMAGENET_IMAGES = {"train": 1_281_167, "val": 50_000}  # ImageNet-1k (ILSVRC 2012)
NUM_CLASSES = 1000
# (stride, latent channels) of each encoder's reference space (paper Table 3: MAR's kl16, Wan 2.1's VAE,
# raw pixels); the real figures come from the weights at encode time and reach the manifest.
SPACES = {"kl-vae": (16, 16), "wan": (8, 16), "raw": (1, 3)}
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
# A checkpoint holds fp32 weights, their EMA and AdamW's two moments: 16 bytes a parameter
# (pipelines/train/worker.py: save_checkpoint), plus the history and the pickle's framing.
CHECKPOINT_BYTES_PER_PARAMETER = 16
IMAGE_BYTES = 256 * 256 * 3  # a 256 px sample as uint8 RGB: what npz stores, the most a PNG takes

# Measured (docs/benchmarks.md, section "GPU": one H100 80GB, bf16 autocast, masked SDPA, batch 128):
# `uv run python benchmarks/bench_models.py --skip train sample --iters 5 --cuda-groupings next-neighbour --batch 128`
SAR_B_IMAGES_PER_S = 477.0
SAR_B_MFU = 0.262          # of the H100's 989 TFLOP/s dense bf16, counted by models.train_flops_per_image
H100_BF16_FLOPS = 989e12
MEASURED_SPACE = dict(token_dim=16, height=16, width=16, num_classes=NUM_CLASSES, grouping="next-neighbour")
# 50,000 SAR-B samples, x+z-CFG, 50 Euler head steps (100 head evaluations a token), batch 256, eager
# (compiled head, Heun 25: 96.7): `uv run python benchmarks/sample_throughput.py --cuda-only --cuda-images 1024
# --cuda-batch 256 --flow-steps 50`
SAMPLE_IMAGES_PER_S, SAMPLE_HEAD_EVALS = 50.5, 100
SAMPLE_IMAGES_PER_S_COMPILED = 96.7
# A refine step in pretrain steps, by sample mode, in CPU time at rollout_fraction 1 (docs/benchmarks.md,
# "Refinement step cost": `uv run python -u benchmarks/refine_step_cost.py --threads 1`). Its rollout part
# scales with the fraction (1 + f (r - 1): 1.56 predicted at 0.5 against 1.57 measured, deterministic).
# x_cfg takes stochastic's passes (two backbone forwards, the head's ODE twice over): not timed on its own.
REFINE_STEP_COST = {"deterministic": 2.12, "stochastic": 2.07, "cfg": 2.45, "x_cfg": 2.07}
# MAR's kl16 encoder on one 256 px image: 136.4 GFLOP (torch.utils.flop_counter, printed by
# `uv run python benchmarks/latents_reader.py --only flops`); a row is an image and its flip.
KL16_ENCODE_FLOPS = 136.4e9
# The training reader (pipelines/data/stream.py), KL-16 rows as torch tensors, rows per CPU-second of
# the reading processes, two workers reading one epoch at once on the shared 2-core machine
# (docs/benchmarks.md, "Training reader": benchmarks/latents_reader.py; local disk: 200,000 rows,
# `--rows 200000 --only local`; S3: moto's server on loopback, 4,096 rows, its own CPU not counted).
READER_ROWS_PER_CORE_S = {"local disk": 5685.0, "S3 (moto)": 1827.0}
# Parquet bytes of a `sar synth-latents` row (bfloat16, shards of 1,024) over its uncompressed bytes, all
# columns: 5.39 GB for 200,000 rows of 41.0 KB (the same benchmark's set).
SYNTH_STORED_SHARE = 0.66


@dataclass(frozen=True)
class Figure:
    """A number and where it comes from (`source`: one of the module docstring's kinds, then detail)."""

    value: float
    source: str


@dataclass
class StageWork:
    """What one stage does: `work` units at `rate` units/s per GPU (None: not estimated)."""

    name: str
    work: int
    unit: str
    rate: Figure | None

    def hours(self, gpus: int) -> float | None:
        return None if self.rate is None or gpus < 1 else self.work / (self.rate.value * gpus) / 3600


@dataclass
class Plan:
    """The figures of a run; `rows()` lists them as (section, what, value, source)."""

    title: str
    rows: Figure
    shards: Figure
    stored_row_bytes: Figure       # a row as stored (all columns)
    train_row_bytes: int           # a row of the training columns in memory (what the reader holds)
    latents_bytes: Figure
    parameters: int
    flops_per_image: float
    checkpoint_bytes: int
    keep_checkpoints: dict[str, int]
    steps: dict[str, int]          # each training stage's length
    global_batch: dict[str, int]
    samples: int
    stages: list[StageWork]
    gpus: list[int]
    gpus_per_node: int
    reader: str                    # how training reads the latents: memory | stream
    requests_per_epoch: int
    notes: list[str] = field(default_factory=list)

    def steps_per_epoch(self, stage: str) -> int:
        return stream.steps_per_epoch(int(self.rows.value), self.global_batch[stage])

    def read_rate(self, gpus: int) -> float:
        """Rows/s one node's readers must deliver to keep its GPUs training (pretrain's rate)."""
        return min(gpus, self.gpus_per_node) * self.stage("pretrain").rate.value

    def stage(self, name: str) -> StageWork:
        return next(s for s in self.stages if s.name == name)

    def bytes_by_stage(self) -> dict[str, int]:
        return {"encode": int(self.latents_bytes.value),
                "pretrain": self.checkpoint_bytes * self.keep_checkpoints["pretrain"],
                "refine": self.checkpoint_bytes * self.keep_checkpoints["refine"],
                "sample": self.samples * IMAGE_BYTES}

    def table(self) -> list[tuple[str, str, str, str]]:
        """(section, what, value, source) of every figure, in reading order."""
        out = [("dataset", "rows", f"{int(self.rows.value):,}", self.rows.source),
               ("dataset", "shards", f"{int(self.shards.value):,}", self.shards.source),
               ("dataset", "a row as stored", size(self.stored_row_bytes.value), self.stored_row_bytes.source),
               ("dataset", "a row as read for training", size(self.train_row_bytes),
                "the training columns in memory (label and the moments)")]
        sources = {"encode": self.latents_bytes.source,
                   "pretrain": f"{self.keep_checkpoints['pretrain']} checkpoints kept x {size(self.checkpoint_bytes)}",
                   "refine": f"{self.keep_checkpoints['refine']} checkpoints kept x {size(self.checkpoint_bytes)}",
                   "sample": f"{self.samples:,} images, at most {size(IMAGE_BYTES)} each (uint8; PNG takes less)"}
        out += [("storage", name, size(b), sources[name]) for name, b in self.bytes_by_stage().items()]
        out.append(("model", "parameters", f"{self.parameters / 1e6:,.1f}M", "the config's preset, on the dataset's tokens"))
        out.append(("model", "checkpoint", size(self.checkpoint_bytes),
                    f"{CHECKPOINT_BYTES_PER_PARAMETER} bytes a parameter: fp32 weights, EMA, AdamW's two moments"))
        for name in ("pretrain", "refine"):
            spe = self.steps_per_epoch(name)
            out.append(("training", f"{name} steps", f"{self.steps[name]:,} ({self.steps[name] / max(spe, 1):,.1f} epochs)",
                        f"{name}.steps, or .epochs at global_batch {self.global_batch[name]:,} "
                        f"and at least .min_steps"))
            out.append(("training", f"{name} steps per epoch", f"{spe:,}",
                        f"floor(rows / {self.global_batch[name]:,}): the rows that make no full step sit the epoch out"))
        for s in self.stages:
            rate = f"{s.rate.value:,.1f} {s.unit}/s per GPU" if s.rate else "not estimated"
            out.append(("rates", s.name, rate, s.rate.source if s.rate else "give it: --" + s.name + "-rate"))
        out.append(("reading", "reader", self.reader, "data.reader (auto: memory up to 256 MiB of shards, else stream)"))
        out.append(("reading", "object-store requests per epoch", f"{self.requests_per_epoch:,}",
                    "stream, at most: per shard a footer read and a ranged read of the training columns, "
                    "2 more per cut between workers" if self.reader == "stream"
                    else "memory: the driver reads each shard once per launch, not per epoch"))
        for node in sorted({min(g, self.gpus_per_node) for g in self.gpus}):
            rate = self.read_rate(node)
            cores = ", ".join(f"{rate / r:.2f} cores from {where}" for where, r in READER_ROWS_PER_CORE_S.items())
            out.append(("reading", f"read rate per node ({node} GPUs)",
                        f"{rate:,.0f} rows/s = {rate * self.train_row_bytes / 1e6:,.0f} MB/s",
                        f"pretrain's rate x {node}; at the measured reader rate: {cores}"))
        for gpus in self.gpus:
            hours = {s.name: s.hours(gpus) for s in self.stages}
            for s in self.stages:
                h = hours[s.name]
                out.append((f"wall time on {gpus} GPUs", s.name, "—" if h is None else duration(h * 3600),
                            f"{s.work:,} {s.unit} / ({gpus} x rate)" + (f" = {h * gpus:,.1f} GPU-hours" if h else "")))
            known = {k: v for k, v in hours.items() if v is not None}
            if known:
                top = max(known, key=known.get)
                out.append((f"wall time on {gpus} GPUs", "dominant", top,
                            f"{100 * known[top] / sum(known.values()):.0f}% of the estimated {duration(3600 * sum(known.values()))}"))
        return out

    def text(self) -> str:
        """The plan as `sar plan` prints it."""
        lines, section = [self.title], None
        width = max(len(r[1]) for r in self.table())
        for sec, what, value, source in self.table():
            if sec != section:
                lines.append(f"{sec}:")
                section = sec
            lines.append(f"  {what:<{width}}  {value:>22}   {source}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def size(n: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{int(n)} B"


def gflop(flops: float) -> str:
    return f"{flops / 1e9:,.0f} GFLOP" if flops >= 1e10 else f"{flops / 1e9:.2g} GFLOP"


def duration(seconds: float) -> str:
    if seconds >= 86400:
        return f"{seconds / 86400:.1f} days"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


# Building a plan -----------------------------------------------------------------------------------------
def dataset_rows(cfg: Any, manifest: dict | None) -> Figure:
    """The rows of the run's dataset: the manifest's, else the config's stated size."""
    if manifest is not None:
        return Figure(manifest["num_rows"], f"dataset: the manifest at {storage.redact(cfg.latents_dir)}")
    d = cfg.data
    if d.num_images:
        return Figure(d.num_images, "config: data.num_images (no latents yet)")
    if d.classes and d.per_class:
        return Figure(d.classes * d.per_class, "config: data.classes x data.per_class, at most (no latents yet)")
    full = IMAGENET_IMAGES[d.split]
    if d.classes:
        return Figure(round(full * d.classes / NUM_CLASSES), f"config: ImageNet-1k {d.split} x data.classes / 1000 "
                                                             "(no latents yet, data.num_images unset)")
    return Figure(full, f"config: ImageNet-1k {d.split} (no latents yet, data.num_images unset)")


def projected_header(cfg: Any) -> dict:
    """What encode's manifest would say of this config's token space, from the encoder's reference space
    (SPACES): the columns, grid and dtype, without weights."""

    enc = cfg.encode
    stride, channels = SPACES[enc.encoder]
    patch = enc.patch or DEFAULT_PATCH[enc.encoder]
    scale = enc.scale_factor or 1.0
    space = Codec(enc.encoder, enc.image_size, channels, stride, patch, torch.zeros(channels),
                  torch.full((channels,), scale), scale, None)
    classes = cfg.data.classes or NUM_CLASSES
    job = EncodeJob(data=cfg.data, encode=enc, grouping=cfg.model.grouping, scales=cfg.model.scales,
                    out=cfg.latents_dir, run_config={})
    return dataset_header(job, space, SourceListing(root="", split=cfg.data.split,
                                                    wnids=[str(c) for c in range(classes)], items=[]))


def row_bytes(header: dict, columns) -> int:
    """Bytes of a row's `columns`, uncompressed, in the header's storage dtype (the label: 8)."""
    item = DTYPE_BYTES[header["dtype"]]
    return sum(8 if c == LABEL else math.prod(header["columns"][c]) * item
               for c in columns if c in header["columns"] and (c == LABEL or c in TENSOR_COLUMNS))


def meta_model(model_config: dict):
    """The SAR model of `model_config` on the meta device: shapes without memory."""

    with torch.device("meta"):
        return SARModel(SARConfig.from_dict(model_config))


def measured_flops() -> float:
    """Training FLOPs an image of the model whose rate was measured (SAR-B on KL-16 tokens)."""

    return train_flops_per_image(meta_model(preset_config("sar-b", **MEASURED_SPACE).to_dict()))


def train_rate(flops: float, measured: float, given: float | None) -> Figure:
    """Images/s per GPU of pretraining a model of `flops` an image: given, SAR-B's measured rate (at
    `measured` FLOPs), or projected from the FLOPs at SAR-B's measured MFU."""
    if given:
        return Figure(given, "given: --pretrain-rate")
    measured_flops = measured
    if math.isclose(flops, measured_flops, rel_tol=1e-9):
        return Figure(SAR_B_IMAGES_PER_S, "measured: SAR-B on one H100, bf16, batch 128 (docs/benchmarks.md, GPU)")
    return Figure(SAR_B_IMAGES_PER_S * measured_flops / flops,
                  f"projected: {gflop(flops)} an image at SAR-B's measured {100 * SAR_B_MFU:.1f}% MFU "
                  f"({SAR_B_IMAGES_PER_S:g} images/s at {gflop(measured_flops)})")


def refine_rate(cfg: Any, pretrain: Figure, given: float | None) -> Figure:
    if given:
        return Figure(given, "given: --refine-rate")
    r = cfg.refine
    cost = 1 + r.rollout_fraction * (REFINE_STEP_COST[r.sample_mode] - 1)
    return Figure(pretrain.value / cost, f"projected: pretrain's rate / {cost:.2f}, a {r.sample_mode} refine step "
                                         f"at rollout_fraction {r.rollout_fraction:g} in pretrain steps "
                                         "(measured on CPU, docs/benchmarks.md)")


def sample_rate(cfg: Any, flops_ratio: float, given: float | None) -> Figure:
    """Images/s per GPU of sampling: SAR-B's measured rate, scaled by head evaluations a token (the head is
    most of a sample's cost) and by the model's training FLOPs against SAR-B's."""
    if given:
        return Figure(given, "given: --sample-rate")
    s = cfg.sample
    evals = s.flow_steps * (2 if s.solver in ("heun", "midpoint") else 1) * \
        (2 if s.guidance.kind in ("cfg", "x_cfg", "xz_cfg") else 1)
    base = SAMPLE_IMAGES_PER_S_COMPILED if s.compile_head else SAMPLE_IMAGES_PER_S
    rate = base * SAMPLE_HEAD_EVALS / evals / flops_ratio
    what = "compiled head" if s.compile_head else "eager"
    if evals == SAMPLE_HEAD_EVALS and math.isclose(flops_ratio, 1.0):
        return Figure(rate, f"measured: SAR-B, {evals} head evaluations a token, {what}, one H100 (docs/benchmarks.md)")
    return Figure(rate, f"projected: SAR-B's measured {base} images/s ({what}) at {SAMPLE_HEAD_EVALS} head evaluations "
                        f"a token, x {SAMPLE_HEAD_EVALS}/{evals} evaluations" +
                        (f", / {flops_ratio:.2f} (this model's FLOPs over SAR-B's)" if flops_ratio != 1 else ""))


def encode_rate(cfg: Any, given: float | None) -> Figure | None:
    if given:
        return Figure(given, "given: --encode-rate")
    if cfg.encode.encoder != "kl-vae" or cfg.encode.image_size != 256:
        return None
    return Figure(H100_BF16_FLOPS * SAR_B_MFU / (2 * KL16_ENCODE_FLOPS),
                  f"projected: kl16's {KL16_ENCODE_FLOPS / 1e9:.1f} GFLOP an image, x 2 (image and flip), at SAR-B's "
                  f"measured {100 * SAR_B_MFU:.1f}% MFU (never timed on a GPU; JPEG decoding on the CPUs may bind first)")


def make_plan(cfg: Any, manifest: dict | None, *, gpus: list[int] | None = None, gpus_per_node: int = 8,
              rates: dict[str, float | None] | None = None, title: str | None = None) -> Plan:
    """The plan of `cfg` (jobs/config.py's PipelineConfig, read as attributes) on its dataset (`manifest`,
    None before encoding); `rates` overrides the per-GPU rates by stage name."""

    rates = rates or {}
    rows = dataset_rows(cfg, manifest)
    n = int(rows.value)
    # What the manifest says, the config's projection where it says nothing (an older manifest's gaps).
    header = {**projected_header(cfg), "num_classes": cfg.data.classes or NUM_CLASSES, **(manifest or {})}
    model = meta_model(build_model_config(cfg.model, header))
    params, flops = count_parameters(model), train_flops_per_image(model)
    b_flops = measured_flops()

    stored = row_bytes(header, header["columns"])
    if manifest is not None and manifest.get("shards"):
        shards = Figure(len(manifest["shards"]), "dataset: the manifest")
        total = sum(int(s["bytes"]) for s in manifest["shards"])
        latents = Figure(total, "dataset: the manifest's shards (Parquet, as stored)")
        stored_row = Figure(total / max(n, 1), f"dataset: {size(stored)} uncompressed in {header['dtype']}")
    else:
        shards = Figure(math.ceil(n / cfg.encode.shard_rows), "projected: rows / encode.shard_rows")
        latents = Figure(n * stored, f"projected: rows x {size(stored)}, uncompressed (Parquet's dictionary encoding "
                                     f"stored `sar synth-latents` rows in {SYNTH_STORED_SHARE:g} of it)")
        stored_row = Figure(stored, f"projected: every column, uncompressed in {header['dtype']}")
    train_columns = [c for c in TRAIN_COLUMNS if c in header["columns"]]

    steps = {s: resolve_length(getattr(cfg, s), n).steps for s in ("pretrain", "refine")}
    batch = {s: getattr(cfg, s).global_batch for s in ("pretrain", "refine")}
    num_classes = cfg.sample.num_classes or (manifest or {}).get("num_classes") or cfg.data.classes or NUM_CLASSES
    samples = cfg.sample.per_class * num_classes
    pretrain = train_rate(flops, b_flops, rates.get("pretrain"))
    stages = [StageWork("encode", n, "rows", encode_rate(cfg, rates.get("encode"))),
              StageWork("pretrain", steps["pretrain"] * batch["pretrain"], "images", pretrain),
              StageWork("refine", steps["refine"] * batch["refine"], "images",
                        refine_rate(cfg, pretrain, rates.get("refine"))),
              StageWork("sample", samples, "images", sample_rate(cfg, flops / b_flops, rates.get("sample")))]

    reader = cfg.data.reader
    if reader == "auto":
        reader = "memory" if 0 < latents.value <= DRIVER_READ_MAX else "stream"
    world = max(cfg.pretrain.num_workers, 1)
    requests = 2 * int(shards.value) + 2 * (world - 1) if reader == "stream" else int(shards.value)
    notes = []
    if reader == "memory":
        notes.append("data.reader auto: memory, by size alone (past a quarter of the object store it streams)")
    gpus = sorted(set(gpus or [max(cfg.pretrain.num_workers, 1)]))
    title = title or (f"plan: {cfg.model.preset} ({params / 1e6:,.1f}M parameters, {gflop(flops)} a "
                      f"training image), {cfg.model.grouping} on {'x'.join(map(str, header['grid']))} x "
                      f"{header['token_dim']} {header['encoder']} tokens ({header['dtype']}), run_dir "
                      f"{storage.redact(cfg.run_dir)}")
    return Plan(title=title, rows=rows, shards=shards, stored_row_bytes=stored_row,
                train_row_bytes=row_bytes(header, train_columns), latents_bytes=latents, parameters=params,
                flops_per_image=flops, checkpoint_bytes=params * CHECKPOINT_BYTES_PER_PARAMETER,
                keep_checkpoints={s: getattr(cfg, s).keep_checkpoints for s in ("pretrain", "refine")},
                steps=steps, global_batch=batch, samples=samples, stages=stages, gpus=gpus,
                gpus_per_node=gpus_per_node, reader=reader, requests_per_epoch=requests, notes=notes)


def plan_of(cfg: Any, **options: Any) -> Plan:
    """The plan of `cfg` on its latents when they exist (their manifest), else on the config's stated size;
    `options` as make_plan's."""
    so = cfg.data.storage_options
    exists = storage.exists(storage.join(cfg.latents_dir, MANIFEST), so)
    return make_plan(cfg, read_manifest(cfg.latents_dir, so) if exists else None, **options)
