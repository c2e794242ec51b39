"""`sar fid`: score a finished sample set with torch-fidelity and draw its grid.

Reads   the sample set (fid.samples, default cfg.samples_dir: _manifest.json, index.json and its
        images), the reference (fid.reference: ADM's VIRTUAL_imagenet256_labeled.npz or an
        image folder) and the Inception weights (fid.inception_weights, or torch-fidelity's
        download).
Writes  cfg.eval_dir (default {run_dir}/eval): metrics.json (fid, inception_score {mean, std},
        precision, recall, num_samples, the guidance, flow steps and checkpoint digest of the
        samples, the resolved config), grid.png (fid.grid_classes x fid.grid_per_class), and
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

import logging
import tempfile
import time
from typing import Any

import numpy as np

from jobs.config import PipelineConfig
from pipelines import fid, sampling, storage
from pipelines.errors import SarError

log = logging.getLogger(__name__)

METRICS_FILE, GRID_FILE = "metrics.json", "grid.png"


def write_grid(samples_dir: str, index: list[dict[str, Any]], classes: int, per_class: int, url: str,
               storage_options: dict[str, Any] | None = None) -> tuple[int, int]:
    """A classes x samples PNG grid: evenly spaced classes, the first samples of each; returns its shape."""
    by_label: dict[int, list[dict[str, Any]]] = {}
    for e in index:
        by_label.setdefault(int(e["label"]), []).append(e)
    labels = sorted(by_label)
    picked = [labels[int(i)] for i in np.unique(np.linspace(0, len(labels) - 1, min(classes, len(labels)))
                                                .round().astype(int))]
    per = min(per_class, min(len(by_label[c]) for c in picked))
    entries = [e for c in picked for e in sorted(by_label[c], key=lambda e: e["index"])[:per]]
    images = sampling.load_images(samples_dir, entries, storage_options)
    storage.write_bytes(url, sampling.grid_png(images.reshape(len(picked), per, *images.shape[1:])),
                        storage_options)
    return len(picked), per


def reference_or_reason(cfg: PipelineConfig) -> tuple[str | None, str | None]:
    """(reference URL, None), or (None, why FID is not computed)."""
    ref = cfg.fid.reference
    if not ref:
        return None, "fid.reference is not set (ADM's VIRTUAL_imagenet256_labeled.npz or an image folder)"
    if not storage.exists(ref, cfg.data.storage_options):
        return None, f"fid.reference {storage.redact(ref)} does not exist"
    return ref, None


def sample_fields(manifest: dict[str, Any]) -> dict[str, Any]:
    """What metrics.json records of the sample set it scored."""
    return {k: manifest.get(k) for k in ("num_samples", "guidance", "flow_steps", "checkpoint",
                                          "checkpoint_digest", "checkpoint_step")}


def write_without_inception(cfg: PipelineConfig, manifest: dict[str, Any], eval_dir: str, reason: str) -> int:
    """metrics.json when no Inception weights can be had (fid.on_missing_weights=skip)."""
    skipped = {"fid": reason, "inception_score": reason, "precision_recall": reason}
    metrics = {"fid": None, "inception_score": None, "precision": None, "recall": None, "skipped": skipped,
               **sample_fields(manifest), "samples": storage.redact(cfg.fid.samples or cfg.samples_dir),
               "config": cfg.public_dict()}
    storage.write_json(storage.join(eval_dir, METRICS_FILE), metrics, cfg.data.storage_options)
    print(f"metrics written to {storage.redact(eval_dir)}/{METRICS_FILE} without FID/IS: {reason}")
    return 0


def main(cfg: PipelineConfig, args=None) -> int:
    import torch

    # Setup: the finished sample set and where the scores go.
    so, f = cfg.data.storage_options, cfg.fid
    samples_dir = f.samples or cfg.samples_dir
    eval_dir = cfg.eval_dir
    manifest = sampling.read_manifest(samples_dir, so)
    index = sampling.read_index(samples_dir, so)
    if len(index) != manifest["num_samples"]:
        raise SarError(f"{storage.redact(samples_dir)}: index.json lists {len(index)} samples, the manifest "
                       f"{manifest['num_samples']}")
    shape = write_grid(samples_dir, index, f.grid_classes, f.grid_per_class,
                       storage.join(eval_dir, GRID_FILE), so)
    print(f"grid of {shape[0]} classes x {shape[1]} samples written to {storage.redact(eval_dir)}/{GRID_FILE}")

    # Model: the Inception, then the reference through it.
    cuda = torch.cuda.is_available()
    start = time.time()
    try:
        extractor = fid.load_inception(f.inception_weights, cuda, so)
    except SarError as err:
        if f.inception_weights or f.on_missing_weights != "skip":
            raise
        return write_without_inception(cfg, manifest, eval_dir, str(err))
    extractor_id = fid.weights_id(f.inception_weights, so)
    ref_url, reason = reference_or_reason(cfg)
    reference = None
    if ref_url:
        reference = fid.load_reference(
            ref_url, extractor, image_size=manifest.get("image_size"),
            cache_url=storage.join(eval_dir, fid.REFERENCE_CACHE), extractor_id=extractor_id,
            need_features=f.prc, batch_size=f.batch_size, cuda=cuda, storage_options=so)

    # Loop: features of every sample, then the metrics.
    with tempfile.TemporaryDirectory(prefix="sar-fid-") as staging:
        dataset = fid.samples_dataset(samples_dir, index, staging, so)
        scores = fid.compute_metrics(dataset, reference, extractor, batch_size=f.batch_size, cuda=cuda,
                                     isc=f.isc, prc=f.prc)
    if reason:
        scores["skipped"]["fid"] = reason
        if f.prc:
            scores["skipped"]["precision_recall"] = reason

    # Save.
    metrics = {
        **scores,
        "feature_extractor": fid.EXTRACTOR,
        "inception_weights": storage.redact(f.inception_weights) if f.inception_weights else extractor_id,
        "inception_weights_id": extractor_id,
        "reference": reference.source if reference else None,
        "reference_count": reference.count if reference else None,
        "samples": storage.redact(samples_dir),
        **{k: v for k, v in sample_fields(manifest).items() if k != "num_samples"},
        "seconds": round(time.time() - start, 1),
        "config": cfg.public_dict(),
    }
    storage.write_json(storage.join(eval_dir, METRICS_FILE), metrics, so)
    shown = {k: metrics[k] for k in ("fid", "inception_score", "precision", "recall", "num_samples")}
    print(f"metrics written to {storage.redact(eval_dir)}/{METRICS_FILE}: {shown}")
    for what, why in scores["skipped"].items():
        print(f"  {what} not computed: {why}")
    return 0
