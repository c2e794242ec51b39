"""Benchmarks of the SAR model (models/): what the one-pass streams and the KV cache buy.

  (1) one training step (fwd + bwd): one-pass streams vs one forward per group (paper Fig. 2),
      per grouping, the speed-up, and the token-forward ratio it is held against;
  (2) sampling: KV cache (T backbone calls on the new tokens) vs recomputing the prefix each step;
  (3) CUDA only: FlexAttention vs masked SDPA, and training images/s and MFU in bf16.

The token-forward ratio of a grouping is derived from the grouping itself: the tokens the naive
pipeline pushes through the backbone (group t: cond + the prefix G_<t as context + G_t, or in the
single stream cond + G_<=t) over the one pass's (cond + L, two streams: cond + 2L). Backbone
compute, and with it the time, follows it when the backbone dominates and attention is a small
part of a block (the naive side's short prefixes pay less attention per token than the one pass's
full sequence). Printed beside it are the ratios quoted for 16x16 (next-scale 1,2,4,8,16), which
count no cond token. Sampling has its own ratio: the prefix recomputed at every step against the
cached step's [context(G_{t-1}); generation(G_t)].

The sides of each comparison take turns in one run and the fastest of the repeats is kept, in
wall time and in CPU time of this process (the one other processes disturb least); the load
average is printed with each table.

CPU (16x16, a depth-8 x 256 backbone, a 2 x 64 head):
  uv run python -u benchmarks/bench_models.py --threads 1 --skip cuda
CUDA:        uv run python benchmarks/bench_models.py          (defaults: sar-b, 16x16, batch 64)
"""
import argparse
import math
import os
import time

import torch

from models import GROUPINGS, Guidance, build_model, count_parameters, train_flops_per_image

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}  # dense, no sparsity
# Token-forward ratios quoted for a 16x16 grid (next-scale 1,2,4,8,16), without the cond token.
QUOTED_16 = {"next-token": 128, "next-row": 8.5, "next-neighbour": 8.0, "next-layer": 1.6, "next-scale": 1.3}
LONG = 64  # groups above which the naive side is timed `--long-iters` times, without warm-up


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, iters, warmup=1):
    """Fastest seconds of fn() over iters after warmup calls (the minimum is robust to other
    processes sharing the machine)."""
    return side_by_side({"fn": (fn, iters, warmup)}, device)["fn"][0]


def side_by_side(sides, device):
    """Fastest (wall, CPU) seconds of each side, {name: (fn, repeats, warmup)}.

    After the warm-up calls the sides take turns, round by round, so that the load of a shared
    machine falls on all alike; a side with fewer repeats drops out when they are done. CPU time
    is this process's (all its threads).
    """
    for fn, _, warmup in sides.values():
        for _ in range(warmup):
            fn()
    best = {name: (math.inf, math.inf) for name in sides}
    for r in range(max(repeats for _, repeats, _ in sides.values())):
        for name, (fn, repeats, _) in sides.items():
            if r >= repeats:
                continue
            sync(device)
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            sync(device)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            best[name] = (min(best[name][0], wall), min(best[name][1], cpu))
    return best


def load():
    return "load average " + " ".join(f"{v:.1f}" for v in os.getloadavg())


def add_model_size_args(p: argparse.ArgumentParser, cuda: bool) -> None:
    """The flags that size the benchmarked model: a preset and overrides of it (CPU: a 16x16 depth-8 x 256 model)."""
    p.add_argument("--preset", default="sar-b" if cuda else "tiny")
    p.add_argument("--depth", type=int, default=None if cuda else 8, help="override the preset's depth")
    p.add_argument("--hidden-size", type=int, default=None if cuda else 256, help="override the preset's backbone width")
    p.add_argument("--heads", type=int, help="override the preset's number of heads")
    p.add_argument("--head-width", type=int, help="override the preset's head width")
    p.add_argument("--grid", type=int, default=16, help="token grid side")
    p.add_argument("--threads", type=int, help="torch CPU threads")


def device_for(args) -> torch.device:
    """CUDA when there is one, else the CPU with `--threads` torch threads."""
    if args.threads:
        torch.set_num_threads(args.threads)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def header(columns: list[tuple[str, int]]) -> str:
    """A table's header line: each name right-aligned in its width (the first left-aligned)."""
    (first, width), *rest = columns
    return f"{first:{width}s}" + "".join(f"{name:>{w}s}" for name, w in rest)


def model_sizes(args) -> dict:
    """The preset overrides the size flags ask for."""
    return {k: v for k, v in (("depth", args.depth), ("hidden_size", args.hidden_size),
                              ("num_heads", args.heads), ("head_width", args.head_width)) if v}


