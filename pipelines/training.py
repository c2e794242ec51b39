"""The Ray Train loop that pretrain and refine share.

A stage's driver fills a `LoopConfig` and calls `run_training`; every worker then runs
`train_loop`, made of small functions that tests and benchmarks call on their own:

    build_model_config  the SARConfig fields of a run: a preset, the grouping, the dataset's token space
    restore             weights, optimizer state and data position from the newest checkpoint
                        (or, for refine, the weights of the pretrain checkpoint it starts from)
    prepare             device, FSDP2 sharding or DDP, optimizer and warm-up schedule, EMA
    step_batches        the micro-batches of each optimizer step, epoch after epoch, from a data position
    train_step          one optimizer step over its micro-batches (accumulation, clipping, EMA)
    log_row             the metrics of the steps since the last log, as one row
    save_checkpoint     full (gathered) state to `{stage_dir}/checkpoints/step_N`, then metrics.jsonl
    evaluate_now        in-training evaluation of the EMA weights (pipelines/evaluation.py), to the tracker

Checkpoints go through the storage module (pipelines/checkpoints.py), written by rank 0, in
local mode and on a cluster alike: Ray Train's local mode persists no checkpoints of its own,
so the loop owns persistence and pruning (Ray's `storage_path` keeps its run state beside
them). A restarted worker group (FailureConfig) or a re-launched run resumes from the newest
checkpoint. Metrics go to `ray.train.report`, `{stage_dir}/metrics.jsonl` and, from rank 0, the
stage's MLflow run (pipelines/tracking.py: queued, so a slow store never holds up a step).

The driver holds the stage folder's writer lease (pipelines/lease.py) for the whole run; its
token travels in the LoopConfig. Before each step that writes (a checkpoint, metrics, an
evaluation), rank 0 checks the lease and every rank learns the verdict: a lost lease stops
every worker at that step without writing. The workers return rather than raise, so
FailureConfig does not restart them into the same loss; the driver raises LeaseLost.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.nn as nn

from pipelines import checkpoints, rundir, storage, tracking
from pipelines.errors import DatasetMismatch, SarError
from pipelines.evaluation import EvalSettings, TrainingEvaluator, settings_for, write_evals
from pipelines.latents import (TRAIN_COLUMNS, check_compatible, check_encode_settings, data_bytes, open_latents,
                               read_into_object_store, read_manifest, tokens_from_batch)
from pipelines.lease import LeaseLost, LeaseToken, WriterLease
from pipelines.objectives import Objective, group_buckets, make_objective
from pipelines.plots import plot_curves
from pipelines.progress import Progress

log = logging.getLogger("sar.train")

METRICS = "metrics.jsonl"
PLOT = "loss.png"
LEASE_LOST = "lease_lost"  # the metric by which the workers tell the driver why they stopped


@dataclass
class LoopConfig:
    """Everything one training run needs, made by the stage's driver and shipped to every worker."""

    stage: str                      # "pretrain" | "refine": which objective, which config section
    stage_dir: str                  # checkpoints/, metrics.jsonl, loss.png
    train: Any                      # the stage's config section (jobs.config.TrainConfig / RefineConfig)
    model_config: dict[str, Any]    # SARConfig fields
    token_space: dict[str, Any]     # the dataset's, saved with every checkpoint (sample decodes with it)
    inputs: dict[str, Any]          # digests of what the run consumes, saved with every checkpoint
    run_config: dict[str, Any]      # the resolved public config, saved with every checkpoint
    storage_options: dict[str, Any] = field(default_factory=dict)
    init: tuple[str, str] | None = None  # refine: (pretrain checkpoint URL, "ema" | "raw")
    use_gpu: bool = False
    hflip: bool = True              # data.hflip
    accum: int = 1                  # micro-batches per optimizer step on each worker
    failure_drill: tuple[int, str] | None = None  # (step, marker file): see `failure_drill`
    tracking: dict[str, Any] | None = None  # the stage run's tracking.handoff(): rank 0 logs into it
    progress_interval_s: float = 30.0  # between progress lines in a log (pipelines/progress.py)
    plot: bool = True
    start_step: int = 0             # the newest checkpoint's step when the run was launched
    evaluation: EvalSettings | None = None  # in-training evaluation (pipelines/evaluation.py)
    lease: LeaseToken | None = None  # the driver's writer lease of stage_dir, checked before each write


