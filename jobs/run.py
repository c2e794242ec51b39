"""`sar run`: encode, pretrain, refine, sample and fid in order, skipping what is up to date.

Reads and writes what the stages do (see each `jobs/<stage>.py`).
Launch: `sar run --config FILE [--from STAGE | --only STAGE] [--force]`; on a schedule through the
RayCronJob in `infra/k8s/`.

Each stage module says what it consumes and whether its output is up to date (`status`), where
its output is (`output`), and runs (`main`). Encode is incremental by itself (a grown source
encodes only the new images); every other stage records the digests of what it consumed and
is re-run when they change. A stage that must re-run over outputs made from other inputs
first moves them to `{run_dir}/archive/<stage>-<time>/`, so nothing already written is lost.
"""

from __future__ import annotations

import argparse
import importlib
from types import ModuleType

from jobs.config import PipelineConfig
from pipelines import rundir, storage

STAGES = ("encode", "pretrain", "refine", "sample", "fid")


def run_pipeline(cfg: PipelineConfig, args: argparse.Namespace,
                 stages: dict[str, ModuleType] | None = None) -> int:
    """Run the chosen stages; returns the first non-zero exit code, else 0."""
    force = getattr(args, "force", False)
    only, start = getattr(args, "only_stage", None), getattr(args, "from_stage", None)
    chosen = [only] if only else list(STAGES[STAGES.index(start):] if start else STAGES)
    stages = stages or {name: importlib.import_module(f"jobs.{name}") for name in STAGES}
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
        rc = int(stage.main(cfg, argparse.Namespace(force=force and name == "encode", preview=False)) or 0)
        if rc:
            print(f"[sar run] {name} failed with exit code {rc}; later stages not run", flush=True)
            return rc
    return 0


def main(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    return run_pipeline(cfg, args)
