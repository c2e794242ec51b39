"""A refinement step's cost relative to a pretraining step (the refinement paper: "only one
additional forward pass").

    uv run python benchmarks/refine_step_cost.py [--preset tiny] [--grid 8] [--token-dim 48]
        [--batch 32] [--sample-steps 10] [--iters 12] [--warmup 2]

Same model (one set of weights), same batch of tokens in memory, same optimiser (jobs/train.py's
`make_optimizer` with the refine settings), same step as the training loop: forward, backward,
gradient clipping, AdamW, EMA update. Timed per objective:

  pretrain                  PretrainObjective: one teacher-forced pass, L_TF
  refine <mode>             RefineObjective for each `refine.sample_mode` (deterministic,
                            stochastic, cfg) with `refine.sample_steps` from the command line:
                            pass 1 (teacher forcing), the sample step, pass 2 (stagger-scale
                            rollout), L_TF + gamma L_CSF, and the exposure-gap metrics

The objectives take turns step by step, so the load of a shared machine falls on all alike;
printed are the mean and median ms/step and the ratio to pretraining (by medians). Forward
hooks count, per step, the backbone's forward passes, the passes a backward goes through, and
the flow head's evaluations. The sample step alone (`RefineObjective.rollout_tokens`: one head
evaluation for deterministic, `sample_steps` Euler evaluations of the head for stochastic, and
as many on a doubled batch for cfg's x-CFG) is timed separately, since it, not the backbone,
separates the three modes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from jobs.config import load_config  # noqa: E402
from jobs.pretrain import PretrainObjective  # noqa: E402
from jobs.refine import RefineObjective  # noqa: E402
from jobs.train import make_ema, make_optimizer  # noqa: E402
from models import build_model, count_parameters  # noqa: E402

MODES = ("deterministic", "stochastic", "cfg")


class PassCounter:
    """Counts backbone forwards, backbone backwards (a hook on each output that carries a
    gradient) and flow-head evaluations."""

    def __init__(self, model):
        self.counts: Counter = Counter()
        model.backbone.register_forward_hook(self._backbone)
        model.head.register_forward_hook(lambda m, i, o: self.counts.update(["head"]))

    def _backbone(self, module, inputs, output):
        self.counts["forward"] += 1
        if output.requires_grad:
            output.register_hook(lambda g: self.counts.update(["backward"]))

    def take(self) -> Counter:
        counts, self.counts = self.counts, Counter()
        return counts


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="sar-b" if cuda else "tiny")
    p.add_argument("--grid", type=int, default=16 if cuda else 8, help="token grid side")
    p.add_argument("--token-dim", type=int, default=16 if cuda else 48, help="16: KL-VAE; 48: demo's raw 4x4 px")
    p.add_argument("--grouping", default="next-neighbour")
    p.add_argument("--batch", type=int, default=64 if cuda else 32)
    p.add_argument("--sample-steps", type=int, default=10, help="refine.sample_steps (Euler steps of the sample step)")
    p.add_argument("--iters", type=int, default=12, help="timed steps per objective")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per objective")
    args = p.parse_args()

    device = torch.device("cuda" if cuda else "cpu")
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"refine step cost benchmark: {torch.get_num_threads()} torch threads on {os.cpu_count()} CPUs, "
          f"device {torch.cuda.get_device_name() if cuda else 'cpu'}")
    print(f"load: {load}")

    cfg = load_config("configs/demo.yaml", [f"refine.sample_steps={args.sample_steps}", "refine.optim.warmup_steps=0"])
    refine = cfg.refine
    torch.manual_seed(0)
    model = build_model(args.preset, token_dim=args.token_dim, height=args.grid, width=args.grid,
                        grouping=args.grouping, num_classes=10).to(device).train()
    g = model.grouping
    counter = PassCounter(model)
    objectives = {"pretrain": PretrainObjective(model)}
    for mode in MODES:
        objectives[f"refine {mode}"] = RefineObjective(model, refine.model_copy(update={"sample_mode": mode}))
    for objective in objectives.values():
        objective.to(device).train()
    opt = make_optimizer(objectives["pretrain"], refine)  # one optimiser over the shared weights
    ema = make_ema(model, refine.ema_decay)
    amp = device.type == "cuda" and refine.precision == "bf16"
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, g.seq_len, args.token_dim, generator=gen).to(device)
    labels = torch.randint(10, (args.batch,), generator=gen).to(device)
    print(f"model: {args.preset}, {count_parameters(model) / 1e6:.2f}M parameters, {g.name} {args.grid}x{args.grid} "
          f"({g.num_groups} groups, L={g.seq_len}, D={args.token_dim}), batch {args.batch}; refine.sample_steps "
          f"{refine.sample_steps}, cfg_scale {refine.cfg_scale}, head_batch_mul {model.config.head_batch_mul}")

    def step(objective) -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss, _, _ = objective(x, labels, gen)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), refine.optim.grad_clip)
        opt.step()
        ema.update_parameters(model)
        sync(device)

    # Passes per step (one untimed step each, which is also the first warm-up step).
    passes = {}
    for name, objective in objectives.items():
        counter.take()
        step(objective)
        passes[name] = counter.take()
    for _ in range(args.warmup - 1):
        for objective in objectives.values():
            step(objective)

    # The objectives take turns step by step.
    times: dict[str, list[float]] = {name: [] for name in objectives}
    for _ in range(args.iters):
        for name, objective in objectives.items():
            t0 = time.perf_counter()
            step(objective)
            times[name].append(time.perf_counter() - t0)

    # The sample step alone, at teacher-forced conditions, per mode (interleaved likewise).
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        z = model(x, labels).float()
    sample_times: dict[str, list[float]] = {mode: [] for mode in MODES}
    sample_heads = {}
    for i in range(args.warmup + args.iters):
        for mode in MODES:
            counter.take()
            t0 = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                objectives[f"refine {mode}"].rollout_tokens(z, gen)
            sync(device)
            if i >= args.warmup:
                sample_times[mode].append(time.perf_counter() - t0)
            sample_heads[mode] = counter.take()["head"]

    base = statistics.median(times["pretrain"])
    print(f"\n{'objective':24s}{'mean ms':>9s}{'median':>9s}{'ratio':>7s}{'backbone fwd':>14s}{'bwd':>5s}"
          f"{'head evals':>12s}{'sample step ms':>16s}   ({args.iters} timed steps each)")
    for name, t in times.items():
        med = statistics.median(t)
        mode = name.removeprefix("refine ")
        sample = (f"{statistics.median(sample_times[mode]) * 1e3:9.1f} ({sample_heads[mode]} head)"
                  if mode in sample_times else "")
        print(f"{name:24s}{statistics.fmean(t) * 1e3:9.1f}{med * 1e3:9.1f}{med / base:6.2f}x"
              f"{passes[name]['forward']:14d}{passes[name]['backward']:5d}{passes[name]['head']:12d}  {sample}")
    for mode in MODES:
        rest = statistics.median(times[f"refine {mode}"]) - statistics.median(sample_times[mode])
        print(f"refine {mode} without its sample step: {rest / base:.2f}x pretrain")
    print("ratio: median step / median pretrain step. head evals: the flow loss (one call over "
          "head_batch_mul x B x L rows per loss), the sample step, the two one-step estimates of the gap metric.")
    print(f"load: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")


if __name__ == "__main__":
    main()