@dataclass
class LoopState:
    """Where a run is: the step, the data position within the epoch, the logged rows."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)  # in-training evaluations


@dataclass
class Trainer:
    """The live objects of a run on one worker."""

    objective: Objective
    ema: Any                        # torch.optim.swa_utils.AveragedModel
    opt: torch.optim.Optimizer
    sched: Any
    wrapped: nn.Module              # the objective as called: DDP-wrapped and/or compiled
    device: torch.device
    fsdp: bool
    rank: int = 0
    world: int = 1
    grad_clip: float = 1.0
    amp: bool = False               # bf16 autocast (CUDA)
    hflip: bool = True              # train on each image or its flip, chosen per example
    buckets: dict[str, torch.Tensor] = field(default_factory=dict)  # group thirds, for loss_early/middle/late

    @property
    def model(self) -> nn.Module:
        return self.objective.model


# Model and run ---------------------------------------------------------------------------------
def build_model_config(model: Any, manifest: dict[str, Any]) -> dict[str, Any]:
    """The SARConfig fields of a run: the config's model section (preset, grouping, scales,
    overrides) on the dataset's token space."""
    from models import preset_config

    grid = manifest["grid"]
    fields = dict(token_dim=manifest["token_dim"], height=grid[0], width=grid[1],
                  num_classes=manifest.get("num_classes", 1000), grouping=model.grouping, scales=model.scales)
    try:
        return preset_config(model.preset, **{**fields, **model.overrides}).to_dict()
    except ValueError as err:
        raise SarError(f"model: {err}") from None


def check_dataset(manifest: dict[str, Any], model_config: dict[str, Any], where: str) -> None:
    """Refuse a dataset whose token space or grouping differs from the model's, naming both values."""
    try:
        check_compatible(manifest, token_dim=model_config["token_dim"],
                         grid=(model_config["height"], model_config["width"]),
                         grouping=model_config["grouping"], scales=model_config.get("scales"))
    except DatasetMismatch as err:
        raise DatasetMismatch(f"{where}: {err}") from None


def check_resumable(stage_dir: str, model_config: dict[str, Any], storage_options: dict[str, Any]) -> None:
    """A run directory's checkpoints must have the architecture this launch would build."""
    latest = checkpoints.find_latest(stage_dir, storage_options)
    if latest is None:
        return
    saved = checkpoints.read_meta(latest, storage_options)["model_config"]
    for k, v in model_config.items():
        if k in saved and v != saved[k]:
            raise SarError(f"{storage.redact(latest)} was trained with model {k}={saved[k]!r}, this config "
                           f"builds {k}={v!r}; use another run_dir")


# The EMA a refinement is sampled with should hold at most this share of the weights it started
# from when the run ends: its decay is derived from the run's length (RefineConfig.ema_decay).
EMA_START_SHARE = 0.05


def resolve_length(train: Any, num_rows: int) -> Any:
    """The config section with `steps` (from `epochs` when unset) and `ema_decay` (from the length
    when unset: EMA_START_SHARE ** (1 / steps)) filled in for a dataset of `num_rows`."""
    steps = train.steps or max(1, math.ceil(train.epochs * num_rows / train.global_batch))
    decay = train.ema_decay if train.ema_decay is not None else EMA_START_SHARE ** (1 / steps)
    return train.model_copy(update={"steps": steps, "ema_decay": decay})


def check_inputs(cfg: Any, stage: str, model_config: dict[str, Any], manifest: dict[str, Any]) -> None:
    """Refuse latents made with other encode settings or another token space than this run's, and
    warn (once, here) about a warm-up longer than the run; writes nothing, needs no Ray."""
    train = resolve_length(getattr(cfg, stage), manifest["num_rows"])
    where = storage.redact(cfg.latents_dir)
    check_encode_settings(manifest, cfg.encode, where, cfg.data.storage_options)
    check_dataset(manifest, model_config, where)
    if train.optim.warmup_steps > train.steps:
        log.warning("%s.optim.warmup_steps %d is more than %s.steps %d: the whole run is warm-up (the learning "
                    "rate reaches %s.optim.lr only at the last step)", stage, train.optim.warmup_steps, stage,
                    train.steps, stage)


