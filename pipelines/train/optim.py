"""Optimisation pieces a Train worker builds: AdamW with MAR's parameter groups, the warm-up
schedule, torch's EMA, and FSDP2 sharding per transformer block."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn


def learning_rate(train: Any) -> float:
    """The peak learning rate of a run: optim.lr, times global_batch / 256 under lr_scaling linear-256."""
    scale = train.global_batch / 256 if getattr(train.optim, "lr_scaling", "none") == "linear-256" else 1.0
    return train.optim.lr * scale


def make_optimizer(model: nn.Module, train: Any) -> torch.optim.Optimizer:
    """AdamW at `learning_rate(train)`; no weight decay on biases, norms and embeddings (1-D or named
    embeddings), as MAR."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "embed" in name or "token" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": train.optim.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=learning_rate(train), betas=tuple(train.optim.betas))


def make_scheduler(opt: torch.optim.Optimizer, train: Any) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warm-up, then constant or cosine, from torch's own schedulers."""
    from torch.optim import lr_scheduler as S

    warm = min(train.optim.warmup_steps, train.steps)
    rest = max(train.steps - warm, 1)
    main = (S.CosineAnnealingLR(opt, T_max=rest) if train.optim.schedule == "cosine"
            else S.ConstantLR(opt, factor=1.0, total_iters=0))
    if warm == 0:
        return main
    return S.SequentialLR(opt, [S.LinearLR(opt, start_factor=1.0 / warm, total_iters=warm), main], milestones=[warm])


def ema_decay_at(decay: float, n: int) -> float:
    """The decay of the n-th update (n >= 2) that keeps the average bias-corrected (as Adam's moments):
    after n updates it is sum_k (1 - d) d^(n-k) w_k / (1 - d^n), so the first weights seen weigh what
    any step of their age does. torch's plain EMA starts by copying them and keeps d^n of that copy:
    after 2,000 steps at d = 0.999 the sampled model still held 13.5% of the step-1 weights."""
    return decay * (1 - decay ** (n - 1)) / (1 - decay ** n)


def make_ema(model: nn.Module, decay: float, use_buffers: bool = True) -> torch.optim.swa_utils.AveragedModel:
    """torch's own EMA (AveragedModel with its EMA averaging function), bias-corrected: the n-th
    update uses `ema_decay_at(decay, n)`, which tends to `decay` as the run goes on. The count is
    AveragedModel's n_averaged (worker.restore sets it to the step a run resumes at).

    Under FSDP the buffers (fixed position tables) stay out of the average: they are plain
    tensors while the sharded parameters are DTensors, and one foreach update cannot mix them.
    """
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    def bias_corrected(averaged, current, num_averaged):
        # num_averaged None: a caller that updates without the count (benchmarks/gpu_suite.py's captured
        # step) gets the steady-state decay the correction tends to.
        d = decay if num_averaged is None else ema_decay_at(decay, int(num_averaged) + 1)
        get_ema_multi_avg_fn(d)(averaged, current, num_averaged)

    return AveragedModel(model, multi_avg_fn=bias_corrected, use_buffers=use_buffers)


def fsdp_shard(module: nn.Module, backbone: nn.Module) -> None:
    """FSDP2: each transformer block its own unit, then the rest under the root."""
    from torch.distributed.fsdp import fully_shard

    for block in backbone.blocks:
        fully_shard(block)
    fully_shard(module)

