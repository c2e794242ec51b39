"""The training objectives: teacher forcing (pretrain) and self-autoregressive refinement (refine).

An objective wraps the SARModel; `forward(x, labels, generator, log_metrics)` returns (loss,
per-token loss (B, L), metrics) so the shared training loop (pipelines/train/worker.py) can run
either. `log_metrics` is False on the steps whose metrics the loop does not log: the metrics that
cost compute of their own (refine's exposure gap) are left out there.

Refinement (the refinement paper: eqs. 8-11, Algorithm 1, Table 5) is two backbone passes a step
with gradient (three forwards with the `cfg` sample step, whose unconditional pass has none):
  pass 1, teacher forcing: z^T from the ground truth, L_TF (eq. 9);
  the sample step, without gradient: predicted tokens x^T from the head at z^T (Table 5 modes);
  pass 2, stagger-scale rollout: both streams rebuilt from x^T (for next-scale, the upsampled
  predictions) give z^S; CSFL (eq. 10) trains the head at z^S toward the detached x^T (or the
  ground truth, Algorithm 1), over groups 2..T or one chosen group;
  L = L_TF + gamma * L_CSF (eq. 11).
`refine.rollout_groups` picks the rolled-out groups: all of them (the paper), or one group k whose
predictions feed group k + 1 while every other group keeps the ground truth (the released code's
one scale: k the second-to-last, the default, or k drawn per step), CSFL then on group k + 1 alone;
that sample step samples only groups k and k + 1, and the head's CSF loss runs on group k + 1 only.
`refine.rollout_fraction` < 1 (an approximation, off by default) takes the sample step, pass 2 and
CSFL on the first share of each micro-batch only.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from models import Guidance
from models.sar import gaussian_noise
from pipelines.core.errors import SarError


def group_buckets(group_index: torch.Tensor, num_groups: int) -> dict[str, torch.Tensor]:
    """Boolean masks over sequence positions for the early, middle and late thirds of the groups."""
    edges = np.linspace(0, num_groups, 4)
    return {name: (group_index >= edges[i]) & (group_index < edges[i + 1])
            for i, name in enumerate(("early", "middle", "late"))}


class Objective(nn.Module):
    """Base of a stage's objective: wraps the model; forward returns (loss, per-token loss, metrics)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model


class PretrainObjective(Objective):
    """Teacher forcing: the one-pass forward on ground truth and the flow-matching loss L_TF."""

    def forward(self, x: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None = None,
                log_metrics: bool = True):
        z = self.model(x, labels)  # (B, L, W); class dropout drawn inside in training
        per_token = self.model.head.loss(z, x)  # (B, L)
        return per_token.mean(), per_token, {}


