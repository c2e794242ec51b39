"""What the run report shows, read from a run directory's files, local or on an object store.

Reads (each part optional; a missing one is shown as "not run yet"), in each stage's output folder
(the caller passes their locations: a stage's `output` setting moves its folder out of run_dir)
    encode    _manifest.json                 the dataset: encoder, grid, rows, updated
    pretrain, refine
              checkpoints/step_N/meta.json   the newest checkpoint (train/checkpoints.py finds it):
                                             step, digest, inputs
              metrics.jsonl                  one row per log step: loss, loss_early.., lr, grad_norm,
                                             images_per_s, data_wait_fraction; refine adds loss_tf,
                                             loss_csf, gap_early/middle/late
              evals.jsonl                    one row per in-training evaluation: step, fid, accuracy,
                                             precision, recall, evaluator, num_samples, grid (a path
                                             relative to the stage folder)
    sample    _manifest.json                 the sample set: checkpoint_digest, num_samples, guidance
    fid       metrics.json, grid.png         the final metrics and sample grid
    every     _stage.json                    wall time, images, images/s, input and output digests
                                             (pipelines/core/rundir.py's `write_stage_record`)
and {run_dir}/_tracking.json, the MLflow run of the run directory (pipelines/core/tracking.py).
An unreadable file becomes a problem line of the report, never an error.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass, field
from typing import Any, Mapping

from pipelines.core import rundir, storage, tracking
from pipelines.data import latents
from pipelines.evaluate import fidelity, sampling
from pipelines.train import checkpoints
from pipelines.train.loop_config import EVALS, METRICS

STAGE_NAMES = ("encode", "pretrain", "refine", "sample", "fid")  # the places the report has (jobs/stages.py's names)
TRAINING = ("pretrain", "refine")


def iso_utc(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class StageFiles:
    """What the report knows of one stage; None where the stage left nothing."""

    name: str
    url: str                                  # the stage's output folder
    record: dict[str, Any] | None = None  # _stage.json
    manifest: dict[str, Any] | None = None  # latents/samples manifest, or eval/metrics.json
    checkpoint: dict[str, Any] | None = None  # newest checkpoint's meta.json, with "_url" and "_time"
    rows: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl
    evals: list[dict[str, Any]] = field(default_factory=list)  # evals.jsonl, each with "_grid" bytes or None
    problems: list[str] = field(default_factory=list)  # unreadable files, named

    @property
    def ran(self) -> bool:
        return bool(self.record or self.manifest or self.checkpoint or self.rows)


class _Reader:
    """Reads a stage's files; an unreadable file becomes a problem line of the stage, never an error."""

    def __init__(self, storage_options: dict[str, Any] | None):
        self.so = storage_options

    @staticmethod
    def url(stage: StageFiles, *parts: str) -> str:
        return storage.join(stage.url, *parts)

    def json(self, stage: StageFiles, *parts: str) -> dict[str, Any] | None:
        url = self.url(stage, *parts)
        try:
            value = storage.read_json(url, self.so)
        except storage.NotFound:
            return None
        except storage.StorageError as err:
            stage.problems.append(str(err))
            return None
        if not isinstance(value, dict):
            stage.problems.append(f"{storage.redact(url)}: expected a JSON object, got {type(value).__name__}")
            return None
        return value

    def jsonl(self, stage: StageFiles, *parts: str) -> list[dict[str, Any]]:
        url = self.url(stage, *parts)
        try:
            text = storage.read_text(url, self.so)
        except storage.NotFound:
            return []
        except (storage.StorageError, UnicodeDecodeError) as err:
            stage.problems.append(f"{storage.redact(url)}: {err}")
            return []
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                stage.problems.append(f"{storage.redact(url)} line {n}: not valid JSON ({err.msg}); skipped")
                continue
            if not isinstance(row, dict) or not isinstance(row.get("step"), (int, float)):
                stage.problems.append(f"{storage.redact(url)} line {n}: no numeric 'step'; skipped")
                continue
            rows.append(row)
        return rows

    def binary(self, stage: StageFiles, *parts: str, required: bool = True) -> bytes | None:
        """A file's bytes; a missing one is a problem only when something names it (`required`)."""
        try:
            return storage.read_bytes(self.url(stage, *parts), self.so)
        except storage.NotFound:
            if required:
                stage.problems.append(f"{storage.redact(self.url(stage, *parts))}: not found")
        except storage.StorageError as err:
            stage.problems.append(str(err))
        return None

    def mtime(self, stage: StageFiles, *parts: str) -> str | None:
        """The modification time of a file as ISO UTC, when the filesystem tells it."""
        try:
            fs, path = storage.filesystem(self.url(stage, *parts), self.so)
            info = fs.info(path)
        except (OSError, ValueError):
            return None
        t = info.get("mtime") or info.get("LastModified") or info.get("created")
        if isinstance(t, datetime.datetime):
            return t.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        return iso_utc(float(t)) if isinstance(t, (int, float)) else None

    def newest_checkpoint(self, stage: StageFiles) -> dict[str, Any] | None:
        """meta.json of the newest committed checkpoint, found as a training stage finds it."""
        try:
            latest = checkpoints.find_latest(stage.url, self.so)
            if latest is None:
                return None
            meta = checkpoints.read_meta(latest, self.so)
        except (storage.StorageError, ValueError) as err:  # ValueError: meta.json changed under us
            stage.problems.append(str(err))
            return None
        name = latest.rstrip("/").rsplit("/", 1)[-1]
        return {**meta, "_url": storage.redact(latest),
                "_time": self.mtime(stage, checkpoints.CHECKPOINTS, name, checkpoints.META_FILE)}


