"""Typed configuration of every stage and of the whole pipeline.

One pydantic model per stage; `PipelineConfig` holds them all. Defaults are the papers'
reference run (SAR on ImageNet 256, KL-VAE latents, 16x16 tokens); the source of each
non-obvious value is in the comment beside it. Unknown keys are errors everywhere.

The key names `run_dir`, `data.source`, `encode.encoder`, `encode.image_size`,
`pretrain.steps`, `pretrain.checkpoint_every`, `refine.gamma`, `sample.output` and
`fid.inception_weights` are fixed: scripts, schedules and the cluster manifests use them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from jobs.stages import BY_NAME, NAMES
from models.choices import GROUPINGS, GUIDANCE_KINDS, SCALE_SCHEDULES, SOLVERS
from pipelines.core import storage
from pipelines.core.storage import redact

# Fields that hold a location (local path or URL).
PATH_FIELDS = ("run_dir", "data.source", "encode.weights", "encode.output", "pretrain.output", "refine.output",
               "refine.init", "sample.output", "sample.checkpoint", "fid.output", "fid.samples", "fid.reference",
               "fid.inception_weights", "fid.domain.path")


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the field and value."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    """Where the images come from."""

    source: str = "data/imagenet"  # folder or URL (s3://bucket/imagenet) in the ImageNet layout
    split: Literal["train", "val"] = "train"
    classes: int | None = Field(None, ge=1)  # first N classes only (smoke runs)
    per_class: int | None = Field(None, ge=1)  # at most M images per class (smoke runs)
    # Train on each image or its horizontal flip, chosen per example (DiT / MAR on ImageNet).
    # Off for data a mirror changes (digits, text, asymmetric classes).
    hflip: bool = True
    # How training reads the latents (pipelines/train/driver.py: training_dataset). memory: the stage's
    # process reads them once into Ray's object store (small datasets); stream: each Train worker reads
    # its own part of every epoch from the shards (pipelines/data/stream.py: every row once per epoch,
    # a killed run resumes at its row); auto: memory up to 256 MiB of shards that fit in a quarter of
    # the object store, else stream.
    reader: Literal["auto", "memory", "stream"] = "auto"
    # stream: rows shuffled together in a worker's buffer; its memory is about 3 x this x a row's bytes
    # plus decode buffers (KL-16 latents, 32 KB a row: ~600 MiB measured at 4096, ~360 MiB at 1024,
    # whatever the dataset's size). Shards are shuffled as well, every epoch.
    shuffle_buffer_rows: int = Field(4096, ge=1)
    # Images in the source, for `sar plan` before the latents exist; None: ImageNet-1k's split
    # (1,281,167 train, 50,000 val), or classes x per_class when both are set.
    num_images: int | None = Field(None, ge=1)
    # fsspec options for `source` and every output (endpoint, key, profile, anon). Values
    # are never logged or written into outputs; prefer the standard AWS environment.
    storage_options: dict[str, Any] = Field(default_factory=dict)


class EncodeConfig(_Section):
    """Images to multi-scale, grouped latents in Parquet (pipelines/data/encode.py)."""

    encoder: Literal["raw", "kl-vae", "wan"] = "kl-vae"  # paper's main space: KL-VAE, Table 3
    weights: str | None = None  # diffusers folder or LDM .ckpt/.safetensors; local or object store
    image_size: int = Field(256, ge=8)
    # Patch size over the encoder's output grid. None picks the paper's (Table 3): raw 16,
    # kl-vae (stride 16) 1, wan (stride 8) 2, so every space gives 16x16 tokens at 256 px.
    patch: int | None = Field(None, ge=1)
    # Latent scale; None takes it from the VAE's own config (MAR's kl16: 0.2325).
    scale_factor: float | None = Field(None, gt=0)
    output: str | None = None  # default {run_dir}/latents
    shard_rows: int = Field(1024, ge=1)
    storage_dtype: Literal["float16", "float32", "bfloat16"] = "float16"
    batch_size: int = Field(64, ge=1)  # images per encoder call
    num_actors: int = Field(1, ge=1)  # encoder actor-pool size
    gpus_per_actor: float = Field(1.0, ge=0)  # used only when the cluster has GPUs
    read_parallelism: int = Field(-1, ge=-1, description="-1: Ray Data decides")

    @field_validator("read_parallelism")
    @classmethod
    def _parallelism(cls, v: int) -> int:
        if v == 0:
            raise ValueError("-1 (Ray Data decides) or a number of blocks >= 1")
        return v


class ModelConfig(_Section):
    """The self-token-prediction transformer (models/)."""

    preset: str = "sar-b"  # models.PRESETS: tiny, small, sar-b, sar-l, sar-h
    grouping: Literal[GROUPINGS] = "next-neighbour"  # Agg_AVG, 31 steps: paper Table 1 / Table 4
    # next-scale schedule: sides, e.g. [1, 2, 4, 8, 16], or a name resolved for the token grid:
    # 'powers-of-two', or 'var-10' (VAR / FlexVAR's 10 scales, the refinement paper's "Step 10")
    scales: list[int] | str | None = None
    overrides: dict[str, Any] = Field(default_factory=dict)  # any models.SARConfig field

    @field_validator("scales")
    @classmethod
    def _known_schedule(cls, v: list[int] | str | None) -> list[int] | str | None:
        if isinstance(v, str) and v not in SCALE_SCHEDULES:
            raise ValueError(f"unknown scale schedule; give a list of sides or one of {', '.join(SCALE_SCHEDULES)}")
        return v

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, v: str) -> str:
        from models import PRESETS

        if v not in PRESETS:
            raise ValueError(f"unknown preset; choose from {', '.join(sorted(PRESETS))}")
        return v

    @field_validator("overrides")
    @classmethod
    def _known_fields(cls, v: dict[str, Any]) -> dict[str, Any]:
        from models import SARConfig

        SARConfig.check_fields(v)
        return v


def _custom_resources(resources: dict[str, float], instead: str) -> dict[str, float]:
    """A custom-resource request: no CPU / GPU / memory key (other fields size those), no negative amount."""
    for name, amount in resources.items():
        if name in ("CPU", "GPU", "memory"):
            raise ValueError(f"{name!r} is not a custom resource; {instead} size it")
        if amount < 0:
            raise ValueError(f"{name!r}: a resource amount cannot be negative")
    return resources


class OptimConfig(_Section):
    """AdamW and its schedule."""

    lr: float = Field(8e-4, gt=0)  # MAR: base lr 1e-4 x (batch 2048 / 256)
    betas: tuple[float, float] = (0.9, 0.95)  # MAR and the refinement paper (Sec. 5)
    weight_decay: float = Field(0.02, ge=0)  # MAR
    warmup_steps: int = Field(62_500, ge=0)  # MAR: 100 epochs at batch 2048 on 1.28M images
    schedule: Literal["constant", "cosine"] = "constant"  # MAR keeps lr constant after warm-up
    grad_clip: float = Field(3.0, gt=0)  # MAR
    # none: `lr` as given; linear-256: lr x global_batch / 256, the rule of MAR's and the refinement
    # code's launchers (a base lr per 256 images; the released SAR code's trainer: 1e-4 at 256).
    lr_scaling: Literal["none", "linear-256"] = "none"

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in v):  # AdamW's moment decays: 1 or more never forgets
            raise ValueError("each of the two betas must be in [0, 1)")
        return v


class TrainConfig(_Section):
    """What pretrain and refine share: Ray Train, batch, checkpoints, precision."""

    steps: int | None = Field(250_000, ge=1)  # MAR: 400 epochs at batch 2048; None: from `epochs`
    epochs: float | None = Field(None, gt=0)  # passes over the dataset; used when steps is None
    # With `epochs`: at least this many steps, however small the dataset. A smaller set needs about
    # as many optimizer updates as a larger one, not as many passes: the UCI digits (1,340 images)
    # at MNIST's 48 epochs (2,010 steps) scored a domain FID 7x the one at MNIST's 6,000 steps
    # (docs/benchmarks.md, "A second real set"). An explicit `steps` wins. None: no minimum.
    min_steps: int | None = Field(None, ge=1)
    global_batch: int = Field(2048, ge=1)  # MAR
    micro_batch: int = Field(64, ge=1)  # per worker per forward; accumulation fills global_batch
    checkpoint_every: int = Field(5000, ge=1)
    keep_checkpoints: int = Field(3, ge=1)
    # On SIGTERM or SIGINT the run stops after its current step and saves a checkpoint when the newest
    # one is older than this (seconds of training): a save takes part of the grace period before
    # SIGKILL (docs/cluster.md, "Stopping"), and redoing under a minute of steps is cheaper. 0: always.
    checkpoint_on_stop_after_s: float = Field(60.0, ge=0)
    log_every: int = Field(50, ge=1)
    # Every N steps, sample eval_per_class images of every class with the EMA weights and score them
    # with fid.evaluator (pipelines/evaluate/during_training.py); None: no evaluation during training.
    eval_every: int | None = Field(None, ge=1)
    eval_per_class: int = Field(4, ge=1)
    ema_decay: float | None = Field(0.9999, ge=0, lt=1)  # MAR; None: from the run's length (see RefineConfig)
    seed: int = 0
    precision: Literal["bf16", "fp32"] = "bf16"  # bf16 autocast on GPU; CPU runs fp32
    # ddp: replicated weights (SAR-B); fsdp: FSDP2 fully_shard per block, for SAR-L/H. Checkpoints
    # are gathered to full state dicts (torch.distributed.checkpoint.state_dict), so any
    # strategy or worker count can load them.
    strategy: Literal["ddp", "fsdp"] = "ddp"
    compile: bool = False
    num_workers: int = Field(1, ge=0)  # Ray Train workers; 0 = local mode in this process
    use_gpu: bool | None = None  # None: use GPUs when the cluster has them
    cpus_per_worker: float = Field(1.0, gt=0)
    # Where the workers go: the strategy of the worker group's Ray placement group. PACK (Ray's
    # default) fills one node before the next; SPREAD puts the workers on distinct nodes while there
    # are nodes to spare and packs them onto the survivors when one is lost (a restart after a node
    # failure still starts); STRICT_SPREAD waits for one node per worker. docs/cluster.md compares them.
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    # Custom resources each worker reserves on top of CPU / GPU, to keep training on the nodes that
    # advertise them (`ray start --resources '{"trainer": 8}'`). {} reserves none.
    resources_per_worker: dict[str, float] = Field(default_factory=dict)
    max_failures: int = Field(3, ge=-1)
    output: str | None = None
    allow_config_change: bool = False  # let a run directory continue under a changed config
    optim: OptimConfig = Field(default_factory=OptimConfig)

    @field_validator("resources_per_worker")
    @classmethod
    def _custom_resources_only(cls, v: dict[str, float]) -> dict[str, float]:
        return _custom_resources(v, "cpus_per_worker and use_gpu")

    @model_validator(mode="after")
    def _has_a_length(self) -> "TrainConfig":
        if self.steps is None and self.epochs is None:
            raise ValueError("set steps or epochs")
        return self

    @model_validator(mode="after")
    def _batch_divides(self) -> "TrainConfig":
        per_step = self.micro_batch * max(self.num_workers, 1)
        if self.global_batch % per_step:
            raise ValueError(f"global_batch {self.global_batch} is not a multiple of micro_batch {self.micro_batch} "
                             f"x {max(self.num_workers, 1)} workers")
        return self


class PretrainConfig(TrainConfig):
    """Self-token pretraining (jobs/pretrain)."""


class RefineOptimConfig(OptimConfig):
    """Refinement's AdamW (the refinement paper, Sec. 5: betas 0.9/0.95, weight decay 0.05, lr 1e-4, no
    warm-up): its own defaults, so overriding one field keeps the others."""

    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    warmup_steps: int = Field(0, ge=0)


class RefineConfig(TrainConfig):
    """Self-autoregressive refinement (jobs/refine)."""

    # Refinement paper Sec. 5.1: 10 epochs from the pretrained checkpoint (~6,256 steps of ImageNet's
    # 1,281,167 images at global_batch 2048); the steps are derived from the dataset when the run starts.
    steps: int | None = Field(None, ge=1)
    epochs: float | None = Field(10.0, gt=0)
    # None: derived from the length, d = 0.05 ** (1 / steps), so the EMA sampled after the run holds at
    # most 5% of the starting weights (pretrain's 0.9999 over 6,256 steps would keep 53% of them and
    # hide the refinement from evaluation); ~0.9995 on ImageNet.
    ema_decay: float | None = Field(None, ge=0, lt=1)
    optim: RefineOptimConfig = Field(default_factory=RefineOptimConfig)
    # L = L_TF + gamma * L_CSF (eq. 11). The authors' released recipe uses 0.01 (on a cross-entropy loss);
    # 0.1 from the refine table (docs/benchmarks.md, MNIST test): gamma 1 collapsed both rollouts at
    # next-scale and did no better than the control at next-neighbour.
    gamma: float = Field(0.1, ge=0)
    # Where refinement starts: a checkpoint's location; a pretraining step (an int: the pretrain
    # checkpoint of that step); or a fraction of pretraining (a float in (0, 1): the newest pretrain
    # checkpoint at or before that share of pretrain.steps), so refinement can replace the last epochs
    # of a pretraining run as the released code does (FlexVAR-d16 resumed at epoch 170 of 180) and a
    # control can continue the same checkpoint without it. None: the newest pretrain checkpoint.
    init: str | int | float | None = None
    init_weights: Literal["ema", "raw"] = "ema"
    # The sample step between the passes (refinement paper Table 5: CFG sampling is best, FID 2.89).
    # deterministic: the head's conditional mean (one evaluation from e = 0), the argmax analogue;
    # stochastic: the ODE from fresh noise; cfg: that ODE under classifier-free guidance, whose
    # unconditional backbone pass (no gradient) makes the step cost two extra backbone forwards;
    # x_cfg: head-only guidance (the head at z and at 0), one extra backbone forward.
    # cfg_ramped: the released code's sampled target (trainer.py, mode csfl): the ODE under CFG whose
    # weight grows over the groups, w_g = 1 + cfg_scale / 2 (1 + g / (T - 1)), i.e. (1 + t) c - t u.
    sample_mode: Literal["deterministic", "stochastic", "cfg", "x_cfg", "cfg_ramped"] = "cfg"
    sample_steps: int = Field(10, ge=1)  # ODE steps of the sample step
    cfg_scale: float = Field(2.5, ge=1)  # Table 5's CFG scale (cfg_ramped: the released code's sf_cfg_scale, 2.5)
    x_cfg_scale: float = Field(1.25, ge=1)  # self-token paper Table 2: the best x-CFG weight alone
    target: Literal["teacher", "ground_truth"] = "teacher"  # eq. 10 vs Algorithm 1
    group: int | None = None  # CSFL on one group only; None = all groups
    # Which groups pass 2 rolls out. all: every group's inputs rebuilt from the predictions, CSFL on
    # groups 2..T (the refinement paper, Algorithm 1); second-to-last: the prediction of the
    # second-to-last group alone feeds the last one, CSFL on the last group (the released code's one
    # scale, trainer.py mode csfl); random-one: a group k drawn per step feeds group k + 1.
    # Default second-to-last, from this project's measurement (docs/benchmarks.md, refinement against
    # its control, MNIST test, 2 training seeds): it never fell behind the control and beat it at
    # next-scale on one seed, where all groups fell behind it in every grouping and seed (and
    # collapsed at gamma 1); its step costs 1.9x a pretraining step against 3.4x at the MNIST config.
    rollout_groups: Literal["all", "second-to-last", "random-one"] = "second-to-last"
    # How CSFL's per-token losses combine: mean over the rolled-out tokens, or sum over the groups of
    # each group's mean (eq. 10 sums over i = 2..N; gamma then weighs T - 1 terms, not one).
    loss_reduction: Literal["mean", "sum"] = "mean"
    # Share of each micro-batch (its first ceil(f B) examples) that takes the sample step, pass 2 and
    # CSFL. 1.0 is the papers' algorithm. Below 1 it is an approximation: L_CSF is estimated on fewer
    # examples (the same objective in expectation, more variance) and pass 2 costs f of pass 1: a
    # refine step costs ~2x a pretrain step at 1.0, ~1.5x at 0.5 (docs/benchmarks.md, 16x16 on CPU).
    rollout_fraction: float = Field(1.0, gt=0, le=1)

    @field_validator("init", mode="before")
    @classmethod
    def _init_is_a_place_step_or_fraction(cls, v: str | int | float | None) -> str | int | float | None:
        if isinstance(v, bool):
            raise ValueError("a checkpoint location, a pretraining step or a fraction of pretraining")
        if isinstance(v, int) and v < 1:
            raise ValueError("a pretraining step is at least 1")
        if isinstance(v, float) and not 0 < v < 1:
            raise ValueError("a fraction of pretraining is in (0, 1)")
        return v


class GuidanceConfig(_Section):
    """Guidance at sampling time (paper Table 2: x-CFG 1.25 + z-CFG 2.7 is best)."""

    kind: Literal[GUIDANCE_KINDS] = "xz_cfg"
    cfg: float = Field(3.5, ge=0)  # Table 2, standard CFG
    w_x: float = Field(1.25, ge=0)  # Table 2
    w_z: float = Field(2.7, ge=0)  # Table 2
    ramp: bool = False


class SampleConfig(_Section):
    """Generation of the evaluation set (jobs/sample)."""

    output: str | None = None  # default {run_dir}/samples
    checkpoint: str | None = None  # default: latest refine, else latest pretrain
    weights: Literal["ema", "raw"] = "ema"
    per_class: int = Field(50, ge=1)  # 50 x 1000 classes = 50,000 (ADM protocol)
    num_classes: int | None = Field(None, ge=1)  # None: all classes of the dataset
    seed: int = 0
    guidance: GuidanceConfig = Field(default_factory=GuidanceConfig)
    flow_steps: int = Field(50, ge=1)  # ODE steps (DDPM head: respaced ancestral steps, MAR)
    # ODE solver of the flow head: euler (DESIGN 3), heun (EDM, Karras et al. 2022) or midpoint;
    # both 2nd order at two head evaluations per step, so 25 Heun steps cost 50 Euler steps.
    solver: Literal[SOLVERS] = "euler"
    # MAR's sampling temperature: the flow ODE starts from temperature x noise, the DDPM head
    # scales each ancestral step's noise (MAR's p_sample). 1.0 samples the model as trained.
    temperature: float = Field(1.0, ge=0)
    compile_head: bool = False  # CUDA only: the head's sampling steps under torch.compile with CUDA graphs
    batch_size: int = Field(64, ge=1)
    # Images per decoder call: the decode runs in chunks, so the decoder's activations (not the
    # sampling batch) bound its memory; the images do not depend on it.
    decode_batch: int = Field(64, ge=1)
    num_actors: int = Field(1, ge=1)
    gpus_per_actor: float = Field(1.0, ge=0)
    # Custom resources each sampling actor reserves, to keep the pool on the nodes that advertise
    # them. Ray Data already spreads the actors over the nodes that fit them.
    resources_per_actor: dict[str, float] = Field(default_factory=dict)
    format: Literal["png", "npz"] = "png"
    npz_shard: int = Field(1000, ge=1)

    @field_validator("resources_per_actor")
    @classmethod
    def _custom_resources_only(cls, v: dict[str, float]) -> dict[str, float]:
        return _custom_resources(v, "gpus_per_actor")


class DomainEvaluatorConfig(_Section):
    """The domain evaluator (pipelines/evaluate/domain.py): a small classifier of the dataset's own images
    whose features stand in for Inception's where Inception's weights cannot be had (offline)."""

    path: str | None = None  # default {run_dir}/evaluator.pt; trained from data.source when missing
    image_size: int | None = Field(None, ge=16)  # None: encode.image_size
    epochs: int = Field(20, ge=1)  # 20 reach 100% held-out accuracy on the demo's synthetic set
    batch_size: int = Field(32, ge=1)
    holdout_fraction: float = Field(0.2, gt=0, lt=1)  # per class, never trained on: its own accuracy
    hflip: bool = False  # flip augmentation; off: an evaluator blind to flips cannot see a mirrored class
    # The protocol of docs/benchmarks.md (Quality): samples are scored against the real images of
    # `reference_split` (chosen settings are tuned against it), and the floor is real images of
    # `floor_split` against the same reference at the samples' set size (FID's bias depends on the set
    # sizes, so only equal sizes compare). A split the source lacks falls back to the evaluator's
    # held-out training images (half of them each when both are missing).
    reference_split: str = "val"
    floor_split: str | None = "test"


class FidConfig(_Section):
    """Scoring with torch-fidelity (jobs/fid)."""

    # inception: torch-fidelity's Inception (the papers' FID); domain: the domain evaluator's
    # FID / KID / precision / recall and the class accuracy of the samples, which need no download.
    evaluator: Literal["inception", "domain"] = "inception"
    domain: DomainEvaluatorConfig = Field(default_factory=DomainEvaluatorConfig)
    output: str | None = None  # default {run_dir}/eval
    samples: str | None = None  # default: sample.output
    # Statistics file (ADM's VIRTUAL_imagenet256_labeled.npz mu/sigma) or a reference folder.
    reference: str | None = None
    inception_weights: str | None = None  # local or object-store path; None: torch-fidelity's download
    # Without weights and without network: 'error' stops; 'skip' (the demo) writes metrics.json
    # saying that no Inception metric was computed and why, and keeps everything else.
    on_missing_weights: Literal["error", "skip"] = "error"
    isc: bool = True
    prc: bool = True
    batch_size: int = Field(64, ge=1)
    grid_classes: int = Field(10, ge=1)
    grid_per_class: int = Field(8, ge=1)


class TrackingConfig(_Section):
    """Where runs are recorded (pipelines/core/tracking.py) and how often progress is written."""

    backend: Literal["mlflow", "none"] = "mlflow"
    # None: the embedded SQLite store under {run_dir}/mlflow/ (tracking.default_uri). A server
    # (http://host:5000) for multi-node training; credentials in the URL are never written out.
    uri: str | None = None
    experiment: str = "sar"
    # Seconds between progress lines of encode, sample and training when the output is a log,
    # not a terminal (a terminal gets one redrawn line).
    progress_interval_s: float = Field(30.0, gt=0)


class ClusterConfig(_Section):
    """Where the Ray program runs."""

    address: str | None = None  # None: RAY_ADDRESS or a local Ray
    num_cpus: int | None = Field(None, ge=1)  # local Ray only
    object_store_memory: int | None = Field(None, ge=1)  # bytes, local Ray only
    runtime_env: dict[str, Any] = Field(default_factory=dict)
    # A local Ray starts without its dashboard (a web server and its modules, seconds of start-up);
    # true starts it at http://127.0.0.1:8265.
    dashboard: bool = False
    # Writer leases (pipelines/core/lease.py): one process at a time writes a stage's output. A lease
    # not renewed for lease_ttl_s is taken over (its holder died); a second writer waits up to
    # lease_wait_s for the first to finish, then refuses with exit status 75.
    lease_ttl_s: float = Field(60.0, ge=5)
    lease_wait_s: float = Field(0.0, ge=0)


def _output(stage: str) -> property:
    """A stage's output location (PipelineConfig.output_of) as a property."""
    return property(lambda self: self.output_of(stage),
                    doc=f"{BY_NAME[stage].section}.output, else {{run_dir}}/{BY_NAME[stage].folder}")


