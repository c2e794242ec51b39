"""`sar plan`: what a run will read, write and take, printed before anything runs.

Reads   the config, and the latents' manifest (`{run_dir}/latents/_manifest.json`) when it exists;
        nothing else, and starts no Ray.
Prints  rows, bytes per stage, steps per epoch, the read rate a node must sustain, each stage's wall
        time on N GPUs, object-store requests per epoch, the checkpoint size
        (pipelines/train/plan.py says where each figure comes from: measured, projected, or given).
Launch  sar plan --config configs/imagenet256-sar-b-klvae.yaml [--gpus 8 --gpus 64] [--pretrain-rate 477]
"""

from __future__ import annotations

import argparse

from jobs.config import ConfigError, PipelineConfig
from pipelines.train.plan import plan_of


def main(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    """Print the plan of `cfg` on its dataset (the latents' manifest when there is one)."""
    rates = {stage: getattr(args, f"{stage}_rate", None) for stage in ("encode", "pretrain", "refine", "sample")}
    for stage, rate in rates.items():
        if rate is not None and rate <= 0:
            raise ConfigError(f"--{stage}-rate: {rate:g} is not a positive rate")
    gpus = getattr(args, "gpus", None)
    if gpus and min(gpus) < 1 or getattr(args, "gpus_per_node", 8) < 1:
        raise ConfigError(f"--gpus / --gpus-per-node: at least 1 (got {gpus}, {args.gpus_per_node})")
    plan = plan_of(cfg, gpus=gpus, gpus_per_node=args.gpus_per_node, rates=rates)
    print(plan.text(), flush=True)
    return 0