class RefineObjective(Objective):
    """L = L_TF + gamma * L_CSF with one stagger-scale rollout per step.

    `settings` is the refine section of the config (jobs.config.RefineConfig): gamma,
    sample_mode, sample_steps, cfg_scale, target, group, rollout_groups, loss_reduction,
    rollout_fraction.
    """

    def __init__(self, model, settings: Any):
        super().__init__(model)
        self.settings = settings
        g = model.grouping
        csf = g.group_index >= 1  # eq. 10 sums i = 2..N: the first group sees no prediction
        if settings.group is not None:
            if not 0 <= settings.group < g.num_groups:
                raise SarError(f"refine.group: {settings.group} is not a group of {g.num_groups}")
            if getattr(settings, "rollout_groups", "all") != "all":
                raise SarError(f"refine.group: CSFL on a chosen group goes with rollout_groups all, not "
                               f"{settings.rollout_groups!r} (which picks its own group)")
            csf = g.group_index == settings.group
        if getattr(settings, "rollout_groups", "all") != "all" and g.num_groups < 2:
            raise SarError(f"refine.rollout_groups {settings.rollout_groups!r}: a grouping of one group has no "
                           f"next group to feed")
        self.register_buffer("csf_mask", csf, persistent=False)
        self.register_buffer("group_index", g.group_index.clone(), persistent=False)
        self.buckets = group_buckets(g.group_index, g.num_groups)

    def rollout_group(self, generator: torch.Generator | None) -> int | None:
        """The group k whose predictions pass 2 feeds to group k + 1, or None when every group is rolled out."""
        mode, last = getattr(self.settings, "rollout_groups", "all"), self.model.grouping.num_groups - 1
        if mode == "all":
            return None
        if mode == "second-to-last":
            return last - 1
        return int(torch.randint(0, last, (1,), generator=generator))  # random-one: k in 0..T-2

    def sample_weights(self, n: int) -> torch.Tensor:
        """cfg_ramped's guidance weight of every token (n, L): w_g = 1 + cfg_scale / 2 (1 + g / (T - 1))
        over the groups g = 0..T-1 (the released code's (1 + t) c - t u with t = s / 2 (1 + ratio))."""
        T = self.model.grouping.num_groups
        ratio = self.group_index.float() / max(T - 1, 1)                       # (L,)
        return (1 + self.settings.cfg_scale * 0.5 * (1 + ratio)).expand(n, -1)  # (n, L)

    @torch.no_grad()
    def rollout_tokens(self, x: torch.Tensor, labels: torch.Tensor, z_teacher: torch.Tensor,
                       generator: torch.Generator | None, positions: torch.Tensor | None = None) -> torch.Tensor:
        """The sample step: predicted tokens x^T at the teacher-forced conditions (no gradient), at every
        position (n, L, D), or at `positions` (P,) only (n, P, D): the head samples each token from its
        own condition, so a one-group rollout samples just the groups it feeds and targets.

        deterministic: the head's conditional mean, one evaluation from e = 0 (the argmax analogue);
        stochastic: the ODE from fresh noise; cfg: that ODE under classifier-free guidance, with
        the unconditional conditions from one more teacher-forced pass on the null class;
        x_cfg: the ODE under head-only guidance.
        """
        s, head = self.settings, self.model.head
        at = slice(None) if positions is None else positions
        z_cond = z_teacher[:, at]
        shape = (*z_cond.shape[:2], self.model.config.token_dim)
        if s.sample_mode == "deterministic":
            return head.sample(z_cond, torch.zeros(shape, device=z_teacher.device), 1, mode="one_step")
        z, guidance, weights = z_cond, Guidance(), None
        if s.sample_mode in ("cfg", "cfg_ramped"):
            null = torch.ones_like(labels, dtype=torch.bool)
            z = torch.cat([z_cond, self.model(x, labels, drop_labels=null)[:, at]])  # [cond; uncond]
            guidance = Guidance("cfg", cfg=s.cfg_scale)
            if s.sample_mode == "cfg_ramped":
                weights = self.sample_weights(x.shape[0])[:, at]
        elif s.sample_mode == "x_cfg":
            guidance = Guidance("x_cfg", w_x=s.x_cfg_scale)
        noise = gaussian_noise(shape, generator, z_teacher.device)
        return head.sample(z, noise, s.sample_steps, guidance, token_weights=weights,
                           step_noise=lambda: gaussian_noise(shape, generator, z_teacher.device))

    def forward(self, x: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None = None,
                log_metrics: bool = True):
        drop = self.model.class_dropout_mask(labels)  # the same draw for both passes
        head = self.model.head
        # Pass 1: teacher forcing.
        z_teacher = self.model(x, labels, drop_labels=drop)  # (B, L, W)
        tf = head.loss(z_teacher, x)  # (B, L)
        # The rollout takes the first n examples: all of them unless rollout_fraction < 1.
        n = math.ceil(self.settings.rollout_fraction * x.shape[0])
        x_r, labels_r, drop_r, z_t = x[:n], labels[:n], drop[:n], z_teacher[:n].detach()
        # The sample step, then pass 2 on streams rebuilt from the predictions alone (all groups), or
        # from the ground truth with group k's predictions in place (one group feeding the next: only
        # groups k and k + 1 are sampled, and the head's CSF loss is taken on group k + 1 alone).
        k = self.rollout_group(generator)
        if k is None:
            x_teacher = self.rollout_tokens(x_r, labels_r, z_t, generator)  # (n, L, D), no grad
            x_in, csf_at = x_teacher, self.csf_mask
        else:
            feed, csf_at = self.group_index == k, self.group_index == k + 1
            at = torch.nonzero(feed | csf_at).squeeze(1)
            x_teacher = x_r.clone()  # predictions at groups k and k + 1, the ground truth elsewhere
            x_teacher[:, at] = self.rollout_tokens(x_r, labels_r, z_t, generator, positions=at)
            x_in = torch.where(feed[None, :, None], x_teacher, x_r)
        z_student = self.model(x_in, labels_r, drop_labels=drop_r)  # (n, L, W)
        target = x_teacher if self.settings.target == "teacher" else x_r
        loss_tf = tf.mean()
        if k is None:
            loss_csf = self.reduce_csf(head.loss(z_student, target), csf_at)  # per-token (n, L)
        else:  # one group: the mean of its tokens, which is also eq. 10's sum over one group
            loss_csf = head.loss(z_student[:, csf_at], target[:, csf_at]).mean()
        loss = loss_tf + self.settings.gamma * loss_csf
        metrics = {"loss_tf": loss_tf.detach(), "loss_csf": loss_csf.detach()}
        if log_metrics:
            metrics.update(self.exposure_gap(z_student.detach(), z_t, x_teacher if k is None else None))
        return loss, tf, metrics

    def reduce_csf(self, csf: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """L_CSF from the per-token losses (n, L) on the positions of `mask` (L,): their mean, or (eq. 10)
        the sum over the groups of each group's mean."""
        if getattr(self.settings, "loss_reduction", "mean") == "mean":
            return csf[:, mask].mean()
        groups = torch.unique(self.group_index[mask])
        return sum(csf[:, self.group_index == g].mean() for g in groups)

    @torch.no_grad()
    def exposure_gap(self, z_student: torch.Tensor, z_teacher: torch.Tensor,
                     x_teacher: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Exposure-bias gap per bucket of groups: student vs teacher one-step clean estimates
        (`x_teacher`: the sample step's tokens at every position, or None when it sampled only some)."""
        head = self.model.head
        noise = torch.zeros(*z_student.shape[:2], self.model.config.token_dim, device=z_student.device)
        x_s = head.sample(z_student, noise, 1, mode="one_step")
        # The deterministic sample step already is the teacher's one-step estimate.
        x_t = x_teacher if self.settings.sample_mode == "deterministic" and x_teacher is not None else head.sample(
            z_teacher, noise, 1, mode="one_step")
        gap = (x_s - x_t).pow(2).mean(-1)  # (n, L)
        return {f"gap_{name}": gap[:, mask.to(gap.device)].mean() for name, mask in self.buckets.items()}


def make_objective(stage: str, model: nn.Module, settings: Any) -> Objective:
    """The objective of a training stage ('pretrain' or 'refine') around `model`."""
    if stage == "refine":
        return RefineObjective(model, settings)
    return PretrainObjective(model)
