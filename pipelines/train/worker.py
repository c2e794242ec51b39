"""What runs in each Ray Train worker (or in-process in local mode): the training loop.

`train_loop` is made of small functions that tests and benchmarks call on their own:

    prepare          model, EMA, restored state, FSDP2 sharding or DDP, optimizer and schedule
    restore          weights, optimizer state and data position from the newest checkpoint
                     (or, for refine, the weights of the pretrain checkpoint it starts from)
    step_batches     the micro-batches of each optimizer step, epoch after epoch, from a data position
    train_step       one optimizer step over its micro-batches (accumulation, clipping, EMA)
    log_row          the metrics of the steps since the last log, as one row
    save_checkpoint  full (gathered) state to `{stage_dir}/checkpoints/step_N`, then metrics.jsonl
    evaluate_now     the in-training evaluation of the EMA weights (loop.evaluation), to the tracker
    lease_lost       whether this run may still write its folder, the same verdict on every rank
    lease_was_lost   lease_lost, said to the log and the driver
    stop_verdict     whether a stop signal (SIGTERM, SIGINT) ends the run after this step, and saves first
    failure_drill    an operator's drill: one worker exits hard once, to watch Ray Train restart it

Checkpoints go through the storage module (checkpoints.py), written by rank 0, in local mode and
on a cluster alike: Ray Train's local mode persists no checkpoints of its own, so the loop owns
persistence and pruning. A restarted worker group or a re-launched run resumes from the newest
checkpoint. Metrics go to `ray.train.report`, `{stage_dir}/metrics.jsonl` and, from rank 0, the
stage's MLflow run (pipelines/core/tracking.py: queued, so a slow store never holds up a step).

Before each step that writes (a checkpoint, metrics, an evaluation), rank 0 checks the driver's
writer lease and every rank learns the verdict: a lost lease stops every worker at that step
without writing. The workers return rather than raise, so Ray Train's FailureConfig does not
restart them into the same loss; the driver raises LeaseLost.

A stop request (pipelines/core/stop.py: SIGTERM or SIGINT to the stage's driver) is read at every
step boundary: the step under way finishes, a checkpoint is saved when the newest one is older
than `checkpoint_on_stop_after_s`, and every worker returns; the driver raises Stopped.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn

from models import SARConfig, SARModel
from pipelines.core import stop, storage, tracking
from pipelines.core.errors import SarError
from pipelines.core.lease import LeaseLost
from pipelines.core.progress import Progress
from pipelines.data.latents import tokens_from_batch
from pipelines.data.stream import LatentStream
from pipelines.train import checkpoints
from pipelines.train.curves import plot_curves
from pipelines.train.loop_config import EVALS, LEASE_LOST, METRICS, PLOT, LoopConfig
from pipelines.train.objectives import Objective, group_buckets, make_objective
from pipelines.train.optim import fsdp_shard, make_ema, make_optimizer, make_scheduler

log = logging.getLogger("sar.train")


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




def full_state(t: Trainer) -> tuple[dict, dict, dict]:
    """Unsharded model, EMA and optimizer state (a collective under FSDP: every rank calls it)."""
    if not t.fsdp:
        return t.model.state_dict(), t.ema.module.state_dict(), t.opt.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

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
        ema.n_averaged.fill_(max(1, state["step"]))  # continue the average: the updates it has had (0: a copy)
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

    `shard` is the worker's Ray Dataset shard, or the LatentStream it reads itself. A resumed epoch
    starts after the batches it already used: the stream at that row of the worker's part (the same
    rows that would have followed), the Ray Dataset after as many batches of its reshuffled shard.
    The caller advances `st.batch_in_epoch`; this advances the epoch.
    """
    while True:
        used = st.batch_in_epoch * accum
        if isinstance(shard, LatentStream):
            it = shard.batches(st.epoch, rank, start=used * train.micro_batch)
        else:
            it = itertools.islice(iter(epoch_batches(shard, train, st.epoch, rank)), used, None)
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


def evaluate_now(evaluate: Callable[[nn.Module, int], dict[str, Any]], t: Trainer, st: LoopState, loop: LoopConfig,
                 tracker: tracking.Tracker) -> dict[str, Any]:
    """Score the EMA weights on the fixed evaluation set; the row goes to evals.jsonl and the tracker."""
    row = evaluate(t.ema.module, st.step)
    st.evals.append(row)
    storage.write_text(storage.join(loop.stage_dir, EVALS), "".join(json.dumps(r) + "\n" for r in st.evals),
                       loop.storage_options)
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


