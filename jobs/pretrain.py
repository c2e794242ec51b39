"""Self-token pretraining on Ray Train.

Reads  `{run_dir}/latents` (the encode stage's Parquet shards and manifest).
Writes `{run_dir}/pretrain`: `checkpoints/step_N/` (model, EMA, optimizer, scheduler, step, data
position, resolved config), `metrics.jsonl`, `loss.png`, `run_config.json`.
Launch: `sar pretrain --config FILE [--set pretrain.num_workers=8 ...]`, locally or through
`sar submit` on a cluster. Re-launching the same run resumes from its newest checkpoint.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from jobs import checkpoints
from jobs.config import PipelineConfig
from jobs.train import Objective, check_dataset, model_config_for, run_training
from pipelines import storage
from pipelines.errors import SarError

log = logging.getLogger("sar.pretrain")


def class_dropout_mask(labels: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Which examples train the unconditional backbone (the null class), drawn once per step."""
    if not training or p == 0:
        return torch.zeros_like(labels, dtype=torch.bool)
    return torch.rand(labels.shape[0], device=labels.device) < p


class PretrainObjective(Objective):
    """Teacher forcing: the one-pass forward on ground truth and the flow-matching loss L_TF."""

    def forward(self, x: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None = None):
        drop = class_dropout_mask(labels, self.model.config.class_dropout, self.training)
        z = self.model(x, labels, drop_labels=drop)  # (B, L, W)
        per_token = self.model.flow_loss(z, x)  # (B, L)
        return per_token.mean(), per_token, {}


def build_model(model_config: dict[str, Any]):
    return checkpoints.model_from_meta({"model_config": model_config})


def make_objective(cfg: PipelineConfig, loop_cfg: dict[str, Any]) -> PretrainObjective:
    return PretrainObjective(build_model(loop_cfg["model_config"]))


def token_space(manifest: dict[str, Any]) -> dict[str, Any]:
    return {k: manifest[k] for k in checkpoints.TOKEN_SPACE_FIELDS if k in manifest}


def data_bytes(manifest: dict[str, Any]) -> int:
    return sum(int(shard.get("bytes", 0)) for shard in manifest.get("shards", []))


def check_resumable(stage_dir: str, model_config: dict[str, Any], so: dict[str, Any]) -> None:
    """A run directory's checkpoints must have the architecture this launch would build."""
    latest = checkpoints.find_latest(stage_dir, so)
    if latest is None:
        return
    saved = checkpoints.read_meta(latest, so)["model_config"]
    for k, v in model_config.items():
        if k in saved and (list(v) if isinstance(v, tuple) else v) != saved[k]:
            raise SarError(f"{storage.redact(latest)} was trained with model {k}={saved[k]!r}, this config "
                           f"builds {k}={v!r}; use another run_dir")


def main(cfg: PipelineConfig, args=None) -> int:
    from jobs.run import training_inputs
    from jobs.runtime import init_ray
    from pipelines.latents import open_latents, read_manifest

    so = cfg.data.storage_options
    # Setup: the manifest check happens before any worker starts.
    manifest = read_manifest(cfg.latents_dir, so)
    model_config = model_config_for(cfg, manifest)
    check_dataset(manifest, model_config, storage.redact(cfg.latents_dir))
    check_resumable(cfg.pretrain_dir, model_config, so)
    init_ray(cfg.cluster)
    dataset, _ = open_latents(cfg.latents_dir, so)
    metrics = run_training(cfg, "pretrain", cfg.pretrain_dir, make_objective, model_config,
                           token_space(manifest), dataset, extra={"inputs": training_inputs(cfg, "pretrain")},
                           data_bytes=data_bytes(manifest))
    latest = checkpoints.find_latest(cfg.pretrain_dir, so)
    print(f"pretrain done: step {metrics.get('step')}, loss {metrics.get('loss', float('nan')):.4f}; "
          f"checkpoint {storage.redact(latest or '')}")
    return 0
