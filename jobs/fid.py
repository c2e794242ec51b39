"""`sar fid`: score a finished sample set and draw its grid.

Reads   the sample set (fid.samples, default cfg.samples_dir: _manifest.json, index.json and its
        images); with fid.evaluator=inception the reference (fid.reference: ADM's
        VIRTUAL_imagenet256_labeled.npz or an image folder) and the Inception weights
        (fid.inception_weights, or torch-fidelity's download); with fid.evaluator=domain the
        domain evaluator (fid.domain.path, default {run_dir}/evaluator.pt, trained from
        data.source when missing) and its held-out real images.
Writes  cfg.eval_dir (default {run_dir}/eval): metrics.json (Inception: fid, inception_score
        {mean, std}, precision, recall; domain: a `domain` dict with fid, kid, precision, recall,
        the class accuracy of the samples and the same numbers for real held-out images; the
        samples' guidance, flow steps and checkpoint digest; the resolved config), grid.png
        (fid.grid_classes x fid.grid_per_class), reference_features.npz when an Inception
        reference is a folder (its features, computed once), _stage.json.
Launch  sar fid --config configs/imagenet256-sar-b-klvae.yaml
        --set fid.reference=s3://bucket/VIRTUAL_imagenet256_labeled.npz
        --set fid.inception_weights=s3://bucket/weights-inception-2015-12-05-6726825d.pth
        On a cluster, run it where a GPU is (a Ray Job with entrypoint_num_gpus=1): Inception
        on 50,000 images takes minutes on a GPU and hours on a CPU.
"""

from __future__ import annotations

import time

from jobs.config import PipelineConfig
from jobs.stages import StageOptions
from pipelines.core import rundir, storage, tracking
from pipelines.core.lease import stage_lease
from pipelines.evaluate import fidelity, sampling, scoring

STAGE = "fid"


def samples_dir(cfg: PipelineConfig) -> str:
    return cfg.fid.samples or cfg.samples_dir


def status(cfg: PipelineConfig) -> rundir.StageStatus:
    return fidelity.metrics_status(cfg.eval_dir, samples_dir(cfg), cfg.fid.evaluator, cfg.data.storage_options)


def main(cfg: PipelineConfig, options: StageOptions = StageOptions(), tracker: tracking.Tracker = tracking.NULL) -> int:
    """Score the set holding eval/'s writer lease (one run at a time writes it; a second exits 75)."""
    so, f, eval_dir, t0, started = cfg.data.storage_options, cfg.fid, cfg.eval_dir, time.time(), rundir.now_utc()
    with stage_lease(eval_dir, cfg.cluster, so) as lease:
        # Setup: the finished sample set and its grid.
        source = samples_dir(cfg)
        manifest, index = sampling.read_finished_set(source, so)
        shape = sampling.write_grid(source, index, f.grid_classes, f.grid_per_class,
                                    storage.join(eval_dir, fidelity.GRID_FILE), so)
        print(f"grid of {shape[0]} classes x {shape[1]} samples written to "
              f"{storage.redact(eval_dir)}/{fidelity.GRID_FILE}")

        # Loop: the chosen evaluator over every sample.
        scores = scoring.score_samples(cfg, source, manifest, index)

        # Save.
        lease.check()
        metrics = {**fidelity.sample_fields(manifest), **scores, "evaluator": f.evaluator,
                   "samples": storage.redact(source), "seconds": round(time.time() - t0, 1),
                   "config": cfg.public_dict()}
        fidelity.write_metrics(eval_dir, metrics, so)
        rundir.write_stage_record(eval_dir, STAGE, started=started, seconds=time.time() - t0,
                                  images=metrics["num_samples"],
                                  inputs={"samples": manifest.get("checkpoint_digest")},
                                  outputs={"metrics": fidelity.METRICS_FILE}, storage_options=so)
    print(f"metrics written to {storage.redact(eval_dir)}/{fidelity.METRICS_FILE}: {scoring.summary(metrics)}")
    return 0


def tracked(cfg: PipelineConfig) -> tuple[dict, list[str]]:
    """What this stage's MLflow run gets once it succeeds (jobs/run.py): the final metrics (with the
    domain evaluator's `domain` dict when it scored), metrics.json and the grid."""
    metrics = storage.read_json(storage.join(cfg.eval_dir, fidelity.METRICS_FILE), cfg.data.storage_options)
    final = {k: metrics.get(k) for k in ("fid", "inception_score", "precision", "recall", "domain")}
    return final, [storage.join(cfg.eval_dir, name) for name in (fidelity.METRICS_FILE, fidelity.GRID_FILE)]