def make(args, grouping, device, **overrides):
    g = args.grid
    scales = tuple(s for s in (1, 2, 4, 8, 16, 32, 64) if s < g) + (g,) if grouping == "next-scale" else None
    return build_model(args.preset, grouping=grouping, height=g, width=g, scales=scales,
                       **{**model_sizes(args), **overrides}).to(device)


def batch(model, size, device):
    x = torch.randn(size, model.grouping.seq_len, model.config.token_dim, device=device)
    return x, torch.randint(model.config.num_classes, (size,), device=device)


def autocast(device, enabled):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def token_forward_ratio(model):
    """Tokens through the backbone of one forward per group over those of the one pass."""
    g = model.grouping
    stops = g.group_starts[1:]  # the end of each group
    if model.single_stream:                              # cond + G_<=t
        return sum(1 + stop for stop in stops) / (1 + g.seq_len)
    return sum(1 + stop for stop in stops) / (1 + 2 * g.seq_len)  # cond + context G_<t + G_t


def decode_token_ratio(model):
    """Tokens through the backbone when the prefix is recomputed at every step over those of
    the cached steps (cond once, then [context(G_{t-1}); generation(G_t)])."""
    g = model.grouping
    sizes, stops = g.group_sizes, g.group_starts[1:]
    cached = 1 + sum(sizes[t] + (0 if model.single_stream or t == 0 else sizes[t - 1]) for t in range(g.num_groups))
    return sum(1 + stop for stop in stops) / cached


def describe(model, args, batch_size):
    c = model.config
    return (f"{args.preset} with depth {c.depth}, width {c.hidden_size}, {c.num_heads} heads, head {c.head_depth} x "
            f"{c.head_width} ({count_parameters(model.backbone) / 1e6:.2f}M backbone, "
            f"{count_parameters(model.head) / 1e6:.2f}M head), {args.grid}x{args.grid}, batch {batch_size}")


def bench_training(args, device):
    m = make(args, "next-row", device)
    print(f"\n(1) training step fwd+bwd, one pass vs one forward per group (naive), {describe(m, args, args.batch)}; "
          f"{load()}")
    print(header([("grouping", 16), ("T", 5), ("streams", 8), ("one-pass ms", 12), ("naive ms", 11), ("speed-up", 9),
                  ("CPU speed-up", 13), ("token ratio", 12), ("quoted", 8), ("of ratio", 11), ("naive reps", 11)]))
    for name in args.groupings:
        model = make(args, name, device).train()
        x, labels = batch(model, args.batch, device)
        g = model.grouping

        def one_pass():
            with autocast(device, args.bf16):
                loss = model.head.loss(model(x, labels), x).mean()
            loss.backward()

        def naive():
            for t in range(g.num_groups):                  # one forward (and backward) per group
                sl = g.group_slice(t)
                with autocast(device, args.bf16):
                    loss = model.head.loss(model.forward_group(x, labels, t), x[:, sl]).sum() / x.shape[1]
                loss.backward()

        long = g.num_groups > LONG
        reps = args.long_iters if long else args.iters
        t = side_by_side({"fast": (one_pass, args.iters, 2), "slow": (naive, reps, 0 if long else 1)}, device)
        (fast, fast_cpu), (slow, slow_cpu) = t["fast"], t["slow"]
        ratio = token_forward_ratio(model)
        quoted = f"{QUOTED_16[name]:.1f}" if args.grid == 16 and name in QUOTED_16 else "-"
        streams = 1 if model.single_stream else 2
        print(f"{name:16s}{g.num_groups:5d}{streams:8d}{fast * 1e3:12.1f}{slow * 1e3:11.1f}{slow / fast:8.1f}x"
              f"{slow_cpu / fast_cpu:12.1f}x{ratio:11.1f}x{quoted:>8s}"
              f"{f'{slow / fast / ratio:.2f} {slow_cpu / fast_cpu / ratio:.2f}':>11s}{reps:11d}", flush=True)
    print(f"    {load()}; of ratio: the speed-up over the token ratio, wall and CPU")