def prepare_run(cfg: Any, stage: str, stage_dir: str, model_config: dict[str, Any], manifest: dict[str, Any],
                inputs: dict[str, Any], init: tuple[str, str] | None = None,
                lease: WriterLease | None = None) -> LoopConfig:
    """Check the dataset and the run directory, bind it to this config, and describe the run.

    `cfg` is the resolved jobs.config.PipelineConfig; nothing here needs Ray, so a wrong
    dataset or a changed config is refused before any worker starts (a stage calls
    `check_inputs` first, before it takes the folder's lease). `lease` is the stage
    folder's writer lease, held by the caller: this run owns the folder, so checkpoints that
    do not load are moved aside (checkpoints.set_aside_corrupt) and the run resumes from the
    newest one that does.
    """
    train, so = resolve_length(getattr(cfg, stage), manifest["num_rows"]), cfg.data.storage_options
    public = cfg.public_dict()
    check_dataset(manifest, model_config, storage.redact(cfg.latents_dir))
    if lease is not None:
        checkpoints.set_aside_corrupt(stage_dir, so)
    check_resumable(stage_dir, model_config, so)
    latest = checkpoints.find_latest(stage_dir, so)
    rundir.bind_run_dir(stage_dir, rundir.config_fingerprint(public, stage), stage, train.allow_config_change, so)
    return LoopConfig(stage=stage, stage_dir=stage_dir, train=train, model_config=model_config,
                      token_space=checkpoints.token_space(manifest), inputs=inputs, run_config=public,
                      storage_options=so, init=init, hflip=cfg.data.hflip,
                      accum=train.global_batch // (train.micro_batch * max(train.num_workers, 1)),
                      failure_drill=failure_drill_from_env(),
                      start_step=checkpoints.read_meta(latest, so)["step"] if latest else 0,
                      evaluation=settings_for(cfg, stage, manifest), lease=lease.token() if lease else None)


def write_record(loop: LoopConfig, started: str, seconds: float, latest: str | None) -> None:
    """`{stage_dir}/_stage.json` of a finished launch: its images, inputs and final checkpoint."""
    meta = checkpoints.read_meta(latest, loop.storage_options) if latest else {"step": 0}
    rundir.write_stage_record(
        loop.stage_dir, loop.stage, started=started, seconds=seconds,
        images=(meta["step"] - loop.start_step) * loop.train.global_batch, inputs=loop.inputs,
        outputs={"checkpoint": meta.get("digest"), "step": meta["step"]}, storage_options=loop.storage_options)


def training_status(cfg: Any, stage: str, stage_dir: str, inputs: dict[str, Any]) -> rundir.StageStatus:
    """Up to date when the newest checkpoint reached the run's length from these inputs under this config."""
    storage_options = cfg.data.storage_options
    if inputs.get("latents") is None:
        return rundir.StageStatus(False, "no latents yet")
    steps = resolve_length(getattr(cfg, stage), read_manifest(cfg.latents_dir, storage_options)["num_rows"]).steps
    fingerprint = rundir.config_fingerprint(cfg.public_dict(), stage)
    latest = checkpoints.find_latest(stage_dir, storage_options)
    if latest is None:
        return rundir.StageStatus(False, "no checkpoint")
    meta = checkpoints.read_meta(latest, storage_options)
    if meta.get("inputs") != inputs:
        return rundir.StageStatus(False, "made from other inputs (its inputs changed)", stale=True)
    bound = rundir.bound_fingerprint(stage_dir, storage_options)
    if bound is not None and bound != fingerprint:
        return rundir.StageStatus(False, "made from other inputs (its config changed)", stale=True)
    if meta["step"] < steps:
        return rundir.StageStatus(False, f"at step {meta['step']} of {steps}")
    return rundir.StageStatus(True, f"step {meta['step']}, inputs unchanged")


# Optimisation ----------------------------------------------------------------------------------
def make_optimizer(model: nn.Module, train: Any) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases, norms and embeddings (1-D or named embeddings), as MAR."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "embed" in name or "token" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": train.optim.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=train.optim.lr, betas=tuple(train.optim.betas))


