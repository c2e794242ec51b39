"""Self-autoregressive refinement (the refinement paper: eqs. 8-11, Algorithm 1, Table 5).

Reads  a pretrain checkpoint (`refine.init`, default the newest under `{run_dir}/pretrain`;
EMA or raw weights) and `{run_dir}/latents`.
Writes `{run_dir}/refine`, laid out as pretrain's output.
Launch: `sar refine --config FILE [--set refine.gamma=0.5 ...]`.

Each step is two backbone passes:
  pass 1, teacher forcing: z^T from the ground truth, L_TF (eq. 9);
  the sample step, without gradient: predicted tokens x^T from the head at z^T (Table 5 modes);
  pass 2, stagger-scale rollout: both streams rebuilt from x^T (for next-scale, the upsampled
  predictions) give z^S; CSFL (eq. 10) trains the head at z^S toward the detached x^T (or the
  ground truth, Algorithm 1), over groups 2..T or one chosen group;
  L = L_TF + gamma * L_CSF (eq. 11).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from jobs import checkpoints
from jobs.config import PipelineConfig, RefineConfig
from jobs.pretrain import build_model, check_resumable, class_dropout_mask, data_bytes, token_space
from jobs.train import Objective, check_dataset, group_buckets, run_training
from pipelines import storage
from pipelines.errors import SarError

log = logging.getLogger("sar.refine")


class RefineObjective(Objective):
    """L = L_TF + gamma * L_CSF with one stagger-scale rollout per step."""

    def __init__(self, model, refine: RefineConfig):
        super().__init__(model)
        self.refine = refine
        g = model.grouping
        csf = g.group_index >= 1  # eq. 10 sums i = 2..N: the first group sees no prediction
        if refine.group is not None:
            if not 0 <= refine.group < g.num_groups:
                raise SarError(f"refine.group: {refine.group} is not a group of {g.num_groups}")
            csf = g.group_index == refine.group
        self.register_buffer("csf_mask", csf, persistent=False)
        self.buckets = group_buckets(g.group_index, g.num_groups)

    @torch.no_grad()
    def rollout_tokens(self, z_teacher: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """The sample step: predicted tokens x^T at the teacher-forced conditions (no gradient)."""
        r = self.refine
        if r.sample_mode == "deterministic":  # the head's conditional mean: one evaluation from e = 0
            noise = torch.zeros(*z_teacher.shape[:2], self.model.config.token_dim, device=z_teacher.device)
            return self.model.sample_from_z(z_teacher, noise=noise, mode="one_step")
        x_cfg = r.cfg_scale if r.sample_mode == "cfg" else 1.0
        return self.model.sample_from_z(z_teacher, generator=generator, steps=r.sample_steps, x_cfg=x_cfg, mode="ode")

    def forward(self, x: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None = None):
        drop = class_dropout_mask(labels, self.model.config.class_dropout, self.training)
        # Pass 1: teacher forcing.
        z_teacher = self.model(x, labels, drop_labels=drop)  # (B, L, W)
        tf = self.model.flow_loss(z_teacher, x)  # (B, L)
        # The sample step, then pass 2 on streams rebuilt from the predictions alone.
        x_teacher = self.rollout_tokens(z_teacher.detach(), generator)  # (B, L, D), no grad
        z_student = self.model(x_teacher, labels, drop_labels=drop)  # (B, L, W)
        target = x_teacher if self.refine.target == "teacher" else x
        csf = self.model.flow_loss(z_student, target)  # (B, L)
        csf_mask = self.csf_mask.to(csf.device)
        loss_tf = tf.mean()
        loss_csf = csf[:, csf_mask].mean()
        loss = loss_tf + self.refine.gamma * loss_csf
        metrics = {"loss_tf": loss_tf.detach(), "loss_csf": loss_csf.detach()}
        with torch.no_grad():  # exposure-bias gap: student vs teacher clean estimates, per bucket
            noise = torch.zeros_like(x)
            x_s = self.model.sample_from_z(z_student.detach(), noise=noise, mode="one_step")
            x_t = self.model.sample_from_z(z_teacher.detach(), noise=noise, mode="one_step")
            gap = (x_s - x_t).pow(2).mean(-1)  # (B, L)
            for name, mask in self.buckets.items():
                metrics[f"gap_{name}"] = gap[:, mask.to(gap.device)].mean()
        return loss, tf, metrics


def make_objective(cfg: PipelineConfig, loop_cfg: dict[str, Any]) -> RefineObjective:
    return RefineObjective(build_model(loop_cfg["model_config"]), cfg.refine)


def resolve_init(cfg: PipelineConfig) -> str:
    so = cfg.data.storage_options
    url = cfg.refine.init or checkpoints.find_latest(cfg.pretrain_dir, so)
    if url is None:
        raise SarError(f"no pretrain checkpoint under {storage.redact(cfg.pretrain_dir)}; run `sar pretrain` "
                       f"first or set refine.init")
    return url


def main(cfg: PipelineConfig, args=None) -> int:
    from jobs.run import training_inputs
    from jobs.runtime import init_ray
    from pipelines.latents import open_latents, read_manifest

    so = cfg.data.storage_options
    init = resolve_init(cfg)
    meta = checkpoints.read_meta(init, so)
    model_config = meta["model_config"]
    manifest = read_manifest(cfg.latents_dir, so)
    check_dataset(manifest, model_config, storage.redact(cfg.latents_dir))
    check_resumable(cfg.refine_dir, model_config, so)
    print(f"refining from {storage.redact(init)} (step {meta['step']}, {cfg.refine.init_weights} weights)")
    init_ray(cfg.cluster)
    dataset, _ = open_latents(cfg.latents_dir, so)
    metrics = run_training(cfg, "refine", cfg.refine_dir, make_objective, model_config, token_space(manifest),
                           dataset, extra={"init": (init, cfg.refine.init_weights),
                                  "inputs": training_inputs(cfg, "refine")},
                           data_bytes=data_bytes(manifest))
    print(f"refine done: step {metrics.get('step')}, loss_tf {metrics.get('loss_tf', float('nan')):.4f}, "
          f"loss_csf {metrics.get('loss_csf', float('nan')):.4f}")
    return 0