def lease_was_lost(loop: LoopConfig, t: Trainer, st: LoopState) -> bool:
    """Whether the run may no longer write (lease_lost), said to the log and, as LEASE_LOST, to the
    driver: the loop then returns without writing."""
    import ray.train

    lost = lease_lost(loop, t)
    if lost:
        log.error("step %d: %s", st.step, lost)
        ray.train.report({"step": st.step, LEASE_LOST: lost})
    return bool(lost)


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
def augmentation_seed(seed: int, rank: int, step: int) -> int:
    """The seed of a worker's generator of training noise (flip choice, posterior sample, the flow
    head's t and noise, class dropout): a different stream on every rank, so workers do not draw
    the same noise for their different examples, and after a resume at `step`, so a relaunch does
    not replay the noise of the steps before it. The two primes keep (seed, rank) pairs apart for any
    realistic seed and world size; the formula is kept as it was so runs reproduce across releases."""
    return seed * 1_000_003 + rank * 7919 + step


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
    if shard is None:
        shard = loop.stream if loop.stream is not None else ray.train.get_dataset_shard("train")
    gen = torch.Generator().manual_seed(augmentation_seed(train.seed, rank, st.step))
    evaluate = None
    if rank == 0 and loop.evaluation is not None:
        evaluate = loop.evaluation.build(loop.stage_dir, device, loop.storage_options)

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
    poll, control = stop.Poll(loop.stop_key), control_group(t)
    saved_at, saved_step, stopped = time.monotonic(), st.step, 0
    try:
        while st.step < train.steps:
            # A stop request (SIGTERM, SIGINT): after the step that is done, save when the newest
            # checkpoint is older than checkpoint_on_stop_after_s, then end as a finished run does.
            due = st.step > saved_step and time.monotonic() - saved_at >= train.checkpoint_on_stop_after_s
            stopped, save = stop_verdict(t, poll, due, control)
            if stopped:
                if save and lease_was_lost(loop, t, st):
                    return st
                if save:
                    save_checkpoint(t, st, loop)
                if rank == 0:
                    kept = (f"checkpoint saved at step {st.step}" if save else
                            f"newest checkpoint at step {saved_step}" + (
                                f", {time.monotonic() - saved_at:.0f} s old (under {loop.stage}."
                                "checkpoint_on_stop_after_s)" if st.step > saved_step else ""))
                    progress.write(f"{stop.name(stopped)}: stopped after step {st.step}; {kept}")
                break
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
            if (evaluating or saving) and lease_was_lost(loop, t, st):
                return st
            if evaluate is not None and evaluating:
                evaluate_now(evaluate, t, st, loop, tracker)
            if saving:
                save_checkpoint(t, st, loop)
                saved_at, saved_step = time.monotonic(), st.step
                tracker.sync(wait=False)  # an object-store run directory: mirror the store with the checkpoint
            failure_drill(loop.failure_drill, st.step, rank, world, loop.storage_options)
    finally:
        # Ray Data's iterator, closed while Ray is up: left to the garbage collector it closes at
        # exit, after Ray's shutdown, and fails there ("Ray is not initialized") over any real error.
        batches.close()
    if rank == 0:
        progress.close()
    tracker.close()  # sends what is queued; the run itself stays open for the driver to end
    if rank == 0 and loop.plot and not stopped:
        plot_curves(st.history, storage.join(loop.stage_dir, PLOT), loop.storage_options)
    return st


def control_group(t: Trainer):
    """The process group of the loop's control messages (the stop verdict): the default group on CPU
    (gloo), a gloo group beside NCCL, so that reading the verdict never waits for the GPU; None alone."""
    if t.world == 1 or not torch.distributed.is_initialized():
        return None
    if torch.distributed.get_backend() == "nccl":
        return torch.distributed.new_group(backend="gloo")  # every rank calls it, at the same point
    return torch.distributed.group.WORLD


def stop_verdict(t: Trainer, poll: Callable[[], int], save_due: bool, group) -> tuple[int, bool]:
    """(the signal that stops the run, 0 while none; whether to save first): rank 0's verdict, the same
    on every rank, so that all stop after the same step and none waits in a collective for one that
    stopped. Rank 0 polls (pipelines/core/stop.py: this process's handler, or the driver's request
    forwarded through Ray's GCS, read at most once a second); one small all-reduce per step on `group`."""
    verdict = [poll(), int(save_due)] if t.rank == 0 else [0, 0]
    if group is not None:
        flags = torch.tensor(verdict, dtype=torch.int64)
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX, group=group)
        verdict = flags.tolist()
    return int(verdict[0]), bool(verdict[0] and verdict[1])


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's `train_loop_per_worker`: it passes the driver's {"loop": LoopConfig}."""
    train_loop(config["loop"])
