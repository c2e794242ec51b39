"""`sar run`: encode, pretrain, refine, sample and fid in order, skipping what is up to date.

Reads and writes what the stages do (see each `jobs/<stage>.py`).
Launch: `sar run --config FILE [--from STAGE | --only STAGE] [--force]`; on a schedule through the
RayCronJob in `infra/kuberay/`.

Encode is incremental by itself (a grown source encodes only the new images). Every other stage
records the digest of what it consumed (the latents manifest, the checkpoint it started from or
sampled); a stage is skipped when its output is complete and those digests still match, and
re-run otherwise. A stage that must re-run over stale outputs first moves them to
`{run_dir}/archive/<stage>-<time>/`, so nothing already written is lost.
"""

from __future__ import annotations

import argparse
import datetime
import logging
from typing import Any, Callable

from jobs import checkpoints
from jobs.config import PipelineConfig
from pipelines import storage

log = logging.getLogger("sar.run")

STAGES = ("encode", "pretrain", "refine", "sample", "fid")
STALE = "made from other inputs"


def latents_digest(cfg: PipelineConfig) -> str | None:
    """Digest of the committed latents: their manifest without its timestamps and config."""
    from jobs.train import digest_of
    from pipelines.latents import MANIFEST

    url = storage.join(cfg.latents_dir, MANIFEST)
    so = cfg.data.storage_options
    if not storage.exists(url, so):
        return None
    manifest = storage.read_json(url, so)
    volatile = {"created", "updated", "config", "elapsed_s", "summary"}
    return digest_of({k: v for k, v in manifest.items() if k not in volatile})


def checkpoint_digest(stage_dir: str, so: dict[str, Any]) -> str | None:
    latest = checkpoints.find_latest(stage_dir, so)
    return checkpoints.read_meta(latest, so)["digest"] if latest else None


def training_inputs(cfg: PipelineConfig, stage: str) -> dict[str, Any]:
    """What a training stage consumes, recorded in its checkpoints' meta.json."""
    so = cfg.data.storage_options
    inputs: dict[str, Any] = {"latents": latents_digest(cfg)}
    if stage == "refine":
        inputs["init"] = checkpoint_digest(cfg.pretrain_dir, so) if cfg.refine.init is None else cfg.refine.init
    return inputs


def _training_up_to_date(cfg: PipelineConfig, stage: str, stage_dir: str) -> tuple[bool, str]:
    from jobs.train import RUN_CONFIG, config_fingerprint

    so = cfg.data.storage_options
    latest = checkpoints.find_latest(stage_dir, so)
    if latest is None:
        return False, "no checkpoint"
    meta = checkpoints.read_meta(latest, so)
    if meta.get("inputs") != training_inputs(cfg, stage):
        return False, STALE + " (its inputs changed)"
    bound = storage.join(stage_dir, RUN_CONFIG)
    if storage.exists(bound, so) and storage.read_json(bound, so) != config_fingerprint(cfg, stage):
        return False, STALE + " (its config changed)"
    if meta["step"] < getattr(cfg, stage).steps:
        return False, f"at step {meta['step']} of {getattr(cfg, stage).steps}"
    return True, f"step {meta['step']}, inputs unchanged"


def sample_checkpoint(cfg: PipelineConfig) -> str | None:
    so = cfg.data.storage_options
    return cfg.sample.checkpoint or checkpoints.find_latest(cfg.refine_dir, so) or checkpoints.find_latest(cfg.pretrain_dir, so)