def make_scheduler(opt: torch.optim.Optimizer, train: Any) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warm-up, then constant or cosine, from torch's own schedulers."""
    from torch.optim import lr_scheduler as S

    warm = min(train.optim.warmup_steps, train.steps)
    rest = max(train.steps - warm, 1)
    main = (S.CosineAnnealingLR(opt, T_max=rest) if train.optim.schedule == "cosine"
            else S.ConstantLR(opt, factor=1.0, total_iters=0))
    if warm == 0:
        return main
    return S.SequentialLR(opt, [S.LinearLR(opt, start_factor=1.0 / warm, total_iters=warm), main], milestones=[warm])


def make_ema(model: nn.Module, decay: float, use_buffers: bool = True) -> torch.optim.swa_utils.AveragedModel:
    """torch's own EMA (AveragedModel with the EMA averaging function).

    Under FSDP the buffers (fixed position tables) stay out of the average: they are plain
    tensors while the sharded parameters are DTensors, and one foreach update cannot mix them.
    """
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=use_buffers)


def fsdp_shard(module: nn.Module, backbone: nn.Module) -> None:
    """FSDP2: each transformer block its own unit, then the rest under the root."""
    from torch.distributed.fsdp import fully_shard

    for block in backbone.blocks:
        fully_shard(block)
    fully_shard(module)


def full_state(t: Trainer) -> tuple[dict, dict, dict]:
    """Unsharded model, EMA and optimizer state (a collective under FSDP: every rank calls it)."""
    if not t.fsdp:
        return t.model.state_dict(), t.ema.module.state_dict(), t.opt.state_dict()
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return (get_model_state_dict(t.model, options=full), get_model_state_dict(t.ema.module, options=full),
            get_optimizer_state_dict(t.objective, t.opt, options=full))


def load_optimizer(t: Trainer, state: dict) -> None:
    if not t.fsdp:
        t.opt.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(t.objective, t.opt, state, options=StateDictOptions(full_state_dict=True))


# Restore, prepare ------------------------------------------------------------------------------
def restore(loop: LoopConfig, model: nn.Module, ema: Any, rank: int = 0) -> tuple[LoopState, dict | None]:
    """Weights and position from the newest checkpoint of this run, or the refine start weights.

    Returns the position and the optimizer/scheduler state to load once the optimizer exists.
    """
    so = loop.storage_options
    resume = checkpoints.find_latest(loop.stage_dir, so)
    if resume is not None:
        state, _ = checkpoints.load_state(resume, so)
        model.load_state_dict(state["model"])
        ema.module.load_state_dict(state["ema"])
        ema.n_averaged.fill_(1)  # continue the average (0 would make the next update a copy)
        st = LoopState(step=state["step"], epoch=state["data"]["epoch"], batch_in_epoch=state["data"]["batch_in_epoch"],
                       history=[h for h in state.get("history", []) if h["step"] <= state["step"]],
                       evals=[e for e in state.get("evals", []) if e["step"] <= state["step"]])
        if rank == 0:
            log.info("resumed from step %d (%s)", st.step, storage.redact(resume))
            print(f"resumed from step {st.step}", flush=True)
        return st, {"optimizer": state["optimizer"], "scheduler": state["scheduler"]}
    if loop.init is not None:  # refine: start from a pretrain checkpoint
        init_url, which = loop.init
        state, _ = checkpoints.load_state(init_url, so)
        weights = state["ema"] if which == "ema" and state.get("ema") is not None else state["model"]
        model.load_state_dict(weights)
        ema.module.load_state_dict(weights)
        ema.n_averaged.fill_(1)
    return LoopState(), None


