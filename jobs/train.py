"""The Ray Train loop that pretrain and refine share.

A stage supplies an *objective* (an nn.Module wrapping the SARModel whose forward returns
per-token losses and metrics); this module does the rest: the manifest check, Ray Train
(`TorchTrainer` with `ScalingConfig`, `RunConfig`, `FailureConfig`), the data shard
(posterior sampling and flip at load time), DDP or FSDP2, bf16 autocast, AdamW with a warm-up
schedule, gradient accumulation and clipping, EMA, checkpoints, resume and metrics.

Checkpoints go to `{stage_dir}/checkpoints/step_N` through the storage module (jobs/checkpoints.py),
written by rank 0, in local mode and on a cluster alike (Ray Train's local mode persists no
checkpoints of its own, so the loop owns persistence and pruning; Ray's `storage_path` keeps
its run state beside them). A restarted worker group (FailureConfig) or a re-launched run
resumes from the newest one. Metrics go to `ray.train.report` and `{stage_dir}/metrics.jsonl`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

from jobs import checkpoints
from jobs.config import PipelineConfig, TrainConfig
from pipelines import storage
from pipelines.errors import DatasetMismatch, SarError

log = logging.getLogger("sar.train")

RUN_CONFIG = "run_config.json"
TRAIN_COLUMNS = ("label", "mean", "mean_flip", "logvar", "logvar_flip")
METRICS = "metrics.jsonl"
# Fields that may change between launches of one run without changing what is trained.
RESUMABLE_FIELDS = {"steps", "checkpoint_every", "keep_checkpoints", "log_every", "num_workers", "use_gpu",
                    "cpus_per_worker", "max_failures", "output", "compile", "allow_config_change"}


# Data ------------------------------------------------------------------------------------------
def _values(t: torch.Tensor) -> torch.Tensor:
    """A latent column as float32; bfloat16 shards hold their bit patterns as uint16 (numpy has no bf16)."""
    return t.view(torch.bfloat16).float() if t.dtype == torch.uint16 else t.float()


def tokens_from_batch(batch: dict[str, torch.Tensor], grouping, generator: torch.Generator,
                      device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Training tokens (B, L, D) and labels (B,) from a batch of latent rows.

    The flip is chosen per example and the posterior sampled per example, at load time
    (MAR stores moments, not samples, so both stay augmentations; DESIGN section 2).
    """
    mean, mean_flip = _values(batch["mean"]), _values(batch["mean_flip"])  # (B, h, w, D) each
    flip = torch.rand(mean.shape[0], generator=generator) < 0.5  # (B,)
    sel = flip.view(-1, 1, 1, 1).to(mean.device)
    grid = torch.where(sel, mean_flip, mean)
    if "logvar" in batch:
        logvar = torch.where(sel, _values(batch["logvar_flip"]), _values(batch["logvar"]))
        eps = torch.randn(grid.shape, generator=generator).to(grid.device)
        grid = grid + torch.exp(0.5 * logvar) * eps  # posterior sample
    x = grouping.to_sequence(grid.to(device))  # (B, L, D)
    return x, batch["label"].long().to(device)


def group_buckets(group_index: torch.Tensor, num_groups: int) -> dict[str, torch.Tensor]:
    """Boolean masks over sequence positions for the early, middle and late thirds of the groups."""
    edges = np.linspace(0, num_groups, 4)
    return {name: (group_index >= edges[i]) & (group_index < edges[i + 1])
            for i, name in enumerate(("early", "middle", "late"))}


# Optimisation ----------------------------------------------------------------------------------
def make_optimizer(model: nn.Module, train: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases, norms and embeddings (1-D or named embeddings), as MAR."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "embed" in name or "token" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": train.optim.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=train.optim.lr, betas=tuple(train.optim.betas))


def make_scheduler(opt: torch.optim.Optimizer, train: TrainConfig) -> torch.optim.lr_scheduler.LRScheduler:
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


