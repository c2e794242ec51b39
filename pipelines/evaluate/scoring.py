"""Scoring a finished sample set, as `sar fid` does: the domain evaluator's metrics beside the real
floor, or torch-fidelity's Inception metrics, and the summary line.

`cfg` arguments are the resolved pipeline config (jobs/config.py), read as plain attributes.
"""

from __future__ import annotations

import tempfile
from typing import Any

import numpy as np
import torch

from pipelines.core import storage
from pipelines.core.errors import SarError
from pipelines.data import latents
from pipelines.evaluate import domain, domain_training, fidelity, sampling


def domain_scorer(cfg: Any, need_floor: bool = True) -> tuple[domain.DomainScorer, domain.RealSets]:
    """(scorer against the protocol's reference images, the real sets); trains the evaluator if missing."""
    so, d = cfg.data.storage_options, cfg.fid.domain
    meta = domain_training.ensure_evaluator(cfg.evaluator_path, cfg.data.source, split=cfg.data.split,
                                            image_size=d.image_size or cfg.encode.image_size, classes=cfg.data.classes,
                                            per_class=cfg.data.per_class, settings=d, storage_options=so)
    if storage.exists(storage.join(cfg.latents_dir, latents.MANIFEST), so):
        domain.check_classes(meta, latents.read_manifest(cfg.latents_dir, so).get("classes"),
                             storage.redact(cfg.evaluator_path))
    real = domain.real_sets(cfg.evaluator_path, cfg.data.source, d.reference_split, d.floor_split, need_floor, so)
    scorer = domain.DomainScorer(cfg.evaluator_path, real.reference, batch_size=cfg.fid.batch_size,
                                 cuda=torch.cuda.is_available(), storage_options=so)
    return scorer, real


FLOOR_KEYS = ("fid", "precision", "recall", "accuracy", "num_samples", "num_reference")


def domain_metrics(cfg: Any, dataset, labels: np.ndarray) -> dict[str, Any]:
    """The domain evaluator's scores of the samples against the reference images, and the floor: real
    images against the same reference, as many as the samples (docs/benchmarks.md, Quality)."""
    scorer, real = domain_scorer(cfg)
    scores = scorer.score(dataset, labels, prc=cfg.fid.prc)
    scores["reference"] = {"images": real.reference_from, "count": len(real.reference)}
    matched = domain.balanced_subset(real.floor, len(dataset))
    floor = scorer.score(matched, matched.labels, kid=False, prc=cfg.fid.prc)
    scores["floor"] = {**{k: floor[k] for k in FLOOR_KEYS}, "images": real.floor_from}
    if len(matched) < len(dataset):
        scores["floor"]["note"] = (f"only {len(matched)} real images for {len(dataset)} samples: FIDs of sets of "
                                   f"other sizes do not compare; sample fewer or give more {real.floor_from}")
    return scores


def inception_metrics(cfg: Any, dataset, manifest: dict[str, Any]) -> dict[str, Any]:
    """torch-fidelity's Inception metrics of the samples (FID and precision/recall need fid.reference)."""
    so, f, cuda = cfg.data.storage_options, cfg.fid, torch.cuda.is_available()
    try:
        extractor = fidelity.load_inception(f.inception_weights, cuda, so)
    except SarError as err:
        if f.inception_weights or f.on_missing_weights != "skip":
            raise
        return fidelity.skipped_metrics(str(err))
    extractor_id = fidelity.weights_id(f.inception_weights, so)
    reason = fidelity.reference_problem(f.reference, so)
    reference = None
    if reason is None:
        reference = fidelity.load_reference(
            f.reference, extractor, image_size=manifest.get("image_size"),
            cache_url=storage.join(cfg.eval_dir, fidelity.REFERENCE_CACHE), extractor_id=extractor_id,
            need_features=f.prc, batch_size=f.batch_size, cuda=cuda, storage_options=so)
    scores = fidelity.compute_metrics(dataset, reference, extractor, batch_size=f.batch_size, cuda=cuda,
                                 isc=f.isc, prc=f.prc)
    if reason:
        scores["skipped"]["fid"] = reason
        if f.prc:
            scores["skipped"]["precision_recall"] = reason
    return {**scores, "feature_extractor": fidelity.EXTRACTOR,
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
        floor = d["floor"]

        def shown(value):
            return "n/a" if value is None else f"{value:.3f}"
        parts.append(f"domain FID {shown(d['fid'])} ({d['num_samples']} samples vs {d['num_reference']} "
                     f"{d['reference']['images']} images; real floor {shown(floor['fid'])}, {floor['num_samples']} "
                     f"{floor['images']} vs the same {floor['num_reference']}), "
                     f"precision {shown(d['precision'])} recall {shown(d['recall'])} "
                     f"(floor {shown(floor['precision'])} {shown(floor['recall'])}), "
                     f"class accuracy {shown(d['accuracy'])} (floor: {shown(floor['accuracy'])})")
        skipped = {**metrics["skipped"], **{f"domain {k}": v for k, v in d["skipped"].items()}}
        metrics = {**metrics, "skipped": skipped}
    skipped = "; ".join(f"{what} not computed: {why}" for what, why in metrics["skipped"].items())
    return f"{metrics['num_samples']} samples: {', '.join(parts) or 'no metric'}" + (f"; {skipped}" if skipped else "")


def score_samples(cfg: Any, source: str, manifest: dict[str, Any], index: list[dict[str, Any]]) -> dict[str, Any]:
    """The scores of the set at `source` (its manifest and index) with the evaluator fid.evaluator names."""
    with tempfile.TemporaryDirectory(prefix="sar-fid-") as staging:
        dataset = fidelity.samples_dataset(source, index, staging, cfg.data.storage_options)
        if cfg.fid.evaluator == "domain":
            labels = np.array([e[sampling.LABEL] for e in index], dtype=np.int64)
            return fidelity.skipped_metrics("fid.evaluator is 'domain' (the dataset's own classifier)") | {
                "num_samples": len(dataset), "domain": domain_metrics(cfg, dataset, labels)}
        return inception_metrics(cfg, dataset, manifest)
