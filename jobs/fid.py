"""`sar fid`: score a finished sample set with torch-fidelity and draw its grid.

Reads   the sample set (fid.samples, default cfg.samples_dir: _manifest.json, index.json and its
        images), the reference (fid.reference: ADM's VIRTUAL_imagenet256_labeled.npz or an
        image folder) and the Inception weights (fid.inception_weights, or torch-fidelity's
        download).
Writes  cfg.eval_dir (default {run_dir}/eval): metrics.json (fid, inception_score {mean, std},
        precision, recall, num_samples, the guidance, flow steps and checkpoint digest of the
        samples, the resolved config), grid.png (fid.grid_classes x fid.grid_per_class),
        reference_features.npz when the reference is a folder (its features, computed once).
Launch  sar fid --config configs/imagenet256-sar-b-klvae.yaml
        --set fid.reference=s3://bucket/VIRTUAL_imagenet256_labeled.npz
        --set fid.inception_weights=s3://bucket/weights-inception-2015-12-05-6726825d.pth
        On a cluster, run it where a GPU is (a Ray Job with entrypoint_num_gpus=1): Inception
        on 50,000 images takes minutes on a GPU and hours on a CPU.

Without a reference, FID and precision/recall are not computed (metrics.json says why) and the
Inception Score still is.
"""

from __future__ import annotations

import tempfile
import time

from jobs.config import PipelineConfig
from pipelines import fid, rundir, sampling, storage
from pipelines.errors import SarError

STAGE = "fid"


def output(cfg: PipelineConfig) -> str:
    return cfg.eval_dir


def samples_dir(cfg: PipelineConfig) -> str:
    return cfg.fid.samples or cfg.samples_dir


def status(cfg: PipelineConfig) -> rundir.StageStatus:
    return fid.metrics_status(cfg.eval_dir, samples_dir(cfg), cfg.data.storage_options)


def main(cfg: PipelineConfig, args=None) -> int:
    import torch

    # Setup: the finished sample set and its grid.
    so, f, eval_dir, t0 = cfg.data.storage_options, cfg.fid, cfg.eval_dir, time.time()
    started, source = rundir.now_utc(), samples_dir(cfg)
    manifest = sampling.read_manifest(source, so)
    index = sampling.read_index(source, so)
    if len(index) != manifest["num_samples"]:
        raise SarError(f"{storage.redact(source)}: index.json lists {len(index)} samples, the manifest "
                       f"{manifest['num_samples']}")
    shape = sampling.write_grid(source, index, f.grid_classes, f.grid_per_class,
                                storage.join(eval_dir, fid.GRID_FILE), so)
    print(f"grid of {shape[0]} classes x {shape[1]} samples written to {storage.redact(eval_dir)}/{fid.GRID_FILE}")
    record = {"samples": storage.redact(source), **fid.sample_fields(manifest), "config": cfg.public_dict()}

    # Model: the Inception, then the reference through it.
    cuda = torch.cuda.is_available()
    try:
        extractor = fid.load_inception(f.inception_weights, cuda, so)
    except SarError as err:
        if f.inception_weights or f.on_missing_weights != "skip":
            raise
        fid.write_metrics(eval_dir, fid.skipped_metrics(str(err)) | record, so)
        print(f"metrics written to {storage.redact(eval_dir)}/{fid.METRICS_FILE} without FID/IS: {err}")
        return 0
    extractor_id = fid.weights_id(f.inception_weights, so)
    reference, reason = None, fid.reference_problem(f.reference, so)
    if reason is None:
        reference = fid.load_reference(
            f.reference, extractor, image_size=manifest.get("image_size"),
            cache_url=storage.join(eval_dir, fid.REFERENCE_CACHE), extractor_id=extractor_id,
            need_features=f.prc, batch_size=f.batch_size, cuda=cuda, storage_options=so)

    # Loop: features of every sample, then the metrics.
    with tempfile.TemporaryDirectory(prefix="sar-fid-") as staging:
        dataset = fid.samples_dataset(source, index, staging, so)
        scores = fid.compute_metrics(dataset, reference, extractor, batch_size=f.batch_size, cuda=cuda,
                                     isc=f.isc, prc=f.prc)
    if reason:
        scores["skipped"]["fid"] = reason
        if f.prc:
            scores["skipped"]["precision_recall"] = reason

    # Save.
    metrics = {**scores, **record, "feature_extractor": fid.EXTRACTOR,
               "inception_weights": storage.redact(f.inception_weights) if f.inception_weights else extractor_id,
               "inception_weights_id": extractor_id,
               "reference": reference.source if reference else None,
               "reference_count": reference.count if reference else None,
               "num_samples": scores["num_samples"], "seconds": round(time.time() - t0, 1)}
    fid.write_metrics(eval_dir, metrics, so)
    rundir.write_stage_record(eval_dir, STAGE, started=started, seconds=time.time() - t0,
                              images=scores["num_samples"], inputs={"samples": manifest.get("checkpoint_digest")},
                              outputs={k: metrics[k] for k in ("fid", "precision", "recall")}, storage_options=so)
    shown = {k: metrics[k] for k in ("fid", "inception_score", "precision", "recall", "num_samples")}
    print(f"metrics written to {storage.redact(eval_dir)}/{fid.METRICS_FILE}: {shown}")
    for what, why in scores["skipped"].items():
        print(f"  {what} not computed: {why}")
    return 0


def tracked(cfg: PipelineConfig) -> tuple[dict, list[str]]:
    """What this stage's MLflow run gets once it succeeds (jobs/run.py): the final metrics (with the
    domain evaluator's `domain` dict when it scored), metrics.json and the grid."""
    metrics = storage.read_json(storage.join(cfg.eval_dir, fid.METRICS_FILE), cfg.data.storage_options)
    final = {k: metrics.get(k) for k in ("fid", "inception_score", "precision", "recall", "domain")}
    return final, [storage.join(cfg.eval_dir, name) for name in (fid.METRICS_FILE, fid.GRID_FILE)]
