"""Evaluation during training: every `eval_every` steps, sample a small fixed set with the EMA
weights and score it, so quality is seen moving, not only the loss.

The set is `eval_per_class` images of every class with fixed seeds (the same images at every
evaluation, so the rows compare checkpoints, not draws), generated with the sample section's
guidance and flow steps. It is scored like `sar fid` scores a finished set: by the domain
evaluator (fid.evaluator=domain: FID / precision / recall against its held-out real images, and
the class accuracy of the samples) or by Inception (fid.evaluator=inception, against
fid.reference, with fid.inception_weights).

Writes, in the training stage's folder:
    evals.jsonl            (by the training loop) one row per evaluation: step, fid, accuracy, precision,
                           recall, evaluator, num_samples, grid (rewritten whole at every evaluation)
    evals/step_{N:08d}.png a classes x samples grid of the evaluated images
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from pipelines.core import storage
from pipelines.core.errors import SarError
from pipelines.data.codecs import codec_from_manifest
from pipelines.evaluate import fidelity
from pipelines.evaluate.sampling import LABEL, SamplePlan, SampleSettings, grid_png
from pipelines.train import checkpoints

log = logging.getLogger("sar.eval")

EVALS_DIR = "evals"  # the grids; the rows go to the training loop's evals.jsonl (train/loop_config.py)


@dataclass(frozen=True)
class EvalSettings:
    """What an in-training evaluation makes and how it is scored; made by the stage's driver."""

    every: int                     # steps between evaluations
    per_class: int                 # images per class
    num_classes: int
    seed: int                      # the set's seeds derive from it (as sample.seed does)
    sample: Any                    # pipelines.evaluate.sampling.SampleSettings: guidance, flow steps, solver, ...
    evaluator: str                 # "domain" | "inception"
    token_space: dict[str, Any]    # the dataset's: how tokens decode to images
    evaluator_path: str | None = None   # domain: the evaluator file
    source: str | None = None           # domain: the dataset root the reference images are read from
    reference_split: str = "val"        # domain: fid.domain.reference_split (its held-out images if missing)
    reference: str | None = None        # inception: fid.reference
    inception_weights: str | None = None

    def build(self, stage_dir: str, device: torch.device,
              storage_options: dict[str, Any] | None = None) -> "TrainingEvaluator":
        """The scorer of one run on `device` (train.loop_config.Evaluation): made once, on rank 0."""
        return TrainingEvaluator(self, stage_dir, device, storage_options)


def in_training_evaluation(cfg: Any, stage: str, manifest: dict[str, Any]) -> EvalSettings | None:
    """The in-training evaluation of a training stage, or None when `{stage}.eval_every` is unset.

    `cfg` is the resolved jobs.config.PipelineConfig. The domain evaluator is trained here, in the
    driver, when it does not exist yet, so no worker waits for it.
    """
    train, so = getattr(cfg, stage), cfg.data.storage_options
    if not train.eval_every:
        return None
    if train.strategy == "fsdp" and train.num_workers > 1:
        raise SarError(f"{stage}.eval_every: in-training evaluation samples on rank 0 alone, which sharded "
                       f"(FSDP) weights do not allow; unset it or use {stage}.strategy=ddp")
    from pipelines.evaluate import domain, domain_training

    f, s = cfg.fid, cfg.sample
    extra: dict[str, Any] = {}
    if f.evaluator == "domain":
        meta = domain_training.ensure_evaluator(cfg.evaluator_path, cfg.data.source, split=cfg.data.split,
                                          image_size=f.domain.image_size or cfg.encode.image_size,
                                          classes=cfg.data.classes, per_class=cfg.data.per_class,
                                          settings=f.domain, storage_options=so)
        domain.check_classes(meta, manifest.get("classes"), storage.redact(cfg.evaluator_path))
        extra = {"evaluator_path": cfg.evaluator_path, "source": cfg.data.source,
                 "reference_split": f.domain.reference_split}
    else:
        if not (f.inception_weights and f.reference):
            raise SarError(f"{stage}.eval_every with fid.evaluator=inception needs fid.inception_weights and "
                           f"fid.reference (or set fid.evaluator=domain)")
        extra = {"reference": f.reference, "inception_weights": f.inception_weights}
    return EvalSettings(every=train.eval_every, per_class=train.eval_per_class,
                        num_classes=int(manifest.get("num_classes") or len(manifest.get("classes") or [])),
                        seed=s.seed, sample=SampleSettings.from_config(s), evaluator=f.evaluator,
                        token_space=checkpoints.token_space(manifest), **extra)


class TrainingEvaluator:
    """Generates the fixed evaluation set with a model and scores it; built once per run on rank 0."""

    def __init__(self, settings: EvalSettings, stage_dir: str, device: torch.device,
                 storage_options: dict[str, Any] | None = None):
        self.settings, self.stage_dir, self.device, self.so = settings, stage_dir, device, storage_options
        self.codec = codec_from_manifest(settings.token_space, storage_options).to(device).eval()
        self.rows = SamplePlan(settings.num_classes, settings.per_class, settings.seed).rows(
            range(settings.num_classes * settings.per_class))
        self.score = self._domain_scorer() if settings.evaluator == "domain" else self._inception_scorer()

    def _domain_scorer(self):
        from pipelines.evaluate import domain

        s = self.settings
        real = domain.real_sets(s.evaluator_path, s.source, s.reference_split, None, need_floor=False,
                                storage_options=self.so)
        scorer = domain.DomainScorer(s.evaluator_path, real.reference, batch_size=s.sample.batch_size,
                                     cuda=self.device.type == "cuda", storage_options=self.so)
        return lambda images, labels: scorer.score(images, labels, kid=False)

    def _inception_scorer(self):
        s, cuda = self.settings, self.device.type == "cuda"
        extractor = fidelity.load_inception(s.inception_weights, cuda, self.so)
        reference = fidelity.load_reference(
            s.reference, extractor, image_size=s.token_space.get("image_size"),
            cache_url=storage.join(self.stage_dir, EVALS_DIR, fidelity.REFERENCE_CACHE),
            extractor_id=fidelity.weights_id(s.inception_weights, self.so), need_features=True,
            batch_size=s.sample.batch_size, cuda=cuda, storage_options=self.so)

        def score(images, labels):
            out = fidelity.compute_metrics(images, reference, extractor, batch_size=s.sample.batch_size, cuda=cuda,
                                      isc=False)
            return {**out, "accuracy": None}
        return score

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module, step: int) -> dict[str, Any]:
        """Sample the set with `model` (the EMA weights), score it, write its grid; returns the row."""
        from pipelines.evaluate.domain import LabelledImages

        s, t0, was_training = self.settings, time.perf_counter(), model.training
        model.eval()
        try:
            images = s.sample.render(model, self.codec, self.rows, self.device)
        finally:
            model.train(was_training)
        labels = self.rows[LABEL]
        scores = self.score(LabelledImages(images, labels), labels)
        grid = f"{EVALS_DIR}/step_{step:08d}.png"
        storage.write_bytes(storage.join(self.stage_dir, grid),
                            grid_png(images.reshape(s.num_classes, s.per_class, *images.shape[1:])), self.so)
        return {"step": step, "fid": scores["fid"], "accuracy": scores["accuracy"],
                "precision": scores["precision"], "recall": scores["recall"], "evaluator": s.evaluator,
                "num_samples": len(images), "grid": grid, "seconds": round(time.perf_counter() - t0, 2)}

