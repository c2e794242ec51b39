"""`sar run`: encode, pretrain, refine, sample and fid in order, skipping what is up to date.

Reads and writes what the stages do (see each `jobs/<stage>.py`), then `{run_dir}/report.html`.
Launch: `sar run --config FILE [--from STAGE | --only STAGE] [--force]`; on a schedule through the
RayCronJob in `infra/k8s/`.

Each stage module says what it consumes and whether its output is up to date (`status`), where
its output is (`output`), and runs (`main`). Encode is incremental by itself (a grown source
encodes only the new images); every other stage records the digests of what it consumed and
is re-run when they change. A stage that must re-run over outputs made from other inputs
first moves them to `{run_dir}/archive/<stage>-<time>/`, so nothing already written is lost.

Tracking (pipelines/tracking.py): every command on a run directory logs into that directory's
MLflow run (`open_tracker`), and each stage that runs, alone or here, into a run nested under it
(`run_stage`), which it gets as `args.tracker`.
"""

from __future__ import annotations

import argparse
import importlib
from types import ModuleType
from typing import Any

from jobs.config import PipelineConfig
from pipelines import rundir, storage, tracking

STAGES = ("encode", "pretrain", "refine", "sample", "fid")
TRACKED = (*STAGES, "run", "demo")  # the commands that log into the run directory's MLflow run


def open_tracker(cfg: PipelineConfig, command: str) -> tracking.Tracker:
    """The command's run: the run directory's parent run (reopened by every command on it), with the
    resolved public config as params; tracking.NULL when tracking.backend is none."""
    t = cfg.tracking
    return tracking.open_run(cfg.run_dir, backend=t.backend, uri=t.uri, experiment=t.experiment,
                             params=cfg.public_dict(), tags={"sar.command": command},
                             storage_options=cfg.data.storage_options)


def lineage_tags(cfg: PipelineConfig) -> dict[str, Any]:
    """What the run directory holds at the end of a command, by digest: the dataset, the newest checkpoints."""
    from pipelines import checkpoints, latents  # torch: loaded when a command ends, not to parse one

    so = cfg.data.storage_options
    return {"dataset.digest": latents.dataset_digest(cfg.latents_dir, so),
            "pretrain.checkpoint.digest": checkpoints.latest_digest(cfg.pretrain_dir, so),
            "refine.checkpoint.digest": checkpoints.latest_digest(cfg.refine_dir, so)}


def run_stage(cfg: PipelineConfig, name: str, stage: ModuleType, args: argparse.Namespace,
              tracker: tracking.Tracker) -> int:
    """`stage.main` inside a run nested under `tracker`, passed on as `args.tracker`.

    The nested run gets the stage's config section as params and, when the stage succeeds, what
    its `_stage.json` says it consumed and made (digests, as tags) and took (wall time, images/s),
    and what the stage's `tracked(cfg)`, where it has one, names: final metrics and files.
    """
    out, started = stage.output(cfg), rundir.now_utc()
    with tracker.stage(name, out, params={name: cfg.public_dict()[name]}) as st:
        rc = int(stage.main(cfg, argparse.Namespace(**{**vars(args), "tracker": st})) or 0)
        if rc:
            st.close("FAILED")
            return rc
        record = rundir.read_stage_record(out, cfg.data.storage_options)
        if record and record.get("finished", "") >= started:  # written by this launch (a preview writes none)
            st.set_tags({f"{side}.{k}": v for side in ("inputs", "outputs") for k, v in record[side].items()})
            st.log_metrics({k: record[k] for k in ("wall_s", "images", "images_per_s")}, prefix="stage/")
        if hasattr(stage, "tracked"):
            metrics, files = stage.tracked(cfg)
            st.log_metrics(metrics)
            for url in files:
                st.log_artifact(url)
    return 0


def run_pipeline(cfg: PipelineConfig, args: argparse.Namespace,
                 stages: dict[str, ModuleType] | None = None) -> int:
    """Run the chosen stages, then write the run report; returns the first non-zero exit code, else 0."""
    from jobs import report  # its readers load torch; parsing a command line should not

    force = getattr(args, "force", False)
    tracker = getattr(args, "tracker", None) or tracking.NULL
    only, start = getattr(args, "only_stage", None), getattr(args, "from_stage", None)
    chosen = [only] if only else list(STAGES[STAGES.index(start):] if start else STAGES)
    stages = stages or {name: importlib.import_module(f"jobs.{name}") for name in STAGES}
    rc = 0
    for name in chosen:
        stage = stages[name]
        status = stage.status(cfg)
        if status.up_to_date and not force:
            print(f"[sar run] {name}: up to date ({status.reason}), skipped", flush=True)
            continue
        print(f"[sar run] {name}: running ({status.reason})", flush=True)
        if status.stale:
            moved = rundir.archive(cfg.run_dir, stage.output(cfg), name, cfg.data.storage_options)
            if moved:
                print(f"  moved the stale {name} output to {storage.redact(moved)}", flush=True)
        rc = run_stage(cfg, name, stage, argparse.Namespace(force=force and name == "encode", preview=False), tracker)
        if rc:
            print(f"[sar run] {name} failed with exit code {rc}; later stages not run", flush=True)
            break
    report.main(cfg, argparse.Namespace(tracker=tracker))
    return rc


def main(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    return run_pipeline(cfg, args)
