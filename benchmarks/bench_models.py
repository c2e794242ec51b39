"""Benchmarks of the SAR model (models/): what the one-pass streams and the KV cache buy.

  (1) one training step (fwd + bwd): one-pass streams vs one forward per group (paper Fig. 2),
      per grouping, and the speed-up;
  (2) sampling: KV cache (T backbone calls on the new tokens) vs recomputing the prefix each step;
  (3) CUDA only: FlexAttention vs masked SDPA, and training images/s and MFU in bf16.

CPU, small:  uv run python benchmarks/bench_models.py --preset tiny --depth 4 --hidden-size 256 --grid 8
CUDA:        uv run python benchmarks/bench_models.py          (defaults: sar-b, 16x16, batch 64)
"""
import argparse
import time

import torch

from models import GROUPINGS, Guidance, build_model, count_parameters

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}  # dense, no sparsity


def timed(fn, device, iters, warmup=1):
    """Fastest seconds of fn() over iters after warmup calls (the minimum is robust to other
    processes sharing the machine)."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def make(args, grouping, device, **overrides):
    g = args.grid
    scales = tuple(s for s in (1, 2, 4, 8, 16, 32, 64) if s < g) + (g,) if grouping == "next-scale" else None
    sizes = {k: v for k, v in (("depth", args.depth), ("hidden_size", args.hidden_size),
                               ("num_heads", args.heads), ("head_width", args.head_width)) if v}
    return build_model(args.preset, grouping=grouping, height=g, width=g, scales=scales,
                       **{**sizes, **overrides}).to(device)


def batch(model, size, device):
    x = torch.randn(size, model.grouping.seq_len, model.config.token_dim, device=device)
    return x, torch.randint(model.config.num_classes, (size,), device=device)


def autocast(device, enabled):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def bench_training(args, device):
    m = make(args, "next-row", device)
    print(f"\n(1) training step fwd+bwd, one pass vs one forward per group (naive), {args.preset} "
          f"(depth {m.config.depth}, width {m.config.hidden_size}, {count_parameters(m) / 1e6:.1f}M), "
          f"{args.grid}x{args.grid}, batch {args.batch}")
    print(f"{'grouping':16s}{'T':>5s}{'streams':>9s}{'one-pass ms':>13s}{'naive ms':>11s}{'speed-up':>10s}")
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

        fast = timed(one_pass, device, args.iters, warmup=2)
        slow = timed(naive, device, args.iters)
        streams = 1 if model.single_stream else 2
        print(f"{name:16s}{g.num_groups:5d}{streams:9d}{fast * 1e3:13.1f}{slow * 1e3:11.1f}{slow / fast:9.1f}x")


def bench_sampling(args, device):
    print(f"\n(2) sampling {args.sample_batch} images, {args.flow_steps} flow steps, no guidance: "
          f"KV cache vs recompute the prefix each step")
    print(f"{'grouping':16s}{'T':>5s}{'cache ms':>10s}{'recompute ms':>14s}{'speed-up':>10s}")
    for name in args.groupings:
        model = make(args, name, device).eval()
        labels = torch.randint(model.config.num_classes, (args.sample_batch,), device=device)
        seeds = list(range(args.sample_batch))

        def run(use_cache):
            with autocast(device, args.bf16):
                model.generate(labels, seeds=seeds, flow_steps=args.flow_steps, use_cache=use_cache)

        cached = timed(lambda: run(True), device, args.iters)
        recompute = timed(lambda: run(False), device, args.iters)
        print(f"{name:16s}{model.grouping.num_groups:5d}{cached * 1e3:10.1f}{recompute * 1e3:14.1f}"
              f"{recompute / cached:9.1f}x")
    model = make(args, "next-neighbour", device).eval()
    labels = torch.randint(model.config.num_classes, (args.sample_batch,), device=device)
    print("    guidance cost (next-neighbour, cached):")
    for guidance in [Guidance(), Guidance("x_cfg", w_x=1.25), Guidance("z_cfg", w_z=2.7),
                     Guidance("cfg", cfg=3.5), Guidance("xz_cfg", w_x=1.25, w_z=2.7)]:
        def guided():
            with autocast(device, args.bf16):
                model.generate(labels, seeds=list(range(len(labels))), guidance=guidance, flow_steps=args.flow_steps)
        print(f"    {guidance.kind:8s}{timed(guided, device, args.iters) * 1e3:10.1f} ms")


def train_flops_per_image(model):
    """Matmul FLOPs of one training step per image: 6 N tokens for the linears, plus attention
    scores and values (12 S^2 W per layer, dense) and the head at head_batch_mul t per token."""
    c, g = model.config, model.grouping
    S = 1 + g.seq_len * (1 if model.single_stream else 2)
    backbone = count_parameters(model.backbone)
    head = count_parameters(model.head)
    return 6 * backbone * S + 12 * c.depth * S * S * c.hidden_size + 6 * head * g.seq_len * c.head_batch_mul


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
    p.add_argument("--preset", default="sar-b" if cuda else "tiny")
    p.add_argument("--depth", type=int, help="override the preset's depth")
    p.add_argument("--hidden-size", type=int, help="override the preset's backbone width")
    p.add_argument("--heads", type=int, help="override the preset's number of heads")
    p.add_argument("--head-width", type=int, help="override the preset's head width")
    p.add_argument("--grid", type=int, default=16 if cuda else 8)
    p.add_argument("--batch", type=int, default=64 if cuda else 8)
    p.add_argument("--sample-batch", type=int, default=64 if cuda else 4)
    p.add_argument("--flow-steps", type=int, default=25 if cuda else 4)
    p.add_argument("--iters", type=int, default=5 if cuda else 3)
    p.add_argument("--groupings", nargs="+", default=list(GROUPINGS), choices=GROUPINGS)
    p.add_argument("--cuda-groupings", nargs="+", default=["next-neighbour", "next-row"], choices=GROUPINGS)
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=cuda)
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--skip", nargs="*", default=[], choices=["train", "sample", "cuda"])
    args = p.parse_args()
    device = torch.device("cuda" if cuda else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    torch.manual_seed(0)
    if "train" not in args.skip:
        bench_training(args, device)
    if "sample" not in args.skip:
        bench_sampling(args, device)
    if "cuda" not in args.skip:
        bench_cuda(args, device)


if __name__ == "__main__":
    main()