def bench_sampling(args, device):
    print(f"\n(2) sampling {args.sample_batch} images, {args.flow_steps} flow steps, no guidance: KV cache vs "
          f"recompute the prefix each step; {load()}")
    print(header([("grouping", 16), ("T", 5), ("cache ms", 10), ("recompute ms", 14), ("speed-up", 9),
                  ("CPU speed-up", 13), ("token ratio", 12), ("head share", 11)]))
    for name in args.sample_groupings:
        model = make(args, name, device).eval()
        labels = torch.randint(model.config.num_classes, (args.sample_batch,), device=device)
        seeds = list(range(args.sample_batch))

        def run(use_cache):
            with autocast(device, args.bf16):
                model.generate(labels, seeds=seeds, flow_steps=args.flow_steps, use_cache=use_cache)

        t = side_by_side({"cache": (lambda: run(True), args.iters, 1),
                          "recompute": (lambda: run(False), args.iters, 1)}, device)
        (cached, cached_cpu), (recompute, recompute_cpu) = t["cache"], t["recompute"]
        share = head_share(model, lambda: run(True), device)
        print(f"{name:16s}{model.grouping.num_groups:5d}{cached * 1e3:10.1f}{recompute * 1e3:14.1f}"
              f"{recompute / cached:8.1f}x{recompute_cpu / cached_cpu:12.1f}x{decode_token_ratio(model):11.1f}x"
              f"{share * 100:10.0f}%", flush=True)
    print(f"    {load()}; head share: the head's part of a cached run (its sampling steps), the rest is the backbone")
    model = make(args, "next-neighbour", device).eval()
    labels = torch.randint(model.config.num_classes, (args.sample_batch,), device=device)
    print("    guidance cost (next-neighbour, cached):")
    for guidance in [Guidance(), Guidance("x_cfg", w_x=1.25), Guidance("z_cfg", w_z=2.7),
                     Guidance("cfg", cfg=3.5), Guidance("xz_cfg", w_x=1.25, w_z=2.7)]:
        def guided():
            with autocast(device, args.bf16):
                model.generate(labels, seeds=list(range(len(labels))), guidance=guidance, flow_steps=args.flow_steps)
        print(f"    {guidance.kind:8s}{timed(guided, device, args.iters) * 1e3:10.1f} ms")


def head_share(model, fn, device):
    """Share of fn()'s wall time spent in the head's sample() (one timed call)."""
    spent, sample = [0.0], model.head.sample

    def timed_sample(*a, **kw):
        sync(device)
        start = time.perf_counter()
        out = sample(*a, **kw)
        sync(device)
        spent[0] += time.perf_counter() - start
        return out

    model.head.sample = timed_sample
    try:
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        return spent[0] / (time.perf_counter() - start)
    finally:
        del model.head.sample


def bench_cuda(args, device):
    print("\n(3) CUDA: FlexAttention vs masked SDPA, training throughput and MFU (bf16)")
    if device.type != "cuda":
        print("    skipped: no CUDA device (FlexAttention's fast path and MFU need a GPU)")
        return
    name = torch.cuda.get_device_name(device)
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
    for grouping in args.cuda_groupings:
        for backend, compiled in [("sdpa", False), ("flex", False), ("flex", True)]:
            torch.manual_seed(0)
            model = make(args, grouping, device, attention=backend).train()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=True)
            x, labels = batch(model, args.batch, device)

            def loss_fn(x, labels):
                with autocast(device, True):
                    return model.head.loss(model(x, labels), x).mean()

            forward = torch.compile(loss_fn) if compiled else loss_fn

            def step():
                forward(x, labels).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            sec = timed(step, device, args.iters, warmup=3)
            ips = args.batch / sec
            mfu = f"{train_flops_per_image(model) * ips / peak * 100:5.1f}%" if peak else "n/a (unknown peak)"
            label = backend + (" + torch.compile" if compiled else "")
            print(f"    {grouping:15s}{label:22s} {sec * 1e3:8.1f} ms/step  {ips:8.1f} img/s  MFU {mfu}"
                  f"  ({count_parameters(model) / 1e6:.0f}M params, batch {args.batch}, {name})", flush=True)
            del model, opt
            torch.cuda.empty_cache()


def main():
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_size_args(p, cuda)
    p.add_argument("--batch", type=int, default=64 if cuda else 4)
    p.add_argument("--sample-batch", type=int, default=64 if cuda else 8)
    p.add_argument("--flow-steps", type=int, default=25 if cuda else 2)
    p.add_argument("--iters", type=int, default=5 if cuda else 3)
    p.add_argument("--long-iters", type=int, default=1,
                   help=f"timed repeats of a naive side with more than {LONG} groups (next-token), no warm-up")
    p.add_argument("--groupings", nargs="+", default=list(GROUPINGS), choices=GROUPINGS)
    p.add_argument("--sample-groupings", nargs="+", default=["next-neighbour"], choices=GROUPINGS)
    p.add_argument("--cuda-groupings", nargs="+", default=["next-neighbour", "next-row"], choices=GROUPINGS)
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=cuda)
    p.add_argument("--skip", nargs="*", default=[], choices=["train", "sample", "cuda"])
    args = p.parse_args()
    device = device_for(args)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()} on {os.cpu_count()} CPUs, "
          f"{load()}")
    torch.manual_seed(0)
    if "train" not in args.skip:
        bench_training(args, device)
    if "sample" not in args.skip:
        bench_sampling(args, device)
    if "cuda" not in args.skip:
        bench_cuda(args, device)


if __name__ == "__main__":
    main()
