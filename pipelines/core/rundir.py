"""What a stage's output folder is bound to, whether it is up to date, and where stale outputs go.

    {stage_dir}/run_config.json   the config a training run was started with (model, data, the
                                  stage's training settings); a relaunch with another is refused
    {stage_dir}/_stage.json       the last completed run of a stage: times, images, inputs, outputs
    {run_dir}/archive/<stage>-<time>/   an output made from other inputs, moved aside before
                                  the stage re-makes it (nothing written is lost), under the
                                  folder's writer lease (never while a stage writes it)
"""

from __future__ import annotations

import datetime
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from pipelines.core import storage
from pipelines.core.errors import SarError
from pipelines.core.lease import LEASE_PREFIX, WriterLease

RUN_CONFIG = "run_config.json"
STAGE_RECORD = "_stage.json"
# Training fields that may change between launches of one run without changing what is trained.
RESUMABLE_FIELDS = {"steps", "epochs", "checkpoint_every", "keep_checkpoints", "log_every", "num_workers", "use_gpu",
                    "cpus_per_worker", "max_failures", "output", "compile", "allow_config_change",
                    "eval_every", "eval_per_class"}


@dataclass(frozen=True)
class StageStatus:
    """Whether a stage's output is complete and made from the current inputs, and why (for `sar run`)."""

    up_to_date: bool
    reason: str
    stale: bool = False  # an output made from other inputs: archive it before re-making


def digest_of(obj: Any) -> str:
    """sha256 of an object's canonical JSON."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def now_utc() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# Binding a training run to its config --------------------------------------------------------
def config_fingerprint(config: dict[str, Any], stage: str) -> dict[str, Any]:
    """What a run directory is bound to: the model, the data and the stage's training settings.

    `config` is the resolved public config (jobs.config.PipelineConfig.public_dict()).
    """
    section = {k: v for k, v in config[stage].items() if k not in RESUMABLE_FIELDS}
    return {"model": config["model"],
            "data": {k: config["data"][k] for k in ("source", "split", "classes", "per_class")},
            "encode": {k: config["encode"][k] for k in ("encoder", "image_size", "patch")}, stage: section}


def first_difference(a: Any, b: Any, prefix: str = "", defaults: Any = None) -> str | None:
    """The first dotted key where two JSON trees differ, described, or None.

    A key `a` lacks (a binding written by a release that had no such setting) is taken at its value in
    `defaults`, when given: what that release did without it.
    """
    if isinstance(a, dict) and isinstance(b, dict):
        d_tree = defaults if isinstance(defaults, dict) else {}
        for k in sorted(set(a) | set(b)):
            mine = a[k] if k in a else d_tree.get(k)
            d = first_difference(mine, b.get(k), f"{prefix}{k}.", d_tree.get(k))
            if d:
                return d
        return None
    return None if a == b else f"{prefix.rstrip('.')}: run has {json.dumps(a)}, config has {json.dumps(b)}"


def bound_fingerprint(stage_dir: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any] | None:
    url = storage.join(stage_dir, RUN_CONFIG)
    return storage.read_json(url, storage_options) if storage.exists(url, storage_options) else None


def bind_run_dir(stage_dir: str, fingerprint: dict[str, Any], stage: str, allow_change: bool,
                 storage_options: dict[str, Any] | None = None, defaults: dict[str, Any] | None = None) -> None:
    """Record the run's config on first start; refuse a different one unless allowed. `defaults` is the
    fingerprint of the default config: a setting added since the folder was bound counts as its default."""
    theirs = bound_fingerprint(stage_dir, storage_options)
    if theirs is not None:
        diff = first_difference(theirs, fingerprint, defaults=defaults)
        if not diff:
            return
        if not allow_change:
            raise SarError(f"{storage.redact(stage_dir)} holds a run with another config ({diff}); "
                           f"use another run_dir or --set {stage}.allow_config_change=true")
    storage.write_json(storage.join(stage_dir, RUN_CONFIG), fingerprint, storage_options)


# Stage records ---------------------------------------------------------------------------------
def write_stage_record(out_dir: str, stage: str, *, started: str, seconds: float, images: int | None,
                       inputs: dict[str, Any], outputs: dict[str, Any],
                       storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """`{out_dir}/_stage.json`: when the stage ran (ISO UTC), how long, how many images, what it
    consumed and made (by digest); returns the record. The run report and the tracker read it."""
    record = {"stage": stage, "started": started, "finished": now_utc(), "wall_s": round(seconds, 2),
              "images": images, "images_per_s": round(images / seconds, 3) if images and seconds > 0 else None,
              "inputs": inputs, "outputs": outputs}
    storage.write_json(storage.join(out_dir, STAGE_RECORD), record, storage_options)
    return record


def read_stage_record(out_dir: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """`{out_dir}/_stage.json`, or None when the stage has not completed there."""
    try:
        return storage.read_json(storage.join(out_dir, STAGE_RECORD), storage_options)
    except storage.NotFound:
        return None


# Stale outputs ---------------------------------------------------------------------------------
def archive(run_dir: str, stage_dir: str, stage: str, storage_options: dict[str, Any] | None = None) -> str | None:
    """Move a stale stage output under {run_dir}/archive/ before it is re-made; returns where."""
    if not storage.exists(stage_dir, storage_options):
        return None
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    dest = storage.join(run_dir, "archive", f"{stage}-{stamp}")
    fs, src = storage.filesystem(stage_dir, storage_options)
    _, dst = storage.filesystem(dest, storage_options)
    if storage.is_local(run_dir):
        fs.makedirs(storage.join(run_dir, "archive"), exist_ok=True)
    with WriterLease(stage_dir, storage_options):  # no stage may be writing what is moved
        with storage.translate_errors(stage_dir, storage_options):
            fs.mv(src, dst, recursive=True)
        for name in storage.listdir(dest, storage_options):  # the lease went along: not part of the archive
            if name.startswith(LEASE_PREFIX):
                storage.remove(storage.join(dest, name), storage_options=storage_options)
    return dest