def prepare(loop: LoopConfig, device: torch.device, rank: int = 0, world: int = 1) -> tuple[Trainer, LoopState]:
    """Model, EMA, restored state, sharding or DDP, optimizer and schedule, on `device`."""
    from models import SARConfig, SARModel

    train = loop.train
    objective = make_objective(loop.stage, SARModel(SARConfig.from_dict(loop.model_config)), train)
    model = objective.model
    fsdp = train.strategy == "fsdp" and world > 1
    ema = make_ema(model, train.ema_decay, use_buffers=not fsdp)  # before sharding: FSDP cannot deep-copy
    st, opt_state = restore(loop, model, ema, rank)
    objective.to(device)
    ema.to(device)
    if fsdp:  # the EMA is sharded like the model, so its update stays shard-local
        fsdp_shard(objective, model.backbone)
        fsdp_shard(ema.module, ema.module.backbone)
    opt = make_optimizer(objective, train)
    sched = make_scheduler(opt, train)
    wrapped: nn.Module = objective
    if world > 1 and not fsdp:
        wrapped = nn.parallel.DistributedDataParallel(
            objective, device_ids=[device.index] if device.type == "cuda" else None)
    if train.compile:
        wrapped = torch.compile(wrapped)
    g = model.grouping
    buckets = {k: v.to(device) for k, v in group_buckets(g.group_index, g.num_groups).items()}
    t = Trainer(objective, ema, opt, sched, wrapped, device, fsdp, rank, world, grad_clip=train.optim.grad_clip,
                amp=device.type == "cuda" and train.precision == "bf16", hflip=loop.hflip, buckets=buckets)
    if opt_state is not None:
        load_optimizer(t, opt_state["optimizer"])
        sched.load_state_dict(opt_state["scheduler"])
    return t, st


# Data -----------------------------------------------------------------------------------------
def epoch_batches(shard, train: Any, epoch: int, rank: int):
    """The micro-batches of one epoch of a worker's shard: a local shuffle buffer seeded by epoch
    and rank, two batches prefetched while the step runs."""
    return shard.iter_torch_batches(batch_size=train.micro_batch, drop_last=True, prefetch_batches=2,
                                    local_shuffle_buffer_size=4 * train.micro_batch,
                                    local_shuffle_seed=train.seed + 1000 * epoch + rank)


def step_batches(shard, train: Any, st: LoopState, rank: int, accum: int) -> Iterator[list[dict]]:
    """The `accum` micro-batches of each optimizer step, epoch after epoch, from the position in `st`.

    A resumed epoch skips the batches it already used. The caller advances
    `st.batch_in_epoch`; this advances the epoch.
    """
    while True:
        batches = epoch_batches(shard, train, st.epoch, rank)
        it = itertools.islice(iter(batches), st.batch_in_epoch * accum, None)  # skip what was used
        while len(micro := list(itertools.islice(it, accum))) == accum:
            yield micro
        if st.batch_in_epoch == 0:
            raise SarError(f"the dataset gives no full batch: micro_batch {train.micro_batch} x accumulation "
                           f"{accum} per worker is more than a worker's share of the rows")
        st.epoch += 1
        st.batch_in_epoch = 0


# One step -------------------------------------------------------------------------------------
def train_step(t: Trainer, micro: list[dict], gen: torch.Generator, window: dict[str, Any],
               log_metrics: bool = True) -> int:
    """One optimizer step over its micro-batches; adds metric sums to `window`; returns images seen.

    Metric sums stay on the device (no host sync per micro-batch); they are read at the log step.
    `log_metrics` False (a step the loop does not log) spares the objective's costly metrics;
    each metric's sum counts the steps it covers, so a mean stays right when some steps lack it.
    """
    t.opt.zero_grad(set_to_none=True)
    accum, images = len(micro), 0
    ddp = isinstance(t.wrapped, nn.parallel.DistributedDataParallel)
    for i, b in enumerate(micro):
        x, labels = tokens_from_batch(b, t.model.grouping, gen, t.device, hflip=t.hflip)
        last = i == accum - 1
        if t.fsdp:  # accumulate locally; reduce-scatter on the last micro-batch only
            t.objective.set_requires_gradient_sync(last)
        sync = contextlib.nullcontext() if last or not ddp else t.wrapped.no_sync()
        with sync, torch.autocast(t.device.type, dtype=torch.bfloat16, enabled=t.amp):
            loss, per_token, metrics = t.wrapped(x, labels, gen, log_metrics=log_metrics)
            (loss / accum).backward()
        with torch.no_grad():
            metrics = {**metrics, "loss": loss.detach()}
            for name, mask in t.buckets.items():
                metrics[f"loss_{name}"] = per_token.detach()[:, mask].mean()
            for k, v in metrics.items():
                add_metric(window, k, v.float() / accum, steps=int(last))
        images += x.shape[0]
    grad_norm = torch.nn.utils.clip_grad_norm_(t.objective.parameters(), t.grad_clip)
    if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
        grad_norm = grad_norm.full_tensor()
    t.opt.step()
    t.sched.step()
    t.ema.update_parameters(t.model)
    add_metric(window, "grad_norm", grad_norm.detach().float(), steps=1)
    return images


