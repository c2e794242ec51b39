"""`sar run`: encode, pretrain, refine, sample and fid in order, skipping what is up to date.

Reads the images at `data.source`; writes under `run_dir` what each stage writes (`latents/`,
`pretrain/`, `refine/`, `samples/`, `eval/`), then `{run_dir}/report.html`.
Launch: `sar run --config FILE [--from STAGE | --only STAGE] [--force]`; without --config, the
config's defaults: the papers' reference run on ImageNet (`sar config show` prints every value);
`sar demo` is the small one. On a schedule: the RayCronJob in infra/k8s/.

Encode is incremental (a grown source encodes only the new images); every other stage records what
it consumed and runs again when that changes, after moving its old output to
`{run_dir}/archive/<stage>-<time>/`, so nothing already written is lost. SIGTERM or Ctrl-C stops the
stage under way at its next safe point and runs no later one; the same command goes on from there.
Every command logs into the run directory's MLflow run and each stage into a run nested under it
(`tracking` in the config; the last line printed says how to open it).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from jobs.config import PipelineConfig
from jobs.stages import NAMES, StageOptions, entry
from pipelines.core import rundir, stop, storage, tracking

TRACKED = (*NAMES, "run", "demo")  # the commands that log into the run directory's MLflow run


def open_tracker(cfg: PipelineConfig, command: str) -> tracking.Tracker:
    """The command's run: the run directory's parent run (reopened by every command on it), with the
    resolved public config as params; tracking.NULL when tracking.backend is none."""
    t = cfg.tracking
    return tracking.open_run(cfg.run_dir, backend=t.backend, uri=t.uri, experiment=t.experiment,
                             params=cfg.public_dict(), tags={"sar.command": command},
                             storage_options=cfg.data.storage_options)


def lineage_tags(cfg: PipelineConfig) -> dict[str, Any]:
    """What the run directory holds at the end of a command, by digest: the dataset, the newest checkpoints."""
    from pipelines.data import latents  # torch: loaded when a command ends, not to parse one
    from pipelines.train import checkpoints

    so = cfg.data.storage_options
    return {"dataset.digest": latents.dataset_digest(cfg.latents_dir, so),
            "pretrain.checkpoint.digest": checkpoints.latest_digest(cfg.pretrain_dir, so),
            "refine.checkpoint.digest": checkpoints.latest_digest(cfg.refine_dir, so)}


def run_stage(cfg: PipelineConfig, name: str, stage: ModuleType, options: StageOptions,
              tracker: tracking.Tracker) -> int:
    """`stage.main` inside a run nested under `tracker`, which the stage gets as its tracker.

    The nested run gets the stage's config section as params and, when the stage succeeds, what
    its `_stage.json` says it consumed and made (digests, as tags) and took (wall time, images/s),
    and what the stage's `tracked(cfg)`, where it has one, names: final metrics and files.
    """
    out, started = cfg.output_of(name), rundir.now_utc()
    with tracker.stage(name, out, params={name: cfg.public_dict()[name]}) as st:
        rc = int(stage.main(cfg, options, st) or 0)
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


def run_pipeline(cfg: PipelineConfig, *, start: str | None = None, only: str | None = None, force: bool = False,
                 tracker: tracking.Tracker = tracking.NULL, stages: dict[str, ModuleType] | None = None) -> int:
    """Run the chosen stages (all; from `start`; or `only` one), then write the run report; returns the
    first non-zero exit code, else 0. `stages` replaces entry modules (tests).

    Each stage module (jobs/stages.py lists them) says whether its output is up to date (`status`)
    and runs (`main`); its output is `cfg.output_of(stage)`. Each runs inside a run nested under
    `tracker` (`run_stage`), which it gets as its `tracker` argument.
    """
    from jobs import report  # its readers load torch; parsing a command line should not

    chosen = [only] if only else list(NAMES[NAMES.index(start):] if start else NAMES)
    rc = 0
    for name in chosen:
        stop.check(f"before {name}; the same command goes on from there")  # SIGTERM / SIGINT between stages
        stage = (stages or {}).get(name) or entry(name)
        status = stage.status(cfg)
        if status.up_to_date and not force:
            print(f"[sar run] {name}: up to date ({status.reason}), skipped", flush=True)
            continue
        print(f"[sar run] {name}: running ({status.reason})", flush=True)
        if status.stale:
            moved = rundir.archive(cfg.run_dir, cfg.output_of(name), name, cfg.data.storage_options)
            if moved:
                print(f"  moved the stale {name} output to {storage.redact(moved)}", flush=True)
        rc = run_stage(cfg, name, stage, StageOptions(force=force and name == "encode"), tracker)
        if rc:
            print(f"[sar run] {name} failed with exit code {rc}; later stages not run", flush=True)
            break
    report.main(cfg, tracker)
    return rc