class PipelineConfig(_Section):
    """The whole pipeline; each stage's output defaults to a folder of `run_dir`."""

    run_dir: str = "runs/default"
    data: DataConfig = Field(default_factory=DataConfig)
    encode: EncodeConfig = Field(default_factory=EncodeConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    refine: RefineConfig = Field(default_factory=RefineConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)
    fid: FidConfig = Field(default_factory=FidConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    # Settings whose default changed after they were added: what a run folder bound before the
    # setting existed ran with (pipelines/train/driver.py `fingerprints`). A binding lacking the key
    # counts as this value, not as today's default.
    BEFORE_SETTING_EXISTED: ClassVar[dict[str, dict[str, Any]]] = {"refine": {"rollout_groups": "all"}}

    @field_validator("run_dir")
    @classmethod
    def _no_trailing_slash(cls, v: str) -> str:
        return v.rstrip("/") or "/"

    @model_validator(mode="after")
    def _real_splits_are_not_trained_on(self) -> "PipelineConfig":
        d = self.fid.domain
        if self.data.split in (d.reference_split, d.floor_split):
            raise ValueError(f"fid.domain: the reference and floor splits must be images the generator does not "
                             f"train on, not data.split {self.data.split!r}")
        if d.reference_split == d.floor_split:
            raise ValueError(f"fid.domain.floor_split: {d.floor_split!r} is the reference split too; the floor "
                             f"needs other real images")
        return self

    @model_validator(mode="after")
    def _check_scales(self) -> "PipelineConfig":
        if self.model.grouping == "next-scale" and not self.model.scales:
            raise ValueError("model.scales: next-scale needs a scale schedule, e.g. [1, 2, 4, 8, 16] or 'var-10'")
        return self

    @model_validator(mode="after")
    def _expand_run_dir(self) -> "PipelineConfig":
        """`{run_dir}` in a path field stands for run_dir (the demo keeps its data beside its run)."""
        for name in PATH_FIELDS[1:]:
            value = self._get(name)
            if isinstance(value, str) and "{run_dir}" in value:
                self._set(name, value.replace("{run_dir}", self.run_dir))
        return self

    def _get(self, dotted: str) -> Any:
        node: Any = self
        for part in dotted.split("."):
            node = getattr(node, part)
        return node

    def _set(self, dotted: str, value: Any) -> None:
        *parents, last = dotted.split(".")
        node: Any = self
        for part in parents:
            node = getattr(node, part)
        object.__setattr__(node, last, value) if node is self else setattr(node, last, value)

    def with_absolute_paths(self) -> "PipelineConfig":
        """A copy whose relative local paths are absolute, so Ray workers (whose working folder
        is not the caller's) find them."""
        cfg = self.model_copy(deep=True)
        for name in PATH_FIELDS:
            value = cfg._get(name)
            if isinstance(value, str) and value and "://" not in value and not os.path.isabs(value):
                cfg._set(name, os.path.abspath(value))
        return cfg

    # Stage outputs: `{section}.output`, else a folder of run_dir (jobs/stages.py) ---------------
    def output_of(self, stage: str) -> str:
        """Where stage `stage` writes: its section's `output`, else `{run_dir}/{its folder}`."""
        s = BY_NAME[stage]
        return getattr(self, s.section).output or f"{self.run_dir}/{s.folder}"

    def outputs(self) -> dict[str, str]:
        """Every stage's output location, in pipeline order."""
        return {name: self.output_of(name) for name in NAMES}

    latents_dir = _output("encode")
    pretrain_dir = _output("pretrain")
    refine_dir = _output("refine")
    samples_dir = _output("sample")
    eval_dir = _output("fid")

    def field_of(self, url: str) -> str | None:
        """The path field a location comes from: the one whose value is the longest prefix of `url`."""
        url, best = redact(url).rstrip("/"), (0, None)
        for name in PATH_FIELDS:
            value = self._get(name)
            if not isinstance(value, str) or not value:
                continue
            value = redact(value).rstrip("/")
            if (url == value or url.startswith(value + "/")) and len(value) > best[0]:
                best = (len(value), name)
        return best[1]

    @property
    def evaluator_path(self) -> str:
        """The domain evaluator file: fid.domain.path, else {run_dir}/evaluator.pt."""
        return self.fid.domain.path or f"{self.run_dir}/evaluator.pt"

    def public_dict(self) -> dict[str, Any]:
        """The resolved config as saved with outputs: storage options and credentials in the
        tracking URI are redacted."""
        d = self.model_dump(mode="json")
        d["data"]["storage_options"] = {k: "<redacted>" for k in d["data"]["storage_options"]}
        if d["tracking"]["uri"]:
            d["tracking"]["uri"] = storage.redact(d["tracking"]["uri"])
        return d


# Loading ---------------------------------------------------------------------------------
def _parse_value(text: str) -> Any:
    """An override's value as YAML (numbers, booleans, lists, null), else the plain string."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_override(tree: dict[str, Any], assignment: str) -> None:
    """Set `dotted.key=value` in a nested dict (the value is parsed as YAML)."""
    key, sep, value = assignment.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {assignment!r}: expected dotted.key=value")
    parts = key.strip().split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {assignment!r}: {'.'.join(parts[: i + 1])} is not a section")
        node = child
    node[parts[-1]] = _parse_value(value)


def _describe(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    if first["type"] == "extra_forbidden":
        return f"unknown config key {loc!r}"
    value = first.get("input")
    msg = first["msg"].removeprefix("Value error, ")
    if not loc:
        return msg
    if isinstance(value, dict) and first["type"] == "value_error":  # a check across a section's fields
        return f"invalid {loc!r}: {msg}"
    shown = json.dumps(value) if isinstance(value, (str, int, float, bool, type(None))) else repr(value)
    return f"invalid value for {loc!r}: {shown} ({msg})"


def _yaml_position(err: yaml.YAMLError) -> str:
    """`:line:column` (1-based) of a YAML error, as editors and compilers print it; "" when unknown."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    return f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""


def _yaml_problem(err: yaml.YAMLError) -> str:
    problem, context = getattr(err, "problem", None), getattr(err, "context", None)
    return " ".join(p for p in (context, problem) if p) or err.__class__.__name__


def config_from_dict(tree: dict[str, Any]) -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_describe(err)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Read a YAML config (or the defaults when `path` is None) and apply `--set` overrides."""
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{p}{_yaml_position(err)}: not valid YAML ({_yaml_problem(err)})") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{p}: the top level must be a mapping, got {type(tree).__name__}")
    for assignment in overrides:
        apply_override(tree, assignment)
    return config_from_dict(tree)


def dump_yaml(cfg: PipelineConfig) -> str:
    return yaml.safe_dump(cfg.public_dict(), sort_keys=False)