def collect(outputs: Mapping[str, str], storage_options: dict[str, Any] | None = None) -> dict[str, StageFiles]:
    """Every stage's files, read once; `outputs` maps each stage name (STAGE_NAMES) to its folder."""
    r = _Reader(storage_options)
    if set(outputs) != set(STAGE_NAMES):
        raise ValueError(f"the report reads the stages {STAGE_NAMES}, got folders for {tuple(outputs)}")
    stages = {name: StageFiles(name, str(outputs[name]).rstrip("/")) for name in STAGE_NAMES}
    for s in stages.values():
        s.record = r.json(s, rundir.STAGE_RECORD)
    enc = stages["encode"]
    enc.manifest = r.json(enc, latents.MANIFEST)
    if enc.manifest is not None:
        enc.manifest["_time"] = r.mtime(enc, latents.MANIFEST)
    for name in TRAINING:
        s = stages[name]
        s.checkpoint = r.newest_checkpoint(s)
        s.rows = r.jsonl(s, METRICS)
        s.evals = r.jsonl(s, EVALS)
        for row in s.evals:
            grid = row.get("grid")
            row["_grid"] = r.binary(s, *grid.split("/")) if isinstance(grid, str) and grid else None
    smp = stages["sample"]
    smp.manifest = r.json(smp, sampling.MANIFEST_FILE)
    if smp.manifest is not None:
        smp.manifest["_time"] = r.mtime(smp, sampling.MANIFEST_FILE)
    ev = stages["fid"]
    ev.manifest = r.json(ev, fidelity.METRICS_FILE)
    if ev.manifest is not None:
        ev.manifest["_time"] = r.mtime(ev, fidelity.METRICS_FILE)
        ev.manifest["_grid"] = r.binary(ev, fidelity.GRID_FILE, required=False)
    return stages


def tracking_line(run_dir: str, storage_options: dict[str, Any] | None = None) -> str | None:
    """Which MLflow run holds the run directory's records, from its _tracking.json; None without one."""
    try:
        record = storage.read_json(storage.join(run_dir, tracking.RECORD), storage_options)
        return f"MLflow run {record.get('run_id')} (store: {record.get('store')})"
    except (storage.StorageError, AttributeError):
        return None