def add_metric(window: dict[str, Any], name: str, value: torch.Tensor, steps: int) -> None:
    """Add `value` to the sum of metric `name` in `window` and `steps` to the steps it covers."""
    total, n = window.get(name, (0.0, 0))
    window[name] = (total + value, n + steps)


def log_row(st: LoopState, window: dict[str, Any], seconds: float, wait_s: float,
            images: int, tokens_per_image: int, lr: float) -> dict[str, Any]:
    """The mean metrics of the steps since the last log, the learning rate and the throughput, as one row."""
    return {"step": st.step, "epoch": st.epoch, **{k: float(total) / n for k, (total, n) in window.items()},
            "lr": lr, "images_per_s": images / seconds, "tokens_per_s": images * tokens_per_image / seconds,
            "data_wait_fraction": wait_s / seconds}


def save_checkpoint(t: Trainer, st: LoopState, loop: LoopConfig) -> None:
    """Gather the full state (every rank), then rank 0 writes the checkpoint and metrics.jsonl."""
    model_sd, ema_sd, opt_sd = full_state(t)
    if t.rank != 0:
        return
    state = {"model": model_sd, "ema": ema_sd, "optimizer": opt_sd, "strategy": loop.train.strategy,
             "scheduler": t.sched.state_dict(), "step": st.step,
             "data": {"epoch": st.epoch, "batch_in_epoch": st.batch_in_epoch}, "history": st.history,
             "evals": st.evals}
    meta = {"step": st.step, "stage": loop.stage, "model_config": t.model.config.to_dict(),
            "latents": loop.token_space, "inputs": loop.inputs, "config": loop.run_config}
    so = loop.storage_options
    checkpoints.save(loop.stage_dir, st.step, state, meta, loop.train.keep_checkpoints, so)
    storage.write_text(storage.join(loop.stage_dir, METRICS), "".join(json.dumps(h) + "\n" for h in st.history), so)


def track_evaluation(tracker: tracking.Tracker, loop: LoopConfig, row: dict[str, Any]) -> None:
    """An in-training evaluation to the tracker: its numbers under `eval/`, its grid under `evals/`."""
    tracker.log_metrics(row, prefix="eval/")
    tracker.log_artifact(storage.join(loop.stage_dir, row["grid"]), folder="evals")


def evaluate_now(evaluate: TrainingEvaluator, t: Trainer, st: LoopState, loop: LoopConfig,
                 tracker: tracking.Tracker) -> dict[str, Any]:
    """Score the EMA weights on the fixed evaluation set; the row goes to evals.jsonl and the tracker."""
    row = evaluate(t.ema.module, st.step)
    st.evals.append(row)
    write_evals(loop.stage_dir, st.evals, loop.storage_options)
    track_evaluation(tracker, loop, row)
    shown = " ".join(f"{k}={_fmt(row[k])}" for k in ("fid", "accuracy", "precision", "recall") if row[k] is not None)
    print(f"eval step={st.step} {row['evaluator']} {shown} ({row['num_samples']} samples, {row['seconds']:.1f} s)",
          flush=True)
    return row


def lease_lost(loop: LoopConfig, t: Trainer) -> str | None:
    """Why this run may no longer write its stage folder, the same on every rank; None while it may.

    Rank 0 reads the writer lease (one small read); the verdict is broadcast, so every rank
    stops at the same step and none waits in a collective for one that stopped.
    """
    reason = None
    if t.rank == 0 and loop.lease is not None:
        try:
            loop.lease.check(loop.storage_options)
        except LeaseLost as err:
            reason = str(err)
    if t.world > 1 and torch.distributed.is_initialized():
        verdict = [reason]
        torch.distributed.broadcast_object_list(verdict, src=0, device=t.device if t.device.type == "cuda" else None)
        reason = verdict[0]
    return reason


