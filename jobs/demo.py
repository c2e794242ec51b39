"""`sar demo`: the whole pipeline at tiny scale on local Ray, from nothing.

Reads  nothing but `configs/demo.yaml` (or `--config`).
Writes `{run_dir}` (default `runs/demo`): a synthetic 10-class ImageNet under `imagenet/` (made
when missing), then latents, pretrain and refine checkpoints, samples, the evaluation, the run
report `report.html` and the MLflow store `mlflow/` (tracking.backend none: no store).
Launch: `uv run sar demo [--run-dir DIR]`. It is `sar run` with the demo config; running it
again skips every stage that is already up to date.
"""

from __future__ import annotations

import os
import time

from jobs.config import PipelineConfig
from jobs.run import run_pipeline
from pipelines.core import storage, tracking
from pipelines.data.synth import make_synthetic_imagenet

DEMO_CLASSES, DEMO_PER_CLASS, DEMO_SIZE = 10, 32, 48
# val/ is the reference the samples are scored against, test/ the floor's real images: as many as the
# demo's samples (sample.per_class), so the two FIDs compare (fid.domain.reference_split, floor_split).
DEMO_VAL_PER_CLASS = DEMO_TEST_PER_CLASS = 8


def main(cfg: PipelineConfig, tracker: tracking.Tracker = tracking.NULL) -> int:
    t0 = time.perf_counter()
    if storage.is_local(cfg.data.source) and not os.path.exists(os.path.join(cfg.data.source, "train")):
        s = make_synthetic_imagenet(cfg.data.source, classes=DEMO_CLASSES, per_class=DEMO_PER_CLASS,
                                    size=DEMO_SIZE, seed=0, val_per_class=DEMO_VAL_PER_CLASS,
                                    test_per_class=DEMO_TEST_PER_CLASS)
        print(f"[sar demo] synthesised {s.train_images} images of {s.classes} classes in {s.root}")
    rc = run_pipeline(cfg, tracker=tracker)
    if rc:
        return rc
    print(f"\n[sar demo] finished in {time.perf_counter() - t0:.0f} s")
    print(f"  grid:        {storage.join(cfg.eval_dir, 'grid.png')}")
    print(f"  metrics:     {storage.join(cfg.eval_dir, 'metrics.json')}")
    print(f"  checkpoints: {storage.join(cfg.pretrain_dir, 'checkpoints')}, {storage.join(cfg.refine_dir, 'checkpoints')}")
    print(f"  samples:     {cfg.samples_dir}")
    print(f"  report:      {storage.join(cfg.run_dir, 'report.html')}")
    return 0
