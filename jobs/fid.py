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

import tempfile
import time
from typing import Any

import numpy as np

from jobs.config import PipelineConfig
from pipelines import evaluator, fid, latents, rundir, sampling, storage
from pipelines.errors import SarError
from pipelines.lease import stage_lease

STAGE = "fid"


def output(cfg: PipelineConfig) -> str:
    return cfg.eval_dir


def samples_dir(cfg: PipelineConfig) -> str:
    return cfg.fid.samples or cfg.samples_dir


def status(cfg: PipelineConfig) -> rundir.StageStatus:
    return fid.metrics_status(cfg.eval_dir, samples_dir(cfg), cfg.fid.evaluator, cfg.data.storage_options)


def domain_scorer(cfg: PipelineConfig, reference_size: int | None = None) -> tuple[evaluator.DomainScorer, Any]:
    """(scorer against the evaluator's held-out real images, those images); trains the evaluator if missing."""
    import torch

    so, d = cfg.data.storage_options, cfg.fid.domain
    meta = evaluator.ensure_evaluator(cfg.evaluator_path, cfg.data.source, split=cfg.data.split,
                                      image_size=d.image_size or cfg.encode.image_size, classes=cfg.data.classes,
                                      per_class=cfg.data.per_class, settings=d, storage_options=so)
    if storage.exists(storage.join(cfg.latents_dir, latents.MANIFEST), so):
        evaluator.check_classes(meta, latents.read_manifest(cfg.latents_dir, so).get("classes"),
                                storage.redact(cfg.evaluator_path))
    reference = evaluator.reference_images(cfg.evaluator_path, cfg.data.source, so)
    scorer = evaluator.DomainScorer(cfg.evaluator_path, reference, batch_size=cfg.fid.batch_size,
                                    cuda=torch.cuda.is_available(), storage_options=so)
    return scorer, reference


def domain_metrics(cfg: PipelineConfig, dataset, labels: np.ndarray) -> dict[str, Any]:
    """The domain evaluator's scores of the samples, and of real held-out images for scale."""
    scorer, reference = domain_scorer(cfg)
    scores = scorer.score(dataset, labels, prc=cfg.fid.prc)
    # Real images against real images: one half of the held-out set scored against the other.
    half_a, half_b = reference.halves()
    real = evaluator.DomainScorer(cfg.evaluator_path, half_b, batch_size=cfg.fid.batch_size, cuda=scorer.cuda,
                                  storage_options=cfg.data.storage_options).score(half_a, half_a.labels, kid=False)
    scores["real_heldout"] = {k: real[k] for k in ("fid", "precision", "recall", "accuracy", "num_samples",
                                                   "num_reference")}
    return scores


def inception_metrics(cfg: PipelineConfig, dataset, manifest: dict[str, Any]) -> dict[str, Any]:
    """torch-fidelity's Inception metrics of the samples (FID and precision/recall need fid.reference)."""
    import torch

    so, f, cuda = cfg.data.storage_options, cfg.fid, torch.cuda.is_available()
    try:
        extractor = fid.load_inception(f.inception_weights, cuda, so)
    except SarError as err:
        if f.inception_weights or f.on_missing_weights != "skip":
            raise
        return fid.skipped_metrics(str(err))
    extractor_id = fid.weights_id(f.inception_weights, so)
    reason = fid.reference_problem(f.reference, so)
    reference = None
    if reason is None:
        reference = fid.load_reference(
            f.reference, extractor, image_size=manifest.get("image_size"),
            cache_url=storage.join(cfg.eval_dir, fid.REFERENCE_CACHE), extractor_id=extractor_id,
            need_features=f.prc, batch_size=f.batch_size, cuda=cuda, storage_options=so)
    scores = fid.compute_metrics(dataset, reference, extractor, batch_size=f.batch_size, cuda=cuda,
                                 isc=f.isc, prc=f.prc)
    if reason:
        scores["skipped"]["fid"] = reason
        if f.prc:
            scores["skipped"]["precision_recall"] = reason
    return {**scores, "feature_extractor": fid.EXTRACTOR,
            "inception_weights": storage.redact(f.inception_weights) if f.inception_weights else extractor_id,
            "inception_weights_id": extractor_id,
            "reference": reference.source if reference else None,
            "reference_count": reference.count if reference else None}


