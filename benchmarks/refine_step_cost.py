"""A refinement step's cost relative to a pretraining step (the refinement paper: "only one
additional forward pass").

    uv run python -u benchmarks/refine_step_cost.py --threads 1     # CPU: 16x16, depth 8 x 256, batch 8
    uv run python benchmarks/refine_step_cost.py --preset tiny --grid 8 --token-dim 48 --batch 32 \
        --depth 2 --hidden-size 64                                   # the demo's token space and model

Same model (one set of weights), same batch of tokens in memory, same optimiser (the training
loop's `make_optimizer` with the refine settings), and the loop's own step
(pipelines/train/worker.py `train_step`: forward, backward, gradient clipping, AdamW, EMA update).
Timed per objective:

  pretrain                  PretrainObjective: one teacher-forced pass, L_TF
  refine <mode>             RefineObjective for each `refine.sample_mode` (deterministic,
                            stochastic, cfg) with `refine.sample_steps` from the command line:
                            pass 1 (teacher forcing), the sample step, pass 2 (stagger-scale
                            rollout), L_TF + gamma L_CSF
  refine <mode> f=<F>       the same with `refine.rollout_fraction` F < 1 (an approximation: the
                            sample step, pass 2 and L_CSF on the first F of the batch)

The timed steps are the loop's ordinary steps (`log_metrics` False); a log step adds the
exposure-gap metric (one head evaluation in deterministic mode, two otherwise).

The objectives take turns step by step, so the load of a shared machine falls on all alike;
printed are the fastest, median and mean ms/step, the fastest CPU ms/step of this process and the
ratios to pretraining (fastest steps: the figures other processes disturb least). Forward hooks
count, per step, the backbone's forward passes, the passes a backward goes through, and the flow
head's evaluations. The sample step (`RefineObjective.rollout_tokens`: one head evaluation for
deterministic, `sample_steps` Euler evaluations of the head for stochastic, as many on a doubled
batch after one more no-gradient backbone pass for cfg) is timed inside each refine step and
reported on its own, with the step's time without it.
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
from bench_models import add_model_size_args, device_for, model_sizes  # noqa: E402

from jobs.config import load_config  # noqa: E402
from models import build_model, count_parameters  # noqa: E402
from pipelines.train.driver import resolve_length  # noqa: E402
from pipelines.train.objectives import PretrainObjective, RefineObjective  # noqa: E402
from pipelines.train.optim import make_ema, make_optimizer, make_scheduler  # noqa: E402
from pipelines.train.worker import Trainer, train_step  # noqa: E402

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


def time_sample_step(objective: RefineObjective, counter: PassCounter, device: torch.device) -> None:
    """Wrap the objective's sample step: its seconds and head evaluations of the last call."""
    rollout = objective.rollout_tokens

    def timed(*a, **kw):
        sync(device)
        heads, t0 = counter.counts["head"], time.perf_counter()
        out = rollout(*a, **kw)
        sync(device)
        objective.sample_seconds = time.perf_counter() - t0
        counter.counts["sample_head"] += counter.counts["head"] - heads
        return out

    objective.rollout_tokens = timed


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_size_args(p, cuda)
    p.add_argument("--token-dim", type=int, default=16, help="16: KL-VAE; 48: demo's raw 4x4 px")
    p.add_argument("--grouping", default="next-neighbour")
    p.add_argument("--batch", type=int, default=64 if cuda else 8)
    p.add_argument("--sample-steps", type=int, default=10, help="refine.sample_steps (Euler steps of the sample step)")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--rollout-fraction", type=float, nargs="*", default=[0.5],
                   help="refine.rollout_fraction values below 1 to time as well, for every mode")
    p.add_argument("--iters", type=int, default=5, help="timed steps per objective")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per objective")
    args = p.parse_args()

    device = device_for(args)
    print(f"refine step cost benchmark: {torch.get_num_threads()} torch threads on {os.cpu_count()} CPUs, "
          f"device {torch.cuda.get_device_name() if cuda else 'cpu'}")
    print(f"load: {uptime()}")

    cfg = load_config("configs/demo.yaml", [f"refine.sample_steps={args.sample_steps}", "refine.optim.warmup_steps=0",
                                            "refine.steps=1000"])
    refine = resolve_length(cfg.refine, num_rows=1)  # the EMA decay derived from the run's length
    torch.manual_seed(0)
    model = build_model(args.preset, token_dim=args.token_dim, height=args.grid, width=args.grid,
                        grouping=args.grouping, num_classes=10, **model_sizes(args)).to(device).train()
    g, c = model.grouping, model.config
    counter = PassCounter(model)
    objectives = {"pretrain": PretrainObjective(model)}
    for mode in args.modes:
        objectives[f"refine {mode}"] = RefineObjective(model, refine.model_copy(update={"sample_mode": mode}))
        for f in args.rollout_fraction:
            objectives[f"refine {mode} f={f:g}"] = RefineObjective(
                model, refine.model_copy(update={"sample_mode": mode, "rollout_fraction": f}))
    for objective in objectives.values():
        objective.to(device).train()
        if isinstance(objective, RefineObjective):
            time_sample_step(objective, counter, device)
    opt = make_optimizer(objectives["pretrain"], refine)  # one optimiser over the shared weights
    ema, sched = make_ema(model, refine.ema_decay), make_scheduler(opt, refine)
    amp = device.type == "cuda" and refine.precision == "bf16"
    trainers = {name: Trainer(objective, ema, opt, sched, objective, device, fsdp=False, grad_clip=refine.optim.grad_clip,
                              amp=amp) for name, objective in objectives.items()}
    gen = torch.Generator().manual_seed(0)
    grid = torch.randn(args.batch, args.grid, args.grid, args.token_dim, generator=gen).to(device)
    batch = {"mean": grid, "mean_flip": grid, "label": torch.randint(10, (args.batch,), generator=gen)}
    print(f"model: {args.preset} with depth {c.depth}, width {c.hidden_size}, head {c.head_depth} x {c.head_width} "
          f"({count_parameters(model.backbone) / 1e6:.2f}M backbone, {count_parameters(model.head) / 1e6:.2f}M head), "
          f"{g.name} {args.grid}x{args.grid} ({g.num_groups} groups, L={g.seq_len}, D={args.token_dim}), batch "
          f"{args.batch}; refine.sample_steps {refine.sample_steps}, cfg_scale {refine.cfg_scale}, head_batch_mul "
          f"{c.head_batch_mul}")

    def step(name: str, log_metrics: bool = False) -> None:
        train_step(trainers[name], [batch], gen, {}, log_metrics=log_metrics)
        sync(device)

    # Passes per step: an ordinary step and a log step, untimed (the first two warm-up steps).
    passes, logged = {}, {}
    for name in objectives:
        counter.take()
        step(name)
        passes[name] = counter.take()
        step(name, log_metrics=True)
        logged[name] = counter.take()
    for _ in range(args.warmup - 2):
        for name in objectives:
            step(name)

    # The objectives take turns step by step; the sample step is timed inside each refine step.
    times: dict[str, list[float]] = {name: [] for name in objectives}
    cpu: dict[str, list[float]] = {name: [] for name in objectives}
    sample_times: dict[str, list[float]] = {name: [] for name in objectives}
    for _ in range(args.iters):
        for name, objective in objectives.items():
            t0, c0 = time.perf_counter(), time.process_time()
            step(name)
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
            if name != "pretrain":
                sample_times[name].append(objective.sample_seconds)

    base, base_cpu = min(times["pretrain"]), min(cpu["pretrain"])
    print(f"\n{'objective':26s}{'min ms':>8s}{'median':>8s}{'mean':>8s}{'ratio':>7s}{'CPU ms':>8s}{'ratio':>7s}"
          f"{'backbone fwd':>13s}{'bwd':>4s}{'head evals':>11s}   {'sample step: min ms, head evals, share':s}")
    for name, t in times.items():
        sample = ""
        if sample_times[name]:
            sample = (f"{min(sample_times[name]) * 1e3:8.1f} ms {passes[name]['sample_head']:3d}"
                      f"   {statistics.median([a / b for a, b in zip(sample_times[name], t)]) * 100:4.0f}%")
        print(f"{name:26s}{min(t) * 1e3:8.1f}{statistics.median(t) * 1e3:8.1f}{statistics.fmean(t) * 1e3:8.1f}"
              f"{min(t) / base:6.2f}x{min(cpu[name]) * 1e3:8.1f}{min(cpu[name]) / base_cpu:6.2f}x"
              f"{passes[name]['forward']:13d}{passes[name]['backward']:4d}{passes[name]['head']:11d}   {sample}")
    for name in objectives:
        if sample_times[name]:
            rest = min(a - b for a, b in zip(times[name], sample_times[name]))
            print(f"{name} without its sample step: {rest * 1e3:.1f} ms, {rest / base:.2f}x pretrain")
    extra = ", ".join(f"{mode} {logged[f'refine {mode}']['head'] - passes[f'refine {mode}']['head']}"
                      for mode in args.modes)
    print(f"({args.iters} timed steps each, ordinary steps: no exposure-gap metric; a log step adds its head "
          f"evaluations: {extra}.) ratio: fastest step / fastest "
          "pretrain step, in wall and in CPU time (the minimum is the figure least disturbed by other processes). "
          "head evals: one flow loss call per loss (over head_batch_mul x B x L rows) and the sample step's. "
          "share: median fraction of the refine step spent in the sample step.")
    print(f"load: {uptime()}")


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


if __name__ == "__main__":
    main()
