"""What a training stage's driver does around the Train workers: check, claim, launch, record.

    build_model_config  the SARConfig fields of a run: a preset, the grouping, the dataset's token space
    check_inputs        refuse latents or a model that do not fit the run (before anything is written)
    claim_run_folder    the stage folder under its writer lease: corrupt checkpoints set aside, the
                        architecture checked against its checkpoints, the folder bound to the config
    build_loop_config   the complete, frozen LoopConfig shipped to every worker (once Ray is up)
    training_dataset    the Ray Dataset the workers read
    run_training        Ray Train's TorchTrainer over worker.train_loop_per_worker; the last metrics row
    check_stopped       Stopped, naming the checkpoint to resume from, when a stop signal ended the run
    write_record        `_stage.json` of a finished launch
    training_status     whether a stage's output is up to date (for `sar run`)

Nothing here needs Ray before `build_loop_config`, so a wrong dataset or a changed config is refused
before any worker starts. `cfg` arguments are the resolved pipeline config (jobs/config.py's
PipelineConfig), read as plain attributes; nothing here imports `jobs`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import uuid
from typing import Any, Callable

from models import preset_config
from pipelines.core import rundir, stop, storage, tracking
from pipelines.core.errors import DatasetMismatch, SarError
from pipelines.core.lease import LeaseLost, WriterLease
from pipelines.core.ray_runtime import cluster_gpus
from pipelines.data.latents import (
    TRAIN_COLUMNS,
    check_compatible,
    check_encode_settings,
    check_shards,
    data_bytes,
    read_into_object_store,
    read_manifest,
)
from pipelines.data.stream import LatentStream
from pipelines.train import checkpoints
from pipelines.train.loop_config import LEASE_LOST, METRICS, PLOT, Evaluation, LoopConfig
from pipelines.train.worker import train_loop_per_worker

log = logging.getLogger("sar.train")


# Model and run ---------------------------------------------------------------------------------
def build_model_config(model: Any, manifest: dict[str, Any]) -> dict[str, Any]:
    """The SARConfig fields of a run: the config's model section (preset, grouping, scales,
    overrides) on the dataset's token space."""
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
    """The config section with `steps` (from `epochs` and `min_steps` when unset) and `ema_decay`
    (from the length when unset: EMA_START_SHARE ** (1 / steps)) filled in for a dataset of `num_rows`."""
    steps = train.steps or max(train.min_steps or 1, math.ceil(train.epochs * num_rows / train.global_batch))
    decay = train.ema_decay if train.ema_decay is not None else EMA_START_SHARE ** (1 / steps)
    return train.model_copy(update={"steps": steps, "ema_decay": decay})


def refine_start(cfg: Any, required: bool = True) -> str | None:
    """The checkpoint refinement starts from (refine.init): a location as given, the pretrain checkpoint
    of a step, the newest one at or before a fraction of pretrain.steps, or (unset) the newest one.

    None when there is none yet and not `required`; else a SarError naming the steps there are.
    """
    init, so = cfg.refine.init, cfg.data.storage_options
    if isinstance(init, str):
        return init
    if init is None:
        latest = checkpoints.find_latest(cfg.pretrain_dir, so)
        if latest is None and required:
            raise SarError(f"no pretrain checkpoint under {storage.redact(cfg.pretrain_dir)}; run `sar pretrain` "
                           f"first or set refine.init")
        return latest
    steps = checkpoints.list_steps(cfg.pretrain_dir, so)
    if isinstance(init, float):
        total = resolve_length(cfg.pretrain, read_manifest(cfg.latents_dir, so)["num_rows"]).steps
        wanted = math.floor(init * total)
        found = [s for s in steps if s <= wanted][-1:]
        what = f"at or before step {wanted} ({init:g} of {total})"
    else:
        found, what = [s for s in steps if s == init], f"at step {init}"
    if not found:
        if not required:
            return None
        raise SarError(f"refine.init {init!r}: no pretrain checkpoint {what} under {storage.redact(cfg.pretrain_dir)} "
                       f"(it holds steps {steps or 'none'}); pretrain.checkpoint_every and keep_checkpoints decide "
                       f"which are kept")
    return storage.join(cfg.pretrain_dir, checkpoints.CHECKPOINTS, checkpoints.step_dir_name(found[0]))