def summary(metrics: dict[str, Any]) -> str:
    """The closing line: the numbers that were computed, and what was not."""
    parts = []
    if metrics.get("fid") is not None:
        parts.append(f"FID {metrics['fid']:.3f}")
    if metrics.get("inception_score"):
        parts.append(f"IS {metrics['inception_score']['mean']:.2f}")
    if metrics.get("precision") is not None:
        parts.append(f"precision {metrics['precision']:.3f} recall {metrics['recall']:.3f}")
    d = metrics.get("domain")
    if d:
        real = d["real_heldout"]

        def shown(value):
            return "n/a" if value is None else f"{value:.3f}"
        parts.append(f"domain FID {shown(d['fid'])} (real held-out images: {shown(real['fid'])}), "
                     f"class accuracy {shown(d['accuracy'])} (real: {shown(real['accuracy'])})")
        skipped = {**metrics["skipped"], **{f"domain {k}": v for k, v in d["skipped"].items()}}
        metrics = {**metrics, "skipped": skipped}
    skipped = "; ".join(f"{what} not computed: {why}" for what, why in metrics["skipped"].items())
    return f"{metrics['num_samples']} samples: {', '.join(parts) or 'no metric'}" + (f"; {skipped}" if skipped else "")


def main(cfg: PipelineConfig, args=None) -> int:
    """Score the set holding eval/'s writer lease (one run at a time writes it; a second exits 75)."""
    with stage_lease(cfg.eval_dir, cfg.cluster, cfg.data.storage_options) as lease:
        return score(cfg, lease)


def score(cfg: PipelineConfig, lease) -> int:
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

    # Model and loop: the chosen evaluator over every sample.
    with tempfile.TemporaryDirectory(prefix="sar-fid-") as staging:
        dataset = fid.samples_dataset(source, index, staging, so)
        if f.evaluator == "domain":
            labels = np.array([e[sampling.LABEL] for e in index], dtype=np.int64)
            scores = fid.skipped_metrics("fid.evaluator is 'domain' (the dataset's own classifier)") | {
                "num_samples": len(dataset), "domain": domain_metrics(cfg, dataset, labels)}
        else:
            scores = inception_metrics(cfg, dataset, manifest)

    # Save.
    lease.check()
    metrics = {**fid.sample_fields(manifest), **scores, "evaluator": f.evaluator, "samples": storage.redact(source),
               "seconds": round(time.time() - t0, 1), "config": cfg.public_dict()}
    fid.write_metrics(eval_dir, metrics, so)
    rundir.write_stage_record(eval_dir, STAGE, started=started, seconds=time.time() - t0,
                              images=metrics["num_samples"], inputs={"samples": manifest.get("checkpoint_digest")},
                              outputs={"metrics": fid.METRICS_FILE}, storage_options=so)
    print(f"metrics written to {storage.redact(eval_dir)}/{fid.METRICS_FILE}: {summary(metrics)}")
    return 0


def tracked(cfg: PipelineConfig) -> tuple[dict, list[str]]:
    """What this stage's MLflow run gets once it succeeds (jobs/run.py): the final metrics (with the
    domain evaluator's `domain` dict when it scored), metrics.json and the grid."""
    metrics = storage.read_json(storage.join(cfg.eval_dir, fid.METRICS_FILE), cfg.data.storage_options)
    final = {k: metrics.get(k) for k in ("fid", "inception_score", "precision", "recall", "domain")}
    return final, [storage.join(cfg.eval_dir, name) for name in (fid.METRICS_FILE, fid.GRID_FILE)]