def failure_drill(drill: tuple[int, str] | None, step: int, rank: int, world: int,
                  storage_options: dict[str, Any] | None = None) -> None:
    """With SAR_FAIL_AT_STEP=N and SAR_FAIL_MARKER=LOCATION set at launch, the last worker exits hard
    once after step N, so an operator (or a test) can watch FailureConfig restart the group.

    The marker that makes it "once" is a storage location: on a cluster an object-store URL, since
    the restarted worker may run on a node that cannot see another node's local file."""
    if not drill:
        return
    at, marker = drill
    if step == at and rank == world - 1 and not storage.exists(marker, storage_options):
        storage.write_bytes(marker, b"", storage_options)
        log.warning("failure drill: worker %d exits after step %d", rank, step)
        os._exit(1)


# The loop -------------------------------------------------------------------------------------
def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def train_loop(loop: LoopConfig, shard=None) -> LoopState:
    """Runs on every Ray Train worker (or in-process in local mode); returns the final position."""
    import ray.train

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = torch.device("cpu")
    if loop.use_gpu and torch.cuda.is_available():
        import ray.train.torch

        device = ray.train.torch.get_device()
    train = loop.train
    torch.manual_seed(train.seed + rank)
    t, st = prepare(loop, device, rank, world)
    shard = shard if shard is not None else ray.train.get_dataset_shard("train")
    gen = torch.Generator().manual_seed(train.seed * 1_000_003 + rank * 7919 + st.step)
    evaluate = None
    if rank == 0 and loop.evaluation is not None:
        evaluate = TrainingEvaluator(loop.evaluation, loop.stage_dir, device, loop.storage_options)

    progress = Progress(train.steps, what="steps", desc=loop.stage, initial=st.step,
                        interval_s=loop.progress_interval_s) if rank == 0 else None
    tracker = tracking.attach(loop.tracking, loop.storage_options) if rank == 0 else tracking.NULL
    for row in st.history:  # after a resume: rows the store lacks are sent, steps it has are dropped
        tracker.log_metrics(row)
    for row in st.evals:
        track_evaluation(tracker, loop, row)

    window: dict[str, Any] = {}  # metric: (sum, steps) since the last log
    t_window, wait_s, images = time.perf_counter(), 0.0, 0
    batches = step_batches(shard, train, st, rank, loop.accum)
    while st.step < train.steps:
        t_data = time.perf_counter()
        micro = next(batches)
        wait_s += time.perf_counter() - t_data
        logs = (st.step + 1) % train.log_every == 0 or st.step + 1 == train.steps
        images += train_step(t, micro, gen, window, log_metrics=logs) * world
        st.step += 1
        st.batch_in_epoch += 1
        if logs:
            row = log_row(st, window, time.perf_counter() - t_window, wait_s, images,
                          t.model.grouping.seq_len, t.sched.get_last_lr()[0])
            st.history.append(row)
            if rank == 0:  # one line per row (a terminal's progress line stays below it)
                progress.write(" ".join(f"{k}={_fmt(v)}" for k, v in row.items()))
                progress.set(st.step)
                tracker.log_metrics(row)
            ray.train.report(row)
            window, t_window, wait_s, images = {}, time.perf_counter(), 0.0, 0
        evaluating = loop.evaluation is not None and (st.step % loop.evaluation.every == 0 or st.step == train.steps)
        saving = st.step % train.checkpoint_every == 0 or st.step == train.steps
        lost = lease_lost(loop, t) if evaluating or saving else None
        if lost:
            log.error("step %d: %s", st.step, lost)
            ray.train.report({"step": st.step, LEASE_LOST: lost})
            return st
        if evaluate is not None and evaluating:
            evaluate_now(evaluate, t, st, loop, tracker)
        if saving:
            save_checkpoint(t, st, loop)
            tracker.sync(wait=False)  # an object-store run directory: mirror the store with the checkpoint
        failure_drill(loop.failure_drill, st.step, rank, world, loop.storage_options)
    if rank == 0:
        progress.close()
    tracker.close()  # sends what is queued; the run itself stays open for the driver to end
    if rank == 0 and loop.plot:
        plot_curves(st.history, storage.join(loop.stage_dir, PLOT), loop.storage_options)
    return st


def _worker(config: dict[str, Any]) -> None:
    """`train_loop_per_worker`: Ray Train passes the config dict."""
    train_loop(config["loop"])


# The driver ------------------------------------------------------------------------------------
# Bytes of Parquet up to which a stage's driver reads the latents itself (see training_dataset).
DRIVER_READ_MAX = 256 << 20