def check_inputs(cfg: Any, stage: str, model_config: dict[str, Any], manifest: dict[str, Any]) -> None:
    """Refuse latents made with other encode settings or another token space than this run's, or whose
    shards do not match their manifest, and warn (once, here) about a warm-up longer than the run;
    writes nothing, needs no Ray."""
    train = resolve_length(getattr(cfg, stage), manifest["num_rows"])
    where = storage.redact(cfg.latents_dir)
    check_encode_settings(manifest, cfg.encode, where, cfg.data.storage_options)
    check_dataset(manifest, model_config, where)
    check_shards(cfg.latents_dir, manifest, cfg.data.storage_options)  # every shard whole, before Ray reads one
    if train.optim.warmup_steps > train.steps:
        log.warning("%s.optim.warmup_steps %d is more than %s.steps %d: the whole run is warm-up (the learning "
                    "rate reaches %s.optim.lr only at the last step)", stage, train.optim.warmup_steps, stage,
                    train.steps, stage)


def fingerprints(cfg: Any, stage: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(what this config binds a stage folder to, the same of the default config): a setting a folder's
    binding lacks was added by a later release and counts as its default (rundir.first_difference), or
    as the value the config class names for it when that default has changed since
    (`BEFORE_SETTING_EXISTED`)."""
    defaults = rundir.config_fingerprint(type(cfg)().public_dict(), stage)
    for section, values in getattr(type(cfg), "BEFORE_SETTING_EXISTED", {}).items():
        if section in defaults:
            defaults[section] = {**defaults[section], **values}
    return rundir.config_fingerprint(cfg.public_dict(), stage), defaults


def claim_run_folder(cfg: Any, stage: str, stage_dir: str, model_config: dict[str, Any],
                     lease: WriterLease | None) -> int:
    """Make `stage_dir` this run's, under its writer lease (held by the caller); returns the step the
    run starts from (its newest checkpoint's, 0 for a new run).

    This run owns the folder, so checkpoints that do not load are moved aside
    (checkpoints.set_aside_corrupt) and the run resumes from the newest one that does; a folder
    whose checkpoints have another architecture, or that is bound to another config, is refused.
    Needs no Ray.
    """
    so = cfg.data.storage_options
    train = getattr(cfg, stage)
    if lease is not None:
        checkpoints.set_aside_corrupt(stage_dir, so)
    check_resumable(stage_dir, model_config, so)
    fingerprint, defaults = fingerprints(cfg, stage)
    rundir.bind_run_dir(stage_dir, fingerprint, stage, train.allow_config_change, so, defaults=defaults)
    latest = checkpoints.find_latest(stage_dir, so)
    return checkpoints.read_meta(latest, so)["step"] if latest else 0


def build_loop_config(cfg: Any, stage: str, stage_dir: str, model_config: dict[str, Any], manifest: dict[str, Any],
                      inputs: dict[str, Any], *, start_step: int, init: tuple[str, str] | None = None,
                      lease: WriterLease | None = None, tracker: tracking.Tracker = tracking.NULL,
                      evaluation: Evaluation | None = None) -> LoopConfig:
    """The LoopConfig of this launch, complete: called once Ray is up (GPUs are counted in the cluster
    when `{stage}.use_gpu` is unset). `tracker` is the stage's run, which rank 0 logs into;
    `evaluation` the in-training evaluation (pipelines/evaluate/during_training.py), or None."""
    train = resolve_length(getattr(cfg, stage), manifest["num_rows"])
    token_space = checkpoints.token_space(manifest)
    stream = latent_stream(cfg, stage, manifest, token_space) if reads_stream(cfg.data.reader, manifest) else None
    return LoopConfig(
        stage=stage, stage_dir=stage_dir, train=train, model_config=model_config,
        token_space=token_space, inputs=inputs, run_config=cfg.public_dict(),
        use_gpu=cluster_gpus() > 0 if train.use_gpu is None else train.use_gpu,
        accum=train.global_batch // (train.micro_batch * max(train.num_workers, 1)),
        storage_options=cfg.data.storage_options, init=init, hflip=cfg.data.hflip, start_step=start_step,
        failure_drill=failure_drill_from_env(), tracking=tracker.handoff(),
        progress_interval_s=cfg.tracking.progress_interval_s, evaluation=evaluation,
        lease=lease.token() if lease else None, stop_key=f"stop-{uuid.uuid4().hex}", stream=stream)


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
    fingerprint, defaults = fingerprints(cfg, stage)
    latest = checkpoints.find_latest(stage_dir, storage_options)
    if latest is None:
        return rundir.StageStatus(False, "no checkpoint")
    meta = checkpoints.read_meta(latest, storage_options)
    if meta.get("inputs") != inputs:
        return rundir.StageStatus(False, "made from other inputs (its inputs changed)", stale=True)
    bound = rundir.bound_fingerprint(stage_dir, storage_options)
    if bound is not None and rundir.first_difference(bound, fingerprint, defaults=defaults):
        return rundir.StageStatus(False, "made from other inputs (its config changed)", stale=True)
    if meta["step"] < steps:
        return rundir.StageStatus(False, f"at step {meta['step']} of {steps}")
    return rundir.StageStatus(True, f"step {meta['step']}, inputs unchanged")


# Launch ----------------------------------------------------------------------------------------
# Bytes of Parquet up to which a stage's driver reads the latents itself (see training_dataset).
DRIVER_READ_MAX = 256 << 20
OBJECT_STORE_SHARE = 0.25  # of the object store, at most, that the driver-read latents may take


def reads_stream(reader: str, manifest: dict) -> bool:
    """Whether the Train workers read the shards themselves (data.reader; `auto` decides by size once Ray
    is up): past DRIVER_READ_MAX, or past OBJECT_STORE_SHARE of the object store, the dataset streams."""
    if reader != "auto":
        return reader == "stream"
    import ray

    size = data_bytes(manifest)
    budget = ray.available_resources().get("object_store_memory", 0) * OBJECT_STORE_SHARE
    return not 0 < size <= min(budget, DRIVER_READ_MAX)


def latent_stream(cfg: Any, stage: str, manifest: dict, token_space: dict) -> LatentStream:
    """The workers' read of the latents (pipelines/data/stream.py), planned for the stage's batch and workers."""
    train = getattr(cfg, stage)
    world = max(train.num_workers, 1)
    columns = [c for c in TRAIN_COLUMNS if c in token_space.get("columns", TRAIN_COLUMNS)]
    stream = LatentStream.from_manifest(
        cfg.latents_dir, manifest, columns, micro_batch=train.micro_batch, rows_per_step=train.global_batch // world,
        world=world, seed=train.seed, buffer_rows=cfg.data.shuffle_buffer_rows,
        storage_options=cfg.data.storage_options)
    if stream.steps_per_epoch == 0:
        raise SarError(f"{stage}.global_batch {train.global_batch} is more than the dataset's {stream.num_rows} rows: "
                       "an epoch would hold no step")
    return stream


def training_dataset(loop: LoopConfig, latents_url: str, manifest: dict):
    """The Ray Dataset a stage trains on when the driver reads the latents (`loop.stream` is None): the
    training columns of the committed shards, in Ray's object store; None when the workers stream them.

    Each epoch re-executes a streaming Ray Dataset, and for a few MB of latents that start-up
    dominated the step (the demo's data-wait fraction fell from ~0.7 to ~0 with the rows in memory);
    and for small shards Ray Data's read tasks cost far more than the read (two shards of 128 rows:
    9 to 80 s of worker start-up on the loaded 2-core machine, against 0.1 s). So this process reads
    the shards itself, and the blocks, owned by the driver, outlive the loss of any other node.
    """
    if loop.stream is not None:
        return None
    columns = [c for c in TRAIN_COLUMNS if c in loop.token_space.get("columns", TRAIN_COLUMNS)]
    return read_into_object_store(latents_url, manifest, columns, loop.storage_options)


def failure_drill_from_env() -> tuple[int, str] | None:
    """(step, marker location) of worker.failure_drill when SAR_FAIL_AT_STEP and SAR_FAIL_MARKER are set."""
    at, marker = os.environ.get("SAR_FAIL_AT_STEP"), os.environ.get("SAR_FAIL_MARKER")
    return (int(at), marker) if at and marker else None


def run_training(loop: LoopConfig, dataset, tracker: tracking.Tracker = tracking.NULL,
                 loop_per_worker: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Launch the loop with Ray Train (in-process when train.num_workers is 0) on `dataset`
    (`training_dataset`'s; None when the workers stream the shards, `loop.stream`); return the last
    logged metrics (the final row of metrics.jsonl).

    `tracker` is the stage's run (the one whose handoff `loop.tracking` carries): loss.png is added
    to it when the run ends. `loop_per_worker` replaces worker.train_loop_per_worker (a test's or a
    benchmark's wrapper around it).
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    loop_per_worker = loop_per_worker or train_loop_per_worker

    train = loop.train
    if train.num_workers == 0:
        # Local mode echoes every ray.train.report() as "Reported metrics: {...}" (Ray Train's
        # LoggingConfig reaches worker processes only); the loop already prints one line per row.
        logging.getLogger("ray.train.v2._internal.execution.train_fn_utils").setLevel(logging.WARNING)
    fs, path = storage.pyarrow_filesystem(loop.stage_dir, loop.storage_options)
    trainer = TorchTrainer(
        loop_per_worker,
        train_loop_config={"loop": loop},
        scaling_config=ray.train.ScalingConfig(
            num_workers=train.num_workers, use_gpu=loop.use_gpu, placement_strategy=train.placement_strategy,
            resources_per_worker={"CPU": train.cpus_per_worker, **({"GPU": 1} if loop.use_gpu else {}),
                                  **train.resources_per_worker}),
        run_config=ray.train.RunConfig(
            name="ray", storage_path=path, storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=train.max_failures)),
        datasets={"train": dataset} if dataset is not None else None,
    )
    # fit() in a thread: on the main thread it would replace the stop handlers' SIGINT with Ray
    # Train's (an abort without a checkpoint); a stop request is forwarded to the Train workers.
    forward = (lambda signum: stop.forward(loop.stop_key, signum)) if train.num_workers and loop.stop_key else None
    try:
        result = stop.run_in_thread(trainer.fit, on_stop=forward)
    finally:
        if forward:
            stop.forget(loop.stop_key)
    reported = dict(result.metrics or {})
    if reported.get(LEASE_LOST):  # the stage also checks its lease after the run
        raise LeaseLost(reported[LEASE_LOST])
    check_stopped(loop)
    if loop.plot:
        tracker.log_artifact(storage.join(loop.stage_dir, PLOT))
    # Ray Train's result holds the metrics of checkpoint reports only, and this loop persists its
    # own checkpoints: the last row is the one metrics.jsonl got with the final checkpoint.
    return last_row(loop.stage_dir, loop.storage_options)


def check_stopped(loop: LoopConfig) -> None:
    """Raise Stopped when a stop signal ended the run before its last step, naming the checkpoint it
    resumes from (a run that reached its last step anyway is finished)."""
    signum = stop.requested()
    if not signum:
        return
    latest = checkpoints.find_latest(loop.stage_dir, loop.storage_options)
    step = checkpoints.read_meta(latest, loop.storage_options)["step"] if latest else 0
    if step >= loop.train.steps:
        return
    kept = (f"newest checkpoint step {step} of {loop.train.steps} ({storage.redact(latest)}); the same command "
            "resumes from it" if latest else "no checkpoint yet; the same command starts the run again")
    raise stop.Stopped(signum, kept)


def last_row(stage_dir: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The newest row of `{stage_dir}/metrics.jsonl`, {} before the first checkpoint."""
    url = storage.join(stage_dir, METRICS)
    rows = storage.read_text(url, storage_options).splitlines() if storage.exists(url, storage_options) else []
    return json.loads(rows[-1]) if rows else {}