def full_state(model: nn.Module, ema: nn.Module, objective: nn.Module, opt: torch.optim.Optimizer,
               fsdp: bool) -> tuple[dict, dict, dict]:
    """Unsharded model, EMA and optimizer state (a collective under FSDP: every rank calls it)."""
    if not fsdp:
        return model.state_dict(), ema.state_dict(), opt.state_dict()
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return (get_model_state_dict(model, options=full), get_model_state_dict(ema, options=full),
            get_optimizer_state_dict(objective, opt, options=full))


def load_optimizer(objective: nn.Module, opt: torch.optim.Optimizer, state: dict, fsdp: bool) -> None:
    if not fsdp:
        opt.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(objective, opt, state, options=StateDictOptions(full_state_dict=True))


# Run bookkeeping -------------------------------------------------------------------------------
def config_fingerprint(cfg: PipelineConfig, stage: str) -> dict[str, Any]:
    """What a run directory is bound to: the model, the data and the stage's training settings."""
    d = cfg.public_dict()
    section = {k: v for k, v in d[stage].items() if k not in RESUMABLE_FIELDS}
    return {"model": d["model"], "data": {k: d["data"][k] for k in ("source", "split", "classes", "per_class")},
            "encode": {k: d["encode"][k] for k in ("encoder", "image_size", "patch")}, stage: section}