def training_dataset(loop: LoopConfig, latents_url: str, manifest: dict, share: float = 0.25):
    """The Ray Dataset a stage trains on: the training columns of the committed shards.

    A dataset that fits in `share` of the object store is read into it once instead of from
    Parquet at every epoch: each epoch re-executes a streaming dataset, and for a few MB of
    latents that start-up dominated the step (the demo's data-wait fraction fell from ~0.7 to
    ~0). Up to DRIVER_READ_MAX this process reads the shards itself: for small shards Ray Data's
    read tasks cost far more than the read (two shards of 128 rows: 9 to 80 s of worker start-up
    on the loaded 2-core machine, against 0.1 s), and the blocks, owned by the driver, outlive
    the loss of any other node. Larger datasets that fit are materialized by Ray Data's tasks;
    the others stream.
    """
    import ray

    columns = [c for c in TRAIN_COLUMNS if c in loop.token_space.get("columns", TRAIN_COLUMNS)]
    size = data_bytes(manifest)
    budget = ray.available_resources().get("object_store_memory", 0) * share
    if 0 < size <= min(budget, DRIVER_READ_MAX):
        return read_into_object_store(latents_url, manifest, columns, loop.storage_options)
    dataset, _ = open_latents(latents_url, loop.storage_options)
    dataset = dataset.select_columns(columns)  # the source key and token-order copies stay on disk
    return dataset.materialize() if 0 < size <= budget else dataset


def failure_drill_from_env() -> tuple[int, str] | None:
    at, marker = os.environ.get("SAR_FAIL_AT_STEP"), os.environ.get("SAR_FAIL_MARKER")
    return (int(at), marker) if at and marker else None


def run_training(loop: LoopConfig, dataset, tracker: tracking.Tracker = tracking.NULL,
                 progress_interval_s: float = 30.0) -> dict[str, Any]:
    """Launch `train_loop` with Ray Train (in-process when train.num_workers is 0) on `dataset`
    (`training_dataset`'s); return the last logged metrics (the final row of metrics.jsonl).

    `tracker` is the stage's run: rank 0 logs the training rows into it, then loss.png is added.
    Rank 0 writes a progress line every `progress_interval_s` in a log (pipelines/progress.py).
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipelines.ray_runtime import cluster_gpus

    train = loop.train
    loop.use_gpu = cluster_gpus() > 0 if train.use_gpu is None else train.use_gpu
    if train.num_workers == 0:
        # Local mode echoes every ray.train.report() as "Reported metrics: {...}" (Ray Train's
        # LoggingConfig reaches worker processes only); the loop already prints one line per row.
        logging.getLogger("ray.train.v2._internal.execution.train_fn_utils").setLevel(logging.WARNING)
    loop.tracking, loop.progress_interval_s = tracker.handoff(), progress_interval_s
    fs, path = storage.pyarrow_filesystem(loop.stage_dir, loop.storage_options)
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"loop": loop},
        scaling_config=ray.train.ScalingConfig(
            num_workers=train.num_workers, use_gpu=loop.use_gpu, placement_strategy=train.placement_strategy,
            resources_per_worker={"CPU": train.cpus_per_worker, **({"GPU": 1} if loop.use_gpu else {}),
                                  **train.resources_per_worker}),
        run_config=ray.train.RunConfig(
            name="ray", storage_path=path, storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=train.max_failures)),
        datasets={"train": dataset},
    )
    result = trainer.fit()
    reported = dict(result.metrics or {})
    if reported.get(LEASE_LOST):  # the stage also checks its lease after the run
        raise LeaseLost(reported[LEASE_LOST])
    if loop.plot:
        tracker.log_artifact(storage.join(loop.stage_dir, PLOT))
    # Ray Train's result holds the metrics of checkpoint reports only, and this loop persists its
    # own checkpoints: the last row is the one metrics.jsonl got with the final checkpoint.
    return last_row(loop.stage_dir, loop.storage_options)


def last_row(stage_dir: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The newest row of `{stage_dir}/metrics.jsonl`, {} before the first checkpoint."""
    url = storage.join(stage_dir, METRICS)
    rows = storage.read_text(url, storage_options).splitlines() if storage.exists(url, storage_options) else []
    return json.loads(rows[-1]) if rows else {}