def _sample_up_to_date(cfg: PipelineConfig) -> tuple[bool, str]:
    """Complete and made with the current checkpoint and settings (by the set's `_spec.json`)."""
    from pipelines.sampling import SPEC_FILE

    so = cfg.data.storage_options
    spec_url = storage.join(cfg.samples_dir, SPEC_FILE)
    if not storage.exists(spec_url, so):
        return False, "no samples"
    spec = storage.read_json(spec_url, so)
    ckpt = sample_checkpoint(cfg)
    want = {"checkpoint_digest": checkpoints.read_meta(ckpt, so)["digest"] if ckpt else None,
            "per_class": cfg.sample.per_class, "seed": cfg.sample.seed, "flow_steps": cfg.sample.flow_steps,
            "guidance": cfg.sample.guidance.model_dump(), "weights": cfg.sample.weights,
            "format": cfg.sample.format}
    changed = [k for k, v in want.items() if spec.get(k) != v]
    if changed:
        return False, STALE + f" ({', '.join(changed)})"
    if not storage.exists(storage.join(cfg.samples_dir, "_manifest.json"), so):
        return False, "incomplete: resuming"
    return True, f"{spec.get('num_samples')} samples of the current checkpoint"


def _fid_up_to_date(cfg: PipelineConfig) -> tuple[bool, str]:
    so = cfg.data.storage_options
    metrics_url = storage.join(cfg.eval_dir, "metrics.json")
    samples_url = storage.join(cfg.samples_dir, "_manifest.json")
    if not storage.exists(metrics_url, so) or not storage.exists(samples_url, so):
        return False, "no metrics"
    metrics, samples = storage.read_json(metrics_url, so), storage.read_json(samples_url, so)
    if metrics.get("checkpoint_digest") != samples.get("checkpoint_digest"):
        return False, "the samples changed"
    if metrics.get("num_samples") != samples.get("num_samples"):
        return False, "the sample count changed"
    return True, "metrics of the current samples"


def archive(cfg: PipelineConfig, stage_dir: str, stage: str) -> None:
    """Move a stale stage output under {run_dir}/archive/ before it is re-made."""
    so = cfg.data.storage_options
    if not storage.exists(stage_dir, so):
        return
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    dest = storage.join(cfg.run_dir, "archive", f"{stage}-{stamp}")
    fs, src = storage.filesystem(stage_dir, so)
    _, dst = storage.filesystem(dest, so)
    fs.makedirs(storage.join(cfg.run_dir, "archive") if storage.is_local(cfg.run_dir) else dst.rsplit("/", 1)[0],
                exist_ok=True)
    fs.mv(src, dst, recursive=True)
    print(f"  moved the stale {stage} output to {storage.redact(dest)}")


STAGE_DIRS: dict[str, Callable[[PipelineConfig], str]] = {
    "pretrain": lambda c: c.pretrain_dir, "refine": lambda c: c.refine_dir, "sample": lambda c: c.samples_dir}


def run_pipeline(cfg: PipelineConfig, args: argparse.Namespace,
                 stage_mains: dict[str, Callable[[PipelineConfig, argparse.Namespace], int]] | None = None) -> int:
    """Run the chosen stages; returns the first non-zero exit code, else 0."""
    import importlib

    force = getattr(args, "force", False)
    only, start = getattr(args, "only_stage", None), getattr(args, "from_stage", None)
    chosen = [only] if only else list(STAGES[STAGES.index(start):] if start else STAGES)
    mains = stage_mains or {s: importlib.import_module(f"jobs.{s}").main for s in STAGES}
    for stage in chosen:
        if stage == "encode":
            ok, why = False, "incremental"
        elif stage in ("pretrain", "refine"):
            ok, why = _training_up_to_date(cfg, stage, getattr(cfg, f"{stage}_dir"))
        elif stage == "sample":
            ok, why = _sample_up_to_date(cfg)
        else:
            ok, why = _fid_up_to_date(cfg)
        if ok and not force:
            print(f"[sar run] {stage}: up to date ({why}), skipped", flush=True)
            continue
        print(f"[sar run] {stage}: running ({why})", flush=True)
        if why.startswith(STALE):
            archive(cfg, STAGE_DIRS[stage](cfg), stage)
        stage_args = argparse.Namespace(force=force and stage == "encode", preview=False)
        rc = int(mains[stage](cfg, stage_args) or 0)
        if rc:
            print(f"[sar run] {stage} failed with exit code {rc}; later stages not run", flush=True)
            return rc
    return 0


def main(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    return run_pipeline(cfg, args)