def _diff(a: Any, b: Any, prefix: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            d = _diff(a.get(k), b.get(k), f"{prefix}{k}.")
            if d:
                return d
        return None
    return None if a == b else f"{prefix.rstrip('.')}: run has {json.dumps(a)}, config has {json.dumps(b)}"


def bind_run_dir(cfg: PipelineConfig, stage: str, stage_dir: str) -> None:
    """Record the run's config on first start; refuse a different one unless allowed."""
    so = cfg.data.storage_options
    url = storage.join(stage_dir, RUN_CONFIG)
    mine = config_fingerprint(cfg, stage)
    if storage.exists(url, so):
        theirs = storage.read_json(url, so)
        diff = _diff(theirs, mine)
        if diff and not getattr(cfg, stage).allow_config_change:
            raise SarError(f"{storage.redact(stage_dir)} holds a run with another config ({diff}); "
                           f"use another run_dir or --set {stage}.allow_config_change=true")
        if not diff:
            return
    storage.write_json(url, mine, so)


def check_dataset(manifest: dict[str, Any], model_config: dict[str, Any], where: str) -> None:
    """Refuse a dataset whose token space or grouping differs from the model's, naming both values."""
    from pipelines.latents import check_compatible

    try:
        check_compatible(manifest, token_dim=model_config["token_dim"],
                         grid=(model_config["height"], model_config["width"]),
                         grouping=model_config["grouping"], scales=model_config.get("scales"))
    except DatasetMismatch as err:
        raise DatasetMismatch(f"{where}: {err}") from None


def model_config_for(cfg: PipelineConfig, manifest: dict[str, Any]) -> dict[str, Any]:
    """The SARConfig fields of this run: the preset, the grouping, and the dataset's token space."""
    from models import PRESETS, SARConfig

    if cfg.model.preset not in PRESETS:
        raise SarError(f"model.preset: unknown preset {cfg.model.preset!r}; choose from {sorted(PRESETS)}")
    fields = dataclasses.asdict(SARConfig(**PRESETS[cfg.model.preset]))
    grid = manifest["grid"]
    fields.update(token_dim=manifest["token_dim"], height=grid[0], width=grid[1],
                  num_classes=manifest.get("num_classes", fields.get("num_classes", 1000)),
                  grouping=cfg.model.grouping, scales=tuple(cfg.model.scales) if cfg.model.scales else None)
    fields.update(cfg.model.overrides)
    return fields


# The loop --------------------------------------------------------------------------------------
@dataclass
class LoopState:
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


class Objective(nn.Module):
    """Base of a stage's objective: wraps the model; forward returns (loss, per-token loss, metrics)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model


def _rank_world() -> tuple[int, int]:
    import ray.train

    ctx = ray.train.get_context()
    return ctx.get_world_rank(), ctx.get_world_size()


def _device(use_gpu: bool) -> torch.device:
    if use_gpu and torch.cuda.is_available():
        import ray.train.torch

        return ray.train.torch.get_device()
    return torch.device("cpu")


def train_loop(loop_cfg: dict[str, Any]) -> None:
    """`train_loop_per_worker`: runs on every Ray Train worker (or in-process in local mode)."""
    import ray.train

    cfg = PipelineConfig.model_validate(loop_cfg["config"])
    stage: str = loop_cfg["stage"]
    train: TrainConfig = getattr(cfg, stage)
    stage_dir: str = loop_cfg["stage_dir"]
    so = cfg.data.storage_options
    rank, world = _rank_world()
    device = _device(loop_cfg["use_gpu"])
    torch.manual_seed(train.seed + rank)

    # Model, objective and optimiser ------------------------------------------------------------
    objective: Objective = loop_cfg["make_objective"](cfg, loop_cfg)
    model = objective.model
    grouping = model.grouping
    fsdp = train.strategy == "fsdp" and world > 1
    ema = make_ema(model, train.ema_decay, use_buffers=not fsdp)  # before sharding: FSDP cannot deep-copy
    st = LoopState()
    opt_state = sched_state = None

    resume = checkpoints.find_latest(stage_dir, so)
    if resume is not None:
        state, meta = checkpoints.load_state(resume, so)
        model.load_state_dict(state["model"])
        ema.module.load_state_dict(state["ema"])
        ema.n_averaged.fill_(1)  # continue the average (0 would make the next update a copy)
        opt_state, sched_state = state["optimizer"], state["scheduler"]
        st = LoopState(step=state["step"], epoch=state["data"]["epoch"], batch_in_epoch=state["data"]["batch_in_epoch"],
                       history=[h for h in state.get("history", []) if h["step"] <= state["step"]])
        if rank == 0:
            log.info("resumed from step %d (%s)", st.step, storage.redact(resume))
            print(f"resumed from step {st.step}", flush=True)
    elif loop_cfg.get("init") is not None:  # refine: start from a pretrain checkpoint
        init_url, which = loop_cfg["init"]
        state, _ = checkpoints.load_state(init_url, so)
        weights = state["ema"] if which == "ema" and state.get("ema") is not None else state["model"]
        model.load_state_dict(weights)
        ema.module.load_state_dict(weights)
        ema.n_averaged.fill_(1)

    objective.to(device)
    ema.to(device)
    if fsdp:  # the EMA is sharded like the model, so its update stays shard-local
        fsdp_shard(objective, model.backbone)
        fsdp_shard(ema.module, ema.module.backbone)
    opt = make_optimizer(objective, train)
    sched = make_scheduler(opt, train)
    if opt_state is not None:
        load_optimizer(objective, opt, opt_state, fsdp)
        sched.load_state_dict(sched_state)

    wrapped: nn.Module = objective
    if world > 1 and not fsdp:
        wrapped = nn.parallel.DistributedDataParallel(
            objective, device_ids=[device.index] if device.type == "cuda" else None)
    if train.compile:
        wrapped = torch.compile(wrapped)

    accum = loop_cfg["accum"]
    amp = device.type == "cuda" and train.precision == "bf16"
    shard = ray.train.get_dataset_shard("train")
    gen = torch.Generator().manual_seed(train.seed * 1_000_003 + rank * 7919 + st.step)
    buckets = {k: v.to(device) for k, v in group_buckets(grouping.group_index, grouping.num_groups).items()}

    def save() -> None:
        model_sd, ema_sd, opt_sd = full_state(model, ema.module, objective, opt, fsdp)
        state = {"model": model_sd, "ema": ema_sd, "optimizer": opt_sd, "strategy": train.strategy,
                 "scheduler": sched.state_dict(), "step": st.step,
                 "data": {"epoch": st.epoch, "batch_in_epoch": st.batch_in_epoch}, "history": st.history}
        meta = {"step": st.step, "stage": stage, "model_config": _jsonable(dataclasses.asdict(model.config)),
                "latents": loop_cfg["token_space"], "inputs": loop_cfg.get("inputs"), "config": loop_cfg["config"]}
        if rank == 0:
            with tempfile.TemporaryDirectory(prefix="sar-save-") as tmp:
                checkpoints.write_local(tmp, state, meta)
                checkpoints.publish(tmp, stage_dir, st.step, train.keep_checkpoints, so)
            storage.write_text(storage.join(stage_dir, METRICS),
                               "".join(json.dumps(h) + "\n" for h in st.history), so)

    # Loop -----------------------------------------------------------------------------------
    window: dict[str, torch.Tensor] = {}  # metric sums over the steps since the last log
    t_window, wait_window, n_window, img_window = time.perf_counter(), 0.0, 0, 0
    while st.step < train.steps:
        batches = shard.iter_torch_batches(batch_size=train.micro_batch, drop_last=True, prefetch_batches=2,
                                          local_shuffle_buffer_size=4 * train.micro_batch,
                                          local_shuffle_seed=train.seed + 1000 * st.epoch + rank)
        it = iter(batches)
        skipped = 0
        while skipped < st.batch_in_epoch * accum:  # data position: skip what this epoch already used
            if next(it, None) is None:
                break
            skipped += 1
        exhausted = False
        while st.step < train.steps and not exhausted:
            opt.zero_grad(set_to_none=True)
            t_data = time.perf_counter()
            micro = []
            for _ in range(accum):
                b = next(it, None)
                if b is None:
                    exhausted = True
                    break
                micro.append(b)
            wait_window += time.perf_counter() - t_data
            if exhausted:
                break
            for i, b in enumerate(micro):
                x, labels = tokens_from_batch(b, grouping, gen, device)
                last = i == accum - 1
                if fsdp:  # accumulate locally; reduce-scatter on the last micro-batch only
                    objective.set_requires_gradient_sync(last)
                sync = last or not isinstance(wrapped, nn.parallel.DistributedDataParallel)
                ctx = wrapped.no_sync() if not sync else _nullcontext()
                with ctx, torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    loss, per_token, metrics = wrapped(x, labels, gen)
                    (loss / accum).backward()
                with torch.no_grad():
                    metrics = {**metrics, "loss": loss.detach()}
                    for name, mask in buckets.items():
                        metrics[f"loss_{name}"] = per_token.detach()[:, mask].mean()
                    for k, v in metrics.items():  # device tensors: no host sync until the log step
                        window[k] = window.get(k, 0.0) + v.float() / accum
                img_window += x.shape[0] * world
            grad_norm = torch.nn.utils.clip_grad_norm_(objective.parameters(), train.optim.grad_clip)
            if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
                grad_norm = grad_norm.full_tensor()
            opt.step()
            sched.step()
            ema.update_parameters(model)
            st.step += 1
            st.batch_in_epoch += 1
            n_window += 1
            window["grad_norm"] = window.get("grad_norm", 0.0) + grad_norm.detach().float()

            if st.step % train.log_every == 0 or st.step == train.steps:
                elapsed = time.perf_counter() - t_window
                row = {"step": st.step, "epoch": st.epoch, **{k: float(v) / n_window for k, v in window.items()},
                       "lr": sched.get_last_lr()[0], "images_per_s": img_window / elapsed,
                       "tokens_per_s": img_window * grouping.seq_len / elapsed,
                       "data_wait_fraction": wait_window / elapsed}
                st.history.append(row)
                if rank == 0:
                    print(" ".join(f"{k}={_fmt(v)}" for k, v in row.items()), flush=True)
                ray.train.report(row)
                window, t_window, wait_window, n_window, img_window = {}, time.perf_counter(), 0.0, 0, 0
            if st.step % train.checkpoint_every == 0 or st.step == train.steps:
                save()
            failure_drill(loop_cfg.get("failure_drill"), st.step, rank, world)
        if exhausted:
            if st.batch_in_epoch == 0:
                raise SarError(f"the dataset gives no full batch: micro_batch {train.micro_batch} x accumulation "
                               f"{accum} per worker is more than a worker's share of the rows")
            st.epoch += 1
            st.batch_in_epoch = 0
    if rank == 0 and loop_cfg.get("plot", True):
        plot_loss_curve(st.history, storage.join(stage_dir, "loss.png"), so)


def failure_drill(drill: tuple[str, str] | None, step: int, rank: int, world: int) -> None:
    """With SAR_FAIL_AT_STEP=N and SAR_FAIL_MARKER=FILE set at launch, the last worker exits hard
    once after step N, so an operator (or a test) can watch FailureConfig restart the group."""
    if not drill:
        return
    at, marker = drill
    if step == int(at) and rank == world - 1 and not os.path.exists(marker):
        open(marker, "w").close()
        log.warning("failure drill: worker %d exits after step %d", rank, step)
        os._exit(1)


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(d, default=lambda o: list(o) if isinstance(o, tuple) else str(o)))


def plot_loss_curve(history: list[dict[str, Any]], url: str, storage_options: dict[str, Any] | None = None) -> None:
    """A PNG of the loss (and its buckets) against the step."""
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    steps = [h["step"] for h in history]
    for key in [k for k in history[-1] if k.startswith("loss") or "csf" in k]:
        ax.plot(steps, [h.get(key, math.nan) for h in history], label=key, lw=1.5 if key == "loss" else 1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with storage.open_atomic(url, "wb", storage_options) as f:
        fig.savefig(f, format="png")
    plt.close(fig)


# The driver ------------------------------------------------------------------------------------
def cache_if_small(dataset, data_bytes: int, share: float = 0.25):
    """Read a small dataset into the object store once instead of from Parquet at every epoch.

    Each epoch re-executes the dataset; for a few MB of latents that start-up dominates the step
    (the demo's data-wait fraction fell from ~0.7 to ~0). Large datasets keep streaming.
    """
    import ray

    budget = ray.available_resources().get("object_store_memory", 0) * share
    return dataset.materialize() if 0 < data_bytes <= budget else dataset



def run_training(cfg: PipelineConfig, stage: str, stage_dir: str,
                 make_objective: Callable[[PipelineConfig, dict[str, Any]], Objective],
                 model_config: dict[str, Any], token_space: dict[str, Any],
                 dataset, extra: dict[str, Any] | None = None, data_bytes: int = 0) -> dict[str, Any]:
    """Launch the loop with Ray Train (or in-process when num_workers is 0); return the last metrics."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    train: TrainConfig = getattr(cfg, stage)
    gpus = ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else 0
    use_gpu = bool(gpus) if train.use_gpu is None else train.use_gpu
    workers = max(train.num_workers, 1)
    per_step = train.micro_batch * workers
    if train.global_batch % per_step:
        raise SarError(f"{stage}.global_batch {train.global_batch} is not a multiple of micro_batch "
                       f"{train.micro_batch} x {workers} workers")
    bind_run_dir(cfg, stage, stage_dir)
    loop_cfg = {"config": cfg.model_dump(mode="json"), "stage": stage, "stage_dir": stage_dir,
                "use_gpu": use_gpu, "accum": train.global_batch // per_step, "make_objective": make_objective,
                "model_config": model_config, "token_space": token_space, **(extra or {})}
    if os.environ.get("SAR_FAIL_AT_STEP") and os.environ.get("SAR_FAIL_MARKER"):
        loop_cfg["failure_drill"] = (os.environ["SAR_FAIL_AT_STEP"], os.environ["SAR_FAIL_MARKER"])
    columns = [c for c in TRAIN_COLUMNS if c in token_space.get("columns", TRAIN_COLUMNS)]
    dataset = dataset.select_columns(columns)  # the source key and token-order copies stay on disk
    dataset = cache_if_small(dataset, data_bytes)
    fs, path = storage.pyarrow_filesystem(stage_dir, cfg.data.storage_options)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_cfg,
        scaling_config=ray.train.ScalingConfig(
            num_workers=train.num_workers, use_gpu=use_gpu,
            resources_per_worker={"CPU": train.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}),
        run_config=ray.train.RunConfig(
            name="ray", storage_path=path, storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=train.max_failures)),
        datasets={"train": dataset},
    )
    result = trainer.fit()
    return dict(result.metrics or {})


def digest_of(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
